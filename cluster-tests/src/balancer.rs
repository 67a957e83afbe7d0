//! A real load balancer in front of a cluster: haproxy, health-checking every node's
//! `GET /readyz` as an operator would configure it, with its statistics page telling
//! which nodes it has in rotation.
//!
//! ```text
//!   client ──▶ haproxy 127.0.0.1:P ──round robin over nodes in rotation──▶ node1 node2 node3
//!                 │  every 100 ms: GET /readyz on each; 2 failures → out, 2 passes → in
//!                 └─ 127.0.0.1:S/stats;csv: each node's state (UP, DOWN, UP 1/2, …)
//! ```
//!
//! Missing haproxy skips the tests that need it, except under `CI=true`, where it fails
//! them (`scripts/install-test-deps.sh` installs it).

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::client::NodeClient;
use crate::faults::in_ci;
use crate::process::free_ports;

/// How often haproxy checks each node, and how many checks in a row take a node out of
/// rotation or put it back.
pub const CHECK_EVERY: Duration = Duration::from_millis(100);
/// Failed checks in a row before a node leaves the rotation.
pub const FALL: u32 = 2;
/// Passed checks in a row before a node comes back.
pub const RISE: u32 = 2;

/// A running haproxy, stopped on drop.
#[derive(Debug)]
pub struct Balancer {
    child: Child,
    /// `http://127.0.0.1:P`: what clients talk to.
    pub url: String,
    stats: String,
    http: reqwest::Client,
    _dir: tempfile::TempDir,
}

/// The haproxy configuration for `nodes` (`(node id, "ip:port")` of each HTTP front).
pub fn config(port: u16, stats_port: u16, nodes: &[(u64, String)]) -> String {
    let every = CHECK_EVERY.as_millis();
    let mut cfg = format!(
        "global\n\
         \x20   maxconn 4096\n\
         defaults\n\
         \x20   mode http\n\
         \x20   timeout connect 2s\n\
         \x20   timeout client 60s\n\
         \x20   timeout server 60s\n\
         \x20   retries 3\n\
         \x20   option redispatch 1\n\
         frontend granary\n\
         \x20   bind 127.0.0.1:{port}\n\
         \x20   default_backend nodes\n\
         backend nodes\n\
         \x20   balance roundrobin\n\
         \x20   option httpchk GET /readyz\n\
         \x20   http-check expect status 200\n\
         \x20   default-server inter {every}ms fastinter {every}ms downinter {every}ms \
         fall {FALL} rise {RISE}\n"
    );
    for (id, addr) in nodes {
        cfg.push_str(&format!("    server node{id} {addr} check\n"));
    }
    cfg.push_str(&format!(
        "listen stats\n\
         \x20   bind 127.0.0.1:{stats_port}\n\
         \x20   stats enable\n\
         \x20   stats uri /stats\n"
    ));
    cfg
}

/// Each server's state in haproxy's CSV statistics (`# pxname,svname,…,status,…`), for
/// backend `nodes`: `(node id, status)`.
pub fn states(csv: &str) -> Vec<(u64, String)> {
    let mut lines = csv.lines();
    let Some(header) = lines.next() else {
        return Vec::new();
    };
    let columns: Vec<&str> = header.trim_start_matches("# ").split(',').collect();
    let column = |name: &str| columns.iter().position(|c| *c == name);
    let (Some(px), Some(sv), Some(status)) = (column("pxname"), column("svname"), column("status"))
    else {
        return Vec::new();
    };
    lines
        .filter_map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            if f.get(px) != Some(&"nodes") {
                return None;
            }
            let id = f.get(sv)?.strip_prefix("node")?.parse().ok()?;
            Some((id, f.get(status)?.to_string()))
        })
        .collect()
}

impl Balancer {
    /// Starts haproxy in front of `nodes` (`(node id, "ip:port")`), if haproxy is here.
    /// Without it: `None` (the caller skips) and a message, or a panic under `CI=true`.
    pub fn require(nodes: &[(u64, String)]) -> Option<Balancer> {
        match Balancer::start(nodes) {
            Ok(b) => Some(b),
            Err(why) if in_ci() => panic!(
                "haproxy is required for this test under CI=true (scripts/install-test-deps.sh \
                 installs it): {why}"
            ),
            Err(why) => {
                eprintln!("skipping: haproxy is not usable here: {why}");
                None
            }
        }
    }

