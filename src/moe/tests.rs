//! The reference's worked example (`../shared/reference/fssdp.md`, 2.6) through the
//! planners, and property tests of sharding, placement and dispatch.

use proptest::prelude::*;

use super::*;

const LOADS: [f64; 8] = [40.0, 5.0, 10.0, 5.0, 20.0, 5.0, 10.0, 5.0];

fn example() -> (Sharding, ExpertPlacement) {
    let sharding = plan_sharding(&[2; 4], &[MoeLayer::new(8, 1)]).expect("sharding");
    let p = place(sharding.owners(0), 4, &LOADS, PlaceParams { overlap: 2, slots: 2 }, None).expect("placement");
    (sharding, p)
}

#[test]
fn worked_example_sharding_and_placement() {
    let (sharding, p) = example();
    // Owners: d0 {e0,e1}, d1 {e2,e3}, d2 {e4,e5}, d3 {e6,e7}.
    assert_eq!(sharding.owners(0), &[0, 0, 1, 1, 2, 2, 3, 3]);
    assert!((0..4).all(|d| sharding.memory(d) == 2));
    // TopT = {e0, e4} on every device; nothing else replicated.
    assert_eq!(p.holders(0), &[0, 1, 2, 3]);
    assert_eq!(p.holders(4), &[0, 1, 2, 3]);
    assert!([1, 2, 3, 5, 6, 7].iter().all(|&e| p.holders(e).len() == 1));
    // Holdings after spAG, and what each device received.
    let held: Vec<Vec<usize>> = (0..4).map(|d| p.held(d)).collect();
    assert_eq!(held, vec![vec![0, 1, 4], vec![0, 2, 3, 4], vec![0, 4, 5], vec![0, 4, 6, 7]]);
    let received: Vec<Vec<usize>> = (0..4).map(|d| p.replicas(d)).collect();
    assert_eq!(received, vec![vec![4], vec![0, 4], vec![0], vec![0, 4]]);
    // 6 expert transfers; a full FSDP all-gather moves 24.
    assert_eq!(p.transfers(), 6);
    assert_eq!((0..4).map(|d| 8 - sharding.owned(d, 0).len()).sum::<usize>(), 24);
    // One free slot on d0 and d2 (each owns one of the two hot experts).
    assert_eq!(p.unused_slots(), 2);
}

#[test]
fn worked_example_as_the_sparse_collectives_placement() {
    let (_, p) = example();
    let sparse = p.to_sparse(2).expect("chunk placement");
    let mut extra = vec![vec![]; 8];
    extra[0] = vec![1, 2, 3];
    extra[4] = vec![0, 1, 3];
    let want = crate::plan::sparse::Placement::new(4, vec![2; 8], vec![0, 0, 1, 1, 2, 2, 3, 3])
        .and_then(|q| q.widen(&extra))
        .expect("reference placement");
    assert_eq!(sparse, want);
    assert_eq!(sparse.transfers(), 6);
}

#[test]
fn worked_example_dispatch() {
    let (sharding, p) = example();
    // The reference gives loads, not where the tokens come from. Here each device has a
    // quarter of e0's and e4's tokens and the others' on their owners.
    let routed = vec![
        vec![10, 5, 0, 0, 5, 0, 0, 0],
        vec![10, 0, 10, 5, 5, 0, 0, 0],
        vec![10, 0, 0, 0, 5, 5, 0, 0],
        vec![10, 0, 0, 0, 5, 0, 10, 5],
    ];
    let fssdp = dispatch(&p, &routed, None).expect("dispatch");
    // e0's 40 tokens split 10 per device, e4's 20 split 5: all stay local.
    assert_eq!(fssdp.compute(), vec![20, 30, 20, 30]);
    assert_eq!(fssdp.crossing(), 0);
    let ep = dispatch(&ExpertPlacement::sharded(sharding.owners(0), 4).expect("P"), &routed, None).expect("EP");
    assert_eq!(ep.compute(), vec![45, 15, 25, 15]); // d0 owns e0: the straggler
    assert_eq!(ep.crossing(), 30 + 15);

    // All of e0's tokens on d1: d1 keeps its share, the rest goes out in device order.
    let mut skewed = vec![vec![0u64; 8]; 4];
    skewed[1][0] = 40;
    let d = dispatch(&p, &skewed, None).expect("dispatch");
    let routes: Vec<(usize, usize, u64)> = d.routes().iter().map(|r| (r.from, r.to, r.tokens)).collect();
    assert_eq!(routes, vec![(1, 1, 10), (1, 0, 10), (1, 2, 10), (1, 3, 10)]);
    assert_eq!(d.send_counts()[1], vec![10, 10, 10, 10]);
}

