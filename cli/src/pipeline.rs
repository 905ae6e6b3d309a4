//! `phalanx pipeline`: generates a pipeline schedule, checks it and prints its simulated
//! timeline, bubble and peak memory per stage.

use clap::Parser;
use phalanx::sched::{interleaved_1f1b, one_f_one_b, simulate, validate, zb_h1, zb_v, Costs, Schedule};

/// Options of `phalanx pipeline`.
#[derive(Parser)]
pub struct PipelineArgs {
    /// The schedule: 1f1b, interleaved (with --chunks), zbh1 or zbv (V-Half, V-Min and
    /// the automatic scheduler are still to come).
    #[arg(long, default_value = "zbh1")]
    schedule: String,
    /// Pipeline stages.
    #[arg(long, default_value_t = 4)]
    stages: usize,
    /// Micro-batches per iteration.
    #[arg(long, default_value_t = 8)]
    microbatches: usize,
    /// Model chunks per stage, for the interleaved schedule.
    #[arg(long, default_value_t = 2)]
    chunks: usize,
    /// Costs of a forward, an input-gradient and a weight-gradient pass, and of moving one
    /// activation or gradient between stages: F,B,W,COMM.
    #[arg(long, default_value = "1,1,1,0")]
    costs: String,
    /// Refuse a schedule that holds more activation memory on a stage than this many
    /// micro-batches' worth.
    #[arg(long)]
    memory_limit: Option<f64>,
}

fn costs(text: &str) -> Result<Costs, String> {
    let v: Vec<f64> = text
        .split(',')
        .map(|x| x.trim().parse::<f64>().map_err(|e| format!("--costs {text:?}: {e}")))
        .collect::<Result<_, _>>()?;
    match v[..] {
        [f, b, w, comm] if v.iter().all(|c| c.is_finite() && *c >= 0.0) && f > 0.0 && b > 0.0 && w > 0.0 => {
            Ok(Costs { f, b, w, comm, w_memory: 0.0 })
        }
        _ => Err(format!("--costs {text:?}: want four costs F,B,W,COMM, the passes positive")),
    }
}

pub fn run(args: PipelineArgs) -> Result<(), String> {
    let costs = costs(&args.costs)?;
    let (p, m) = (args.stages, args.microbatches);
    let schedule: Schedule = match args.schedule.to_ascii_lowercase().as_str() {
        "1f1b" => one_f_one_b(p, m),
        "zbh1" | "zb-h1" => zb_h1(p, m),
        "zbv" | "zb-v" => zb_v(p, m),
        "interleaved" => interleaved_1f1b(p, m, args.chunks),
        other => return Err(format!("--schedule {other:?}: this build has 1f1b, interleaved, zbh1 and zbv")),
    }
    .map_err(|e| e.to_string())?;
    validate(&schedule, &costs, args.memory_limit).map_err(|e| e.to_string())?;
    let t = simulate(&schedule, &costs).map_err(|e| e.to_string())?;
    println!(
        "{}: {p} stages, {m} micro-batches, costs F {} B {} W {} comm {}",
        schedule.name, costs.f, costs.b, costs.w, costs.comm
    );
    for s in 0..p {
        println!("s{s}: {}", schedule.order(s));
    }
    let unit = [costs.f, costs.b, costs.w].into_iter().fold(f64::INFINITY, f64::min) / schedule.chunks as f64;
    for s in 0..p {
        println!("|{}|", t.draw(s, unit));
    }
    println!(
        "iteration {} (longest stage span), work per stage {}, bubble {} ({:.1} %); peak activation memory per stage {:?}",
        t.iteration(),
        t.work,
        t.bubble(),
        100.0 * t.bubble() / t.iteration(),
        t.peak_memory
    );
    Ok(())
}
