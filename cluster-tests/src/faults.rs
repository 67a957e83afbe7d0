//! Network faults between real `granary` processes: one node cut off from its peers, on
//! loopback, with iptables. The test's own client (127.0.0.1) still reaches every node.
//!
//! ```text
//!  test client 127.0.0.1 ──────────────┬───────────────┬──────────────┐
//!                                      ▼               ▼              ▼
//!                                 node1 .11  ╳═══╳  node2 .12 ◀═══▶ node3 .13
//!                                 (isolated)  DROP
//! ```
//!
//! Every rule lives in one chain of our own, `granary-<pid>-<n>`, jumped to from `OUTPUT`
//! (all loopback traffic passes there). [`Firewall::heal`] empties it; dropping the
//! [`Firewall`] (also while a failing test unwinds) deletes it, and [`Firewall::require`]
//! first deletes chains left by test processes that no longer exist (killed before they
//! could clean up), so a crashed test never leaves rules behind.
//!
//! Two kinds of rule, because on loopback a connection's *source* address is 127.0.0.1
//! unless the process binds its socket to its own address:
//! - by address: DROP between the node's IP and each peer's IP, both directions (this is
//!   the whole story when nodes bind their peer connections to their own IP);
//! - by process: each node can run in a cgroup of its own ([`Cgroup`]); DROP what the
//!   isolated node's processes send to a peer's IP, and what a peer's processes send to
//!   the isolated node's IP (`-m cgroup --path`). Used when cgroup v2 and the iptables
//!   cgroup match are available; otherwise the harness says so once and relies on the
//!   address rules.
//!
//! Missing iptables (or no permission) skips the tests that need it, except under
//! `CI=true`, where it fails them.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

/// What the firewall needs to know about a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeNet {
    /// The node's id (for messages).
    pub node_id: u64,
    /// The loopback address its HTTP and gRPC listeners bind.
    pub ip: Ipv4Addr,
    /// Its cgroup, relative to the cgroup v2 root, when it runs in one.
    pub cgroup: Option<String>,
}

const CHAIN_PREFIX: &str = "granary-";
static CHAIN_SEQ: AtomicU32 = AtomicU32::new(0);

/// The name of this process's `seq`-th chain.
pub fn chain_name(pid: u32, seq: u32) -> String {
    // iptables chain names are limited to 28 characters: "granary-4294967295-999" fits.
    format!("{CHAIN_PREFIX}{pid}-{}", seq % 1000)
}

/// Chains named by [`chain_name`] in an `iptables -S` listing whose process is gone.
pub fn stale_chains(listing: &str, alive: impl Fn(u32) -> bool) -> Vec<String> {
    listing
        .lines()
        .filter_map(|l| l.strip_prefix("-N "))
        .map(str::trim)
        .filter(|chain| {
            chain
                .strip_prefix(CHAIN_PREFIX)
                .and_then(|rest| rest.split_once('-'))
                .and_then(|(pid, seq)| Some((pid.parse::<u32>().ok()?, seq.parse::<u32>().ok()?)))
                .is_some_and(|(pid, _)| !alive(pid))
        })
        .map(str::to_owned)
        .collect()
}

/// The rules (arguments after `-A <chain>`) that cut `node` off from `peers`, by address
/// and, when `by_cgroup`, by process.
pub fn isolation_rules(node: &NodeNet, peers: &[NodeNet], by_cgroup: bool) -> Vec<Vec<String>> {
    let mut rules = Vec::new();
    let drop_between = |src: Ipv4Addr, dst: Ipv4Addr| {
        vec![
            "-s".to_owned(),
            src.to_string(),
            "-d".to_owned(),
            dst.to_string(),
            "-j".to_owned(),
            "DROP".to_owned(),
        ]
    };
    let drop_from_cgroup = |cgroup: &str, dst: Ipv4Addr| {
        vec![
            "-d".to_owned(),
            dst.to_string(),
            "-m".to_owned(),
            "cgroup".to_owned(),
            "--path".to_owned(),
            cgroup.to_owned(),
            "-j".to_owned(),
            "DROP".to_owned(),
        ]
    };
    for peer in peers.iter().filter(|p| p.ip != node.ip) {
        rules.push(drop_between(node.ip, peer.ip));
        rules.push(drop_between(peer.ip, node.ip));
        if by_cgroup {
            if let Some(cg) = &node.cgroup {
                rules.push(drop_from_cgroup(cg, peer.ip));
            }
            if let Some(cg) = &peer.cgroup {
                rules.push(drop_from_cgroup(cg, node.ip));
            }
        }
    }
    rules
}

/// True under `CI=true`, where a missing tool fails a test instead of skipping it.
pub fn in_ci() -> bool {
    std::env::var("CI").as_deref() == Ok("true")
}

