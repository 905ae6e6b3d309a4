//! The control protocol between peers and the master, and its binary codec.
//!
//! Every message is one length-delimited record: `u32` length (little-endian), then a
//! `u8` tag and the fields. Decoders check every length against [`MAX_MESSAGE_BYTES`]
//! and the remaining input before allocating, and return [`WireError`], never panic:
//! the master reads these from the network.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use super::view::{Member, PeerId, View};

/// The largest control message accepted, in bytes.
pub const MAX_MESSAGE_BYTES: usize = 4 << 20;
/// The longest string field accepted, in bytes.
pub const MAX_STRING_BYTES: usize = 4096;

/// A content hash of a shared tensor (BLAKE3).
pub type Digest = [u8; 32];

/// Why a decode failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The input ended inside a field.
    #[error("message truncated at byte {0}")]
    Truncated(usize),
    /// A length or count exceeds its limit.
    #[error("{what} of {len} exceeds the limit of {limit}")]
    TooLarge {
        /// Which field.
        what: &'static str,
        /// Its claimed size.
        len: usize,
        /// The limit.
        limit: usize,
    },
    /// An unknown tag or enum code.
    #[error("unknown {what} code {code}")]
    UnknownCode {
        /// Which field.
        what: &'static str,
        /// The code.
        code: u8,
    },
    /// Bytes left over after the last field.
    #[error("{0} trailing bytes")]
    Trailing(usize),
    /// A string field is not UTF-8.
    #[error("string field is not UTF-8")]
    BadUtf8,
}

/// How a peer takes part in a shared-state sync (as in PCCL).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum SyncStrategy {
    /// The content most peers hold wins; peers that differ fetch it.
    EnforcePopular = 0,
    /// This peer's content never counts; it only receives.
    ReceiveOnly = 1,
    /// This peer's content is authoritative; it never receives.
    SendOnly = 2,
}

impl SyncStrategy {
    /// The strategy for a wire or C code.
    pub fn from_code(code: u8) -> Option<SyncStrategy> {
        [SyncStrategy::EnforcePopular, SyncStrategy::ReceiveOnly, SyncStrategy::SendOnly].get(code as usize).copied()
    }
}

/// One tensor's entry in a sync request: its name, revision and content hash.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorDigest {
    /// The tensor's name, unique within the shared state.
    pub name: String,
    /// The revision the holder claims for it.
    pub revision: u64,
    /// Hash of its bytes (and dtype).
    pub digest: Digest,
}

/// One transfer of a sync plan: rank `from` sends tensor `tensor` to rank `to`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transfer {
    /// Index of the tensor in the sync request's order.
    pub tensor: u32,
    /// Sending rank.
    pub from: u32,
    /// Receiving rank.
    pub to: u32,
}

/// How a collective ended on one member.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OpResult {
    /// It completed locally.
    Ok,
    /// It saw frames of a different call.
    Mismatch(String),
    /// It failed otherwise.
    Failed(String),
}

/// Why the master aborted a collective.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AbortReason {
    /// A member was lost while it ran.
    PeerLost {
        /// The lost member's rank in the collective's view.
        rank: u32,
        /// What the master observed.
        detail: String,
    },
    /// Members made different calls.
    Mismatch {
        /// What differed.
        detail: String,
    },
    /// A member's collective failed locally.
    Failed {
        /// The failing member's rank.
        rank: u32,
        /// Its error message.
        detail: String,
    },
}

/// The master's decision on one collective.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Every member completed: keep the result.
    Commit,
    /// Discard the result and restore the buffer.
    Abort(AbortReason),
}

/// A member that left the view, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Removal {
    /// The peer.
    pub id: PeerId,
    /// Its rank in the previous view.
    pub rank: u32,
    /// Lost (crash, timeout) or left gracefully.
    pub detail: String,
}

