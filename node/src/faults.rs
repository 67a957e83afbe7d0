//! Transport faults between members, for tests that run a whole cluster in one process:
//! partitions, an isolated node, dropped calls, delayed calls. Every outgoing peer call
//! (Raft, forwarded writes, read index, blobs, upstream fetches) asks [`Faults::verdict`]
//! first; production nodes have no `Faults` and pay one branch per call.
//!
//! A test can also make members answer one gRPC method as members of an earlier version
//! that lack it would (UNIMPLEMENTED), to try the fallbacks of a rolling upgrade.
//!
//! A test can also give the network a shape that outlives [`Faults::heal`]: a round trip
//! per link ([`Faults::latency`]), as between regions: every call on that link waits half
//! of it on the way there and half on the way back.
//!
//! ```text
//!   test ──isolate / partition / drop_rate / delay / heal──▶ Faults (seeded RNG)
//!   test ──latency (kept by heal)─────────────────────────▶
//!   node A ─peer call to B─▶ verdict(A, B): Pass | Cut (fails like a dead link) | Delay
//! ```
//!
//! Nodes are named by their gRPC address (`127.0.0.1:PORT`), as the membership names them.
//! Every random choice (which call is dropped, how long a delay is) comes from the seed.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// What happens to one call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Goes through.
    Pass,
    /// Fails at once, as on a link that is down.
    Cut,
    /// Goes through after this long.
    Delay(Duration),
}

struct Rules {
    isolated: HashSet<String>,
    cut: HashSet<(String, String)>,
    drop_rate: f64,
    delay: Option<(Duration, Duration)>,
    /// Round trips of single links, from and to (see [`Faults::latency`]).
    latency: HashMap<(String, String), (Duration, Duration)>,
    /// gRPC method paths answered UNIMPLEMENTED.
    missing: HashSet<String>,
    rng: StdRng,
}

/// The faults of one in-process cluster.
pub struct Faults {
    rules: Mutex<Rules>,
    unimplemented_answers: AtomicU64,
}

impl Faults {
    /// No faults yet; `seed` drives every random choice.
    pub fn new(seed: u64) -> Faults {
        Faults {
            rules: Mutex::new(Rules {
                isolated: HashSet::new(),
                cut: HashSet::new(),
                drop_rate: 0.0,
                delay: None,
                latency: HashMap::new(),
                missing: HashSet::new(),
                rng: StdRng::seed_from_u64(seed),
            }),
            unimplemented_answers: AtomicU64::new(0),
        }
    }

    fn rules(&self) -> std::sync::MutexGuard<'_, Rules> {
        self.rules.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Cuts `node` off from every other member, both ways.
    pub fn isolate(&self, node: &str) {
        self.rules().isolated.insert(node.to_owned());
    }

    /// Cuts every link between a member of `a` and a member of `b`, both ways.
    pub fn partition(&self, a: &[&str], b: &[&str]) {
        let mut r = self.rules();
        for x in a {
            for y in b {
                r.cut.insert(((*x).to_owned(), (*y).to_owned()));
                r.cut.insert(((*y).to_owned(), (*x).to_owned()));
            }
        }
    }

    /// Fails this fraction (0–1) of all calls, chosen at random.
    pub fn drop_rate(&self, rate: f64) {
        self.rules().drop_rate = rate.clamp(0.0, 1.0);
    }

    /// Delays every call by `min` to `max`, chosen at random (half before it is sent, half
    /// before its answer is taken).
    pub fn delay(&self, min: Duration, max: Duration) {
        self.rules().delay = Some((min, max.max(min)));
    }

    /// Gives every link between a member of `a` and a member of `b` a round trip of `min`
    /// to `max` (chosen at random per call), both ways: each call on such a link waits
    /// half of it before it is sent and half before its answer is taken. Unlike the
    /// faults, latency stays after [`Faults::heal`]: it is the network's shape (regions
    /// far apart), not a failure.
    /// Where a link also has [`Faults::delay`], the longer of the two applies.
    pub fn latency(&self, a: &[&str], b: &[&str], min: Duration, max: Duration) {
        let mut r = self.rules();
        for x in a {
            for y in b {
                for key in [
                    ((*x).to_owned(), (*y).to_owned()),
                    ((*y).to_owned(), (*x).to_owned()),
                ] {
                    r.latency.insert(key, (min, max.max(min)));
                }
            }
        }
    }

    /// Answers every call of a gRPC method (its path, as `/granary.v1.Cluster/PushBlob`)
    /// UNIMPLEMENTED, as a member that predates the method would.
    pub fn unimplemented(&self, method: &str) {
        self.rules().missing.insert(method.to_owned());
    }

    /// How many calls were answered UNIMPLEMENTED so far.
    pub fn unimplemented_answers(&self) -> u64 {
        self.unimplemented_answers.load(Ordering::Relaxed)
    }

