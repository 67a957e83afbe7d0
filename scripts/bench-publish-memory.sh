#!/usr/bin/env bash
# Memory of one node while it takes a large npm publish: the node's peak RSS (VmHWM)
# before and after publishing a SIZE_MIB tarball (default 1024), and the time it took.
# The publish body is JSON with the tarball base64-encoded (+33%), as npm sends it.
# Usage: scripts/bench-publish-memory.sh [SIZE_MIB]
set -euo pipefail
cd "$(dirname "$0")/.."
size_mib=${1:-1024}
work=$(mktemp -d)
pid=""
cleanup() { [ -n "$pid" ] && kill "$pid" 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT

cargo build --release -p granary-node >/dev/null 2>&1 || cargo build --release -p granary-node
export GRANARY_ADMIN_ACCESS_KEY_ID=AKMEMBENCH GRANARY_ADMIN_SECRET_ACCESS_KEY=mem-bench-secret
export AWS_ACCESS_KEY_ID=$GRANARY_ADMIN_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY=$GRANARY_ADMIN_SECRET_ACCESS_KEY AWS_DEFAULT_REGION=us-east-1
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
target/release/granary server --data-dir "$work/data" --http "127.0.0.1:$port" --grpc 127.0.0.1:0 >"$work/server.log" 2>&1 &
pid=$!
ep="http://127.0.0.1:$port"
for _ in $(seq 100); do curl -sf "$ep/healthz" >/dev/null && break; sleep 0.1; done
aws codeartifact create-domain --domain mem --endpoint-url "$ep" >/dev/null
aws codeartifact create-repository --domain mem --repository big --endpoint-url "$ep" >/dev/null
token=$(aws codeartifact get-authorization-token --domain mem --query authorizationToken --output text --endpoint-url "$ep")

python3 - "$size_mib" "$work/body.json" <<'PY'
import base64, hashlib, json, os, sys
size, out = int(sys.argv[1]) * 1024 * 1024, sys.argv[2]
block = b"\x1f\x8b\x08\x00" + os.urandom(3 * 1024 * 1024 - 4)
n = max(1, size // len(block))
sha1, sha512 = hashlib.sha1(), hashlib.sha512()
for _ in range(n):
    sha1.update(block); sha512.update(block)
doc = {"_id": "big", "name": "big", "dist-tags": {"latest": "1.0.0"},
       "versions": {"1.0.0": {"name": "big", "version": "1.0.0", "_id": "big@1.0.0",
                              "dist": {"shasum": sha1.hexdigest(),
                                       "integrity": "sha512-" + base64.b64encode(sha512.digest()).decode()}}}}
with open(out, "wb") as f:
    f.write(json.dumps(doc)[:-1].encode())
    f.write(f', "_attachments": {{"big-1.0.0.tgz": {{"content_type": "application/octet-stream", "length": {n * len(block)}, "data": "'.encode())
    for _ in range(n):
        f.write(base64.b64encode(block))
    f.write(b'"}}}')
PY

hwm() { awk '/VmHWM/ {print $2}' "/proc/$pid/status"; }
before=$(hwm)
start=$(date +%s.%N)
status=$(curl -s -o "$work/reply" -w '%{http_code}' -X PUT -H "Authorization: Bearer $token" \
  -H 'Content-Type: application/json' --data-binary @"$work/body.json" "$ep/npm/mem/big/big")
end=$(date +%s.%N)
after=$(hwm)
[ "$status" = 201 ] || { echo "publish failed: $status $(cat "$work/reply")" >&2; exit 1; }
body_mib=$(( $(stat -c %s "$work/body.json") / 1024 / 1024 ))
printf 'publish of a %s MiB tarball (%s MiB body): %.1f s; node peak RSS %s MiB before, %s MiB after (+%s MiB)\n' \
  "$size_mib" "$body_mib" "$(python3 -c "print($end - $start)")" $((before / 1024)) $((after / 1024)) $(((after - before) / 1024))
