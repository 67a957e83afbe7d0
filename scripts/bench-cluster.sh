#!/usr/bin/env bash
# Cluster benchmarks on one machine: three `granary` processes (release build) on loopback.
#
#   scripts/bench-cluster.sh
#
# (1) failover: SIGKILL the leader, time until the next publish is acknowledged by a
#     survivor; the old leader restarts and the cluster converges before the next trial.
# (2) publish: npm publishes of unique, incompressible packages spread over the three nodes
#     at a fixed concurrency: acknowledged publishes per second, p50 and p99 latency, and
#     the CPU time of the nodes (and of the load generator) per acknowledged publish over
#     the middle half of the run; then the same load on one node alone, the reference (no
#     replication, no Raft round trips).
# (3) rate: the same publishes offered at a fixed rate (open loop: each is sent when it is
#     due, answered or not, and timed from then), three nodes then one: the latency at
#     that rate, and whether the cluster keeps up; and at OVERLOAD per second, more than
#     it can do, to show it turns the excess away (503, Retry-After) and keeps working.
# Results (one JSON line per run, and the logs) go to bench-out/cluster-<timestamp>/.
# See docs/BENCHMARKS.md.
#
# Knobs (environment):
#   TRIALS=20              failover trials
#   SECONDS_PER_RUN=20     duration of each publish run
#   CONCURRENCY="8 16 64"  publish runs, one per concurrency (three nodes, then one)
#   KIB=100                package size
#   RATES="500"            open-loop runs, one per rate (publishes per second)
#   OVERLOAD=700           an open-loop rate above what the cluster does ("" skips it)
#   WARMUP=0               seconds of the same load before each publish run, not
#                          counted (a new node's memory and chunk cache fill then)
#   PROFILE=release        cargo profile of the granary binary: `release-lto` for the
#                          production build (fat LTO; a long cold build), see Cargo.toml
#   SKIP_BUILD=1           do not run cargo build
#   GRANARY_BIN=...        the granary binary (default: target/$PROFILE/granary), e.g. an
#                          earlier release to compare with in the same session
set -euo pipefail
cd "$(dirname "$0")/.."
TRIALS=${TRIALS:-20}
SECONDS_PER_RUN=${SECONDS_PER_RUN:-20}
CONCURRENCY=${CONCURRENCY:-"8 16 64"}
KIB=${KIB:-100}
WARMUP=${WARMUP:-0}
RATES=${RATES:-500}
OVERLOAD=${OVERLOAD-700}
PROFILE=${PROFILE:-release}
if [[ -z ${SKIP_BUILD:-} ]]; then
    cargo build --profile "$PROFILE" -p granary-node --bin granary
    cargo build --release -p granary-cluster-tests --bin cluster-bench
fi
export GRANARY_BIN=${GRANARY_BIN:-$PWD/target/$PROFILE/granary}
OUT=bench-out/cluster-$(date -u +%Y%m%dT%H%M%SZ)
mkdir -p "$OUT"
echo "== failover: $TRIALS trials"
target/release/cluster-bench failover "$TRIALS" 2>"$OUT/failover.log" | tee "$OUT/failover.json"
for c in $CONCURRENCY; do
    for nodes in 3 1; do
        echo "== publish: ${SECONDS_PER_RUN}s after ${WARMUP}s, concurrency $c, $KIB KiB, $nodes node(s)"
        target/release/cluster-bench publish "$SECONDS_PER_RUN" "$c" "$KIB" "$nodes" "$WARMUP" \
            2>"$OUT/publish-c$c-n$nodes.log" | tee "$OUT/publish-c$c-n$nodes.json"
    done
done
for r in $RATES $OVERLOAD; do
    for nodes in 3 1; do
        echo "== rate: ${SECONDS_PER_RUN}s after ${WARMUP}s, $r per second offered, $KIB KiB, $nodes node(s)"
        target/release/cluster-bench rate "$SECONDS_PER_RUN" "$r" "$KIB" "$nodes" "$WARMUP" \
            2>"$OUT/rate-r$r-n$nodes.log" | tee "$OUT/rate-r$r-n$nodes.json"
    done
done
echo "== results in $OUT"
