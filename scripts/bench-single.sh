#!/usr/bin/env bash
# Single-node npm read benchmark: Granary side by side with nginx serving the same bytes.
#
#   scripts/bench-single.sh
#
# Builds the release binary (incremental), starts one Granary node and one nginx on loopback,
# publishes (a) a package with one ~100 KiB tarball and (b) a package with 100 versions, copies
# the exact response bytes of both URLs into nginx's root, then runs wrk against each URL on
# both servers, alternating, and prints requests/s, p99 latency and the granary/nginx ratio.
# Results (JSON, the table, raw wrk output, logs) go to bench-out/single-<timestamp>/, with
# bench-out/latest pointing at the newest run. See docs/BENCHMARKS.md.
#
# Knobs (environment):
#   DURATION=15      seconds per measured wrk run
#   WARMUP=5         seconds of warm-up per server and target before measuring
#   ROUNDS=3         measured runs per server and target (alternating); the median is reported
#   CONNECTIONS=64   wrk connections (the concurrency)
#   THREADS=2        wrk threads
#   WRK_TIMEOUT=10   wrk per-request timeout in seconds (wrk's default of 2 s would drop slow
#                    requests from the latency histogram)
#   TARBALL_KIB=100  size of the tarball for target (a)
#   VERSIONS=100     number of versions of the package for target (b)
#   TARGETS="tarball packument"   which targets to run
#   SKIP_BUILD=1     do not run cargo build
#   GRANARY_BIN=...  binary to run (default target/release/granary)
#   OUT_DIR=bench-out
#   RESTART=1        restart granary after publishing (default) so reads come from RocksDB's
#                    files as in a long-running node; RESTART=0 measures with the fixtures
#                    still in the memtable
#   KEEP_TMP=1       keep the temporary directory (data dir, nginx root) for inspection
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

DURATION=${DURATION:-15}
WARMUP=${WARMUP:-5}
ROUNDS=${ROUNDS:-3}
CONNECTIONS=${CONNECTIONS:-64}
THREADS=${THREADS:-2}
WRK_TIMEOUT=${WRK_TIMEOUT:-10}
TARBALL_KIB=${TARBALL_KIB:-100}
VERSIONS=${VERSIONS:-100}
TARGETS=${TARGETS:-tarball packument}
OUT_DIR=${OUT_DIR:-bench-out}
GRANARY_BIN=${GRANARY_BIN:-$ROOT/target/release/granary}

log() { printf '== %s\n' "$*" >&2; }
die() { printf 'bench-single: %s\n' "$*" >&2; exit 1; }

