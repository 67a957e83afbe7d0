//! granary-cluster-tests: the multi-node harness (`publish = false`). The scenarios that
//! use it are in `tests/it/`.
//!
//! The harness drives real `granary` processes over HTTP, as operators and clients do:
//! it depends on no crate of ours, only on the binary (see [`process::granary_bin`]).
//!
//! ```text
//!   seed ──▶ every random choice          oracle ◀── every acknowledged publish
//!    │                                       │
//!   cluster ── process × N (127.0.S.1i) ◀── load (publishers, readers) ── client
//!    │            ▲
//!   faults ───────┘ iptables chain of our own (+ a cgroup per node)
//!   balancer: haproxy in front, checking each node's /readyz
//!    │
//!   invariants: no_lost_ack, single_leader, blobs_resolve, replicas_converge
//! ```
//!
//! Tests wait on conditions with deadlines ([`poll`]), never on bare sleeps; a failing
//! test prints its seed (`GRANARY_TEST_SEED` replays it) and every node's last output.

// haproxy in front of a cluster, checking each node's `/readyz`.
pub mod balancer;
// What the benchmark binaries share: arguments, percentiles.
pub mod bench;
// SigV4-signed admin and CodeArtifact calls; npm publish and fetch over raw HTTP.
pub mod client;
// A cluster of processes: start, join, leader discovery, kill, restart, add, remove.
pub mod cluster;
// Cutting a node off from its peers with iptables; cgroups to tell nodes apart.
pub mod faults;
// One property per file, checked after each scenario.
pub mod invariants;
// Publishers and readers running during a scenario, and a tally of their outcomes.
pub mod load;
// The record of acknowledged publishes.
pub mod oracle;
// Waiting on conditions with a deadline.
pub mod poll;
// One `granary server` process.
pub mod process;
// The seed of every random choice.
pub mod seed;
// A stand-in for the public npm registry, upstream of external connections.
pub mod standin;
