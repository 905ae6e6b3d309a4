//! The sharding planner: the at-rest placement P, one owner per expert of every layer.

use super::{check_loads, MoeError};

/// One MoE layer as the sharding planner sees it: how many experts, how big each is, and
/// optionally how loaded each is expected to be.
#[derive(Clone, Debug, PartialEq)]
pub struct MoeLayer {
    /// Number of experts.
    pub experts: usize,
    /// Bytes of one expert at rest: its parameters and its optimizer state (which only
    /// the owner keeps).
    pub expert_bytes: u64,
    /// Expected load (tokens) per expert, if known: the planner then spreads a layer's
    /// hot experts over devices. Without it, each layer is cut into contiguous blocks.
    pub loads: Option<Vec<f64>>,
}

impl MoeLayer {
    /// A layer of `experts` experts of `expert_bytes` bytes each, loads unknown.
    pub fn new(experts: usize, expert_bytes: u64) -> MoeLayer {
        MoeLayer { experts, expert_bytes, loads: None }
    }

    /// The same layer with expected loads, one per expert.
    pub fn with_loads(self, loads: Vec<f64>) -> MoeLayer {
        MoeLayer { loads: Some(loads), ..self }
    }
}

/// The sharded placement P: the owner of every expert of every layer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sharding {
    devices: usize,
    /// `owners[l][e]`: the device that owns expert `e` of layer `l`.
    owners: Vec<Vec<usize>>,
    /// Bytes of one expert of each layer.
    expert_bytes: Vec<u64>,
}

impl Sharding {
    /// A sharding given outright: `owners[l][e]` owns expert `e` of layer `l`, each
    /// expert of layer `l` being `expert_bytes[l]` bytes.
    ///
    /// ```
    /// use phalanx::moe::Sharding;
    /// let s = Sharding::from_owners(2, vec![vec![0, 1, 1]], vec![4])?;
    /// assert_eq!(s.memory(1), 8);
    /// # Ok::<(), phalanx::moe::MoeError>(())
    /// ```
    pub fn from_owners(devices: usize, owners: Vec<Vec<usize>>, expert_bytes: Vec<u64>) -> Result<Sharding, MoeError> {
        if owners.len() != expert_bytes.len() {
            return Err(MoeError::Shape {
                what: "expert sizes (one per layer)",
                expected: owners.len(),
                got: expert_bytes.len(),
            });
        }
        for (l, layer) in owners.iter().enumerate() {
            if let Some((e, &d)) = layer.iter().enumerate().find(|(_, &d)| d >= devices) {
                return Err(MoeError::Device {
                    what: format!("the owner of expert {e} of layer {l}"),
                    device: d,
                    devices,
                });
            }
        }
        Ok(Sharding { devices, owners, expert_bytes })
    }

    /// The number of devices.
    pub fn devices(&self) -> usize {
        self.devices
    }

    /// The number of MoE layers.
    pub fn layers(&self) -> usize {
        self.owners.len()
    }

    /// The owner of each expert of layer `layer`.
    pub fn owners(&self, layer: usize) -> &[usize] {
        &self.owners[layer]
    }

    /// Bytes of one expert of layer `layer`.
    pub fn expert_bytes(&self, layer: usize) -> u64 {
        self.expert_bytes[layer]
    }

    /// The experts of layer `layer` that `device` owns, ascending.
    pub fn owned(&self, device: usize, layer: usize) -> Vec<usize> {
        (0..self.owners[layer].len()).filter(|&e| self.owners[layer][e] == device).collect()
    }

    /// Bytes `device` keeps at rest: its experts of every layer.
    pub fn memory(&self, device: usize) -> u64 {
        (0..self.layers()).map(|l| self.owned(device, l).len() as u64 * self.expert_bytes[l]).sum()
    }
}

/// `a · b / c`, rounded up, without overflow (`c > 0`).
fn mul_div_ceil(a: u64, b: u64, c: u64) -> u64 {
    let q = (a as u128 * b as u128).div_ceil(c as u128);
    u64::try_from(q).unwrap_or(u64::MAX)
}

