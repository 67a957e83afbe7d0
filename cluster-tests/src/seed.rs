//! The seed every random choice of a test comes from: tarball sizes and bytes, which node
//! is isolated, restarted or removed, where each publish is sent.
//!
//! A test calls [`Seed::from_env`] once; it prints the seed, and `GRANARY_TEST_SEED=<n>`
//! replays the same choices (timing, of course, still varies between runs). Each consumer
//! takes its own stream with [`Seed::rng`]`("label")`, so adding a random choice in one
//! place does not shift the choices made elsewhere.
//!
//! The generator is splitmix64, written out here so a seed means the same choices for as
//! long as this file is unchanged, whatever version of `rand` the workspace moves to.

use std::time::{SystemTime, UNIX_EPOCH};

/// The environment variable that fixes the seed.
pub const SEED_ENV: &str = "GRANARY_TEST_SEED";

/// A test's seed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seed(u64);

impl Seed {
    /// The seed from `GRANARY_TEST_SEED` (decimal or `0x` hex), else a fresh one; prints
    /// it either way so a failing run can be replayed.
    pub fn from_env() -> Seed {
        let seed = match std::env::var(SEED_ENV) {
            Ok(text) => Seed(parse(&text).unwrap_or_else(|e| panic!("{SEED_ENV}: {e}"))),
            Err(_) => Seed::fresh(),
        };
        eprintln!("granary-cluster-tests: seed {seed} (replay with {SEED_ENV}={seed})");
        seed
    }

    /// A seed given by the caller (unit tests, replays).
    pub fn new(value: u64) -> Seed {
        Seed(value)
    }

    /// A seed from the clock and the process id.
    fn fresh() -> Seed {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        let mut rng = TestRng(nanos ^ (u64::from(std::process::id()) << 32));
        Seed(rng.next_u64())
    }

    /// The seed's value.
    pub fn value(self) -> u64 {
        self.0
    }

    /// An independent stream for one consumer, named by `label`.
    pub fn rng(self, label: &str) -> TestRng {
        TestRng(self.0 ^ fnv1a(label.as_bytes()))
    }
}

impl std::fmt::Display for Seed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Parses a seed: decimal, or hex with a `0x` prefix.
pub fn parse(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let parsed = match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => t.parse(),
    };
    parsed.map_err(|e| format!("{text:?} is not a u64 seed ({e})"))
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// A small deterministic generator (splitmix64).
#[derive(Debug, Clone)]
pub struct TestRng(u64);

impl TestRng {
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A new independent stream drawn from this one.
    pub fn fork(&mut self) -> TestRng {
        TestRng(self.next_u64() ^ 0x5851_f42d_4c95_7f2d)
    }

    /// A number in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0, "below(0)");
        // Multiply-shift: unbiased enough for test choices, and no loop.
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }

    /// A number in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        assert!(lo <= hi, "range({lo}, {hi})");
        lo + self.below(hi - lo + 1)
    }

    /// True with probability `percent`/100.
    pub fn percent(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    /// One element of a non-empty slice.
    pub fn choose<T: Clone>(&mut self, items: &[T]) -> T {
        assert!(!items.is_empty(), "choose from an empty slice");
        items[self.below(items.len() as u64) as usize].clone()
    }

    /// Shuffles in place (Fisher–Yates).
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            items.swap(i, j);
        }
    }

    /// `len` pseudo-random bytes.
    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(len + 8);
        while out.len() < len {
            out.extend_from_slice(&self.next_u64().to_le_bytes());
        }
        out.truncate(len);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_choices() {
        let a: Vec<u64> = {
            let mut r = Seed::new(42).rng("load");
            (0..20).map(|_| r.next_u64()).collect()
        };
        let b: Vec<u64> = {
            let mut r = Seed::new(42).rng("load");
            (0..20).map(|_| r.next_u64()).collect()
        };
        assert_eq!(a, b);
    }

    #[test]
    fn labels_and_seeds_give_independent_streams() {
        let first = |seed: u64, label: &str| Seed::new(seed).rng(label).next_u64();
        assert_ne!(first(42, "load"), first(42, "faults"));
        assert_ne!(first(42, "load"), first(43, "load"));
    }

    #[test]
    fn known_values_do_not_drift() {
        // A replayed seed must mean the same choices: pin the generator's output.
        let mut r = TestRng(0);
        assert_eq!(r.next_u64(), 0xe220_a839_7b1d_cdaf);
        assert_eq!(r.next_u64(), 0x6e78_9e6a_a1b9_65f4);
    }

    #[test]
    fn helpers_stay_in_range() {
        let mut r = Seed::new(7).rng("t");
        for _ in 0..1000 {
            assert!(r.below(3) < 3);
            let x = r.range(5, 9);
            assert!((5..=9).contains(&x));
        }
        let mut v: Vec<u32> = (0..50).collect();
        r.shuffle(&mut v);
        let mut sorted = v.clone();
        sorted.sort();
        assert_eq!(sorted, (0..50).collect::<Vec<_>>());
        assert_ne!(v, sorted, "50 elements shuffled into their own order");
        assert_eq!(r.bytes(13).len(), 13);
        assert!([1, 2, 3].contains(&r.choose(&[1, 2, 3])));
    }

    #[test]
    fn parses_decimal_and_hex() {
        assert_eq!(parse("123"), Ok(123));
        assert_eq!(parse(" 0xff "), Ok(255));
        assert!(parse("seed").is_err());
        assert!(parse("-1").is_err());
    }
}
