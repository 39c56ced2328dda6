//! The planner: a pure function from (inventory, desired state, observation) to a plan.
//! No I/O, no clock: the same inputs always give the same plan, which is what lets the
//! property tests below (and those of `schedule`) check every plan against the budget.
//!
//! Rules (docs/ARCHITECTURE.md, "The plan"): the wanted set is trimmed by priority until
//! it fits the budget (the rest is preempted or refused, with the reason); stops are
//! listed lowest priority first and starts highest priority first; each start names the
//! stops it must wait for (`after`), the fewest whose memory makes room for it, so the
//! plan is a dependency graph that runs concurrently and never exceeds the budget.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::Serialize;

use crate::config::{Inventory, Phase, ServiceName, ServiceSpec};
use crate::desired::{Claim, DesiredState, WantReason};

/// The VRAM the planner may hand out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Budget {
    pub total_mb: u64,
    pub reserve_mb: u64,
    /// Memory held by no service: a desktop, a stray process, the driver.
    pub external_mb: u64,
}

impl Budget {
    pub fn usable_mb(&self) -> u64 {
        self.total_mb
            .saturating_sub(self.reserve_mb)
            .saturating_sub(self.external_mb)
    }
}

/// Whether a service occupies (or is about to occupy) VRAM now, and whether an action
/// is under way for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Presence {
    /// Running or unhealthy, with no action under way: it holds memory.
    Running,
    /// A start is under way: it holds (or is taking) its memory.
    Starting,
    /// A stop is under way (or a cancelled start is being stopped): its memory is on the
    /// way back. The planner never plans for it until the stop is done.
    Stopping,
    /// A park is under way: its memory is on the way back, down to its residual.
    Parking,
    /// Alive, holding only its residual (docs/ARCHITECTURE.md, "Parking and draining").
    Parked,
    Stopped,
}

impl Presence {
    fn holds_memory(self) -> bool {
        self != Presence::Stopped
    }
}

/// Whether the planner may act on a service now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StartGate {
    Open,
    /// Failed repeatedly, or backing off before the next try (of a start, or of a stop
    /// that failed).
    Closed {
        reason: String,
    },
}

/// How a running service is doing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Condition {
    Healthy,
    /// It failed its health checks, or an adopted instance never became ready: it is
    /// stopped (under the lease, like any action) and restarted with backoff.
    Unhealthy {
        reason: String,
    },
}

/// Whether what runs was launched as the config says now (docs/ARCHITECTURE.md,
/// "Reloading the config").
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Launch {
    Current,
    /// A reload changed these launch keys (`command`, `env`, `container`...) since it
    /// started: it is stopped, drained like any stop, and started again the new way.
    Outdated {
        keys: Vec<&'static str>,
    },
}

/// What the planner needs to know of one service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceView {
    pub presence: Presence,
    /// VRAM the GPU attributes to the service's processes, when a GPU is observed.
    pub observed_mb: Option<u64>,
    /// The peak VRAM it was seen to take in earlier runs (src/footprints.rs): a start
    /// is budgeted at it when it exceeds the declared size.
    pub learned_mb: Option<u64>,
    /// What a park left it holding, as observed before (src/footprints.rs); None: the
    /// configured `park.residual_mb` is trusted.
    pub learned_residual_mb: Option<u64>,
    pub gate: StartGate,
    pub condition: Condition,
    pub launch: Launch,
}

impl ServiceView {
    pub fn stopped() -> Self {
        Self::new(Presence::Stopped)
    }

    pub fn new(presence: Presence) -> Self {
        Self {
            presence,
            observed_mb: None,
            learned_mb: None,
            learned_residual_mb: None,
            gate: StartGate::Open,
            condition: Condition::Healthy,
            launch: Launch::Current,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observation {
    pub budget: Budget,
    /// Services missing here are taken as stopped.
    pub services: BTreeMap<ServiceName, ServiceView>,
    /// The services the demand proxy sees used (src/demand.rs): wanted beside the phase
    /// and the pins, at their own priority.
    pub demanded: BTreeSet<ServiceName>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    Stop,
    Start,
    /// Give the memory back down to the residual; the process or container lives on.
    Park,
    /// Bring a parked service's memory back: the same process, not a restart.
    Resume,
}

impl Op {
    /// Whether the step gives memory back (it never waits for room).
    pub fn frees(self) -> bool {
        matches!(self, Op::Stop | Op::Park)
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Op::Stop => "stop",
            Op::Start => "start",
            Op::Park => "park",
            Op::Resume => "resume",
        })
    }
}

/// Why an action is taken, as a type: decisions match on this, never on reason text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Cause {
    /// Start: the desired phase lists it.
    Phase { phase: Phase },
    /// Start: pinned.
    Pinned,
    /// Start: a live claim protects it.
    Claimed,
    /// Start: a request came for it through its proxy.
    Demanded,
    /// Start: an instance left running by an earlier daemon, adopted and checked ready.
    Adopted,
    /// Stop: neither the phase nor a pin wants it.
    NotWanted,
    /// Stop: held stopped.
    Held,
    /// Stop: higher-priority wanted services need its memory.
    Preempted,
    /// Stop: it failed its health checks; it is restarted with backoff.
    Unhealthy,
    /// Stop: a start that a newer desired state no longer wants, cancelled.
    Superseded,
    /// Stop: a reload changed how it is launched; it is started again the new way.
    ConfigChanged,
    /// Stop: a reload removed it from the config; it is forgotten once stopped.
    Removed,
}

