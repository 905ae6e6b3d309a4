//! The layer: one MoE layer's communication for one iteration, over a [`Communicator`]:
//! spAG of the replicas, the token all-to-all there and back, and spRS of the gradients.

use std::ops::Range;

use super::{dispatch, Dispatch, ExpertPlacement, Hosts};
use crate::dtype::{Element, ReduceOp};
use crate::error::{Error, Result};
use crate::plan::sparse::Placement;
use crate::Communicator;

/// One MoE layer's communication for one iteration on every device of a group: each
/// device builds it from the same [`ExpertPlacement`] P′ and calls its steps in the same
/// order, its rank in the communicator being its device.
///
/// The experts' parameters (and gradients) live in one buffer of
/// [`params_len`](Self::params_len) elements, expert `e` at
/// [`expert_range(e)`](Self::expert_range), at the same offsets on every device; only
/// the slots of experts a device holds mean anything to it. Tokens are rows of `hidden`
/// elements.
///
/// An iteration: [`materialize`](Self::materialize) (spAG P → P′), the attention
/// forward, [`dispatch`](Self::dispatch) the tokens to expert holders, run the experts
/// on what arrived, [`combine`](Self::combine) the outputs back, and after the backward
/// [`reduce_gradients`](Self::reduce_gradients) (spRS P′ → P). Each step is a blocking
/// collective; on error the caller's buffers hold what they held before and, as a
/// placement names devices, the caller plans again for the survivors. Each also has a
/// start form that returns a handle at once so that it overlaps compute
/// ([`materialize_start`](Self::materialize_start) and the others, `moe::pending`),
/// and [`release_replicas`](Self::release_replicas) with
/// [`rematerialize_start`](Self::rematerialize_start) free the replicas between the
/// forward and the backward (re-materialisation).
///
/// Top-k routing: give [`dispatch`](Self::dispatch) one row per token and choice (the
/// token repeated, each row with its expert), and mix the rows [`combine`](Self::combine)
/// returns with the gate's weights. The backward's output gradients travel the same way:
/// dispatching them with the same experts delivers them in the order the tokens arrived.
///
/// Tested across 4 in-process peers in `tests/moe_layer.rs`: the reference's worked
/// example, and an MoE layer of MLP experts (top-1 and top-2) whose outputs, input
/// gradients and expert gradients equal a dense single-process reference bitwise.
#[derive(Clone, Debug)]
pub struct ExpertLayer {
    placement: ExpertPlacement,
    sparse: Placement,
    expert_len: usize,
    hidden: usize,
    hosts: Option<Hosts>,
}

/// What [`ExpertLayer::dispatch`] delivered to this device: the tokens to run through
/// their experts, and what [`ExpertLayer::combine`] needs to send the outputs home.
#[derive(Clone, Debug)]
pub struct Dispatched<T> {
    /// The tokens this device computes, `hidden` elements each: grouped by the device
    /// they came from (ascending), then by expert (ascending), then in their order there.
    pub tokens: Vec<T>,
    /// The expert of each token in [`tokens`](Self::tokens).
    pub experts: Vec<usize>,
    /// The device each token came from.
    pub sources: Vec<usize>,
    /// The group's dispatch plan (the same on every device).
    pub plan: Dispatch,
    /// This device's token indices in the order they were sent.
    pub(super) order: Vec<usize>,
    /// Elements each device sent each device (`matrix[from][to]`).
    pub(super) matrix: Vec<Vec<usize>>,
}

impl ExpertLayer {
    /// The layer for placement `placement`, experts of `expert_len` elements and tokens
    /// of `hidden` elements; with `hosts`, dispatch prefers a replica on a token's host.
    pub fn new(
        placement: ExpertPlacement,
        expert_len: usize,
        hidden: usize,
        hosts: Option<Hosts>,
    ) -> Result<ExpertLayer> {
        if hidden == 0 {
            return Err(Error::InvalidArgument("tokens of 0 elements: give hidden >= 1".into()));
        }
        if let Some(h) = &hosts {
            h.check(placement.devices())?;
        }
        let sparse = placement.to_sparse(expert_len)?;
        Ok(ExpertLayer { placement, sparse, expert_len, hidden, hosts })
    }

    /// The placement P′ this layer runs.
    pub fn placement(&self) -> &ExpertPlacement {
        &self.placement
    }

    /// The chunk placement the sparse collectives run.
    pub(super) fn sparse(&self) -> &Placement {
        &self.sparse
    }