/// Messages from a peer to the master.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ToMaster {
    /// First message of a control connection: asks to join with a data address.
    Join {
        /// The peer's chosen identity, unique in the cluster.
        id: PeerId,
        /// Where its data links are accepted.
        data_addr: SocketAddr,
    },
    /// "Still alive"; any message counts as one.
    Heartbeat,
    /// The member is in `update_topology` for view `epoch`.
    UpdateTopology {
        /// The view the member is in.
        epoch: u64,
    },
    /// The member starts collective `seq` of `epoch` with call fingerprint `call`.
    OpBegin {
        /// View epoch.
        epoch: u64,
        /// Collective sequence number in the epoch.
        seq: u64,
        /// Fingerprint of the call (kind, sizes, dtype, op).
        call: u64,
    },
    /// The member finished collective `seq` of `epoch` locally.
    OpEnd {
        /// View epoch.
        epoch: u64,
        /// Collective sequence number.
        seq: u64,
        /// How it ended on this member.
        result: OpResult,
    },
    /// The member starts a shared-state sync (collective `seq` of `epoch`).
    SyncState {
        /// View epoch.
        epoch: u64,
        /// Collective sequence number.
        seq: u64,
        /// How this member takes part.
        strategy: SyncStrategy,
        /// Its tensors, in a fixed order.
        tensors: Vec<TensorDigest>,
    },
    /// The member leaves the group gracefully.
    Leave,
    /// The member starts sub-group collective `seq` of `epoch` among `members` only
    /// (peer ids in sub-rank order): the master tallies and commits it over those
    /// members alone.
    SubOpBegin {
        /// View epoch.
        epoch: u64,
        /// Sub-group collective key (see `comm::subgroup`).
        seq: u64,
        /// Fingerprint of the call, the member set included.
        call: u64,
        /// The sub-group's members.
        members: Vec<PeerId>,
    },
}

/// Messages from the master to a peer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ToPeer {
    /// The join request is queued until the members call `update_topology`.
    Pending,
    /// A new view. Collectives of older epochs are void.
    View {
        /// The view.
        view: View,
        /// Members removed since the previous view.
        removed: Vec<Removal>,
    },
    /// The outcome of a collective.
    Outcome {
        /// View epoch.
        epoch: u64,
        /// Collective sequence number.
        seq: u64,
        /// Commit or abort.
        decision: Decision,
    },
    /// How many joiners are waiting for admission.
    PendingJoiners {
        /// Their number.
        count: u32,
    },
    /// Who sends which tensor to whom, for sync `seq` of `epoch`.
    SyncPlan {
        /// View epoch.
        epoch: u64,
        /// Collective sequence number.
        seq: u64,
        /// The agreed revision and hash of each tensor.
        agreed: Vec<(u64, Digest)>,
        /// The transfers to make.
        transfers: Vec<Transfer>,
    },
    /// The master refuses or ends this peer's membership.
    Refused {
        /// Why.
        reason: String,
    },
    /// "The master is alive": lets a peer notice a master it can no longer hear.
    Heartbeat,
    /// Every member has called `update_topology`: the round is over, in view `epoch`.
    TopologyDone {
        /// The view the round ended in.
        epoch: u64,
    },
}

/// Appends fields to a message under construction.
struct Enc(Vec<u8>);

impl Enc {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn len(&mut self, v: usize) {
        self.u32(u32::try_from(v).unwrap_or(u32::MAX)); // ok: oversized lengths fail decode
    }
    fn str(&mut self, s: &str) {
        let s = truncate(s, MAX_STRING_BYTES);
        self.len(s.len());
        self.0.extend_from_slice(s.as_bytes());
    }
    fn digest(&mut self, d: &Digest) {
        self.0.extend_from_slice(d);
    }
    fn addr(&mut self, a: &SocketAddr) {
        match a.ip() {
            IpAddr::V4(ip) => {
                self.u8(4);
                self.0.extend_from_slice(&ip.octets());
            }
            IpAddr::V6(ip) => {
                self.u8(6);
                self.0.extend_from_slice(&ip.octets());
            }
        }
        self.0.extend_from_slice(&a.port().to_le_bytes());
    }
    fn view(&mut self, v: &View) {
        self.u64(v.epoch);
        self.len(v.members.len());
        for m in &v.members {
            self.u64(m.id);
            self.addr(&m.addr);
        }
    }
}

