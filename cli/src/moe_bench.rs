//! `phalanx moe-bench`: the FSSDP layer against static expert parallelism (EP), timed
//! side by side in one run on an in-process group, with compute proportional to tokens
//! (a calibrated sleep per token, so that the 2 cores of a small machine are not what
//! is measured).

use std::time::{Duration, Instant};

use clap::Parser;
use phalanx::moe::{
    place, plan_sharding, zipf_trace, ExpertLayer, ExpertPlacement, LoadPredictor, MoeLayer, PlaceParams,
};
use phalanx::Communicator;

/// Options of `phalanx moe-bench`.
#[derive(Parser)]
pub struct MoeBenchArgs {
    /// Devices (peers of one in-process group, a thread each; with `moe-worker`, the
    /// processes of the group).
    #[arg(long, default_value_t = 4)]
    pub devices: usize,
    /// Experts of the layer.
    #[arg(long, default_value_t = 8)]
    experts: usize,
    /// Zipf exponent of the router's skew.
    #[arg(long, default_value_t = 1.2)]
    zipf: f64,
    /// Tokens per device and iteration (top-1).
    #[arg(long, default_value_t = 512)]
    tokens: u64,
    /// Iterations timed (after one untimed warm-up).
    #[arg(long, default_value_t = 8)]
    iterations: usize,
    /// FSSDP's overlap degree t.
    #[arg(long, short = 't', default_value_t = 2)]
    overlap: usize,
    /// FSSDP's memory slots m.
    #[arg(long, short = 'm', default_value_t = 2)]
    slots: usize,
    /// Microseconds of expert compute per token (slept, not spun).
    #[arg(long, default_value_t = 100)]
    us_per_token: u64,
    /// Elements (f32) of one token's hidden state.
    #[arg(long, default_value_t = 64)]
    hidden: usize,
    /// Elements (f32) of one expert's parameters.
    #[arg(long, default_value_t = 4096)]
    expert_len: usize,
    /// Seed of the trace.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

/// One device's iterations under `placements[i]`; returns the seconds each took.
pub(crate) fn run_device(
    comm: &mut Communicator,
    placements: &[ExpertPlacement],
    routing: &[Vec<usize>],
    args: &MoeBenchArgs,
) -> Result<Vec<f64>, String> {
    let d = comm.rank();
    let mut params = vec![d as f32; args.experts * args.expert_len];
    let mut times = Vec::with_capacity(placements.len());
    for (p, experts) in placements.iter().zip(routing) {
        let layer = ExpertLayer::new(p.clone(), args.expert_len, args.hidden, None).map_err(|e| e.to_string())?;
        let start = Instant::now();
        let replicated = p.transfers() > 0;
        if replicated {
            layer.materialize(comm, &mut params).map_err(|e| e.to_string())?;
        }
        let tokens = vec![1.0f32; experts.len() * args.hidden];
        let arrived = layer.dispatch(comm, &tokens, experts).map_err(|e| e.to_string())?;
        // The experts' forward and backward: time in proportion to the tokens here.
        std::thread::sleep(Duration::from_micros(2 * args.us_per_token * arrived.experts.len() as u64));
        layer.combine(comm, &arrived, &arrived.tokens).map_err(|e| e.to_string())?;
        if replicated {
            let mut grads = vec![0.5f32; params.len()];
            layer.reduce_gradients(comm, &mut grads).map_err(|e| e.to_string())?;
        }
        times.push(start.elapsed().as_secs_f64());
    }
    Ok(times)
}

/// Runs every device of a fresh group over `placements`; the iteration times of the
/// slowest device (each iteration ends when its last collective does on all of them).
fn run_group(
    placements: &[ExpertPlacement],
    routing: &[Vec<Vec<usize>>],
    args: &MoeBenchArgs,
) -> Result<Vec<f64>, String> {
    let comms = Communicator::local_group(args.devices, Default::default()).map_err(|e| e.to_string())?;
    let per_device: Vec<Result<Vec<f64>, String>> = std::thread::scope(|s| {
        let hs: Vec<_> = comms
            .into_iter()
            .map(|mut c| {
                s.spawn(move || {
                    let d = c.rank();
                    let mine: Vec<Vec<usize>> = routing.iter().map(|it| it[d].clone()).collect();
                    run_device(&mut c, placements, &mine, args)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap_or_else(|_| Err("a device thread panicked".into()))).collect()
    });
    let per_device: Vec<Vec<f64>> = per_device.into_iter().collect::<Result<_, _>>()?;
    Ok((0..placements.len()).map(|i| per_device.iter().map(|t| t[i]).fold(0.0, f64::max)).collect())
}

/// What both strategies run: the placements of every iteration (after the predictor's
/// warm-up window), each device's tokens' experts per iteration, and the trace.
pub(crate) struct Plans {
    pub ep: Vec<ExpertPlacement>,
    pub fssdp: Vec<ExpertPlacement>,
    /// `routing[i][d]`: device `d`'s tokens' experts in iteration `i`.
    pub routing: Vec<Vec<Vec<usize>>>,
    /// The gate's counts of the planned iterations: `trace[i][d][e]`.
    trace: Vec<Vec<Vec<u64>>>,
}

/// Plans the benchmark's iterations; every process computes the same plans.
pub(crate) fn plans(args: &MoeBenchArgs) -> Result<Plans, String> {
    let (d, e) = (args.devices, args.experts);
    if d == 0 || e == 0 || args.iterations == 0 || args.hidden == 0 {
        return Err("--devices, --experts, --iterations and --hidden must be at least 1".into());
    }
    let sharding = plan_sharding(&vec![e.div_ceil(d) as u64; d], &[MoeLayer::new(e, 1)]).map_err(|x| x.to_string())?;
    let owners = sharding.owners(0).to_vec();
    // One warm-up iteration, then the timed ones, with a window of history before them
    // so that FSSDP's predictor starts warm.
    let warm = phalanx::moe::WINDOW;
    let n = warm + 1 + args.iterations;
    let trace = zipf_trace(d, e, args.zipf, args.tokens, n, args.seed).map_err(|x| x.to_string())?;
    // Each device's tokens' experts, in a fixed interleaved order.
    let routing: Vec<Vec<Vec<usize>>> = trace[warm..]
        .iter()
        .map(|it| {
            it.iter()
                .map(|counts| {
                    counts.iter().enumerate().flat_map(|(x, &c)| std::iter::repeat_n(x, c as usize)).collect()
                })
                .collect()
        })
        .collect();
    let mut predictor = LoadPredictor::new(e);
    let gate =
        |i: usize| -> Vec<f64> { (0..e).map(|x| trace[i].iter().map(|row| row[x]).sum::<u64>() as f64).collect() };
    for i in 0..warm {
        predictor.observe(&gate(i)).map_err(|x| x.to_string())?;
    }
    let params = PlaceParams { overlap: args.overlap, slots: args.slots };
    let mut fssdp = Vec::new();
    for i in warm..n {
        let loads = predictor.predict_or(&gate(i));
        fssdp.push(place(&owners, d, &loads, params, None).map_err(|x| x.to_string())?);
        predictor.observe(&gate(i)).map_err(|x| x.to_string())?;
    }
    let ep = vec![ExpertPlacement::sharded(&owners, d).map_err(|x| x.to_string())?; fssdp.len()];
    Ok(Plans { ep, fssdp, routing, trace: trace[warm..].to_vec() })
}

/// Prints the comparison: `t_ep` and `t_fssdp` are the per-iteration times of the
/// slowest device (the first, a warm-up, is left out); `how` says where the devices ran.
pub(crate) fn report(
    args: &MoeBenchArgs,
    plans: &Plans,
    t_ep: &[f64],
    t_fssdp: &[f64],
    how: &str,
) -> Result<(), String> {
    let mean = |t: &[f64]| t[1..].iter().sum::<f64>() / (t.len() - 1).max(1) as f64 * 1e3;
    let straggler = |ps: &[ExpertPlacement]| -> Result<f64, String> {
        let mut total = 0u64;
        for (p, it) in ps.iter().zip(&plans.trace).skip(1) {
            total += phalanx::moe::dispatch(p, it, None).map_err(|x| x.to_string())?.straggler();
        }
        Ok(total as f64 / args.iterations as f64)
    };
    println!(
        "moe-bench: {} {how} devices, {} experts, Zipf s = {}, {} tokens per device, {} us per token (forward and backward), t = {}, m = {}",
        args.devices, args.experts, args.zipf, args.tokens, args.us_per_token, args.overlap, args.slots
    );
    println!("strategy  ms/iteration  straggler tokens");
    println!("EP        {:>12.2}  {:>16.1}", mean(t_ep), straggler(&plans.ep)?);
    println!("FSSDP     {:>12.2}  {:>16.1}", mean(t_fssdp), straggler(&plans.fssdp)?);
    println!("FSSDP speed-up over EP: {:.2}x (target >= 1.5)", mean(t_ep) / mean(t_fssdp));
    Ok(())
}

pub fn run(args: MoeBenchArgs) -> Result<(), String> {
    let plans = plans(&args)?;
    let t_ep = run_group(&plans.ep, &plans.routing, &args)?;
    let t_fssdp = run_group(&plans.fssdp, &plans.routing, &args)?;
    report(&args, &plans, &t_ep, &t_fssdp, "in-process")
}
