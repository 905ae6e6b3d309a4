//! The collectives `phalanx bench --collectives` times, their nccl-tests bus-bandwidth
//! factors, and the checked call each starts with (inputs whose result is known exactly).
//!
//! # Sizes and bandwidths
//!
//! As in nccl-tests, the size `S` of a row is the larger of a rank's input and output
//! buffers (f32 elements): the buffer for all-reduce, broadcast and all-scan, the input
//! (`n` parts) for reduce-scatter, the output (`n` parts) for all-gather, either for
//! all-to-all. Collectives that split the buffer into `n` parts round the element count
//! down to a multiple of `n`. `algbw = S / t` and `busbw = algbw · factor(n)`:
//!
//! | collective | factor | why (nccl-tests' PERFORMANCE.md) |
//! |---|---|---|
//! | all-reduce | 2(n-1)/n | each rank sends and receives `2(n-1)/n · S` at the least |
//! | reduce-scatter | (n-1)/n | `(n-1)/n · S` |
//! | all-gather | (n-1)/n | `(n-1)/n · S` |
//! | broadcast | 1 | the root's `S` crosses each link of a pipelined chain once |
//! | all-to-all | (n-1)/n | `(n-1)` of the `n` parts leave each rank |
//! | all-scan | 1 | ours (nccl-tests has no scan): see below |
//!
//! **All-scan.** Rank `r` needs the combination of ranks `0..r`'s buffers, a full `S`
//! bytes that only its predecessors can supply, so at least `S` bytes reach each rank but
//! rank 0 (a pipelined chain sends exactly that: each link carries the prefix once, like
//! a broadcast). The lower bound on the time is `S / B` for links of bandwidth `B`, so
//! the factor is 1 and busbw is comparable with the link bandwidth, as for broadcast.
//! Recursive doubling (MPI_Scan's algorithm, and phalanx's for small states) sends
//! `⌈log2 n⌉ · S` per rank and so stays further below the link bandwidth.

use std::fmt;
use std::str::FromStr;

use phalanx::comm::ScanOptions;
use phalanx::{Communicator, Error, ReduceOp};

/// One collective of the bench (f32 elements, `Sum` where it reduces, root 0).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum Coll {
    AllReduce,
    ReduceScatter,
    AllGather,
    Broadcast,
    AllToAll,
    AllScan,
}

impl Coll {
    /// Every collective, in the order the tables show them.
    pub(crate) const ALL: [Coll; 6] =
        [Coll::AllReduce, Coll::ReduceScatter, Coll::AllGather, Coll::Broadcast, Coll::AllToAll, Coll::AllScan];

    /// The name on the command line, in the tables, the JSON and the anchors' output.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Coll::AllReduce => "all-reduce",
            Coll::ReduceScatter => "reduce-scatter",
            Coll::AllGather => "all-gather",
            Coll::Broadcast => "broadcast",
            Coll::AllToAll => "all-to-all",
            Coll::AllScan => "all-scan",
        }
    }

    /// busbw / algbw with `n` ranks (see the module docs).
    pub(crate) fn bus_factor(self, n: usize) -> f64 {
        let (n, m) = (n as f64, (n - 1) as f64);
        match self {
            Coll::AllReduce => 2.0 * m / n,
            Coll::ReduceScatter | Coll::AllGather | Coll::AllToAll => m / n,
            Coll::Broadcast | Coll::AllScan => 1.0,
        }
    }

    /// The reduction, as nccl-tests' `redop` column shows it.
    pub(crate) fn redop(self) -> &'static str {
        match self {
            Coll::AllReduce | Coll::ReduceScatter | Coll::AllScan => "sum",
            Coll::AllGather | Coll::Broadcast | Coll::AllToAll => "none",
        }
    }

    /// The root rank, for the collectives that have one (nccl-tests shows -1 otherwise).
    pub(crate) fn root(self) -> Option<usize> {
        (self == Coll::Broadcast).then_some(0)
    }

    /// Whether the buffer is split into `n` parts.
    fn split(self) -> bool {
        matches!(self, Coll::ReduceScatter | Coll::AllGather | Coll::AllToAll)
    }

    /// `(count, part)` for a requested size of `bytes` with `n` ranks: the elements of the
    /// larger buffer, and of one of its `n` parts (`count / n`, rounded down).
    pub(crate) fn counts(self, bytes: usize, n: usize) -> (usize, usize) {
        let part = bytes / 4 / n;
        if self.split() {
            (part * n, part)
        } else {
            (bytes / 4, part)
        }
    }
}

