//! The FSSDP layer's non-blocking steps across 4 in-process peers: each step started,
//! compute (a sleep) meanwhile, gives bitwise what the blocking step gives; a device
//! lost while a step is pending gives every survivor a typed error and its buffer as
//! it was passed.

use std::time::Duration;

use phalanx::moe::{place, ExpertLayer, ExpertPlacement, PlaceParams};
use phalanx::{Communicator, Config, Error};

mod common;
use common::with_timeout;

/// Runs `f` on every rank of a local group of `n`, each on its own thread; aborts the
/// process if the group takes longer than 30 s.
fn on_group<R: Send>(n: usize, f: impl Fn(&mut Communicator) -> R + Sync) -> Vec<R> {
    with_timeout(30, || {
        let comms = Communicator::local_group(n, Config::default()).expect("local group");
        std::thread::scope(|s| {
            let f = &f;
            let hs: Vec<_> = comms.into_iter().map(|mut c| s.spawn(move || f(&mut c))).collect();
            hs.into_iter().map(|h| h.join().expect("rank thread")).collect()
        })
    })
}

/// The reference's worked example: 8 experts, two per device, e0 and e4 everywhere.
fn example() -> ExpertPlacement {
    let loads = [40.0, 5.0, 10.0, 5.0, 20.0, 5.0, 10.0, 5.0];
    place(&[0, 0, 1, 1, 2, 2, 3, 3], 4, &loads, PlaceParams { overlap: 2, slots: 2 }, None).expect("placement")
}

/// A float with a full mantissa, so that sums depend on their order.
fn float(seed: u64) -> f32 {
    let x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 40;
    (x as f32 / (1u64 << 24) as f32) - 0.5
}

const EXPERT: usize = 3;
const HIDDEN: usize = 3;

/// Device `d`'s parameters: its owned experts' weights, garbage elsewhere.
fn params(p: &ExpertPlacement, d: usize) -> Vec<f32> {
    (0..8 * EXPERT)
        .map(|k| if p.owners()[k / EXPERT] == d { float(k as u64) } else { f32::from_bits(0x7fc0_0000 | d as u32) })
        .collect()
}

/// Device `d`'s tokens: 12, routed by a skewed rule.
fn routing(d: usize) -> (Vec<f32>, Vec<usize>) {
    let experts: Vec<usize> = (0..12).map(|i| [0, 0, 4, 0, 1, 4, 0, 2 * d, 7, 0, 4, 3][i]).collect();
    let tokens = (0..12 * HIDDEN).map(|k| float(1000 * d as u64 + k as u64)).collect();
    (tokens, experts)
}

/// The expert: elementwise product of each token with its expert's weights.
fn compute(layer: &ExpertLayer, params: &[f32], tokens: &[f32], experts: &[usize]) -> Vec<f32> {
    tokens
        .chunks(HIDDEN)
        .zip(experts)
        .flat_map(|(x, &e)| {
            let w = &params[layer.expert_range(e)];
            x.iter().zip(w).map(|(a, b)| a * b).collect::<Vec<_>>()
        })
        .collect()
}