impl From<WantReason> for Cause {
    fn from(why: WantReason) -> Self {
        match why {
            WantReason::Phase(phase) => Cause::Phase { phase },
            WantReason::Pinned => Cause::Pinned,
            WantReason::Claimed => Cause::Claimed,
            WantReason::Demanded => Cause::Demanded,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Action {
    pub op: Op,
    pub service: ServiceName,
    /// What the step frees (stop, park) or needs (start, resume: what it takes beyond
    /// what it holds parked), in MB.
    pub vram_mb: u64,
    pub cause: Cause,
    pub reason: String,
    /// A start waits for these services' stops (and reclaims) to finish: the fewest,
    /// lowest priority first, whose memory makes room for it. Empty: it can run now.
    pub after: Vec<ServiceName>,
}

/// The planner's verdict on one service of the inventory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "verdict", rename_all = "snake_case")]
pub enum Verdict {
    /// Wanted and given room: it runs (or keeps running). `reason`: why it is wanted
    /// now ("wanted by phase 3", "demanded..."), which status shows while it runs.
    Run { reason: String },
    /// Not wanted: it is stopped (or stays stopped).
    Idle,
    /// Wanted, but claimed or higher-priority wanted services take the room. `claims`:
    /// the claims on the services kept before it, which no priority outweighs.
    Preempted {
        reason: String,
        shortfall_mb: u64,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        claims: Vec<Claim>,
    },
    /// Wanted, but it cannot fit even with every lower-priority service stopped.
    Refused { reason: String, shortfall_mb: u64 },
    /// Its gate is closed (failed, or backing off), or it is unhealthy: no action is
    /// planned for it now but the stop of an unhealthy one.
    Held { reason: String },
}

impl Verdict {
    pub fn runs(&self) -> bool {
        matches!(self, Verdict::Run { .. })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Plan {
    pub actions: Vec<Action>,
    pub verdicts: BTreeMap<ServiceName, Verdict>,
    pub budget: Budget,
    /// The claims on the services kept running: what the plan protects
    /// (docs/ARCHITECTURE.md, "Claims").
    pub protected: Vec<Claim>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.actions.is_empty()
    }

    pub fn verdict(&self, name: &ServiceName) -> Option<&Verdict> {
        self.verdicts.get(name)
    }
}

/// A plan as text for people: the budget, the steps in order, and why the wanted
/// services that will not run are left out.
pub fn render(plan: &Plan) -> String {
    let b = &plan.budget;
    let mut out = format!(
        "budget: {} MB usable = {} MB total - {} MB reserve - {} MB external\n",
        b.usable_mb(),
        b.total_mb,
        b.reserve_mb,
        b.external_mb
    );
    if plan.actions.is_empty() {
        out.push_str("nothing to do: what runs is what is wanted\n");
    }
    for (step, action) in plan.actions.iter().enumerate() {
        let after = if action.after.is_empty() {
            String::new()
        } else {
            let names: Vec<&str> = action.after.iter().map(ServiceName::as_str).collect();
            format!(" [after {}]", names.join(", "))
        };
        out.push_str(&format!(
            "{}. {} {} ({} MB){after}: {}\n",
            step + 1,
            action.op,
            action.service,
            action.vram_mb,
            action.reason
        ));
    }
    for claim in &plan.protected {
        out.push_str(&format!(
            "{} protected: claimed by {:?} until {}\n",
            claim.service,
            claim.holder.as_str(),
            claim.until
        ));
    }
    for (name, verdict) in &plan.verdicts {
        let (label, reason) = match verdict {
            Verdict::Preempted { reason, .. } => ("preempted", reason),
            Verdict::Refused { reason, .. } => ("refused", reason),
            Verdict::Held { reason } => ("held back", reason),
            Verdict::Run { .. } | Verdict::Idle => continue,
        };
        out.push_str(&format!("{name} {label}: {reason}\n"));
    }
    out
}

/// The VRAM a service needs when it runs: its declared need, or more if it was seen to
/// take more (its learned peak), or if the GPU shows more while it runs.
fn footprint(spec: &ServiceSpec, view: &ServiceView) -> u64 {
    footprint_mb(spec.vram_mb, view)
}

/// [`footprint`] from a declared size alone, for readers of the status snapshot
/// (`GET /gpu/can-fit`) that have no [`ServiceSpec`].
pub fn footprint_mb(declared_mb: u64, view: &ServiceView) -> u64 {
    let known = declared_mb.max(view.learned_mb.unwrap_or(0));
    match view.presence {
        Presence::Stopped => known,
        // A parked service shows its residual: resumed, it takes what it runs with,
        // and never less than what it holds parked.
        _ => known.max(view.observed_mb.unwrap_or(0)),
    }
}

/// Why a service counts for more than it declares, for reasons people read.
fn beyond_declared(spec: &ServiceSpec, view: &ServiceView, need: u64) -> String {
    if need <= spec.vram_mb {
        String::new()
    } else if view.learned_mb == Some(need) {
        format!(" (its learned peak; declared vram_mb {} MB)", spec.vram_mb)
    } else {
        format!(" (observed; declared vram_mb {} MB)", spec.vram_mb)
    }
}

/// What it keeps when parked: as last observed, else as configured. None: it cannot park.
fn residual(spec: &ServiceSpec, view: &ServiceView) -> Option<u64> {
    let park = spec.park.as_ref()?;
    Some(view.learned_residual_mb.unwrap_or(park.residual_mb))
}

/// The VRAM it holds now (or is about to, for a start under way).
fn held(spec: &ServiceSpec, view: &ServiceView) -> u64 {
    match view.presence {
        Presence::Stopped => 0,
        Presence::Parked => view
            .observed_mb
            .or_else(|| residual(spec, view))
            .unwrap_or(0),
        _ => footprint(spec, view),
    }
}

/// What its stop or park under way (or planned) gives back.
fn freed_by(spec: &ServiceSpec, view: &ServiceView, op: Op) -> u64 {
    match op {
        Op::Park => footprint(spec, view).saturating_sub(residual(spec, view).unwrap_or(0)),
        _ => held(spec, view),
    }
}

/// Memory that stays where it is whatever this plan does: a service holding memory
/// whose gate is closed (a stop that failed waits for its retry).
fn stuck(view: &ServiceView) -> bool {
    view.presence.holds_memory() && matches!(view.gate, StartGate::Closed { .. })
}

/// Whether a service that will not run may stay (or become) parked, rather than be
/// stopped: it can park, nobody asked for a real stop, and it is healthy.
fn may_park(spec: &ServiceSpec, view: &ServiceView, desired: &DesiredState) -> bool {
    spec.park.is_some()
        && !desired.held.contains(&spec.name)
        && view.condition == Condition::Healthy
        && view.launch == Launch::Current
        && matches!(
            view.presence,
            Presence::Running | Presence::Parking | Presence::Parked
        )
}

/// Computes the plan. Pure: no I/O, no clock.
pub fn plan(inventory: &Inventory, desired: &DesiredState, observed: &Observation) -> Plan {
    let wanted = desired.wanted_with(inventory, &observed.demanded);
    let stopped = ServiceView::stopped();
    let view_of = |name: &ServiceName| observed.services.get(name).unwrap_or(&stopped);
    let usable = observed.budget.usable_mb();
    let stuck_mb: u64 = inventory
        .iter()
        .filter(|s| stuck(view_of(&s.name)))
        .map(|s| held(s, view_of(&s.name)))
        .sum();

    // Greedy: claimed services first (those already holding memory before those not,
    // so a new claim never takes an older one's room), then by priority (the inventory
    // iterates highest first): each wanted service is kept if it fits in what those
    // kept before it left (docs/ARCHITECTURE.md, "Claims").
    let mut verdicts = BTreeMap::new();
    let mut kept: Vec<(&ServiceSpec, u64)> = Vec::new();
    let mut remaining = usable.saturating_sub(stuck_mb);
    let mut in_turn: Vec<&ServiceSpec> = inventory.iter().collect();
    in_turn.sort_by_key(|s| turn(desired, view_of(&s.name), &s.name));
    for spec in in_turn {
        let view = view_of(&spec.name);
        let verdict = match (wanted.get(&spec.name), &view.gate, &view.condition) {
            (_, StartGate::Closed { reason }, _) if view.presence.holds_memory() => Verdict::Held {
                reason: reason.clone(),
            },
            (_, _, Condition::Unhealthy { reason }) if view.presence == Presence::Running => {
                Verdict::Held {
                    reason: reason.clone(),
                }
            }
            (None, _, _) => Verdict::Idle,
            (Some(_), StartGate::Closed { reason }, _) => Verdict::Held {
                reason: reason.clone(),
            },
            (Some(why), StartGate::Open, _) => {
                let need = footprint(spec, view);
                if need <= remaining {
                    remaining -= need;
                    kept.push((spec, need));
                    Verdict::Run {
                        reason: start_reason(*why),
                    }
                } else {
                    let room = Room {
                        remaining,
                        kept: &kept,
                        budget: &observed.budget,
                    };
                    shortfall_verdict(spec, view, need, &room, desired)
                }
            }
        };
        verdicts.insert(spec.name.clone(), verdict);
    }

    // What will not run parks where it can and its residual fits beside what runs:
    // running ones first, then those already parked, highest priority first. The rest
    // is stopped (docs/ARCHITECTURE.md, "Parking and draining").
    let will_not_run = |spec: &&ServiceSpec| {
        !verdicts[&spec.name].runs()
            && !stuck(view_of(&spec.name))
            && may_park(spec, view_of(&spec.name), desired)
    };
    let already_parked = |spec: &&ServiceSpec| view_of(&spec.name).presence == Presence::Parked;
    let mut stays_parked = Vec::new();
    let by_preference = inventory
        .iter()
        .filter(will_not_run)
        .filter(|s| !already_parked(s))
        .chain(inventory.iter().filter(will_not_run).filter(already_parked));
    for spec in by_preference {
        let view = view_of(&spec.name);
        // What it would hold parked: as the GPU shows it, if it is parked already.
        let keep = match view.presence {
            Presence::Parked => held(spec, view),
            _ => residual(spec, view).unwrap_or(0),
        };
        if keep <= remaining {
            remaining -= keep;
            stays_parked.push(spec.name.clone());
        }
    }

    let mut actions = Vec::new();
    // Stops first of parked services, then parks or stops of running ones, lowest
    // priority first. A stop of a starting service cancels its start.
    let lowest_first: Vec<&ServiceSpec> = inventory
        .iter()
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    let mut give_back = |spec: &ServiceSpec, presences: &[Presence]| {
        let view = view_of(&spec.name);
        let verdict = &verdicts[&spec.name];
        if !presences.contains(&view.presence) || stuck(view) || verdict.runs() {
            return;
        }
        let op = match stays_parked.contains(&spec.name) {
            true if view.presence == Presence::Parked => return,
            true => Op::Park,
            false => Op::Stop,
        };
        let cause = stop_cause(desired, &spec.name, view, verdict);
        actions.push(Action {
            op,
            service: spec.name.clone(),
            vram_mb: freed_by(spec, view, op),
            cause,
            reason: stop_reason(desired, cause, verdict),
            after: Vec::new(),
        });
    };
    for spec in &lowest_first {
        give_back(spec, &[Presence::Parked]);
    }
    for spec in &lowest_first {
        give_back(spec, &[Presence::Running, Presence::Starting]);
    }
    // What is on its way back, in the order it comes back: stops and parks under way,
    // then the planned ones.
    let mut frees: Vec<(ServiceName, u64)> = lowest_first
        .iter()
        .filter_map(|s| {
            let view = view_of(&s.name);
            let op = match view.presence {
                Presence::Stopping => Op::Stop,
                Presence::Parking => Op::Park,
                _ => return None,
            };
            Some((s.name.clone(), freed_by(s, view, op)))
        })
        .collect();
    frees.extend(actions.iter().map(|a| (a.service.clone(), a.vram_mb)));
    let occupied: u64 = inventory.iter().map(|s| held(s, view_of(&s.name))).sum();
    let mut room = usable as i128 - occupied as i128;
    let mut freed = frees.iter();
    let mut after: Vec<ServiceName> = Vec::new();
    // Starts and resumes: highest priority first, each after the fewest frees that
    // make its room. A resume needs what it takes beyond its residual.
    for (spec, need) in &kept {
        let view = view_of(&spec.name);
        let (op, need) = match view.presence {
            Presence::Stopped => (Op::Start, *need),
            Presence::Parked if view.launch == Launch::Current => {
                (Op::Resume, need.saturating_sub(held(spec, view)))
            }
            _ => continue,
        };
        while room < need as i128 {
            let Some((name, mb)) = freed.next() else {
                break;
            };
            room += *mb as i128;
            after.push(name.clone());
        }
        room -= need as i128;
        actions.push(Action {
            op,
            service: spec.name.clone(),
            vram_mb: need,
            cause: Cause::from(wanted[&spec.name]),
            reason: start_reason(wanted[&spec.name]),
            after: after.clone(),
        });
    }
    // Last, so that no start counts on their memory: what keeps running (or is kept
    // parked) but was launched the old way is restarted; its start is planned once it
    // is stopped.
    for spec in &lowest_first {
        let view = view_of(&spec.name);
        let Launch::Outdated { keys } = &view.launch else {
            continue;
        };
        let idle = matches!(view.presence, Presence::Running | Presence::Parked);
        if idle && !stuck(view) && verdicts[&spec.name].runs() {
            actions.push(Action {
                op: Op::Stop,
                service: spec.name.clone(),
                vram_mb: held(spec, view),
                cause: Cause::ConfigChanged,
                reason: format!("config changed ({}): restarting it", keys.join(", ")),
                after: Vec::new(),
            });
        }
    }
    let protected = desired
        .claims
        .iter()
        .filter(|c| verdicts.get(&c.service).is_some_and(Verdict::runs))
        .cloned()
        .collect();
    Plan {
        actions,
        verdicts,
        budget: observed.budget,
        protected,
    }
}

/// When a service's turn to be kept comes, earliest first: a claimed service that holds
/// memory, then one that does not yet, then every other (each group stays in priority
/// order: the sort is stable).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Turn {
    ClaimedAndPresent,
    Claimed,
    Unclaimed,
}

fn turn(desired: &DesiredState, view: &ServiceView, name: &ServiceName) -> Turn {
    match (desired.is_claimed(name), view.presence.holds_memory()) {
        (true, true) => Turn::ClaimedAndPresent,
        (true, false) => Turn::Claimed,
        (false, _) => Turn::Unclaimed,
    }
}

/// What is left for a wanted service when its turn comes.
struct Room<'a> {
    remaining: u64,
    /// The services kept before it, with what each takes.
    kept: &'a [(&'a ServiceSpec, u64)],
    budget: &'a Budget,
}