impl fmt::Display for Coll {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Coll {
    type Err = String;
    fn from_str(s: &str) -> Result<Coll, String> {
        let t = s.trim().to_ascii_lowercase().replace('_', "-");
        Coll::ALL.into_iter().find(|c| c.name() == t || c.name().replace('-', "") == t).ok_or_else(|| {
            let names: Vec<&str> = Coll::ALL.iter().map(|c| c.name()).collect();
            format!("unknown collective {s:?}; one of {}", names.join(", "))
        })
    }
}

/// Element `i` of rank `r`'s input in the checked call: small integers, so that sums over
/// many ranks are exact in f32 (the same values as benches/anchors/mpi_bench.c).
fn val(r: usize, i: usize) -> f32 {
    (r + 1 + i % 13) as f32
}

/// The buffers of one collective on one rank: `input` (the in-place buffer of
/// all-reduce, broadcast and all-scan) and `output` (empty for those).
pub(crate) struct Buffers {
    pub(crate) coll: Coll,
    pub(crate) input: Vec<f32>,
    pub(crate) output: Vec<f32>,
    rank: usize,
    n: usize,
    part: usize,
}

impl Buffers {
    /// The inputs of the checked call for `rank` of `n`, for a requested size of `bytes`.
    pub(crate) fn new(coll: Coll, bytes: usize, rank: usize, n: usize) -> Buffers {
        let (count, part) = coll.counts(bytes, n);
        let (input, output): (Vec<f32>, Vec<f32>) = match coll {
            Coll::AllReduce | Coll::AllScan => ((0..count).map(|i| val(rank, i)).collect(), Vec::new()),
            Coll::Broadcast => ((0..count).map(|i| if rank == 0 { val(0, i) } else { 0.0 }).collect(), Vec::new()),
            Coll::ReduceScatter => ((0..count).map(|i| val(rank, i)).collect(), vec![0.0; part]),
            Coll::AllGather => ((0..part).map(|k| (rank * 1000 + k % 1000) as f32).collect(), vec![0.0; count]),
            Coll::AllToAll => {
                let input = (0..n).flat_map(|j| (0..part).map(move |k| (rank * 64 + j + 4096 * (k % 7)) as f32));
                (input.collect(), vec![0.0; count])
            }
        };
        Buffers { coll, input, output, rank, n, part }
    }

    /// Bytes of the larger buffer: the size the row reports.
    pub(crate) fn bytes(&self) -> usize {
        4 * self.input.len().max(self.output.len())
    }

    /// Runs the collective once on these buffers.
    pub(crate) fn call(&mut self, comm: &mut Communicator) -> Result<(), Error> {
        match self.coll {
            Coll::AllReduce => comm.all_reduce(&mut self.input, ReduceOp::Sum),
            Coll::ReduceScatter => comm.reduce_scatter(&self.input, &mut self.output, ReduceOp::Sum),
            Coll::AllGather => comm.all_gather(&self.input, &mut self.output),
            Coll::Broadcast => comm.broadcast(&mut self.input, 0),
            Coll::AllToAll => comm.all_to_all(&self.input, &mut self.output),
            Coll::AllScan => comm.all_scan(&mut self.input, ReduceOp::Sum, ScanOptions::default()),
        }
    }

    /// Whether the buffers hold the exact result of the checked call (after [`Buffers::new`]
    /// and one [`Buffers::call`] on every rank).
    pub(crate) fn check(&self) -> bool {
        let (r, n, part) = (self.rank, self.n, self.part);
        let tri = n * (n + 1) / 2;
        let all = |v: &[f32], want: &dyn Fn(usize) -> usize| v.iter().enumerate().all(|(i, &x)| x == want(i) as f32);
        match self.coll {
            Coll::AllReduce => all(&self.input, &|i| tri + n * (i % 13)),
            Coll::ReduceScatter => all(&self.output, &|k| tri + n * ((r * part + k) % 13)),
            Coll::AllGather => all(&self.output, &|i| (i / part) * 1000 + (i % part) % 1000),
            Coll::Broadcast => all(&self.input, &|i| 1 + i % 13),
            Coll::AllToAll => all(&self.output, &|i| (i / part) * 64 + r + 4096 * ((i % part) % 7)),
            Coll::AllScan => all(&self.input, &|i| (r + 1) * (r + 2) / 2 + (r + 1) * (i % 13)),
        }
    }