#[test]
fn dispatch_prefers_a_replica_on_the_same_host() {
    // Hosts: d0 and d3 on host 1, d1 and d2 on host 0. Expert 0 is owned by d0 and
    // replicated on d1; 4 of its tokens are on d2 (host 0) and 4 on d3 (host 1).
    let hosts = Hosts(vec![1, 0, 0, 1]);
    let p = ExpertPlacement::with_replicas(&[0], 4, &[vec![1]]).expect("placement");
    let mut routed = vec![vec![0u64]; 4];
    routed[2][0] = 4;
    routed[3][0] = 4;
    let pairs = |d: &Dispatch| d.routes().iter().map(|r| (r.from, r.to, r.tokens)).collect::<Vec<_>>();
    // Knowing the hosts, each replica takes its host-mate's tokens.
    assert_eq!(pairs(&dispatch(&p, &routed, Some(&hosts)).expect("dispatch")), vec![(3, 0, 4), (2, 1, 4)]);
    // Not knowing them, sources and holders are matched in device order.
    assert_eq!(pairs(&dispatch(&p, &routed, None).expect("dispatch")), vec![(2, 0, 4), (3, 1, 4)]);
}

#[test]
fn topology_spreads_replicas_over_hosts() {
    // 4 devices on 2 hosts, one expert each, equally loaded; t = 4 > m = 1: each expert
    // gets one replica. With hosts it goes to the other host, so each host holds a
    // copy of every expert and no token has to leave its host.
    let hosts = Hosts(vec![0, 0, 1, 1]);
    let owners = [0, 1, 2, 3];
    let params = PlaceParams { overlap: 4, slots: 1 };
    let p = place(&owners, 4, &[10.0; 4], params, Some(&hosts)).expect("placement");
    assert_eq!(p.holders(0), &[0, 2]);
    for host in [[0, 1], [2, 3]] {
        assert!((0..4).all(|e| host.iter().any(|&d| p.holds(d, e))), "host {host:?}: {p:?}");
    }
    // Without hosts, the first free device: host 0 ends up with only e0 and e1.
    let p = place(&owners, 4, &[10.0; 4], params, None).expect("placement");
    assert_eq!(p.holders(0), &[0, 1]);
    assert!(!(0..2).any(|d| p.holds(d, 2)));
    // m = 0: no slots, P' = P.
    let p = place(&owners, 4, &[10.0; 4], PlaceParams { overlap: 4, slots: 0 }, Some(&hosts)).expect("placement");
    assert_eq!(p.transfers(), 0);
}

