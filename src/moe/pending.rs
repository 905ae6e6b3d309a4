//! The layer's steps started without blocking, so that they overlap compute (spAG
//! under the attention forward, spRS under the attention backward):
//! [`ExpertLayer::materialize_start`], [`ExpertLayer::dispatch_start`],
//! [`ExpertLayer::combine_start`] and [`ExpertLayer::reduce_gradients_start`].
//!
//! Each takes its buffer by value and returns a handle whose `wait` gives the outcome
//! and the buffer back: the step's result on success, exactly as passed on error (as
//! [`Communicator::all_reduce_start`] does). Every device starts the steps in the same
//! order, as for the blocking steps, and may run other collectives in between as long
//! as all devices run the same ones in the same order.

use super::layer::Routed;
use super::{Dispatched, ExpertLayer};
use std::sync::Arc;

use crate::comm::started::{PendingPlanned, Planned};
use crate::comm::{Pending, PendingAllToAll};
use crate::dtype::{Element, ReduceOp};
use crate::error::{Error, Result};
use crate::Communicator;

/// A spAG or spRS started by [`ExpertLayer::materialize_start`] or
/// [`ExpertLayer::reduce_gradients_start`].
pub struct PendingStep<T: Element> {
    inner: Pending<T>,
}

impl<T: Element> PendingStep<T> {
    /// Waits for the step: its outcome and the buffer (materialised or reduced on
    /// success, as it was passed on error).
    pub fn wait(self) -> (Result<()>, Vec<T>) {
        self.inner.wait()
    }

    /// Whether the step has finished (`wait` would not block).
    pub fn is_finished(&self) -> bool {
        self.inner.is_finished()
    }
}

/// A [`PendingStep`] of any element type, its buffer handed back as bytes: what the C
/// and Python faces hold, which learn the element type only at run time.
pub struct AnyPendingStep(Box<dyn ErasedStep>);

/// [`PendingStep`] with its element type erased.
trait ErasedStep: Send {
    fn finished(&self) -> bool;
    fn wait_bytes(self: Box<Self>) -> (Result<()>, Vec<u8>);
}

impl<T: Element> ErasedStep for PendingStep<T> {
    fn finished(&self) -> bool {
        self.is_finished()
    }
    fn wait_bytes(self: Box<Self>) -> (Result<()>, Vec<u8>) {
        let (result, buf) = PendingStep::wait(*self);
        (result, bytemuck::cast_slice(&buf).to_vec())
    }
}

impl<T: Element> From<PendingStep<T>> for AnyPendingStep {
    fn from(step: PendingStep<T>) -> AnyPendingStep {
        AnyPendingStep(Box::new(step))
    }
}

impl AnyPendingStep {
    /// [`PendingStep::wait`], the buffer as its bytes (native endianness).
    pub fn wait(self) -> (Result<()>, Vec<u8>) {
        self.0.wait_bytes()
    }

    /// Whether the step has finished (`wait` would not block).
    pub fn is_finished(&self) -> bool {
        self.0.finished()
    }
}

/// A dispatch started by [`ExpertLayer::dispatch_start`].
pub struct PendingDispatch<'l, T: Element> {
    layer: &'l ExpertLayer,
    inner: PendingPlanned<Routed>,
    tokens: Arc<Vec<T>>,
}

impl<T: Element> PendingDispatch<'_, T> {
    /// Waits for the count exchange and the tokens' all-to-all: what arrived (as
    /// [`ExpertLayer::dispatch`] returns it) or the error, and the tokens as passed.
    pub fn wait(self) -> (Result<Dispatched<T>>, Vec<T>) {
        let arrived = self.inner.wait().and_then(|(bytes, routed)| {
            let received: Vec<T> = bytemuck::allocation::pod_collect_to_vec(&bytes);
            self.layer.arrive(routed, received)
        });
        // The task has ended, and its planner with it: the tokens are ours alone.
        let tokens = Arc::try_unwrap(self.tokens).unwrap_or_else(|shared| shared.as_ref().clone());
        (arrived, tokens)
    }

    /// Whether the exchange has finished (`wait` would not block).
    pub fn is_finished(&self) -> bool {
        self.inner.is_finished()
    }
}

/// A combine started by [`ExpertLayer::combine_start`].
pub struct PendingCombine<'l, T: Element> {
    layer: &'l ExpertLayer,
    order: Vec<usize>,
    inner: PendingAllToAll<T>,
}