/// The longest prefix of `s` of at most `max` bytes that ends on a char boundary.
fn truncate(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Reads fields from a received message.
struct Dec<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Dec<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len()).ok_or(WireError::Truncated(self.pos))?;
        let out = &self.buf[self.pos..end];
        self.pos = end;
        Ok(out)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], WireError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }
    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, WireError> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    fn u64(&mut self) -> Result<u64, WireError> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    /// A count of items of at least `item_bytes` each, checked against the input left.
    fn count(&mut self, what: &'static str, item_bytes: usize) -> Result<usize, WireError> {
        let n = self.u32()? as usize;
        let left = self.buf.len() - self.pos;
        if n.saturating_mul(item_bytes.max(1)) > left {
            return Err(WireError::TooLarge { what, len: n, limit: left / item_bytes.max(1) });
        }
        Ok(n)
    }
    fn str(&mut self) -> Result<String, WireError> {
        let n = self.u32()? as usize;
        if n > MAX_STRING_BYTES {
            return Err(WireError::TooLarge { what: "string", len: n, limit: MAX_STRING_BYTES });
        }
        String::from_utf8(self.take(n)?.to_vec()).map_err(|_| WireError::BadUtf8)
    }
    fn addr(&mut self) -> Result<SocketAddr, WireError> {
        let ip = match self.u8()? {
            4 => IpAddr::V4(Ipv4Addr::from(self.array::<4>()?)),
            6 => IpAddr::V6(Ipv6Addr::from(self.array::<16>()?)),
            code => return Err(WireError::UnknownCode { what: "address family", code }),
        };
        Ok(SocketAddr::new(ip, u16::from_le_bytes(self.array()?)))
    }
    fn view(&mut self) -> Result<View, WireError> {
        let epoch = self.u64()?;
        let n = self.count("members", 8 + 7)?;
        let members =
            (0..n).map(|_| Ok(Member { id: self.u64()?, addr: self.addr()? })).collect::<Result<_, WireError>>()?;
        Ok(View { epoch, members })
    }
    fn finish(&self) -> Result<(), WireError> {
        match self.buf.len() - self.pos {
            0 => Ok(()),
            n => Err(WireError::Trailing(n)),
        }
    }
}

/// Prefixes a message body with its length.
fn framed(body: Enc) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.0.len() + 4);
    out.extend_from_slice(&(body.0.len() as u32).to_le_bytes());
    out.extend_from_slice(&body.0);
    out
}

/// Reads the body length from a 4-byte prefix, checked against [`MAX_MESSAGE_BYTES`].
pub fn body_len(prefix: [u8; 4]) -> Result<usize, WireError> {
    let len = u32::from_le_bytes(prefix) as usize;
    if len > MAX_MESSAGE_BYTES {
        return Err(WireError::TooLarge { what: "message", len, limit: MAX_MESSAGE_BYTES });
    }
    Ok(len)
}

