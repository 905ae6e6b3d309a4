//! [`DeviceDriver`]: carries out the [`DeviceMembership`] machine's decisions on a
//! [`DeviceBackend`] (the CPU stand-in or NCCL), so that the machine stays sans-IO and
//! each backend is driven the same way. What must travel through the master (the id a
//! peer made) and what the caller must hear (ready, gave up) come back as [`Outcome`]s.

use std::collections::VecDeque;

use super::membership::{Decision, DeviceMembership, Event};
use super::{AsyncState, DeviceBackend, DeviceComm, DeviceError, UniqueId};

/// What the driver's caller must do or know after an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Send this id to the master for `epoch`, `generation` (it relays the first one to
    /// every member).
    Publish {
        /// The epoch it is for.
        epoch: u64,
        /// The generation it is for.
        generation: u32,
        /// The id this peer made.
        id: UniqueId,
        /// Whether the members grow their communicator with it.
        grow: bool,
    },
    /// The communicator of `epoch` is ready: [`DeviceDriver::comm`] returns it.
    Ready {
        /// Its epoch.
        epoch: u64,
    },
    /// Making the communicator failed; wait for the master's next view.
    GaveUp(DeviceError),
}

/// One peer's device membership: the decision machine, the backend and the communicator
/// it holds.
pub struct DeviceDriver<B: DeviceBackend> {
    backend: B,
    machine: DeviceMembership,
    comm: Option<B::Comm>,
}

impl<B: DeviceBackend> DeviceDriver<B> {
    /// The driver of peer `me` on `backend` (its capabilities pick the decisions).
    pub fn new(me: u64, backend: B) -> DeviceDriver<B> {
        let machine = DeviceMembership::new(me, backend.capabilities());
        DeviceDriver { backend, machine, comm: None }
    }

    /// The ready communicator, if there is one (none while one is being made, after a
    /// failure, or once removed).
    pub fn comm(&mut self) -> Option<&mut B::Comm> {
        self.machine.ready_epoch()?;
        self.comm.as_mut()
    }

    /// The epoch of the ready communicator, if one is ready and not broken.
    pub fn ready_epoch(&self) -> Option<u64> {
        self.machine.ready_epoch()
    }

    /// The epoch and generation of the communicator aimed at (see
    /// [`DeviceMembership::current`]).
    pub fn current(&self) -> (u64, u32) {
        self.machine.current()
    }

    /// Feeds `event` (a view, a relayed id, a failed collective) and carries out every
    /// decision that follows, including the sleeping polls of a communicator being made.
    pub fn handle(&mut self, event: Event) -> Vec<Outcome> {
        self.handle_until(event, &mut || None)
    }

    /// [`DeviceDriver::handle`], asking `abandon` before each sleep of a communicator
    /// being made whether to give it up: `Some(reason)` aborts it and gives up
    /// ([`Outcome::GaveUp`]), so that a creation waiting for a rank that will never come
    /// (the view moved on without it) does not wait forever.
    pub fn handle_until(&mut self, event: Event, abandon: &mut dyn FnMut() -> Option<String>) -> Vec<Outcome> {
        let mut out = Vec::new();
        let mut todo: VecDeque<Decision> = self.machine.handle(event).into();
        while let Some(d) = todo.pop_front() {
            let abandoned = match d {
                Decision::PollAfter(_) => abandon(),
                _ => None,
            };
            if let Some(reason) = abandoned {
                todo.clear();
                todo.extend(self.machine.handle(Event::Abandon { reason }));
                continue;
            }
            if let Some(next) = self.carry_out(d, &mut out) {
                todo.extend(self.machine.handle(next));
            }
        }
        out
    }

