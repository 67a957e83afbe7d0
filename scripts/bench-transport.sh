#!/usr/bin/env bash
# Peer transport benchmark: what one blob push between two processes on loopback costs in
# CPU, through the nodes' gRPC (tonic, the peer settings they use), through HTTP/1.1
# (hyper), and through bare TCP (the reference), side by side in the same run.
#
#   scripts/bench-transport.sh
#
# Runs `transport-bench` (cluster-tests/src/bin/transport-bench.rs) for 100 KiB blobs (the
# cluster benchmark's package size) and 1 KiB messages (the size of a Raft message or a
# forwarded proposal), at concurrency 4 and 1. Results (one JSON line per transport) go to
# bench-out/transport-<timestamp>/. See docs/BENCHMARKS.md.
#
# Knobs (environment):
#   CALLS=20000            calls per transport and size
#   SKIP_BUILD=1           do not run cargo build
set -euo pipefail
cd "$(dirname "$0")/.."
CALLS=${CALLS:-20000}
if [[ -z ${SKIP_BUILD:-} ]]; then
    cargo build --release -p granary-cluster-tests --bin transport-bench
fi
OUT=bench-out/transport-$(date -u +%Y%m%dT%H%M%SZ)
mkdir -p "$OUT"
for c in 4 1; do
    for kib in 100 1; do
        echo "== $kib KiB, concurrency $c, $CALLS calls per transport"
        target/release/transport-bench "$kib" "$CALLS" "$c" | tee "$OUT/kib$kib-c$c.json"
    done
done
echo "== results in $OUT"