    fn start(nodes: &[(u64, String)]) -> Result<Balancer, String> {
        let local = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let [port, stats_port] = free_ports(local);
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let cfg = dir.path().join("haproxy.cfg");
        std::fs::write(&cfg, config(port, stats_port, nodes)).map_err(|e| e.to_string())?;
        check_config(&cfg)?;
        let child = Command::new("haproxy")
            .arg("-db")
            .arg("-f")
            .arg(&cfg)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("haproxy: {e}"))?;
        Ok(Balancer {
            child,
            url: format!("http://127.0.0.1:{port}"),
            stats: format!("http://127.0.0.1:{stats_port}/stats;csv"),
            http: reqwest::Client::new(),
            _dir: dir,
        })
    }

    /// A client of the cluster through the balancer (node id 0 in messages).
    pub fn client(&self) -> NodeClient {
        NodeClient::new(0, self.url.clone())
    }

    /// Each node's state as haproxy sees it: `UP`, `DOWN`, `UP 1/2` (failing), ….
    pub async fn states(&self) -> Result<Vec<(u64, String)>, String> {
        let r = self
            .http
            .get(&self.stats)
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .map_err(|e| format!("haproxy stats: {e}"))?;
        let text = r.text().await.map_err(|e| format!("haproxy stats: {e}"))?;
        Ok(states(&text))
    }

    /// Whether node `id` is in rotation (`UP`, or still `UP` while failing checks).
    pub async fn in_rotation(&self, id: u64) -> Result<bool, String> {
        let states = self.states().await?;
        let (_, s) = states
            .iter()
            .find(|(n, _)| *n == id)
            .ok_or_else(|| format!("haproxy reports no node {id}: {states:?}"))?;
        Ok(s.starts_with("UP"))
    }
}

/// `haproxy -c`: the configuration is valid (and haproxy runs at all).
fn check_config(cfg: &Path) -> Result<(), String> {
    let out = Command::new("haproxy")
        .arg("-c")
        .arg("-q")
        .arg("-f")
        .arg(cfg)
        .output()
        .map_err(|e| format!("haproxy: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "haproxy -c: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_checks_readyz_on_every_node() {
        let cfg = config(
            8080,
            8081,
            &[(1, "127.0.9.11:4000".into()), (2, "127.0.9.12:4001".into())],
        );
        assert!(cfg.contains("bind 127.0.0.1:8080"));
        assert!(cfg.contains("option httpchk GET /readyz"));
        assert!(cfg.contains("server node1 127.0.9.11:4000 check"));
        assert!(cfg.contains("server node2 127.0.9.12:4001 check"));
        assert!(cfg.contains("inter 100ms"));
        assert!(cfg.contains("option redispatch 1"));
        assert!(cfg.contains("bind 127.0.0.1:8081"));
    }

    #[test]
    fn states_are_read_from_the_csv_by_column_name() {
        let csv = "# pxname,svname,qcur,status,weight\n\
                   granary,FRONTEND,,OPEN,\n\
                   nodes,node1,0,UP,1\n\
                   nodes,node2,0,DOWN,1\n\
                   nodes,node3,0,UP 1/2,1\n\
                   nodes,BACKEND,0,UP,2\n\
                   stats,FRONTEND,,OPEN,\n";
        assert_eq!(
            states(csv),
            vec![
                (1, "UP".to_owned()),
                (2, "DOWN".to_owned()),
                (3, "UP 1/2".to_owned())
            ]
        );
        assert!(states("").is_empty());
    }

    /// `configs/three-node/haproxy.cfg`, for operators to copy: haproxy takes it, and it
    /// checks `/readyz` on exactly the HTTP fronts of `node1.toml` … `node3.toml`.
    #[test]
    fn the_shipped_three_node_balancer_matches_the_nodes() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/three-node");
        let cfg = std::fs::read_to_string(dir.join("haproxy.cfg")).unwrap();
        assert!(cfg.contains("option httpchk GET /readyz"));
        let servers: Vec<&str> = cfg
            .lines()
            .filter_map(|l| l.trim().strip_prefix("server "))
            .map(|l| l.split_whitespace().nth(1).unwrap())
            .collect();
        let fronts: Vec<String> = (1..=3)
            .map(|n| {
                let toml = std::fs::read_to_string(dir.join(format!("node{n}.toml"))).unwrap();
                toml.lines()
                    .find_map(|l| l.strip_prefix("http_addr = "))
                    .unwrap()
                    .trim_matches('"')
                    .to_owned()
            })
            .collect();
        assert_eq!(servers, fronts);
        let have = Command::new("haproxy").arg("-v").output().is_ok();
        if !have && !in_ci() {
            eprintln!("skipping haproxy -c: no haproxy here");
            return;
        }
        check_config(&dir.join("haproxy.cfg")).expect("haproxy takes the shipped file");
    }

    #[test]
    fn a_config_haproxy_accepts() {
        let have = Command::new("haproxy").arg("-v").output().is_ok();
        if !have && !in_ci() {
            eprintln!("skipping: no haproxy here");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("haproxy.cfg");
        std::fs::write(&cfg, config(8080, 8081, &[(1, "127.0.9.11:4000".into())])).unwrap();
        check_config(&cfg).expect("haproxy takes the configuration");
    }
}
