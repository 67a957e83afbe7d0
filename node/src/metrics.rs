//! Counters (and a few gauges) served at `/metrics` in the Prometheus text format.
//!
//! A counter is a name plus a label set; both are fixed strings chosen by the code that
//! counts (never client input beyond domain, repository and format names, which the
//! request path has already validated). Counting takes one short lock: the map is small
//! and increments are rare compared with the work they count.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;

/// The node's counters, and gauges: values set, not added to.
#[derive(Default)]
pub(crate) struct Metrics {
    counters: Mutex<BTreeMap<(&'static str, String), u64>>,
    gauges: Mutex<BTreeMap<&'static str, u64>>,
}

/// Small blobs pushed to peers, by the transport that took them (`http1`, `grpc`).
pub(crate) const PUSHES: &str = "granary_peer_blob_pushes_total";

/// Answered peer calls, by call and transport (`http1`, `grpc`).
pub(crate) const CALLS: &str = "granary_peer_calls_total";

/// Blobs this node started pulling from a peer (background or on demand), by transport.
pub(crate) const PULLS: &str = "granary_peer_blob_pulls_total";

/// Read index rounds this node confirmed as the leader, by how (`lease`, `heartbeats`).
pub(crate) const LEADER_READS: &str = "granary_leader_read_index_total";

/// Writes on the package endpoints answered 503 because this node was at its limit of
/// writes at once (`max_concurrent_writes`) for `write_queue_ms`, by format.
pub(crate) const WRITES_TURNED_AWAY: &str = "granary_writes_turned_away_total";

/// Blobs the collector removed from this node (no package version referred to them).
pub(crate) const BLOBS_COLLECTED: &str = "granary_blobs_collected_total";

/// Blob segment files the collector deleted after moving their live blobs out.
pub(crate) const SEGMENTS_COMPACTED: &str = "granary_blob_segments_compacted_total";

/// Live blobs the collector wrote again elsewhere to empty a segment file.
pub(crate) const BLOBS_MOVED: &str = "granary_blobs_moved_total";

/// Bytes of the blob segment files the collector deleted.
pub(crate) const BLOB_BYTES_RECLAIMED: &str = "granary_blob_bytes_reclaimed_total";

/// Passes of the blob collector that completed.
pub(crate) const BLOB_GC_PASSES: &str = "granary_blob_gc_passes_total";

/// Milliseconds the blob collector's completed passes took, from start to end.
pub(crate) const BLOB_GC_MILLISECONDS: &str = "granary_blob_gc_milliseconds_total";

/// Gauge: blobs the collector's last pass found unreferenced and will remove at its
/// next unless a write uses them first.
pub(crate) const BLOB_GC_CANDIDATES: &str = "granary_blob_gc_candidates";

/// Gauge: blobs on this node, and their bytes, as the collector's last pass counted.
pub(crate) const BLOBS_STORED: &str = "granary_blobs_stored";
pub(crate) const BLOB_BYTES_STORED: &str = "granary_blob_bytes_stored";

/// Gauge: bytes of this node's blob segment files, read when `/metrics` is asked.
pub(crate) const BLOB_FILE_BYTES: &str = "granary_blob_file_bytes";

/// Gauge: 1 while this node's elections are held back (it reaches no majority of
/// voters; see `cluster::election_gate`).
pub(crate) const ELECTIONS_HELD_BACK: &str = "granary_raft_elections_held_back";

/// Gauge: 1 while this node knows it is cut off from a majority of voters and refuses
/// requests that need the leader at once (see `cluster::election_gate`).
pub(crate) const CUT_OFF: &str = "granary_raft_cut_off";

/// Rounds of status asks to the voters after a leader fell silent, by result.
pub(crate) const QUORUM_PROBES: &str = "granary_raft_quorum_probes_total";

/// Gauge: peers this node's Raft calls have failed to reach for a second or more (see
/// `raft::reachability`).
pub(crate) const PEERS_UNREACHABLE: &str = "granary_raft_peers_unreachable";

/// What each counter and gauge means, printed as `# HELP`.
const HELP: &[(&str, &str)] = &[
    (
        ELECTIONS_HELD_BACK,
        "1 while this node holds its elections back because it reaches no majority of voters (it could not win one, and raising its term would depose the leader when it is back).",
    ),
    (
        CUT_OFF,
        "1 while this node knows it is cut off from a majority of voters (a follower that hears no leader and reaches no majority; a leader no quorum has acknowledged for an election timeout past its lease; a follower of such a leader): writes and linearizable reads are refused at once with a retryable error.",
    ),
    (
        PEERS_UNREACHABLE,
        "Peers whose Raft calls from this node have got no answer for a second or more, none answered between (a leader calls every member; a follower calls none). Each is logged when lost, once a minute while down and when it answers again; a busy peer that misses a call and answers the next is not counted.",
    ),
    (
        QUORUM_PROBES,
        "Rounds of status asks to every voter, made while no leader was heard from: reached (a majority answered) or short.",
    ),
    (
        BLOBS_STORED,
        "Blobs (package files, each stored once) on this node, as the blob collector's last pass counted them.",
    ),
    (
        BLOB_BYTES_STORED,
        "Bytes of the blobs on this node, as the blob collector's last pass counted them; granary_blob_file_bytes less this is what compaction could give back, plus framing.",
    ),
    (
        BLOB_FILE_BYTES,
        "Bytes of this node's blob segment files on disk, dead space included.",
    ),
    (
        BLOB_GC_CANDIDATES,
        "Blobs the collector's last pass found unreferenced: the next pass removes those still unreferenced and unused by any write (kept across restarts).",
    ),
    (
        BLOBS_COLLECTED,
        "Blobs removed from this node by the collector: no package version referred to them for a whole blob_gc.interval_secs.",
    ),
    (
        SEGMENTS_COMPACTED,
        "Blob segment files deleted by the collector once their live blobs were written elsewhere.",
    ),
    (
        BLOBS_MOVED,
        "Live blobs the collector wrote again elsewhere to empty a mostly dead segment file.",
    ),
    (
        BLOB_BYTES_RECLAIMED,
        "Bytes of the blob segment files the collector deleted (given back to the file system once no reader holds them).",
    ),
    (
        BLOB_GC_PASSES,
        "Passes of the blob collector that completed.",
    ),
    (
        BLOB_GC_MILLISECONDS,
        "Milliseconds the blob collector's completed passes took, start to end (reading the state and the blob records, removing, compacting).",
    ),
    (
        WRITES_TURNED_AWAY,
        "Writes on the package endpoints answered 503 (Retry-After) because the node was at its limit of writes at once (max_concurrent_writes) for write_queue_ms, by format.",
    ),
    (
        LEADER_READS,
        "Read index rounds confirmed as the leader: by its lease (recent acks of a quorum, no round trip) or by a round of heartbeats.",
    ),
    (
        CALLS,
        "Answered calls to peers (propose, read_index, append_entries, vote), by transport (http1, or grpc for members from before the HTTP/1.1 routes or with peer TLS).",
    ),
    (
        PULLS,
        "Blob pulls from peers this node started (after apply, by anti-entropy or for a request), by transport; concurrent requests for one missing blob share one pull.",
    ),
    (
        PUSHES,
        "Small blobs pushed to peers, by the transport that took them (http1, or grpc for members from before the HTTP/1.1 route or with peer TLS).",
    ),
    (
        "granary_upstream_requests_total",
        "Requests sent to upstream registries (external connections), by kind and outcome.",
    ),
    (
        "granary_upstream_coalesced_total",
        "Requests for an upstream fetch already in flight, served by that fetch.",
    ),
    (
        "granary_upstream_cache_total",
        "Upstream metadata lookups by result: hit (fresh), stale (served stale), miss.",
    ),
    (
        "granary_upstream_stale_served_total",
        "Upstream documents served stale because the upstream failed or was being refreshed.",
    ),
    (
        "granary_upstream_rejected_total",
        "Upstream artifacts refused because their bytes did not match the published digests.",
    ),
    (
        "granary_upstream_retained_total",
        "Package versions kept in a repository after being served through its upstreams.",
    ),
];

impl Metrics {
    /// Adds `n` to the counter `name{labels}`; `labels` as `[("format", "npm"), …]`.
    pub(crate) fn add(&self, name: &'static str, labels: &[(&str, &str)], n: u64) {
        let mut text = String::new();
        for (i, (k, v)) in labels.iter().enumerate() {
            if i > 0 {
                text.push(',');
            }
            let _ = write!(text, "{k}=\"{}\"", escape(v));
        }
        let mut counters = self.counters.lock().expect("metrics lock");
        *counters.entry((name, text)).or_default() += n;
    }