#[test]
fn typed_errors_for_impossible_inputs() {
    assert_eq!(
        plan_sharding(&[], &[MoeLayer::new(2, 1)]),
        Err(MoeError::Invalid("no devices: give at least one capacity".into()))
    );
    assert_eq!(plan_sharding(&[3, 3], &[MoeLayer::new(8, 1)]), Err(MoeError::TotalCapacity { need: 8, have: 6 }));
    // Enough memory in all, but no device can hold an expert of 5.
    assert!(matches!(
        plan_sharding(&[4, 4, 4], &[MoeLayer::new(2, 5)]),
        Err(MoeError::Capacity { layer: 0, expert: 0, bytes: 5, largest_free: 4 })
    ));
    assert!(matches!(
        plan_sharding(&[4], &[MoeLayer::new(2, 1).with_loads(vec![1.0])]),
        Err(MoeError::Shape { expected: 2, got: 1, .. })
    ));
    let params = PlaceParams { overlap: 1, slots: 1 };
    assert!(matches!(place(&[0, 2], 2, &[1.0, 1.0], params, None), Err(MoeError::Device { device: 2, .. })));
    assert!(matches!(place(&[0, 1], 2, &[1.0, f64::NAN], params, None), Err(MoeError::Load { expert: 1, .. })));
    assert!(matches!(place(&[0, 1], 2, &[1.0, 1.0], params, Some(&Hosts(vec![0]))), Err(MoeError::Shape { .. })));
    let p = ExpertPlacement::sharded(&[0, 1], 2).expect("P");
    assert!(matches!(dispatch(&p, &[vec![1, 1]], None), Err(MoeError::Shape { expected: 2, got: 1, .. })));
    assert!(LoadPredictor::with_window(2, 0).is_err());
    assert!(matches!(zipf_trace(2, 4, -1.0, 10, 1, 0), Err(MoeError::Invalid(_))));
    assert!(matches!(zipf_trace_shifting(0, 4, 1.0, 10, 1, 0, 2), Err(MoeError::Invalid(_))));
    assert!(matches!(
        simulate(
            &[],
            &[0],
            &SimConfig {
                params: PlaceParams { overlap: 1, slots: 1 },
                expert_bytes: 1,
                token_bytes: 1,
                window: 5,
                hosts: None,
                calibrate: None,
            }
        ),
        Err(MoeError::Invalid(_))
    ));
    assert!(LoadPredictor::new(2).observe(&[1.0]).is_err());
    let e: crate::Error = MoeError::TotalCapacity { need: 8, have: 6 }.into();
    assert_eq!(e.kind(), crate::ErrorKind::InvalidArgument);
}

#[test]
fn predictor_is_a_sliding_mean_of_five() {
    let mut p = LoadPredictor::new(1);
    for x in 1..=7 {
        p.observe(&[x as f64]).expect("observe");
    }
    assert_eq!(p.iterations(), 5);
    assert_eq!(p.predict(), Some(vec![5.0])); // mean of 3..=7
    assert_eq!(LoadPredictor::new(2).predict_or(&[1.0, 2.0]), vec![1.0, 2.0]);
}

#[test]
fn heterogeneous_and_load_aware_sharding() {
    // Two layers of different sizes over a big and two small devices.
    let layers =
        [MoeLayer::new(4, 30), MoeLayer::new(8, 10).with_loads(vec![100.0, 1.0, 1.0, 1.0, 90.0, 1.0, 1.0, 80.0])];
    let s = plan_sharding(&[100, 50, 50], &layers).expect("sharding");
    assert_eq!((0..3).map(|d| s.memory(d)).sum::<u64>(), 200);
    assert!(s.memory(0) <= 100 && s.memory(1) <= 50 && s.memory(2) <= 50);
    // Layer 1 (the hot one, planned first) is spread by its per-layer quotas, 4 : 2 : 2;
    // its cold experts went first, to the least-loaded device each, and the hot ones
    // took the slots left (the reference's order: FSSDP replicates hot experts anyway).
    let per_device: Vec<usize> = (0..3).map(|d| s.owned(d, 1).len()).collect();
    assert_eq!(per_device, vec![4, 2, 2]);
    assert_eq!(s.owners(1), &[2, 0, 1, 2, 0, 0, 1, 0]);
}

