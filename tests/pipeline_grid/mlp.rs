//! The model of the grid tests: a small f32 MLP of 8 linear layers (leaky ReLU, `B` and
//! `W` computed separately) split over the stages of a pipeline, SGD with momentum with an
//! exact undo, fault injection, and the single-process reference.

use std::collections::HashMap;
use std::sync::Arc;

// The model is `phalanx::pipeline_mlp`'s at another width (`D`, `ROWS`): its
// deterministic values are shared; its layer math is fixed to its own width.
use phalanx::pipeline_mlp::values;
use phalanx::sched::{GradStats, Optimistic, Pass, Schedule, Stage, StageError, Step, Verdict};
use phalanx::SharedState;

pub const M: usize = 4; // micro-batches per replica and iteration
pub const LAYERS: usize = 8;
pub const D: usize = 4;
pub const ROWS: usize = 2;
pub const LR: f32 = 0.05;
pub const MOMENTUM: f32 = 0.9;

/// The input and target of global micro-batch `g` of iteration `it`.
pub fn input(it: usize, g: usize) -> Vec<f32> {
    values(1000 + 100 * it as u64 + g as u64, ROWS * D)
}

pub fn target(it: usize, g: usize) -> Vec<f32> {
    values(50_000 + 100 * it as u64 + g as u64, ROWS * D)
}

pub fn initial(layer: usize) -> Vec<f32> {
    values(3000 + layer as u64, D * D).iter().map(|w| w * 0.6).collect()
}

