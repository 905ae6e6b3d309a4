//! Backup owners keep FSSDP training going through a lost device: 4 networked peers
//! (master and peers over the in-memory network) train 8 experts with momentum SGD,
//! each expert's parameters and momentum on its owner and, kept in step by a spAG of
//! the reduced gradient, on its backup. Device 2 dies mid-iteration (after spAG, before
//! spRS): the survivors' spRS fails with its buffers as they were; they settle the new
//! view, find who was lost, take up its experts from the backups (`after_loss`), give
//! the new backups their state, redo the iteration over the three of them and go on.
//! Every expert's parameters and momentum at the end equal, bitwise, a single-process
//! run over the same data (all four devices' before the loss, the survivors' after).

use std::time::Duration;

use phalanx::moe::{plan_backups, plan_sharding, ExpertLayer, ExpertPlacement, MoeLayer, Sharding};
use phalanx::{Communicator, Error, RetryPolicy};

mod common;
use common::{cluster, net_group, with_timeout};

const EXPERTS: usize = 8;
const LEN: usize = 3; // elements per expert
const ITERATIONS: usize = 6;
const LOST_AT: usize = 3; // the iteration in which device 2 dies
const LR: f32 = 0.125;
const BETA: f32 = 0.75;

/// A float with a full mantissa, so that sums depend on their order.
fn float(seed: u64) -> f32 {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x5851_f42d_4c95_7f2d;
    x ^= x >> 29;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 32;
    ((x % 2_000_001) as f32 - 1_000_000.0) * 1.1e-6
}

fn initial(e: usize, k: usize) -> f32 {
    1.0 + float((e * LEN + k) as u64)
}

/// Device `device`'s data in iteration `it`: its gradient of expert `e` is this times
/// the expert's parameter (so the materialised parameters matter).
fn data(it: usize, device: usize, e: usize, k: usize) -> f32 {
    float(1 << 20 | (it * 10_000 + device * 1000 + e * LEN + k) as u64)
}

/// The single-process reference: the gradient of each expert summed over the devices
/// taking part, ascending (spRS's order), then the same momentum step.
fn reference() -> (Vec<f32>, Vec<f32>) {
    let mut w: Vec<f32> = (0..EXPERTS * LEN).map(|i| initial(i / LEN, i % LEN)).collect();
    let mut m = vec![0.0f32; EXPERTS * LEN];
    for it in 0..ITERATIONS {
        let devices: &[usize] = if it < LOST_AT { &[0, 1, 2, 3] } else { &[0, 1, 3] };
        for i in 0..EXPERTS * LEN {
            let (e, k) = (i / LEN, i % LEN);
            let g = devices.iter().map(|&d| data(it, d, e, k) * w[i]).reduce(|a, b| a + b).expect("a device");
            m[i] = BETA * m[i] + g;
            w[i] -= LR * m[i];
        }
    }
    (w, m)
}

/// One device's view of the training state.
struct Device {
    /// Its device number at the start (its data's identity).
    id: usize,
    /// Its device number in `sharding` (its rank in the view the sharding was made for).
    rank: usize,
    sharding: Sharding,
    backups: phalanx::moe::Backups,
    /// Parameters and momentum; an expert's slots mean something where this device
    /// owns or backs it up.
    w: Vec<f32>,
    m: Vec<f32>,
}