#[test]
fn resharding_moves_and_backups() {
    let cold = plan_sharding(&[2; 4], &[MoeLayer::new(8, 1)]).expect("sharding");
    let hot = plan_sharding(&[2; 4], &[MoeLayer::new(8, 1).with_loads(LOADS.to_vec())]).expect("sharding");
    let moves = cold.moves_to(&hot).expect("moves");
    for m in &moves {
        assert_eq!((cold.owners(0)[m.expert], hot.owners(0)[m.expert]), (m.from, m.to));
    }
    let changed = (0..8).filter(|&e| cold.owners(0)[e] != hot.owners(0)[e]).count();
    assert_eq!(moves.len(), changed);
    assert!(cold.moves_to(&cold).expect("no moves").is_empty());
    let other = plan_sharding(&[4; 2], &[MoeLayer::new(8, 1)]).expect("sharding");
    assert!(matches!(cold.moves_to(&other), Err(MoeError::Invalid(_))));

    // Backups on the other host, spread: each device backs up two experts.
    let hosts = Hosts(vec![0, 0, 1, 1]);
    let b = plan_backups(&cold, Some(&hosts)).expect("backups");
    for e in 0..8 {
        assert_ne!(hosts.of(b.of(0, e)), hosts.of(cold.owners(0)[e]), "expert {e}");
    }
    assert!((0..4).all(|d| b.backed_up_by(d, 0).len() == 2), "{b:?}");
    assert_eq!(b.sync_bytes(&cold), vec![2, 2, 2, 2]);
    // Device 2 lost: its experts e4, e5 go to their backups on host 0; d3 becomes d2.
    let after = cold.after_loss(2, &b).expect("survivors' sharding");
    assert_eq!(after.devices(), 3);
    for e in 0..8 {
        let want = match cold.owners(0)[e] {
            2 => b.of(0, e),
            3 => 2,
            o => o,
        };
        assert_eq!(after.owners(0)[e], want, "expert {e}");
    }
    assert_eq!((0..3).map(|d| after.memory(d)).sum::<u64>(), 8);
    assert!(plan_backups(&Sharding::from_owners(1, vec![vec![0]], vec![1]).expect("one device"), None).is_err());
    assert!(matches!(cold.after_loss(4, &b), Err(MoeError::Device { device: 4, .. })));
    assert!(after.after_loss(0, &b).is_err()); // backups of another sharding
}

#[test]
fn calibration_only_runs_when_it_pays() {
    let trace = zipf_trace(4, 16, 1.2, 400, 12, 3).expect("trace");
    let owners: Vec<usize> = (0..16).map(|e| e / 4).collect();
    let config = |calibrate| SimConfig {
        params: PlaceParams { overlap: 4, slots: 2 },
        expert_bytes: 1000,
        token_bytes: 10,
        window: WINDOW,
        hosts: None,
        calibrate,
    };
    let plain = simulate(&trace, &owners, &config(None)).expect("simulation");
    assert_eq!(plain.calibrated, 0);
    // Priced out: the same run.
    let dear = simulate(&trace, &owners, &config(Some(1e9))).expect("simulation");
    assert_eq!((dear.calibrated, &dear.fssdp), (0, &plain.fssdp));
    // Free: it runs whenever it saves anything, so the straggler can only drop, and
    // the extra spAG shows in the traffic.
    let free = simulate(&trace, &owners, &config(Some(0.0))).expect("simulation");
    assert!(free.calibrated > 0);
    assert!(free.fssdp.straggler < plain.fssdp.straggler, "{} vs {}", free.fssdp.straggler, plain.fssdp.straggler);
    assert!(free.fssdp.param_bytes >= plain.fssdp.param_bytes);
    assert!(calibrate(
        &ExpertPlacement::sharded(&[0], 1).expect("P"),
        &[vec![1]],
        PlaceParams { overlap: 1, slots: 1 },
        None,
        -1.0
    )
    .is_err());
}

/// Devices, owners, loads, `t`, `m` and maybe hosts.
type Case = (usize, Vec<usize>, Vec<f64>, usize, usize, Option<Vec<usize>>);

fn case() -> impl Strategy<Value = Case> {
    (1usize..=8, 1usize..=24).prop_flat_map(|(devices, experts)| {
        (
            Just(devices),
            proptest::collection::vec(0..devices, experts),
            proptest::collection::vec(prop_oneof![Just(0.0), 0.0..1000.0f64], experts),
            0usize..=30,
            0usize..=30,
            proptest::option::of(proptest::collection::vec(0usize..3, devices)),
        )
    })
}

