//! `phalanx pipeline`: generates a pipeline schedule, checks it and prints its simulated
//! timeline, bubble and peak memory per stage.

use clap::Parser;
use std::time::Instant;

use phalanx::sched::{by_name, simulate, validate, Costs, Pass, Schedule, Timeline};

/// Options of `phalanx pipeline`.
#[derive(Parser)]
pub struct PipelineArgs {
    /// The schedule: 1f1b, interleaved (with --chunks), zbh1, zb2p (the automatic
    /// scheduler at 2p micro-batches of memory), auto (the automatic scheduler under
    /// --memory-limit), zbv, vhalf or vmin.
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
    /// micro-batches' worth; the automatic scheduler (auto) schedules under it.
    #[arg(long)]
    memory_limit: Option<f64>,
    /// Print how long generating, validating and simulating the schedule took instead of
    /// the orders and the timeline (for large pipelines, e.g. 64 stages, 512
    /// micro-batches).
    #[arg(long)]
    time: bool,
    /// Also draw the timeline as SVG here, in the style of the zero-bubble paper's
    /// figures (one row per stage; F, B, W and fused BW in their own colours, each pass
    /// labelled with its micro-batch).
    #[arg(long)]
    svg: Option<std::path::PathBuf>,
}

/// The timeline `t` of `schedule` as SVG.
fn svg(schedule: &Schedule, t: &Timeline) -> String {
    let (scale, row) = (40.0, 28.0);
    let width = t.passes.iter().flatten().map(|&(_, _, end)| end).fold(0.0, f64::max) * scale + 80.0;
    let height = row * t.passes.len() as f64 + 40.0;
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width:.0}\" height=\"{height:.0}\" font-family=\"sans-serif\" font-size=\"11\">\n"
    );
    out += &format!("<text x=\"4\" y=\"{:.0}\">{}: bubble {}</text>\n", height - 8.0, schedule.name, t.bubble());
    for (s, passes) in t.passes.iter().enumerate() {
        let y = 8.0 + row * s as f64;
        out += &format!("<text x=\"4\" y=\"{:.0}\">s{s}</text>\n", y + 17.0);
        for &(a, start, end) in passes {
            let colour = match a.pass {
                Pass::F => "#8ecae6",
                Pass::B => "#ffb703",
                Pass::W => "#90be6d",
                Pass::BW => "#f4a261",
            };
            let x = 40.0 + start * scale;
            let w = (end - start) * scale;
            // Later chunks are lighter, as in the papers' V figures.
            let opacity = 1.0 / (1.0 + a.chunk as f64);
            out += &format!(
                "<rect x=\"{x:.1}\" y=\"{y:.0}\" width=\"{w:.1}\" height=\"{:.0}\" fill=\"{colour}\" fill-opacity=\"{opacity:.2}\" stroke=\"#333\" stroke-width=\"0.5\"/>",
                row - 4.0
            );
            out += &format!(
                "<text x=\"{:.1}\" y=\"{:.0}\" text-anchor=\"middle\">{}</text>\n",
                x + w / 2.0,
                y + 16.0,
                a.mb
            );
        }
    }
    out + "</svg>\n"
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
    let started = Instant::now();
    let schedule: Schedule = by_name(&args.schedule, p, m, args.chunks, &costs, args.memory_limit)
        .map_err(|e| format!("--schedule: {e}"))?;
    let generated = started.elapsed();
    validate(&schedule, &costs, args.memory_limit).map_err(|e| e.to_string())?;
    let validated = started.elapsed();
    let t = simulate(&schedule, &costs).map_err(|e| e.to_string())?;
    let simulated = started.elapsed();
    println!(
        "{}: {p} stages, {m} micro-batches, costs F {} B {} W {} comm {}",
        schedule.name, costs.f, costs.b, costs.w, costs.comm
    );
    if args.time {
        let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
        println!(
            "generated in {:.1} ms, validated in {:.1} ms, simulated in {:.1} ms: {:.1} ms in all",
            ms(generated),
            ms(validated - generated),
            ms(simulated - validated),
            ms(simulated)
        );
    } else {
        for s in 0..p {
            println!("s{s}: {}", schedule.order(s));
        }
        let unit = [costs.f, costs.b, costs.w].into_iter().fold(f64::INFINITY, f64::min) / schedule.chunks as f64;
        for s in 0..p {
            println!("|{}|", t.draw(s, unit));
        }
    }
    println!(
        "iteration {} (longest stage span), work per stage {}, bubble {} ({:.1} %); peak activation memory per stage {:?}",
        t.iteration(),
        t.work,
        t.bubble(),
        100.0 * t.bubble() / t.iteration(),
        t.peak_memory
    );
    if let Some(path) = &args.svg {
        std::fs::write(path, svg(&schedule, &t)).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        println!("timeline drawn in {}", path.display());
    }
    Ok(())
}
