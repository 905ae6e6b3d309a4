//! `phalanx moe-worker`: one device of the FSSDP layer as its own process, joined to a
//! `phalanx master` over QUIC, printing one JSON event per line.
//!
//! Modes: `example` runs the reference's worked example (4 devices, 8 experts) through
//! the layer and reports what every step left; `bench` times FSSDP against static EP
//! as `moe-bench` does, each device a process; `train` trains 8 experts with momentum
//! SGD, each expert's state on its owner and a backup, and goes on through the loss of
//! a device by re-sharding from the backups (`--hang-at` makes this device stop
//! mid-iteration, for a harness to SIGKILL it); `mlp` runs one forward and backward of
//! an MoE layer of 8 MLP experts (`moe_mlp.rs`) with top-1 or top-2 routing.

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use phalanx::moe::{
    place, plan_backups, plan_sharding, Backups, ExpertLayer, ExpertPlacement, MoeLayer, PlaceParams, Sharding,
};
use phalanx::{Communicator, Error};
use serde_json::json;

use crate::moe_bench::{self, MoeBenchArgs};
use crate::moe_data::{self as data, BETA, EXPERTS, LEN, LR};
use crate::moe_mlp::{self as mlp, H};
use crate::{emit, now_ms, settling_options};

/// What a `moe-worker` runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// The reference's worked example: 4 devices, 8 experts, t = m = 2.
    Example,
    /// FSSDP against static EP, timed (the `moe-bench` options apply).
    Bench,
    /// Momentum SGD of 8 experts with backup owners, through the loss of a device.
    Train,
    /// One forward and backward of an MoE layer of 8 MLP experts (`--top-k` 1 or 2).
    Mlp,
}

/// Options of `phalanx moe-worker`.
#[derive(Parser)]
pub struct MoeWorkerArgs {
    /// The master's address (start it with `--initial-peers` the number of devices).
    #[arg(long)]
    master: SocketAddr,
    /// Cluster secret; also read from PHALANX_SECRET.
    #[arg(long, env = "PHALANX_SECRET", hide_env_values = true)]
    secret: Option<String>,
    /// This device's number: its peer id, and so its rank in the first view.
    #[arg(long)]
    device: u64,
    /// What to run.
    #[arg(long, value_enum)]
    mode: Mode,
    /// Iterations of `train`.
    #[arg(long, default_value_t = 6)]
    train_iterations: usize,
    /// In `train`, stop in this iteration after its spAG, before spRS, and wait to be
    /// killed (announced by a `hanging` event).
    #[arg(long)]
    hang_at: Option<usize>,
    /// Experts per token in `mlp` (1 or 2).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=2))]
    top_k: u64,
    /// Heartbeat interval.
    #[arg(long, default_value_t = phalanx::comm::DEFAULT_HEARTBEAT_MS)]
    heartbeat_ms: u64,
    #[command(flatten)]
    bench: MoeBenchArgs,
}

fn err(stage: &str, e: impl std::fmt::Display) -> String {
    format!("{stage}: {e}")
}