    /// Carries out one decision; returns the event it leads to, if any.
    fn carry_out(&mut self, d: Decision, out: &mut Vec<Outcome>) -> Option<Event> {
        let made = match d {
            Decision::CreateAndPublishId { epoch, generation, grow } => {
                match self.backend.unique_id() {
                    Ok(id) => out.push(Outcome::Publish { epoch, generation, id, grow }),
                    Err(e) => out.push(Outcome::GaveUp(e)),
                }
                return None;
            }
            Decision::Init { id, rank, size, .. } => self.backend.init(&id, rank, size),
            Decision::JoinGrown { id, rank, size, .. } => self.backend.join_grown(&id, rank, size),
            Decision::Grow { id, size, .. } => self.parent().and_then(|c| c.grow(&id, size)),
            Decision::Shrink { exclude, .. } => self.parent().and_then(|c| c.shrink(&exclude)),
            Decision::Revoke => {
                // Best effort: a revoke that fails leaves the shrink (with abort) or the
                // abort of the next view to free the stuck ranks.
                if let Some(c) = self.comm.as_mut() {
                    let _ = c.revoke();
                }
                return None;
            }
            Decision::Abort => {
                if let Some(mut c) = self.comm.take() {
                    let _ = c.abort();
                }
                return None;
            }
            Decision::Destroy => {
                self.comm = None; // dropping it destroys it
                return None;
            }
            Decision::PollAfter(pause) => {
                std::thread::sleep(pause);
                return Some(Event::Polled(self.poll()));
            }
            Decision::Ready { epoch } => {
                out.push(Outcome::Ready { epoch });
                return None;
            }
            Decision::GiveUp(e) => {
                out.push(Outcome::GaveUp(e));
                return None;
            }
        };
        Some(Event::Polled(match made {
            Ok(comm) => {
                // The old communicator (if any) is replaced: dropping it destroys it.
                self.comm = Some(comm);
                self.poll()
            }
            Err(e) => AsyncState::Failed(e),
        }))
    }

    fn parent(&mut self) -> Result<&mut B::Comm, DeviceError> {
        self.comm.as_mut().ok_or_else(|| DeviceError::Aborted { reason: "no communicator to shrink or grow".into() })
    }

