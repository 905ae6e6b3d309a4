//! The small f32 MLP the pipeline tests train (issue 12): 8 linear layers of width
//! [`D`] with a leaky ReLU between them, split over the virtual stages of a schedule,
//! its input gradient (`B`: `dx = dz·Wᵀ`) and weight gradient (`W`: `dW += xᵀ·dz`)
//! computed separately, so that zero-bubble schedules can move `W`.
//!
//! [`Mlp`] is one stage's share as a [`Stage`] for the [`crate::sched::Runner`];
//! [`reference_gradients`] is the same model in one process, every weight gradient
//! accumulated over the micro-batches in the order the schedule runs that virtual
//! stage's `W` (or `BW`) passes, so that a pipelined run equals it bitwise. Both the
//! in-process runner tests and the `phalanx pipeline-worker` processes use it.

use std::collections::{BTreeMap, HashMap};

use crate::sched::{Pass, Schedule, Stage, StageError, Step};

/// Linear layers of the model.
pub const LAYERS: usize = 8;
/// The hidden width (every layer is `D × D`).
pub const D: usize = 6;
/// Rows of one micro-batch.
pub const ROWS: usize = 3;
/// The learning rate of [`sgd`].
pub const LR: f32 = 0.05;

/// Deterministic values in [-1, 1) from `seed`.
pub fn values(seed: u64, n: usize) -> Vec<f32> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// The input of micro-batch `mb` in iteration `it` (`ROWS × D`).
pub fn input(it: usize, mb: usize) -> Vec<f32> {
    values(1000 + mb as u64 + 100_000 * it as u64, ROWS * D)
}

/// The target of micro-batch `mb` in iteration `it` (`ROWS × D`).
pub fn target(it: usize, mb: usize) -> Vec<f32> {
    values(2000 + mb as u64 + 100_000 * it as u64, ROWS * D)
}

/// The initial weights of `layer` (`D × D`).
pub fn initial_weights(layer: usize) -> Vec<f32> {
    values(3000 + layer as u64, D * D).iter().map(|w| w * 0.5).collect()
}

/// `a` (n×k) times `b` (k×m).
fn matmul(a: &[f32], b: &[f32], n: usize, k: usize, m: usize) -> Vec<f32> {
    let mut out = vec![0f32; n * m];
    for i in 0..n {
        for j in 0..m {
            let mut s = 0f32;
            for t in 0..k {
                s += a[i * k + t] * b[t * m + j];
            }
            out[i * m + j] = s;
        }
    }
    out
}

fn transpose(a: &[f32], n: usize, m: usize) -> Vec<f32> {
    let mut out = vec![0f32; n * m];
    for i in 0..n {
        for j in 0..m {
            out[j * n + i] = a[i * m + j];
        }
    }
    out
}

/// Leaky ReLU on every layer but the last.
fn act(layer: usize, z: f32) -> f32 {
    if layer + 1 == LAYERS || z > 0.0 {
        z
    } else {
        0.01 * z
    }
}

fn act_grad(layer: usize, z: f32) -> f32 {
    if layer + 1 == LAYERS || z > 0.0 {
        1.0
    } else {
        0.01
    }
}

/// Forward through `layer`: `(y, z)` with `z = x·W`, `y = act(z)`.
pub fn layer_forward(layer: usize, w: &[f32], x: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let z = matmul(x, w, ROWS, D, D);
    (z.iter().map(|&v| act(layer, v)).collect(), z)
}

/// Input gradient through `layer` (B): `(dx, dz)`, `dz = dy ⊙ act'(z)`, `dx = dz·Wᵀ`.
pub fn layer_backward_input(layer: usize, w: &[f32], z: &[f32], dy: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let dz: Vec<f32> = dy.iter().zip(z).map(|(&g, &v)| g * act_grad(layer, v)).collect();
    (matmul(&dz, &transpose(w, D, D), ROWS, D, D), dz)
}