    /// Elements of one expert's parameters.
    pub fn expert_len(&self) -> usize {
        self.expert_len
    }

    /// Elements of the parameter (and gradient) buffer: every expert's slot.
    pub fn params_len(&self) -> usize {
        self.sparse.total_len()
    }

    /// Where expert `e`'s slot lies in the parameter buffer.
    pub fn expert_range(&self, e: usize) -> Range<usize> {
        e * self.expert_len..(e + 1) * self.expert_len
    }

    /// This device's rank in the group a collective begun now runs in. A view that
    /// moved since the caller's last `update_topology` gives the retryable
    /// [`Error::Aborted`] the collectives give, not a false `InvalidArgument`.
    pub(super) fn check_group(&self, comm: &Communicator) -> Result<usize> {
        let (rank, size) = comm.call_group()?;
        if size != self.placement.devices() {
            return Err(Error::InvalidArgument(format!(
                "the placement is for {} devices but the group has {size}: plan it for this group",
                self.placement.devices(),
            )));
        }
        Ok(rank)
    }

    /// spAG(P, P′): every holder's slot of an expert receives its owner's parameters.
    /// Slots this device does not hold are left as they are.
    pub fn materialize<T: Element>(&self, comm: &mut Communicator, params: &mut [T]) -> Result<()> {
        self.check_group(comm)?;
        comm.sparse_all_gather(&self.sparse, params)
    }

    /// spRS(P′, P): each owner's slot of an expert becomes the sum of all its holders'
    /// gradients, added in ascending device order (so every run gives the same bits).
    /// Other slots are left as they are; the replicas may then be dropped.
    pub fn reduce_gradients<T: Element>(&self, comm: &mut Communicator, grads: &mut [T]) -> Result<()> {
        self.check_group(comm)?;
        comm.sparse_reduce_scatter(&self.sparse, grads, ReduceOp::Sum)
    }

    /// Sends this device's `tokens` (`hidden` elements each, token `i` routed to expert
    /// `experts[i]`) to devices holding their experts, by the plan of [`dispatch`]
    /// (local replica first, an expert's tokens split evenly over its holders).
    ///
    /// The devices first all-gather how many tokens each sends to each expert, so that
    /// every device computes the same plan; then one all-to-all(v) moves the tokens.
    pub fn dispatch<T: Element>(
        &self,
        comm: &mut Communicator,
        tokens: &[T],
        experts: &[usize],
    ) -> Result<Dispatched<T>> {
        let (routed, send) = self.route(comm, tokens, experts)?;
        let (received, _) = comm.all_to_all_start(send, routed.matrix.clone())?.wait();
        self.arrive(routed, received?)
    }

    /// Dispatch's first half: the count exchange, the plan, and this device's tokens
    /// in the order they are sent.
    pub(super) fn route<T: Element>(
        &self,
        comm: &mut Communicator,
        tokens: &[T],
        experts: &[usize],
    ) -> Result<(Routed, Vec<T>)> {
        let rank = self.check_group(comm)?;
        let mine = self.counts_of(tokens, experts)?;
        let mut all = vec![0u64; self.placement.devices() * mine.len()];
        comm.all_gather(&mine, &mut all)?;
        self.plan_from(rank, &all, tokens, experts)
    }

    /// Checks this device's tokens and counts them by expert.
    pub(super) fn counts_of<T: Element>(&self, tokens: &[T], experts: &[usize]) -> Result<Vec<u64>> {
        let (n_experts, hidden) = (self.placement.experts(), self.hidden);
        if tokens.len() != experts.len().saturating_mul(hidden) {
            return Err(Error::InvalidArgument(format!(
                "{} token elements for {} routed tokens of {hidden}",
                tokens.len(),
                experts.len()
            )));
        }
        if let Some((i, e)) = experts.iter().enumerate().find(|(_, &e)| e >= n_experts) {
            return Err(Error::InvalidArgument(format!("token {i} routed to expert {e} of a layer of {n_experts}")));
        }
        let mut mine = vec![0u64; n_experts];
        for &e in experts {
            mine[e] += 1;
        }
        Ok(mine)
    }

