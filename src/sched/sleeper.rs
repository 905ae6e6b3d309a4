//! [`Sleeper`]: a [`Stage`] whose passes only sleep their calibrated cost, to measure a
//! runner's executed spans against the simulator's (the `phalanx pipeline-worker`'s
//! timed mode and the runner's tests).

use std::time::Duration;

use super::{Stage, StageError, Step};

/// Calibrated passes: each sleeps its cost (a `unit` per pass of a full stage, its
/// `share` of that for a chunk; a fused `BW` two units), nothing else; every activation
/// and gradient is 4 zeros.
#[derive(Clone, Copy, Debug)]
pub struct Sleeper {
    /// The time of one pass of a full stage.
    pub unit: Duration,
    /// The chunks a stage is split into (each pass of a chunk sleeps `unit / share`);
    /// at least 1.
    pub share: u32,
}

impl Sleeper {
    fn pass(&self, units: u32) -> Vec<f32> {
        std::thread::sleep(self.unit * units / self.share.max(1));
        vec![0.0; 4]
    }
}

impl Stage for Sleeper {
    type Elem = f32;
    fn input_len(&self, _: &Step) -> usize {
        4
    }
    fn output_len(&self, _: &Step) -> usize {
        4
    }
    fn forward(&mut self, _: &Step, _: &[f32]) -> Result<Vec<f32>, StageError> {
        Ok(self.pass(1))
    }
    fn backward_input(&mut self, _: &Step, _: &[f32]) -> Result<Vec<f32>, StageError> {
        Ok(self.pass(1))
    }
    fn backward_weight(&mut self, _: &Step) -> Result<(), StageError> {
        self.pass(1);
        Ok(())
    }
    fn backward(&mut self, _: &Step, _: &[f32]) -> Result<Vec<f32>, StageError> {
        Ok(self.pass(2))
    }
}
