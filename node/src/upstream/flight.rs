//! One upstream fetch per artifact, shared by every concurrent requester while the bytes
//! arrive.
//!
//! ```text
//!   request ─▶ Flights::join(key) ──first──▶ leader task (spawned: outlives any request)
//!      │             │                          GET upstream ─▶ chunk ─▶ Flight::push
//!      │             └──already in flight──┐                   ...     ─▶ Flight::finish(Ok|Err)
//!      ▼                                   ▼
//!   Flight::wait_started ─▶ Flight::body(): chunks 0.. as they are pushed; the stream
//!                                          ends only after finish(Ok) (verified bytes)
//! ```
//!
//! A requester joining late replays the chunks already received from memory, then
//! follows the live ones, so it never waits for the whole artifact. The stream's end is
//! held back until the leader has checked the digests: a corrupted upstream body never
//! reaches a client as a complete response (its body fails instead).

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use granary_format::Body;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use tokio::sync::watch;

/// What the leader learned before the bytes: the upstream's answer.
#[derive(Debug, Clone)]
pub(crate) enum Started {
    /// 200: the size, if the upstream sent one.
    Ok(Option<u64>),
    /// Another HTTP status (the body is not kept).
    Status(u16),
    /// Anything else: why.
    Failed(String),
}

#[derive(Default)]
struct State {
    started: Option<Started>,
    chunks: Vec<Bytes>,
    end: Option<Result<(), String>>,
}

/// One artifact being fetched.
pub(crate) struct Flight {
    state: Mutex<State>,
    /// Bumped after every change of `state`.
    progress: watch::Sender<u64>,
    /// Repositories whose requests joined: the version is retained in each.
    requested: Mutex<BTreeSet<String>>,
}

impl Flight {
    fn new() -> Self {
        Flight {
            state: Mutex::new(State::default()),
            progress: watch::channel(0).0,
            requested: Mutex::new(BTreeSet::new()),
        }
    }

    fn update(&self, f: impl FnOnce(&mut State)) {
        f(&mut self.state.lock().expect("flight lock"));
        self.progress.send_modify(|n| *n += 1);
    }

    /// The leader got the upstream's answer.
    pub(crate) fn start(&self, started: Started) {
        self.update(|s| s.started = Some(started));
    }

    /// The leader received a chunk.
    pub(crate) fn push(&self, chunk: Bytes) {
        self.update(|s| s.chunks.push(chunk));
    }

    /// The leader is done: `Ok` once the bytes are verified.
    pub(crate) fn finish(&self, end: Result<(), String>) {
        self.update(|s| {
            if s.started.is_none() {
                s.started = Some(Started::Failed(
                    end.clone().err().unwrap_or_else(|| "no answer".to_owned()),
                ));
            }
            s.end = Some(end);
        });
    }

    /// Notes a repository that asked for the artifact.
    pub(crate) fn requested_by(&self, repository: &str) {
        self.requested
            .lock()
            .expect("flight lock")
            .insert(repository.to_owned());
    }

    /// Repositories that asked for it.
    pub(crate) fn requesters(&self) -> Vec<String> {
        self.requested
            .lock()
            .expect("flight lock")
            .iter()
            .cloned()
            .collect()
    }

    /// Waits for the upstream's answer.
    pub(crate) async fn wait_started(&self) -> Started {
        let mut rx = self.progress.subscribe();
        loop {
            if let Some(s) = &self.state.lock().expect("flight lock").started {
                return s.clone();
            }
            if rx.changed().await.is_err() {
                return Started::Failed("fetch abandoned".to_owned());
            }
        }
    }

    /// The artifact's bytes from the first, following the fetch as it goes.
    pub(crate) fn body(self: &Arc<Self>) -> Body {
        let rx = self.progress.subscribe();
        // `next` is the index of the chunk to send; `None` once an error was reported.
        let stream = futures::stream::unfold(
            (self.clone(), rx, Some(0usize)),
            |(flight, mut rx, next)| async move {
                let next = next?;
                loop {
                    let step = {
                        let s = flight.state.lock().expect("flight lock");
                        // The last chunk waits for the end: a client that knows the
                        // length would take a complete body as a good one, so a body
                        // that fails its check must never be complete.
                        let ended = matches!(s.end, Some(Ok(())));
                        match (s.chunks.get(next), &s.end) {
                            (Some(chunk), _) if ended || next + 1 < s.chunks.len() => {
                                Some(Ok(chunk.clone()))
                            }
                            (_, Some(Err(e))) => Some(Err(e.clone())),
                            (None, Some(Ok(()))) => return None,
                            _ => None,
                        }
                    };
                    match step {
                        Some(Ok(chunk)) => {
                            return Some((Ok(Frame::data(chunk)), (flight, rx, Some(next + 1))));
                        }
                        Some(Err(e)) => {
                            let err: granary_format::body::BodyError =
                                format!("upstream fetch failed: {e}").into();
                            return Some((Err(err), (flight, rx, None)));
                        }
                        None => {
                            if rx.changed().await.is_err() {
                                return None;
                            }
                        }
                    }
                }
            },
        );
        StreamBody::new(stream).boxed_unsync()
    }
}

