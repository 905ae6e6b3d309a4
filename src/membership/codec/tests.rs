//! The codec's tests: golden bytes, round trips, truncations, and decoders fuzzed
//! with random and mutated input.
use super::*;
use crate::membership::protocol::{
    AbortReason, Decision, HeldDeviceId, OpResult, Rejoin, Removal, ToMaster, ToPeer, Transfer,
};
use crate::membership::view::{Member, View};
use crate::state::{SyncStrategy, TensorDigest};
use proptest::prelude::*;

fn body(framed: &[u8]) -> &[u8] {
    let len = body_len([framed[0], framed[1], framed[2], framed[3]]).expect("length");
    assert_eq!(len, framed.len() - 4);
    &framed[4..]
}

fn samples_to_master() -> Vec<ToMaster> {
    vec![
        ToMaster::Join { id: 7, data_addr: "127.0.0.1:4000".parse().expect("addr") },
        ToMaster::Join { id: u64::MAX, data_addr: "[::1]:1".parse().expect("addr") },
        ToMaster::Heartbeat,
        ToMaster::UpdateTopology { epoch: 3 },
        ToMaster::OpBegin { epoch: 1, seq: 2, call: 3 },
        ToMaster::OpEnd { epoch: 1, seq: 2, result: OpResult::Ok },
        ToMaster::OpEnd { epoch: 1, seq: 2, result: OpResult::Mismatch("mismatch: é".into()) },
        ToMaster::OpEnd { epoch: 1, seq: 2, result: OpResult::Failed("x".into()) },
        ToMaster::SyncState {
            epoch: 1,
            seq: 9,
            strategy: SyncStrategy::SendOnly,
            tensors: vec![TensorDigest { name: "w".into(), revision: 4, digest: [9; 32] }],
        },
        ToMaster::Leave,
        ToMaster::SubOpBegin { epoch: 2, seq: 1 << 63 | 5, call: 11, members: vec![3, u64::MAX, 0] },
        ToMaster::SubOpBegin { epoch: 0, seq: 0, call: 0, members: vec![] },
    ]
}

fn samples_to_peer() -> Vec<ToPeer> {
    let view = View { epoch: 5, members: vec![Member { id: 1, addr: "127.0.0.1:9".parse().expect("addr") }] };
    vec![
        ToPeer::Pending,
        ToPeer::View { view, removed: vec![Removal { id: 2, rank: 1, detail: "timeout".into() }], term: 3 },
        ToPeer::Outcome { epoch: 1, seq: 1, decision: Decision::Commit },
        ToPeer::Outcome {
            epoch: 1,
            seq: 1,
            decision: Decision::Abort(AbortReason::PeerLost { rank: 2, detail: "x".into() }),
        },
        ToPeer::Outcome { epoch: 1, seq: 1, decision: Decision::Abort(AbortReason::Mismatch { detail: "y".into() }) },
        ToPeer::Outcome {
            epoch: 1,
            seq: 1,
            decision: Decision::Abort(AbortReason::Failed { rank: 0, detail: "z".into() }),
        },
        ToPeer::PendingJoiners { count: 3 },
        ToPeer::SyncPlan {
            epoch: 2,
            seq: 3,
            agreed: vec![(1, [7; 32])],
            transfers: vec![Transfer { tensor: 0, from: 1, to: 2 }],
        },
        ToPeer::Refused { reason: "bad secret".into() },
        ToPeer::Heartbeat,
        ToPeer::TopologyDone { epoch: 4 },
    ]
}

/// The bytes the pre-`Codec` encoder (`wire.rs` at 434ba78) produced for each sample.
const GOLDEN_TO_MASTER: [&str; 12] = [
    "10000000010700000000000000047f000001a00f",
    "1c00000001ffffffffffffffff06000000000000000000000000000000010100",
    "0100000002",
    "09000000030300000000000000",
    "1900000004010000000000000002000000000000000300000000000000",
    "12000000050100000000000000020000000000000000",
    "220000000501000000000000000200000000000000010c0000006d69736d617463683a20c3a9",
    "170000000501000000000000000200000000000000020100000078",
    "4300000006010000000000000009000000000000000201000000010000007704000000000000000909090909090909090909090909090909090909090909090909090909090909",
    "0100000007",
    "3500000008020000000000000005000000000000800b00000000000000030000000300000000000000ffffffffffffffff0000000000000000",
    "1d0000000800000000000000000000000000000000000000000000000000000000",
];