/// Weight gradient of a layer (W): `acc += xᵀ·dz`.
pub fn accumulate_weight(acc: &mut [f32], x: &[f32], dz: &[f32]) {
    let g = matmul(&transpose(x, ROWS, D), dz, D, ROWS, D);
    for (a, g) in acc.iter_mut().zip(g) {
        *a += g;
    }
}

/// Loss `½‖y − t‖²` and its gradient `y − t`.
pub fn loss(y: &[f32], t: &[f32]) -> (f32, Vec<f32>) {
    let d: Vec<f32> = y.iter().zip(t).map(|(a, b)| a - b).collect();
    (0.5 * d.iter().map(|v| v * v).sum::<f32>(), d)
}

/// The layers of virtual stage `v` of `vs` (which must divide [`LAYERS`]).
pub fn layers_of(v: usize, vs: usize) -> std::ops::Range<usize> {
    let per = LAYERS / vs;
    v * per..(v + 1) * per
}

/// One SGD step: `w -= LR · g` for every layer.
pub fn sgd(weights: &mut [Vec<f32>], grads: &[Vec<f32>]) {
    for (w, g) in weights.iter_mut().zip(grads) {
        for (w, g) in w.iter_mut().zip(g) {
            *w -= LR * g;
        }
    }
}

/// A layer's input `x` and pre-activation `z` for one micro-batch.
type LayerCache = (Vec<f32>, Vec<f32>);

/// One virtual stage's state on its stage.
#[derive(Default)]
struct Part {
    layers: Vec<usize>,
    weights: Vec<Vec<f32>>,
    grads: Vec<Vec<f32>>,
    /// Per micro-batch, each layer's input and pre-activation.
    cache: HashMap<usize, Vec<LayerCache>>,
    /// Per micro-batch, each layer's `dz` (from B, for W).
    dz: HashMap<usize, Vec<Vec<f32>>>,
    /// The last virtual stage's outputs, for the loss gradient.
    out: HashMap<usize, Vec<f32>>,
}

/// Called before each pass the runner asks for (`F`, `B`, `W` or a fused `BW`): an
/// error fails the pass (fault injection), and it may block (a frozen stage).
pub type PassHook = Box<dyn FnMut(Pass, &Step) -> Result<(), StageError> + Send>;

/// The chunks (virtual stages) of one stage of the MLP, as a [`Stage`] of `f32`.
pub struct Mlp {
    parts: BTreeMap<usize, Part>,
    iteration: usize,
    /// The last virtual stage's loss per micro-batch, this iteration.
    pub losses: HashMap<usize, f32>,
    hook: Option<PassHook>,
}

impl Mlp {
    /// Stage `stage` of `schedule`, its layers at `weights[layer]` (all [`LAYERS`]).
    pub fn new(schedule: &Schedule, stage: usize, weights: &[Vec<f32>]) -> Mlp {
        let vs = schedule.stages() * schedule.chunks.max(1);
        let parts = (0..schedule.chunks.max(1))
            .map(|c| {
                let v = schedule.virtual_stage(stage, c);
                let layers: Vec<usize> = layers_of(v, vs).collect();
                let part = Part {
                    weights: layers.iter().map(|&l| weights[l].clone()).collect(),
                    grads: vec![vec![0f32; D * D]; layers.len()],
                    layers,
                    ..Part::default()
                };
                (v, part)
            })
            .collect();
        Mlp { parts, iteration: 0, losses: HashMap::new(), hook: None }
    }

    /// Stage `stage` of `schedule` at the [`initial_weights`].
    pub fn initial(schedule: &Schedule, stage: usize) -> Mlp {
        let weights: Vec<Vec<f32>> = (0..LAYERS).map(initial_weights).collect();
        Mlp::new(schedule, stage, &weights)
    }

    /// Calls `hook` before every pass.
    pub fn with_hook(mut self, hook: PassHook) -> Mlp {
        self.hook = Some(hook);
        self
    }

    /// The iteration whose data the next passes read ([`input`], [`target`]).
    pub fn set_iteration(&mut self, it: usize) {
        self.iteration = it;
    }

