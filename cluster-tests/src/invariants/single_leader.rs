//! At most one leader per term: from every [`Snapshot`] read during the test (by the
//! harness's waits and by [`Cluster::observe`]), no two nodes ever named different
//! leaders for the same term.
//!
//! [`Cluster::observe`]: crate::cluster::Cluster::observe

use std::collections::{BTreeMap, BTreeSet};

use crate::cluster::Snapshot;

/// Terms for which more than one leader was reported, with who said what.
pub fn violations(snapshots: &[Snapshot]) -> Vec<String> {
    let mut by_term: BTreeMap<u64, BTreeMap<u64, BTreeSet<u64>>> = BTreeMap::new();
    for s in snapshots {
        if let Some(leader) = s.status.leader_id {
            by_term
                .entry(s.status.term)
                .or_default()
                .entry(leader)
                .or_default()
                .insert(s.from);
        }
    }
    by_term
        .into_iter()
        .filter(|(_, leaders)| leaders.len() > 1)
        .map(|(term, leaders)| {
            let who: Vec<String> = leaders
                .iter()
                .map(|(l, from)| format!("leader {l} according to nodes {from:?}"))
                .collect();
            format!("term {term}: {}", who.join("; "))
        })
        .collect()
}

/// Panics if any term had two leaders, or if no snapshot named a leader at all (the
/// check would be vacuous).
pub fn check(snapshots: &[Snapshot]) {
    assert!(
        snapshots.iter().any(|s| s.status.leader_id.is_some()),
        "single leader: no status snapshot named a leader ({} snapshots)",
        snapshots.len()
    );
    super::report("one leader per term", &violations(snapshots));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::ClusterStatus;

    fn snap(from: u64, term: u64, leader: Option<u64>) -> Snapshot {
        Snapshot {
            at_ms: 0,
            from,
            status: ClusterStatus {
                leader_id: leader,
                term,
                members: vec![],
                node_id: from,
                applied_index: 0,
            },
        }
    }

    #[test]
    fn one_leader_per_term_passes() {
        let s = [
            snap(1, 1, Some(1)),
            snap(2, 1, Some(1)),
            snap(3, 2, None),
            snap(2, 2, Some(2)),
            snap(3, 2, Some(2)),
        ];
        assert!(violations(&s).is_empty());
        check(&s);
    }

    #[test]
    fn two_leaders_in_a_term_are_reported() {
        let s = [
            snap(1, 3, Some(1)),
            snap(2, 3, Some(2)),
            snap(3, 3, Some(1)),
        ];
        let v = violations(&s);
        assert_eq!(v.len(), 1, "{v:?}");
        assert!(v[0].contains("term 3"), "{v:?}");
        assert!(v[0].contains("leader 2 according to nodes {2}"), "{v:?}");
    }

    #[test]
    #[should_panic(expected = "no status snapshot named a leader")]
    fn no_snapshots_is_not_a_pass() {
        check(&[snap(1, 1, None)]);
    }
}