/// The bytes the pre-`Codec` encoder (`wire.rs` at 434ba78) produced for each sample,
/// but for the view's term.
const GOLDEN_TO_PEER: [&str; 11] = [
    "0100000001",
    // The view gained its master term (the last 8 bytes) for master takeovers.
    "3f000000020500000000000000010000000100000000000000047f0000010900010000000200000000000000010000000700000074696d656f75740300000000000000",
    "12000000030100000000000000010000000000000000",
    "1b000000030100000000000000010000000000000001020000000100000078",
    "170000000301000000000000000100000000000000020100000079",
    "1b00000003010000000000000001000000000000000300000000010000007a",
    "050000000403000000",
    "4d0000000502000000000000000300000000000000010000000100000000000000070707070707070707070707070707070707070707070707070707070707070701000000000000000100000002000000",
    "0f000000060a00000062616420736563726574",
    "0100000007",
    "09000000080400000000000000",
];

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn the_wire_format_is_unchanged() {
    let to_master: Vec<String> = samples_to_master().iter().map(|m| hex(&m.encode())).collect();
    assert_eq!(to_master, GOLDEN_TO_MASTER);
    let to_peer: Vec<String> = samples_to_peer().iter().map(|m| hex(&m.encode())).collect();
    assert_eq!(to_peer, GOLDEN_TO_PEER);
}

#[test]
fn invalid_input_reports_round_trip_under_new_codes() {
    let end = ToMaster::OpEnd { epoch: 1, seq: 2, result: OpResult::Invalid("NaN".into()) };
    assert_eq!(ToMaster::decode(body(&end.encode())), Ok(end));
    let reason = AbortReason::Invalid { rank: 3, detail: "NaN".into() };
    let out = ToPeer::Outcome { epoch: 1, seq: 2, decision: Decision::Abort(reason) };
    let enc = out.encode();
    assert_eq!(ToPeer::decode(body(&enc)), Ok(out));
}

#[test]
fn takeover_messages_round_trip_under_new_codes() {
    let view = View { epoch: 7, members: vec![Member { id: 1, addr: "127.0.0.1:9".parse().expect("addr") }] };
    let rejoin = Rejoin {
        id: 1,
        data_addr: "[::1]:5".parse().expect("addr"),
        term: 2,
        view,
        voting: true,
        committed: vec![(7, 3)],
        undecided: vec![(7, 4), (7, 1 << 63 | 9)],
        device: Some(HeldDeviceId { epoch: 7, generation: 2, id: [5; 128], grow: false, relayed: true }),
    };
    // With and without the device id it holds.
    let without = Rejoin { device: None, ..rejoin.clone() };
    for m in [ToMaster::Rejoin(Box::new(rejoin)), ToMaster::Rejoin(Box::new(without))] {
        let enc = m.encode();
        assert_eq!(ToMaster::decode(body(&enc)), Ok(m));
        for cut in 0..enc.len() - 4 {
            assert!(ToMaster::decode(&enc[4..4 + cut]).is_err(), "cut at {cut}");
        }
    }
    let m =
        ToPeer::Outcome { epoch: 1, seq: 2, decision: Decision::Abort(AbortReason::MasterLost { detail: "x".into() }) };
    assert_eq!(ToPeer::decode(body(&m.encode())), Ok(m));
}

#[test]
fn an_unreachable_report_round_trips_under_a_new_code() {
    let m = ToMaster::Unreachable { epoch: 4, peer: u64::MAX - 1 };
    assert_eq!(ToMaster::decode(body(&m.encode())), Ok(m));
}

#[test]
fn a_lost_link_report_round_trips_under_a_new_code() {
    let end = ToMaster::OpEnd { epoch: 1, seq: 2, result: OpResult::Lost { rank: 4, detail: "reset".into() } };
    let enc = end.encode();
    assert_eq!(ToMaster::decode(body(&enc)), Ok(end));
    // Code 4 follows the op-end header; the old codes keep their bytes (the golden test).
    let old = ToMaster::OpEnd { epoch: 1, seq: 2, result: OpResult::Failed("reset".into()) }.encode();
    assert_ne!(enc, old);
}

#[test]
fn eager_messages_have_new_codes_and_fixed_bytes() {
    let msgs = [
        ToMaster::EagerOpBegin { epoch: 1, seq: 2, call: 3 },
        ToMaster::EagerSubOpBegin { epoch: 2, seq: 1 << 63 | 5, call: 11, members: vec![3, 0] },
        ToMaster::ViewSeen { epoch: 9 },
    ];
    let golden = [
        "190000000b010000000000000002000000000000000300000000000000",
        "2d0000000c020000000000000005000000000000800b000000000000000200000003000000000000000000000000000000",
        "090000000d0900000000000000",
    ];
    for (m, g) in msgs.iter().zip(golden) {
        let enc = m.encode();
        assert_eq!(hex(&enc), g, "{m:?}");
        assert_eq!(ToMaster::decode(body(&enc)), Ok(m.clone()));
        for cut in 0..enc.len() - 4 {
            assert!(ToMaster::decode(&enc[4..4 + cut]).is_err(), "{m:?} cut at {cut}");
        }
    }
}