/// Our own iptables chain, removed on drop.
#[derive(Debug)]
pub struct Firewall {
    iptables: Vec<String>,
    chain: String,
    /// `None` until the first cgroup rule is tried; then whether the kernel took it.
    cgroup_match: Option<bool>,
}

impl Firewall {
    /// A fresh chain, if iptables works here. Without it: `None` (the caller skips) and a
    /// message on stderr, or a panic under `CI=true`.
    pub fn require() -> Option<Firewall> {
        match Firewall::create() {
            Ok(fw) => Some(fw),
            Err(why) if in_ci() => panic!(
                "iptables is required for this test under CI=true (install the iptables \
                 package and run as root or with passwordless sudo): {why}"
            ),
            Err(why) => {
                eprintln!("skipping: iptables is not usable here: {why}");
                None
            }
        }
    }

    fn create() -> Result<Firewall, String> {
        let iptables = iptables_command();
        run(&iptables, &["-V"]).map_err(|e| format!("`iptables -V` failed: {e}"))?;
        sweep_stale(&iptables);
        let chain = chain_name(
            std::process::id(),
            CHAIN_SEQ.fetch_add(1, Ordering::Relaxed),
        );
        run(&iptables, &["-N", &chain])?;
        let fw = Firewall {
            iptables,
            chain,
            cgroup_match: None,
        };
        run(&fw.iptables, &["-I", "OUTPUT", "1", "-j", &fw.chain])?;
        Ok(fw)
    }

    /// The chain's name.
    pub fn chain(&self) -> &str {
        &self.chain
    }

    /// Cuts `node` off from every one of `peers` (both directions), until [`heal`].
    ///
    /// [`heal`]: Firewall::heal
    pub fn isolate(&mut self, node: &NodeNet, peers: &[NodeNet]) {
        for rule in isolation_rules(node, peers, false) {
            self.append(&rule)
                .unwrap_or_else(|e| panic!("isolating node {}: {e}", node.node_id));
        }
        let cgroup_rules: Vec<Vec<String>> = isolation_rules(node, peers, true)
            .into_iter()
            .filter(|r| r.iter().any(|a| a == "cgroup"))
            .collect();
        if cgroup_rules.is_empty() || self.cgroup_match == Some(false) {
            return;
        }
        for rule in cgroup_rules {
            if let Err(e) = self.append(&rule) {
                eprintln!(
                    "note: the iptables cgroup match is not available ({e}); isolation relies \
                     on nodes binding their peer connections to their own IP"
                );
                self.cgroup_match = Some(false);
                return;
            }
            self.cgroup_match = Some(true);
        }
    }

    /// Removes every rule: the network is whole again.
    pub fn heal(&mut self) {
        if let Err(e) = run(&self.iptables, &["-F", &self.chain]) {
            panic!("healing the network (flushing {}): {e}", self.chain);
        }
    }

    /// The chain's rules as `iptables -S` prints them.
    pub fn rules(&self) -> String {
        run(&self.iptables, &["-S", &self.chain]).unwrap_or_else(|e| e)
    }

    fn append(&self, rule: &[String]) -> Result<(), String> {
        let mut args: Vec<&str> = vec!["-A", &self.chain];
        args.extend(rule.iter().map(String::as_str));
        run(&self.iptables, &args).map(|_| ())
    }
}

impl Drop for Firewall {
    fn drop(&mut self) {
        remove_chain(&self.iptables, &self.chain);
    }
}

fn remove_chain(iptables: &[String], chain: &str) {
    // The jump may be there more than once only if someone added it by hand; remove all.
    while run(iptables, &["-D", "OUTPUT", "-j", chain]).is_ok() {}
    let _ = run(iptables, &["-F", chain]);
    if let Err(e) = run(iptables, &["-X", chain]) {
        eprintln!("warning: could not delete iptables chain {chain}: {e}");
    }
}

fn sweep_stale(iptables: &[String]) {
    let Ok(listing) = run(iptables, &["-S"]) else {
        return;
    };
    for chain in stale_chains(&listing, pid_alive) {
        eprintln!("removing iptables chain {chain} left by a test process that is gone");
        remove_chain(iptables, &chain);
    }
}

fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// `iptables -w` (wait for the xtables lock), through `sudo -n` when not root.
fn iptables_command() -> Vec<String> {
    let root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false);
    let mut cmd = Vec::new();
    if !root {
        cmd.extend(["sudo".to_owned(), "-n".to_owned()]);
    }
    cmd.extend(["iptables".to_owned(), "-w".to_owned()]);
    cmd
}

