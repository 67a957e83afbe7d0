#!/usr/bin/env bash
# Two `granary` binaries side by side: three-node publish runs, alternating A and B, so
# that both see the same minutes of a machine whose speed drifts (a VM's can move by 15 %
# from one minute to the next, more than most changes are worth).
#
#   scripts/bench-compare.sh OLD_BINARY NEW_BINARY
#
# Each round runs `cluster-bench publish` once with A, then once with B; the table lists
# every run (publishes/s, p50, p99, all nodes' CPU per publish), then each binary's
# medians and how many rounds B won. Results go to bench-out/compare-<timestamp>/.
# See docs/BENCHMARKS.md.
#
# Knobs (environment):
#   ROUNDS=5               rounds (each one run of A and one of B)
#   SECONDS_PER_RUN=12     duration of each run
#   CONCURRENCY=16         concurrent publishers
#   KIB=100                package size
#   NODES=3                cluster size
#   WARMUP=0               seconds of the same load before each run, not counted
#   SKIP_BUILD=1           do not build cluster-bench
#   A_ENV / B_ENV          extra environment for A's / B's nodes, e.g. B_ENV="TOKIO_WORKER_THREADS=1"
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ $# -ne 2 ]]; then
    echo "usage: $0 OLD_BINARY NEW_BINARY" >&2
    exit 2
fi
A=$(realpath "$1")
B=$(realpath "$2")
for bin in "$A" "$B"; do
    [[ -x $bin ]] || { echo "$bin is not an executable" >&2; exit 2; }
done
ROUNDS=${ROUNDS:-5}
SECONDS_PER_RUN=${SECONDS_PER_RUN:-12}
CONCURRENCY=${CONCURRENCY:-16}
KIB=${KIB:-100}
NODES=${NODES:-3}
WARMUP=${WARMUP:-0}
if [[ -z ${SKIP_BUILD:-} ]]; then
    cargo build --release -p granary-cluster-tests --bin cluster-bench
fi
OUT=bench-out/compare-$(date -u +%Y%m%dT%H%M%SZ)
mkdir -p "$OUT"
echo "A=$A" >"$OUT/binaries.txt"
echo "B=$B" >>"$OUT/binaries.txt"
for r in $(seq "$ROUNDS"); do
    for side in A B; do
        bin=$A extra=${A_ENV:-}
        if [[ $side == B ]]; then bin=$B extra=${B_ENV:-}; fi
        echo "== round $r, $side"
        # shellcheck disable=SC2086 # extra is a list of NAME=value words
        env $extra GRANARY_BIN="$bin" target/release/cluster-bench publish \
            "$SECONDS_PER_RUN" "$CONCURRENCY" "$KIB" "$NODES" "$WARMUP" \
            2>"$OUT/round$r-$side.log" | tail -1 >"$OUT/round$r-$side.json"
    done
done
python3 - "$OUT" "$ROUNDS" <<'EOF'
import json, statistics, sys
out, rounds = sys.argv[1], int(sys.argv[2])
runs = {s: [json.load(open(f"{out}/round{r}-{s}.json")) for r in range(1, rounds + 1)] for s in "AB"}
lines = ["| round | A per s | A p50 / p99 ms | A CPU ms | B per s | B p50 / p99 ms | B CPU ms |",
         "|---|---|---|---|---|---|---|"]
row = lambda j: [f"{j['per_second']:.0f}", f"{j['p50_ms']:.0f} / {j['p99_ms']:.0f}",
                 f"{j['node_cpu_ms_per_publish']:.2f}"]
for r in range(rounds):
    lines.append("| " + " | ".join([str(r + 1)] + row(runs["A"][r]) + row(runs["B"][r])) + " |")
med = lambda s, k: statistics.median(j[k] for j in runs[s])
lines.append("| median | " + " | ".join(
    f"{med(s, 'per_second'):.0f} | {med(s, 'p50_ms'):.0f} / {med(s, 'p99_ms'):.0f} | "
    f"{med(s, 'node_cpu_ms_per_publish'):.2f}" for s in "AB") + " |")
won = sum(runs["B"][r]["per_second"] > runs["A"][r]["per_second"] for r in range(rounds))
errors = sum(j["errors"] for s in "AB" for j in runs[s])
lines.append("")
lines.append(f"B had more publishes/s in {won} of {rounds} rounds; errors in all runs: {errors}")
table = "\n".join(lines)
print(table)
open(f"{out}/table.md", "w").write(table + "\n")
EOF
echo "== results in $OUT"
