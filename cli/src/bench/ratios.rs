//! The comparison table of `phalanx bench --compare`: per collective, group size and
//! size, phalanx's busbw, each anchor's, and phalanx busbw / anchor busbw.

use serde_json::{json, Value};

use super::compare::AnchorRow;
use super::rows::Row;
use super::show_size;

/// The systems of `anchors`, in a fixed order.
fn systems(anchors: &[AnchorRow]) -> Vec<&'static str> {
    let mut s: Vec<&'static str> =
        ["mpi-shm", "mpi-tcp", "gloo"].into_iter().filter(|name| anchors.iter().any(|a| a.system == *name)).collect();
    for a in anchors {
        if !s.contains(&a.system) {
            s.push(a.system);
        }
    }
    s
}

/// What `system` measured for `row`'s collective, group size and size.
fn anchor_for<'a>(anchors: &'a [AnchorRow], system: &str, row: &Row) -> Option<&'a AnchorRow> {
    anchors.iter().find(|a| a.system == system && a.coll == row.coll && a.n == row.n && a.size == row.size)
}

/// `busbw (ratio)` for one anchor cell: `n/a` where the anchor lacks the collective,
/// `-` where it measured nothing, `WRONG` after a wrong result.
fn cell(row: &Row, anchor: Option<&AnchorRow>) -> (String, String) {
    match anchor {
        None => ("-".into(), "-".into()),
        Some(a) if a.unsupported.is_some() => ("n/a".into(), "n/a".into()),
        Some(a) if !a.checked => ("WRONG".into(), "-".into()),
        Some(a) => (format!("{:.3}", a.busbw()), show_ratio(row.busbw(row.median) / a.busbw())),
    }
}

/// Two decimals, three below 0.1 (phalanx is far behind at small sizes).
fn show_ratio(r: f64) -> String {
    if r < 0.1 {
        format!("{r:.3}")
    } else {
        format!("{r:.2}")
    }
}

/// The comparison table as Markdown lines.
pub(super) fn table(rows: &[Row], anchors: &[AnchorRow]) -> Vec<String> {
    let systems = systems(anchors);
    let mut head = "| collective | n | data transport | size | phalanx busbw GB/s |".to_string();
    let mut rule = "|---|---|---|---|---|".to_string();
    for s in &systems {
        head += &format!(" {s} busbw GB/s | phalanx / {s} |");
        rule += "---|---|";
    }
    let mut out = vec![head, rule];
    for r in rows {
        let mut line =
            format!("| {} | {} | {} | {} | {:.3} |", r.coll, r.n, r.transport, show_size(r.bytes), r.busbw(r.median));
        if !r.checked {
            line = format!("| {} | {} | {} | {} | WRONG |", r.coll, r.n, r.transport, show_size(r.bytes));
        }
        for s in &systems {
            let (bw, ratio) = cell(r, anchor_for(anchors, s, r));
            line += &format!(" {bw} | {ratio} |");
        }
        out.push(line);
    }
    out
}

/// The anchors' rows and the ratios, for the JSON report.
pub(super) fn json(rows: &[Row], anchors: &[AnchorRow]) -> (Vec<Value>, Vec<Value>) {
    let anchor_rows = anchors
        .iter()
        .map(|a| {
            json!({
                "system": a.system, "collective": a.coll.name(), "n": a.n, "size": a.size, "bytes": a.bytes,
                "median_secs": a.unsupported.is_none().then_some(a.median),
                "busbw_gbps": a.unsupported.is_none().then(|| a.busbw()),
                "checked": a.checked, "unsupported": a.unsupported,
            })
        })
        .collect();
    let mut ratios = Vec::new();
    for r in rows {
        for s in systems(anchors) {
            if let Some(a) = anchor_for(anchors, s, r).filter(|a| a.unsupported.is_none() && a.checked && r.checked) {
                ratios.push(json!({
                    "collective": r.coll.name(), "n": r.n, "data_transport": r.transport.to_string(), "size": r.size, "anchor": s,
                    "phalanx_busbw_gbps": r.busbw(r.median), "anchor_busbw_gbps": a.busbw(),
                    "ratio": r.busbw(r.median) / a.busbw(),
                }));
            }
        }
    }
    (anchor_rows, ratios)
}

#[cfg(test)]
mod tests {
    use super::super::collectives::Coll;
    use super::*;

    fn row(coll: Coll, n: usize, bytes: usize, median: f64) -> Row {
        Row {
            coll,
            n,
            transport: super::super::args::Via::default(),
            size: bytes,
            bytes,
            iters: 1,
            secs: median,
            median,
            best: median,
            cores: 0.0,
            runq: 0.0,
            cpu_per_gb: 0.0,
            checked: true,
            peak_rss: 0,
        }
    }

    fn anchor(system: &'static str, coll: Coll, bytes: usize, median: f64, unsupported: bool) -> AnchorRow {
        AnchorRow {
            system,
            coll,
            n: 2,
            size: bytes,
            bytes,
            median,
            checked: true,
            unsupported: unsupported.then(|| "no scan".to_string()),
        }
    }

    #[test]
    fn ratios_are_phalanx_busbw_over_the_anchors() {
        let rows = [row(Coll::AllReduce, 2, 1 << 20, 2e-3), row(Coll::AllScan, 2, 1 << 20, 1e-3)];
        let anchors = [
            anchor("gloo", Coll::AllReduce, 1 << 20, 1e-3, false),
            anchor("mpi-shm", Coll::AllReduce, 1 << 20, 4e-3, false),
            anchor("gloo", Coll::AllScan, 1 << 20, f64::NAN, true),
        ];
        let t = table(&rows, &anchors);
        assert_eq!(
            t[0],
            "| collective | n | data transport | size | phalanx busbw GB/s | mpi-shm busbw GB/s | phalanx / mpi-shm | gloo busbw GB/s | phalanx / gloo |"
        );
        assert_eq!(t[2], "| all-reduce | 2 | auto+shm | 1 MiB | 0.524 | 0.262 | 2.00 | 1.049 | 0.50 |");
        assert_eq!(t[3], "| all-scan | 2 | auto+shm | 1 MiB | 1.049 | - | - | n/a | n/a |");
        let (anchor_rows, ratios) = json(&rows, &anchors);
        assert_eq!(anchor_rows.len(), 3);
        assert_eq!(anchor_rows[2]["busbw_gbps"], Value::Null);
        assert_eq!(ratios.len(), 2);
        assert_eq!(ratios[0]["anchor"], "mpi-shm");
        assert_eq!(ratios[0]["ratio"].as_f64(), Some(2.0));
        assert_eq!(ratios[1]["ratio"].as_f64(), Some(0.5));
    }
}
