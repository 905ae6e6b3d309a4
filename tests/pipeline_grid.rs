//! Pipelines × data-parallel replicas, the optimizer post-validation, commit-or-none
//! iterations and a replacement stage, on in-process peers.
//!
//! A small f32 MLP (8 linear layers, leaky ReLU, `B` and `W` separate) is split over
//! `pp` stages; replica `r` trains micro-batches `r·M .. (r+1)·M`; each stage's
//! gradients are summed over the replicas, checked (inf/NaN, global norm) and stepped
//! with SGD with momentum. After every iteration the weights must equal a
//! single-process run with the same accumulation order, bitwise.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::with_timeout;
use phalanx::comm::ConnectOptions;
use phalanx::membership::master::{MasterConfig, DEFAULT_MAX_PEER_TIMEOUT_MS};
use phalanx::sched::{
    by_name, Committer, Costs, GradStats, Grid, GridMap, Optimistic, Pass, Position, RunError, Runner, Schedule, Stage,
    StageError, Step, Verdict,
};
use phalanx::transport::endpoint::Endpoint;
use phalanx::transport::memnet::MemNetwork;
use phalanx::{Communicator, Error, MasterServer, ReduceOp, SharedState};

const M: usize = 4; // micro-batches per replica and iteration
const LAYERS: usize = 8;
const D: usize = 4;
const ROWS: usize = 2;
const LR: f32 = 0.05;
const MOMENTUM: f32 = 0.9;

