//! The device (NCCL) unique id carried by the master: master and peer state machines
//! driven together ([`super::pair::Pair`]), no runtime, every message asserted.

use super::master::{MasterConfig, Output};
use super::pair::Pair;
use super::peer::PeerConfig;
use super::protocol::{ToMaster, ToPeer};
use crate::error::Error;

fn id(b: u8) -> [u8; 128] {
    [b; 128]
}

fn relayed(epoch: u64, b: u8, grow: bool) -> ToPeer {
    ToPeer::DeviceId { epoch, generation: 0, id: id(b), grow }
}

#[test]
fn the_first_id_of_an_epoch_goes_to_every_member_and_a_second_gets_the_first_back() {
    let mut p = Pair::group(3, PeerConfig::default());
    for i in 0..3 {
        p.take_inbox(i);
        assert!(p.peers[i].device_id(1).is_none(), "no id yet: the caller waits");
    }
    let out = p.send(1, ToMaster::DeviceId { epoch: 1, generation: 0, id: id(7), grow: true });
    let all: Vec<Output> = (0..3).map(|i| Output::Send(Pair::conn(i), relayed(1, 7, true))).collect();
    assert_eq!(out, all);
    for i in 0..3 {
        assert_eq!(p.peers[i].device_id(1), Some(Ok((id(7), true))), "peer {i}");
    }
    // A second maker (or a member asking again) gets the first id, alone.
    let out = p.send(2, ToMaster::DeviceId { epoch: 1, generation: 0, id: id(9), grow: false });
    assert_eq!(out, vec![Output::Send(Pair::conn(2), relayed(1, 7, true))]);
    assert_eq!(p.peers[2].device_id(1), Some(Ok((id(7), true))));
}

#[test]
fn a_view_change_voids_the_old_epochs_id_and_its_waiters() {
    let mut p = Pair::group(3, PeerConfig::default());
    // Peer 0 waits for epoch 1's id; peer 2 dies before anyone offered one.
    p.disconnect(2);
    assert_eq!(p.peers[0].view().unwrap().epoch, 2);
    let waited = p.peers[0].device_id(1);
    assert!(matches!(waited, Some(Err(Error::Aborted { .. }))), "{waited:?}");
    // A late offer for the old epoch is dropped; the new epoch's goes to the survivors.
    assert_eq!(p.send(0, ToMaster::DeviceId { epoch: 1, generation: 0, id: id(1), grow: false }), vec![]);
    let out = p.send(0, ToMaster::DeviceId { epoch: 2, generation: 0, id: id(2), grow: false });
    assert_eq!(out, (0..2).map(|i| Output::Send(Pair::conn(i), relayed(2, 2, false))).collect::<Vec<_>>());
    assert_eq!(p.peers[1].device_id(2), Some(Ok((id(2), false))));
    // An offer for a future epoch is dropped too: the master relays the current one only.
    assert_eq!(p.send(1, ToMaster::DeviceId { epoch: 3, generation: 0, id: id(3), grow: false }), vec![]);
}

#[test]
fn a_pending_joiner_cannot_offer_and_a_stale_id_does_not_replace_a_newer_one() {
    let mut p = Pair::group(2, PeerConfig::default());
    let j = p.join(5, PeerConfig::default());
    assert_eq!(p.send(j, ToMaster::DeviceId { epoch: 1, generation: 0, id: id(5), grow: false }), vec![]);
    let out = p.send(0, ToMaster::DeviceId { epoch: 1, generation: 0, id: id(1), grow: false });
    assert_eq!(out.len(), 2, "the members only: {out:?}");
    // A delayed id of an older epoch arriving after a newer one is ignored.
    p.peers[0].handle(relayed(4, 4, false), p.now);
    p.peers[0].handle(relayed(3, 3, false), p.now);
    assert_eq!(p.peers[0].device_id(4), Some(Ok((id(4), false))));
}

#[test]
fn a_removed_peer_stops_waiting() {
    let mut p = Pair::group(2, PeerConfig::default());
    p.peers[1].disconnected("the master is gone".into());
    assert!(matches!(p.peers[1].device_id(1), Some(Err(Error::Removed { .. }))));
}

fn offered(epoch: u64, generation: u32, b: u8) -> ToMaster {
    ToMaster::DeviceId { epoch, generation, id: id(b), grow: false }
}

fn relayed_at(epoch: u64, generation: u32, b: u8) -> ToPeer {
    ToPeer::DeviceId { epoch, generation, id: id(b), grow: false }
}