/// Device `d`'s gradients: a full-mantissa value in every slot.
fn grads(d: usize) -> Vec<f32> {
    (0..8 * EXPERT).map(|k| float(7919 * (d as u64 + 1) + k as u64)).collect()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn started_steps_equal_the_blocking_steps_bitwise() {
    let layer = ExpertLayer::new(example(), EXPERT, HIDDEN, None).expect("layer");
    let pause = Duration::from_millis(20);
    let out = on_group(4, |c| {
        let d = c.rank();
        let (tokens, experts) = routing(d);

        // Blocking.
        let mut p = params(layer.placement(), d);
        layer.materialize(c, &mut p).expect("spAG");
        let arrived = layer.dispatch(c, &tokens, &experts).expect("dispatch");
        let outputs = compute(&layer, &p, &arrived.tokens, &arrived.experts);
        let combined = layer.combine(c, &arrived, &outputs).expect("combine");
        let mut g = grads(d);
        layer.reduce_gradients(c, &mut g).expect("spRS");
        let blocking = (bits(&p), bits(&arrived.tokens), arrived.experts.clone(), bits(&combined), bits(&g));

        // Started, with compute (a sleep) between start and wait.
        let pending = layer.materialize_start(c, params(layer.placement(), d)).expect("start spAG");
        std::thread::sleep(pause);
        let (done, p) = pending.wait();
        done.expect("spAG");
        let pending = layer.dispatch_start(c, tokens.clone(), &experts).expect("start dispatch");
        std::thread::sleep(pause);
        let (arrived, given) = pending.wait();
        let arrived = arrived.expect("dispatch");
        assert_eq!(bits(&given), bits(&tokens), "dispatch gives the tokens back");
        let outputs = compute(&layer, &p, &arrived.tokens, &arrived.experts);
        let pending = layer.combine_start(c, &arrived, outputs).expect("start combine");
        std::thread::sleep(pause);
        let (combined, _) = pending.wait();
        let combined = combined.expect("combine");
        let pending = layer.reduce_gradients_start(c, grads(d)).expect("start spRS");
        std::thread::sleep(pause);
        let (done, g) = pending.wait();
        done.expect("spRS");
        let started = (bits(&p), bits(&arrived.tokens), arrived.experts.clone(), bits(&combined), bits(&g));
        (blocking, started)
    });
    for (d, (blocking, started)) in out.iter().enumerate() {
        assert_eq!(blocking, started, "device {d}");
        // The steps did something: replicas are the owner's bytes, and e0's owner
        // holds more than its own gradient.
        assert_eq!(blocking.0[..EXPERT], bits(&params(layer.placement(), 0))[..EXPERT], "device {d}");
        assert!(!blocking.2.is_empty(), "device {d} computed nothing");
    }
    assert_ne!(out[0].0 .4[..EXPERT], bits(&grads(0))[..EXPERT]);
}

/// Two steps in flight at once (spAG of one layer under the spRS of another, as in the
/// backward): both complete, each equal to its blocking form.
#[test]
fn two_layers_steps_in_flight_together() {
    let layer = ExpertLayer::new(example(), EXPERT, HIDDEN, None).expect("layer");
    let out = on_group(4, |c| {
        let d = c.rank();
        let spag = layer.materialize_start(c, params(layer.placement(), d)).expect("start spAG");
        let sprs = layer.reduce_gradients_start(c, grads(d)).expect("start spRS");
        let ((r1, p), (r2, g)) = (spag.wait(), sprs.wait());
        r1.expect("spAG");
        r2.expect("spRS");
        let mut want_p = params(layer.placement(), d);
        layer.materialize(c, &mut want_p).expect("spAG");
        let mut want_g = grads(d);
        layer.reduce_gradients(c, &mut want_g).expect("spRS");
        (bits(&p) == bits(&want_p), bits(&g) == bits(&want_g))
    });
    assert!(out.iter().all(|&(p, g)| p && g), "{out:?}");
}

/// A dispatch started (its count exchange and all-to-all both in the background), then
/// a spAG started and a blocking spRS run before either is waited for: all three
/// complete, each equal to its blocking form.
#[test]
fn a_started_dispatch_lets_other_collectives_run_before_its_wait() {
    let layer = ExpertLayer::new(example(), EXPERT, HIDDEN, None).expect("layer");
    let out = on_group(4, |c| {
        let d = c.rank();
        let (tokens, experts) = routing(d);
        let dispatch = layer.dispatch_start(c, tokens.clone(), &experts).expect("start dispatch");
        let spag = layer.materialize_start(c, params(layer.placement(), d)).expect("start spAG");
        let mut g = grads(d);
        layer.reduce_gradients(c, &mut g).expect("spRS");
        let (arrived, _) = dispatch.wait();
        let arrived = arrived.expect("dispatch");
        let (done, p) = spag.wait();
        done.expect("spAG");

        let want = layer.dispatch(c, &tokens, &experts).expect("dispatch");
        let mut want_p = params(layer.placement(), d);
        layer.materialize(c, &mut want_p).expect("spAG");
        let mut want_g = grads(d);
        layer.reduce_gradients(c, &mut want_g).expect("spRS");
        (
            bits(&arrived.tokens) == bits(&want.tokens) && arrived.experts == want.experts,
            bits(&p) == bits(&want_p),
            bits(&g) == bits(&want_g),
        )
    });
    assert!(out.iter().all(|&(a, p, g)| a && p && g), "{out:?}");
}

/// Device 2 leaves while the others' step is pending (it drops its communicator
/// instead of starting it): every survivor's `wait` gives `PeerLost` or `Aborted` and
/// its buffer exactly as it was passed.
#[test]
fn a_lost_device_while_a_step_is_pending() {
    let layer = ExpertLayer::new(example(), EXPERT, HIDDEN, None).expect("layer");
    for step in 0..4 {
        let out = on_group(4, |c| {
            let d = c.rank();
            let (tokens, experts) = routing(d);
            // Combine needs a dispatch first, with everyone.
            let arrived = (step == 2).then(|| layer.dispatch(c, &tokens, &experts).expect("dispatch"));
            if d == 2 {
                return None;
            }
            let given: Vec<f32> = match &arrived {
                Some(a) => a.tokens.iter().map(|x| x * 2.0).collect(),
                None if step == 3 => tokens.clone(),
                None => grads(d),
            };
            let (err, back) = match (step, &arrived) {
                (0, _) => {
                    let (r, b) = layer.materialize_start(c, given.clone()).expect("start").wait();
                    (r.expect_err("spAG without d2"), b)
                }
                (1, _) => {
                    let (r, b) = layer.reduce_gradients_start(c, given.clone()).expect("start").wait();
                    (r.expect_err("spRS without d2"), b)
                }
                (2, Some(a)) => {
                    let (r, b) = layer.combine_start(c, a, given.clone()).expect("start").wait();
                    (r.expect_err("combine without d2"), b)
                }
                _ => match layer.dispatch_start(c, given.clone(), &experts) {
                    // The count exchange may already see the loss.
                    Err(e) => (e, given.clone()),
                    Ok(pending) => {
                        let (r, b) = pending.wait();
                        (r.expect_err("dispatch without d2"), b)
                    }
                },
            };
            Some((err, bits(&back) == bits(&given)))
        });
        for (err, restored) in out.into_iter().flatten() {
            assert!(matches!(err, Error::PeerLost { .. } | Error::Aborted { .. }), "step {step}: {err:?}");
            assert!(restored, "step {step}: buffer changed");
        }
    }
}

/// One forward and backward of the layer with elementwise experts `y = x ∘ w`: the
/// outputs, the input gradients and, after spRS, the weight gradients. With `remat`,
/// the replicas are freed after the forward and materialised again before the
/// backward; returns also the elements freed.
fn forward_backward(layer: &ExpertLayer, c: &mut Communicator, remat: bool) -> (Vec<u32>, Vec<u32>, Vec<u32>, usize) {
    let d = c.rank();
    let (tokens, experts) = routing(d);
    let mut p = params(layer.placement(), d);
    layer.materialize(c, &mut p).expect("spAG");
    let arrived = layer.dispatch(c, &tokens, &experts).expect("dispatch");
    let y = compute(layer, &p, &arrived.tokens, &arrived.experts);
    let out = layer.combine(c, &arrived, &y).expect("combine");
    let mut freed = 0;
    if remat {
        let before = bits(&p);
        let released = layer.release_replicas(c, p).expect("release");
        freed = released.freed_elements();
        assert_eq!(released.owned().len(), layer.params_len() - freed);
        let (done, again) = layer.rematerialize_start(c, released).expect("start spAG").wait();
        done.expect("spAG again");
        // Every slot this device holds is back, bitwise.
        for e in layer.placement().held(d) {
            let r = layer.expert_range(e);
            assert_eq!(bits(&again[r.clone()]), before[r], "device {d}, expert {e}");
        }
        p = again;
    }
    // The backward: dy = out ∘ out, sent the way the tokens went.
    let dy: Vec<f32> = out.iter().map(|y| y * y).collect();
    let back = layer.dispatch(c, &dy, &experts).expect("dispatch dy");
    let dx = compute(layer, &p, &back.tokens, &back.experts);
    let mut g = vec![0.0f32; layer.params_len()];
    for ((x, dy), &e) in arrived.tokens.chunks(HIDDEN).zip(back.tokens.chunks(HIDDEN)).zip(&arrived.experts) {
        for (k, slot) in g[layer.expert_range(e)].iter_mut().enumerate() {
            *slot += x[k] * dy[k];
        }
    }
    let dx = layer.combine(c, &back, &dx).expect("combine dx");
    layer.reduce_gradients(c, &mut g).expect("spRS");
    let owned: Vec<f32> = (0..8)
        .filter(|&e| layer.placement().owners()[e] == d)
        .flat_map(|e| g[layer.expert_range(e)].to_vec())
        .collect();
    (bits(&out), bits(&dx), bits(&owned), freed)
}

#[test]
fn rematerialisation_gives_the_same_bits_and_frees_the_replicas() {
    let layer = ExpertLayer::new(example(), EXPERT, HIDDEN, None).expect("layer");
    let out = on_group(4, |c| (forward_backward(&layer, c, false), forward_backward(&layer, c, true)));
    let mut replicas = 0;
    for (d, (plain, remat)) in out.iter().enumerate() {
        assert_eq!(plain.0, remat.0, "device {d}: outputs");
        assert_eq!(plain.1, remat.1, "device {d}: input gradients");
        assert_eq!(plain.2, remat.2, "device {d}: owned experts' gradients");
        // Only the owned experts stay: 2 of 8 slots.
        assert_eq!(remat.3, 6 * EXPERT, "device {d}");
        replicas += layer.replica_len(d);
    }
    // The worked example's 6 replicas (e0 on d1..d3, e4 on d0, d1, d3) were freed.
    assert_eq!(replicas, 6 * EXPERT);
}
