//! granary-cluster-tests: the multi-node harness, failover and chaos scenarios, and
//! cluster benchmarks (`publish = false`).
//!
//! Today it holds the pieces a multi-node harness starts from: writing a node's
//! configuration for a data directory and ports chosen by the OS. In-process clusters with
//! seeded transport faults, real-process clusters killed with SIGKILL, the oracle of
//! acknowledged writes and the invariants arrive with the cluster work.

use std::net::{SocketAddr, TcpListener};
use std::path::Path;

use granary_node::Config;

/// A loopback address with a port the OS reports free right now.
pub fn free_addr() -> std::io::Result<SocketAddr> {
    TcpListener::bind("127.0.0.1:0")?.local_addr()
}

/// A single-node configuration on `data_dir` with OS-chosen ports.
pub fn node_config(node_id: u64, data_dir: &Path) -> std::io::Result<Config> {
    Ok(Config {
        node_id,
        data_dir: data_dir.to_owned(),
        http_addr: free_addr()?,
        grpc_addr: free_addr()?,
        ..Config::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configs_validate() {
        let dir = tempfile::tempdir().unwrap();
        let c = node_config(3, dir.path()).unwrap();
        c.validate().unwrap();
        assert_ne!(c.http_addr, c.grpc_addr);
    }
}