/// Plans the sharded placement P of `layers` over devices with `capacities` bytes each:
/// every expert gets exactly one owner, and each device's share of all experts' bytes is
/// in proportion to its capacity.
///
/// Each device gets a quota, its capacity's share of all experts' bytes rounded up, and
/// a per-layer quota likewise, so that every layer is spread over the devices too. The
/// planner walks the layers hottest first (by their largest expected load; in order
/// when loads are unknown) and, in each, the experts at or below the layer's mean load
/// first, then the overloaded ones hottest first (the reference's order: cold experts,
/// whose load changes slowly, fill the devices, the hot ones the remaining slots). Each
/// expert goes to the device with room in its quotas that carries the least of this
/// layer's load, the lowest index on a tie: with loads unknown, each layer is cut into
/// contiguous blocks, device 0 first. When rounding leaves an expert no quota room, it
/// goes to the device that overshoots its quota least: no device holds more than its
/// quota plus one expert.
///
/// The planner is greedy: it can report [`MoeError::Capacity`] for a packing that an
/// exhaustive search would find, but only when the experts nearly fill the devices.
///
/// ```
/// use phalanx::moe::{plan_sharding, MoeLayer};
/// // Device 1 has twice the memory of the others: it owns twice the experts.
/// let s = plan_sharding(&[100, 200, 100], &[MoeLayer::new(8, 10)])?;
/// assert_eq!(s.owned(1, 0).len(), 4);
/// assert_eq!((s.memory(0), s.memory(1), s.memory(2)), (20, 40, 20));
/// # Ok::<(), phalanx::moe::MoeError>(())
/// ```
pub fn plan_sharding(capacities: &[u64], layers: &[MoeLayer]) -> Result<Sharding, MoeError> {
    let devices = capacities.len();
    if devices == 0 {
        return Err(MoeError::Invalid("no devices: give at least one capacity".into()));
    }
    for (l, layer) in layers.iter().enumerate() {
        if layer.experts == 0 {
            return Err(MoeError::Invalid(format!("layer {l} has no experts")));
        }
        if let Some(loads) = &layer.loads {
            if loads.len() != layer.experts {
                return Err(MoeError::Shape {
                    what: "expected loads (one per expert)",
                    expected: layer.experts,
                    got: loads.len(),
                });
            }
            check_loads(loads)?;
        }
    }
    let layer_bytes: Vec<u64> = layers.iter().map(|l| (l.experts as u64).saturating_mul(l.expert_bytes)).collect();
    let need = layer_bytes.iter().fold(0u64, |a, &b| a.saturating_add(b));
    let have = capacities.iter().fold(0u64, |a, &b| a.saturating_add(b));
    if need > have {
        return Err(MoeError::TotalCapacity { need, have });
    }
    // `have > 0` here unless nothing is needed, in which case every quota is 0.
    let share = |bytes: u64, d: usize| if have == 0 { 0 } else { mul_div_ceil(bytes, capacities[d], have) };
    let quota: Vec<u64> = (0..devices).map(|d| share(need, d)).collect();

    let max_load = |l: &MoeLayer| l.loads.as_ref().map_or(0.0, |v| v.iter().cloned().fold(0.0, f64::max));
    let mut order: Vec<usize> = (0..layers.len()).collect();
    order.sort_by(|&a, &b| max_load(&layers[b]).total_cmp(&max_load(&layers[a])));

    let mut fill = vec![0u64; devices];
    let mut owners: Vec<Vec<usize>> = layers.iter().map(|l| vec![0; l.experts]).collect();
    for &l in &order {
        let layer = &layers[l];
        let size = layer.expert_bytes;
        let zeros = vec![0.0; layer.experts];
        let loads = layer.loads.as_ref().unwrap_or(&zeros);
        let mean = loads.iter().sum::<f64>() / layer.experts as f64;
        let (mut cold, mut hot): (Vec<usize>, Vec<usize>) = (0..layer.experts).partition(|&e| loads[e] <= mean);
        hot.sort_by(|&a, &b| loads[b].total_cmp(&loads[a]));
        cold.extend(hot);

        let layer_quota: Vec<u64> = (0..devices).map(|d| share(layer_bytes[l], d)).collect();
        let mut layer_fill = vec![0u64; devices];
        let mut layer_load = vec![0.0f64; devices];
        for e in cold {
            let fits = |used: u64, limit: u64| used.saturating_add(size) <= limit;
            // First choice: room in both quotas; then room in the device's quota; then
            // whatever the device can still hold.
            let pick = [true, false]
                .into_iter()
                .find_map(|per_layer| {
                    (0..devices)
                        .filter(|&d| fits(fill[d], quota[d]) && (!per_layer || fits(layer_fill[d], layer_quota[d])))
                        .min_by(|&a, &b| layer_load[a].total_cmp(&layer_load[b]).then(a.cmp(&b)))
                })
                .or_else(|| {
                    // Rounding left no quota room anywhere: the device that overshoots its
                    // quota least, among those with the capacity. Some device has room
                    // left (the quotas add up to at least every expert), so the overshoot
                    // stays under one expert.
                    (0..devices)
                        .filter(|&d| fits(fill[d], capacities[d]))
                        .min_by_key(|&d| ((fill[d] + size) as i128 - quota[d] as i128, d))
                });
            let Some(d) = pick else {
                let largest_free = (0..devices).map(|d| capacities[d] - fill[d]).max().unwrap_or(0);
                return Err(MoeError::Capacity { layer: l, expert: e, bytes: size, largest_free });
            };
            owners[l][e] = d;
            fill[d] += size;
            layer_fill[d] += size;
            layer_load[d] += loads[e];
        }
    }
    Ok(Sharding { devices, owners, expert_bytes: layers.iter().map(|l| l.expert_bytes).collect() })
}