    /// The plan from every device's counts (`all`, device after device), and this
    /// device's tokens in the order they are sent.
    pub(super) fn plan_from<T: Element>(
        &self,
        rank: usize,
        all: &[u64],
        tokens: &[T],
        experts: &[usize],
    ) -> Result<(Routed, Vec<T>)> {
        let (devices, n_experts, hidden) = (self.placement.devices(), self.placement.experts(), self.hidden);
        // The counts come from peers: a sum that overflows, or a matrix no buffer could
        // hold, is theirs to answer for (every device sees the same counts and refuses
        // alike).
        let total = all.iter().try_fold(0u64, |a, &c| a.checked_add(c));
        if total.and_then(|t| usize::try_from(t).ok()?.checked_mul(hidden)).is_none() {
            return Err(Error::Mismatch { detail: "token counts of the group overflow".into() });
        }
        let routed: Vec<Vec<u64>> = all.chunks(n_experts.max(1)).map(<[u64]>::to_vec).collect();
        let plan = dispatch(&self.placement, &routed, self.hosts.as_ref())?;
        let mut matrix = vec![vec![0usize; devices]; devices];
        for r in plan.routes() {
            matrix[r.from][r.to] += r.tokens as usize * hidden;
        }

        // This device's tokens of each expert, in order, cut into the plan's routes.
        let mut by_expert: Vec<Vec<usize>> = vec![Vec::new(); n_experts];
        for (i, &e) in experts.iter().enumerate() {
            by_expert[e].push(i);
        }
        let mut next = vec![0usize; n_experts];
        let mut to: Vec<Vec<usize>> = vec![Vec::new(); devices];
        for r in plan.routes().iter().filter(|r| r.from == rank) {
            let start = next[r.expert];
            next[r.expert] += r.tokens as usize;
            let mine = by_expert[r.expert].get(start..next[r.expert]).ok_or_else(|| Error::Mismatch {
                detail: format!("the plan routes more of expert {}'s tokens than device {rank} has", r.expert),
            })?;
            to[r.to].extend_from_slice(mine);
        }
        let order: Vec<usize> = to.concat();
        let mut send = Vec::with_capacity(order.len() * hidden);
        for &i in &order {
            send.extend_from_slice(&tokens[i * hidden..(i + 1) * hidden]);
        }
        Ok((Routed { rank, plan, order, matrix }, send))
    }

    /// Dispatch's second half: what arrived, by the plan: from each device in turn,
    /// its routes to here, by expert.
    pub(super) fn arrive<T: Element>(&self, routed: Routed, received: Vec<T>) -> Result<Dispatched<T>> {
        let Routed { rank, plan, order, matrix } = routed;
        let expected: usize = matrix.iter().map(|row| row[rank]).sum();
        if received.len() != expected {
            return Err(Error::Mismatch {
                detail: format!("dispatch received {} elements, the plan says {expected}", received.len()),
            });
        }
        let (mut exp, mut sources) = (Vec::new(), Vec::new());
        for from in 0..self.placement.devices() {
            for r in plan.routes().iter().filter(|r| r.from == from && r.to == rank) {
                exp.extend(std::iter::repeat_n(r.expert, r.tokens as usize));
                sources.extend(std::iter::repeat_n(from, r.tokens as usize));
            }
        }
        Ok(Dispatched { tokens: received, experts: exp, sources, plan, order, matrix })
    }

    /// Sends the experts' `outputs` (one row of `hidden` per token of `dispatched`, in its
    /// order) back where the tokens came from; returns this device's outputs in the
    /// order of its tokens as given to [`dispatch`](Self::dispatch).
    pub fn combine<T: Element>(
        &self,
        comm: &mut Communicator,
        dispatched: &Dispatched<T>,
        outputs: &[T],
    ) -> Result<Vec<T>> {
        self.combine_start(comm, dispatched, outputs.to_vec())?.wait().0
    }

    /// Puts the outputs that came `back` in the order of this device's tokens.
    pub(super) fn reorder<T: Element>(&self, order: &[usize], back: &[T]) -> Vec<T> {
        let hidden = self.hidden;
        let mut out = vec![T::zeroed(); back.len()];
        for (k, &i) in order.iter().enumerate() {
            out[i * hidden..(i + 1) * hidden].copy_from_slice(&back[k * hidden..(k + 1) * hidden]);
        }
        out
    }
}

/// What dispatch's count exchange settled: the plan, the order this device's tokens
/// go in and the all-to-all's element counts (`matrix[from][to]`).
pub(super) struct Routed {
    pub(super) rank: usize,
    pub(super) plan: Dispatch,
    pub(super) order: Vec<usize>,
    pub(super) matrix: Vec<Vec<usize>>,
}
