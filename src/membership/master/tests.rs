//! Unit tests of the master state machine (the tally has its own, using `group`).
use super::*;
use crate::membership::protocol::Decision;

fn addr(i: u64) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 7000 + i as u16))
}

/// A master with members 1..=n joined through update_topology; conn i is peer i.
pub(super) fn group(n: u64) -> (MasterState, Instant) {
    group_with(n, MasterConfig::default())
}

fn group_with(n: u64, config: MasterConfig) -> (MasterState, Instant) {
    let mut m = MasterState::new(config);
    let now = Instant::now();
    for i in 1..=n {
        m.handle(i, ToMaster::Join { id: i, data_addr: addr(i) }, now);
    }
    m.handle(1, ToMaster::UpdateTopology { epoch: 1 }, now);
    assert_eq!(m.view().size(), n as usize);
    (m, now)
}

pub(super) fn outcomes(out: &[Output]) -> Vec<(ConnId, Decision)> {
    out.iter()
        .filter_map(|o| match o {
            Output::Send(c, ToPeer::Outcome { decision, .. }) => Some((*c, decision.clone())),
            _ => None,
        })
        .collect()
}

#[test]
fn joiners_wait_for_every_member() {
    let (mut m, now) = group(2);
    let epoch = m.view().epoch;
    let out = m.handle(3, ToMaster::Join { id: 3, data_addr: addr(3) }, now);
    assert!(out.contains(&Output::Send(3, ToPeer::Pending)));
    assert!(out.contains(&Output::Send(1, ToPeer::PendingJoiners { count: 1 })));
    assert!(m.handle(1, ToMaster::UpdateTopology { epoch }, now).is_empty());
    let out = m.handle(2, ToMaster::UpdateTopology { epoch }, now);
    assert_eq!(m.view().size(), 3);
    assert_eq!(m.view().epoch, epoch + 1);
    let views = out.iter().filter(|o| matches!(o, Output::Send(_, ToPeer::View { .. }))).count();
    assert_eq!(views, 3, "old members and the joiner all learn the view");
}

/// A member that most others lost their links to is removed although it still
/// heartbeats (a split group); one report of two others is not enough.
#[test]
fn a_member_most_others_cannot_reach_is_removed() {
    let (mut m, now) = group(3);
    let lost = |rank| OpResult::Lost { rank, detail: "idle timeout".into() };
    let epoch = m.view().epoch;
    for conn in 1..=3 {
        m.handle(conn, ToMaster::OpBegin { epoch, seq: 1, call: 5 }, now);
    }
    m.handle(1, ToMaster::OpEnd { epoch, seq: 1, result: lost(2) }, now);
    assert_eq!(m.view().size(), 3, "one of two others is no majority");
    // Peer 3 itself suspects peer 2: that does not count against peer 3.
    m.handle(3, ToMaster::OpEnd { epoch, seq: 1, result: lost(1) }, now);
    assert_eq!(m.view().size(), 3);
    let out = m.handle(2, ToMaster::OpEnd { epoch, seq: 1, result: lost(2) }, now);
    assert_eq!(m.view().members.iter().map(|p| p.id).collect::<Vec<_>>(), vec![1, 2]);
    assert!(
        out.iter().any(|o| matches!(o, Output::Close(3, why) if why.contains("unreachable from 2 of the 2"))),
        "{out:?}"
    );
    // In a group of two one report is a majority: the reporter stays.
    let (mut m, now) = group(2);
    let epoch = m.view().epoch;
    m.handle(1, ToMaster::OpBegin { epoch, seq: 1, call: 5 }, now);
    m.handle(1, ToMaster::OpEnd { epoch, seq: 1, result: lost(1) }, now);
    assert_eq!(m.view().members.iter().map(|p| p.id).collect::<Vec<_>>(), vec![1], "of two, the reporter stays");
}

#[test]
fn silence_past_the_timeout_removes() {
    let (mut m, now) = group(2);
    let timeout = MasterConfig::default().peer_timeout;
    let almost = timeout - Duration::from_millis(100);
    m.handle(1, ToMaster::Heartbeat, now + almost);
    assert!(m.tick(now + almost).is_empty());
    // Woken exactly at the deadline, the master must act (or its driver would spin).
    assert_eq!(m.next_deadline(), Some(now + timeout));
    let out = m.tick(now + timeout);
    assert_eq!(m.view().members.iter().map(|p| p.id).collect::<Vec<_>>(), vec![1]);
    assert!(out.iter().any(|o| matches!(o, Output::Close(2, _))));
}

/// A peer whose heartbeats have been coming late now and then is given a longer
/// timeout than one whose heartbeats come like clockwork: the same 1.2 s silence
/// removes the steady one and not the jittery one, which is removed once it passes
/// its own, adapted timeout (below the ceiling).
#[test]
fn irregular_heartbeats_stretch_a_peers_timeout_up_to_the_ceiling() {
    let config = MasterConfig { max_peer_timeout: Duration::from_millis(3000), ..MasterConfig::default() };
    let (mut m, mut now) = group_with(2, config);
    for i in 0..80 {
        now += Duration::from_millis(150);
        m.handle(1, ToMaster::Heartbeat, now);
        if i % 5 < 2 {
            m.handle(2, ToMaster::Heartbeat, now); // peer 2: gaps of 150 and 600 ms
        }
    }
    let silent = now + Duration::from_millis(1200);
    assert!(m.next_deadline().is_some_and(|d| d <= now + config.peer_timeout), "peer 1 keeps the floor");
    let out = m.tick(silent);
    assert_eq!(m.view().members.iter().map(|p| p.id).collect::<Vec<_>>(), vec![2], "{out:?}");
    let deadline = m.next_deadline().expect("peer 2's deadline");
    assert!(deadline > silent && deadline <= now + config.max_peer_timeout, "{:?}", deadline - now);
    m.tick(deadline);
    assert!(m.view().members.is_empty(), "removed at its own timeout");
}

#[test]
fn a_loss_during_a_topology_round_ends_it_for_the_rest() {
    let (mut m, now) = group(3);
    let e = m.view().epoch;
    m.handle(1, ToMaster::UpdateTopology { epoch: e }, now);
    m.handle(2, ToMaster::UpdateTopology { epoch: e }, now);
    let out = m.disconnected(3);
    let done: Vec<ConnId> = out
        .iter()
        .filter_map(|o| match o {
            Output::Send(c, ToPeer::TopologyDone { .. }) => Some(*c),
            _ => None,
        })
        .collect();
    assert_eq!(done, vec![1, 2]);
}

#[test]
fn duplicate_ids_and_silent_strangers_are_refused() {
    let (mut m, now) = group(1);
    let out = m.handle(9, ToMaster::Join { id: 1, data_addr: addr(1) }, now);
    assert!(matches!(&out[..], [Output::Close(9, _)]));
    let out = m.handle(10, ToMaster::Heartbeat, now);
    assert!(matches!(&out[..], [Output::Close(10, _)]));
    assert_eq!(m.view().size(), 1);
}