pub fn matmul(a: &[f32], b: &[f32], n: usize, k: usize, m: usize) -> Vec<f32> {
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

pub fn transpose(a: &[f32], n: usize, m: usize) -> Vec<f32> {
    let mut out = vec![0f32; n * m];
    for i in 0..n {
        for j in 0..m {
            out[j * n + i] = a[i * m + j];
        }
    }
    out
}

pub fn slope(layer: usize, z: f32) -> f32 {
    if layer + 1 == LAYERS || z > 0.0 {
        1.0
    } else {
        0.01
    }
}

/// `(y, z)`: `z = x·W`, `y = act(z)`.
pub fn forward(layer: usize, w: &[f32], x: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let z = matmul(x, w, ROWS, D, D);
    (z.iter().map(|&v| v * slope(layer, v)).collect(), z)
}

/// `(dx, dz)`.
pub fn backward(layer: usize, w: &[f32], z: &[f32], dy: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let dz: Vec<f32> = dy.iter().zip(z).map(|(&g, &v)| g * slope(layer, v)).collect();
    (matmul(&dz, &transpose(w, D, D), ROWS, D, D), dz)
}

pub fn accumulate(acc: &mut [f32], x: &[f32], dz: &[f32]) {
    for (a, g) in acc.iter_mut().zip(matmul(&transpose(x, ROWS, D), dz, D, ROWS, D)) {
        *a += g;
    }
}

pub fn loss_grad(y: &[f32], t: &[f32]) -> Vec<f32> {
    y.iter().zip(t).map(|(a, b)| a - b).collect()
}

/// The layers of virtual stage `v` of `vs`.
pub fn layers_of(v: usize, vs: usize) -> std::ops::Range<usize> {
    v * LAYERS / vs..(v + 1) * LAYERS / vs
}

/// The layers stage `stage` holds (all its chunks), in layer order: the order of its
/// flattened gradients.
pub fn stage_layers(schedule: &Schedule, stage: usize) -> Vec<usize> {
    let vs = schedule.stages() * schedule.chunks;
    let mut layers: Vec<usize> =
        (0..schedule.chunks).flat_map(|c| layers_of(schedule.virtual_stage(stage, c), vs)).collect();
    layers.sort_unstable();
    layers
}

/// SGD with momentum over some layers: `v = μ·v + s·g`, `w -= η·v`.
#[derive(Clone, Debug, PartialEq)]
pub struct Params {
    pub w: Vec<Vec<f32>>,
    pub v: Vec<Vec<f32>>,
}

impl Params {
    pub fn initial(layers: impl Iterator<Item = usize> + Clone) -> Params {
        Params { v: layers.clone().map(|_| vec![0f32; D * D]).collect(), w: layers.map(initial).collect() }
    }

    pub fn step(&mut self, grads: &[Vec<f32>], scale: f32) {
        for ((w, v), g) in self.w.iter_mut().zip(&mut self.v).zip(grads) {
            for ((w, v), &g) in w.iter_mut().zip(v.iter_mut()).zip(g) {
                *v = MOMENTUM * *v + scale * g;
                *w -= LR * *v;
            }
        }
    }
}

/// Fault injection in a stage.
#[derive(Default)]
pub struct Faults {
    /// A NaN in this global micro-batch's forward on this stage, in iteration `.0`.
    pub nan: Option<(usize, usize)>,
    /// Runs and fails at this pass of this micro-batch (a loss mid-iteration).
    pub fail_at: Option<(Pass, usize)>,
    /// Runs inside the optimistic step (a loss after stepping).
    pub in_step: Option<Arc<dyn Fn() + Send + Sync>>,
    /// The optimizer fails to step.
    pub refuse_step: bool,
    pub on_fail: Option<Arc<dyn Fn() + Send + Sync>>,
}

/// A layer's input `x` and pre-activation `z` for one micro-batch.
pub type LayerCache = (Vec<f32>, Vec<f32>);

/// One stage of one replica.
pub struct Mlp {
    /// The layers this stage holds, in layer order.
    pub layers: Vec<usize>,
    /// Per virtual stage, the positions of its layers in `layers`.
    pub parts: HashMap<usize, Vec<usize>>,
    pub replica: usize,
    pub iteration: usize,
    pub params: Params,
    pub saved: Option<Params>,
    pub grads: Vec<Vec<f32>>,
    /// Per (micro-batch, virtual stage), each layer's input and pre-activation.
    pub cache: HashMap<(usize, usize), Vec<LayerCache>>,
    pub dz: HashMap<(usize, usize), Vec<Vec<f32>>>,
    pub out: HashMap<usize, Vec<f32>>,
    pub faults: Faults,
}

impl Mlp {
    pub fn new(schedule: &Schedule, stage: usize, replica: usize) -> Mlp {
        let layers = stage_layers(schedule, stage);
        let vs = schedule.stages() * schedule.chunks;
        let parts = (0..schedule.chunks)
            .map(|c| {
                let v = schedule.virtual_stage(stage, c);
                (v, layers_of(v, vs).map(|l| layers.iter().position(|&x| x == l).unwrap()).collect())
            })
            .collect();
        Mlp {
            grads: layers.iter().map(|_| vec![0f32; D * D]).collect(),
            params: Params::initial(layers.iter().copied()),
            layers,
            parts,
            replica,
            iteration: 0,
            saved: None,
            cache: HashMap::new(),
            dz: HashMap::new(),
            out: HashMap::new(),
            faults: Faults::default(),
        }
    }

    pub fn global(&self, mb: usize) -> usize {
        self.replica * M + mb
    }

    pub fn flat_grads(&self) -> Vec<f32> {
        self.grads.concat()
    }

    pub fn set_grads(&mut self, flat: &[f32]) {
        for (i, g) in self.grads.iter_mut().enumerate() {
            g.copy_from_slice(&flat[i * D * D..(i + 1) * D * D]);
        }
    }

    /// Ends an iteration: gradients and caches cleared for the next.
    pub fn next(&mut self) {
        self.grads.iter_mut().for_each(|g| g.fill(0.0));
        self.cache.clear();
        self.dz.clear();
        self.out.clear();
        self.iteration += 1;
    }

    fn check(&self, pass: Pass, mb: usize) -> Result<(), StageError> {
        if self.faults.fail_at == Some((pass, mb)) {
            if let Some(hook) = &self.faults.on_fail {
                hook();
            }
            return Err(format!("injected failure at {pass:?}{mb}").into());
        }
        Ok(())
    }

    pub fn state(&self) -> SharedState {
        let mut s = SharedState::new();
        for (i, &l) in self.layers.iter().enumerate() {
            s.insert(&format!("w{l}"), self.params.w[i].clone());
            s.insert(&format!("v{l}"), self.params.v[i].clone());
        }
        s.revision = self.iteration as u64;
        s
    }

    pub fn load(&mut self, s: &SharedState) {
        for (i, &l) in self.layers.clone().iter().enumerate() {
            self.params.w[i].copy_from_slice(s.get::<f32>(&format!("w{l}")).unwrap());
            self.params.v[i].copy_from_slice(s.get::<f32>(&format!("v{l}")).unwrap());
        }
        self.iteration = s.revision as usize;
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
        self.check(Pass::F, step.mb)?;
        let g = self.global(step.mb);
        let mut x = if step.is_first() { input(self.iteration, g) } else { x.to_vec() };
        if step.chunk == 0 && self.faults.nan == Some((self.iteration, g)) {
            x[0] = f32::NAN;
        }
        let part = self.parts.get(&step.virtual_stage).ok_or("no such virtual stage")?;
        let mut cache = Vec::new();
        for &i in part {
            let (y, z) = forward(self.layers[i], &self.params.w[i], &x);
            cache.push((x, z));
            x = y;
        }
        self.cache.insert((step.mb, step.virtual_stage), cache);
        if step.is_last() {
            self.out.insert(step.mb, x);
            return Ok(vec![0.0]);
        }
        Ok(x)
    }

    fn backward_input(&mut self, step: &Step, grad_out: &[f32]) -> Result<Vec<f32>, StageError> {
        self.check(Pass::B, step.mb)?;
        let mut dy = if step.is_last() {
            let y = self.out.remove(&step.mb).ok_or("no output")?;
            loss_grad(&y, &target(self.iteration, self.global(step.mb)))
        } else {
            grad_out.to_vec()
        };
        let key = (step.mb, step.virtual_stage);
        let cache = self.cache.get(&key).ok_or("B before F")?;
        let part = self.parts.get(&step.virtual_stage).ok_or("no such virtual stage")?;
        let mut dzs = vec![Vec::new(); cache.len()];
        for (k, &i) in part.iter().enumerate().rev() {
            let (dx, dz) = backward(self.layers[i], &self.params.w[i], &cache[k].1, &dy);
            dzs[k] = dz;
            dy = dx;
        }
        self.dz.insert(key, dzs);
        Ok(dy)
    }

    fn backward_weight(&mut self, step: &Step) -> Result<(), StageError> {
        self.check(Pass::W, step.mb)?;
        let key = (step.mb, step.virtual_stage);
        let cache = self.cache.remove(&key).ok_or("W before F")?;
        let dz = self.dz.remove(&key).ok_or("W before B")?;
        let part = self.parts.get(&step.virtual_stage).ok_or("no such virtual stage")?;
        for (k, &i) in part.iter().enumerate() {
            accumulate(&mut self.grads[i], &cache[k].0, &dz[k]);
        }
        Ok(())
    }

    fn backward(&mut self, step: &Step, grad_out: &[f32]) -> Result<Vec<f32>, StageError> {
        self.check(Pass::BW, step.mb)?;
        let g = self.backward_input(step, grad_out)?;
        self.backward_weight(step)?;
        Ok(g)
    }
}

impl Optimistic for Mlp {
    fn step(&mut self, scale: f32) -> Result<(), StageError> {
        if self.faults.refuse_step {
            return Err("injected optimizer failure".into());
        }
        self.saved = Some(self.params.clone());
        let grads = self.grads.clone();
        self.params.step(&grads, scale);
        if let Some(hook) = &self.faults.in_step {
            hook();
        }
        Ok(())
    }

    fn undo(&mut self) -> Result<(), StageError> {
        self.params = self.saved.take().ok_or("nothing to undo")?;
        Ok(())
    }
}

/// The single-process run: every replica's micro-batches through every layer, each
/// stage's gradients accumulated in the order `schedule` runs its `W`s, summed over the
/// replicas in replica order, checked over the stages from the last to the first, then
/// stepped. Returns the parameters of all layers (as one `Params`) after each iteration
/// and each iteration's verdict.
pub fn reference(
    schedule: &Schedule,
    dp: usize,
    iterations: usize,
    max_norm: Option<f64>,
    nan: Option<(usize, usize, usize)>,
) -> (Vec<Params>, Vec<Verdict>) {
    let pp = schedule.stages();
    let mut params = Params::initial(0..LAYERS);
    let vs = pp * schedule.chunks;
    let (mut out, mut verdicts) = (Vec::new(), Vec::new());
    for it in 0..iterations {
        let mut total = vec![vec![0f32; D * D]; LAYERS];
        for r in 0..dp {
            let mut per_mb = Vec::new();
            for mb in 0..M {
                let g = r * M + mb;
                let mut x = input(it, g);
                let mut cache = Vec::new();
                for l in 0..LAYERS {
                    if nan == Some((it, g, l)) {
                        x[0] = f32::NAN;
                    }
                    let (y, z) = forward(l, &params.w[l], &x);
                    cache.push((x, z));
                    x = y;
                }
                let mut dy = loss_grad(&x, &target(it, g));
                let mut dzs = vec![Vec::new(); LAYERS];
                for l in (0..LAYERS).rev() {
                    let (dx, dz) = backward(l, &params.w[l], &cache[l].1, &dy);
                    dzs[l] = dz;
                    dy = dx;
                }
                per_mb.push(cache.into_iter().map(|(x, _)| x).zip(dzs).collect::<Vec<_>>());
            }
            let mut grads = vec![vec![0f32; D * D]; LAYERS];
            for v in 0..vs {
                let (s, chunk) = schedule.place(v);
                let order =
                    schedule.stages[s].iter().filter(|a| a.chunk == chunk && matches!(a.pass, Pass::W | Pass::BW));
                for a in order {
                    for l in layers_of(v, vs) {
                        accumulate(&mut grads[l], &per_mb[a.mb][l].0, &per_mb[a.mb][l].1);
                    }
                }
            }
            if r == 0 {
                total = grads;
            } else {
                for (t, g) in total.iter_mut().zip(&grads) {
                    for (t, g) in t.iter_mut().zip(g) {
                        *t += g;
                    }
                }
            }
        }
        let stats = (0..pp).rev().fold(None, |acc: Option<GradStats>, s| {
            let own =
                GradStats::of(&stage_layers(schedule, s).iter().flat_map(|&l| total[l].clone()).collect::<Vec<_>>());
            Some(acc.map_or(own, |a| a.combine(own)))
        });
        let verdict = stats.unwrap().verdict(max_norm);
        match verdict {
            Verdict::Keep => params.step(&total, 1.0),
            Verdict::Clip { scale } => params.step(&total, scale),
            Verdict::Skip => {}
        }
        out.push(params.clone());
        verdicts.push(verdict);
    }
    (out, verdicts)
}

/// Whether `mlp`'s parameters are those of the reference's layers, bitwise.
pub fn same(mlp: &Mlp, want: &Params) -> bool {
    let bits = |v: &[Vec<f32>]| v.iter().flatten().map(|x| x.to_bits()).collect::<Vec<_>>();
    let pick = |all: &[Vec<f32>]| mlp.layers.iter().map(|&l| all[l].clone()).collect::<Vec<_>>();
    bits(&mlp.params.w) == bits(&pick(&want.w)) && bits(&mlp.params.v) == bits(&pick(&want.v))
}
