//! Shared state: named tensors that every peer must hold bit-identically.
//!
//! A [`SharedState`] is an ordered set of named tensors with one revision number.
//! `Communicator::sync_shared_state` compares each tensor's content hash (BLAKE3 of its
//! element type and bytes) through the master; peers whose bytes differ from the agreed
//! content fetch it from a peer that holds it. Afterwards all peers' bytes are identical.
//!
//! ```
//! use phalanx::state::SharedState;
//! let mut state = SharedState::new();
//! state.insert("weights", vec![0.5f32; 4]);
//! state.get_mut::<f32>("weights").unwrap()[0] = 1.0;
//! state.revision += 1;
//! assert_eq!(state.get::<f32>("weights").unwrap()[0], 1.0);
//! ```

use crate::dtype::{DType, Element};

/// A content hash of a shared tensor (BLAKE3).
pub type Digest = [u8; 32];

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

/// One named tensor. Its bytes live in a `u64` buffer so that any element type can
/// view them aligned.
#[derive(Clone, Debug, PartialEq)]
struct Tensor {
    name: String,
    dtype: DType,
    len_bytes: usize,
    words: Vec<u64>,
}

impl Tensor {
    fn bytes(&self) -> &[u8] {
        &bytemuck::cast_slice(&self.words)[..self.len_bytes]
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        &mut bytemuck::cast_slice_mut(&mut self.words)[..self.len_bytes]
    }
}

/// Named tensors plus a revision, kept identical across peers.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SharedState {
    tensors: Vec<Tensor>,
    /// The state's revision: bump it whenever the tensors change (e.g. every step). A
    /// sync adopts the revision of the content it agrees on.
    pub revision: u64,
}

impl SharedState {
    /// An empty state at revision 0.
    pub fn new() -> SharedState {
        SharedState::default()
    }

    /// Adds (or replaces) tensor `name`.
    pub fn insert<T: Element>(&mut self, name: &str, data: Vec<T>) {
        self.insert_raw(name, T::DTYPE, bytemuck::cast_slice(&data));
    }

    /// Adds (or replaces) tensor `name` from the bytes of elements of type `dtype`
    /// (bindings that know the type only at run time). `bytes.len()` must be a multiple
    /// of `dtype.size()`; a trailing partial element is dropped.
    pub fn insert_raw(&mut self, name: &str, dtype: DType, bytes: &[u8]) {
        let len_bytes = bytes.len() / dtype.size() * dtype.size();
        let mut words = vec![0u64; len_bytes.div_ceil(8)];
        bytemuck::cast_slice_mut::<u64, u8>(&mut words)[..len_bytes].copy_from_slice(&bytes[..len_bytes]);
        let tensor = Tensor { name: name.to_string(), dtype, len_bytes, words };
        match self.tensors.iter_mut().find(|t| t.name == name) {
            Some(t) => *t = tensor,
            None => self.tensors.push(tensor),
        }
    }

    /// Tensor `name`'s element type and bytes, if it exists.
    pub fn get_raw(&self, name: &str) -> Option<(DType, &[u8])> {
        self.tensors.iter().find(|t| t.name == name).map(|t| (t.dtype, t.bytes()))
    }

    /// Tensor `name` as `&[T]`, if it exists with element type `T`.
    pub fn get<T: Element>(&self, name: &str) -> Option<&[T]> {
        let t = self.tensors.iter().find(|t| t.name == name && t.dtype == T::DTYPE)?;
        Some(bytemuck::cast_slice(t.bytes()))
    }

    /// Tensor `name` as `&mut [T]`, if it exists with element type `T`.
    pub fn get_mut<T: Element>(&mut self, name: &str) -> Option<&mut [T]> {
        let t = self.tensors.iter_mut().find(|t| t.name == name && t.dtype == T::DTYPE)?;
        Some(bytemuck::cast_slice_mut(t.bytes_mut()))
    }

    /// The tensors' names, in order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.iter().map(|t| t.name.as_str())
    }

    /// The number of tensors.
    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    /// Whether there are no tensors.
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// The content hash of tensor `index`: BLAKE3 of its dtype code and bytes.
    pub fn digest_of(&self, index: usize) -> Option<Digest> {
        self.tensors.get(index).map(|t| digest(t.dtype, t.bytes()))
    }

    /// One hash of the whole state (names, dtypes, bytes; not the revision).
    pub fn digest(&self) -> Digest {
        let mut h = blake3::Hasher::new();
        for t in &self.tensors {
            h.update(&(t.name.len() as u64).to_le_bytes());
            h.update(t.name.as_bytes());
            h.update(&digest(t.dtype, t.bytes()));
        }
        *h.finalize().as_bytes()
    }

    /// Each tensor's name, the state's revision and the tensor's hash, in order.
    pub fn digests(&self) -> Vec<TensorDigest> {
        self.tensors
            .iter()
            .map(|t| TensorDigest { name: t.name.clone(), revision: self.revision, digest: digest(t.dtype, t.bytes()) })
            .collect()
    }

    /// The bytes of tensor `index`.
    pub(crate) fn bytes(&self, index: usize) -> Option<&[u8]> {
        self.tensors.get(index).map(Tensor::bytes)
    }

    /// The element type of tensor `index`.
    pub(crate) fn dtype(&self, index: usize) -> Option<DType> {
        self.tensors.get(index).map(|t| t.dtype)
    }

    /// Overwrites tensor `index` with `bytes` of the same length.
    pub(crate) fn set_bytes(&mut self, index: usize, bytes: &[u8]) -> bool {
        match self.tensors.get_mut(index) {
            Some(t) if t.len_bytes == bytes.len() => {
                t.bytes_mut().copy_from_slice(bytes);
                true
            }
            _ => false,
        }
    }
}

/// BLAKE3 of a dtype code and bytes.
pub fn digest(dtype: DType, bytes: &[u8]) -> Digest {
    let mut h = blake3::Hasher::new();
    h.update(&[dtype.code()]);
    h.update(bytes);
    *h.finalize().as_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_follow_content_and_type() {
        let mut a = SharedState::new();
        a.insert("w", vec![1.0f32, 2.0]);
        let mut b = a.clone();
        assert_eq!(a.digest(), b.digest());
        b.get_mut::<f32>("w").expect("w")[1] = 2.5;
        assert_ne!(a.digest(), b.digest());
        let mut c = SharedState::new();
        c.insert("w", vec![1.0f32.to_bits(), 2.0f32.to_bits()]);
        assert_ne!(a.digest_of(0), c.digest_of(0), "same bytes, different dtype");
        assert!(a.get::<f64>("w").is_none());
        let (dtype, raw) = a.get_raw("w").expect("w");
        let mut d = SharedState::new();
        d.insert_raw("w", dtype, raw);
        assert_eq!(d.digest(), a.digest());
        let c_bytes = c.bytes(0).expect("bytes").to_owned();
        assert!(a.set_bytes(0, &c_bytes));
        assert!(!a.set_bytes(0, &[0u8; 3]));
    }
}