impl ToMaster {
    /// Encodes the message with its length prefix.
    pub fn encode(&self) -> Vec<u8> {
        let mut e = Enc(Vec::new());
        match self {
            ToMaster::Join { id, data_addr } => {
                e.u8(1);
                e.u64(*id);
                e.addr(data_addr);
            }
            ToMaster::Heartbeat => e.u8(2),
            ToMaster::UpdateTopology { epoch } => {
                e.u8(3);
                e.u64(*epoch);
            }
            ToMaster::OpBegin { epoch, seq, call } => {
                e.u8(4);
                e.u64(*epoch);
                e.u64(*seq);
                e.u64(*call);
            }
            ToMaster::OpEnd { epoch, seq, result } => {
                e.u8(5);
                e.u64(*epoch);
                e.u64(*seq);
                match result {
                    OpResult::Ok => e.u8(0),
                    OpResult::Mismatch(msg) => {
                        e.u8(1);
                        e.str(msg);
                    }
                    OpResult::Failed(msg) => {
                        e.u8(2);
                        e.str(msg);
                    }
                }
            }
            ToMaster::SyncState { epoch, seq, strategy, tensors } => {
                e.u8(6);
                e.u64(*epoch);
                e.u64(*seq);
                e.u8(*strategy as u8);
                e.len(tensors.len());
                for t in tensors {
                    e.str(&t.name);
                    e.u64(t.revision);
                    e.digest(&t.digest);
                }
            }
            ToMaster::Leave => e.u8(7),
            ToMaster::SubOpBegin { epoch, seq, call, members } => {
                e.u8(8);
                e.u64(*epoch);
                e.u64(*seq);
                e.u64(*call);
                e.len(members.len());
                for m in members {
                    e.u64(*m);
                }
            }
        }
        framed(e)
    }

    /// Decodes a message body (without its length prefix).
    pub fn decode(body: &[u8]) -> Result<ToMaster, WireError> {
        let mut d = Dec { buf: body, pos: 0 };
        let msg = match d.u8()? {
            1 => ToMaster::Join { id: d.u64()?, data_addr: d.addr()? },
            2 => ToMaster::Heartbeat,
            3 => ToMaster::UpdateTopology { epoch: d.u64()? },
            4 => ToMaster::OpBegin { epoch: d.u64()?, seq: d.u64()?, call: d.u64()? },
            5 => {
                let (epoch, seq) = (d.u64()?, d.u64()?);
                let result = match d.u8()? {
                    0 => OpResult::Ok,
                    1 => OpResult::Mismatch(d.str()?),
                    2 => OpResult::Failed(d.str()?),
                    code => return Err(WireError::UnknownCode { what: "op result", code }),
                };
                ToMaster::OpEnd { epoch, seq, result }
            }
            6 => {
                let (epoch, seq) = (d.u64()?, d.u64()?);
                let code = d.u8()?;
                let strategy =
                    SyncStrategy::from_code(code).ok_or(WireError::UnknownCode { what: "strategy", code })?;
                let n = d.count("tensors", 4 + 8 + 32)?;
                let tensors = (0..n)
                    .map(|_| Ok(TensorDigest { name: d.str()?, revision: d.u64()?, digest: d.array()? }))
                    .collect::<Result<_, WireError>>()?;
                ToMaster::SyncState { epoch, seq, strategy, tensors }
            }
            7 => ToMaster::Leave,
            8 => {
                let (epoch, seq, call) = (d.u64()?, d.u64()?, d.u64()?);
                let n = d.count("members", 8)?;
                let members = (0..n).map(|_| d.u64()).collect::<Result<_, WireError>>()?;
                ToMaster::SubOpBegin { epoch, seq, call, members }
            }
            code => return Err(WireError::UnknownCode { what: "message to master", code }),
        };
        d.finish()?;
        Ok(msg)
    }
}

