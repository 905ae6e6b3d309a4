//! `phalanx moe-sim`: the FSSDP simulator over a synthetic Zipf-skewed gate trace,
//! against expert parallelism with a static owner (EP) and FSDP.

use clap::Parser;
use phalanx::moe::{
    plan_backups, plan_sharding, simulate, zipf_trace_shifting, Hosts, MoeLayer, PlaceParams, SimConfig, StrategyStats,
};

/// Options of `phalanx moe-sim`.
#[derive(Parser)]
pub struct MoeSimArgs {
    /// Devices (one expert-parallel rank each).
    #[arg(long, default_value_t = 8)]
    devices: usize,
    /// Experts of the MoE layer.
    #[arg(long, default_value_t = 32)]
    experts: usize,
    /// Zipf exponent of the router's skew (0 is uniform).
    #[arg(long, default_value_t = 1.2)]
    zipf: f64,
    /// Tokens per device and iteration (top-1 routing).
    #[arg(long, default_value_t = 4096)]
    tokens: u64,
    /// Iterations of the trace.
    #[arg(long, default_value_t = 20)]
    iterations: usize,
    /// FSSDP's overlap degree t: experts whose transfer hides under attention.
    #[arg(long, short = 't', default_value_t = 2)]
    overlap: usize,
    /// FSSDP's memory slots m: extra experts a device may hold.
    #[arg(long, short = 'm', default_value_t = 2)]
    slots: usize,
    /// Draw which experts are hot afresh every this many iterations (0: never).
    #[arg(long, default_value_t = 0)]
    shift_every: usize,
    /// Seed of the trace (which expert is hot, and the draws).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Bytes of one expert's parameters [default: an MLP of 1024 → 4096 → 1024 in bf16].
    #[arg(long, default_value_t = 2 * 1024 * 4096 * 2)]
    expert_bytes: u64,
    /// Bytes of one token's hidden state [default: 1024 in bf16].
    #[arg(long, default_value_t = 1024 * 2)]
    token_bytes: u64,
    /// Devices per host, if they share hosts: placement and dispatch then prefer a
    /// host's own replicas.
    #[arg(long)]
    devices_per_host: Option<usize>,
    /// Also print each device's tokens, traffic and memory.
    #[arg(long)]
    per_device: bool,
    /// Calibrate with the gate's output when it pays, one expert's transfer costing this
    /// many tokens of compute (expert size / bandwidth over one token's expert time).
    #[arg(long)]
    calibrate: Option<f64>,
    /// Also plan a backup owner per expert (another host first) and print what keeping
    /// them in step costs.
    #[arg(long)]
    backups: bool,
}

const MIB: f64 = 1024.0 * 1024.0;

fn row(s: &StrategyStats) -> String {
    format!(
        "{:<6} {:>10.1} {:>9.2} {:>11.1} {:>11.1} {:>11.1} {:>11.1} {:>10.1}",
        s.name,
        s.straggler,
        s.imbalance(),
        s.param_bytes / MIB,
        s.token_bytes / MIB,
        s.total_traffic() / MIB,
        s.max_traffic() / MIB,
        s.max_memory() as f64 / MIB,
    )
}

pub fn run(args: MoeSimArgs) -> Result<(), String> {
    let (d, e) = (args.devices, args.experts);
    if d == 0 || e == 0 || args.iterations == 0 || args.tokens == 0 {
        return Err("--devices, --experts, --iterations and --tokens must be at least 1".into());
    }
    let hosts = match args.devices_per_host {
        Some(0) => return Err("--devices-per-host must be at least 1".into()),
        Some(k) => Some(Hosts((0..d).map(|dev| dev / k).collect())),
        None => None,
    };
    // Equal devices, loads unknown at rest: each device owns a contiguous block of
    // experts; the trace's hot experts fall wherever the seed puts them.
    let capacity = (e as u64).div_ceil(d as u64).saturating_mul(args.expert_bytes);
    let sharding =
        plan_sharding(&vec![capacity; d], &[MoeLayer::new(e, args.expert_bytes)]).map_err(|x| x.to_string())?;
    let trace = zipf_trace_shifting(d, e, args.zipf, args.tokens, args.iterations, args.seed, args.shift_every)
        .map_err(|x| x.to_string())?;
    let backups =
        if args.backups { Some(plan_backups(&sharding, hosts.as_ref()).map_err(|x| x.to_string())?) } else { None };
    let config = SimConfig {
        params: PlaceParams { overlap: args.overlap, slots: args.slots },
        expert_bytes: args.expert_bytes,
        token_bytes: args.token_bytes,
        window: phalanx::moe::WINDOW,
        hosts,
        calibrate: args.calibrate,
    };
    let r = simulate(&trace, sharding.owners(0), &config).map_err(|x| x.to_string())?;
    println!(
        "moe-sim: {d} devices, {e} experts, Zipf s = {}, {} tokens per device, {} iterations, t = {}, m = {}, seed {}",
        args.zipf, args.tokens, args.iterations, args.overlap, args.slots, args.seed
    );
    println!(
        "expert {:.1} MiB, token {} B; per iteration: straggler in tokens, traffic in MiB received (forward and backward), memory in MiB of experts held at the peak",
        args.expert_bytes as f64 / MIB,
        args.token_bytes
    );
    println!(
        "{:<6} {:>10} {:>9} {:>11} {:>11} {:>11} {:>11} {:>10}",
        "", "straggler", "imbalance", "param MiB", "token MiB", "traffic MiB", "max dev MiB", "memory MiB"
    );
    for s in [&r.ep, &r.fsdp, &r.fssdp] {
        println!("{}", row(s));
    }
    if args.per_device {
        for s in [&r.ep, &r.fsdp, &r.fssdp] {
            let tokens: Vec<String> = s.compute.iter().map(|x| format!("{x:.0}")).collect();
            let traffic: Vec<String> = s.traffic.iter().map(|x| format!("{:.1}", x / MIB)).collect();
            let memory: Vec<String> = s.memory.iter().map(|&x| format!("{:.1}", x as f64 / MIB)).collect();
            println!("{} tokens per device: {}", s.name, tokens.join(" "));
            println!("{} traffic MiB per device: {}", s.name, traffic.join(" "));
            println!("{} memory MiB per device: {}", s.name, memory.join(" "));
        }
    }
    println!("FSSDP/EP straggler: {:.3} (target <= 0.6)", r.straggler_ratio());
    println!("FSSDP/FSDP traffic: {:.3} (target <= 0.5)", r.traffic_ratio());
    println!(
        "FSSDP replica slots unused per iteration: {:.1} of {}",
        r.unused_slots,
        d * args.slots.min(args.overlap).min(e)
    );
    if let Some(cost) = args.calibrate {
        println!(
            "calibration (an expert transfer = {cost} tokens): ran in {} of {} iterations",
            r.calibrated, r.iterations
        );
    }
    if let Some(b) = &backups {
        let sync = b.sync_bytes(&sharding);
        let total = sync.iter().sum::<u64>() as f64;
        let at_rest =
            (0..d).map(|dev| b.backed_up_by(dev, 0).len()).max().unwrap_or(0) as f64 * args.expert_bytes as f64;
        println!(
            "backups: {:.1} MiB per iteration to keep them in step ({:.3} of FSSDP's traffic), {:.1} MiB more at rest on the fullest device",
            total / MIB,
            total / r.fssdp.total_traffic(),
            at_rest / MIB
        );
    }
    Ok(())
}