# --- tools ---------------------------------------------------------------------------------
need_apt=()
command -v wrk >/dev/null || need_apt+=(wrk)
command -v nginx >/dev/null || [[ -x /usr/sbin/nginx ]] || need_apt+=(nginx-light)
if ((${#need_apt[@]})); then
    if [[ $EUID -eq 0 ]] && command -v apt-get >/dev/null; then
        log "installing ${need_apt[*]}"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need_apt[@]}" >/dev/null ||
            { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need_apt[@]}" >/dev/null; }
    else
        die "missing: ${need_apt[*]} (apt-get install ${need_apt[*]})"
    fi
fi
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
if ! command -v aws >/dev/null; then
    log "installing the AWS CLI (pip install awscli)"
    python3 -m pip install -q awscli >/dev/null || die "aws CLI missing (pip install awscli)"
fi
for t in curl python3 aws; do command -v "$t" >/dev/null || die "missing: $t"; done

# --- build ---------------------------------------------------------------------------------
if [[ -z ${SKIP_BUILD:-} ]]; then
    log "cargo build --release -p granary-node"
    cargo build --release -p granary-node
fi
[[ -x $GRANARY_BIN ]] || die "no binary at $GRANARY_BIN"

# --- temp dir, cleanup ---------------------------------------------------------------------
TMP=$(mktemp -d "${TMPDIR:-/tmp}/granary-bench.XXXXXX")
GRANARY_PID=
NGINX_PID=
cleanup() {
    local rc=$?
    set +e
    if [[ -n $GRANARY_PID ]] && kill -0 "$GRANARY_PID" 2>/dev/null; then
        kill "$GRANARY_PID"
        for _ in $(seq 50); do kill -0 "$GRANARY_PID" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$GRANARY_PID" 2>/dev/null
    fi
    if [[ -n $NGINX_PID ]] && kill -0 "$NGINX_PID" 2>/dev/null; then
        kill -QUIT "$NGINX_PID"   # graceful stop of the master and its workers
        for _ in $(seq 50); do kill -0 "$NGINX_PID" 2>/dev/null || break; sleep 0.1; done
        kill -TERM "$NGINX_PID" 2>/dev/null
    fi
    wait 2>/dev/null
    if [[ -n ${KEEP_TMP:-} ]]; then
        log "kept $TMP"
    else
        rm -rf "$TMP"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

STAMP=$(date -u +%Y%m%dT%H%M%SZ)
case $OUT_DIR in /*) ;; *) OUT_DIR=$ROOT/$OUT_DIR ;; esac
RUN_DIR=$OUT_DIR/single-$STAMP
mkdir -p "$RUN_DIR/wrk"
ln -sfn "single-$STAMP" "$OUT_DIR/latest"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
HTTP_PORT=$(free_port)
GRPC_PORT=$(free_port)
NGINX_PORT=$(free_port)
while [[ $GRPC_PORT == "$HTTP_PORT" ]]; do GRPC_PORT=$(free_port); done
while [[ $NGINX_PORT == "$HTTP_PORT" || $NGINX_PORT == "$GRPC_PORT" ]]; do NGINX_PORT=$(free_port); done

# --- granary -------------------------------------------------------------------------------
ADMIN_ID=AKIABENCHADMIN000001
ADMIN_SECRET=bench-secret-$RANDOM$RANDOM$RANDOM
GRANARY=http://127.0.0.1:$HTTP_PORT
start_granary() {
    log "starting granary on 127.0.0.1:$HTTP_PORT"
    GRANARY_ADMIN_ACCESS_KEY_ID=$ADMIN_ID GRANARY_ADMIN_SECRET_ACCESS_KEY=$ADMIN_SECRET \
        RUST_LOG=${RUST_LOG:-warn} \
        "$GRANARY_BIN" server --data-dir "$TMP/data" \
        --http "127.0.0.1:$HTTP_PORT" --grpc "127.0.0.1:$GRPC_PORT" \
        >>"$RUN_DIR/granary.log" 2>&1 &
    GRANARY_PID=$!
    local i
    for i in $(seq 600); do
        kill -0 "$GRANARY_PID" 2>/dev/null || { tail -20 "$RUN_DIR/granary.log" >&2; die "granary exited during startup"; }
        [[ $(curl -s -o /dev/null -w '%{http_code}' "$GRANARY/healthz") == 200 ]] && return 0
        sleep 0.1
    done
    die "granary not healthy after 60 s"
}
stop_granary() {
    kill "$GRANARY_PID"
    local i
    for i in $(seq 300); do kill -0 "$GRANARY_PID" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$GRANARY_PID" 2>/dev/null && die "granary did not stop within 30 s of SIGTERM"
    wait "$GRANARY_PID" || true
    GRANARY_PID=
}
start_granary

export AWS_ACCESS_KEY_ID=$ADMIN_ID AWS_SECRET_ACCESS_KEY=$ADMIN_SECRET AWS_DEFAULT_REGION=us-east-1
export AWS_CONFIG_FILE=$TMP/aws-config AWS_SHARED_CREDENTIALS_FILE=$TMP/aws-credentials
export AWS_PAGER="" AWS_EC2_METADATA_DISABLED=true
unset AWS_SESSION_TOKEN AWS_PROFILE
aws codeartifact create-domain --domain bench --endpoint-url "$GRANARY" --output json >/dev/null
aws codeartifact create-repository --domain bench --repository repo --endpoint-url "$GRANARY" --output json >/dev/null
TOKEN=$(aws codeartifact get-authorization-token --domain bench --endpoint-url "$GRANARY" \
    --query authorizationToken --output text)
[[ -n $TOKEN ]] || die "empty authorization token"

# --- python helper (setup + measurement + report) ------------------------------------------
cat >"$TMP/bench.py" <<'PY'
import base64, gzip, hashlib, io, json, os, random, re, resource, subprocess, sys, tarfile
import time, urllib.error, urllib.request
from statistics import median

TAR_PKG, DOC_PKG = "bench-tarball", "bench-packument"


def npm_tgz(manifest, extra):
    """An `npm pack`-style tarball: package/package.json + files, fixed mtime, gzip mtime 0."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        files = [("package/package.json", json.dumps(manifest, indent=2).encode())] + extra
        for path, data in files:
            info = tarfile.TarInfo(path)
            info.size, info.mtime, info.mode = len(data), 499162500, 0o644
            tar.addfile(info, io.BytesIO(data))
    return gzip.compress(buf.getvalue(), compresslevel=9, mtime=0)


def manifest(name, ver, i):
    return {
        "name": name, "version": ver,
        "description": f"Benchmark fixture {name}, release {ver}: a realistic package.json.",
        "main": "index.js", "types": "index.d.ts",
        "scripts": {"build": "tsc -p .", "test": "node --test", "lint": "eslint ."},
        "repository": {"type": "git", "url": f"git+https://github.com/example/{name}.git"},
        "keywords": ["granary", "benchmark", "npm", "fixture"],
        "author": "Granary Bench <bench@example.invalid>", "license": "MIT",
        "bugs": {"url": f"https://github.com/example/{name}/issues"},
        "homepage": f"https://github.com/example/{name}#readme",
        "engines": {"node": ">=18"},
        "dependencies": {"lodash": f"^4.17.{i % 22}", "debug": "^4.3.4", "semver": "^7.5.0",
                         "chalk": "^5.3.0"},
        "devDependencies": {"typescript": "^5.4.0", "eslint": "^8.57.0", "@types/node": "^20.11.0"},
    }


def publish(base, token, name, ver, tgz, man):
    doc = dict(man, _id=f"{name}@{ver}", _nodeVersion="20.11.1", _npmVersion="10.2.4",
               dist={"shasum": hashlib.sha1(tgz).hexdigest(),
                     "integrity": "sha512-" + base64.b64encode(hashlib.sha512(tgz).digest()).decode(),
                     "tarball": f"http://ignored.invalid/{name}/-/{name}-{ver}.tgz"})
    body = {"_id": name, "name": name, "description": man["description"], "access": "public",
            "dist-tags": {"latest": ver}, "versions": {ver: doc},
            "_attachments": {f"{name}-{ver}.tgz": {"content_type": "application/octet-stream",
                                                   "data": base64.b64encode(tgz).decode(),
                                                   "length": len(tgz)}}}
    req = urllib.request.Request(f"{base}{name}", data=json.dumps(body).encode(), method="PUT",
                                 headers={"Authorization": f"Bearer {token}",
                                          "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req) as r:
            if r.status != 201:
                sys.exit(f"publish {name}@{ver}: HTTP {r.status} {r.read()[:500]!r}")
    except urllib.error.HTTPError as e:
        sys.exit(f"publish {name}@{ver}: HTTP {e.code} {e.read()[:500]!r}")


def setup(base, token, tarball_kib, versions):
    rng = random.Random(42)
    target = tarball_kib * 1024
    # Incompressible payload sized so the .tgz comes out at `target` bytes (two passes).
    pad = target - 1500
    for _ in range(3):
        man = manifest(TAR_PKG, "1.0.0", 0)
        tgz = npm_tgz(man, [("package/index.js", b"module.exports = require('./data.bin');\n"),
                            ("package/data.bin", random.Random(7).randbytes(pad))])
        if len(tgz) == target:
            break
        pad += target - len(tgz)
    publish(base, token, TAR_PKG, "1.0.0", tgz, man)
    t0 = time.monotonic()
    for i in range(versions):
        ver = f"1.{i // 10}.{i % 10}"
        man = manifest(DOC_PKG, ver, i)
        src = f"module.exports = {json.dumps(ver)};\n".encode() + rng.randbytes(2048).hex().encode()
        publish(base, token, DOC_PKG, ver, npm_tgz(man, [("package/index.js", src)]), man)
    dt = time.monotonic() - t0
    print(json.dumps({"tarball_sha512": hashlib.sha512(tgz).hexdigest(), "tarball_len": len(tgz),
                      "publish_seconds_per_version": dt / max(versions, 1)}))


# ---- measurement --------------------------------------------------------------------------
HZ = os.sysconf("SC_CLK_TCK")


def proc_cpu(pids):
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime + stime
        except (FileNotFoundError, ProcessLookupError):
            pass
    return total / HZ


def sys_cpu():
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + v[4]
    return (sum(v[:8]) - idle) / HZ, sum(v[:8]) / HZ


def nginx_pids(master):
    pids = [master]
    try:
        out = subprocess.run(["pgrep", "-P", str(master)], capture_output=True, text=True).stdout
        pids += [int(p) for p in out.split()]
    except FileNotFoundError:
        pass
    return pids


UNIT_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


def parse_wrk(out):
    def num(pattern, default=None):
        m = re.search(pattern, out, re.M)
        return m.groups() if m else default
    rps = float(num(r"^Requests/sec:\s+([\d.]+)")[0])
    res = {"rps": rps}
    for pct in ("50", "90", "99"):
        g = num(rf"^\s+{pct}(?:\.000)?%\s+([\d.]+)(us|ms|s|m|h)\s*$")
        res[f"p{pct}_ms"] = float(g[0]) * UNIT_MS[g[1]] if g else None
    g = num(r"^\s+(\d+) requests in ([\d.]+)(us|ms|s|m)")
    res["requests"] = int(g[0]) if g else None
    g = num(r"^\s+Non-2xx or 3xx responses:\s+(\d+)")
    res["non_2xx"] = int(g[0]) if g else 0
    g = num(r"^\s+Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")
    res["socket_errors"] = dict(zip(("connect", "read", "write", "timeout"), map(int, g))) if g else {}
    return res


def wrk(cfg, url, seconds):
    cmd = ["wrk", f"-t{cfg['threads']}", f"-c{cfg['connections']}", f"-d{seconds}s",
           f"--timeout", f"{cfg['wrk_timeout']}s", "--latency",
           "-H", f"Authorization: Bearer {cfg['token']}", url]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"wrk failed ({r.returncode}): {r.stderr}")
    return r.stdout


def measure(cfg, server, url, pids, seconds):
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    c0, (b0, t0) = proc_cpu(pids), sys_cpu()
    out = wrk(cfg, url, seconds)
    c1, (b1, t1) = proc_cpu(pids), sys_cpu()
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    res = parse_wrk(out)
    wrk_cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    ncpu = os.cpu_count() or 1
    wall = (t1 - t0) / ncpu
    res.update(server_cpu_s=round(c1 - c0, 3), wrk_cpu_s=round(wrk_cpu, 3),
               machine_busy_pct=round(100 * (b1 - b0) / max(t1 - t0, 1e-9), 1),
               other_cpu_s=round(max(0.0, (b1 - b0) - (c1 - c0) - wrk_cpu), 3),
               wall_s=round(wall, 2))
    if res.get("requests"):
        res["server_cpu_us_per_req"] = round(1e6 * (c1 - c0) / res["requests"], 1)
    return res, out


def run(cfg_path):
    cfg = json.load(open(cfg_path))
    servers = {"granary": (cfg["granary_url"], [cfg["granary_pid"]]),
               "nginx": (cfg["nginx_url"], nginx_pids(cfg["nginx_pid"]))}
    results = {}
    for target in cfg["targets"]:
        path = cfg["paths"][target]
        rounds = {"granary": [], "nginx": []}
        for name, (base, pids) in servers.items():
            print(f"== {target}: warm-up {name} {cfg['warmup']}s", file=sys.stderr, flush=True)
            wrk(cfg, base + path, cfg["warmup"])
        for rnd in range(cfg["rounds"]):
            for name, (base, pids) in servers.items():
                r, out = measure(cfg, name, base + path, pids, cfg["duration"])
                with open(os.path.join(cfg["run_dir"], "wrk", f"{target}-{name}-{rnd + 1}.txt"), "w") as f:
                    f.write(out)
                rounds[name].append(r)
                print(f"== {target} round {rnd + 1}/{cfg['rounds']} {name}: {r['rps']:.0f} req/s, "
                      f"p99 {r['p99_ms']} ms, cpu {r['server_cpu_s']} s (wrk {r['wrk_cpu_s']} s, "
                      f"other {r['other_cpu_s']} s, machine busy {r['machine_busy_pct']}%)"
                      + (f", NON-2xx {r['non_2xx']}" if r["non_2xx"] else ""),
                      file=sys.stderr, flush=True)
        summary = {}
        for name in servers:
            rs = rounds[name]
            summary[name] = {
                "rps": round(median(r["rps"] for r in rs), 1),
                "p99_ms": round(median(r["p99_ms"] for r in rs), 3),
                "p50_ms": round(median(r["p50_ms"] for r in rs), 3),
                "server_cpu_us_per_req": round(median(r.get("server_cpu_us_per_req") or 0 for r in rs), 1),
                "non_2xx": sum(r["non_2xx"] for r in rs),
                "socket_errors": sum(sum(r["socket_errors"].values()) for r in rs),
                "rounds": rs,
            }
        ratio = summary["granary"]["rps"] / summary["nginx"]["rps"] if summary["nginx"]["rps"] else 0.0
        goal = cfg["goals"][target]
        results[target] = {"url_path": path, "bytes": cfg["sizes"][target],
                           "granary": summary["granary"], "nginx": summary["nginx"],
                           "ratio": round(ratio, 3), "goal": goal,
                           "goal_met": ratio >= goal and summary["granary"]["non_2xx"] == 0}
    report(cfg, results)


def report(cfg, results):
    labels = {"tarball": f"(a) tarball {cfg['tarball_kib']} KiB",
              "packument": f"(b) packument {cfg['versions']} versions"}
    ref = {"tarball": 0.057, "packument": 0.0056}
    head = (f"{'target':<28} {'bytes':>7} {'granary req/s':>13} {'nginx req/s':>11} "
            f"{'ratio':>6} {'goal':>6} {'met':>4} {'p99 granary':>11} {'p99 nginx':>9} "
            f"{'cpu us/req g/n':>15}")
    lines = [f"Granary vs nginx, same bytes, one node, {cfg['connections']} connections, "
             f"wrk -t{cfg['threads']}, {cfg['rounds']} x {cfg['duration']} s alternating, medians",
             head, "-" * len(head)]
    for t, r in results.items():
        g, n = r["granary"], r["nginx"]
        met = "yes" if r["goal_met"] else "NO"
        lines.append(f"{labels[t]:<28} {r['bytes']:>7} {g['rps']:>13.0f} {n['rps']:>11.0f} "
                     f"{r['ratio']:>6.3f} {'>=' + str(r['goal']):>6} {met:>4} "
                     f"{g['p99_ms']:>8.2f} ms {n['p99_ms']:>6.2f} ms "
                     f"{g['server_cpu_us_per_req']:>7.0f}/{n['server_cpu_us_per_req']:<7.0f}")
    lines.append("")
    lines.append("ratio = granary req/s / nginx req/s (Verdaccio, measured the same way: "
                 + ", ".join(f"{t} {ref[t]}" for t in results) + ")")
    bad = [f"{t}/{s}: {results[t][s]['non_2xx']} non-2xx, {results[t][s]['socket_errors']} socket errors"
           for t in results for s in ("granary", "nginx")
           if results[t][s]["non_2xx"] or results[t][s]["socket_errors"]]
    if bad:
        lines.append("ERRORS: " + "; ".join(bad))
    table = "\n".join(lines) + "\n"
    print(table)
    with open(os.path.join(cfg["run_dir"], "table.txt"), "w") as f:
        f.write(table)
    out = {k: cfg[k] for k in ("started", "machine", "duration", "warmup", "rounds", "connections",
                               "threads", "wrk_timeout", "tarball_kib", "versions", "restart", "setup")}
    out["results"] = results
    with open(os.path.join(cfg["run_dir"], "results.json"), "w") as f:
        json.dump(out, f, indent=2)
    if any(results[t]["granary"]["non_2xx"] or results[t]["nginx"]["non_2xx"] for t in results):
        sys.exit(2)


if __name__ == "__main__":
    if sys.argv[1] == "setup":
        setup(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
    else:
        run(sys.argv[2])
PY

# --- fixtures ------------------------------------------------------------------------------
NPM=$GRANARY/npm/bench/repo/
log "publishing bench-tarball@1.0.0 (${TARBALL_KIB} KiB) and bench-packument x $VERSIONS versions"
SETUP_JSON=$(python3 "$TMP/bench.py" setup "$NPM" "$TOKEN" "$TARBALL_KIB" "$VERSIONS")

TARBALL_PATH=/npm/bench/repo/bench-tarball/-/bench-tarball-1.0.0.tgz
PACKUMENT_PATH=/npm/bench/repo/bench-packument
WWW=$TMP/nginx/www
mkdir -p "$WWW$(dirname "$TARBALL_PATH")" "$WWW$(dirname "$PACKUMENT_PATH")"
for p in "$TARBALL_PATH" "$PACKUMENT_PATH"; do
    code=$(curl -sS -H "Authorization: Bearer $TOKEN" -o "$WWW$p" -D "$RUN_DIR/headers-$(basename "$p").txt" \
        -w '%{http_code}' "$GRANARY$p")
    [[ $code == 200 ]] || die "GET $p from granary: HTTP $code"
done
python3 - "$WWW$TARBALL_PATH" "$WWW$PACKUMENT_PATH" "$SETUP_JSON" "$VERSIONS" <<'PY'
import hashlib, json, sys
tgz, doc, setup, versions = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4])
if hashlib.sha512(open(tgz, "rb").read()).hexdigest() != setup["tarball_sha512"]:
    sys.exit("granary served different tarball bytes than were published")
n = len(json.load(open(doc))["versions"])
if n != versions:
    sys.exit(f"packument has {n} versions, expected {versions}")
PY
if [[ ${RESTART:-1} != 0 ]]; then
    # Restart so the fixtures are read the way a long-running registry reads them: RocksDB
    # flushes the recovered memtables at open, so blobs come from blob files, not memory.
    log "restarting granary (RESTART=0 to measure right after publishing)"
    stop_granary
    start_granary
    for p in "$TARBALL_PATH" "$PACKUMENT_PATH"; do
        curl -sS -f -H "Authorization: Bearer $TOKEN" -o "$TMP/check" "$GRANARY$p" || die "GET $p after restart failed"
        cmp -s "$TMP/check" "$WWW$p" || die "granary serves different bytes for $p after the restart"
    done
fi
TARBALL_BYTES=$(stat -c %s "$WWW$TARBALL_PATH")
PACKUMENT_BYTES=$(stat -c %s "$WWW$PACKUMENT_PATH")

# --- nginx ---------------------------------------------------------------------------------
NG=$TMP/nginx
mkdir -p "$NG/logs"
cat >"$NG/nginx.conf" <<EOF
worker_processes auto;
pid $NG/nginx.pid;
error_log $NG/logs/error.log warn;
events { worker_connections 4096; }
http {
    types {}
    default_type application/octet-stream;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    access_log off;
    keepalive_requests 100000;
    keepalive_timeout 65s;
    open_file_cache max=1000 inactive=60s;
    open_file_cache_valid 60s;
    client_body_temp_path $NG/client_body;
    proxy_temp_path $NG/proxy;
    fastcgi_temp_path $NG/fastcgi;
    uwsgi_temp_path $NG/uwsgi;
    scgi_temp_path $NG/scgi;
    server {
        listen 127.0.0.1:$NGINX_PORT;
        root $WWW;
        location = $PACKUMENT_PATH { default_type application/json; }
    }
}
EOF
cp "$NG/nginx.conf" "$RUN_DIR/nginx.conf"
# nginx workers run as an unprivileged user when started as root: let them read the files.
chmod -R a+rX "$TMP"
log "starting nginx on 127.0.0.1:$NGINX_PORT"
"$NGINX" -c "$NG/nginx.conf" -p "$NG" -g 'daemon off;' 2>"$RUN_DIR/nginx.stderr" &
NGINX_PID=$!
for i in $(seq 100); do
    kill -0 "$NGINX_PID" 2>/dev/null || { cat "$RUN_DIR/nginx.stderr" >&2; die "nginx exited during startup"; }
    [[ $(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$NGINX_PORT$PACKUMENT_PATH") == 200 ]] && break
    ((i == 100)) && die "nginx not answering"
    sleep 0.1
done
for p in "$TARBALL_PATH" "$PACKUMENT_PATH"; do
    curl -sS -H "Authorization: Bearer $TOKEN" -o "$TMP/check" -D "$RUN_DIR/headers-nginx-$(basename "$p").txt" \
        "http://127.0.0.1:$NGINX_PORT$p"
    cmp -s "$TMP/check" "$WWW$p" || die "nginx serves different bytes for $p"
done

# --- measure -------------------------------------------------------------------------------
GIT_REV=$(git rev-parse --short HEAD 2>/dev/null || echo none)
[[ -n $(git status --porcelain 2>/dev/null | head -1) ]] && GIT_REV="$GIT_REV+dirty"
export B_TOKEN="$TOKEN" B_TARGETS="$TARGETS" B_STAMP="$STAMP" B_GIT="$GIT_REV" B_SETUP="$SETUP_JSON"
export B_NGINX_V=$("$NGINX" -v 2>&1) B_WRK_V=$(wrk -v 2>&1 | head -1 | cut -d' ' -f1-2)
python3 - >"$TMP/config.json" <<PY
import json, os, platform
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
mem = next(int(l.split()[1]) for l in open("/proc/meminfo") if l.startswith("MemTotal"))
print(json.dumps({
    "started": os.environ["B_STAMP"], "token": os.environ["B_TOKEN"],
    "granary_url": "$GRANARY", "granary_pid": $GRANARY_PID,
    "nginx_url": "http://127.0.0.1:$NGINX_PORT", "nginx_pid": $NGINX_PID,
    "paths": {"tarball": "$TARBALL_PATH", "packument": "$PACKUMENT_PATH"},
    "sizes": {"tarball": $TARBALL_BYTES, "packument": $PACKUMENT_BYTES},
    "goals": {"tarball": 0.75, "packument": 0.5},
    "targets": os.environ["B_TARGETS"].split(),
    "duration": $DURATION, "warmup": $WARMUP, "rounds": $ROUNDS,
    "connections": $CONNECTIONS, "threads": $THREADS, "wrk_timeout": $WRK_TIMEOUT,
    "tarball_kib": $TARBALL_KIB, "versions": $VERSIONS, "run_dir": "$RUN_DIR",
    "restart": ${RESTART:-1} != 0,
    "setup": json.loads(os.environ["B_SETUP"]),
    "machine": {"cpus": os.cpu_count(), "cpu_model": cpu, "mem_gib": round(mem / 2**20, 1),
                "kernel": platform.release(), "loadavg_at_start": open("/proc/loadavg").read().split()[:3],
                "granary_git": os.environ["B_GIT"], "nginx": os.environ["B_NGINX_V"],
                "wrk": os.environ["B_WRK_V"]},
}))
PY
log "measuring: targets [$TARGETS], $ROUNDS x ${DURATION}s per server, -c$CONNECTIONS -t$THREADS"
python3 "$TMP/bench.py" run "$TMP/config.json" 2> >(tee "$RUN_DIR/progress.log" >&2)
log "results in $OUT_DIR/single-$STAMP/ (results.json, table.txt, wrk/)"