impl Device {
    /// One iteration over the current group; `die` drops out after the spAG. On error,
    /// `w` and `m` are as they were.
    fn iteration(&mut self, c: &mut Communicator, it: usize, die: bool) -> Result<(), Error> {
        let (n, rank) = (self.sharding.devices(), self.rank);
        if c.size() != n {
            // The view moved before this iteration began: settle it first.
            return Err(Error::Aborted { reason: format!("the view has {} devices, the sharding {n}", c.size()) });
        }
        // P′: every device holds every expert this iteration.
        let everyone: Vec<Vec<usize>> = vec![(0..n).collect(); EXPERTS];
        let p = ExpertPlacement::with_replicas(self.sharding.owners(0), n, &everyone)?;
        let layer = ExpertLayer::new(p, LEN, 1, None)?;
        let mut params = self.w.clone();
        layer.materialize(c, &mut params)?;
        if die {
            return Err(Error::Removed { reason: "dying on purpose".into() });
        }
        let mut grads: Vec<f32> = (0..EXPERTS * LEN).map(|i| data(it, self.id, i / LEN, i % LEN) * params[i]).collect();
        layer.reduce_gradients(c, &mut grads)?;
        // The owner's reduced gradient to the backup, which takes the same step.
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

    /// After a loss: settle the new view, find the lost device, take up its experts
    /// from their backups and give the new backups the state.
    fn recover(&mut self, c: &mut Communicator) -> Result<(), Error> {
        let old_size = self.sharding.devices();
        // Settle the view without the lost device (the library's contract under
        // RetryPolicy::Never: update_topology after every retryable error).
        loop {
            match c.update_topology() {
                Ok(()) if c.size() < old_size => break,
                Ok(()) => std::thread::sleep(Duration::from_millis(20)),
                Err(e) if e.is_retryable() => std::thread::sleep(Duration::from_millis(20)),
                Err(e) => return Err(e),
            }
        }
        // Who is left, by their device numbers in the old sharding, in rank order.
        let mut ranks = vec![0u64; c.size()];
        c.all_gather(&[self.rank as u64], &mut ranks)?;
        let lost = (0..old_size).find(|r| !ranks.contains(&(*r as u64))).expect("one device lost");
        self.sharding = self.sharding.after_loss(lost, &self.backups)?;
        // A view keeps its members' order: everyone after the lost device moves down one.
        self.rank -= usize::from(self.rank > lost);
        assert_eq!(self.rank, c.rank());
        self.backups = plan_backups(&self.sharding, None)?;
        let to_backups = self.backups.to_sparse(&self.sharding, 0, LEN)?;
        c.sparse_all_gather(&to_backups, &mut self.w)?;
        c.sparse_all_gather(&to_backups, &mut self.m)?;
        Ok(())
    }
}

/// What a survivor ends with: its sharding, backups, rank, parameters and momentum.
type Survivor = (Sharding, phalanx::moe::Backups, usize, Vec<f32>, Vec<f32>);

#[test]
fn training_continues_through_a_lost_device_from_the_backups() {
    with_timeout(60, || {
        let cluster = cluster();
        let mut comms = net_group(&cluster, 4, RetryPolicy::Never);
        let sharding = plan_sharding(&[2; 4], &[MoeLayer::new(EXPERTS, 1)]).expect("sharding");
        let backups = plan_backups(&sharding, None).expect("backups");
        let results: Vec<Option<Survivor>> = std::thread::scope(|s| {
            let hs: Vec<_> = comms
                .drain(..)
                .map(|mut c| {
                    let (sharding, backups) = (sharding.clone(), backups.clone());
                    s.spawn(move || {
                        let id = c.rank();
                        let mine = |e: usize| sharding.owners(0)[e] == id || backups.of(0, e) == id;
                        let w = (0..EXPERTS * LEN)
                            .map(|i| if mine(i / LEN) { initial(i / LEN, i % LEN) } else { f32::NAN })
                            .collect();
                        let m = (0..EXPERTS * LEN).map(|i| if mine(i / LEN) { 0.0 } else { f32::NAN }).collect();
                        let mut dev = Device { id, rank: id, sharding, backups, w, m };
                        let mut it = 0;
                        while it < ITERATIONS {
                            let die = id == 2 && it == LOST_AT;
                            let (w, m) = (dev.w.clone(), dev.m.clone());
                            match dev.iteration(&mut c, it, die) {
                                Ok(()) => it += 1,
                                Err(_) if die => return None, // drops its communicator
                                Err(e) => {
                                    assert!(matches!(e, Error::PeerLost { .. } | Error::Aborted { .. }), "{e:?}");
                                    assert_eq!(it, LOST_AT, "only the loss fails an iteration");
                                    assert!(dev.w.iter().zip(&w).all(|(a, b)| a.to_bits() == b.to_bits()));
                                    assert!(dev.m.iter().zip(&m).all(|(a, b)| a.to_bits() == b.to_bits()));
                                    dev.recover(&mut c).expect("recovery");
                                }
                            }
                        }
                        Some((dev.sharding, dev.backups, dev.rank, dev.w, dev.m))
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().expect("device thread")).collect()
        });

        let (w, m) = reference();
        let survivors: Vec<_> = results.into_iter().flatten().collect();
        assert_eq!(survivors.len(), 3);
        for (sharding, backups, rank, dw, dm) in &survivors {
            assert_eq!(sharding.devices(), 3);
            for e in 0..EXPERTS {
                if sharding.owners(0)[e] == *rank || backups.of(0, e) == *rank {
                    let slot = e * LEN..(e + 1) * LEN;
                    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    assert_eq!(
                        bits(&dw[slot.clone()]),
                        bits(&w[slot.clone()]),
                        "parameters of expert {e} on rank {rank}"
                    );
                    assert_eq!(bits(&dm[slot.clone()]), bits(&m[slot]), "momentum of expert {e} on rank {rank}");
                }
            }
        }
        // Every expert, those of the lost device included, has an owner among the survivors.
        let (sharding, ..) = &survivors[0];
        assert!(sharding.owners(0).iter().all(|&o| o < 3));
        assert!(sharding.owned(2, 0).len() + sharding.owned(1, 0).len() + sharding.owned(0, 0).len() == EXPERTS);
    });
}