impl ToPeer {
    /// Encodes the message with its length prefix.
    pub fn encode(&self) -> Vec<u8> {
        let mut e = Enc(Vec::new());
        match self {
            ToPeer::Pending => e.u8(1),
            ToPeer::View { view, removed } => {
                e.u8(2);
                e.view(view);
                e.len(removed.len());
                for r in removed {
                    e.u64(r.id);
                    e.u32(r.rank);
                    e.str(&r.detail);
                }
            }
            ToPeer::Outcome { epoch, seq, decision } => {
                e.u8(3);
                e.u64(*epoch);
                e.u64(*seq);
                match decision {
                    Decision::Commit => e.u8(0),
                    Decision::Abort(AbortReason::PeerLost { rank, detail }) => {
                        e.u8(1);
                        e.u32(*rank);
                        e.str(detail);
                    }
                    Decision::Abort(AbortReason::Mismatch { detail }) => {
                        e.u8(2);
                        e.str(detail);
                    }
                    Decision::Abort(AbortReason::Failed { rank, detail }) => {
                        e.u8(3);
                        e.u32(*rank);
                        e.str(detail);
                    }
                }
            }
            ToPeer::PendingJoiners { count } => {
                e.u8(4);
                e.u32(*count);
            }
            ToPeer::SyncPlan { epoch, seq, agreed, transfers } => {
                e.u8(5);
                e.u64(*epoch);
                e.u64(*seq);
                e.len(agreed.len());
                for (rev, digest) in agreed {
                    e.u64(*rev);
                    e.digest(digest);
                }
                e.len(transfers.len());
                for t in transfers {
                    e.u32(t.tensor);
                    e.u32(t.from);
                    e.u32(t.to);
                }
            }
            ToPeer::Refused { reason } => {
                e.u8(6);
                e.str(reason);
            }
            ToPeer::Heartbeat => e.u8(7),
            ToPeer::TopologyDone { epoch } => {
                e.u8(8);
                e.u64(*epoch);
            }
        }
        framed(e)
    }

    /// Decodes a message body (without its length prefix).
    pub fn decode(body: &[u8]) -> Result<ToPeer, WireError> {
        let mut d = Dec { buf: body, pos: 0 };
        let msg = match d.u8()? {
            1 => ToPeer::Pending,
            2 => {
                let view = d.view()?;
                let n = d.count("removals", 8 + 4 + 4)?;
                let removed = (0..n)
                    .map(|_| Ok(Removal { id: d.u64()?, rank: d.u32()?, detail: d.str()? }))
                    .collect::<Result<_, WireError>>()?;
                ToPeer::View { view, removed }
            }
            3 => {
                let (epoch, seq) = (d.u64()?, d.u64()?);
                let decision = match d.u8()? {
                    0 => Decision::Commit,
                    1 => Decision::Abort(AbortReason::PeerLost { rank: d.u32()?, detail: d.str()? }),
                    2 => Decision::Abort(AbortReason::Mismatch { detail: d.str()? }),
                    3 => Decision::Abort(AbortReason::Failed { rank: d.u32()?, detail: d.str()? }),
                    code => return Err(WireError::UnknownCode { what: "decision", code }),
                };
                ToPeer::Outcome { epoch, seq, decision }
            }
            4 => ToPeer::PendingJoiners { count: d.u32()? },
            5 => {
                let (epoch, seq) = (d.u64()?, d.u64()?);
                let n = d.count("agreed", 40)?;
                let agreed = (0..n).map(|_| Ok((d.u64()?, d.array()?))).collect::<Result<_, WireError>>()?;
                let n = d.count("transfers", 12)?;
                let transfers = (0..n)
                    .map(|_| Ok(Transfer { tensor: d.u32()?, from: d.u32()?, to: d.u32()? }))
                    .collect::<Result<_, WireError>>()?;
                ToPeer::SyncPlan { epoch, seq, agreed, transfers }
            }
            6 => ToPeer::Refused { reason: d.str()? },
            7 => ToPeer::Heartbeat,
            8 => ToPeer::TopologyDone { epoch: d.u64()? },
            code => return Err(WireError::UnknownCode { what: "message to peer", code }),
        };
        d.finish()?;
        Ok(msg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
            ToPeer::View { view, removed: vec![Removal { id: 2, rank: 1, detail: "timeout".into() }] },
            ToPeer::Outcome { epoch: 1, seq: 1, decision: Decision::Commit },
            ToPeer::Outcome {
                epoch: 1,
                seq: 1,
                decision: Decision::Abort(AbortReason::PeerLost { rank: 2, detail: "x".into() }),
            },
            ToPeer::Outcome {
                epoch: 1,
                seq: 1,
                decision: Decision::Abort(AbortReason::Mismatch { detail: "y".into() }),
            },
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
}