    /// Whether a call of the method at `path` is answered UNIMPLEMENTED (and counts it).
    pub(crate) fn lacks(&self, path: &str) -> bool {
        let lacks = self.rules().missing.contains(path);
        if lacks {
            self.unimplemented_answers.fetch_add(1, Ordering::Relaxed);
        }
        lacks
    }

    /// Removes every fault (the links' latency stays).
    pub fn heal(&self) {
        let mut r = self.rules();
        r.isolated.clear();
        r.cut.clear();
        r.drop_rate = 0.0;
        r.delay = None;
        r.missing.clear();
    }

    /// What happens to a call from `from` to `to`.
    pub(crate) fn verdict(&self, from: &str, to: &str) -> Verdict {
        let mut r = self.rules();
        if r.isolated.contains(from)
            || r.isolated.contains(to)
            || r.cut.contains(&(from.to_owned(), to.to_owned()))
        {
            return Verdict::Cut;
        }
        if r.drop_rate > 0.0 {
            let p = r.drop_rate;
            if r.rng.random_bool(p) {
                return Verdict::Cut;
            }
        }
        let link = r.latency.get(&(from.to_owned(), to.to_owned())).copied();
        let delay = match (r.delay, link) {
            (None, None) => return Verdict::Pass,
            (Some(d), None) | (None, Some(d)) => pick(&mut r.rng, d),
            (Some(d), Some(l)) => pick(&mut r.rng, d).max(pick(&mut r.rng, l)),
        };
        if delay.is_zero() {
            Verdict::Pass
        } else {
            Verdict::Delay(delay)
        }
    }
}

impl Verdict {
    /// Plays the way there: `None` for a cut link; otherwise, after waiting half of a
    /// delay (a round trip), the half the answer is to wait on the way back.
    pub(crate) async fn go_there(self) -> Option<Duration> {
        match self {
            Verdict::Pass => Some(Duration::ZERO),
            Verdict::Cut => None,
            Verdict::Delay(d) => {
                tokio::time::sleep(d / 2).await;
                Some(d - d / 2)
            }
        }
    }
}

/// A duration from `min` to `max`, chosen with `rng`.
fn pick(rng: &mut StdRng, (min, max): (Duration, Duration)) -> Duration {
    let span = (max - min).as_micros() as u64;
    if span == 0 {
        min
    } else {
        min + Duration::from_micros(rng.random_range(0..=span))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts_follow_the_rules_and_the_seed() {
        let f = Faults::new(7);
        assert_eq!(f.verdict("a", "b"), Verdict::Pass);
        f.partition(&["a"], &["b", "c"]);
        assert_eq!(f.verdict("b", "a"), Verdict::Cut);
        assert_eq!(f.verdict("b", "c"), Verdict::Pass);
        f.heal();
        f.isolate("c");
        assert_eq!(f.verdict("a", "c"), Verdict::Cut);
        f.heal();
        f.drop_rate(0.5);
        let run = |seed| {
            let f = Faults::new(seed);
            f.drop_rate(0.5);
            (0..64).map(|_| f.verdict("a", "b")).collect::<Vec<_>>()
        };
        assert_eq!(run(3), run(3), "the same seed drops the same calls");
        assert!(run(3).contains(&Verdict::Cut) && run(3).contains(&Verdict::Pass));
        f.heal();
        f.delay(Duration::from_millis(5), Duration::from_millis(10));
        match f.verdict("a", "b") {
            Verdict::Delay(d) => {
                assert!(d >= Duration::from_millis(5) && d <= Duration::from_millis(10))
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn latency_is_per_link_and_outlives_heal() {
        let f = Faults::new(7);
        let ms = Duration::from_millis;
        f.latency(&["a"], &["b", "c"], ms(70), ms(80));
        for (from, to) in [("a", "b"), ("b", "a"), ("c", "a")] {
            match f.verdict(from, to) {
                Verdict::Delay(d) => assert!(d >= ms(70) && d <= ms(80), "{from}→{to}: {d:?}"),
                other => panic!("{from}→{to}: {other:?}"),
            }
        }
        assert_eq!(f.verdict("b", "c"), Verdict::Pass, "a link not named");
        f.partition(&["a"], &["b"]);
        assert_eq!(
            f.verdict("a", "b"),
            Verdict::Cut,
            "a cut link is cut, however far"
        );
        f.heal();
        assert!(
            matches!(f.verdict("a", "b"), Verdict::Delay(_)),
            "heal keeps latency"
        );
        // With a delay on every call too, the longer one applies.
        f.delay(ms(200), ms(200));
        assert_eq!(f.verdict("a", "b"), Verdict::Delay(ms(200)));
        assert_eq!(f.verdict("b", "c"), Verdict::Delay(ms(200)));
    }
}