    /// This stage's layers with their accumulated weight gradients, by layer.
    pub fn grads(&self) -> Vec<(usize, Vec<f32>)> {
        self.layers(|p| &p.grads)
    }

    /// This stage's layers with their weights, by layer.
    pub fn weights(&self) -> Vec<(usize, Vec<f32>)> {
        self.layers(|p| &p.weights)
    }

    fn layers(&self, of: impl Fn(&Part) -> &Vec<Vec<f32>>) -> Vec<(usize, Vec<f32>)> {
        let mut out: Vec<(usize, Vec<f32>)> =
            self.parts.values().flat_map(|p| p.layers.iter().copied().zip(of(p).iter().cloned())).collect();
        out.sort_by_key(|l| l.0);
        out
    }

    /// The optimizer step after an iteration: [`sgd`] on this stage's layers, then the
    /// gradients and losses start again from zero.
    pub fn step(&mut self) {
        for p in self.parts.values_mut() {
            sgd(&mut p.weights, &p.grads);
            p.grads.iter_mut().for_each(|g| g.fill(0.0));
        }
        self.losses.clear();
    }

    fn part(&mut self, step: &Step) -> Result<&mut Part, StageError> {
        self.parts.get_mut(&step.virtual_stage).ok_or_else(|| format!("no virtual stage {}", step.virtual_stage).into())
    }

    fn hook(&mut self, pass: Pass, step: &Step) -> Result<(), StageError> {
        match &mut self.hook {
            Some(hook) => hook(pass, step),
            None => Ok(()),
        }
    }

    fn backward_input_of(&mut self, step: &Step, grad_out: &[f32]) -> Result<Vec<f32>, StageError> {
        let (last, it) = (step.is_last(), self.iteration);
        let part = self.part(step)?;
        let mut dy = if last {
            let y = part.out.remove(&step.mb).ok_or("no output kept")?;
            loss(&y, &target(it, step.mb)).1
        } else {
            grad_out.to_vec()
        };
        let cache = part.cache.remove(&step.mb).ok_or("backward before forward")?;
        let mut dzs = vec![Vec::new(); part.layers.len()];
        for i in (0..part.layers.len()).rev() {
            let (dx, dz) = layer_backward_input(part.layers[i], &part.weights[i], &cache[i].1, &dy);
            dzs[i] = dz;
            dy = dx;
        }
        // Keep the layers' inputs for W.
        part.cache.insert(step.mb, cache);
        part.dz.insert(step.mb, dzs);
        Ok(dy)
    }

    fn backward_weight_of(&mut self, step: &Step) -> Result<(), StageError> {
        let part = self.part(step)?;
        let cache = part.cache.remove(&step.mb).ok_or("W before forward")?;
        let dz = part.dz.remove(&step.mb).ok_or("W before B")?;
        for i in 0..part.layers.len() {
            accumulate_weight(&mut part.grads[i], &cache[i].0, &dz[i]);
        }
        Ok(())
    }
}

impl Stage for Mlp {
    type Elem = f32;

    fn input_len(&self, _: &Step) -> usize {
        ROWS * D
    }

    fn output_len(&self, _: &Step) -> usize {
        ROWS * D
    }

    fn forward(&mut self, step: &Step, x: &[f32]) -> Result<Vec<f32>, StageError> {
        self.hook(Pass::F, step)?;
        let (first, last, it) = (step.is_first(), step.is_last(), self.iteration);
        let part = self.part(step)?;
        let mut x = if first { input(it, step.mb) } else { x.to_vec() };
        let mut cache = Vec::new();
        for (i, &l) in part.layers.iter().enumerate() {
            let (y, z) = layer_forward(l, &part.weights[i], &x);
            cache.push((x, z));
            x = y;
        }
        part.cache.insert(step.mb, cache);
        if last {
            let (l, _) = loss(&x, &target(it, step.mb));
            part.out.insert(step.mb, x);
            self.losses.insert(step.mb, l);
            return Ok(vec![l]);
        }
        Ok(x)
    }

