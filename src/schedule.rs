//! Which of a plan's actions may begin now (docs/ARCHITECTURE.md, "The schedule").
//! Pure, like the planner: stops and parks begin at once, side by side; a start (or a
//! resume) begins once the stops and parks it waits for (`Action::after`) are done and
//! the GPU shows its room, so starts that fit run side by side too. The reconciler asks
//! again after every event, so an action waiting here begins as soon as what it waits
//! for is done.

use crate::config::ServiceName;
use crate::plan::{Action, Plan};

/// Why a planned start does not begin yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Wait {
    /// For these services' stops to finish and their memory to come back.
    Stops(Vec<ServiceName>),
    /// The budget has room, but the GPU does not show it yet (a driver still tearing
    /// down an exited process, or memory taken outside the daemon): trust the GPU.
    GpuRoom { need_mb: u64, room_mb: u64 },
}

#[derive(Debug, Default, PartialEq, Eq)]
pub struct Launch {
    pub begin: Vec<Action>,
    pub waiting: Vec<(Action, Wait)>,
}

/// What may begin now. `gpu_room_mb` is the memory the GPU shows free for new starts
/// (free, less the reserve and what starts under way have yet to allocate); None when
/// no GPU is observed and the budget alone decides.
pub fn launch(plan: &Plan, gpu_room_mb: Option<u64>) -> Launch {
    let mut room = gpu_room_mb;
    let mut launch = Launch::default();
    for action in &plan.actions {
        let wait = match action.op {
            op if op.frees() => None,
            _ if !action.after.is_empty() => Some(Wait::Stops(action.after.clone())),
            _ => match room {
                Some(room_mb) if room_mb < action.vram_mb => Some(Wait::GpuRoom {
                    need_mb: action.vram_mb,
                    room_mb,
                }),
                Some(room_mb) => {
                    room = Some(room_mb - action.vram_mb);
                    None
                }
                None => None,
            },
        };
        match wait {
            Some(wait) => launch.waiting.push((action.clone(), wait)),
            None => launch.begin.push(action.clone()),
        }
    }
    launch
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use proptest::prelude::*;

    use super::*;
    use crate::config::{Inventory, ServiceSpec};
    use crate::desired::DesiredState;
    use crate::plan::{plan, Budget, Condition, Observation, Op, Presence, ServiceView, StartGate};

    /// Service `s<index>`, priority `index * 10`.
    fn spec(index: usize, vram_mb: u64, phases: Vec<u32>) -> ServiceSpec {
        crate::plan::tests::spec(&format!("s{index}"), vram_mb, index as i64 * 10, phases)
    }

    /// A host: what each service holds, and the actions under way.
    #[derive(Debug, Clone)]
    struct World {
        inventory: Inventory,
        budget: Budget,
        services: BTreeMap<ServiceName, ServiceView>,
        /// Services whose stop began while they were parked: until it ends they hold
        /// their residual, not what they take running.
        stopping_parked: BTreeSet<ServiceName>,
    }

    impl World {
        fn observation(&self) -> Observation {
            Observation {
                budget: self.budget,
                services: self.services.clone(),
                demanded: BTreeSet::new(),
            }
        }

        /// Memory held by services running, starting, parked, or still reclaiming.
        fn occupied_mb(&self) -> u64 {
            self.services
                .iter()
                .map(|(name, v)| {
                    let spec = self.inventory.get(name).unwrap();
                    let residual = spec.park.as_ref().map_or(0, |p| p.residual_mb);
                    match v.presence {
                        Presence::Stopped => 0,
                        Presence::Parked => residual,
                        Presence::Stopping if self.stopping_parked.contains(name) => residual,
                        _ => spec.vram_mb.max(v.observed_mb.unwrap_or(0)),
                    }
                })
                .sum()
        }

        fn under_way(&self) -> Vec<ServiceName> {
            self.services
                .iter()
                .filter(|(_, v)| {
                    matches!(
                        v.presence,
                        Presence::Starting | Presence::Stopping | Presence::Parking
                    )
                })
                .map(|(n, _)| n.clone())
                .collect()
        }
    }

    fn arb_world() -> impl Strategy<Value = (World, DesiredState)> {
        let service = (1u64..12_000, 0u32..3, 0u8..6, prop::option::of(0u64..2_000));
        (
            prop::collection::vec(service, 1..7),
            0u32..3,
            16_000u64..40_000,
            0u64..3_000,
        )
            .prop_map(|(services, phase, total, external)| {
                let mut specs = Vec::new();
                let mut views = BTreeMap::new();
                for (i, (vram, ph, presence, residual)) in services.into_iter().enumerate() {
                    let mut spec = spec(i, vram, vec![ph]);
                    // A residual is at most what the service runs with (the config
                    // refuses more).
                    spec.park = residual.map(|mb| crate::plan::tests::parks_with(mb.min(vram)));
                    let presence = match (presence, &spec.park) {
                        (0, _) => Presence::Running,
                        (1, _) => Presence::Starting,
                        (2, _) => Presence::Stopping,
                        (3, Some(_)) => Presence::Parking,
                        (4, Some(_)) => Presence::Parked,
                        _ => Presence::Stopped,
                    };
                    views.insert(spec.name.clone(), ServiceView::new(presence));
                    specs.push(spec);
                }
                let mut world = World {
                    inventory: Inventory::new(specs),
                    budget: Budget {
                        total_mb: total,
                        reserve_mb: 512,
                        external_mb: external,
                    },
                    services: views,
                    stopping_parked: BTreeSet::new(),
                };
                // Start from a host within its budget: stop the lowest priorities until
                // what is held fits (a host over budget is the planner's to fix, and
                // the property is that no action makes it worse).
                let names: Vec<ServiceName> = world.inventory.names().into_iter().rev().collect();
                for name in names {
                    if world.occupied_mb() <= world.budget.usable_mb() {
                        break;
                    }
                    world.services.insert(name, ServiceView::stopped());
                }
                let desired = DesiredState {
                    phase: Some(phase),
                    ..Default::default()
                };
                (world, desired)
            })
    }

    /// One way the host can move on: an action under way finishes, chosen by `pick`,
    /// possibly failing (a start that fails leaves the service stopped).
    fn finish_one(world: &mut World, pick: usize, fails: bool) {
        let under_way = world.under_way();
        let Some(name) = under_way.get(pick % under_way.len().max(1)) else {
            return;
        };
        world.stopping_parked.remove(name);
        let view = world.services.get_mut(name).unwrap();
        // A park that fails falls back to a stop; a resume that fails, to a cold start.
        view.presence = match (view.presence, fails) {
            (Presence::Starting, false) => Presence::Running,
            (Presence::Parking, false) => Presence::Parked,
            _ => Presence::Stopped,
        };
    }

    /// Plans and begins what the schedule allows, as the reconciler does after every
    /// event; a stop of a starting service cancels it (it is then stopping).
    fn step(world: &mut World, desired: &DesiredState) -> Result<usize, String> {
        let plan = plan(&world.inventory, desired, &world.observation());
        let launch = launch(&plan, None);
        for action in &launch.begin {
            let view = world.services.get_mut(&action.service).unwrap();
            if action.op == Op::Stop && view.presence == Presence::Parked {
                world.stopping_parked.insert(action.service.clone());
            }
            view.presence = match action.op {
                Op::Stop => Presence::Stopping,
                Op::Park => Presence::Parking,
                Op::Start | Op::Resume => Presence::Starting,
            };
            let occupied = world.occupied_mb();
            if !action.op.frees() && occupied > world.budget.usable_mb() {
                return Err(format!(
                    "beginning {action:?} puts {occupied} MB in use, over the usable {} MB",
                    world.budget.usable_mb()
                ));
            }
        }
        Ok(launch.begin.len())
    }

    proptest! {
        /// Over every order in which actions can finish (and fail), no start or resume
        /// ever puts the memory of running, starting, parked and reclaiming services
        /// over the budget, and the host converges on the plan's verdicts.
        #[test]
        fn every_schedule_stays_within_the_budget_and_converges(
            (mut world, desired) in arb_world(),
            order in prop::collection::vec((0usize..8, prop::bool::weighted(0.1)), 0..40),
        ) {
            let result = step(&mut world, &desired);
            prop_assert!(result.is_ok(), "{:?}", result);
            for (pick, fails) in order {
                finish_one(&mut world, pick, fails);
                let result = step(&mut world, &desired);
                prop_assert!(result.is_ok(), "{:?}", result);
            }
            // Let everything under way finish, without failures: the host converges.
            for _ in 0..4 * world.inventory.len() + 4 {
                finish_one(&mut world, 0, false);
                let result = step(&mut world, &desired);
                prop_assert!(result.is_ok(), "{:?}", result);
            }
            prop_assert!(world.under_way().is_empty(), "still under way: {:?}", world.under_way());
            let plan = crate::plan::plan(&world.inventory, &desired, &world.observation());
            prop_assert!(plan.is_empty(), "not converged: {:?}", plan.actions);
            for (name, verdict) in &plan.verdicts {
                let running = world.services[name].presence == Presence::Running;
                prop_assert_eq!(running, verdict.runs(), "{}: {:?}", name, verdict);
            }
        }
    }

    fn two_swaps() -> (World, DesiredState) {
        // 24 GB: a and b (8 GB each) run; phase 1 wants c and d (8 GB each) instead.
        let inventory = Inventory::new(vec![
            spec(4, 8000, vec![1]),
            spec(3, 8000, vec![1]),
            spec(2, 8000, vec![0]),
            spec(1, 8000, vec![0]),
        ]);
        let mut services = BTreeMap::new();
        for (name, presence) in [
            ("s4", Presence::Stopped),
            ("s3", Presence::Stopped),
            ("s2", Presence::Running),
            ("s1", Presence::Running),
        ] {
            let name = ServiceName::parse(name).unwrap();
            services.insert(name, ServiceView::new(presence));
        }
        let world = World {
            inventory,
            budget: Budget {
                total_mb: 24_512,
                reserve_mb: 512,
                external_mb: 0,
            },
            services,
            stopping_parked: BTreeSet::new(),
        };
        let desired = DesiredState {
            phase: Some(1),
            ..Default::default()
        };
        (world, desired)
    }

    #[test]
    fn independent_stops_begin_together_and_a_start_waits_only_for_the_memory_it_needs() {
        let (world, desired) = two_swaps();
        let plan = crate::plan::plan(&world.inventory, &desired, &world.observation());
        let launch = launch(&plan, None);
        let begun: Vec<String> = launch
            .begin
            .iter()
            .map(|a| format!("{} {}", a.op, a.service))
            .collect();
        // 8 GB is free: the first start needs no stop; the second needs one of them.
        assert_eq!(begun, ["stop s1", "stop s2", "start s4"]);
        let name = |n: &str| ServiceName::parse(n).unwrap();
        assert_eq!(
            launch.waiting,
            [(plan.actions[3].clone(), Wait::Stops(vec![name("s1")]))]
        );
    }

    #[test]
    fn a_start_waits_for_the_gpu_to_show_its_room() {
        let (world, desired) = two_swaps();
        let plan = crate::plan::plan(&world.inventory, &desired, &world.observation());
        let launch = launch(&plan, Some(5000));
        assert_eq!(launch.begin.len(), 2, "the two stops");
        assert_eq!(
            launch.waiting[0].1,
            Wait::GpuRoom {
                need_mb: 8000,
                room_mb: 5000
            }
        );
        // Once the first start's memory is counted, the next must find room beside it.
        let launch = super::launch(&plan, Some(12_000));
        assert!(launch.begin.iter().any(|a| a.service.as_str() == "s4"));
    }

    #[test]
    fn unhealthy_services_are_stopped_whatever_is_wanted() {
        let (mut world, desired) = two_swaps();
        let name = ServiceName::parse("s4").unwrap();
        world.services.insert(
            name.clone(),
            ServiceView {
                condition: Condition::Unhealthy {
                    reason: "3 failed probes".into(),
                },
                ..ServiceView::new(Presence::Running)
            },
        );
        let plan = crate::plan::plan(&world.inventory, &desired, &world.observation());
        let stop = plan
            .actions
            .iter()
            .find(|a| a.service == name)
            .expect("a stop");
        assert_eq!(
            (stop.op, stop.cause),
            (Op::Stop, crate::plan::Cause::Unhealthy)
        );
        // A stop that failed (gate closed) is not retried before its backoff ends, and
        // its memory stays counted.
        world.services.insert(
            name.clone(),
            ServiceView {
                gate: StartGate::Closed {
                    reason: "stop failed; retrying in 2s".into(),
                },
                ..ServiceView::new(Presence::Running)
            },
        );
        let plan = crate::plan::plan(&world.inventory, &desired, &world.observation());
        assert!(plan.actions.iter().all(|a| a.service != name), "{plan:?}");
    }
}