fn run(cmd: &[String], args: &[&str]) -> Result<String, String> {
    let out = Command::new(&cmd[0])
        .args(&cmd[1..])
        .args(args)
        .output()
        .map_err(|e| format!("{}: {e}", cmd.join(" ")))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "`{} {}` exited with {}: {}",
            cmd.join(" "),
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// A cgroup (v2) of our own for one node's process, so the firewall can tell that
/// process's packets apart from other loopback traffic. Removed on drop (once empty).
#[derive(Debug)]
pub struct Cgroup {
    dir: PathBuf,
    relative: String,
}

impl Cgroup {
    /// Creates `<cgroup2 root>/granary-<pid>-<name>`; `None` when cgroup v2 is not mounted
    /// or not writable (then only address rules isolate nodes).
    pub fn create(name: &str) -> Option<Cgroup> {
        let root = cgroup2_root()?;
        sweep_stale_cgroups(&root);
        let relative = format!("{CHAIN_PREFIX}{}-{name}", std::process::id());
        let dir = root.join(&relative);
        match std::fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(_) => return None,
        }
        Some(Cgroup { dir, relative })
    }

    /// The file a process id is written to, to move that process in.
    pub fn procs_file(&self) -> PathBuf {
        self.dir.join("cgroup.procs")
    }

    /// The path iptables matches on (relative to the cgroup v2 root).
    pub fn path(&self) -> &str {
        &self.relative
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // Fails while a process is still inside; the owner kills its process first.
        for _ in 0..20 {
            if std::fs::remove_dir(&self.dir).is_ok() || !self.dir.exists() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
}

fn cgroup2_root() -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
    mounts.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        let (_, mount, kind) = (f.next()?, f.next()?, f.next()?);
        (kind == "cgroup2").then(|| PathBuf::from(mount))
    })
}

