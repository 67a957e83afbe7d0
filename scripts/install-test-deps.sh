#!/usr/bin/env bash
# Installs what building and testing Granary needs on a fresh Debian 12 machine:
# libclang (RocksDB's bindings), the AWS CLI (the tests drive it), haproxy (a load
# balancer in front of a cluster), iptables, and checks for npm.
# Safe to run again: it installs only what is missing.
set -euo pipefail

need_apt=()
dpkg -s libclang-dev >/dev/null 2>&1 || need_apt+=(libclang-dev)
command -v npm >/dev/null 2>&1 || need_apt+=(nodejs npm)
command -v openssl >/dev/null 2>&1 || need_apt+=(openssl)
command -v iptables >/dev/null 2>&1 || need_apt+=(iptables)
command -v fincore >/dev/null 2>&1 || need_apt+=(util-linux-extra)
command -v haproxy >/dev/null 2>&1 || need_apt+=(haproxy)
if [ "${#need_apt[@]}" -gt 0 ]; then
  echo "installing with apt: ${need_apt[*]}"
  sudo_cmd=""
  [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

if ! command -v aws >/dev/null 2>&1; then
  echo "installing the AWS CLI with pip"
  python3 -m pip install --quiet --disable-pip-version-check awscli
  hash -r
fi

if ! cargo nextest --version >/dev/null 2>&1; then
  echo "installing cargo-nextest"
  cargo install --locked cargo-nextest
fi

for tool in aws npm node cargo haproxy; do
  command -v "$tool" >/dev/null 2>&1 || { echo "missing after install: $tool" >&2; exit 1; }
done
echo "test dependencies: ok (aws $(aws --version 2>&1 | cut -d' ' -f1), npm $(npm --version))"