#[test]
fn every_message_round_trips() {
    for m in samples_to_master() {
        assert_eq!(ToMaster::decode(body(&m.encode())), Ok(m));
    }
    for m in samples_to_peer() {
        assert_eq!(ToPeer::decode(body(&m.encode())), Ok(m));
    }
}

#[test]
fn every_truncation_is_an_error() {
    for m in samples_to_master() {
        let enc = m.encode();
        for cut in 0..enc.len() - 4 {
            assert!(ToMaster::decode(&enc[4..4 + cut]).is_err(), "{m:?} cut at {cut}");
        }
    }
    for m in samples_to_peer() {
        let enc = m.encode();
        for cut in 0..enc.len() - 4 {
            assert!(ToPeer::decode(&enc[4..4 + cut]).is_err(), "{m:?} cut at {cut}");
        }
    }
}

#[test]
fn sub_op_member_counts_are_checked_against_the_input() {
    // A SubOpBegin claiming 1000 members with two present.
    let mut body = vec![8u8];
    for v in [1u64, 2, 3] {
        body.extend_from_slice(&v.to_le_bytes());
    }
    body.extend_from_slice(&1000u32.to_le_bytes());
    body.extend_from_slice(&[0u8; 16]);
    assert!(matches!(ToMaster::decode(&body), Err(WireError::TooLarge { .. })));
}

#[test]
fn huge_counts_are_refused_before_allocating() {
    // A view claiming 2^32-1 members in a 20-byte message.
    let mut body = vec![2u8];
    body.extend_from_slice(&1u64.to_le_bytes());
    body.extend_from_slice(&u32::MAX.to_le_bytes());
    assert!(matches!(ToPeer::decode(&body), Err(WireError::TooLarge { .. })));
    assert!(body_len((MAX_MESSAGE_BYTES as u32 + 1).to_le_bytes()).is_err());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(20_000))]
    #[test]
    fn sub_op_begins_round_trip(
        epoch in any::<u64>(),
        seq in any::<u64>(),
        call in any::<u64>(),
        members in proptest::collection::vec(any::<u64>(), 0..64),
    ) {
        let m = ToMaster::SubOpBegin { epoch, seq, call, members };
        prop_assert_eq!(ToMaster::decode(body(&m.encode())), Ok(m));
    }

    #[test]
    fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        let _ = ToMaster::decode(&bytes);
        let _ = ToPeer::decode(&bytes);
    }

    #[test]
    fn mutated_messages_never_panic(i in 0usize..23, pos in any::<usize>(), byte in any::<u8>()) {
        let (to_master, to_peer) = (samples_to_master(), samples_to_peer());
        let mut enc = match to_master.get(i) {
            Some(m) => m.encode(),
            None => to_peer[i - to_master.len()].encode(),
        };
        let p = 4 + pos % (enc.len() - 4);
        enc[p] = byte;
        let _ = ToMaster::decode(&enc[4..]);
        let _ = ToPeer::decode(&enc[4..]);
    }
}

#[test]
fn device_ids_have_new_codes_and_fixed_bytes() {
    let mut id = [0u8; 128];
    for (i, b) in id.iter_mut().enumerate() {
        *b = i as u8;
    }
    let ids: String = id.iter().map(|b| format!("{b:02x}")).collect();
    let to_master = ToMaster::DeviceId { epoch: 3, generation: 2, id, grow: true };
    let enc = to_master.encode();
    // 4 length bytes (1 + 8 + 4 + 128 + 1 = 142), code 14, the epoch, the generation
    // (u32, little-endian), the id, the flag.
    assert_eq!(hex(&enc), format!("8e0000000e030000000000000002000000{ids}01"));
    assert_eq!(ToMaster::decode(body(&enc)), Ok(to_master.clone()));
    for cut in 0..enc.len() - 4 {
        assert!(ToMaster::decode(&enc[4..4 + cut]).is_err(), "cut at {cut}");
    }
    let to_peer = ToPeer::DeviceId { epoch: u64::MAX, generation: u32::MAX, id, grow: false };
    let enc = to_peer.encode();
    assert_eq!(hex(&enc), format!("8e00000009ffffffffffffffffffffffff{ids}00"));
    assert_eq!(ToPeer::decode(body(&enc)), Ok(to_peer));
    for cut in 0..enc.len() - 4 {
        assert!(ToPeer::decode(&enc[4..4 + cut]).is_err(), "cut at {cut}");
    }
    // A flag byte other than 0 or 1 is corrupt, not "true".
    let mut bad = to_master.encode();
    *bad.last_mut().expect("flag") = 2;
    assert!(ToMaster::decode(body(&bad)).is_err());
}
