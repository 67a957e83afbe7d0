//! When something last happened, marked and read from any thread without a lock: the last
//! AppendEntries accepted from a leader (the election gate), the last client request (a
//! draining node's wait for clients to stop).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// The last time [`LastSeen::mark`] was called.
pub(crate) struct LastSeen {
    origin: Instant,
    /// Milliseconds after `origin`, plus one (0: never).
    at: AtomicU64,
}

impl Default for LastSeen {
    fn default() -> Self {
        LastSeen {
            origin: Instant::now(),
            at: AtomicU64::new(0),
        }
    }
}

impl LastSeen {
    /// It happened just now.
    pub(crate) fn mark(&self) {
        let ms = self.origin.elapsed().as_millis() as u64 + 1;
        self.at.fetch_max(ms, Ordering::Relaxed);
    }

    /// When it last happened (`None`: never), to the millisecond.
    pub(crate) fn at(&self) -> Option<Instant> {
        match self.at.load(Ordering::Relaxed) {
            0 => None,
            at => Some(self.origin + Duration::from_millis(at - 1)),
        }
    }

    /// How long ago it last happened (`None`: never).
    pub(crate) fn since(&self) -> Option<Duration> {
        self.at().map(|at| at.elapsed())
    }
}
