//! Cluster benchmarks (not tests): run by `scripts/bench-cluster.sh`, reported in
//! `docs/BENCHMARKS.md`.
//!
//! ```text
//! cluster-bench failover [TRIALS]                 time from leader SIGKILL to the next
//!                                                 acknowledged publish, per trial
//! cluster-bench publish [SECONDS] [CONCURRENCY] [KIB] [NODES] [WARMUP]
//!                                                 npm publishes of KIB-sized packages
//!                                                 spread over NODES (3) nodes: rate,
//!                                                 latency; NODES=1 is the reference.
//!                                                 The same load runs WARMUP (0) seconds
//!                                                 first, not counted: a new node's
//!                                                 memory and chunk cache fill then
//! cluster-bench rate [SECONDS] [RATE] [KIB] [NODES] [WARMUP]
//!                                                 the same publishes offered at RATE
//!                                                 per second (open loop), whatever the
//!                                                 cluster's answers: latency at that rate
//! cluster-bench gc [VERSIONS] [KIB] [NODES] [RATE]
//!                                                 VERSIONS publishes, every other one to
//!                                                 a repository then deleted: how long the
//!                                                 collector takes to remove and compact,
//!                                                 the space it gives back, and the latency
//!                                                 of RATE publishes/s to the other
//!                                                 repository before and while it works
//! ```
//!
//! `publish` is a closed loop: each of CONCURRENCY clients sends its next publish when
//! the last is answered, so it measures the most a cluster does with that many in
//! flight, and its latency is mostly their queueing. `rate` sends publish N at N/RATE
//! seconds whether or not earlier ones were answered, and times each from when it was
//! due, not from when it went out (a late sender or a backed-up cluster counts against
//! the cluster): a cluster that keeps up shows its latency at RATE, one that does not
//! shows it growing.
//!
//! With `GRANARY_BENCH_LATENCIES=FILE`, `publish` also writes one line per counted publish:
//! when it started (ms into the measured window), its latency (ms), and whether the node it
//! went to led when the run started (1) or not (0); `rate` writes when each was due and
//! its latency from then.
//!
//! With `GRANARY_BENCH_CONFIG=TOML`, every node is given that configuration (keys as in
//! `configs/single.toml`), to measure a setting.
//!
//! Both start a cluster (three nodes unless told otherwise) of the `granary` binary found as the tests find it
//! (`GRANARY_BIN`, or next to this executable) and print one JSON line of results last.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use granary_cluster_tests::bench::{arg, cpu_ms, percentile};
use granary_cluster_tests::client::{
    NodeClient, Repo, counter_sum, fake_tgz, noise, npm_publish_body,
};
use granary_cluster_tests::cluster::{Cluster, Options, SETTLE_TIMEOUT};
use granary_cluster_tests::seed::Seed;
use serde_json::json;

