//! One real `granary server` process: spawned with the cluster's flags and environment,
//! waited on until healthy or ready, stopped with SIGKILL (a crash) or SIGTERM (a clean
//! shutdown), and started again on the same data directory and the same addresses.
//!
//! Its stdout and stderr are kept (the last lines, tagged `n<id>.<start>|`) for failure
//! messages; `GRANARY_TEST_ECHO=1` also copies them to stderr as they come, and
//! `GRANARY_TEST_RUST_LOG` replaces the nodes' `RUST_LOG=warn`.
//!
//! This module must not know about clusters: which node joins which is the caller's
//! [`NodeSpec`].

use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::client::{ACCESS_KEY, CLUSTER_SECRET, NodeClient, SECRET_KEY};
use crate::faults::Cgroup;
use crate::poll;

/// Lines of output kept per node.
const KEPT_LINES: usize = 2000;

/// The `granary` binary: `GRANARY_BIN` if set, else the one cargo built next to the test
/// executable (`target/<profile>/deps/<test>` → `target/<profile>/granary`).
pub fn granary_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("GRANARY_BIN") {
        let p = PathBuf::from(p);
        assert!(p.is_file(), "GRANARY_BIN={} is not a file", p.display());
        return p;
    }
    let exe = std::env::current_exe().expect("current_exe");
    let candidates: Vec<PathBuf> = exe
        .ancestors()
        .skip(1)
        .take(2)
        .map(|dir| dir.join("granary"))
        .collect();
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .unwrap_or_else(|| {
            panic!(
                "the granary binary is not built (looked at {candidates:?}): run \
                 `cargo build -p granary-node --bin granary` (`cargo nextest run --workspace` \
                 builds it), or point GRANARY_BIN at one"
            )
        })
}

/// A port that is free on `ip` right now (the OS picks it; the node binds it later, so
/// the address stays the same across restarts).
pub fn free_port(ip: IpAddr) -> u16 {
    free_ports::<1>(ip)[0]
}

/// `N` different ports free on `ip` right now. Each probe is held until all are picked:
/// probes made one after another, each closed before the next, may be given the same
/// port twice, and a node given one port for both its listeners cannot start.
pub fn free_ports<const N: usize>(ip: IpAddr) -> [u16; N] {
    let probes: [TcpListener; N] = std::array::from_fn(|_| {
        TcpListener::bind((ip, 0)).unwrap_or_else(|e| panic!("no free port on {ip}: {e}"))
    });
    probes.map(|l| {
        l.local_addr()
            .unwrap_or_else(|e| panic!("no free port on {ip}: {e}"))
            .port()
    })
}

/// How to start one node.
#[derive(Debug, Clone)]
pub struct NodeSpec {
    /// Raft id.
    pub node_id: u64,
    /// Data directory, kept across restarts.
    pub data_dir: PathBuf,
    /// HTTP listen address.
    pub http: SocketAddr,
    /// gRPC listen address.
    pub grpc: SocketAddr,
    /// Region label.
    pub region: String,
    /// gRPC addresses of members to join through; empty to bootstrap.
    pub join: Vec<SocketAddr>,
    /// Join as a learner and stay one.
    pub learner: bool,
    /// A config file passed with `--config`.
    pub config: Option<PathBuf>,
    /// `RUST_LOG` for this node, when not `GRANARY_TEST_RUST_LOG` (or `warn`).
    pub rust_log: Option<String>,
}

impl NodeSpec {
    /// The `granary` arguments.
    pub fn args(&self) -> Vec<String> {
        let mut args = vec![
            "server".to_owned(),
            "--data-dir".to_owned(),
            self.data_dir.display().to_string(),
            "--http".to_owned(),
            self.http.to_string(),
            "--grpc".to_owned(),
            self.grpc.to_string(),
            "--node-id".to_owned(),
            self.node_id.to_string(),
            "--region".to_owned(),
            self.region.clone(),
        ];
        for j in &self.join {
            args.push("--join".to_owned());
            args.push(j.to_string());
        }
        if self.learner {
            args.push("--learner".to_owned());
        }
        if let Some(c) = &self.config {
            args.push("--config".to_owned());
            args.push(c.display().to_string());
        }
        args
    }

    /// `http://<http addr>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.http)
    }
}