fn shortfall_verdict(
    spec: &ServiceSpec,
    view: &ServiceView,
    need: u64,
    room: &Room<'_>,
    desired: &DesiredState,
) -> Verdict {
    let budget = room.budget;
    let shortfall_mb = need - room.remaining;
    let usable = budget.usable_mb();
    let why_need = beyond_declared(spec, view, need);
    let held_by_others = format!(
        "{} MB external, {} MB reserve",
        budget.external_mb, budget.reserve_mb
    );
    if need > usable {
        return Verdict::Refused {
            reason: format!(
                "{} needs {need} MB{why_need} but the GPU can give at most {usable} MB ({} MB total - {held_by_others}): {shortfall_mb} MB missing even with every other service stopped",
                spec.name, budget.total_mb
            ),
            shortfall_mb,
        };
    }
    let claims: Vec<Claim> = room
        .kept
        .iter()
        .flat_map(|(s, _)| desired.claims_on(&s.name).cloned())
        .collect();
    let holders: Vec<String> = room
        .kept
        .iter()
        .map(|(s, mb)| {
            let holders: Vec<String> = desired
                .claims_on(&s.name)
                .map(|c| format!("{:?} until {}", c.holder.as_str(), c.until))
                .collect();
            match holders.is_empty() {
                true => format!("{} {mb} MB (priority {})", s.name, s.priority),
                false => format!("{} {mb} MB (claimed by {})", s.name, holders.join(", ")),
            }
        })
        .collect();
    let by = match claims.is_empty() {
        true => "higher-priority",
        false => "claimed or higher-priority",
    };
    Verdict::Preempted {
        reason: format!(
            "{} (priority {}) needs {need} MB{why_need}, {shortfall_mb} MB more than is left: held by {by} {}, plus {held_by_others}",
            spec.name,
            spec.priority,
            holders.join(", ")
        ),
        shortfall_mb,
        claims,
    }
}