    fn backward_input(&mut self, step: &Step, grad_out: &[f32]) -> Result<Vec<f32>, StageError> {
        self.hook(Pass::B, step)?;
        self.backward_input_of(step, grad_out)
    }

    fn backward_weight(&mut self, step: &Step) -> Result<(), StageError> {
        self.hook(Pass::W, step)?;
        self.backward_weight_of(step)
    }

    fn backward(&mut self, step: &Step, grad_out: &[f32]) -> Result<Vec<f32>, StageError> {
        self.hook(Pass::BW, step)?;
        let g = self.backward_input_of(step, grad_out)?;
        self.backward_weight_of(step)?;
        Ok(g)
    }
}

/// The single-process reference of iteration `it` at `weights` (all [`LAYERS`]): every
/// micro-batch through all layers, then each virtual stage's weight gradients
/// accumulated over the micro-batches in the order `schedule` runs that stage's `W`
/// (or `BW`) passes. Returns per layer its gradient, and the loss summed in
/// micro-batch order.
pub fn reference_gradients(schedule: &Schedule, it: usize, weights: &[Vec<f32>]) -> (Vec<Vec<f32>>, f32) {
    let vs = schedule.stages() * schedule.chunks.max(1);
    let mut total = 0f32;
    let mut per_mb = Vec::new(); // per mb, per layer (x, dz)
    for mb in 0..schedule.microbatches {
        let mut x = input(it, mb);
        let mut cache = Vec::new();
        for (l, w) in weights.iter().enumerate() {
            let (y, z) = layer_forward(l, w, &x);
            cache.push((x, z));
            x = y;
        }
        let (lv, mut dy) = loss(&x, &target(it, mb));
        total += lv;
        let mut dzs = vec![Vec::new(); LAYERS];
        for l in (0..LAYERS).rev() {
            let (dx, dz) = layer_backward_input(l, &weights[l], &cache[l].1, &dy);
            dzs[l] = dz;
            dy = dx;
        }
        per_mb.push(cache.into_iter().map(|(x, _)| x).zip(dzs).collect::<Vec<_>>());
    }
    let mut grads = vec![vec![0f32; D * D]; LAYERS];
    for v in 0..vs {
        let (stage, chunk) = schedule.place(v);
        let order = schedule.stages[stage].iter().filter(|a| a.chunk == chunk && matches!(a.pass, Pass::W | Pass::BW));
        for a in order {
            for l in layers_of(v, vs) {
                accumulate_weight(&mut grads[l], &per_mb[a.mb][l].0, &per_mb[a.mb][l].1);
            }
        }
    }
    (grads, total)
}

/// The weights after `iterations` of training `schedule` in one process: from the
/// [`initial_weights`], per iteration [`reference_gradients`] then [`sgd`]. Entry `i`
/// holds the weights after iteration `i`.
pub fn reference_training(schedule: &Schedule, iterations: usize) -> Vec<Vec<Vec<f32>>> {
    let mut weights: Vec<Vec<f32>> = (0..LAYERS).map(initial_weights).collect();
    (0..iterations)
        .map(|it| {
            let (grads, _) = reference_gradients(schedule, it, &weights);
            sgd(&mut weights, &grads);
            weights.clone()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sched::{by_name, Costs};

    #[test]
    fn the_reference_learns_and_every_layer_moves() {
        let s = by_name("1f1b", 4, 8, 1, &Costs::unit(), None).unwrap();
        let w0: Vec<Vec<f32>> = (0..LAYERS).map(initial_weights).collect();
        let after = reference_training(&s, 3);
        for l in 0..LAYERS {
            assert_ne!(after[0][l], w0[l], "layer {l} did not move");
        }
        // The same data at the trained weights gives a smaller loss.
        let (_, before) = reference_gradients(&s, 0, &w0);
        let (_, trained) = reference_gradients(&s, 0, &after[0]);
        assert!(trained < before, "loss {before} -> {trained}");
    }
}