/// A publish request body for a fresh package version with incompressible content.
fn publish_body(name: &str, version: &str, kib: usize, salt: u64) -> Vec<u8> {
    let data = noise(kib * 1024, salt.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    npm_publish_body(name, version, &fake_tgz(&data))
        .to_string()
        .into_bytes()
}

async fn put(client: &NodeClient, repo: &Repo, name: &str, body: Vec<u8>) -> Option<u16> {
    client
        .npm_put(repo, name, body)
        .await
        .ok()
        .map(|r| r.status)
}

async fn failover(trials: u64) {
    let mut cluster = Cluster::start(Seed::from_env(), 3).await;
    let repo = cluster.setup(1, "bench", "failover").await;
    let mut times = Vec::new();
    for trial in 0..trials {
        let leader = cluster.leader().await;
        let survivors = cluster.ids_except(leader);
        let clients = cluster.clients(&survivors);
        let bodies: Vec<Vec<u8>> = (0..200)
            .map(|i| {
                publish_body(
                    "failover-pkg",
                    &format!("{trial}.0.{i}"),
                    4,
                    trial * 1000 + i,
                )
            })
            .collect();
        let killed = Instant::now();
        cluster.kill(leader);
        let mut acked = None;
        for (i, body) in bodies.into_iter().enumerate() {
            let client = &clients[i % clients.len()];
            if put(client, &repo, "failover-pkg", body).await == Some(201) {
                acked = Some(killed.elapsed());
                break;
            }
        }
        let took = acked.expect("no publish was acknowledged after the leader was killed");
        eprintln!(
            "trial {trial}: leader {leader} killed, next acknowledged write after {:.0} ms",
            took.as_secs_f64() * 1e3
        );
        times.push(took.as_secs_f64() * 1e3);
        cluster.restart(leader).await;
        let all = cluster.ids();
        cluster.wait_converged(&all, SETTLE_TIMEOUT).await;
    }
    times.sort_by(f64::total_cmp);
    println!(
        "{}",
        json!({
            "bench": "failover",
            "trials": trials,
            "median_ms": percentile(&times, 0.5),
            "min_ms": times.first(),
            "max_ms": times.last(),
            "all_ms": times,
        })
    );
}

/// A cluster of `nodes` for a publish run, configured by `GRANARY_BENCH_CONFIG` if set.
async fn start(nodes: u64) -> Cluster {
    Cluster::start_with(
        Seed::from_env(),
        Options {
            nodes: nodes as usize,
            config_toml: std::env::var("GRANARY_BENCH_CONFIG").ok(),
            ..Options::default()
        },
    )
    .await
}

/// `count` publish bodies, each taken once. They are built before the cluster starts:
/// hashing and base64 cost the client, not the cluster.
type Bodies = Arc<Vec<std::sync::Mutex<Option<Vec<u8>>>>>;

fn bodies(count: usize, kib: u64) -> Bodies {
    eprintln!("building {count} publish bodies of {kib} KiB");
    Arc::new(
        (0..count)
            .map(|i| {
                std::sync::Mutex::new(Some(publish_body(
                    &format!("pkg-{}", i % 512),
                    &format!("1.0.{i}"),
                    kib as usize,
                    i as u64,
                )))
            })
            .collect(),
    )
}

async fn publish(seconds: u64, concurrency: u64, kib: u64, nodes: u64, warmup: u64) {
    // Enough for 1,200 publishes/s (one node alone passes 1,000/s on this machine's fast
    // minutes).
    let bodies = bodies(((warmup + seconds) * 1200) as usize, kib);
    let cluster = start(nodes).await;
    let repo = cluster.setup(1, "bench", "publish").await;
    let ids = cluster.ids();
    let clients = cluster.clients(&ids);
    let leader = cluster.wait_leader(&ids, SETTLE_TIMEOUT).await;
    let next = Arc::new(AtomicUsize::new(0));
    let acked = Arc::new(AtomicU64::new(0));
    // Publishes that start before `started` are the warm-up: sent, not counted.
    let started = Instant::now() + Duration::from_secs(warmup);
    let deadline = started + Duration::from_secs(seconds);
    let cpu = sample_cpu(&cluster, &acked, started, seconds);
    let mut workers = Vec::new();
    for w in 0..concurrency as usize {
        let node = w % clients.len();
        let client = clients[node].clone();
        let (repo, bodies, next, acked) =
            (repo.clone(), bodies.clone(), next.clone(), acked.clone());
        workers.push(tokio::spawn(async move {
            let (mut each, mut errors) = (Vec::new(), 0u64);
            while Instant::now() < deadline {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(body) = bodies.get(i).and_then(|b| b.lock().unwrap().take()) else {
                    break;
                };
                let t = Instant::now();
                let answer = put(&client, &repo, &format!("pkg-{}", i % 512), body).await;
                if t < started {
                    continue;
                }
                match answer {
                    Some(201) => {
                        let ms = t.elapsed().as_secs_f64() * 1e3;
                        each.push((t.duration_since(started).as_secs_f64() * 1e3, ms, node));
                        acked.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => errors += 1,
                }
            }
            (each, errors)
        }));
    }
    let (mut each, mut errors) = (Vec::new(), 0);
    for w in workers {
        let (r, e) = w.await.expect("worker");
        each.extend(r);
        errors += e;
    }
    if let Ok(path) = std::env::var("GRANARY_BENCH_LATENCIES") {
        // One line per acknowledged publish: start (ms into the run), latency (ms), and
        // whether the node it went to was the leader when the run started.
        each.sort_by(|a, b| a.0.total_cmp(&b.0));
        let lines: String = each
            .iter()
            .map(|(at, ms, node)| format!("{at:.3},{ms:.3},{}\n", u8::from(ids[*node] == leader)))
            .collect();
        std::fs::write(&path, lines).expect("writing the latencies");
    }
    let wall = started.elapsed().as_secs_f64();
    let mut lat: Vec<f64> = each.iter().map(|(_, ms, _)| *ms).collect();
    lat.sort_by(f64::total_cmp);
    let (node_cpu, bench_cpu) = cpu.await.expect("cpu sampler");
    println!(
        "{}",
        json!({
            "bench": "publish",
            "nodes": nodes,
            "warmup_seconds": warmup,
            "seconds": wall,
            "concurrency": concurrency,
            "kib": kib,
            "acknowledged": lat.len(),
            "errors": errors,
            "per_second": lat.len() as f64 / wall,
            "p50_ms": percentile(&lat, 0.5),
            "p99_ms": percentile(&lat, 0.99),
            "max_ms": lat.last(),
            "node_cpu_ms_per_publish": node_cpu,
            "bench_cpu_ms_per_publish": bench_cpu,
        })
    );
}

async fn rate(seconds: u64, rate: u64, kib: u64, nodes: u64, warmup: u64) {
    assert!(rate > 0, "the rate must be at least 1 per second");
    let count = ((warmup + seconds) * rate) as usize;
    let bodies = bodies(count, kib);
    let cluster = start(nodes).await;
    let repo = cluster.setup(1, "bench", "publish").await;
    let ids = cluster.ids();
    let clients = cluster.clients(&ids);
    cluster.wait_leader(&ids, SETTLE_TIMEOUT).await;
    let acked = Arc::new(AtomicU64::new(0));
    let first = Instant::now();
    // Publishes due before `started` are the warm-up: sent, not counted.
    let started = first + Duration::from_secs(warmup);
    let cpu = sample_cpu(&cluster, &acked, started, seconds);
    let every = Duration::from_secs(1).div_f64(rate as f64);
    let wall_start = std::time::SystemTime::now() + Duration::from_secs(warmup);
    eprintln!(
        "rate: the measured window starts at {} ms since the UNIX epoch",
        wall_start
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis()
    );
    let mut sent = Vec::with_capacity(count);
    let mut most_in_flight = 0usize;
    // How late the sender itself was (a slow load generator shows here, not as the
    // cluster's latency alone).
    let mut late = Vec::with_capacity(count);
    let in_flight = Arc::new(AtomicUsize::new(0));
    for i in 0..count {
        let due = first + every.mul_f64(i as f64);
        tokio::time::sleep_until(due.into()).await;
        late.push(due.elapsed().as_secs_f64() * 1e3);
        let body = bodies[i]
            .lock()
            .unwrap()
            .take()
            .expect("each body is sent once");
        let client = clients[i % clients.len()].clone();
        let (repo, acked, in_flight) = (repo.clone(), acked.clone(), in_flight.clone());
        most_in_flight = most_in_flight.max(in_flight.fetch_add(1, Ordering::Relaxed) + 1);
        if i % rate as usize == 0 {
            eprintln!(
                "rate: {i} sent, {} in flight",
                in_flight.load(Ordering::Relaxed)
            );
        }
        sent.push(tokio::spawn(async move {
            let resp = client
                .npm_put(&repo, &format!("pkg-{}", i % 512), body)
                .await;
            let answer = resp.as_ref().ok().map(|r| r.status);
            if let Ok(r) = &resp
                && r.status != 201
                && i % 97 == 0
            {
                eprintln!("rate: {} {}", r.status, String::from_utf8_lossy(&r.body));
            }
            let done = Instant::now();
            in_flight.fetch_sub(1, Ordering::Relaxed);
            if due >= started && answer == Some(201) {
                acked.fetch_add(1, Ordering::Relaxed);
            }
            (due, answer, done)
        }));
    }
    let (mut lat, mut errors, mut last_done) = (Vec::new(), 0u64, started);
    let mut failed = std::collections::BTreeMap::<String, u64>::new();
    let mut lines = String::new();
    for s in sent {
        let (due, answer, done) = s.await.expect("publish task");
        if due < started {
            continue;
        }
        if answer == Some(201) {
            let took = done.duration_since(due).as_secs_f64() * 1e3;
            let at = due.duration_since(started).as_secs_f64() * 1e3;
            lines.push_str(&format!("{at:.3},{took:.3}\n"));
            lat.push(took);
            last_done = last_done.max(done);
        } else {
            errors += 1;
            let what = answer.map_or("no answer".to_owned(), |s| s.to_string());
            *failed.entry(what).or_default() += 1;
        }
    }
    if let Ok(path) = std::env::var("GRANARY_BENCH_LATENCIES") {
        // One line per acknowledged publish: when it was due (ms into the run) and its
        // latency from then (ms).
        std::fs::write(&path, lines).expect("writing the latencies");
    }
    lat.sort_by(f64::total_cmp);
    late.sort_by(f64::total_cmp);
    let wall = last_done.duration_since(started).as_secs_f64();
    let (node_cpu, bench_cpu) = cpu.await.expect("cpu sampler");
    println!(
        "{}",
        json!({
            "bench": "rate",
            "nodes": nodes,
            "warmup_seconds": warmup,
            "seconds": wall,
            "offered_per_second": rate,
            "kib": kib,
            "acknowledged": lat.len(),
            "errors": errors,
            "errors_by_status": failed,
            "per_second": lat.len() as f64 / wall,
            "most_in_flight": most_in_flight,
            "sender_late_p99_ms": percentile(&late, 0.99),
            "sender_late_max_ms": late.last(),
            "p50_ms": percentile(&lat, 0.5),
            "p99_ms": percentile(&lat, 0.99),
            "max_ms": lat.last(),
            "node_cpu_ms_per_publish": node_cpu,
            "bench_cpu_ms_per_publish": bench_cpu,
        })
    );
}

/// Starts [`cpu_per_publish`] for the nodes of `cluster`, over a run of `seconds` from
/// `started` (NaN where it has no answer).
fn sample_cpu(
    cluster: &Cluster,
    acked: &Arc<AtomicU64>,
    started: Instant,
    seconds: u64,
) -> tokio::task::JoinHandle<(f64, f64)> {
    let sampled = cpu_per_publish(
        cluster
            .ids()
            .iter()
            .filter_map(|&id| cluster.node(id).pid())
            .collect(),
        acked.clone(),
        started,
        Duration::from_secs(seconds),
    );
    tokio::spawn(async move { sampled.await.unwrap_or((f64::NAN, f64::NAN)) })
}

/// CPU time (user + system) per acknowledged publish over the middle half of a run: of the
/// nodes together, and of this load generator. The first quarter is left out (connections,
/// caches and Raft batching settle), and the last (workers stop at different times).
/// `None` if a node exited meanwhile or nothing was acknowledged.
async fn cpu_per_publish(
    pids: Vec<u32>,
    acked: Arc<AtomicU64>,
    started: Instant,
    run: Duration,
) -> Option<(f64, f64)> {
    let sample = || -> Option<(f64, f64, u64)> {
        let nodes = pids.iter().map(|&p| cpu_ms(p)).sum::<Option<f64>>()?;
        Some((nodes, cpu_ms(0)?, acked.load(Ordering::Relaxed)))
    };
    tokio::time::sleep_until((started + run / 4).into()).await;
    let (n0, b0, a0) = sample()?;
    tokio::time::sleep_until((started + run * 3 / 4).into()).await;
    let (n1, b1, a1) = sample()?;
    let publishes = a1.checked_sub(a0).filter(|&n| n > 0)? as f64;
    Some(((n1 - n0) / publishes, (b1 - b0) / publishes))
}

/// The blob collector's settings for `gc` unless `GRANARY_BENCH_CONFIG` says otherwise:
/// a pass every 5 s, so that the run does not wait an hour, and 64 MiB segments, so that
/// a few GiB of packages fill several.
const GC_CONFIG: &str = "[blob_gc]\ninterval_secs = 5\nsegment_mib = 64\n";

/// Sum of the counter `name` over its samples in every node's `/metrics` (0 where
/// absent or unanswered).
async fn total(clients: &[NodeClient], name: &str) -> u64 {
    let mut sum = 0;
    for c in clients {
        if let Ok(r) = c.raw("GET", "/metrics", &[], Vec::new()).await {
            sum += counter_sum(&String::from_utf8_lossy(&r.body), name);
        }
    }
    sum
}

async fn gc(versions: u64, kib: u64, nodes: u64, rate: u64) {
    let config = std::env::var("GRANARY_BENCH_CONFIG").unwrap_or_else(|_| GC_CONFIG.into());
    let cluster = Cluster::start_with(
        Seed::from_env(),
        Options {
            nodes: nodes as usize,
            config_toml: Some(config.clone()),
            ..Options::default()
        },
    )
    .await;
    let ids = cluster.ids();
    let clients = cluster.clients(&ids);
    let keep = cluster.setup(1, "bench", "keep").await;
    let dropped = cluster.setup(1, "bench", "dropped").await;
    cluster.wait_leader(&ids, SETTLE_TIMEOUT).await;

    // Fill: every other version to the repository that goes.
    eprintln!("gc: publishing {versions} versions of {kib} KiB");
    let next = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for w in 0..16usize {
        let client = clients[w % clients.len()].clone();
        let (keep, dropped, next) = (keep.clone(), dropped.clone(), next.clone());
        workers.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i as u64 >= versions {
                    return;
                }
                let repo = if i % 2 == 0 { &keep } else { &dropped };
                let name = format!("pkg-{}", i % 512);
                let body = publish_body(&name, &format!("1.0.{i}"), kib as usize, i as u64);
                while put(&client, repo, &name, body.clone()).await != Some(201) {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }));
    }
    for w in workers {
        w.await.expect("worker");
    }
    let before: Vec<u64> = ids.iter().map(|&id| cluster.blob_file_bytes(id)).collect();
    let removed_before = total(&clients, "granary_blobs_collected_total").await;

    // The load, open loop, to the repository that stays: latency by phase.
    let phase = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let (clients, keep, phase, stop) =
            (clients.clone(), keep.clone(), phase.clone(), stop.clone());
        tokio::spawn(async move {
            let every = Duration::from_secs(1).div_f64(rate as f64);
            let first = Instant::now();
            let mut sent = Vec::new();
            for i in 0.. {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let due = first + every.mul_f64(i as f64);
                tokio::time::sleep_until(due.into()).await;
                let client = clients[i % clients.len()].clone();
                let keep = keep.clone();
                let at = phase.load(Ordering::Relaxed);
                let n = versions as usize + i;
                sent.push(tokio::spawn(async move {
                    let name = format!("load-{}", n % 512);
                    let body = publish_body(&name, &format!("2.0.{n}"), kib as usize, n as u64);
                    let ok = put(&client, &keep, &name, body).await == Some(201);
                    (at, ok, due.elapsed().as_secs_f64() * 1e3)
                }));
            }
            let mut by_phase = [Vec::new(), Vec::new()];
            let mut errors = 0u64;
            for s in sent {
                let (at, ok, ms) = s.await.expect("publish");
                if ok {
                    by_phase[at.min(1)].push(ms);
                } else {
                    errors += 1;
                }
            }
            (by_phase, errors)
        })
    };
    // Reference: the same load for two passes, nothing to collect.
    let cpu = |cluster: &Cluster| -> f64 {
        cluster
            .ids()
            .iter()
            .filter_map(|&id| cpu_ms(cluster.node(id).pid()?))
            .sum()
    };
    let window = Duration::from_secs(12);
    let cpu0 = cpu(&cluster);
    tokio::time::sleep(window).await;
    let reference_cpu_ms_per_s = (cpu(&cluster) - cpu0) / window.as_secs_f64();

    // Delete the repository, then wait for every node to remove its blobs and for the
    // compaction to settle (no segment deleted for two passes).
    phase.store(1, Ordering::Relaxed);
    let deleted = Instant::now();
    let cpu1 = cpu(&cluster);
    clients[0]
        .api(
            "DELETE",
            &format!("/v1/repository?domain=bench&repository={}", dropped.name),
            None,
        )
        .await
        .expect("DeleteRepository");
    let half = versions / 2;
    let (mut removed_at, mut settled_at, mut last_change) = (None, None, Instant::now());
    let mut last_reclaimed = 0;
    while settled_at.is_none() && deleted.elapsed() < Duration::from_secs(600) {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let removed = total(&clients, "granary_blobs_collected_total").await;
        let reclaimed = total(&clients, "granary_blob_bytes_reclaimed_total").await;
        if removed_at.is_none() && removed - removed_before >= half * nodes {
            removed_at = Some(deleted.elapsed());
        }
        if reclaimed != last_reclaimed {
            (last_reclaimed, last_change) = (reclaimed, Instant::now());
        }
        // Settled: no segment deleted for two passes after the removal (none at all when
        // what was stored fits in the segments still written to).
        if let Some(removed) = removed_at
            && last_change.elapsed() > Duration::from_secs(11)
        {
            settled_at = Some(last_change.duration_since(deleted).max(removed));
        }
    }
    let gc_window = deleted.elapsed() - Duration::from_secs(11);
    let during_cpu_ms_per_s = (cpu(&cluster) - cpu1) / deleted.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let (mut by_phase, errors) = load.await.expect("load");
    for p in &mut by_phase {
        p.sort_by(f64::total_cmp);
    }
    let after: Vec<u64> = ids.iter().map(|&id| cluster.blob_file_bytes(id)).collect();
    let moved = total(&clients, "granary_blobs_moved_total").await;
    let passes = total(&clients, "granary_blob_gc_passes_total").await;
    let pass_ms = total(&clients, "granary_blob_gc_milliseconds_total").await;
    println!(
        "{}",
        json!({
            "bench": "gc",
            "nodes": nodes,
            "config": config,
            "versions": versions,
            "kib": kib,
            "removed_per_node": half,
            "removed_all_nodes_s": removed_at.map(|d| d.as_secs_f64()),
            "compaction_settled_s": settled_at.map(|d| d.as_secs_f64()),
            "segment_bytes_before": before,
            "segment_bytes_after": after,
            "reclaimed_bytes_all_nodes": last_reclaimed,
            "moved_blobs_all_nodes": moved,
            "load_bytes_stored_per_node": (by_phase[0].len() + by_phase[1].len()) as u64 * kib * 1024,
            "passes": passes,
            "mean_pass_ms": pass_ms as f64 / passes.max(1) as f64,
            "load_per_second": rate,
            "load_errors": errors,
            "reference_p50_ms": percentile(&by_phase[0], 0.5),
            "reference_p99_ms": percentile(&by_phase[0], 0.99),
            "reference_publishes": by_phase[0].len(),
            "during_gc_p50_ms": percentile(&by_phase[1], 0.5),
            "during_gc_p99_ms": percentile(&by_phase[1], 0.99),
            "during_gc_max_ms": by_phase[1].last(),
            "during_gc_publishes": by_phase[1].len(),
            "gc_window_s": gc_window.as_secs_f64(),
            "reference_node_cpu_ms_per_s": reference_cpu_ms_per_s,
            "during_gc_node_cpu_ms_per_s": during_cpu_ms_per_s,
        })
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    match std::env::args().nth(1).as_deref() {
        Some("failover") => failover(arg(2, 20)).await,
        Some("publish") => publish(arg(2, 20), arg(3, 64), arg(4, 100), arg(5, 3), arg(6, 0)).await,
        Some("rate") => rate(arg(2, 20), arg(3, 500), arg(4, 100), arg(5, 3), arg(6, 0)).await,
        Some("gc") => gc(arg(2, 20_000), arg(3, 100), arg(4, 3), arg(5, 100)).await,
        _ => {
            eprintln!(
                "usage: cluster-bench failover [TRIALS] | publish [SECONDS] [CONCURRENCY] [KIB] [NODES] [WARMUP] | rate [SECONDS] [RATE] [KIB] [NODES] [WARMUP] | gc [VERSIONS] [KIB] [NODES] [RATE]"
            );
            std::process::exit(2);
        }
    }
}