/// The artifacts in flight on this node.
#[derive(Default)]
pub(crate) struct Flights {
    map: Mutex<HashMap<String, Arc<Flight>>>,
}

impl Flights {
    /// The flight for `key`, and whether the caller created it (and must lead it).
    pub(crate) fn join(&self, key: &str) -> (Arc<Flight>, bool) {
        let mut map = self.map.lock().expect("flights lock");
        if let Some(f) = map.get(key) {
            return (f.clone(), false);
        }
        let f = Arc::new(Flight::new());
        map.insert(key.to_owned(), f.clone());
        (f, true)
    }

    /// Forgets a finished flight: later requests find the stored artifact instead.
    pub(crate) fn remove(&self, key: &str) {
        self.map.lock().expect("flights lock").remove(key);
    }

    /// Forgets a flight that ended well after `grace`: a requester that decided to
    /// fetch just before the artifact became available otherwise (stored, retained,
    /// cached) replays it from memory instead of asking the upstream again.
    pub(crate) fn remove_after(self: &Arc<Self>, key: &str, flight: &Arc<Flight>, grace: Duration) {
        let this = self.clone();
        let key = key.to_owned();
        let flight = Arc::downgrade(flight);
        tokio::spawn(async move {
            tokio::time::sleep(grace).await;
            let mut map = this.map.lock().expect("flights lock");
            if map
                .get(&key)
                .is_some_and(|f| flight.upgrade().is_some_and(|mine| Arc::ptr_eq(f, &mine)))
            {
                map.remove(&key);
            }
        });
    }

    /// Forgets a flight that has ended (its bytes were refused by the asker, so a new
    /// request must go to the upstream again); one still running is kept.
    pub(crate) fn forget_ended(&self, key: &str) {
        let mut map = self.map.lock().expect("flights lock");
        if map
            .get(key)
            .is_some_and(|f| f.state.lock().expect("flight lock").end.is_some())
        {
            map.remove(key);
        }
    }

    /// Flights kept (tests).
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.map.lock().expect("flights lock").len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn collect(body: Body) -> Result<Vec<u8>, String> {
        let mut body = body;
        let mut out = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| e.to_string())?;
            if let Ok(d) = frame.into_data() {
                out.extend_from_slice(&d);
            }
        }
        Ok(out)
    }

    #[tokio::test]
    async fn joiners_share_one_flight_and_see_every_byte() {
        let flights = Flights::default();
        let (f, lead) = flights.join("k");
        assert!(lead);
        let (g, lead2) = flights.join("k");
        assert!(!lead2 && Arc::ptr_eq(&f, &g));
        let early = tokio::spawn(collect(f.body()));
        f.start(Started::Ok(Some(6)));
        f.push(Bytes::from_static(b"abc"));
        // A late joiner replays what arrived, then follows.
        let late = tokio::spawn(collect(g.body()));
        tokio::task::yield_now().await;
        f.push(Bytes::from_static(b"def"));
        f.finish(Ok(()));
        assert_eq!(early.await.unwrap().unwrap(), b"abcdef");
        assert_eq!(late.await.unwrap().unwrap(), b"abcdef");
        assert!(matches!(g.wait_started().await, Started::Ok(Some(6))));
        flights.remove("k");
        assert_eq!(flights.len(), 0);
    }

    #[tokio::test]
    async fn the_last_chunk_waits_for_the_check() {
        let flights = Flights::default();
        let (f, _) = flights.join("k");
        f.start(Started::Ok(Some(6)));
        f.push(Bytes::from_static(b"abc"));
        f.push(Bytes::from_static(b"def"));
        let mut body = f.body();
        let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(&first[..], b"abc");
        let pending = tokio::time::timeout(Duration::from_millis(50), body.frame()).await;
        assert!(
            pending.is_err(),
            "the last chunk is held until the bytes are checked"
        );
        f.finish(Ok(()));
        let last = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(&last[..], b"def");
        assert!(body.frame().await.is_none());
    }

    #[tokio::test]
    async fn a_failed_check_fails_the_stream_instead_of_ending_it() {
        let flights = Flights::default();
        let (f, _) = flights.join("k");
        f.start(Started::Ok(Some(3)));
        f.push(Bytes::from_static(b"abc"));
        let reader = tokio::spawn(collect(f.body()));
        f.finish(Err("checksum mismatch".into()));
        let err = reader.await.unwrap().unwrap_err();
        assert!(err.contains("checksum mismatch"), "{err}");
    }

    #[tokio::test]
    async fn a_refused_fetch_reports_why() {
        let flights = Flights::default();
        let (f, _) = flights.join("k");
        f.finish(Err("upstream answered 500".into()));
        match f.wait_started().await {
            Started::Failed(why) => assert!(why.contains("500")),
            other => panic!("{other:?}"),
        }
    }
}
