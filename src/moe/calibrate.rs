//! Calibration with the gate's real output: after the gate runs, re-plan P′ from the
//! real counts and pay one more spAG on the critical path, but only when the straggler
//! it saves is worth more than that transfer.

use super::{dispatch, place, ExpertPlacement, Hosts, MoeError, PlaceParams};

/// What a re-plan after the gate would change, and whether it pays.
#[derive(Clone, Debug, PartialEq)]
pub struct Calibration {
    /// The placement planned from the real counts.
    pub placement: ExpertPlacement,
    /// The straggler's tokens under the predicted placement.
    pub straggler_before: u64,
    /// The straggler's tokens under the calibrated one.
    pub straggler_after: u64,
    /// Expert copies the extra spAG moves: replicas the calibrated placement has and
    /// the predicted one does not.
    pub transfers: usize,
    /// Critical-path cost of the extra spAG, in tokens of compute: the busiest device's
    /// copies (sent or received) times the cost of one expert's transfer.
    pub cost: f64,
}

impl Calibration {
    /// The straggler's tokens saved.
    pub fn gain(&self) -> f64 {
        self.straggler_before as f64 - self.straggler_after as f64
    }

    /// Whether the saving beats the extra transfer: then run the extra spAG and use
    /// [`placement`](Self::placement).
    pub fn worth_it(&self) -> bool {
        self.gain() > self.cost
    }
}

/// Re-plans `predicted` (this iteration's P′) from the gate's real output `routed`
/// (`routed[d][e]`: tokens of device `d` routed to expert `e`) with the same `params`
/// and `hosts`, and prices the switch: one expert's transfer costs `expert_cost` tokens
/// of compute (`expert_size / bw` over the time of one token through an expert).
///
/// ```
/// use phalanx::moe::{calibrate, place, PlaceParams};
/// // Predicted: e0 hot, so e0 is everywhere. The gate says e1 is the hot one.
/// let params = PlaceParams { overlap: 1, slots: 1 };
/// let predicted = place(&[0, 1], 2, &[10.0, 1.0], params, None)?;
/// let routed = [vec![1, 50], vec![1, 50]];
/// let c = calibrate(&predicted, &routed, params, None, 10.0)?;
/// assert_eq!((c.straggler_before, c.straggler_after, c.transfers), (101, 52, 1));
/// assert!(c.worth_it()); // 49 tokens saved for one transfer worth 10
/// assert!(!calibrate(&predicted, &routed, params, None, 60.0)?.worth_it());
/// # Ok::<(), phalanx::moe::MoeError>(())
/// ```
pub fn calibrate(
    predicted: &ExpertPlacement,
    routed: &[Vec<u64>],
    params: PlaceParams,
    hosts: Option<&Hosts>,
    expert_cost: f64,
) -> Result<Calibration, MoeError> {
    if !expert_cost.is_finite() || expert_cost < 0.0 {
        return Err(MoeError::Invalid(format!(
            "an expert transfer costing {expert_cost} tokens: use a finite cost >= 0"
        )));
    }
    let (devices, experts) = (predicted.devices(), predicted.experts());
    let before = dispatch(predicted, routed, hosts)?.straggler();
    let loads: Vec<f64> = (0..experts).map(|e| routed.iter().map(|row| row[e]).sum::<u64>() as f64).collect();
    let placement = place(predicted.owners(), devices, &loads, params, hosts)?;
    let after = dispatch(&placement, routed, hosts)?.straggler();
    let (mut sent, mut received) = (vec![0usize; devices], vec![0usize; devices]);
    for e in 0..experts {
        for &d in placement.holders(e).iter().filter(|&&d| !predicted.holds(d, e)) {
            received[d] += 1;
            sent[placement.owners()[e]] += 1;
        }
    }
    let transfers = received.iter().sum();
    let busiest = sent.iter().chain(&received).copied().max().unwrap_or(0);
    Ok(Calibration {
        placement,
        straggler_before: before,
        straggler_after: after,
        transfers,
        cost: busiest as f64 * expert_cost,
    })
}
