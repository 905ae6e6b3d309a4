//! The nccl-tests-style tables of `phalanx bench` (one per collective and group size)
//! and their JSON form.

use serde_json::{json, Value};

use super::collectives::Coll;
use super::rows::Row;

/// The two header lines of an nccl-tests table.
pub(super) fn header() -> String {
    format!(
        "#{:>11} {:>12} {:>8} {:>6} {:>6} {:>11} {:>8} {:>8} {:>6}\n#{:>11} {:>12} {:>8} {:>6} {:>6} {:>11} {:>8} {:>8} {:>6}",
        "size", "count", "type", "redop", "root", "time", "algbw", "busbw", "check", "(B)", "(elements)", "", "", "",
        "(us)", "(GB/s)", "(GB/s)", ""
    )
}

/// One line of an nccl-tests table. `count` is the count argument of the call (the
/// per-rank part for reduce-scatter, all-gather and all-to-all, as in nccl-tests), the
/// root -1 where the collective has none.
pub(super) fn line(coll: Coll, n: usize, bytes: usize, secs: f64, checked: bool) -> String {
    let (count, part) = coll.counts(bytes, n);
    let count = if matches!(coll, Coll::ReduceScatter | Coll::AllGather | Coll::AllToAll) { part } else { count };
    let algbw = bytes as f64 / secs / 1e9;
    format!(
        " {:>11} {:>12} {:>8} {:>6} {:>6} {:>11.1} {:>8.3} {:>8.3} {:>6}",
        bytes,
        count,
        "float",
        coll.redop(),
        coll.root().map_or(-1, |r| r as i64),
        secs * 1e6,
        algbw,
        algbw * coll.bus_factor(n),
        if checked { "ok" } else { "WRONG" }
    )
}

/// Every collective's table, one per collective and group size, in `rows`' order.
pub(super) fn print_tables(rows: &[Row]) {
    let mut groups: Vec<(Coll, usize, String)> = rows.iter().map(|r| (r.coll, r.n, r.transport.to_string())).collect();
    groups.sort();
    groups.dedup();
    for (coll, n, transport) in groups {
        println!();
        println!(
            "# {coll}, {n} peer processes, data transport {transport}, f32; time: median over the iterations of the slowest rank"
        );
        println!("{}", header());
        for r in rows.iter().filter(|r| r.coll == coll && r.n == n && r.transport.to_string() == transport) {
            println!("{}", line(coll, n, r.bytes, r.median, r.checked));
        }
    }
}

/// The rows as JSON objects (the `collectives` array of the report).
pub(super) fn rows_json(rows: &[Row]) -> Vec<Value> {
    rows.iter()
        .map(|r| {
            json!({
                "collective": r.coll.name(), "n": r.n, "data_transport": r.transport.to_string(), "size": r.size, "bytes": r.bytes, "iters": r.iters,
                "type": "float", "redop": r.coll.redop(), "root": r.coll.root(),
                "median_secs": r.median, "mean_secs": r.secs, "best_secs": r.best,
                "algbw_gbps": r.algbw(r.median), "busbw_gbps": r.busbw(r.median), "bus_factor": r.coll.bus_factor(r.n),
                "cores": r.cores, "waiting": r.runq, "checked": r.checked,
                // A process's peak so far: the size's own only for all-reduce, which runs first.
                "peak_rss_bytes": (r.coll == Coll::AllReduce).then_some(r.peak_rss),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(coll: Coll, n: usize, bytes: usize, median: f64) -> Row {
        Row {
            coll,
            n,
            transport: super::super::args::Via::default(),
            size: bytes,
            bytes,
            iters: 3,
            secs: median,
            median,
            best: median,
            cores: 1.0,
            runq: 0.0,
            cpu_per_gb: 1.0,
            checked: true,
            peak_rss: 0,
        }
    }

    #[test]
    fn lines_have_nccl_tests_columns_and_bandwidths() {
        let h = header();
        for col in ["size", "count", "type", "redop", "root", "time", "algbw", "busbw", "(us)", "(GB/s)"] {
            assert!(h.contains(col), "{h}");
        }
        // 1 MiB all-reduce in 1 ms with 4 ranks: algbw 1.049 GB/s, busbw 1.5 times that.
        let l = line(Coll::AllReduce, 4, 1 << 20, 1e-3, true);
        let f: Vec<&str> = l.split_whitespace().collect();
        assert_eq!(f, ["1048576", "262144", "float", "sum", "-1", "1000.0", "1.049", "1.573", "ok"]);
        // All-gather: the count is the per-rank part; broadcast: root 0, factor 1.
        let f: Vec<String> =
            line(Coll::AllGather, 4, 1 << 20, 1e-3, false).split_whitespace().map(String::from).collect();
        assert_eq!(f[1..5], ["65536", "float", "none", "-1"]);
        assert_eq!(f[7], "0.786");
        assert_eq!(f[8], "WRONG");
        let f: Vec<String> = line(Coll::Broadcast, 2, 4096, 1e-6, true).split_whitespace().map(String::from).collect();
        assert_eq!(f[4], "0");
        assert_eq!(f[6], f[7]);
        // Header and lines line up: the same column widths.
        assert_eq!(h.lines().next().map(str::len), Some(l.len()));
    }

    #[test]
    fn json_rows_carry_median_bandwidths() {
        let rows = [row(Coll::ReduceScatter, 2, 2_000_000, 2e-3), row(Coll::AllScan, 4, 4096, 1e-3)];
        let v = rows_json(&rows);
        assert_eq!(v[0]["collective"], "reduce-scatter");
        assert_eq!(v[0]["algbw_gbps"].as_f64(), Some(1.0));
        assert_eq!(v[0]["busbw_gbps"].as_f64(), Some(0.5));
        assert_eq!(v[1]["root"], Value::Null);
        assert_eq!(v[1]["redop"], "sum");
        assert_eq!(v[1]["bus_factor"].as_f64(), Some(1.0));
    }
}