fn values(seed: u64, n: usize) -> Vec<f32> {
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

/// The input and target of global micro-batch `g` of iteration `it`.
fn input(it: usize, g: usize) -> Vec<f32> {
    values(1000 + 100 * it as u64 + g as u64, ROWS * D)
}

fn target(it: usize, g: usize) -> Vec<f32> {
    values(50_000 + 100 * it as u64 + g as u64, ROWS * D)
}

fn initial(layer: usize) -> Vec<f32> {
    values(3000 + layer as u64, D * D).iter().map(|w| w * 0.6).collect()
}

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

fn slope(layer: usize, z: f32) -> f32 {
    if layer + 1 == LAYERS || z > 0.0 {
        1.0
    } else {
        0.01
    }
}

/// `(y, z)`: `z = x·W`, `y = act(z)`.
fn forward(layer: usize, w: &[f32], x: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let z = matmul(x, w, ROWS, D, D);
    (z.iter().map(|&v| v * slope(layer, v)).collect(), z)
}

/// `(dx, dz)`.
fn backward(layer: usize, w: &[f32], z: &[f32], dy: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let dz: Vec<f32> = dy.iter().zip(z).map(|(&g, &v)| g * slope(layer, v)).collect();
    (matmul(&dz, &transpose(w, D, D), ROWS, D, D), dz)
}

fn accumulate(acc: &mut [f32], x: &[f32], dz: &[f32]) {
    for (a, g) in acc.iter_mut().zip(matmul(&transpose(x, ROWS, D), dz, D, ROWS, D)) {
        *a += g;
    }
}

fn loss_grad(y: &[f32], t: &[f32]) -> Vec<f32> {
    y.iter().zip(t).map(|(a, b)| a - b).collect()
}

fn layers_of(stage: usize, pp: usize) -> std::ops::Range<usize> {
    stage * LAYERS / pp..(stage + 1) * LAYERS / pp
}

/// SGD with momentum over some layers: `v = μ·v + s·g`, `w -= η·v`.
#[derive(Clone, Debug, PartialEq)]
struct Params {
    w: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
}

impl Params {
    fn initial(layers: std::ops::Range<usize>) -> Params {
        Params { v: layers.clone().map(|_| vec![0f32; D * D]).collect(), w: layers.map(initial).collect() }
    }

    fn step(&mut self, grads: &[Vec<f32>], scale: f32) {
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
struct Faults {
    /// A NaN in this global micro-batch's forward on this stage, in iteration `.0`.
    nan: Option<(usize, usize)>,
    /// Runs and fails at this pass of this micro-batch (a loss mid-iteration).
    fail_at: Option<(Pass, usize)>,
    /// Runs inside the optimistic step (a loss after stepping).
    in_step: Option<Arc<dyn Fn() + Send + Sync>>,
    /// The optimizer fails to step.
    refuse_step: bool,
    on_fail: Option<Arc<dyn Fn() + Send + Sync>>,
}

/// A layer's input `x` and pre-activation `z` for one micro-batch.
type LayerCache = (Vec<f32>, Vec<f32>);

/// One stage of one replica.
struct Mlp {
    layers: std::ops::Range<usize>,
    replica: usize,
    iteration: usize,
    params: Params,
    saved: Option<Params>,
    grads: Vec<Vec<f32>>,
    /// Per micro-batch, each layer's input and pre-activation.
    cache: HashMap<usize, Vec<LayerCache>>,
    dz: HashMap<usize, Vec<Vec<f32>>>,
    out: HashMap<usize, Vec<f32>>,
    faults: Faults,
}

impl Mlp {
    fn new(stage: usize, pp: usize, replica: usize) -> Mlp {
        let layers = layers_of(stage, pp);
        Mlp {
            grads: layers.clone().map(|_| vec![0f32; D * D]).collect(),
            params: Params::initial(layers.clone()),
            layers,
            replica,
            iteration: 0,
            saved: None,
            cache: HashMap::new(),
            dz: HashMap::new(),
            out: HashMap::new(),
            faults: Faults::default(),
        }
    }

    fn global(&self, mb: usize) -> usize {
        self.replica * M + mb
    }

    fn flat_grads(&self) -> Vec<f32> {
        self.grads.concat()
    }

    fn set_grads(&mut self, flat: &[f32]) {
        for (i, g) in self.grads.iter_mut().enumerate() {
            g.copy_from_slice(&flat[i * D * D..(i + 1) * D * D]);
        }
    }

    /// Ends an iteration: gradients and caches cleared for the next.
    fn next(&mut self) {
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

    fn state(&self) -> SharedState {
        let mut s = SharedState::new();
        for (i, l) in self.layers.clone().enumerate() {
            s.insert(&format!("w{l}"), self.params.w[i].clone());
            s.insert(&format!("v{l}"), self.params.v[i].clone());
        }
        s.revision = self.iteration as u64;
        s
    }

    fn load(&mut self, s: &SharedState) {
        for (i, l) in self.layers.clone().enumerate() {
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
        if self.faults.nan == Some((self.iteration, g)) {
            x[0] = f32::NAN;
        }
        let mut cache = Vec::new();
        for (i, l) in self.layers.clone().enumerate() {
            let (y, z) = forward(l, &self.params.w[i], &x);
            cache.push((x, z));
            x = y;
        }
        self.cache.insert(step.mb, cache);
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
        let cache = self.cache.get(&step.mb).ok_or("B before F")?;
        let mut dzs = vec![Vec::new(); cache.len()];
        for (i, l) in self.layers.clone().enumerate().rev() {
            let (dx, dz) = backward(l, &self.params.w[i], &cache[i].1, &dy);
            dzs[i] = dz;
            dy = dx;
        }
        self.dz.insert(step.mb, dzs);
        Ok(dy)
    }

    fn backward_weight(&mut self, step: &Step) -> Result<(), StageError> {
        self.check(Pass::W, step.mb)?;
        let cache = self.cache.remove(&step.mb).ok_or("W before F")?;
        let dz = self.dz.remove(&step.mb).ok_or("W before B")?;
        for (i, g) in self.grads.iter_mut().enumerate() {
            accumulate(g, &cache[i].0, &dz[i]);
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
fn reference(
    schedule: &Schedule,
    dp: usize,
    iterations: usize,
    max_norm: Option<f64>,
    nan: Option<(usize, usize, usize)>,
) -> (Vec<Params>, Vec<Verdict>) {
    let pp = schedule.stages();
    let mut params = Params::initial(0..LAYERS);
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
            for s in 0..pp {
                for a in schedule.stages[s].iter().filter(|a| matches!(a.pass, Pass::W | Pass::BW)) {
                    for l in layers_of(s, pp) {
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
            let own = GradStats::of(&total[layers_of(s, pp)].concat());
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
fn same(mlp: &Mlp, want: &Params) -> bool {
    let bits = |v: &[Vec<f32>]| v.iter().flatten().map(|x| x.to_bits()).collect::<Vec<_>>();
    let range = mlp.layers.clone();
    bits(&mlp.params.w) == bits(&want.w[range.clone()]) && bits(&mlp.params.v) == bits(&want.v[range])
}

/// One iteration of one rank: run, all-reduce over the replicas, commit.
fn iterate(
    comm: &mut Communicator,
    map: &GridMap,
    runner: &Runner,
    mlp: &mut Mlp,
    max_norm: Option<f64>,
) -> Result<Verdict, RunError> {
    runner.run(comm, mlp)?;
    let mut flat = mlp.flat_grads();
    map.all_reduce_gradients(comm, &mut flat, ReduceOp::Sum)?;
    mlp.set_grads(&flat);
    let done = Committer::for_grid(map, runner, max_norm).step(comm, GradStats::of(&flat), mlp)?;
    mlp.next();
    Ok(done.verdict)
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn connect(net: &MemNetwork, port: u16) -> Communicator {
    let net = net.clone();
    let mut options = ConnectOptions::new().peer_id(u64::from(port));
    if port == 101 {
        // The peer the fault tests lose: once cut off, it gives up on the master at
        // once instead of looking for one to rejoin (its thread ends sooner).
        options = options.rejoin_within(None);
    }
    let make = move || Ok(net.endpoint(addr(port)) as Arc<dyn Endpoint>);
    Communicator::connect_with(make, addr(1), options).unwrap()
}

/// `n` networked peers on `net` (ranks in port order 100..), the master on its own runtime.
fn networked(net: &MemNetwork, n: usize) -> (tokio::runtime::Runtime, MasterServer, Vec<Communicator>) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let config = MasterConfig { initial_peers: n, ..MasterConfig::default() };
    let master = rt.block_on(async { MasterServer::spawn(net.endpoint(addr(1)), config) });
    let comms: Vec<Communicator> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..n as u16).map(|i| s.spawn(move || connect(net, 100 + i))).collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(comms.iter().map(Communicator::rank).collect::<Vec<_>>(), (0..n).collect::<Vec<_>>());
    (rt, master, comms)
}

/// Trains `iterations` on `comms` as a `pp × dp` grid and checks every rank's weights
/// against the reference after every iteration. Returns the verdicts seen by rank 0.
fn train(
    comms: &mut [Communicator],
    name: &str,
    grid: Grid,
    iterations: usize,
    max_norm: Option<f64>,
    nan: Option<(usize, usize, usize)>, // (iteration, global mb, stage)
) -> Vec<Verdict> {
    let schedule = by_name(name, grid.pp, M, 1, &Costs::unit(), None).unwrap();
    let ref_nan = nan.map(|(it, g, s)| (it, g, layers_of(s, grid.pp).start));
    let (want, verdicts) = reference(&schedule, grid.dp, iterations, max_norm, ref_nan);
    let seen = common::each(comms, |rank, comm| {
        let map = grid.in_order(rank).unwrap();
        let me = map.me();
        let runner = map.runner(schedule.clone()).unwrap();
        let mut mlp = Mlp::new(me.stage, grid.pp, me.replica);
        if let Some((it, g, s)) = nan {
            if s == me.stage {
                mlp.faults.nan = Some((it, g));
            }
        }
        let mut seen = Vec::new();
        for (it, want) in want.iter().enumerate() {
            let v = iterate(comm, &map, &runner, &mut mlp, max_norm).unwrap_or_else(|e| panic!("rank {rank}: {e}"));
            assert!(same(&mlp, want), "{name} {grid:?} rank {rank} ({me:?}) iteration {it}: weights differ");
            seen.push(v);
        }
        map.finish(comm).unwrap();
        seen
    });
    for s in &seen {
        assert_eq!(s, &verdicts, "every rank takes the reference's verdicts");
    }
    verdicts
}

#[test]
fn a_grid_of_two_stages_by_two_replicas_equals_one_process() {
    with_timeout(60, || {
        let net = MemNetwork::new(16);
        let (_rt, _master, mut comms) = networked(&net, 4);
        let grid = Grid::new(2, 2).unwrap();
        train(&mut comms, "zbh1", grid, 3, None, None);
        train(&mut comms, "1f1b", grid, 2, None, None);
    });
}

#[test]
fn a_grid_of_four_stages_by_two_replicas_equals_one_process() {
    with_timeout(60, || {
        let net = MemNetwork::new(16);
        let (_rt, _master, mut comms) = networked(&net, 8);
        train(&mut comms, "1f1b", Grid::new(4, 2).unwrap(), 3, None, None);
    });
}

/// Clipping at a norm the gradients exceed: every stage redoes its step clipped, and the
/// weights equal the synchronous check's (norm first, then one step), bitwise.
#[test]
fn clipping_after_the_optimistic_step_equals_the_synchronous_check() {
    with_timeout(60, || {
        let mut comms = Communicator::local_group(4, Default::default()).unwrap();
        let verdicts = train(&mut comms, "zbh1", Grid::new(4, 1).unwrap(), 3, Some(1e-3), None);
        assert!(verdicts.iter().all(|v| matches!(v, Verdict::Clip { .. })), "{verdicts:?}");
        // A limit the norm stays under keeps every step.
        let verdicts = train(&mut comms, "1f1b", Grid::new(4, 1).unwrap(), 2, Some(1e9), None);
        assert_eq!(verdicts, vec![Verdict::Keep; 2]);
    });
}

/// A NaN in one micro-batch on stage 2 (of replica 1): no stage of either replica keeps
/// the step of that iteration, and training goes on from the weights before it.
#[test]
fn a_nan_on_one_stage_skips_the_step_on_every_stage() {
    with_timeout(60, || {
        let net = MemNetwork::new(16);
        let (_rt, _master, mut comms) = networked(&net, 8);
        let verdicts = train(&mut comms, "zbh1", Grid::new(4, 2).unwrap(), 3, Some(100.0), Some((1, M + 2, 2)));
        assert_eq!(verdicts, vec![Verdict::Keep, Verdict::Skip, Verdict::Keep]);
    });
}

/// How long a frozen stage sleeps: well past the bound the others must meet.
const FROZEN_FOR: Duration = Duration::from_secs(3);
/// What the bound allows beyond the peer timeout: the master's check interval, the
/// view's way to the peers, a loaded test machine.
const SLACK: Duration = Duration::from_secs(2);

/// Whether `e` is a communication failure of a lost peer.
fn lost(e: &RunError) -> bool {
    matches!(e.comm_error(), Some(Error::PeerLost { .. } | Error::Aborted { .. }))
}

/// Stage 1 of replica 0 freezes inside its optimistic step of iteration 1 (the network
/// stops carrying its frames, as under SIGSTOP), after stage 0 of the same pipeline may
/// have stepped and while replica 1's pipeline steps and settles normally. Every other
/// rank returns a typed error within the peer timeout, and every survivor's weights are
/// those of iteration 0: the steps taken optimistically are undone.
#[test]
fn a_stage_lost_after_stepping_leaves_every_survivor_at_the_last_commit() {
    with_timeout(60, || {
        let net = MemNetwork::with_faults(16, 7, Duration::ZERO);
        let (_rt, _master, comms) = networked(&net, 4);
        let grid = Grid::new(2, 2).unwrap();
        let schedule = by_name("1f1b", 2, M, 1, &Costs::unit(), None).unwrap();
        let (want, _) = reference(&schedule, 2, 1, None, None);
        let frozen_at = Arc::new(std::sync::Mutex::new(None));
        let armed = Arc::new(AtomicBool::new(false));
        let freeze: Arc<dyn Fn() + Send + Sync> = {
            let (net, frozen_at, armed) = (net.clone(), frozen_at.clone(), armed.clone());
            Arc::new(move || {
                if armed.load(Ordering::SeqCst) {
                    net.cut(addr(101));
                    *frozen_at.lock().unwrap() = Some(Instant::now());
                    std::thread::sleep(FROZEN_FOR);
                }
            })
        };
        let results: Vec<(Result<Verdict, RunError>, Instant, bool, usize)> = std::thread::scope(|s| {
            let hs: Vec<_> = comms
                .into_iter()
                .enumerate()
                .map(|(rank, mut comm)| {
                    let (schedule, want, freeze, armed) = (&schedule, &want, freeze.clone(), armed.clone());
                    s.spawn(move || {
                        let map = grid.in_order(rank).unwrap();
                        let runner = map.runner(schedule.clone()).unwrap();
                        let mut mlp = Mlp::new(map.me().stage, 2, map.me().replica);
                        iterate(&mut comm, &map, &runner, &mut mlp, None).unwrap();
                        assert!(same(&mlp, &want[0]));
                        if rank == 1 {
                            mlp.faults.in_step = Some(freeze);
                            armed.store(true, Ordering::SeqCst);
                        }
                        let mut undone = Undos(&mut mlp, 0);
                        let r = iterate_counting(&mut comm, &map, &runner, &mut undone);
                        let undos = undone.1;
                        let at = Instant::now();
                        let kept = same(&mlp, &want[0]);
                        (r, at, kept, undos)
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let frozen_at = frozen_at.lock().unwrap().expect("rank 1 froze");
        let bound = Duration::from_millis(DEFAULT_MAX_PEER_TIMEOUT_MS) + SLACK;
        for (rank, (r, at, kept, undos)) in results.iter().enumerate().filter(|(r, _)| *r != 1) {
            let e = r.as_ref().expect_err("the iteration cannot commit");
            assert!(lost(e), "rank {rank}: {e}");
            let after = at.saturating_duration_since(frozen_at);
            eprintln!("rank {rank} returned {after:?} after the freeze, undid {undos} step(s): {e}");
            assert!(after <= bound, "rank {rank} returned {after:?} after the freeze; bound {bound:?}");
            assert!(kept, "rank {rank} kept a step that the lost stage did not commit");
        }
        // Replica 1 stepped and settled before its vote failed: its steps were undone.
        assert_eq!(results[2].3, 1, "rank 2 undid its step");
        assert_eq!(results[3].3, 1, "rank 3 undid its step");
    });
}

/// Counts the undos of an optimizer.
struct Undos<'a>(&'a mut Mlp, usize);

impl Optimistic for Undos<'_> {
    fn step(&mut self, scale: f32) -> Result<(), StageError> {
        self.0.step(scale)
    }
    fn undo(&mut self) -> Result<(), StageError> {
        self.1 += 1;
        self.0.undo()
    }
}

/// [`iterate`] with the optimizer's undos counted.
fn iterate_counting(
    comm: &mut Communicator,
    map: &GridMap,
    runner: &Runner,
    opt: &mut Undos<'_>,
) -> Result<Verdict, RunError> {
    runner.run(comm, opt.0)?;
    let mut flat = opt.0.flat_grads();
    map.all_reduce_gradients(comm, &mut flat, ReduceOp::Sum)?;
    opt.0.set_grads(&flat);
    let done = Committer::for_grid(map, runner, None).step(comm, GradStats::of(&flat), opt)?;
    opt.0.next();
    Ok(done.verdict)
}

/// pp = 2 × dp = 2: the rank holding stage 1 of replica 0 is lost mid-iteration 2 (its
/// network cut at a forward, then it leaves). The survivors return typed errors with
/// the weights of iteration 1, settle the loss, admit a new peer, place it on the free
/// position (the survivors' ranks renumbered), and it fetches stage 1's weights and
/// momentum from replica 1; iterations 2 and 3 then run again, and every rank's weights
/// equal a run with no fault, bitwise.
#[test]
fn a_replacement_catches_up_from_its_replica_and_the_run_goes_on() {
    with_timeout(60, || lose_and_replace(Grid::new(2, 2).unwrap()));
}

/// pp = 2 × dp = 1: the same loss, but no replica holds stage 1. Every stage saves its
/// state at each commit (here to a map standing for a disk); the newcomer restarts from
/// the lost stage's last committed save, the survivor from its own committed weights
/// (the failed iteration was undone), and the run equals one with no fault.
#[test]
fn with_one_replica_the_run_restarts_from_the_last_commit() {
    with_timeout(60, || lose_and_replace(Grid::new(2, 1).unwrap()));
}

/// Stage states saved at each commit, by stage and replica.
type Saved = std::sync::Mutex<HashMap<Position, SharedState>>;

fn lose_and_replace(grid: Grid) {
    let net = MemNetwork::with_faults(16, 11, Duration::ZERO);
    let (_rt, _master, comms) = networked(&net, grid.size());
    let schedule = by_name("zbh1", 2, M, 1, &Costs::unit(), None).unwrap();
    let (want, _) = reference(&schedule, grid.dp, 4, None, None);
    let saved: Saved = Default::default();
    let save = |mlp: &Mlp, at: Position| saved.lock().unwrap().insert(at, mlp.state());
    let (settled, joiner_go) = std::sync::mpsc::channel::<()>();
    let cut: Arc<dyn Fn() + Send + Sync> = {
        let net = net.clone();
        Arc::new(move || net.cut(addr(101)))
    };
    let lost_at = Position { stage: 1, replica: 0 };
    std::thread::scope(|s| {
        let (schedule, want, save, saved) = (&schedule, &want, &save, &saved);
        let joiner = s.spawn(move || {
            joiner_go.recv_timeout(Duration::from_secs(30)).expect("the survivors settled the loss");
            let mut comm = connect(&net, 200);
            comm.update_topology().unwrap();
            let map = grid.place(&mut comm, None).unwrap();
            assert_eq!(map.me(), lost_at);
            assert_eq!(map.newcomers(), &[lost_at]);
            let mut mlp = Mlp::new(1, 2, 0);
            let mut state = mlp.state();
            if grid.dp > 1 {
                assert!(map.sync_stage_state(&mut comm, &mut state).unwrap(), "the newcomer receives");
            } else {
                let e = map.sync_stage_state(&mut comm, &mut state).unwrap_err();
                assert!(e.to_string().contains("no one holds its state"), "{e}");
                state = saved.lock().unwrap()[&lost_at].clone();
            }
            mlp.load(&state);
            assert_eq!(mlp.iteration, 2);
            assert!(same(&mlp, &want[1]), "the newcomer holds the committed weights and momentum");
            let runner = map.runner(schedule.clone()).unwrap();
            for want in &want[2..] {
                iterate(&mut comm, &map, &runner, &mut mlp, None).unwrap();
                assert!(same(&mlp, want), "the newcomer's weights");
            }
            map.finish(&mut comm).unwrap();
        });
        let hs: Vec<_> = comms
            .into_iter()
            .enumerate()
            .map(|(rank, mut comm)| {
                let (cut, settled) = (cut.clone(), settled.clone());
                s.spawn(move || {
                    let map = grid.in_order(rank).unwrap();
                    let me = map.me();
                    let runner = map.runner(schedule.clone()).unwrap();
                    let mut mlp = Mlp::new(me.stage, 2, me.replica);
                    for want in &want[..2] {
                        iterate(&mut comm, &map, &runner, &mut mlp, None).unwrap();
                        assert!(same(&mlp, want));
                        save(&mlp, me);
                    }
                    if me == lost_at {
                        mlp.faults.fail_at = Some((Pass::F, 1));
                        mlp.faults.on_fail = Some(cut);
                        let e = iterate(&mut comm, &map, &runner, &mut mlp, None).unwrap_err();
                        assert!(matches!(e, RunError::Stage { .. }), "{e}");
                        return; // the lost process: its communicator goes with it
                    }
                    let e = iterate(&mut comm, &map, &runner, &mut mlp, None).unwrap_err();
                    assert!(lost(&e), "rank {rank}: {e}");
                    assert!(same(&mlp, &want[1]), "rank {rank} is at the last commit");
                    assert_eq!(mlp.state(), saved.lock().unwrap()[&me], "rank {rank}: as saved at the last commit");
                    // Discard the failed iteration's gradients and activations.
                    mlp.grads.iter_mut().for_each(|g| g.fill(0.0));
                    mlp.cache.clear();
                    mlp.dz.clear();
                    mlp.out.clear();
                    comm.update_topology().unwrap();
                    if comm.rank() == 0 {
                        settled.send(()).unwrap();
                    }
                    while comm.size() < grid.size() {
                        if comm.peers_pending() > 0 {
                            comm.update_topology().unwrap();
                        } else {
                            std::thread::sleep(Duration::from_millis(5));
                        }
                    }
                    let map = grid.place(&mut comm, Some(me)).unwrap();
                    assert_eq!(map.me(), me);
                    let mut state = mlp.state();
                    if me.stage != lost_at.stage || grid.dp > 1 {
                        assert!(!map.sync_stage_state(&mut comm, &mut state).unwrap());
                    }
                    let runner = map.runner(schedule.clone()).unwrap();
                    for want in &want[2..] {
                        iterate(&mut comm, &map, &runner, &mut mlp, None).unwrap();
                        assert!(same(&mlp, want), "rank {rank}'s weights after the replacement");
                    }
                    map.finish(&mut comm).unwrap();
                })
            })
            .collect();
        for h in hs {
            h.join().unwrap();
        }
        joiner.join().unwrap();
    });
}

/// Stage 1's optimizer fails to step in iteration 1 (a local error, no peer lost): it
/// marks the post-validation broken, so no stage waits for it, every stage returns an
/// error and every stage's weights are those of iteration 0.
#[test]
fn a_stage_that_cannot_step_makes_every_stage_undo() {
    with_timeout(60, || {
        let mut comms = Communicator::local_group(6, Default::default()).unwrap();
        let grid = Grid::new(3, 2).unwrap();
        let schedule = by_name("1f1b", 3, M, 1, &Costs::unit(), None).unwrap();
        let (want, _) = reference(&schedule, 2, 1, None, None);
        let errors = common::each(&mut comms, |rank, comm| {
            let map = grid.in_order(rank).unwrap();
            let runner = map.runner(schedule.clone()).unwrap();
            let mut mlp = Mlp::new(map.me().stage, 3, map.me().replica);
            iterate(comm, &map, &runner, &mut mlp, None).unwrap();
            mlp.faults.refuse_step = rank == 1;
            let e = iterate(comm, &map, &runner, &mut mlp, None).unwrap_err();
            assert!(same(&mlp, &want[0]), "rank {rank} kept a step");
            map.finish(comm).unwrap();
            e
        });
        assert!(matches!(errors[1], RunError::Optimizer { .. }), "{}", errors[1]);
        for (rank, e) in errors.iter().enumerate().filter(|(r, _)| *r != 1) {
            assert!(matches!(e, RunError::Uncommitted { .. }), "rank {rank}: {e}");
        }
        for (rank, e) in errors.iter().enumerate() {
            assert!(e.comm_error().is_none(), "rank {rank}: no peer was lost: {e}");
            eprintln!("rank {rank}: {e}");
        }
    });
}

/// Positions follow what each rank held; newcomers fill the free ones in rank order;
/// two ranks claiming one position get the same error everywhere.
#[test]
fn placing_ranks_by_the_positions_they_held() {
    with_timeout(60, || {
        let grid = Grid::new(2, 2).unwrap();
        let mut comms = Communicator::local_group(4, Default::default()).unwrap();
        let at = |stage, replica| Position { stage, replica };
        let held = [Some(at(1, 1)), None, Some(at(0, 0)), None];
        let maps = common::each(&mut comms, |rank, comm| grid.place(comm, held[rank]).unwrap());
        let mes: Vec<Position> = maps.iter().map(GridMap::me).collect();
        assert_eq!(mes, vec![at(1, 1), at(1, 0), at(0, 0), at(0, 1)]);
        for m in &maps {
            assert_eq!(m.newcomers(), &[at(1, 0), at(0, 1)]);
            assert_eq!((m.pipeline(0), m.pipeline(1)), (vec![2, 1], vec![3, 0]));
            assert_eq!((m.dp_group(0), m.dp_group(1)), (vec![2, 3], vec![0, 1]));
        }
        let clash = [Some(at(0, 0)), Some(at(0, 0)), None, None];
        let errors = common::each(&mut comms, |rank, comm| grid.place(comm, clash[rank]).unwrap_err());
        for (rank, e) in errors.iter().enumerate() {
            assert!(matches!(e, RunError::Invalid(_)) && e.to_string().contains("held by rank 0"), "rank {rank}: {e}");
        }
        let e = grid.place(&mut comms[0], Some(at(2, 0))).unwrap_err();
        assert!(e.to_string().contains("outside"), "{e}");
        common::each(&mut comms, |_, comm| comm.barrier().unwrap());
    });
}
