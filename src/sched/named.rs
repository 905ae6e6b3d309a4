//! One entry point for the faces (CLI, C, Python): a schedule by its name, so that every
//! face accepts the same names and refuses the same parameters with the same words.

use super::{
    auto_schedule, interleaved_1f1b, one_f_one_b, v_half, v_min, zb_2p, zb_h1, zb_v, Costs, Schedule, ScheduleError,
};

/// The names [`by_name`] accepts, for messages.
pub const SCHEDULE_NAMES: &str = "1f1b, interleaved, zbh1, zb2p, auto, zbv, vhalf or vmin";

/// Generates the schedule `name` (case-insensitive; [`SCHEDULE_NAMES`], with `zb-h1`,
/// `zb-2p`, `zb-v`, `v-half` and `v-min` also accepted) over `p` stages and `m`
/// micro-batches. `chunks` is the interleaved schedule's chunks per stage; `costs` feed
/// the automatic scheduler; `memory_limit` is the limit `auto` schedules under (it needs
/// one). The schedule is not validated here: [`super::validate`] it against the limit.
pub fn by_name(
    name: &str,
    p: usize,
    m: usize,
    chunks: usize,
    costs: &Costs,
    memory_limit: Option<f64>,
) -> Result<Schedule, ScheduleError> {
    match name.to_ascii_lowercase().as_str() {
        "1f1b" => one_f_one_b(p, m),
        "interleaved" => interleaved_1f1b(p, m, chunks),
        "zbh1" | "zb-h1" => zb_h1(p, m),
        "zb2p" | "zb-2p" => zb_2p(p, m, costs),
        "auto" => match memory_limit {
            Some(limit) => auto_schedule(p, m, costs, limit),
            None => Err(ScheduleError::Invalid(
                "the automatic scheduler needs a memory limit (in micro-batches of activations per stage)".into(),
            )),
        },
        "zbv" | "zb-v" => zb_v(p, m),
        "vhalf" | "v-half" => v_half(p, m),
        "vmin" | "v-min" => v_min(p, m),
        other => Err(ScheduleError::Invalid(format!("unknown schedule {other:?}: want {SCHEDULE_NAMES}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_generates_and_auto_needs_a_limit() {
        for name in ["1f1b", "interleaved", "ZBH1", "zb2p", "zb-v", "vhalf", "V-Min"] {
            by_name(name, 4, 8, 2, &Costs::unit(), None).unwrap_or_else(|e| panic!("{name}: {e}"));
        }
        assert_eq!(by_name("auto", 4, 8, 1, &Costs::unit(), Some(8.0)).unwrap().name, "ZB-2p");
        let e = by_name("auto", 4, 8, 1, &Costs::unit(), None).unwrap_err();
        assert!(e.to_string().contains("needs a memory limit"), "{e}");
        let e = by_name("gpipe", 4, 8, 1, &Costs::unit(), None).unwrap_err();
        assert!(e.to_string().contains("vmin"), "{e}");
    }
}
