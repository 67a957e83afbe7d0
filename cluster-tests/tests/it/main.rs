//! The cluster scenarios: real `granary` processes on their own loopback addresses,
//! driven through the harness in `src/` (`granary_cluster_tests`). Each test prints its
//! seed; `GRANARY_TEST_SEED=<n>` replays its random choices. They run one at a time
//! (nextest test group `cluster`, `.config/nextest.toml`).

/// What the scenarios share: waiting for acknowledgements, the final invariants.
mod common;

/// A package's bytes damaged on one node's disk: served intact, stored again.
mod damaged_disk;
/// SIGKILL of the leader during a publish burst through every node.
mod failover;
/// Unpublished versions and a deleted repository: their bytes collected on every node,
/// segments compacted, nothing referenced lost.
mod gc;
/// haproxy in front of three nodes: a node cut off leaves its rotation, and so does a
/// node draining before it stops; clients through it see no errors either way.
mod load_balancer;
/// A fourth node joins under load and is promoted; another is removed with the CLI.
mod membership;
/// npm publish through one node, npm install through another, right away.
mod npm_cli;
/// A burst of publishes beyond what the nodes take at once: turned away retryably.
mod overload;
/// One node cut off with iptables: the majority serves, the isolated node refuses and
/// serves nothing stale, then it heals and converges.
mod partition;
/// SIGTERM and restart of each node in turn under publish and install load.
mod rolling_restart;
/// Upstream chains and external connections against a stand-in public registry.
mod upstream;