    /// Zeros for the timed calls: in-place sums of zeros stay zeros (no overflow, no
    /// denormals), and every collective moves the same bytes whatever the values.
    pub(crate) fn zero(&mut self) {
        self.input.fill(0.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bus_factors_are_those_of_nccl_tests() {
        assert_eq!(Coll::AllReduce.bus_factor(2), 1.0);
        assert_eq!(Coll::AllReduce.bus_factor(4), 1.5);
        assert_eq!(Coll::ReduceScatter.bus_factor(4), 0.75);
        assert_eq!(Coll::AllGather.bus_factor(2), 0.5);
        assert_eq!(Coll::AllToAll.bus_factor(8), 0.875);
        assert_eq!(Coll::Broadcast.bus_factor(4), 1.0);
        assert_eq!(Coll::AllScan.bus_factor(4), 1.0);
    }

    #[test]
    fn names_parse_back_and_unknown_names_say_the_choices() {
        for c in Coll::ALL {
            assert_eq!(c.name().parse::<Coll>(), Ok(c));
        }
        assert_eq!("allreduce".parse::<Coll>(), Ok(Coll::AllReduce));
        assert_eq!("All_Gather".parse::<Coll>(), Ok(Coll::AllGather));
        let e = "reduce".parse::<Coll>().unwrap_err();
        assert!(e.contains("all-scan") && e.contains("\"reduce\""), "{e}");
    }

    #[test]
    fn split_collectives_round_down_to_n_parts() {
        assert_eq!(Coll::AllGather.counts(4096, 3), (1023, 341));
        assert_eq!(Coll::AllReduce.counts(4096, 3), (1024, 341));
        assert_eq!(Buffers::new(Coll::AllGather, 4096, 0, 3).bytes(), 4092);
        assert_eq!(Buffers::new(Coll::ReduceScatter, 4096, 1, 4).bytes(), 4096);
        assert_eq!(Coll::Broadcast.root(), Some(0));
        assert_eq!(Coll::AllToAll.root(), None);
        assert_eq!(Coll::AllGather.redop(), "none");
    }

    /// What the ranks' checked calls would compute, done by hand here: each check accepts
    /// the right result and rejects a changed element.
    #[test]
    fn checks_accept_the_exact_result_and_nothing_else() {
        let n = 3;
        for coll in Coll::ALL {
            let inputs: Vec<Buffers> = (0..n).map(|r| Buffers::new(coll, 96, r, n)).collect();
            for r in 0..n {
                let mut b = Buffers::new(coll, 96, r, n);
                let part = b.part;
                let sum_upto = |last: usize, i: usize| (0..=last).map(|q| inputs[q].input[i]).sum::<f32>();
                match coll {
                    Coll::AllReduce => b.input = (0..b.input.len()).map(|i| sum_upto(n - 1, i)).collect(),
                    Coll::AllScan => b.input = (0..b.input.len()).map(|i| sum_upto(r, i)).collect(),
                    Coll::Broadcast => b.input = inputs[0].input.clone(),
                    Coll::ReduceScatter => b.output = (0..part).map(|k| sum_upto(n - 1, r * part + k)).collect(),
                    Coll::AllGather => b.output = inputs.iter().flat_map(|q| q.input.clone()).collect(),
                    Coll::AllToAll => {
                        b.output = inputs.iter().flat_map(|q| q.input[r * part..(r + 1) * part].to_vec()).collect()
                    }
                }
                assert!(b.check(), "{coll} rank {r}");
                let v = if b.output.is_empty() { &mut b.input } else { &mut b.output };
                v[part / 2] += 1.0;
                assert!(!b.check(), "{coll} rank {r}: a wrong element passed");
            }
        }
    }
}