    /// Sets the gauge `name` (no labels).
    pub(crate) fn set(&self, name: &'static str, value: u64) {
        self.gauges
            .lock()
            .expect("metrics lock")
            .insert(name, value);
    }

    /// The gauge `name`, if it was set.
    #[cfg(test)]
    pub(crate) fn gauge(&self, name: &'static str) -> Option<u64> {
        self.gauges.lock().expect("metrics lock").get(name).copied()
    }

    /// Adds one.
    pub(crate) fn inc(&self, name: &'static str, labels: &[(&str, &str)]) {
        self.add(name, labels, 1);
    }

    /// The current value of `name{labels}` (tests and the CLI).
    #[cfg(test)]
    pub(crate) fn get(&self, name: &'static str, labels: &[(&str, &str)]) -> u64 {
        let m = Metrics::default();
        m.inc(name, labels);
        let key = m
            .counters
            .lock()
            .expect("metrics lock")
            .keys()
            .next()
            .cloned();
        key.and_then(|k| self.counters.lock().expect("metrics lock").get(&k).copied())
            .unwrap_or(0)
    }

    /// Every counter, Prometheus text format 0.0.4.
    pub(crate) fn render(&self) -> String {
        let counters = self.counters.lock().expect("metrics lock");
        let mut out = String::new();
        let mut last: Option<&str> = None;
        for ((name, labels), value) in counters.iter() {
            if last != Some(name) {
                if let Some((_, help)) = HELP.iter().find(|(n, _)| n == name) {
                    let _ = writeln!(out, "# HELP {name} {help}");
                }
                let _ = writeln!(out, "# TYPE {name} counter");
                last = Some(name);
            }
            if labels.is_empty() {
                let _ = writeln!(out, "{name} {value}");
            } else {
                let _ = writeln!(out, "{name}{{{labels}}} {value}");
            }
        }
        for (name, value) in self.gauges.lock().expect("metrics lock").iter() {
            if let Some((_, help)) = HELP.iter().find(|(n, _)| n == name) {
                let _ = writeln!(out, "# HELP {name} {help}");
            }
            let _ = writeln!(out, "# TYPE {name} gauge");
            let _ = writeln!(out, "{name} {value}");
        }
        out
    }
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_render_as_prometheus_text() {
        let m = Metrics::default();
        m.inc(
            "granary_upstream_requests_total",
            &[("format", "npm"), ("outcome", "ok")],
        );
        m.add(
            "granary_upstream_requests_total",
            &[("format", "npm"), ("outcome", "ok")],
            2,
        );
        m.inc("granary_upstream_cache_total", &[("result", "a\"b")]);
        let text = m.render();
        assert!(
            text.contains("# TYPE granary_upstream_requests_total counter"),
            "{text}"
        );
        assert!(
            text.contains("granary_upstream_requests_total{format=\"npm\",outcome=\"ok\"} 3"),
            "{text}"
        );
        assert!(text.contains("result=\"a\\\"b\"} 1"), "{text}");
        assert_eq!(
            m.get(
                "granary_upstream_requests_total",
                &[("format", "npm"), ("outcome", "ok")]
            ),
            3
        );
        m.set(BLOB_GC_CANDIDATES, 4);
        m.set(BLOB_GC_CANDIDATES, 2);
        let text = m.render();
        assert!(
            text.contains(
                "# TYPE granary_blob_gc_candidates gauge\ngranary_blob_gc_candidates 2\n"
            ),
            "{text}"
        );
    }
}
