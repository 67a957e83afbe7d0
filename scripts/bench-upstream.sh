#!/usr/bin/env bash
# Upstream benchmarks on one machine: `granary` processes (release build) on loopback whose
# external connection `public:npmjs` points at the cluster-tests' stand-in public registry.
#
#   scripts/bench-upstream.sh
#
# (1) install: `npm install` of a project whose dependency tree has PACKAGES packages, per
#     trial straight from the stand-in (the reference), then through app → team →
#     store(public:npmjs) of a new domain (cold: nothing kept or cached), then the same
#     domain again (warm); fresh npm cache and project every time. One node.
# (2) coalesce: 1,000 concurrent GETs (one connection each) of one uncached 10 MiB tarball,
#     round-robin over 1 node, then over 3 nodes: how many reach the public registry
#     (the goal is one), latency, failures.
# Results (one JSON line per run, and the logs with every node's output) go to
# bench-out/upstream-<timestamp>/. See docs/BENCHMARKS.md.
#
# Knobs (environment):
#   TRIALS=5               install trials
#   PACKAGES=50            packages in the installed tree
#   SKIP_BUILD=1           do not run cargo build
#   GRANARY_BIN=...        the granary binary (default: target/release/granary)
set -euo pipefail
cd "$(dirname "$0")/.."
TRIALS=${TRIALS:-5}
PACKAGES=${PACKAGES:-50}
if [[ -z ${SKIP_BUILD:-} ]]; then
    cargo build --release -p granary-node --bin granary -p granary-cluster-tests --bin upstream-bench
fi
export GRANARY_BIN=${GRANARY_BIN:-$PWD/target/release/granary}
# The nodes' output (RUST_LOG=warn) goes into each run's log.
export GRANARY_TEST_ECHO=1
OUT=bench-out/upstream-$(date -u +%Y%m%dT%H%M%SZ)
mkdir -p "$OUT"
echo "== install: $TRIALS trials, $PACKAGES packages"
target/release/upstream-bench install "$TRIALS" "$PACKAGES" 2>"$OUT/install.log" | tee "$OUT/install.json"
for nodes in 1 3; do
    echo "== coalesce: $nodes node(s), 1000 concurrent GETs of a 10 MiB tarball"
    target/release/upstream-bench coalesce "$nodes" 1000 10 2>"$OUT/coalesce-n$nodes.log" \
        | tee "$OUT/coalesce-n$nodes.json"
done
echo "== results in $OUT"