#[test]
fn a_newer_generation_goes_to_every_member_and_an_older_offer_gets_it_back() {
    let mut p = Pair::group(3, PeerConfig::default());
    p.send(0, offered(1, 0, 1));
    // Peer 1 saw the communicator fail and asks for generation 1: the first offer wins.
    let out = p.send(1, offered(1, 1, 2));
    assert_eq!(out, (0..3).map(|i| Output::Send(Pair::conn(i), relayed_at(1, 1, 2))).collect::<Vec<_>>());
    // A second offer for it, and one for the generation before, get it back alone.
    assert_eq!(p.send(2, offered(1, 1, 3)), vec![Output::Send(Pair::conn(2), relayed_at(1, 1, 2))]);
    assert_eq!(p.send(2, offered(1, 0, 4)), vec![Output::Send(Pair::conn(2), relayed_at(1, 1, 2))]);
    for i in 0..3 {
        // A waiter for generation 0 or 1 gets the newest; nobody waits for 2 yet.
        assert_eq!(p.peers[i].device_id_at(1, 0), Some(Ok((1, id(2), false))), "peer {i}");
        assert_eq!(p.peers[i].device_relayed(1), Some((1, id(2), false)));
        assert!(p.peers[i].device_id_at(1, 2).is_none());
    }
    // A delayed id of the older generation does not replace the newer one.
    p.peers[0].handle(relayed_at(1, 0, 1), p.now);
    assert_eq!(p.peers[0].device_relayed(1), Some((1, id(2), false)));
    // Another epoch's offer is still dropped, whatever its generation.
    assert_eq!(p.send(0, offered(2, 5, 5)), vec![]);
}

fn rejoining() -> PeerConfig {
    PeerConfig { rejoin_within: Some(std::time::Duration::from_secs(10)), ..PeerConfig::default() }
}

/// The device ids the master sent in `out`, by connection.
fn device_ids(out: &[Output]) -> Vec<(u64, ToPeer)> {
    out.iter()
        .filter_map(|o| match o {
            Output::Send(c, m @ ToPeer::DeviceId { .. }) => Some((*c, m.clone())),
            _ => None,
        })
        .collect()
}

/// The old master relayed generation 1's id X to peers 0 and 1 and died before it
/// reached peer 2, which had offered its own Y: the new master, which has no id, relays
/// X (held, so maybe in use) to all, not Y (only offered), whatever order they rejoin in.
#[test]
fn a_master_that_takes_over_relays_the_id_members_hold_to_all() {
    let mut p = Pair::group(3, rejoining());
    p.send(0, offered(1, 0, 1));
    for i in 0..2 {
        p.peers[i].handle(relayed_at(1, 1, 0xa), p.now);
    }
    let lost = p.peers[2].offer_device_id(1, 1, id(0xb), false);
    assert_eq!(lost, offered(1, 1, 0xb));
    p.replace_master(MasterConfig::default());
    assert!(p.rejoin(2).is_empty());
    assert!(p.rejoin(0).is_empty());
    let out = p.rejoin(1);
    // The view (epoch 2, the members unchanged), then the id, as generation 0 of epoch 2.
    let expect: Vec<(u64, ToPeer)> = (0..3).map(|i| (Pair::conn(i), relayed_at(2, 0, 0xa))).collect();
    assert_eq!(device_ids(&out), expect);
    let view_at = out.iter().position(|o| matches!(o, Output::Send(_, ToPeer::View { .. }))).unwrap();
    let id_at = out.iter().position(|o| matches!(o, Output::Send(_, ToPeer::DeviceId { .. }))).unwrap();
    assert!(view_at < id_at, "the view goes first: {out:?}");
    for i in 0..3 {
        assert_eq!(p.peers[i].view().unwrap().epoch, 2);
        assert_eq!(p.peers[i].device_id_at(2, 0), Some(Ok((0, id(0xa), false))), "peer {i}");
    }
    // A member's own offer for the new epoch gets the adopted id back.
    assert_eq!(p.send(0, offered(2, 0, 0xc)), vec![Output::Send(Pair::conn(0), relayed_at(2, 0, 0xa))]);
}

#[test]
fn an_offered_id_is_adopted_when_none_was_relayed_and_nothing_when_the_view_changes() {
    // Only the maker's offer existed (the old master died with it): it is adopted.
    let mut p = Pair::group(3, rejoining());
    let _ = p.peers[0].offer_device_id(1, 0, id(3), true);
    p.replace_master(MasterConfig::default());
    let out: Vec<Output> = (0..3).flat_map(|i| p.rejoin(i)).collect();
    let expect: Vec<(u64, ToPeer)> = (0..3).map(|i| (Pair::conn(i), relayed(2, 3, true))).collect();
    assert_eq!(device_ids(&out), expect);

    // Nobody held an id: the new epoch's maker makes one as usual.
    let mut p = Pair::group(2, rejoining());
    p.replace_master(MasterConfig::default());
    let out: Vec<Output> = (0..2).flat_map(|i| p.rejoin(i)).collect();
    assert_eq!(device_ids(&out), vec![]);

    // A member did not come back: the old view's communicator cannot complete, the new
    // view (without it) needs its own id.
    let mut p = Pair::group(3, rejoining());
    p.send(0, offered(1, 0, 1));
    p.replace_master(MasterConfig::default());
    p.rejoin(0);
    p.now += MasterConfig::default().takeover_grace * 3;
    p.send(0, ToMaster::Heartbeat);
    p.advance(std::time::Duration::ZERO);
    let out = p.rejoin(1);
    assert!(out.iter().any(|o| matches!(o, Output::Send(_, ToPeer::View { .. }))), "{out:?}");
    assert_eq!(device_ids(&out), vec![]);
    assert_eq!(p.peers[0].view().unwrap().members.len(), 2);
    assert!(p.peers[0].device_relayed(2).is_none());
}