/// A `granary server` process, running or stopped.
#[derive(Debug)]
pub struct NodeProcess {
    spec: NodeSpec,
    child: Option<Child>,
    starts: u32,
    output: Arc<Mutex<VecDeque<String>>>,
    client: NodeClient,
    // Declared last: dropped after `drop` has killed the process, when it is empty.
    cgroup: Option<Cgroup>,
}

impl NodeProcess {
    /// Starts a node (returns once spawned; see [`wait_healthy`] and [`wait_ready`]).
    /// With a cgroup, the process runs inside it from its first instruction.
    ///
    /// [`wait_healthy`]: NodeProcess::wait_healthy
    /// [`wait_ready`]: NodeProcess::wait_ready
    pub fn spawn(spec: NodeSpec, cgroup: Option<Cgroup>) -> NodeProcess {
        let client = NodeClient::new(spec.node_id, spec.url());
        let mut p = NodeProcess {
            spec,
            child: None,
            starts: 0,
            output: Arc::default(),
            client,
            cgroup,
        };
        p.start();
        p
    }

    /// Starts the process again on the same data directory and addresses. `--join` is
    /// passed again (harmless for a member, per the contract).
    pub fn start(&mut self) {
        assert!(
            self.child.is_none(),
            "node {} is already running",
            self.spec.node_id
        );
        self.starts += 1;
        let bin = granary_bin();
        let mut cmd = match &self.cgroup {
            Some(cg) => {
                // `sh` moves itself into the cgroup, then becomes granary (same pid), so
                // no packet of the node is ever sent from outside the cgroup.
                let mut c = Command::new("sh");
                c.arg("-c")
                    .arg(r#"echo $$ > "$0" && exec "$@""#)
                    .arg(cg.procs_file())
                    .arg(&bin);
                c
            }
            None => Command::new(&bin),
        };
        let log = std::env::var("GRANARY_TEST_RUST_LOG")
            .ok()
            .or_else(|| self.spec.rust_log.clone())
            .unwrap_or_else(|| "warn".to_owned());
        cmd.args(self.spec.args())
            .env("RUST_LOG", log)
            .env("GRANARY_CLUSTER_SECRET", CLUSTER_SECRET)
            .env("GRANARY_ADMIN_ACCESS_KEY_ID", ACCESS_KEY)
            .env("GRANARY_ADMIN_SECRET_ACCESS_KEY", SECRET_KEY)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", bin.display()));
        let tag = format!("n{}.{}| ", self.spec.node_id, self.starts);
        let echo = std::env::var_os("GRANARY_TEST_ECHO").is_some();
        if let Some(out) = child.stdout.take() {
            self.capture(out, tag.clone(), echo);
        }
        if let Some(err) = child.stderr.take() {
            self.capture(err, tag, echo);
        }
        self.child = Some(child);
    }

    fn capture(&self, stream: impl std::io::Read + Send + 'static, tag: String, echo: bool) {
        let output = self.output.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(Result::ok) {
                let line = format!("{tag}{line}");
                if echo {
                    eprintln!("{line}");
                }
                let mut out = output.lock().unwrap_or_else(|e| e.into_inner());
                if out.len() == KEPT_LINES {
                    out.pop_front();
                }
                out.push_back(line);
            }
        });
    }

    /// How the node was started.
    pub fn spec(&self) -> &NodeSpec {
        &self.spec
    }

    /// Its id.
    pub fn id(&self) -> u64 {
        self.spec.node_id
    }

    /// A client for its HTTP front.
    pub fn client(&self) -> NodeClient {
        self.client.clone()
    }

    /// Its cgroup, if it runs in one.
    pub fn cgroup(&self) -> Option<&Cgroup> {
        self.cgroup.as_ref()
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// True while the process has not exited.
    pub fn is_running(&mut self) -> bool {
        self.exit_status().is_none() && self.child.is_some()
    }

    /// The exit status, once the process has exited on its own.
    pub fn exit_status(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// SIGKILL: no chance to flush or to say goodbye.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then wait up to `timeout` for the exit; SIGKILL after that. `Ok` with the
    /// exit status, `Err` if it had to be killed.
    pub async fn terminate(&mut self, timeout: Duration) -> Result<ExitStatus, String> {
        let Some(mut child) = self.child.take() else {
            return Err(format!("node {} is not running", self.spec.node_id));
        };
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status();
        let waited = poll::try_until(timeout, || {
            let status = child.try_wait();
            async move {
                match status {
                    Ok(Some(s)) => Ok(s),
                    Ok(None) => Err("still running".to_owned()),
                    Err(e) => Err(e.to_string()),
                }
            }
        })
        .await;
        match waited {
            Ok(s) => Ok(s),
            Err(why) => {
                let _ = child.kill();
                let _ = child.wait();
                Err(format!(
                    "node {} did not exit within {timeout:?} of SIGTERM ({why}); killed it",
                    self.spec.node_id
                ))
            }
        }
    }

    /// Waits until `/healthz` answers 200; panics with the output if the process exits
    /// or `timeout` passes.
    pub async fn wait_healthy(&mut self, timeout: Duration) {
        self.wait_for("/healthz", timeout).await;
    }

    /// Waits until `/readyz` answers 200 (a member that knows a leader and is not cut off);
    /// panics with the output if the process exits or `timeout` passes.
    pub async fn wait_ready(&mut self, timeout: Duration) {
        self.wait_for("/readyz", timeout).await;
    }

    async fn wait_for(&mut self, path: &'static str, timeout: Duration) {
        let client = self.client.clone();
        let child = &mut self.child;
        let r = poll::try_until(timeout, || {
            let exited = child.as_mut().and_then(|c| c.try_wait().ok().flatten());
            let client = client.clone();
            async move {
                if let Some(status) = exited {
                    return Ok(Err(status));
                }
                match client.raw("GET", path, &[], vec![]).await {
                    Ok(r) if r.status == 200 => Ok(Ok(())),
                    Ok(r) => Err(r.describe()),
                    Err(e) => Err(e.to_string()),
                }
            }
        })
        .await;
        match r {
            Ok(Ok(())) => {}
            Ok(Err(status)) => panic!(
                "node {} exited ({status}) before {path} answered 200; its output:\n{}",
                self.spec.node_id,
                self.output_tail(80)
            ),
            Err(why) => panic!(
                "node {}: {path} not 200 within {timeout:?} ({why}); its output:\n{}",
                self.spec.node_id,
                self.output_tail(80)
            ),
        }
    }

    /// Waits until the process has printed every one of `said` (its output reaches the
    /// harness through a reader thread, so a line logged while answering a request may
    /// arrive after the answer); on timeout, what was still missing and the output.
    pub async fn wait_for_output(&self, said: &[&str], timeout: Duration) -> Result<(), String> {
        poll::try_until(timeout, || async {
            let out = self.output_tail(usize::MAX);
            match said.iter().find(|s| !out.contains(**s)) {
                None => Ok(()),
                Some(missing) => Err(format!("its output lacks {missing:?}")),
            }
        })
        .await
        .map_err(|why| {
            format!(
                "node {}: {why}:\n{}",
                self.spec.node_id,
                self.output_tail(200)
            )
        })
    }

    /// The last `n` lines the process printed (all starts), for failure messages.
    pub fn output_tail(&self, n: usize) -> String {
        let out = self.output.lock().unwrap_or_else(|e| e.into_inner());
        let skip = out.len().saturating_sub(n);
        out.iter()
            .skip(skip)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn args_follow_the_contract() {
        let spec = NodeSpec {
            node_id: 4,
            data_dir: PathBuf::from("/tmp/d4"),
            http: "127.0.0.14:1000".parse().unwrap(),
            grpc: "127.0.0.14:1001".parse().unwrap(),
            region: "eu".to_owned(),
            join: vec![
                "127.0.0.11:2001".parse().unwrap(),
                "127.0.0.12:2002".parse().unwrap(),
            ],
            learner: true,
            config: None,
            rust_log: None,
        };
        assert_eq!(
            spec.args().join(" "),
            "server --data-dir /tmp/d4 --http 127.0.0.14:1000 --grpc 127.0.0.14:1001 \
             --node-id 4 --region eu --join 127.0.0.11:2001 --join 127.0.0.12:2002 --learner"
        );
        assert_eq!(spec.url(), "http://127.0.0.14:1000");
    }

    #[test]
    fn free_ports_on_any_loopback_address() {
        let ip: IpAddr = "127.0.203.11".parse().unwrap();
        let p = free_port(ip);
        TcpListener::bind((ip, p)).expect("the port is free");
    }

    #[test]
    fn ports_picked_together_differ() {
        let ip: IpAddr = "127.0.203.12".parse().unwrap();
        for _ in 0..200 {
            let [a, b] = free_ports::<2>(ip);
            assert_ne!(a, b);
        }
    }
}
