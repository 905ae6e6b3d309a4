//! The FSSDP layer ([`phalanx::moe::ExpertLayer`]) across 4 in-process peers: the
//! reference's worked example (4 devices, 8 experts, `t = m = 2`) planned by the
//! planners and run by the collectives: spAG leaves every holder bitwise equal to the
//! owner, dispatch sends every token to a holder of its expert (balanced as the plan
//! says), combine brings back exactly what a single-device run computes, and spRS gives
//! d0 `[10, 10]` for e0 and d2 `[50, 10]` for e4.

use phalanx::moe::{place, plan_sharding, ExpertLayer, MoeLayer, PlaceParams};
use phalanx::{Communicator, Config};

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

/// `W_e = [10e + 1, 10e + 2]`.
fn weights(e: usize) -> [f32; 2] {
    [10.0 * e as f32 + 1.0, 10.0 * e as f32 + 2.0]
}

/// Each device's tokens' experts: a quarter of e0's 40 and e4's 20 tokens on every
/// device, the other experts' tokens on one device each, some away from their owner.
fn routing(d: usize) -> Vec<usize> {
    let counts: [[usize; 8]; 4] =
        [[10, 0, 0, 5, 5, 0, 10, 0], [10, 5, 10, 0, 5, 0, 0, 0], [10, 0, 0, 0, 5, 5, 0, 5], [10, 0, 0, 0, 5, 0, 0, 0]];
    // Interleaved, so the layer must regroup them.
    let mut left = counts[d];
    let mut out = Vec::new();
    while left.iter().any(|&c| c > 0) {
        for (e, c) in left.iter_mut().enumerate() {
            if *c > 0 {
                *c -= 1;
                out.push(e);
            }
        }
    }
    out
}

/// Token `i` of device `d`.
fn token(d: usize, i: usize) -> [f32; 2] {
    let x = (100 * d + i) as f32;
    [x, -0.5 * x]
}

#[test]
fn worked_example_through_the_layer() {
    let sharding = plan_sharding(&[2; 4], &[MoeLayer::new(8, 1)]).expect("sharding");
    let loads = [40.0, 5.0, 10.0, 5.0, 20.0, 5.0, 10.0, 5.0];
    let p = place(sharding.owners(0), 4, &loads, PlaceParams { overlap: 2, slots: 2 }, None).expect("placement");
    assert_eq!(p.transfers(), 6);
    let layer = ExpertLayer::new(p.clone(), 2, 2, None).expect("layer");
    assert_eq!(layer.params_len(), 16);

    let out = on_group(4, |c| {
        let d = c.rank();
        // Owned slots hold the weights, the others garbage with this device's payload.
        let mut params: Vec<f32> = (0..8)
            .flat_map(|e| {
                if layer.placement().owners()[e] == d {
                    weights(e)
                } else {
                    [f32::from_bits(0x7fc0_0000 | d as u32); 2]
                }
            })
            .collect();
        layer.materialize(c, &mut params).expect("spAG");

        let experts = routing(d);
        let tokens: Vec<f32> = (0..experts.len()).flat_map(|i| token(d, i)).collect();
        let arrived = layer.dispatch(c, &tokens, &experts).expect("dispatch");
        // The expert: elementwise product with the materialised weights.
        let outputs: Vec<f32> = arrived
            .tokens
            .chunks(2)
            .zip(&arrived.experts)
            .flat_map(|(x, &e)| {
                let w = &params[layer.expert_range(e)];
                [x[0] * w[0], x[1] * w[1]]
            })
            .collect();
        let combined = layer.combine(c, &arrived, &outputs).expect("combine");

        let k = (d + 1) as f32;
        let mut grads: Vec<f32> = (0..8).flat_map(|e| [e as f32; 2]).collect();
        grads[0..2].copy_from_slice(&[k, k]);
        grads[8..10].copy_from_slice(&[5.0 * k, k]);
        layer.reduce_gradients(c, &mut grads).expect("spRS");
        (params, arrived.experts.clone(), arrived.plan.compute(), combined, grads)
    });

    for (d, (params, experts, compute, combined, grads)) in out.iter().enumerate() {
        // spAG: every slot this device holds is the owner's bytes.
        for e in p.held(d) {
            let got: Vec<u32> = params[2 * e..2 * e + 2].iter().map(|x| x.to_bits()).collect();
            let want: Vec<u32> = weights(e).iter().map(|x| x.to_bits()).collect();
            assert_eq!(got, want, "device {d}, expert {e}");
        }
        // Dispatch: only experts held here; e0 split 10 per device, e4 5, the rest to owners.
        assert!(experts.iter().all(|&e| p.holds(d, e)), "device {d} got {experts:?}");
        assert_eq!(compute, &vec![20, 30, 20, 30]);
        assert_eq!(experts.len() as u64, compute[d]);
        // Combine: each token's output is what one device computes alone.
        let want: Vec<u32> = routing(d)
            .iter()
            .enumerate()
            .flat_map(|(i, &e)| {
                let (x, w) = (token(d, i), weights(e));
                [(x[0] * w[0]).to_bits(), (x[1] * w[1]).to_bits()]
            })
            .collect();
        assert_eq!(combined.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), want, "device {d}");
        // spRS: the owners of e0 and e4 hold the sums; every other slot is as it was.
        let k = (d + 1) as f32;
        let expect = |e: usize| -> [f32; 2] {
            match (e, d) {
                (0, 0) => [10.0, 10.0],
                (4, 2) => [50.0, 10.0],
                (0, _) => [k, k],
                (4, _) => [5.0 * k, k],
                _ => [e as f32; 2],
            }
        };
        let want: Vec<f32> = (0..8).flat_map(expect).collect();
        assert_eq!(grads, &want, "device {d}");
    }
}

#[test]
fn a_placement_for_another_group_size_is_refused() {
    let p = place(&[0, 1, 2], 3, &[1.0, 1.0, 1.0], PlaceParams { overlap: 1, slots: 1 }, None).expect("placement");
    let layer = ExpertLayer::new(p, 1, 1, None).expect("layer");
    let errors = on_group(2, |c| {
        let mut params = vec![0.0f32; 3];
        layer.materialize(c, &mut params).expect_err("3 devices in a group of 2")
    });
    for e in errors {
        assert_eq!(e.kind(), phalanx::ErrorKind::InvalidArgument);
        assert!(e.to_string().contains("for 3 devices but the group has 2"), "{e}");
    }
}
