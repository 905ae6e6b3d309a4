//! Shared runner of the in-memory benches: the ranks of a local group on their own
//! threads, spawned once and kept across iterations, so that thread spawn and buffer
//! allocation are never measured. Criterion's `iter_custom` tells every rank how many
//! calls to make over a channel and times until all have reported back.
#![allow(dead_code)]

use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use phalanx::{Communicator, Config};

/// One thread per rank of a local group, each running its own step on demand.
pub struct Ranks {
    /// Per-rank "run this many steps" channels; dropping them stops the ranks.
    go: Vec<mpsc::Sender<u64>>,
    /// One message per rank per batch.
    done: mpsc::Receiver<Result<(), String>>,
    threads: Vec<JoinHandle<()>>,
    /// What a step is, for the panic message when one fails.
    what: &'static str,
}

impl Ranks {
    /// Starts a local group of `n` ranks. On its own thread each rank calls
    /// `setup(comm)` once: it builds the rank's buffers and may make a first (checked)
    /// call, and returns the rank's first result with its step, which each later batch
    /// calls as many times as asked, stopping at the first error. Returns the ranks and
    /// their first results in arrival order (rank unknown); panics if a setup failed.
    pub fn start<T, S, F>(n: usize, what: &'static str, setup: F) -> (Ranks, Vec<T>)
    where
        T: Send + 'static,
        S: FnMut(&mut Communicator) -> Result<(), String>,
        F: Fn(&mut Communicator) -> Result<(T, S), String> + Send + Sync + 'static,
    {
        let comms = Communicator::local_group(n, Config::default()).expect("local group");
        let setup = Arc::new(setup);
        let (first_tx, first_rx) = mpsc::channel();
        let (done_tx, done) = mpsc::channel();
        let (mut go, mut threads) = (Vec::new(), Vec::new());
        for mut comm in comms {
            let (go_tx, go_rx) = mpsc::channel::<u64>();
            let (first_tx, done_tx, setup) = (first_tx.clone(), done_tx.clone(), setup.clone());
            go.push(go_tx);
            threads.push(std::thread::spawn(move || {
                let mut step = match setup(&mut comm) {
                    Ok((first, step)) => {
                        let _ = first_tx.send(Ok(first));
                        step
                    }
                    Err(e) => {
                        let _ = first_tx.send(Err(e));
                        return;
                    }
                };
                while let Ok(iters) = go_rx.recv() {
                    let result = (0..iters).try_for_each(|_| step(&mut comm));
                    if done_tx.send(result).is_err() {
                        break;
                    }
                }
            }));
        }
        let firsts = (0..n)
            .map(|_| match first_rx.recv() {
                Ok(Ok(first)) => first,
                Ok(Err(e)) => panic!("{what} failed: {e}"),
                Err(_) => panic!("a rank thread died"),
            })
            .collect();
        (Ranks { go, done, threads, what }, firsts)
    }

    /// Waits for every rank to finish its batch.
    fn wait(&self) {
        for _ in 0..self.go.len() {
            match self.done.recv() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => panic!("{} failed: {e}", self.what),
                Err(_) => panic!("a rank thread died"),
            }
        }
    }

    /// Runs `iters` steps on every rank; the wall time until all are done.
    pub fn run(&self, iters: u64) -> Duration {
        let start = Instant::now();
        for go in &self.go {
            go.send(iters).expect("rank thread alive");
        }
        self.wait();
        start.elapsed()
    }
}

impl Drop for Ranks {
    fn drop(&mut self) {
        self.go.clear();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// The median time per call, in seconds, of the last `last` of criterion's
/// `iter_custom` calls (`(iters, elapsed)` each): the measurement, the earlier calls
/// being warm-up. `None` when there were none.
pub fn median_per_call(samples: &[(u64, Duration)], last: usize) -> Option<f64> {
    let mut per_iter: Vec<f64> = samples[samples.len().saturating_sub(last)..]
        .iter()
        .map(|&(iters, t)| t.as_secs_f64() / iters as f64)
        .collect();
    per_iter.sort_by(f64::total_cmp);
    per_iter.get(per_iter.len() / 2).copied()
}
