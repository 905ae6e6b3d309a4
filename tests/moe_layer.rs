//! The FSSDP layer ([`phalanx::moe::ExpertLayer`]) across 4 in-process peers: the
//! reference's worked example (4 devices, 8 experts, `t = m = 2`) planned by the
//! planners and run by the collectives: spAG leaves every holder bitwise equal to the
//! owner, dispatch sends every token to a holder of its expert (balanced as the plan
//! says), combine brings back exactly what a single-device run computes, and spRS gives
//! d0 `[10, 10]` for e0 and d2 `[50, 10]` for e4; and an MoE layer of MLP experts with
//! top-1 and top-2 routing against a dense single-process reference, bitwise.

use phalanx::moe::{place, plan_sharding, ExpertLayer, MoeLayer, PlaceParams};
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

/// A snapshot of `c`'s traffic taken between two barriers (which carry no payload):
/// every frame sent before the first has arrived, and none sent after the second has.
fn quiet_traffic(c: &mut Communicator) -> phalanx::Traffic {
    c.barrier().expect("barrier");
    let t = c.traffic();
    c.barrier().expect("barrier");
    t
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
        let before = quiet_traffic(c);
        layer.materialize(c, &mut params).expect("spAG");
        let spag = quiet_traffic(c).since(&before).total();

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
        (params, arrived.experts.clone(), arrived.plan.compute(), combined, grads, spag)
    });

    // The links' counters: spAG moved exactly 6 experts of 8 bytes, each received once,
    // by the devices that hold a replica (d0 e4; d1 e0 and e4; d2 e0; d3 e0 and e4).
    const EXPERT_BYTES: u64 = 2 * 4;
    let received: Vec<u64> = out.iter().map(|o| o.5.bytes_received).collect();
    assert_eq!(received, [1, 2, 1, 2].map(|n| n * EXPERT_BYTES));
    assert_eq!(out.iter().map(|o| o.5.bytes_sent).sum::<u64>(), 6 * EXPERT_BYTES);

    for (d, (params, experts, compute, combined, grads, _)) in out.iter().enumerate() {
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

// An MoE layer with real experts: each a small MLP `y = W2 relu(W1 x)`, top-1 and top-2
// routing from a Zipf-skewed gate, 4 devices, 8 experts. Forward outputs, input
// gradients and, after spRS, every expert's weight gradient equal a single-process
// dense reference, bitwise: the reference adds each expert's per-token gradients in the
// fixed order the layer does (holders ascending; on each, tokens by source device, then
// in their order there).

const H: usize = 4; // hidden
const F: usize = 8; // the experts' inner width
const W: usize = 2 * H * F; // W1 (F×H) then W2 (H×F)
const DEVICES: usize = 4;
const EXPERTS: usize = 8;
const TOKENS: usize = 24; // per device

/// A float with a full mantissa, so that sums depend on their order.
fn float(seed: u64) -> f32 {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x5851_f42d_4c95_7f2d;
    x ^= x >> 29;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 32;
    ((x % 2_000_001) as f32 - 1_000_000.0) * 1.1e-6
}

fn expert_weights(e: usize) -> Vec<f32> {
    (0..W).map(|i| float((e * 1000 + i) as u64)).collect()
}

fn x_of(d: usize, i: usize) -> Vec<f32> {
    (0..H).map(|j| float((1 << 20) + (d * 1000 + i * 10 + j) as u64)).collect()
}

/// The upstream gradient of token `i` of device `d` (the loss is `Σ <c, output>`).
fn c_of(d: usize, i: usize) -> Vec<f32> {
    (0..H).map(|j| float((1 << 30) + (d * 1000 + i * 10 + j) as u64)).collect()
}

/// `(y, z)` with `z = W1 x`, `y = W2 relu(z)`.
fn mlp(w: &[f32], x: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let (w1, w2) = w.split_at(F * H);
    let z: Vec<f32> = (0..F).map(|r| (0..H).fold(0.0, |a, j| a + w1[r * H + j] * x[j])).collect();
    let y = (0..H).map(|r| (0..F).fold(0.0, |a, j| a + w2[r * F + j] * z[j].max(0.0))).collect();
    (y, z)
}

/// `(dW, dx)` of one token given `dy`.
fn mlp_backward(w: &[f32], x: &[f32], dy: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let (_, z) = mlp(w, x);
    let w2 = &w[F * H..];
    let mut dw = vec![0.0f32; W];
    for r in 0..H {
        for j in 0..F {
            dw[F * H + r * F + j] = dy[r] * z[j].max(0.0);
        }
    }
    let dz: Vec<f32> =
        (0..F).map(|j| if z[j] > 0.0 { (0..H).fold(0.0, |a, r| a + w2[r * F + j] * dy[r]) } else { 0.0 }).collect();
    for r in 0..F {
        for j in 0..H {
            dw[r * H + j] = dz[r] * x[j];
        }
    }
    let dx = (0..H).map(|j| (0..F).fold(0.0, |a, r| a + w[r * H + j] * dz[r])).collect();
    (dw, dx)
}

/// The gate: each token's `k` experts (distinct, Zipf 1.2 over a shuffled order) and
/// their weights.
fn gate(d: usize, k: usize) -> Vec<Vec<(usize, f32)>> {
    let order = [5, 2, 7, 0, 3, 6, 1, 4]; // expert of popularity rank 1, 2, ...
    let cdf: Vec<f64> = (1..=EXPERTS)
        .scan(0.0, |acc, r| {
            *acc += (r as f64).powf(-1.2);
            Some(*acc)
        })
        .collect();
    let weights: &[f32] = if k == 1 { &[1.0] } else { &[0.625, 0.375] };
    (0..TOKENS)
        .map(|i| {
            let mut chosen: Vec<usize> = Vec::new();
            let mut n = 0u64;
            while chosen.len() < k {
                let u = (float((3 << 30) + (d * 1000 + i * 10) as u64 + n) as f64 / 1.1 + 1.0) / 2.0;
                n += 1;
                let rank = cdf.partition_point(|&c| c < u * cdf[EXPERTS - 1]).min(EXPERTS - 1);
                if !chosen.contains(&order[rank]) {
                    chosen.push(order[rank]);
                }
            }
            chosen.into_iter().zip(weights.iter().copied()).collect()
        })
        .collect()
}

/// Device `d`'s rows (one per token and choice, token-major) and their experts.
fn rows(d: usize, k: usize) -> (Vec<(usize, f32)>, Vec<usize>) {
    let g = gate(d, k);
    let picks: Vec<(usize, f32)> =
        g.iter().enumerate().flat_map(|(i, c)| c.iter().map(move |&(_, w)| (i, w))).collect();
    let experts = g.iter().flatten().map(|&(e, _)| e).collect();
    (picks, experts)
}

/// Each token's output `Σ_k g_k · y_k`, summed in k order.
fn mix(picks: &[(usize, f32)], per_row: &[f32]) -> Vec<f32> {
    let mut out = vec![0.0f32; TOKENS * H];
    for (row, &(i, g)) in picks.iter().enumerate() {
        for j in 0..H {
            out[i * H + j] += g * per_row[row * H + j];
        }
    }
    out
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn moe_layer_matches_dense(k: usize) {
    let sharding = plan_sharding(&[2; DEVICES], &[MoeLayer::new(EXPERTS, 1)]).expect("sharding");
    let owners = sharding.owners(0).to_vec();
    let routed: Vec<Vec<u64>> = (0..DEVICES)
        .map(|d| {
            let mut c = vec![0u64; EXPERTS];
            rows(d, k).1.iter().for_each(|&e| c[e] += 1);
            c
        })
        .collect();
    let loads: Vec<f64> = (0..EXPERTS).map(|e| routed.iter().map(|r| r[e]).sum::<u64>() as f64).collect();
    let p = place(&owners, DEVICES, &loads, PlaceParams { overlap: 2, slots: 2 }, None).expect("placement");
    assert!(p.transfers() > 0, "the skew replicates something: {p:?}");
    let layer = ExpertLayer::new(p.clone(), W, H, None).expect("layer");

    let out = on_group(DEVICES, |c| {
        let d = c.rank();
        let mut params = vec![0.0f32; layer.params_len()];
        for e in (0..EXPERTS).filter(|&e| owners[e] == d) {
            params[layer.expert_range(e)].copy_from_slice(&expert_weights(e));
        }
        layer.materialize(c, &mut params).expect("spAG");
        let (picks, experts) = rows(d, k);
        let xs: Vec<f32> = picks.iter().flat_map(|&(i, _)| x_of(d, i)).collect();
        let arrived = layer.dispatch(c, &xs, &experts).expect("dispatch");
        let ys: Vec<f32> = arrived
            .tokens
            .chunks(H)
            .zip(&arrived.experts)
            .flat_map(|(x, &e)| mlp(&params[layer.expert_range(e)], x).0)
            .collect();
        let y = mix(&picks, &layer.combine(c, &arrived, &ys).expect("combine"));

        // Backward: each row's output gradient g_k·c_i goes where its token went.
        let dys: Vec<f32> = picks.iter().flat_map(|&(i, g)| c_of(d, i).into_iter().map(move |v| g * v)).collect();
        let dy_arrived = layer.dispatch(c, &dys, &experts).expect("dispatch of the output gradients");
        assert_eq!(dy_arrived.experts, arrived.experts);
        let mut grads = vec![0.0f32; layer.params_len()];
        let mut dxs = Vec::new();
        for ((x, dy), &e) in arrived.tokens.chunks(H).zip(dy_arrived.tokens.chunks(H)).zip(&arrived.experts) {
            let (dw, dx) = mlp_backward(&params[layer.expert_range(e)], x, dy);
            for (g, v) in grads[layer.expert_range(e)].iter_mut().zip(dw) {
                *g += v;
            }
            dxs.extend(dx);
        }
        let dx_rows = layer.combine(c, &dy_arrived, &dxs).expect("combine of the input gradients");
        let mut dx = vec![0.0f32; TOKENS * H];
        for (row, &(i, _)) in picks.iter().enumerate() {
            for j in 0..H {
                dx[i * H + j] += dx_rows[row * H + j];
            }
        }
        layer.reduce_gradients(c, &mut grads).expect("spRS");
        (y, dx, grads)
    });

    // The dense reference, one process: the outputs and input gradients token by token,
    // each expert's gradient summed per holder in arrival order, holders ascending.
    let plan = phalanx::moe::dispatch(&p, &routed, None).expect("plan");
    let mut per_holder: Vec<Vec<Vec<f32>>> = vec![vec![vec![0.0; W]; DEVICES]; EXPERTS];
    let mut arrivals: Vec<Vec<(usize, usize)>> = vec![Vec::new(); DEVICES]; // (device, row)
    for src in 0..DEVICES {
        let (_, experts) = rows(src, k);
        let mut taken = [0usize; EXPERTS];
        for r in plan.routes().iter().filter(|r| r.from == src) {
            let mine: Vec<usize> = (0..experts.len()).filter(|&row| experts[row] == r.expert).collect();
            let cut = &mine[taken[r.expert]..taken[r.expert] + r.tokens as usize];
            taken[r.expert] += r.tokens as usize;
            arrivals[r.to].extend(cut.iter().map(|&row| (src, row)));
        }
    }
    for (h, list) in arrivals.iter_mut().enumerate() {
        // On each holder: by source device, then by expert, then in order (the layer's).
        list.sort_by_key(|&(src, row)| (src, rows(src, k).1[row], row));
        for &(src, row) in list.iter() {
            let (picks, experts) = rows(src, k);
            let (i, g) = picks[row];
            let e = experts[row];
            let dy: Vec<f32> = c_of(src, i).into_iter().map(|v| g * v).collect();
            let (dw, _) = mlp_backward(&expert_weights(e), &x_of(src, i), &dy);
            for (a, v) in per_holder[e][h].iter_mut().zip(dw) {
                *a += v;
            }
        }
    }
    for (d, (y, dx, grads)) in out.iter().enumerate() {
        let (picks, experts) = rows(d, k);
        let ys: Vec<f32> =
            picks.iter().zip(&experts).flat_map(|(&(i, _), &e)| mlp(&expert_weights(e), &x_of(d, i)).0).collect();
        assert_eq!(bits(y), bits(&mix(&picks, &ys)), "forward, device {d}, top-{k}");
        let dxs: Vec<f32> = picks
            .iter()
            .zip(&experts)
            .flat_map(|(&(i, g), &e)| {
                let dy: Vec<f32> = c_of(d, i).into_iter().map(|v| g * v).collect();
                mlp_backward(&expert_weights(e), &x_of(d, i), &dy).1
            })
            .collect();
        assert_eq!(
            bits(dx),
            bits(&mix(&picks.iter().map(|&(i, _)| (i, 1.0)).collect::<Vec<_>>(), &dxs)),
            "dx, device {d}"
        );
        for e in (0..EXPERTS).filter(|&e| owners[e] == d) {
            let want = p.holders(e).iter().map(|&h| &per_holder[e][h]).fold(None, |acc: Option<Vec<f32>>, g| {
                Some(match acc {
                    None => g.clone(),
                    Some(a) => a.iter().zip(g).map(|(x, y)| x + y).collect(),
                })
            });
            assert_eq!(
                bits(&grads[layer.expert_range(e)]),
                bits(&want.expect("a holder")),
                "gradient of expert {e}, top-{k}"
            );
        }
    }
}

#[test]
fn moe_layer_top1_matches_a_dense_reference_bitwise() {
    moe_layer_matches_dense(1);
}

#[test]
fn moe_layer_top2_matches_a_dense_reference_bitwise() {
    moe_layer_matches_dense(2);
}

/// A device that leaves mid-iteration (drops its communicator instead of calling, or
/// after the dispatch's count exchange): every survivor's step fails with the loss or
/// an abort, a typed error, and its buffers hold what they held before.
#[test]
fn a_lost_device_fails_every_step_cleanly() {
    let loads = [40.0, 5.0, 10.0, 5.0, 20.0, 5.0, 10.0, 5.0];
    let p = place(&[0, 0, 1, 1, 2, 2, 3, 3], 4, &loads, PlaceParams { overlap: 2, slots: 2 }, None).expect("placement");
    let layer = ExpertLayer::new(p, 2, 2, None).expect("layer");
    for step in 0..4 {
        let out = on_group(4, |c| {
            let d = c.rank();
            let experts = routing(d);
            let tokens: Vec<f32> = (0..experts.len()).flat_map(|i| token(d, i)).collect();
            if d == 2 {
                if step == 3 {
                    // The count exchange of dispatch, then gone.
                    let mut all = vec![0u64; 32];
                    c.all_gather(&[10u64, 0, 0, 0, 5, 5, 0, 5], &mut all).expect("count exchange");
                }
                return None;
            }
            let orig: Vec<f32> = (0..16).map(|k| k as f32 + 0.25 * d as f32).collect();
            let mut buf = orig.clone();
            let err = match step {
                0 => layer.materialize(c, &mut buf).expect_err("spAG without d2"),
                1 => layer.reduce_gradients(c, &mut buf).expect_err("spRS without d2"),
                _ => layer.dispatch(c, &tokens, &experts).expect_err("dispatch without d2"),
            };
            Some((err, buf == orig))
        });
        for (err, restored) in out.into_iter().flatten() {
            assert!(matches!(err, Error::PeerLost { .. } | Error::Aborted { .. }), "step {step}: {err:?}");
            assert!(restored, "step {step}: buffer changed");
        }
    }
}

/// Re-sharding moves state: from the block sharding to a load-aware one, a spAG over
/// `transfer_placement` leaves every new owner holding its experts' bytes, and the
/// moves it makes are exactly `moves_to`'s.
#[test]
fn resharding_moves_the_state_to_the_new_owners() {
    let loads = vec![40.0, 5.0, 10.0, 5.0, 20.0, 5.0, 10.0, 5.0];
    let now = plan_sharding(&[2; 4], &[MoeLayer::new(8, 1)]).expect("sharding");
    let next = plan_sharding(&[2; 4], &[MoeLayer::new(8, 1).with_loads(loads)]).expect("sharding");
    let moves = now.moves_to(&next).expect("moves");
    assert!(!moves.is_empty());
    let p = now.transfer_placement(&next, 0, 2).expect("placement");
    assert_eq!(p.transfers(), moves.len());
    let out = on_group(4, |c| {
        let d = c.rank();
        let mut state: Vec<f32> =
            (0..8).flat_map(|e| if now.owners(0)[e] == d { weights(e) } else { [f32::NAN; 2] }).collect();
        c.sparse_all_gather(&p, &mut state).expect("spAG");
        state
    });
    for (d, state) in out.iter().enumerate() {
        for e in next.owned(d, 0) {
            assert_eq!(state[2 * e..2 * e + 2], weights(e), "device {d}, expert {e}");
        }
    }
}