fn start_reason(why: WantReason) -> String {
    match why {
        WantReason::Phase(phase) => format!("wanted by phase {phase}"),
        WantReason::Pinned => "pinned".to_owned(),
        WantReason::Claimed => "claimed".to_owned(),
        WantReason::Demanded => "demanded: a request came through its proxy".to_owned(),
    }
}

fn stop_cause(
    desired: &DesiredState,
    name: &ServiceName,
    view: &ServiceView,
    verdict: &Verdict,
) -> Cause {
    match (verdict, &view.condition) {
        (Verdict::Held { .. }, Condition::Unhealthy { .. }) => Cause::Unhealthy,
        (Verdict::Preempted { .. } | Verdict::Refused { .. }, _) => Cause::Preempted,
        _ if desired.held.contains(name) => Cause::Held,
        _ => Cause::NotWanted,
    }
}

fn stop_reason(desired: &DesiredState, cause: Cause, verdict: &Verdict) -> String {
    match (cause, verdict) {
        (_, Verdict::Preempted { reason, .. } | Verdict::Refused { reason, .. }) => {
            format!("preempted: {reason}")
        }
        (_, Verdict::Held { reason }) => reason.clone(),
        (Cause::Held, _) => "held stopped".to_owned(),
        _ => match desired.phase {
            Some(phase) => {
                format!("not wanted: phase {phase} does not list it and it is not pinned")
            }
            None => "not wanted: no phase set and it is not pinned".to_owned(),
        },
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::config::{CommandLine, NativeSpec, Runtime};
    use proptest::prelude::*;
    use std::time::Duration;

    /// A native service that runs `true`, for the planner's and the schedule's tests.
    pub(crate) fn spec(name: &str, vram_mb: u64, priority: i64, phases: Vec<u32>) -> ServiceSpec {
        ServiceSpec {
            name: ServiceName::parse(name).unwrap(),
            runtime: Runtime::Native(NativeSpec {
                command: CommandLine::Shell("true".into()),
                workdir: None,
                env: Default::default(),
                match_pattern: None,
                log: Default::default(),
            }),
            vram_mb,
            priority,
            phases,
            health: None,
            start_timeout: Duration::from_secs(1),
            stop_timeout: Duration::from_secs(1),
            park: None,
            drain: None,
            proxy: None,
        }
    }

    fn name(s: &str) -> ServiceName {
        ServiceName::parse(s).unwrap()
    }

    /// The requirements' inventory.
    fn mcn() -> Inventory {
        Inventory::new(vec![
            spec("comfyui", 20480, 100, vec![4]),
            spec("cosyvoice", 4096, 50, vec![3]),
            spec("vidi", 4096, 40, vec![2]),
            spec("ollama", 18432, 10, vec![]),
        ])
    }

    fn rtx4090(running: &[&str]) -> Observation {
        Observation {
            budget: Budget {
                total_mb: 24576,
                reserve_mb: 512,
                external_mb: 1024,
            },
            services: running
                .iter()
                .map(|n| (name(n), ServiceView::new(Presence::Running)))
                .collect(),
            demanded: BTreeSet::new(),
        }
    }

    /// The requirements' inventory where vidi and cosyvoice park, keeping 1 GB each.
    fn parking_mcn() -> Inventory {
        let parks = |mut spec: ServiceSpec| {
            spec.park = Some(parks_with(1024));
            spec
        };
        Inventory::new(vec![
            spec("comfyui", 20480, 100, vec![4]),
            parks(spec("cosyvoice", 4096, 50, vec![3])),
            parks(spec("vidi", 4096, 40, vec![2])),
            spec("ollama", 18432, 10, vec![]),
        ])
    }

    fn with(mut observation: Observation, name_: &str, presence: Presence) -> Observation {
        observation
            .services
            .insert(name(name_), ServiceView::new(presence));
        observation
    }

    fn ops(plan: &Plan) -> Vec<String> {
        plan.actions
            .iter()
            .map(|a| format!("{} {} {}", a.op, a.service, a.vram_mb))
            .collect()
    }

    fn outdated(mut observation: Observation, name_: &str, presence: Presence) -> Observation {
        let view = ServiceView {
            launch: Launch::Outdated {
                keys: vec!["command"],
            },
            ..ServiceView::new(presence)
        };
        observation.services.insert(name(name_), view);
        observation
    }

    #[test]
    fn a_wanted_service_launched_the_old_way_is_stopped_to_restart_it() {
        let running = outdated(rtx4090(&["cosyvoice"]), "vidi", Presence::Running);
        let p = plan(&mcn(), &phase(2), &running);
        let stop = p.actions.iter().find(|a| a.service == name("vidi"));
        let stop = stop.expect("a stop of vidi");
        assert_eq!((stop.op, stop.cause), (Op::Stop, Cause::ConfigChanged));
        assert!(stop.reason.contains("command"), "{}", stop.reason);
        assert_eq!(
            p.verdict(&name("vidi")),
            Some(&Verdict::Run {
                reason: "wanted by phase 2".into()
            })
        );
        // Once stopped, it starts (the new way): a plain start.
        let stopped = rtx4090(&["cosyvoice"]);
        let p = plan(&mcn(), &phase(2), &stopped);
        assert!(
            ops(&p).contains(&"start vidi 4096".to_owned()),
            "{:?}",
            ops(&p)
        );
    }

    #[test]
    fn a_parked_service_launched_the_old_way_is_stopped_not_resumed_nor_parked() {
        let parked = outdated(rtx4090(&[]), "vidi", Presence::Parked);
        let p = plan(&parking_mcn(), &phase(2), &parked);
        assert_eq!(
            p.actions
                .iter()
                .map(|a| (a.op, a.cause))
                .collect::<Vec<_>>(),
            [(Op::Stop, Cause::ConfigChanged)]
        );
        // Not wanted, it is stopped rather than parked: a park keeps the old launch.
        let running = outdated(rtx4090(&[]), "vidi", Presence::Running);
        let p = plan(&parking_mcn(), &phase(3), &running);
        let vidi = p
            .actions
            .iter()
            .find(|a| a.service == name("vidi"))
            .unwrap();
        assert_eq!(vidi.op, Op::Stop);
    }

    #[test]
    fn a_service_no_longer_wanted_parks_when_its_residual_fits() {
        let p = plan(&parking_mcn(), &phase(3), &rtx4090(&["vidi"]));
        assert_eq!(ops(&p), ["park vidi 3072", "start cosyvoice 4096"]);
        assert_eq!(p.actions[1].after, Vec::<ServiceName>::new(), "both fit");
    }

    #[test]
    fn a_wanted_parked_service_is_resumed_for_what_it_lacks() {
        let observed = with(rtx4090(&["cosyvoice"]), "vidi", Presence::Parked);
        let p = plan(&parking_mcn(), &phase(2), &observed);
        assert_eq!(ops(&p), ["park cosyvoice 3072", "resume vidi 3072"]);
    }

    #[test]
    fn parked_services_stay_beside_a_large_start_and_are_stopped_first_when_room_is_needed() {
        // 23040 MB usable: comfyui's 20480 leaves 2560, room for both 1 GB residuals.
        let observed = with(
            with(rtx4090(&[]), "vidi", Presence::Parked),
            "cosyvoice",
            Presence::Parked,
        );
        let p = plan(&parking_mcn(), &phase(4), &observed);
        assert_eq!(ops(&p), ["start comfyui 20480"]);
        // With 2 GB more taken outside, only one residual fits: the lower priority
        // parked service (vidi) is stopped, before anything else.
        let mut tight = observed.clone();
        tight.budget.external_mb += 1024;
        let p = plan(&parking_mcn(), &phase(4), &tight);
        assert_eq!(ops(&p), ["stop vidi 1024", "start comfyui 20480"]);
        assert_eq!(p.actions[1].after, [name("vidi")]);
    }

    #[test]
    fn a_stop_asked_for_is_a_stop_even_for_a_service_that_parks() {
        let mut desired = phase(2);
        desired.hold(&name("vidi"));
        let p = plan(&parking_mcn(), &desired, &rtx4090(&["vidi"]));
        assert_eq!(ops(&p), ["stop vidi 4096"]);
        let parked = with(rtx4090(&[]), "vidi", Presence::Parked);
        let p = plan(&parking_mcn(), &desired, &parked);
        assert_eq!(ops(&p), ["stop vidi 1024"]);
    }

    #[test]
    fn a_parked_service_counts_at_its_observed_residual() {
        let mut observed = with(rtx4090(&[]), "vidi", Presence::Parked);
        observed
            .services
            .get_mut(&name("vidi"))
            .unwrap()
            .observed_mb = Some(2600);
        // comfyui 20480 + 2600 > 23040 usable: vidi's residual does not fit beside it.
        let p = plan(&parking_mcn(), &phase(4), &observed);
        assert_eq!(ops(&p), ["stop vidi 2600", "start comfyui 20480"]);
    }

    fn claimed(mut desired: DesiredState, service: &str, holder: &str) -> DesiredState {
        desired.claim(Claim {
            service: name(service),
            holder: crate::desired::Holder::parse(holder).unwrap(),
            until: crate::utc::UtcTime::parse("2026-12-03T10:15:00Z").unwrap(),
        });
        desired
    }

    #[test]
    fn a_claimed_service_is_kept_and_what_needs_its_memory_is_preempted_naming_the_claim() {
        let desired = claimed(phase(4), "cosyvoice", "render-job-42");
        let p = plan(&mcn(), &desired, &rtx4090(&["cosyvoice"]));
        assert!(p.is_empty(), "cosyvoice is not stopped: {:?}", p.actions);
        assert!(p.verdicts[&name("cosyvoice")].runs());
        let Verdict::Preempted { reason, claims, .. } = &p.verdicts[&name("comfyui")] else {
            panic!("{:?}", p.verdicts[&name("comfyui")]);
        };
        assert!(
            reason.contains(
                "cosyvoice 4096 MB (claimed by \"render-job-42\" until 2026-12-03T10:15:00Z)"
            ),
            "{reason}"
        );
        assert_eq!(claims, &desired.claims);
        assert_eq!(p.protected, desired.claims);
        assert!(
            render(&p).contains(
                "cosyvoice protected: claimed by \"render-job-42\" until 2026-12-03T10:15:00Z\n"
            ),
            "{}",
            render(&p)
        );
        // Once the claim is gone, the phase has its way.
        assert_eq!(
            steps(&plan(&mcn(), &phase(4), &rtx4090(&["cosyvoice"]))),
            ["stop cosyvoice", "start comfyui"]
        );
    }

    #[test]
    fn a_claim_outweighs_priority_and_a_hold_and_is_started_first() {
        let mut desired = claimed(phase(4), "ollama", "me");
        desired.hold(&name("ollama"));
        let p = plan(&mcn(), &desired, &rtx4090(&["comfyui"]));
        assert_eq!(steps(&p), ["stop comfyui", "start ollama"]);
        assert_eq!(p.actions[1].cause, Cause::Claimed);
        assert!(matches!(
            p.verdicts[&name("comfyui")],
            Verdict::Preempted { .. }
        ));
        // A parked claimed service is resumed, never stopped to make room.
        let desired = claimed(phase(4), "cosyvoice", "me");
        let parked = with(rtx4090(&[]), "cosyvoice", Presence::Parked);
        let p = plan(&parking_mcn(), &desired, &parked);
        assert_eq!(ops(&p), ["resume cosyvoice 3072"]);
    }

    #[test]
    fn a_new_claim_never_takes_the_room_of_a_running_claimed_service() {
        // cosyvoice is claimed and running; a claim on comfyui (priority 100, 20 GB) comes
        // after: comfyui waits, naming cosyvoice's claim, whatever its priority.
        let desired = claimed(claimed(phase(3), "cosyvoice", "tts-batch"), "comfyui", "ui");
        let p = plan(&mcn(), &desired, &rtx4090(&["cosyvoice"]));
        assert!(
            !p.actions.iter().any(|a| a.service == name("cosyvoice")),
            "{:?}",
            p.actions
        );
        let Verdict::Preempted { claims, .. } = &p.verdicts[&name("comfyui")] else {
            panic!("{:?}", p.verdicts[&name("comfyui")]);
        };
        assert_eq!(claims[0].holder.as_str(), "tts-batch");
        // With neither running, the higher priority goes first.
        let p = plan(&mcn(), &desired, &rtx4090(&[]));
        assert!(p.verdicts[&name("comfyui")].runs());
    }

    fn phase(n: u32) -> DesiredState {
        DesiredState {
            phase: Some(n),
            ..Default::default()
        }
    }

    #[test]
    fn a_demanded_service_starts_at_its_own_priority_and_never_preempts_a_higher_one() {
        let demanding = |mut observed: Observation| {
            observed.demanded.insert(name("ollama"));
            observed
        };
        // Nothing else wanted: the demand starts it, and says why.
        let idle = plan(&mcn(), &DesiredState::default(), &demanding(rtx4090(&[])));
        assert_eq!(steps(&idle), ["start ollama"]);
        assert_eq!(idle.actions[0].cause, Cause::Demanded);
        // Phase 4's ComfyUI (p100) holds the memory: Ollama (p10) waits, preempted.
        let busy = plan(&mcn(), &phase(4), &demanding(rtx4090(&["comfyui"])));
        assert!(busy.is_empty(), "{:?}", steps(&busy));
        assert!(matches!(
            busy.verdict(&name("ollama")),
            Some(Verdict::Preempted { .. })
        ));
        // A demand beside phase 3's CosyVoice (4 GB) fits: both run.
        let beside = plan(&mcn(), &phase(3), &demanding(rtx4090(&["cosyvoice"])));
        assert_eq!(steps(&beside), ["start ollama"]);
        // A hold outweighs demand.
        let held = DesiredState {
            held: vec![name("ollama")],
            ..Default::default()
        };
        assert!(plan(&mcn(), &held, &demanding(rtx4090(&[]))).is_empty());
    }

    fn steps(plan: &Plan) -> Vec<String> {
        plan.actions
            .iter()
            .map(|a| format!("{} {}", a.op, a.service))
            .collect()
    }

    #[test]
    fn ac1_phase_transitions_stop_then_start() {
        let inv = mcn();
        assert_eq!(steps(&plan(&inv, &phase(2), &rtx4090(&[]))), ["start vidi"]);
        assert_eq!(
            steps(&plan(&inv, &phase(3), &rtx4090(&["vidi"]))),
            ["stop vidi", "start cosyvoice"]
        );
        assert_eq!(
            steps(&plan(&inv, &phase(4), &rtx4090(&["cosyvoice"]))),
            ["stop cosyvoice", "start comfyui"]
        );
    }

    #[test]
    fn ac3_pinning_comfyui_preempts_cosyvoice_but_pinned_ollama_loses() {
        let inv = mcn();
        let mut desired = phase(3);
        desired.pin(&name("comfyui"));
        desired.pin(&name("ollama"));
        let plan = plan(&inv, &desired, &rtx4090(&["cosyvoice", "ollama"]));
        assert_eq!(
            steps(&plan),
            ["stop ollama", "stop cosyvoice", "start comfyui"]
        );
        let Some(Verdict::Preempted { reason, .. }) = plan.verdict(&name("cosyvoice")) else {
            panic!("cosyvoice should be preempted: {plan:?}");
        };
        assert!(reason.contains("comfyui 20480 MB"), "{reason}");
        assert_eq!(plan.actions[1].cause, Cause::Preempted);
        assert!(plan.actions[1].reason.starts_with("preempted"));
        assert_eq!(
            plan.actions[2].after,
            [name("ollama"), name("cosyvoice")],
            "comfyui needs both stops' memory"
        );
    }

    #[test]
    fn a_service_too_big_for_the_gpu_is_refused_with_the_shortfall() {
        let inv = Inventory::new(vec![spec("big", 23500, 1, vec![1])]);
        let plan = plan(&inv, &phase(1), &rtx4090(&[]));
        assert!(plan.is_empty());
        let Some(Verdict::Refused {
            reason,
            shortfall_mb,
        }) = plan.verdict(&name("big"))
        else {
            panic!("{plan:?}");
        };
        assert_eq!(*shortfall_mb, 23500 - (24576 - 512 - 1024));
        assert!(reason.contains("1024 MB external"), "{reason}");
    }

    #[test]
    fn held_services_stop_and_closed_gates_do_not_start() {
        let inv = mcn();
        let mut desired = phase(4);
        desired.hold(&name("comfyui"));
        let p = plan(&inv, &desired, &rtx4090(&["comfyui"]));
        assert_eq!(steps(&p), ["stop comfyui"]);
        assert_eq!(p.actions[0].reason, "held stopped");

        let mut observed = rtx4090(&[]);
        observed.services.insert(
            name("comfyui"),
            ServiceView {
                gate: StartGate::Closed {
                    reason: "failed 5 times".into(),
                },
                ..ServiceView::stopped()
            },
        );
        let p = plan(&inv, &phase(4), &observed);
        assert!(p.is_empty());
        assert!(matches!(
            p.verdict(&name("comfyui")),
            Some(Verdict::Held { .. })
        ));
    }

    #[test]
    fn observed_use_above_declared_counts() {
        let inv = mcn();
        let mut desired = phase(3);
        desired.pin(&name("vidi"));
        let mut observed = rtx4090(&["cosyvoice"]);
        observed
            .services
            .get_mut(&name("cosyvoice"))
            .unwrap()
            .observed_mb = Some(20000);
        let p = plan(&inv, &desired, &observed);
        assert!(matches!(
            p.verdict(&name("vidi")),
            Some(Verdict::Preempted { .. })
        ));
        assert!(p.is_empty());
    }

    #[test]
    fn a_learned_peak_above_declared_is_what_a_start_is_budgeted_at() {
        // 16 GB GPU, nothing external: 15872 MB usable. Vidi declared 4096 fits beside
        // 8000 MB; once it was seen to take 9000 it does not.
        let inv = Inventory::new(vec![
            spec("big", 8000, 100, vec![2]),
            spec("vidi", 4096, 40, vec![2]),
        ]);
        let mut observed = Observation {
            budget: Budget {
                total_mb: 16384,
                reserve_mb: 512,
                external_mb: 0,
            },
            services: BTreeMap::new(),
            demanded: BTreeSet::new(),
        };
        let before = plan(&inv, &phase(2), &observed);
        assert_eq!(steps(&before), ["start big", "start vidi"]);

        observed.services.insert(
            name("vidi"),
            ServiceView {
                learned_mb: Some(9000),
                ..ServiceView::stopped()
            },
        );
        let after = plan(&inv, &phase(2), &observed);
        assert_eq!(steps(&after), ["start big"]);
        let Some(Verdict::Preempted {
            reason,
            shortfall_mb,
            ..
        }) = after.verdict(&name("vidi"))
        else {
            panic!("vidi should be preempted: {after:?}");
        };
        assert_eq!(*shortfall_mb, 9000 - (15872 - 8000));
        assert!(
            reason.contains("needs 9000 MB (its learned peak; declared vram_mb 4096 MB)"),
            "{reason}"
        );

        // Alone, it is started, and budgeted at the learned figure.
        let alone = plan(
            &inv,
            &DesiredState {
                pinned: vec![name("vidi")],
                ..Default::default()
            },
            &observed,
        );
        assert_eq!(alone.actions[0].vram_mb, 9000);
        // A learned peak below the declared size changes nothing.
        observed.services.get_mut(&name("vidi")).unwrap().learned_mb = Some(2000);
        assert_eq!(
            steps(&plan(&inv, &phase(2), &observed)),
            ["start big", "start vidi"]
        );
    }

    // ---- properties ----

    fn arb_case() -> impl Strategy<Value = (Inventory, DesiredState, Observation)> {
        let service = (
            1u64..16_000,
            0u32..4,
            prop::bool::ANY,
            prop::bool::ANY,
            0u64..4000,
            prop::bool::ANY,
            prop::option::of(0u64..3000),
            prop::bool::ANY,
        );
        (
            prop::collection::vec(service, 1..8),
            prop::option::of(0u32..4),
            8_000u64..40_000,
            0u64..2_000,
            0u64..6_000,
            prop::collection::vec(0usize..8, 0..3),
            prop::collection::vec(0usize..8, 0..3),
            prop::collection::vec(0usize..8, 0..3),
        )
            .prop_map(
                |(services, phase, total, reserve, external, pins, holds, claims)| {
                    let mut specs = Vec::new();
                    let mut views = BTreeMap::new();
                    for (i, (vram, ph, running, open, extra, has_phase, residual, parked)) in
                        services.into_iter().enumerate()
                    {
                        let n = format!("s{i}");
                        let phases = if has_phase { vec![ph] } else { vec![] };
                        let mut s = spec(&n, vram, i as i64 * 7 % 11 + i as i64 * 100, phases);
                        s.park = residual.map(parks_with);
                        let presence = match (running, parked && s.park.is_some()) {
                            (true, true) => Presence::Parked,
                            (true, false) => Presence::Running,
                            (false, _) => Presence::Stopped,
                        };
                        let observed_mb = match presence {
                            Presence::Parked => residual.map(|r| r + extra / 8),
                            Presence::Running => Some(vram + extra / 2),
                            _ => None,
                        };
                        specs.push(s);
                        views.insert(
                            name(&n),
                            ServiceView {
                                presence,
                                observed_mb,
                                learned_mb: None,
                                learned_residual_mb: None,
                                gate: if open {
                                    StartGate::Open
                                } else {
                                    StartGate::Closed {
                                        reason: "backoff".into(),
                                    }
                                },
                                condition: Condition::Healthy,
                                launch: Launch::Current,
                            },
                        );
                    }
                    let count = specs.len();
                    let pick = |ix: Vec<usize>| -> Vec<ServiceName> {
                        ix.into_iter()
                            .map(|i| name(&format!("s{}", i % count)))
                            .collect()
                    };
                    let desired = DesiredState {
                        phase,
                        pinned: pick(pins),
                        held: pick(holds),
                        claims: pick(claims)
                            .into_iter()
                            .enumerate()
                            .map(|(i, service)| Claim {
                                service,
                                holder: crate::desired::Holder::parse(&format!("h{i}")).unwrap(),
                                until: crate::utc::UtcTime::from_epoch_s(1),
                            })
                            .collect(),
                    };
                    let observed = Observation {
                        budget: Budget {
                            total_mb: total,
                            reserve_mb: reserve,
                            external_mb: external,
                        },
                        services: views,
                        demanded: BTreeSet::new(),
                    };
                    (Inventory::new(specs), desired, observed)
                },
            )
    }

    /// A `park: {kind: http}` keeping `residual_mb`.
    pub(crate) fn parks_with(residual_mb: u64) -> crate::config::ParkSpec {
        crate::config::ParkSpec {
            method: crate::config::ParkMethod::Http {
                park: crate::config::HttpRequest {
                    method: "POST".into(),
                    url: "http://127.0.0.1:1/free".into(),
                    body: None,
                },
                resume: None,
            },
            residual_mb,
            timeout: Duration::from_secs(1),
        }
    }

    /// Applies a plan to the observation, checking the budget after every start and
    /// resume: what each service holds, running or parked.
    fn simulate(inv: &Inventory, observed: &Observation, plan: &Plan) -> Result<(), String> {
        let mut holding: BTreeMap<ServiceName, u64> = inv
            .iter()
            .filter_map(|s| {
                let v = observed.services.get(&s.name)?;
                v.presence
                    .holds_memory()
                    .then(|| (s.name.clone(), held(s, v)))
            })
            .collect();
        let usable = observed.budget.usable_mb();
        let mut started = false;
        for action in &plan.actions {
            if action.op.frees() && started {
                return Err(format!("{} after a start: {action:?}", action.op));
            }
            match action.op {
                Op::Stop => {
                    holding
                        .remove(&action.service)
                        .ok_or("stop of a stopped service")?;
                }
                Op::Park => {
                    let before = holding
                        .get_mut(&action.service)
                        .ok_or("park of a stopped service")?;
                    *before = before
                        .checked_sub(action.vram_mb)
                        .ok_or("a park frees more than it holds")?;
                }
                Op::Start | Op::Resume => {
                    started = true;
                    let before = holding.insert(action.service.clone(), 0);
                    if (action.op == Op::Start) != before.is_none() {
                        return Err(format!("{action:?} of a service holding {before:?}"));
                    }
                    *holding.get_mut(&action.service).unwrap() =
                        before.unwrap_or(0) + action.vram_mb;
                    let sum: u64 = holding.values().sum();
                    if sum > usable {
                        return Err(format!("after {action:?}: {sum} MB > usable {usable} MB"));
                    }
                }
            }
        }
        Ok(())
    }

    proptest! {
        #[test]
        fn no_step_of_any_plan_exceeds_the_budget((inv, desired, observed) in arb_case()) {
            let p = plan(&inv, &desired, &observed);
            prop_assert!(simulate(&inv, &observed, &p).is_ok(), "{:?}", simulate(&inv, &observed, &p));
        }

        #[test]
        fn plans_converge_and_order_by_priority((inv, desired, observed) in arb_case()) {
            let p = plan(&inv, &desired, &observed);
            let wanted = desired.wanted(&inv);
            for spec in inv.iter() {
                let verdict = &p.verdicts[&spec.name];
                if stuck(&observed.services[&spec.name]) {
                    prop_assert!(matches!(verdict, Verdict::Held { .. }), "{:?}", verdict);
                    continue;
                }
                prop_assert_eq!(wanted.contains_key(&spec.name), verdict != &Verdict::Idle);
            }
            let priority = |a: &Action| inv.get(&a.service).unwrap().priority;
            let was_parked = |a: &&Action| observed.services[&a.service].presence == Presence::Parked;
            let frees = p.actions.iter().filter(|a| a.op.frees());
            let parked_first: Vec<bool> = frees.clone().map(|a| was_parked(&a)).collect();
            prop_assert!(parked_first.windows(2).all(|w| w[0] >= w[1]), "parked services are stopped first: {:?}", p.actions);
            let parked: Vec<i64> = frees.clone().filter(was_parked).map(priority).collect();
            let running: Vec<i64> = frees.filter(|a| !was_parked(a)).map(priority).collect();
            prop_assert!(parked.windows(2).all(|w| w[0] < w[1]), "stops lowest first: {:?}", parked);
            prop_assert!(running.windows(2).all(|w| w[0] < w[1]), "stops and parks lowest first: {:?}", running);
            let turn_then_priority = |a: &Action| (turn(&desired, &observed.services[&a.service], &a.service), -priority(a));
            let starts: Vec<(Turn, i64)> = p.actions.iter().filter(|a| !a.op.frees()).map(turn_then_priority).collect();
            prop_assert!(starts.windows(2).all(|w| w[0] < w[1]), "starts claimed first (present ones first), then highest first: {:?}", starts);
            prop_assert_eq!(&p, &plan(&inv, &desired, &observed), "deterministic");
        }

        #[test]
        fn claimed_services_that_fit_together_are_never_stopped_or_parked((inv, desired, observed) in arb_case()) {
            let view = |s: &ServiceSpec| &observed.services[&s.name];
            let stuck_mb: u64 = inv.iter().filter(|s| stuck(view(s))).map(|s| held(s, view(s))).sum();
            let claimed: Vec<&ServiceSpec> = inv.iter().filter(|s| desired.is_claimed(&s.name)).collect();
            let open = |s: &ServiceSpec| view(s).gate == StartGate::Open;
            let claimed_mb: u64 = claimed.iter().filter(|s| open(s)).map(|s| footprint(s, view(s))).sum();
            prop_assume!(claimed_mb + stuck_mb <= observed.budget.usable_mb());
            let p = plan(&inv, &desired, &observed);
            for spec in claimed.iter().filter(|s| open(s)) {
                prop_assert!(p.verdicts[&spec.name].runs(), "{:?}", p.verdicts[&spec.name]);
                prop_assert!(!p.actions.iter().any(|a| a.service == spec.name && a.op.frees()), "{:?}", p.actions);
            }
            for verdict in p.verdicts.values() {
                if let Verdict::Preempted { claims, .. } = verdict {
                    prop_assert!(claims.iter().all(|c| desired.claims.contains(c)));
                }
            }
        }

        #[test]
        fn applying_a_plan_reaches_a_fixed_point((inv, desired, mut observed) in arb_case()) {
            // A service that uses more than it declared may be preempted, then fit again
            // once stopped; the fixed point holds for services that keep their word.
            for (name, view) in observed.services.iter_mut() {
                let declared = inv.get(name).unwrap().vram_mb;
                view.observed_mb = view.observed_mb.map(|mb| mb.min(declared));
            }
            let p = plan(&inv, &desired, &observed);
            let mut after = observed.clone();
            for action in &p.actions {
                let spec = inv.get(&action.service).unwrap();
                let view = after.services.entry(action.service.clone()).or_insert_with(ServiceView::stopped);
                let holds = held(spec, view);
                (view.presence, view.observed_mb) = match action.op {
                    Op::Stop => (Presence::Stopped, None),
                    Op::Start => (Presence::Running, Some(action.vram_mb)),
                    Op::Park => (Presence::Parked, Some(holds - action.vram_mb)),
                    Op::Resume => (Presence::Running, Some(holds + action.vram_mb)),
                };
            }
            let again = plan(&inv, &desired, &after);
            prop_assert!(again.is_empty(), "second plan not empty: {:?}", again.actions);
        }
    }
}