impl<T: Element> PendingCombine<'_, T> {
    /// Waits for the outputs' all-to-all: this device's outputs in the order of its
    /// tokens (as [`ExpertLayer::combine`] returns them) or the error, and the outputs
    /// as passed.
    pub fn wait(self) -> (Result<Vec<T>>, Vec<T>) {
        let (back, outputs) = self.inner.wait();
        (back.map(|b| self.layer.reorder(&self.order, &b)), outputs)
    }

    /// Whether the all-to-all has finished (`wait` would not block).
    pub fn is_finished(&self) -> bool {
        self.inner.is_finished()
    }
}

impl ExpertLayer {
    /// Starts [`materialize`](Self::materialize) (spAG P → P′) on `params` and returns
    /// at once, so that the transfer runs under other compute (the attention forward).
    ///
    /// ```
    /// use phalanx::moe::{place, ExpertLayer, PlaceParams};
    /// use phalanx::Communicator;
    /// // 2 devices, 2 experts of 3 floats, each owning one; both hold expert 0.
    /// let p = place(&[0, 1], 2, &[9.0, 1.0], PlaceParams { overlap: 1, slots: 1 }, None)?;
    /// let layer = ExpertLayer::new(p, 3, 1, None)?;
    /// let comms = Communicator::local_group(2, Default::default())?;
    /// let params: Vec<Vec<f32>> = std::thread::scope(|s| {
    ///     let hs: Vec<_> = comms.into_iter().map(|mut c| { let layer = &layer; s.spawn(move || {
    ///         let mine = vec![c.rank() as f32 + 1.0; 6];
    ///         let pending = layer.materialize_start(&mut c, mine).unwrap();
    ///         // ... the attention forward runs here, overlapping the spAG ...
    ///         let (result, params) = pending.wait();
    ///         result.unwrap();
    ///         params
    ///     })}).collect();
    ///     hs.into_iter().map(|h| h.join().unwrap()).collect()
    /// });
    /// assert_eq!(params[1][..3], [1.0; 3]); // device 1's replica of expert 0
    /// # Ok::<(), phalanx::Error>(())
    /// ```
    pub fn materialize_start<T: Element>(&self, comm: &mut Communicator, params: Vec<T>) -> Result<PendingStep<T>> {
        self.check_group(comm)?;
        Ok(PendingStep { inner: comm.sparse_all_gather_start(self.sparse(), params)? })
    }

    /// Starts [`reduce_gradients`](Self::reduce_gradients) (spRS P′ → P) on `grads` and
    /// returns at once (to overlap the attention backward).
    pub fn reduce_gradients_start<T: Element>(&self, comm: &mut Communicator, grads: Vec<T>) -> Result<PendingStep<T>> {
        self.check_group(comm)?;
        Ok(PendingStep { inner: comm.sparse_reduce_scatter_start(self.sparse(), grads, ReduceOp::Sum)? })
    }

    /// Starts [`dispatch`](Self::dispatch) and returns at once: the count exchange (an
    /// all-gather of a count per expert and device, which every device needs to plan)
    /// and, numbered right after it, the tokens' all-to-all run in the background.
    pub fn dispatch_start<'l, T: Element>(
        &'l self,
        comm: &mut Communicator,
        tokens: Vec<T>,
        experts: &[usize],
    ) -> Result<PendingDispatch<'l, T>> {
        let rank = self.check_group(comm)?;
        let mine = self.counts_of(&tokens, experts)?;
        let tokens = Arc::new(tokens);
        let (layer, theirs, experts) = (self.clone(), tokens.clone(), experts.to_vec());
        let plan = move |all: &[u64]| -> Result<Planned<Routed>> {
            let (routed, send) = layer.plan_from(rank, all, &theirs, &experts)?;
            Ok((routed.matrix.clone(), bytemuck::cast_slice(&send).to_vec(), routed))
        };
        let inner = comm.all_to_all_planned_start(&mine, T::DTYPE, plan)?;
        Ok(PendingDispatch { layer: self, inner, tokens })
    }

    /// Starts [`combine`](Self::combine) of `outputs` (one row per token of
    /// `dispatched`) and returns at once: the counts are known from the dispatch, so
    /// nothing is exchanged first.
    pub fn combine_start<'l, T: Element>(
        &'l self,
        comm: &mut Communicator,
        dispatched: &Dispatched<T>,
        outputs: Vec<T>,
    ) -> Result<PendingCombine<'l, T>> {
        self.check_group(comm)?;
        if outputs.len() != dispatched.tokens.len() {
            return Err(Error::InvalidArgument(format!(
                "{} output elements for {} dispatched token elements",
                outputs.len(),
                dispatched.tokens.len()
            )));
        }
        let m = &dispatched.matrix;
        let back: Vec<Vec<usize>> = (0..m.len()).map(|i| m.iter().map(|row| row[i]).collect()).collect();
        let inner = comm.all_to_all_start(outputs, back)?;
        Ok(PendingCombine { layer: self, order: dispatched.order.clone(), inner })
    }
}