    fn poll(&self) -> AsyncState {
        match self.comm.as_ref().map(DeviceComm::async_state) {
            Some(Ok(state)) => state,
            Some(Err(e)) => AsyncState::Failed(e),
            None => AsyncState::Failed(DeviceError::Aborted { reason: "the communicator is gone".into() }),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::device::membership::IdRelay;
    use crate::device::standin::StandIn;
    use crate::device::Capabilities;
    use crate::dtype::ReduceOp;

    const NCCL_2_28_3: Capabilities =
        Capabilities { init_config: true, abort: true, async_error: true, shrink: true, revoke: false, grow: false };

    /// The peers' drivers and the master's relay, stepped by the test.
    struct Cluster {
        backend: StandIn,
        peers: Vec<DeviceDriver<StandIn>>,
        relay: IdRelay,
    }

    impl Cluster {
        fn new(n: u64, caps: Capabilities) -> Cluster {
            let backend = StandIn::new(caps, Duration::from_secs(20));
            let peers = (0..n).map(|p| DeviceDriver::new(p, backend.clone())).collect();
            Cluster { backend, peers, relay: IdRelay::default() }
        }

        /// The master announces a view; ids flow through the relay; every member ends ready.
        fn view(&mut self, epoch: u64, members: &[u64]) {
            self.relay.view(epoch, members.to_vec());
            let mut ready = Vec::new();
            let mut published = Vec::new();
            for &p in members {
                for o in self.peers[p as usize].handle(Event::View { epoch, members: members.to_vec() }) {
                    match o {
                        Outcome::Publish { epoch, generation, id, grow } => {
                            published.push((p, epoch, generation, id, grow))
                        }
                        Outcome::Ready { epoch: e } => ready.push((p, e)),
                        Outcome::GaveUp(e) => panic!("peer {p}: {e}"),
                    }
                }
            }
            for (from, epoch, generation, id, grow) in published {
                for (to, event) in self.relay.publish(from, epoch, generation, id, grow) {
                    for o in self.peers[to as usize].handle(event) {
                        let Outcome::Ready { epoch: e } = o else { panic!("peer {to}: {o:?}") };
                        ready.push((to, e));
                    }
                }
            }
            ready.sort_unstable();
            assert_eq!(ready, members.iter().map(|&p| (p, epoch)).collect::<Vec<_>>());
        }

        /// All-reduces `rank + 1` over `members`, one thread each.
        fn all_reduce(&mut self, members: &[u64]) -> Vec<Result<Vec<f32>, DeviceError>> {
            let mut comms: Vec<&mut DeviceDriver<StandIn>> = self
                .peers
                .iter_mut()
                .enumerate()
                .filter(|(p, _)| members.contains(&(*p as u64)))
                .map(|(_, d)| d)
                .collect();
            std::thread::scope(|s| {
                let hs: Vec<_> = comms
                    .iter_mut()
                    .map(|d| {
                        s.spawn(move || {
                            let c = d.comm().ok_or(DeviceError::Aborted { reason: "not ready".into() })?;
                            let mut buf = vec![c.rank() as f32 + 1.0; 4];
                            c.all_reduce(&mut buf, ReduceOp::Sum).map(|()| buf)
                        })
                    })
                    .collect();
                hs.into_iter().map(|h| h.join().unwrap()).collect()
            })
        }
    }

    /// A whole life, with each capability mix: 3 peers, peer 1 lost mid-collective (the
    /// survivors' collective fails, they report it), the survivors' next communicator
    /// (shrink or fresh), exact sums over it, peer 3 joins (grow or fresh), exact sums
    /// over all.
    #[test]
    fn a_group_lives_through_a_loss_and_a_join_on_the_stand_in() {
        let bare = Capabilities::default();
        for caps in [Capabilities::ALL, NCCL_2_28_3, bare] {
            let mut c = Cluster::new(4, caps);
            c.view(1, &[0, 1, 2]);
            assert!(c.all_reduce(&[0, 1, 2]).into_iter().all(|r| r == Ok(vec![6.0; 4])), "{caps:?}");

            let id = c.peers[0].comm.as_ref().unwrap().id();
            c.backend.fail(&id, "rank 1 lost");
            let errors: Vec<DeviceError> = c.all_reduce(&[0, 2]).into_iter().map(|r| r.unwrap_err()).collect();
            for (p, e) in [0, 2].into_iter().zip(errors) {
                assert!(matches!(e, DeviceError::Call { .. }), "{e:?}");
                assert_eq!(c.peers[p].handle(Event::Failed(e)), vec![], "nothing for the caller to do");
            }
            assert!(c.peers[0].comm().is_none(), "a failed communicator is not handed out");
            c.view(2, &[0, 2]);
            assert!(c.all_reduce(&[0, 2]).into_iter().all(|r| r == Ok(vec![3.0; 4])), "{caps:?}");

            c.view(3, &[0, 2, 3]);
            assert_eq!(c.peers[3].comm().map(|c| (c.rank(), c.size())), Some((2, 3)));
            assert!(c.all_reduce(&[0, 2, 3]).into_iter().all(|r| r == Ok(vec![6.0; 4])), "{caps:?}");
        }
    }

    #[test]
    fn a_failed_creation_gives_up_with_the_error() {
        let backend = StandIn::new(Capabilities::ALL, Duration::from_secs(1));
        let mut d = DeviceDriver::new(0, backend.clone());
        let out = d.handle(Event::View { epoch: 1, members: vec![0, 1] });
        let [Outcome::Publish { id, .. }] = out.as_slice() else { panic!("{out:?}") };
        // The group of that id is failed before this peer joins it.
        let _other = backend.init(id, 1, 2).unwrap();
        backend.fail(id, "the other rank died during creation");
        let out = d.handle(Event::UniqueId { epoch: 1, generation: 0, id: *id, grow: false });
        assert!(matches!(out.as_slice(), [Outcome::GaveUp(DeviceError::Call { .. })]), "{out:?}");
        assert!(d.comm().is_none());
    }
}
