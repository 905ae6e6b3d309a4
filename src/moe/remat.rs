//! Re-materialisation (Hecate-RM): free the replicas after the layer's forward, and
//! spAG them again before its backward, trading a second spAG for the replicas'
//! memory between the two passes: [`ExpertLayer::release_replicas`] and
//! [`ExpertLayer::rematerialize_start`].

use super::pending::PendingStep;
use super::ExpertLayer;
use crate::dtype::Element;
use crate::error::{Error, Result};
use crate::Communicator;

/// A device's parameters with the replicas freed: only the experts it owns, in
/// ascending order, `expert_len` elements each. Made by
/// [`ExpertLayer::release_replicas`]; [`ExpertLayer::rematerialize_start`] makes the
/// full buffer again.
#[derive(Clone, Debug, PartialEq)]
pub struct Released<T> {
    device: usize,
    owned: Vec<T>,
    freed: usize,
}

impl<T: Element> Released<T> {
    /// The owned experts' parameters, ascending by expert.
    pub fn owned(&self) -> &[T] {
        &self.owned
    }

    /// Elements freed against the full buffer: the replicas' slots and the slots of
    /// experts this device does not hold.
    pub fn freed_elements(&self) -> usize {
        self.freed
    }

    /// Bytes freed (see [`Released::freed_elements`]).
    pub fn freed_bytes(&self) -> usize {
        self.freed * std::mem::size_of::<T>()
    }
}

impl ExpertLayer {
    /// Elements of the replicas `device` holds this iteration (the experts of P′ it
    /// holds but does not own): the memory re-materialisation frees between forward
    /// and backward.
    pub fn replica_len(&self, device: usize) -> usize {
        let p = self.placement();
        p.held(device).into_iter().filter(|&e| p.owners()[e] != device).count() * self.expert_len()
    }

    /// Frees this device's replicas (after the layer's forward): keeps only the experts
    /// it owns, whose parameters the backward's spRS and the optimizer step need.
    /// `params` is the full buffer ([`params_len`](Self::params_len) elements).
    ///
    /// ```
    /// use phalanx::moe::{place, ExpertLayer, PlaceParams};
    /// use phalanx::Communicator;
    /// // 2 devices, 2 experts of 3 floats, each owning one; both hold expert 0.
    /// let p = place(&[0, 1], 2, &[9.0, 1.0], PlaceParams { overlap: 1, slots: 1 }, None)?;
    /// let layer = ExpertLayer::new(p, 3, 1, None)?;
    /// let comms = Communicator::local_group(2, Default::default())?;
    /// let again: Vec<(Vec<f32>, usize)> = std::thread::scope(|s| {
    ///     let hs: Vec<_> = comms.into_iter().map(|mut c| { let layer = &layer; s.spawn(move || {
    ///         let mut params = vec![c.rank() as f32 + 1.0; 6];
    ///         layer.materialize(&mut c, &mut params).unwrap();
    ///         // ... the forward ...
    ///         let released = layer.release_replicas(&c, params).unwrap();
    ///         let freed = released.freed_elements();
    ///         // ... other layers ... then, before this layer's backward:
    ///         let (result, params) = layer.rematerialize_start(&mut c, released).unwrap().wait();
    ///         result.unwrap();
    ///         (params, freed)
    ///     })}).collect();
    ///     hs.into_iter().map(|h| h.join().unwrap()).collect()
    /// });
    /// assert_eq!(again[1], (vec![1.0, 1.0, 1.0, 2.0, 2.0, 2.0], 3)); // e0's replica back
    /// # Ok::<(), phalanx::Error>(())
    /// ```
    pub fn release_replicas<T: Element>(&self, comm: &Communicator, params: Vec<T>) -> Result<Released<T>> {
        let device = self.check_group(comm)?;
        if params.len() != self.params_len() {
            return Err(Error::InvalidArgument(format!(
                "a parameter buffer of {} elements for a layer of {}",
                params.len(),
                self.params_len()
            )));
        }
        let owners = self.placement().owners();
        let owned: Vec<T> = (0..owners.len())
            .filter(|&e| owners[e] == device)
            .flat_map(|e| params[self.expert_range(e)].iter().copied())
            .collect();
        let freed = params.len() - owned.len();
        Ok(Released { device, owned, freed })
    }

    /// Makes the full buffer again from `released` (the owned experts in their slots,
    /// zeros elsewhere) and starts the spAG that fills the replicas (before the layer's
    /// backward; it overlaps what runs until `wait`). On error `wait` gives the
    /// buffer with only the owned experts, from which the caller can start again.
    pub fn rematerialize_start<T: Element>(
        &self,
        comm: &mut Communicator,
        released: Released<T>,
    ) -> Result<PendingStep<T>> {
        let device = self.check_group(comm)?;
        if device != released.device {
            return Err(Error::InvalidArgument(format!(
                "replicas released by device {} re-materialised on device {device}",
                released.device
            )));
        }
        let mut params = vec![T::zeroed(); self.params_len()];
        let owners = self.placement().owners();
        let mine = (0..owners.len()).filter(|&e| owners[e] == device);
        for (e, chunk) in mine.zip(released.owned.chunks(self.expert_len().max(1))) {
            params[self.expert_range(e)].copy_from_slice(chunk);
        }
        self.materialize_start(comm, params)
    }
}