fn sweep_stale_cgroups(root: &Path) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let pid = name
            .strip_prefix(CHAIN_PREFIX)
            .and_then(|rest| rest.split_once('-'))
            .and_then(|(pid, _)| pid.parse::<u32>().ok());
        if let Some(pid) = pid
            && !pid_alive(pid)
        {
            // Only succeeds when empty, which is what we want.
            let _ = std::fs::remove_dir(e.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn net(id: u64, cgroup: Option<&str>) -> NodeNet {
        NodeNet {
            node_id: id,
            ip: Ipv4Addr::new(127, 0, 0, 10 + id as u8),
            cgroup: cgroup.map(str::to_owned),
        }
    }

    #[test]
    fn isolation_drops_both_directions_to_every_peer_and_spares_the_client() {
        let rules = isolation_rules(
            &net(1, None),
            &[net(1, None), net(2, None), net(3, None)],
            true,
        );
        let text: Vec<String> = rules.iter().map(|r| r.join(" ")).collect();
        assert_eq!(
            text,
            [
                "-s 127.0.0.11 -d 127.0.0.12 -j DROP",
                "-s 127.0.0.12 -d 127.0.0.11 -j DROP",
                "-s 127.0.0.11 -d 127.0.0.13 -j DROP",
                "-s 127.0.0.13 -d 127.0.0.11 -j DROP",
            ]
        );
        assert!(!text.iter().any(|r| r.contains("127.0.0.1 ")));
    }

    #[test]
    fn isolation_by_cgroup_covers_connections_from_127_0_0_1() {
        let rules = isolation_rules(&net(2, Some("g-2")), &[net(1, Some("g-1"))], true);
        let text: Vec<String> = rules.iter().map(|r| r.join(" ")).collect();
        assert_eq!(
            text,
            [
                "-s 127.0.0.12 -d 127.0.0.11 -j DROP",
                "-s 127.0.0.11 -d 127.0.0.12 -j DROP",
                "-d 127.0.0.11 -m cgroup --path g-2 -j DROP",
                "-d 127.0.0.12 -m cgroup --path g-1 -j DROP",
            ]
        );
        assert_eq!(
            isolation_rules(&net(2, Some("g-2")), &[net(1, Some("g-1"))], false).len(),
            2
        );
    }

    #[test]
    fn stale_chains_are_those_of_dead_processes() {
        let listing = "-P OUTPUT ACCEPT\n-N DOCKER\n-N granary-100-0\n-N granary-200-3\n\
                       -N granary-x-1\n-A OUTPUT -j granary-100-0\n";
        assert_eq!(stale_chains(listing, |pid| pid == 200), ["granary-100-0"]);
        assert!(stale_chains(listing, |_| true).is_empty());
        assert!(chain_name(u32::MAX, u32::MAX).len() <= 28);
        assert_eq!(chain_name(7, 1001), "granary-7-1");
    }

    fn chain_exists(fw: &Firewall, chain: &str) -> bool {
        run(&fw.iptables, &["-S"])
            .unwrap()
            .lines()
            .any(|l| l == format!("-N {chain}"))
    }

    #[test]
    fn chain_is_created_then_removed_on_drop() {
        let Some(fw) = Firewall::require() else {
            return;
        };
        let chain = fw.chain().to_owned();
        let iptables = fw.iptables.clone();
        assert!(chain_exists(&fw, &chain));
        let listing = run(&iptables, &["-S", "OUTPUT"]).unwrap();
        assert!(listing.contains(&format!("-j {chain}")), "{listing}");
        drop(fw);
        let listing = run(&iptables, &["-S"]).unwrap();
        assert!(!listing.contains(&chain), "{chain} left behind:\n{listing}");
    }

    #[test]
    fn chains_of_dead_processes_are_swept() {
        let Some(fw) = Firewall::require() else {
            return;
        };
        // Process ids are below 2^22 on Linux: this one cannot be alive.
        let orphan = chain_name(4_000_000_000, 0);
        run(&fw.iptables, &["-N", &orphan]).unwrap();
        run(&fw.iptables, &["-A", "OUTPUT", "-j", &orphan]).unwrap();
        let second = Firewall::require().unwrap();
        assert!(
            !chain_exists(&second, &orphan),
            "{orphan} survived the sweep"
        );
        assert!(chain_exists(&second, fw.chain()), "a live chain was swept");
    }

    /// Connects from `src` (bound) to `dst`; true when the handshake completes.
    async fn connects(src: Option<Ipv4Addr>, dst: std::net::SocketAddr) -> bool {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        if let Some(ip) = src {
            sock.bind((ip, 0).into()).unwrap();
        }
        matches!(
            tokio::time::timeout(Duration::from_millis(400), sock.connect(dst)).await,
            Ok(Ok(_))
        )
    }

    #[tokio::test]
    async fn isolated_node_is_cut_off_from_peers_but_not_from_the_client() {
        let Some(mut fw) = Firewall::require() else {
            return;
        };
        // A subnet the cluster tests do not use, so a running cluster is not disturbed.
        let ip = |i: u8| Ipv4Addr::new(127, 0, 201, 10 + i);
        let mut listeners = Vec::new();
        for i in 1..=3 {
            listeners.push(tokio::net::TcpListener::bind((ip(i), 0)).await.unwrap());
        }
        let addr = |i: usize| listeners[i - 1].local_addr().unwrap();
        let nets: Vec<NodeNet> = (1..=3)
            .map(|i| NodeNet {
                node_id: u64::from(i),
                ip: ip(i),
                cgroup: None,
            })
            .collect();
        assert!(connects(Some(ip(1)), addr(2)).await);
        fw.isolate(&nets[0], &nets);
        assert!(!connects(Some(ip(1)), addr(2)).await, "node 1 → node 2");
        assert!(!connects(Some(ip(3)), addr(1)).await, "node 3 → node 1");
        assert!(connects(Some(ip(2)), addr(3)).await, "node 2 → node 3");
        assert!(connects(None, addr(1)).await, "client → isolated node 1");
        assert!(connects(None, addr(2)).await, "client → node 2");
        fw.heal();
        assert!(connects(Some(ip(1)), addr(2)).await, "after heal");
        assert!(connects(Some(ip(3)), addr(1)).await, "after heal");
    }

    #[test]
    fn isolation_by_cgroup_catches_unbound_connections() {
        let Some(mut fw) = Firewall::require() else {
            return;
        };
        let Some(cg) = Cgroup::create("selftest") else {
            eprintln!("skipping: cgroup v2 is not writable here");
            return;
        };
        let rt = tokio::runtime::Runtime::new().unwrap();
        let target = Ipv4Addr::new(127, 0, 202, 12);
        let listener = rt
            .block_on(tokio::net::TcpListener::bind((target, 0)))
            .unwrap();
        let port = listener.local_addr().unwrap().port();
        // A process in the cgroup connecting without binding: its source is 127.0.0.1.
        let connect_from_cgroup = || {
            Command::new("sh")
                .arg("-c")
                .arg(format!(
                    "echo $$ > '{}' && exec timeout 2 bash -c 'exec 3<>/dev/tcp/{target}/{port}'",
                    cg.procs_file().display()
                ))
                .status()
                .unwrap()
                .success()
        };
        assert!(connect_from_cgroup(), "no connection before isolation");
        let node = NodeNet {
            node_id: 1,
            ip: Ipv4Addr::new(127, 0, 202, 11),
            cgroup: Some(cg.path().to_owned()),
        };
        let peer = NodeNet {
            node_id: 2,
            ip: target,
            cgroup: None,
        };
        fw.isolate(&node, &[peer]);
        if fw.cgroup_match == Some(false) {
            eprintln!("skipping: the iptables cgroup match is not available here");
            return;
        }
        assert!(!connect_from_cgroup(), "the isolated cgroup still connects");
        fw.heal();
        assert!(connect_from_cgroup(), "no connection after healing");
    }
}