/// The water level `λ` with `Σ min(cap, λ·load) = total`, by bisection.
fn level(loads: &[f64], caps: &[usize], total: usize) -> f64 {
    let fill = |l: f64| loads.iter().zip(caps).map(|(&w, &c)| (l * w).min(c as f64)).sum::<f64>();
    let (mut lo, mut hi) = (0.0, 1.0);
    while fill(hi) < total as f64 && hi < 1e12 {
        hi *= 2.0;
    }
    for _ in 0..200 {
        let mid = (lo + hi) / 2.0;
        if fill(mid) < total as f64 {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    hi
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn placement_properties((devices, owners, loads, t, m, hosts) in case()) {
        let hosts = hosts.map(Hosts);
        let params = PlaceParams { overlap: t, slots: m };
        let p = place(&owners, devices, &loads, params, hosts.as_ref()).expect("placement");
        let experts = owners.len();
        let t = t.min(experts);
        let m = m.min(t);
        // P ⊆ P′.
        for (e, &owner) in owners.iter().enumerate() {
            prop_assert!(p.holds(owner, e));
        }
        // At most m extra slots per device, and every slot used or counted unused.
        let extra: Vec<usize> = (0..devices).map(|d| p.replicas(d).len()).collect();
        prop_assert!(extra.iter().all(|&x| x <= m), "{extra:?} > m = {m}");
        prop_assert_eq!(extra.iter().sum::<usize>() + p.unused_slots(), devices * m);
        let mut top: Vec<usize> = (0..experts).collect();
        top.sort_by(|&a, &b| loads[b].total_cmp(&loads[a]).then(a.cmp(&b)));
        top.truncate(t);
        // Only the top-t experts get replicas.
        for e in (0..experts).filter(|e| !top.contains(e)) {
            prop_assert_eq!(p.holders(e).len(), 1);
        }
        if params.slots >= t {
            // t <= m: the top-t experts on every device.
            for &e in &top {
                prop_assert_eq!(p.holders(e).len(), devices);
            }
        } else {
            // Otherwise D·m slots in proportion to load.
            let top_loads: Vec<f64> = top.iter().map(|&e| loads[e]).collect();
            let counts = proportional_slots(&top_loads, devices * m, &vec![devices - 1; t]);
            for (i, &e) in top.iter().enumerate() {
                let got = p.holders(e).len() - 1;
                prop_assert!(got <= counts[i]);
                if hosts.is_none() && p.unused_slots() + counts.iter().sum::<usize>() == devices * m {
                    // Every planned replica found a device.
                    prop_assert_eq!(got, counts[i], "expert {} of {:?}", e, p);
                }
            }
        }
    }

    #[test]
    fn proportional_slots_are_within_one_of_the_ideal(
        loads in proptest::collection::vec(prop_oneof![Just(0.0), 0.01..100.0f64], 1..12),
        slots in 0usize..60,
        cap in 0usize..8,
    ) {
        let caps = vec![cap; loads.len()];
        let counts = proportional_slots(&loads, slots, &caps);
        let loaded_caps: usize = (0..loads.len()).filter(|&e| loads[e] > 0.0).map(|e| caps[e]).sum();
        let total = slots.min(loaded_caps);
        prop_assert_eq!(counts.iter().sum::<usize>(), total);
        if total > 0 {
            let l = level(&loads, &caps, total);
            for e in 0..loads.len() {
                let ideal = (l * loads[e]).min(caps[e] as f64);
                prop_assert!((counts[e] as f64 - ideal).abs() < 1.0 + 1e-6, "{counts:?} vs level {l}: e{e} ideal {ideal}");
                prop_assert!(counts[e] <= caps[e]);
            }
        }
    }

    #[test]
    fn every_token_goes_to_a_holder_evenly(
        (devices, owners, loads, t, m, hosts) in case(),
        seed in any::<u64>(),
    ) {
        let hosts = hosts.map(Hosts);
        let p = place(&owners, devices, &loads, PlaceParams { overlap: t, slots: m }, hosts.as_ref()).expect("placement");
        let experts = owners.len();
        let mut rng = crate::rng::SplitMix64(seed);
        let routed: Vec<Vec<u64>> = (0..devices).map(|_| (0..experts).map(|_| rng.below(20)).collect()).collect();
        let d = dispatch(&p, &routed, hosts.as_ref()).expect("dispatch");
        let mut sent = vec![vec![0u64; experts]; devices];
        let mut computed = vec![vec![0u64; devices]; experts];
        for r in d.routes() {
            prop_assert!(p.holds(r.to, r.expert), "{r:?} to a device without the expert");
            sent[r.from][r.expert] += r.tokens;
            computed[r.expert][r.to] += r.tokens;
        }
        prop_assert_eq!(&sent, &routed);
        for e in 0..experts {
            let shares: Vec<u64> = p.holders(e).iter().map(|&h| computed[e][h]).collect();
            let (lo, hi) = (shares.iter().min().copied().unwrap_or(0), shares.iter().max().copied().unwrap_or(0));
            prop_assert!(hi - lo <= 1, "expert {e} split {shares:?}");
            // A holder computes its own tokens before anyone else's.
            for (i, &h) in p.holders(e).iter().enumerate() {
                let own = d.routes().iter().filter(|r| r.expert == e && r.from == h && r.to == h).map(|r| r.tokens).sum::<u64>();
                prop_assert_eq!(own, routed[h][e].min(shares[i]));
            }
        }
    }

    #[test]
    fn sharding_owns_everything_within_memory(
        caps in proptest::collection::vec(0u64..200, 1..6),
        layers in proptest::collection::vec((1usize..10, 1u64..20, any::<bool>()), 1..4),
    ) {
        let layers: Vec<MoeLayer> = layers
            .into_iter()
            .map(|(e, b, loaded)| {
                let l = MoeLayer::new(e, b);
                if loaded { l.with_loads((0..e).map(|i| ((i * 37) % 11) as f64).collect()) } else { l }
            })
            .collect();
        let need: u64 = layers.iter().map(|l| l.experts as u64 * l.expert_bytes).sum();
        let have: u64 = caps.iter().sum();
        match plan_sharding(&caps, &layers) {
            Ok(s) => {
                prop_assert!(need <= have);
                let biggest = layers.iter().map(|l| l.expert_bytes).max().unwrap_or(0);
                for d in 0..caps.len() {
                    let quota = (need as u128 * caps[d] as u128).div_ceil(have.max(1) as u128) as u64;
                    prop_assert!(s.memory(d) <= caps[d]);
                    // Within one expert of its share, where every device has that slack.
                    let slack = (0..caps.len()).all(|d| {
                        caps[d] >= (need as u128 * caps[d] as u128).div_ceil(have.max(1) as u128) as u64 + biggest
                    });
                    if slack {
                        prop_assert!(s.memory(d) <= quota + biggest, "device {d}: {} > {quota} + {biggest}", s.memory(d));
                    }
                }
                prop_assert_eq!((0..caps.len()).map(|d| s.memory(d)).sum::<u64>(), need);
            }
            Err(MoeError::TotalCapacity { .. }) => prop_assert!(need > have),
            Err(MoeError::Capacity { bytes, largest_free, .. }) => prop_assert!(need <= have && largest_free < bytes),
            Err(e) => prop_assert!(false, "{e}"),
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn backups_cover_a_lost_device((devices, owners, _, _, _, hosts) in case(), lost in any::<usize>()) {
        prop_assume!(devices >= 2);
        let hosts = hosts.map(Hosts);
        let s = Sharding::from_owners(devices, vec![owners.clone()], vec![3]).expect("sharding");
        let b = plan_backups(&s, hosts.as_ref()).expect("backups");
        let host = |d: usize| hosts.as_ref().map_or(d, |h| h.of(d));
        for (e, &o) in owners.iter().enumerate() {
            prop_assert_ne!(b.of(0, e), o);
            if (0..devices).any(|d| host(d) != host(o)) {
                prop_assert_ne!(host(b.of(0, e)), host(o), "expert {} kept on its owner's host", e);
            }
        }
        let lost = lost % devices;
        let after = s.after_loss(lost, &b).expect("survivors");
        let renumber = |d: usize| if d > lost { d - 1 } else { d };
        for (e, &o) in owners.iter().enumerate() {
            let want = if o == lost { renumber(b.of(0, e)) } else { renumber(o) };
            prop_assert_eq!(after.owners(0)[e], want);
        }
        prop_assert_eq!((0..devices - 1).map(|d| after.memory(d)).sum::<u64>(), 3 * owners.len() as u64);
    }
}
