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
//! ```
//!
//! With `GRANARY_BENCH_LATENCIES=FILE`, `publish` also writes one line per counted publish:
//! when it started (ms into the measured window), its latency (ms), and whether the node it
//! went to led when the run started (1) or not (0).
//!
//! Both start a cluster (three nodes unless told otherwise) of the `granary` binary found as the tests find it
//! (`GRANARY_BIN`, or next to this executable) and print one JSON line of results last.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use granary_cluster_tests::bench::{arg, cpu_ms, percentile};
use granary_cluster_tests::client::{NodeClient, Repo, fake_tgz, noise, npm_publish_body};
use granary_cluster_tests::cluster::{Cluster, SETTLE_TIMEOUT};
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

async fn publish(seconds: u64, concurrency: u64, kib: u64, nodes: u64, warmup: u64) {
    // Every request body is built before the cluster starts (hashing and base64 cost the
    // client, not the cluster): enough for 1,200 publishes/s (one node alone passes
    // 1,000/s on this machine's fast minutes).
    let count = ((warmup + seconds) * 1200) as usize;
    eprintln!("building {count} publish bodies of {kib} KiB");
    let bodies: Arc<Vec<std::sync::Mutex<Option<Vec<u8>>>>> = Arc::new(
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
    );
    let cluster = Cluster::start(Seed::from_env(), nodes as usize).await;
    let repo = cluster.setup(1, "bench", "publish").await;
    let ids = cluster.ids();
    let clients = cluster.clients(&ids);
    let leader = cluster.wait_leader(&ids, SETTLE_TIMEOUT).await;
    let next = Arc::new(AtomicUsize::new(0));
    let acked = Arc::new(AtomicU64::new(0));
    // Publishes that start before `started` are the warm-up: sent, not counted.
    let started = Instant::now() + Duration::from_secs(warmup);
    let deadline = started + Duration::from_secs(seconds);
    let cpu = tokio::spawn(cpu_per_publish(
        cluster
            .ids()
            .iter()
            .filter_map(|&id| cluster.node(id).pid())
            .collect(),
        acked.clone(),
        started,
        Duration::from_secs(seconds),
    ));
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
    let (node_cpu, bench_cpu) = cpu
        .await
        .expect("cpu sampler")
        .unwrap_or((f64::NAN, f64::NAN));
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

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    match std::env::args().nth(1).as_deref() {
        Some("failover") => failover(arg(2, 20)).await,
        Some("publish") => publish(arg(2, 20), arg(3, 64), arg(4, 100), arg(5, 3), arg(6, 0)).await,
        _ => {
            eprintln!(
                "usage: cluster-bench failover [TRIALS] | publish [SECONDS] [CONCURRENCY] [KIB] [NODES] [WARMUP]"
            );
            std::process::exit(2);
        }
    }
}
