//! Planning a shared-state sync: whose content wins and who sends it to whom.

use std::collections::BTreeMap;

use crate::membership::protocol::Transfer;
use crate::state::{Digest, SyncStrategy, TensorDigest};

/// The agreed `(revision, digest)` of each tensor, and the transfers that spread it.
pub type PlannedSync = (Vec<(u64, Digest)>, Vec<Transfer>);

/// Chooses each tensor's content and who sends it to whom. `requests` are in rank order.
///
/// Candidates are the send-only members if there are any, else every member that is not
/// receive-only. Of the candidates' contents, those at the highest revision compete, and
/// the one most of them hold wins (ties: the lowest rank's), so newcomers still at
/// revision 0 never outvote a group that has trained. Members holding other content
/// receive it from the holders in turn.
pub fn sync_plan(requests: &[(SyncStrategy, &[TensorDigest])]) -> Result<PlannedSync, String> {
    let Some((_, first)) = requests.first() else {
        return Ok((Vec::new(), Vec::new()));
    };
    let any_send_only = requests.iter().any(|(s, _)| *s == SyncStrategy::SendOnly);
    let is_candidate =
        |s: SyncStrategy| if any_send_only { s == SyncStrategy::SendOnly } else { s != SyncStrategy::ReceiveOnly };
    let mut agreed = Vec::with_capacity(first.len());
    let mut transfers = Vec::new();
    for (t, tensor) in first.iter().enumerate() {
        let content = |r: usize| (requests[r].1[t].revision, requests[r].1[t].digest);
        let mut votes: BTreeMap<(u64, Digest), (usize, usize)> = BTreeMap::new(); // content -> (count, first rank)
        for (r, (s, _)) in requests.iter().enumerate() {
            if is_candidate(*s) {
                let v = votes.entry(content(r)).or_insert((0, r));
                v.0 += 1;
            }
        }
        if any_send_only && votes.len() > 1 {
            return Err(format!("send-only members hold different contents of tensor '{}'", tensor.name));
        }
        let top = votes.keys().map(|c| c.0).max();
        let Some((&chosen, _)) = votes
            .iter()
            .filter(|(c, _)| Some(c.0) == top)
            .max_by(|(_, (na, ra)), (_, (nb, rb))| na.cmp(nb).then(rb.cmp(ra)))
        else {
            return Err(format!("no member offers tensor '{}' (all are receive-only)", tensor.name));
        };
        let holders: Vec<usize> = (0..requests.len()).filter(|&r| content(r) == chosen).collect();
        let receivers = (0..requests.len()).filter(|&r| content(r) != chosen);
        for (i, to) in receivers.enumerate() {
            let from = holders[i % holders.len()];
            transfers.push(Transfer { tensor: t as u32, from: from as u32, to: to as u32 });
        }
        agreed.push(chosen);
    }
    Ok((agreed, transfers))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn td(name: &str, rev: u64, d: u8) -> TensorDigest {
        TensorDigest { name: name.into(), revision: rev, digest: [d; 32] }
    }

    #[test]
    fn sync_plan_enforces_the_popular_content() {
        let a = [td("w", 3, 1)];
        let b = [td("w", 3, 2)];
        let z = [td("w", 0, 0)];
        let reqs = [
            (SyncStrategy::EnforcePopular, &a[..]),
            (SyncStrategy::EnforcePopular, &b[..]),
            (SyncStrategy::EnforcePopular, &a[..]),
            (SyncStrategy::ReceiveOnly, &z[..]),
        ];
        let (agreed, transfers) = sync_plan(&reqs).expect("plan");
        assert_eq!(agreed, vec![(3, [1; 32])]);
        assert_eq!(transfers, vec![Transfer { tensor: 0, from: 0, to: 1 }, Transfer { tensor: 0, from: 2, to: 3 }]);
    }

    #[test]
    fn sync_plan_prefers_the_highest_revision_over_numbers() {
        let trained = [td("w", 5, 1)];
        let fresh = [td("w", 0, 0)];
        let reqs = [
            (SyncStrategy::EnforcePopular, &trained[..]),
            (SyncStrategy::EnforcePopular, &fresh[..]),
            (SyncStrategy::EnforcePopular, &fresh[..]),
        ];
        let (agreed, transfers) = sync_plan(&reqs).expect("plan");
        assert_eq!(agreed, vec![(5, [1; 32])]);
        assert_eq!(transfers.len(), 2);
    }

    #[test]
    fn sync_plan_send_only_wins_and_must_agree() {
        let a = [td("w", 1, 1)];
        let b = [td("w", 9, 2)];
        let reqs = [
            (SyncStrategy::EnforcePopular, &b[..]),
            (SyncStrategy::EnforcePopular, &b[..]),
            (SyncStrategy::SendOnly, &a[..]),
        ];
        let (agreed, transfers) = sync_plan(&reqs).expect("plan");
        assert_eq!(agreed, vec![(1, [1; 32])]);
        assert_eq!(transfers.len(), 2);
        let reqs = [(SyncStrategy::SendOnly, &b[..]), (SyncStrategy::SendOnly, &a[..])];
        assert!(sync_plan(&reqs).is_err());
        let reqs = [(SyncStrategy::ReceiveOnly, &b[..])];
        assert!(sync_plan(&reqs).is_err());
    }
}
