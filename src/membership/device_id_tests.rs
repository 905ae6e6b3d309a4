//! The device (NCCL) unique id carried by the master: master and peer state machines
//! driven together ([`super::pair::Pair`]), no runtime, every message asserted.

use super::master::Output;
use super::pair::Pair;
use super::peer::PeerConfig;
use super::protocol::{ToMaster, ToPeer};
use crate::error::Error;

fn id(b: u8) -> [u8; 128] {
    [b; 128]
}

fn relayed(epoch: u64, b: u8, grow: bool) -> ToPeer {
    ToPeer::DeviceId { epoch, id: id(b), grow }
}

#[test]
fn the_first_id_of_an_epoch_goes_to_every_member_and_a_second_gets_the_first_back() {
    let mut p = Pair::group(3, PeerConfig::default());
    for i in 0..3 {
        p.take_inbox(i);
        assert!(p.peers[i].device_id(1).is_none(), "no id yet: the caller waits");
    }
    let out = p.send(1, ToMaster::DeviceId { epoch: 1, id: id(7), grow: true });
    let all: Vec<Output> = (0..3).map(|i| Output::Send(Pair::conn(i), relayed(1, 7, true))).collect();
    assert_eq!(out, all);
    for i in 0..3 {
        assert_eq!(p.peers[i].device_id(1), Some(Ok((id(7), true))), "peer {i}");
    }
    // A second maker (or a member asking again) gets the first id, alone.
    let out = p.send(2, ToMaster::DeviceId { epoch: 1, id: id(9), grow: false });
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
    assert_eq!(p.send(0, ToMaster::DeviceId { epoch: 1, id: id(1), grow: false }), vec![]);
    let out = p.send(0, ToMaster::DeviceId { epoch: 2, id: id(2), grow: false });
    assert_eq!(out, (0..2).map(|i| Output::Send(Pair::conn(i), relayed(2, 2, false))).collect::<Vec<_>>());
    assert_eq!(p.peers[1].device_id(2), Some(Ok((id(2), false))));
    // An offer for a future epoch is dropped too: the master relays the current one only.
    assert_eq!(p.send(1, ToMaster::DeviceId { epoch: 3, id: id(3), grow: false }), vec![]);
}

#[test]
fn a_pending_joiner_cannot_offer_and_a_stale_id_does_not_replace_a_newer_one() {
    let mut p = Pair::group(2, PeerConfig::default());
    let j = p.join(5, PeerConfig::default());
    assert_eq!(p.send(j, ToMaster::DeviceId { epoch: 1, id: id(5), grow: false }), vec![]);
    let out = p.send(0, ToMaster::DeviceId { epoch: 1, id: id(1), grow: false });
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