pub fn run(args: MoeWorkerArgs) -> Result<(), String> {
    // A loss fails the step; this worker settles the group and plans again itself.
    let options = settling_options(Some(args.device), args.secret.as_deref(), args.heartbeat_ms);
    let mut comm = Communicator::connect(args.master, options).map_err(|e| err("join", e))?;
    // One topology round settles the first view: from here on a view that moves under a
    // step fails it with the retryable `Aborted` (never a false `InvalidArgument`).
    comm.update_topology().map_err(|e| err("settling the first view", e))?;
    let want = match args.mode {
        Mode::Example => 4,
        Mode::Train => 4,
        Mode::Mlp => mlp::DEVICES,
        Mode::Bench => args.bench.devices,
    };
    // The master forms the first view once all devices joined; ranks follow the ids.
    if comm.size() != want || comm.rank() as u64 != args.device {
        return Err(format!(
            "joined as rank {} of {}, expected rank {} of {want}: start the master with --initial-peers {want} and give the devices 0..{want}",
            comm.rank(),
            comm.size(),
            args.device
        ));
    }
    emit(json!({ "event": "joined", "device": args.device, "epoch": comm.epoch(), "t": now_ms() }));
    match args.mode {
        Mode::Example => example(&mut comm),
        Mode::Bench => bench(&mut comm, &args.bench),
        Mode::Train => train(&mut comm, args.train_iterations, args.hang_at),
        Mode::Mlp => mlp_layer(&mut comm, args.top_k as usize),
    }?;
    emit(json!({ "event": "done", "t": now_ms() }));
    comm.leave();
    Ok(())
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// The worked example on this device: spAG, dispatch, the experts (elementwise product
/// with the materialised weights), combine, spRS of `data::example_grads`.
fn example(comm: &mut Communicator) -> Result<(), String> {
    let d = comm.rank();
    let sharding = plan_sharding(&[2; 4], &[MoeLayer::new(8, 1)]).map_err(|e| err("sharding", e))?;
    let loads = [40.0, 5.0, 10.0, 5.0, 20.0, 5.0, 10.0, 5.0];
    let p = place(sharding.owners(0), 4, &loads, PlaceParams { overlap: 2, slots: 2 }, None)
        .map_err(|e| err("placement", e))?;
    let layer = ExpertLayer::new(p.clone(), 2, 2, None).map_err(|e| err("layer", e))?;
    // Owned slots hold the weights, the others a NaN carrying this device's number.
    let mut params: Vec<f32> = (0..8)
        .flat_map(|e| if p.owners()[e] == d { data::weights(e) } else { [f32::from_bits(0x7fc0_0000 | d as u32); 2] })
        .collect();
    // The links' counters around the spAG, each snapshot between barriers (which carry
    // no payload): every frame sent before is in, none sent after has come yet.
    let quiet_traffic = |comm: &mut Communicator| -> Result<phalanx::Traffic, String> {
        comm.barrier().map_err(|e| err("barrier", e))?;
        let t = comm.traffic();
        comm.barrier().map_err(|e| err("barrier", e))?;
        Ok(t)
    };
    let before = quiet_traffic(comm)?;
    layer.materialize(comm, &mut params).map_err(|e| err("spAG", e))?;
    let spag = quiet_traffic(comm)?.since(&before).total();
    let experts = data::routing(d);
    let tokens: Vec<f32> = (0..experts.len()).flat_map(|i| data::token(d, i)).collect();
    let arrived = layer.dispatch(comm, &tokens, &experts).map_err(|e| err("dispatch", e))?;
    let mut outputs = Vec::with_capacity(arrived.tokens.len());
    for (x, &e) in arrived.tokens.chunks(2).zip(&arrived.experts) {
        let w = params.get(layer.expert_range(e)).ok_or_else(|| format!("expert {e} out of range"))?;
        outputs.extend([x[0] * w[0], x[1] * w[1]]);
    }
    let combined = layer.combine(comm, &arrived, &outputs).map_err(|e| err("combine", e))?;
    let mut grads = data::example_grads(d);
    layer.reduce_gradients(comm, &mut grads).map_err(|e| err("spRS", e))?;
    emit(json!({
        "event": "example",
        "device": d,
        "held": p.held(d),
        "transfers": p.transfers(),
        "spag_bytes_sent": spag.bytes_sent,
        "spag_bytes_received": spag.bytes_received,
        "params": bits(&params),
        "experts": arrived.experts,
        "compute": arrived.plan.compute(),
        "combined": bits(&combined),
        "grads": grads,
        "t": now_ms(),
    }));
    Ok(())
}

/// The timed comparison with this process as one device; device 0 prints the table
/// (each iteration's time is the slowest device's).
fn bench(comm: &mut Communicator, args: &MoeBenchArgs) -> Result<(), String> {
    let plans = moe_bench::plans(args)?;
    let d = comm.rank();
    let mine: Vec<Vec<usize>> = plans.routing.iter().map(|it| it.get(d).cloned().unwrap_or_default()).collect();
    let mut slowest = |placements: &[ExpertPlacement]| -> Result<Vec<f64>, String> {
        let times = moe_bench::run_device(comm, placements, &mine, args)?;
        let ns: Vec<u64> = times.iter().map(|t| (t * 1e9) as u64).collect();
        let mut all = vec![0u64; ns.len() * comm.size()];
        comm.all_gather(&ns, &mut all).map_err(|e| err("gathering the times", e))?;
        Ok((0..ns.len())
            .map(|i| all.iter().skip(i).step_by(ns.len()).copied().max().unwrap_or(0) as f64 / 1e9)
            .collect())
    };
    let t_ep = slowest(&plans.ep)?;
    let t_fssdp = slowest(&plans.fssdp)?;
    if d == 0 {
        moe_bench::report(args, &plans, &t_ep, &t_fssdp, "process")?;
    }
    Ok(())
}

/// One forward and backward of the MLP experts' layer on this device: spAG, dispatch,
/// the experts, combine and the gate's mix; then the output gradients dispatched the
/// same way, each expert's weight gradient summed over the rows here in arrival order,
/// the input gradients combined back, and spRS. Reports the outputs, the input
/// gradients and the gradients of the experts this device owns.
fn mlp_layer(comm: &mut Communicator, k: usize) -> Result<(), String> {
    let d = comm.rank();
    let (owners, _, p) = mlp::plan(k)?;
    let layer = ExpertLayer::new(p, mlp::W, H, None).map_err(|e| err("layer", e))?;
    let slot = |v: &[f32], e: usize| -> Result<Vec<f32>, String> {
        v.get(layer.expert_range(e)).map(<[f32]>::to_vec).ok_or_else(|| format!("expert {e} out of range"))
    };
    let mut params = vec![0.0f32; layer.params_len()];
    for e in (0..mlp::EXPERTS).filter(|&e| owners[e] == d) {
        params[layer.expert_range(e)].copy_from_slice(&mlp::expert_weights(e));
    }
    layer.materialize(comm, &mut params).map_err(|e| err("spAG", e))?;
    let (picks, experts) = mlp::rows(d, k);
    let xs: Vec<f32> = picks.iter().flat_map(|&(i, _)| mlp::x_of(d, i)).collect();
    let arrived = layer.dispatch(comm, &xs, &experts).map_err(|e| err("dispatch", e))?;
    let mut ys = Vec::with_capacity(arrived.tokens.len());
    for (x, &e) in arrived.tokens.chunks(H).zip(&arrived.experts) {
        ys.extend(mlp::mlp(&slot(&params, e)?, x).0);
    }
    let y = mlp::mix(&picks, &layer.combine(comm, &arrived, &ys).map_err(|e| err("combine", e))?);

    // Backward: each row's output gradient g_k·c_i goes where its token went.
    let dys: Vec<f32> = picks.iter().flat_map(|&(i, g)| mlp::c_of(d, i).into_iter().map(move |v| g * v)).collect();
    let dy_arrived = layer.dispatch(comm, &dys, &experts).map_err(|e| err("dispatch of dy", e))?;
    if dy_arrived.experts != arrived.experts {
        return Err("the output gradients arrived in another order than the tokens".into());
    }
    let mut grads = vec![0.0f32; layer.params_len()];
    let mut dxs = Vec::with_capacity(arrived.tokens.len());
    for ((x, dy), &e) in arrived.tokens.chunks(H).zip(dy_arrived.tokens.chunks(H)).zip(&arrived.experts) {
        let (dw, dx) = mlp::mlp_backward(&slot(&params, e)?, x, dy);
        for (g, v) in grads[layer.expert_range(e)].iter_mut().zip(dw) {
            *g += v;
        }
        dxs.extend(dx);
    }
    let dx_rows = layer.combine(comm, &dy_arrived, &dxs).map_err(|e| err("combine of dx", e))?;
    let dx = mlp::mix(&picks.iter().map(|&(i, _)| (i, 1.0)).collect::<Vec<_>>(), &dx_rows);
    layer.reduce_gradients(comm, &mut grads).map_err(|e| err("spRS", e))?;
    let owned: Vec<usize> = (0..mlp::EXPERTS).filter(|&e| owners[e] == d).collect();
    let owned_grads: Vec<Vec<u32>> =
        owned.iter().map(|&e| slot(&grads, e).map(|g| bits(&g))).collect::<Result<_, _>>()?;
    emit(json!({
        "event": "mlp", "device": d, "top_k": k, "y": bits(&y), "dx": bits(&dx),
        "owned": owned, "grads": owned_grads, "t": now_ms(),
    }));
    Ok(())
}

/// One device's training state.
struct Device {
    /// Its device number at the start (its data's identity).
    id: usize,
    /// Its device number in `sharding` (its rank in the view the sharding is for).
    rank: usize,
    sharding: Sharding,
    backups: Backups,
    /// Parameters and momentum; an expert's slots mean something where this device owns
    /// or backs it up.
    w: Vec<f32>,
    m: Vec<f32>,
}

impl Device {
    /// One iteration over the current group: spAG to every device, the gradient, spRS
    /// to the owners, the reduced gradient to the backups, the same momentum step on
    /// both. On error `w` and `m` are as they were.
    fn iteration(&mut self, c: &mut Communicator, it: usize, hang: bool) -> Result<(), Error> {
        let (n, rank) = (self.sharding.devices(), self.rank);
        if c.size() != n {
            return Err(Error::Aborted { reason: format!("the view has {} devices, the sharding {n}", c.size()) });
        }
        let everyone: Vec<Vec<usize>> = vec![(0..n).collect(); EXPERTS];
        let p = ExpertPlacement::with_replicas(self.sharding.owners(0), n, &everyone)?;
        let layer = ExpertLayer::new(p, LEN, 1, None)?;
        let mut params = self.w.clone();
        layer.materialize(c, &mut params)?;
        if hang {
            emit(json!({ "event": "hanging", "iteration": it, "t": now_ms() }));
            loop {
                std::thread::park();
            }
        }
        let mut grads: Vec<f32> =
            (0..EXPERTS * LEN).map(|i| data::data(it, self.id, i / LEN, i % LEN) * params[i]).collect();
        layer.reduce_gradients(c, &mut grads)?;
        c.sparse_all_gather(&self.backups.to_sparse(&self.sharding, 0, LEN)?, &mut grads)?;
        for e in 0..EXPERTS {
            if self.sharding.owners(0)[e] == rank || self.backups.of(0, e) == rank {
                let slot = e * LEN..(e + 1) * LEN;
                for ((w, m), g) in self.w[slot.clone()].iter_mut().zip(&mut self.m[slot.clone()]).zip(&grads[slot]) {
                    *m = BETA * *m + g;
                    *w -= LR * *m;
                }
            }
        }
        Ok(())
    }

    /// After a loss: settle the smaller view, find the lost device, take up its experts
    /// from their backups and give the new backups their state.
    fn recover(&mut self, c: &mut Communicator) -> Result<usize, Error> {
        let old = self.sharding.devices();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            match c.update_topology() {
                Ok(()) if c.size() < old => break,
                Ok(()) => {}
                Err(e) if e.is_retryable() => {}
                Err(e) => return Err(e),
            }
            if std::time::Instant::now() > deadline {
                return Err(Error::Aborted { reason: "the group did not shrink within 30 s".into() });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // Who is left, by their numbers in the old sharding.
        let mut ranks = vec![0u64; c.size()];
        c.all_gather(&[self.rank as u64], &mut ranks)?;
        let lost = (0..old)
            .find(|r| !ranks.contains(&(*r as u64)))
            .ok_or_else(|| Error::Mismatch { detail: format!("no device missing from {ranks:?}") })?;
        self.sharding = self.sharding.after_loss(lost, &self.backups)?;
        // A view keeps its members' order: everyone after the lost device moves down one.
        self.rank -= usize::from(self.rank > lost);
        if self.rank != c.rank() {
            return Err(Error::Mismatch {
                detail: format!("rank {} in the view, {} by the sharding", c.rank(), self.rank),
            });
        }
        self.backups = plan_backups(&self.sharding, None)?;
        let to_backups = self.backups.to_sparse(&self.sharding, 0, LEN)?;
        c.sparse_all_gather(&to_backups, &mut self.w)?;
        c.sparse_all_gather(&to_backups, &mut self.m)?;
        Ok(lost)
    }
}

/// Training with backups; reports every failed iteration (with whether the buffers came
/// back as they were), the recovery, and the final state.
fn train(comm: &mut Communicator, iterations: usize, hang_at: Option<usize>) -> Result<(), String> {
    let id = comm.rank();
    let sharding = plan_sharding(&[2; 4], &[MoeLayer::new(EXPERTS, 1)]).map_err(|e| err("sharding", e))?;
    let backups = plan_backups(&sharding, None).map_err(|e| err("backups", e))?;
    let mine = |e: usize| sharding.owners(0)[e] == id || backups.of(0, e) == id;
    let w =
        (0..EXPERTS * LEN).map(|i| if mine(i / LEN) { data::initial(i / LEN, i % LEN) } else { f32::NAN }).collect();
    let m = (0..EXPERTS * LEN).map(|i| if mine(i / LEN) { 0.0 } else { f32::NAN }).collect();
    let mut dev = Device { id, rank: id, sharding, backups, w, m };
    let (mut it, mut failures) = (0, 0);
    while it < iterations {
        let (w, m) = (dev.w.clone(), dev.m.clone());
        match dev.iteration(comm, it, hang_at == Some(it)) {
            Ok(()) => {
                emit(
                    json!({ "event": "iteration", "iteration": it, "devices": dev.sharding.devices(), "t": now_ms() }),
                );
                it += 1;
            }
            Err(e) if e.is_retryable() && failures < 3 => {
                failures += 1;
                let restored = bits(&dev.w) == bits(&w) && bits(&dev.m) == bits(&m);
                emit(json!({
                    "event": "iteration_failed", "iteration": it, "kind": e.kind().name(),
                    "restored": restored, "t": now_ms(),
                }));
                let lost = dev.recover(comm).map_err(|e| err("recovery", e))?;
                emit(json!({
                    "event": "recovered", "lost": lost, "rank": dev.rank,
                    "owners": dev.sharding.owners(0), "t": now_ms(),
                }));
            }
            Err(e) => return Err(err(&format!("iteration {it}"), e)),
        }
    }
    let held: Vec<usize> =
        (0..EXPERTS).filter(|&e| dev.sharding.owners(0)[e] == dev.rank || dev.backups.of(0, e) == dev.rank).collect();
    emit(json!({
        "event": "trained", "id": id, "rank": dev.rank, "devices": dev.sharding.devices(),
        "owners": dev.sharding.owners(0), "held": held, "w": bits(&dev.w), "m": bits(&dev.m), "t": now_ms(),
    }));
    Ok(())
}
