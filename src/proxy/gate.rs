//! The loop's side of the demand proxy (docs/ARCHITECTURE.md, "The demand proxy"): when
//! a request may go. It says "used" to the loop through the reconciler's handle, waits
//! on the status snapshot for its service to be ready, counts the request as waiting,
//! then in flight, and refuses with a reason when the service is held or does not
//! become ready in time. It never touches the loop's records.

use std::collections::BTreeMap;
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard};
use tokio::time::Instant;

use serde_json::{json, Map, Value};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};

use crate::config::{Config, ProxySpec, ServiceName};
use crate::reconcile::{Command, ReconcilerHandle};
use crate::status::{ServiceState, ServiceStatus, Status};
use crate::traffic::{ServiceTraffic, Traffic, TrafficBoard};

use super::{Gate, Refusal, RequestKind};

/// How long a client refused for a full queue or a shutdown should wait, in seconds.
const RETRY_SOON_S: u64 = 1;

/// One proxied service's limits and counters.
struct GateRoute {
    spec: ProxySpec,
    traffic: Arc<ServiceTraffic>,
    /// `concurrency`: the slots for requests in flight upstream.
    slots: Option<Arc<Semaphore>>,
}

impl GateRoute {
    /// The route for `spec`, keeping the slots of the one it replaces where
    /// `concurrency` did not change (the requests in flight hold them).
    fn new(spec: ProxySpec, traffic: Arc<ServiceTraffic>, before: Option<&GateRoute>) -> Self {
        let slots = match before {
            Some(before) if before.spec.concurrency == spec.concurrency => before.slots.clone(),
            _ => spec.concurrency.map(|n| Arc::new(Semaphore::new(n.get()))),
        };
        Self {
            spec,
            traffic,
            slots,
        }
    }
}

pub struct DemandGate {
    /// Replaced whole by a reload; a request keeps the route it was admitted by.
    routes: RwLock<BTreeMap<ServiceName, Arc<GateRoute>>>,
    traffic: TrafficBoard,
    commands: mpsc::Sender<Command>,
    status: watch::Receiver<Status>,
}

impl DemandGate {
    pub fn new(config: &Config, handle: &ReconcilerHandle) -> Self {
        let gate = Self {
            routes: RwLock::default(),
            traffic: handle.traffic.clone(),
            commands: handle.commands.clone(),
            status: handle.status.clone(),
        };
        gate.reconfigure(config);
        gate
    }

    /// Takes the limits of `config` (at start, and after each reload). A request
    /// already waiting or in flight keeps the limits it was admitted with; a new
    /// `concurrency` counts only the requests admitted from now on.
    pub fn reconfigure(&self, config: &Config) {
        let mut routes = self.routes.write().unwrap_or_else(PoisonError::into_inner);
        let next = config
            .inventory
            .iter()
            .filter_map(|spec| Some((spec.name.clone(), spec.proxy.clone()?)))
            .map(|(name, proxy)| {
                let traffic = self.traffic.of(&name);
                let route = GateRoute::new(proxy, traffic, routes.get(&name).map(|r| &**r));
                (name, Arc::new(route))
            })
            .collect();
        *routes = next;
    }

    fn route(&self, service: &ServiceName) -> Option<Arc<GateRoute>> {
        self.routes().get(service).cloned()
    }

    fn routes(&self) -> RwLockReadGuard<'_, BTreeMap<ServiceName, Arc<GateRoute>>> {
        self.routes.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits until the service is ready and, with `concurrency`, a slot is free. The
    /// request goes from in flight to waiting only when it must wait: a request to a
    /// ready service changes its service's counts once on arrival and once at its end.
    async fn until_ready(
        &self,
        service: &ServiceName,
        route: &GateRoute,
        counted: &mut Counted,
    ) -> Result<Option<OwnedSemaphorePermit>, Refusal> {
        let mut status = self.status.clone();
        loop {
            let readiness = readiness(&status.borrow_and_update(), service);
            if !readiness.demanded {
                self.say_used(service).await;
            }
            match readiness.now {
                Now::Held => return Err(held(service)),
                Now::Ready => match &route.slots {
                    None => return Ok(None),
                    Some(slots) => {
                        if let Ok(slot) = slots.clone().try_acquire_owned() {
                            return Ok(Some(slot));
                        }
                        counted.wait(route.spec.max_queue)?;
                        let slot = slots.clone().acquire_owned().await.map_err(|_| {
                            refusal(service, "shutting_down", "the proxy is shutting down")
                        })?;
                        // It may have begun to stop while the request queued for a slot.
                        if readiness_of(&self.status, service) == Now::Ready {
                            return Ok(Some(slot));
                        }
                    }
                },
                Now::NotYet => counted.wait(route.spec.max_queue)?,
            }
            if status.changed().await.is_err() {
                return Err(refusal(
                    service,
                    "shutting_down",
                    "gpu-manager is shutting down",
                ));
            }
        }
    }

    async fn say_used(&self, service: &ServiceName) {
        let used = Command::Demand {
            service: service.clone(),
        };
        // Only fails when the loop is gone: the wait then ends as a shutdown.
        let _ = self.commands.send(used).await;
    }

    /// The answer once `max_wait_ms` has passed: why it is not ready.
    fn timed_out(&self, service: &ServiceName, route: &GateRoute) -> Refusal {
        let status = self.status.borrow();
        let waited_ms = route.spec.max_wait.as_millis() as u64;
        let Some(service_status) = status.services.get(service.as_str()) else {
            return refusal(service, "timed_out", "it is no longer managed");
        };
        let state = service_status.state;
        let why = service_status
            .reason
            .clone()
            .or_else(|| service_status.last_error.clone())
            .unwrap_or_default();
        let mut detail = Map::new();
        detail.insert("state".into(), json!(state));
        detail.insert("waited_ms".into(), json!(waited_ms));
        let (kind, error) = if state == ServiceState::Preempted {
            detail.insert("holders".into(), holders(&status, service));
            (
                "cannot_fit",
                format!("{service} cannot fit in VRAM now: {why}; it starts when the memory is free (a lower phase, a released claim), retry later"),
            )
        } else {
            (
                "timed_out",
                format!(
                    "{service} was not ready within max_wait_ms ({waited_ms} ms): it is {state}{}",
                    match why.is_empty() {
                        true => String::new(),
                        false => format!(" ({why})"),
                    }
                ),
            )
        };
        Refusal {
            retry_after_s: Some(route.spec.max_wait.as_secs().max(RETRY_SOON_S)),
            detail,
            ..refusal(service, kind, &error)
        }
    }
}

impl Gate for DemandGate {
    type Pass = Pass;

    async fn admit(&self, service: &ServiceName, kind: RequestKind) -> Result<Pass, Refusal> {
        let Some(route) = self.route(service) else {
            return Err(refusal(service, "timed_out", "it has no proxy route"));
        };
        // One reading of the clock for the arrival, the wait's deadline and the start of
        // its length.
        let asked = Instant::now();
        // Counted before the readiness is read, so that the service is never seen
        // unused by a stop decided in between.
        let mut counted = Counted::arrived(route.traffic.clone(), Count::from(kind), asked);
        let ready = self.until_ready(service, &route, &mut counted);
        let outcome = tokio::time::timeout_at(asked + route.spec.max_wait, ready).await;
        route.traffic.waited(asked.elapsed());
        match outcome {
            Ok(Ok(slot)) => {
                counted.go(kind);
                Ok(Pass {
                    _counted: counted,
                    _slot: slot,
                })
            }
            Ok(Err(refusal)) => Err(refusal),
            Err(_) => Err(self.timed_out(service, &route)),
        }
    }

    fn answered(&self, service: &ServiceName, status: hyper::StatusCode) {
        // Under the lock, not through a clone of the route: its count is shared by every
        // worker thread.
        if let Some(route) = self.routes().get(service) {
            route.traffic.answered(status.as_u16());
        }
    }
}

/// Where a request counts in its service's [`Traffic`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Count {
    /// Forwarded, or about to be: work in flight.
    InFlight,
    /// An upgraded connection (WebSocket): keeps the service demanded, not work in flight.
    Upgraded,
    /// Waiting for the service to be ready (or for a concurrency slot).
    Waiting,
}

impl From<RequestKind> for Count {
    fn from(kind: RequestKind) -> Self {
        match kind {
            RequestKind::Plain => Count::InFlight,
            RequestKind::Upgrade => Count::Upgraded,
        }
    }
}

impl Count {
    fn of(self, traffic: &mut Traffic) -> &mut usize {
        match self {
            Count::InFlight => &mut traffic.in_flight,
            Count::Upgraded => &mut traffic.upgraded,
            Count::Waiting => &mut traffic.waiting,
        }
    }
}

/// A request in its service's counts from its arrival until dropped (answered, refused,
/// or the client gone); it moves between counts in one change, so that the service is
/// never seen unused in between.
struct Counted {
    traffic: Arc<ServiceTraffic>,
    count: Count,
}

impl Counted {
    fn arrived(traffic: Arc<ServiceTraffic>, count: Count, at: Instant) -> Self {
        traffic.change(|t| {
            *count.of(t) += 1;
            t.arrived(at);
        });
        Self { traffic, count }
    }

    /// Into the queue, unless `max_queue` requests already wait there.
    fn wait(&mut self, max_queue: usize) -> Result<(), Refusal> {
        if self.count == Count::Waiting {
            return Ok(());
        }
        let mut full = false;
        self.traffic.change(|t| {
            full = t.waiting >= max_queue;
            if !full {
                *self.count.of(t) -= 1;
                t.waiting += 1;
            }
        });
        if full {
            return Err(Refusal {
                status: hyper::StatusCode::SERVICE_UNAVAILABLE,
                kind: "queue_full",
                error: format!(
                    "{max_queue} requests are already waiting (proxy.max_queue): retry in a moment"
                ),
                retry_after_s: Some(RETRY_SOON_S),
                detail: Map::new(),
            });
        }
        self.count = Count::Waiting;
        Ok(())
    }

    /// Out of the queue (if it waited), in flight or upgraded from now.
    fn go(&mut self, kind: RequestKind) {
        let next = Count::from(kind);
        if self.count == next {
            return;
        }
        let before = self.count;
        self.traffic.change(|t| {
            *before.of(t) -= 1;
            *next.of(t) += 1;
        });
        self.count = next;
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        let count = self.count;
        self.traffic.change(|t| {
            *count.of(t) -= 1;
            t.ended();
        });
    }
}

/// Held while a request is in flight (or an upgraded connection open).
pub struct Pass {
    _counted: Counted,
    _slot: Option<OwnedSemaphorePermit>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Now {
    Ready,
    Held,
    NotYet,
}

struct Readiness {
    now: Now,
    /// Whether the loop already counts it as demanded (else the gate says "used").
    demanded: bool,
}

fn readiness(status: &Status, service: &ServiceName) -> Readiness {
    let Some(service_status) = status.services.get(service.as_str()) else {
        return Readiness {
            now: Now::NotYet,
            demanded: true,
        };
    };
    let held = status.desired.held.iter().any(|h| h == service.as_str())
        && service_status.claims.is_empty();
    let now = match (held, service_status.state) {
        (true, _) => Now::Held,
        (false, ServiceState::Ready) => Now::Ready,
        (false, _) => Now::NotYet,
    };
    let demanded = service_status.proxy.as_ref().is_none_or(|p| p.demanded);
    Readiness { now, demanded }
}

fn readiness_of(status: &watch::Receiver<Status>, service: &ServiceName) -> Now {
    readiness(&status.borrow(), service).now
}

/// The services holding memory now, for a `cannot_fit` answer.
fn holders(status: &Status, except: &ServiceName) -> Value {
    let holding = |s: &ServiceStatus| {
        matches!(
            s.state,
            ServiceState::Ready
                | ServiceState::Starting
                | ServiceState::Unhealthy
                | ServiceState::Draining
                | ServiceState::Stopping
                | ServiceState::Parked
        )
    };
    let list: Vec<Value> = status
        .services
        .iter()
        .filter(|(name, s)| name.as_str() != except.as_str() && holding(s))
        .map(|(name, s)| {
            json!({
                "service": name,
                "state": s.state,
                "priority": s.priority,
                "vram_mb": s.observed_vram_mb.unwrap_or(s.declared_vram_mb),
                "claims": s.claims,
            })
        })
        .collect();
    Value::Array(list)
}

fn held(service: &ServiceName) -> Refusal {
    refusal(
        service,
        "held",
        &format!("{service} is held stopped (desired state `held`): nothing starts it until it is released; start it with POST /gpu/service/{service}/start, or remove it from held in the desired-state file"),
    )
}

fn refusal(service: &ServiceName, kind: &'static str, error: &str) -> Refusal {
    let error = match error.starts_with(service.as_str()) {
        true => error.to_owned(),
        false => format!("{service}: {error}"),
    };
    Refusal {
        status: hyper::StatusCode::SERVICE_UNAVAILABLE,
        kind,
        error,
        retry_after_s: None,
        detail: Map::new(),
    }
}

impl Traffic {
    fn arrived(&mut self, at: Instant) {
        self.last_request_ms = Some(crate::clock::now_ms());
        self.last_active = Some(at);
    }

    fn ended(&mut self) {
        self.last_active = Some(Instant::now());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::ProxyStatus;

    fn name(s: &str) -> ServiceName {
        ServiceName::parse(s).unwrap()
    }

    fn status_with(state: ServiceState, demanded: bool, held: bool) -> Status {
        let mut status = Status::default();
        let service = ServiceStatus {
            state,
            proxy: Some(ProxyStatus {
                demanded,
                ..ProxyStatus::default()
            }),
            ..ServiceStatus::default()
        };
        status.services.insert("ollama".into(), service);
        if held {
            status.desired.held.push("ollama".into());
        }
        status
    }

    #[test]
    fn a_request_moves_between_counts_and_leaves_none_behind() {
        let traffic = Arc::new(ServiceTraffic::default());
        let counts = |traffic: &ServiceTraffic| {
            let t = traffic.current();
            (t.in_flight, t.waiting, t.upgraded)
        };
        let mut first = Counted::arrived(traffic.clone(), Count::InFlight, Instant::now());
        assert_eq!(counts(&traffic), (1, 0, 0), "in flight from its arrival");
        first.wait(1).expect("room in the queue");
        assert_eq!(counts(&traffic), (0, 1, 0), "waiting instead, never both");
        let mut second = Counted::arrived(traffic.clone(), Count::Upgraded, Instant::now());
        let full = second.wait(1).expect_err("max_queue 1 is taken");
        assert_eq!(full.kind, "queue_full");
        assert_eq!(
            counts(&traffic),
            (0, 1, 1),
            "a refused request stays where it was"
        );
        drop(second);
        first.go(RequestKind::Plain);
        assert_eq!(counts(&traffic), (1, 0, 0), "out of the queue, in flight");
        drop(first);
        assert_eq!(counts(&traffic), (0, 0, 0));
        assert!(traffic.current().last_request_ms.is_some());
    }

    #[test]
    fn ready_held_or_not_yet_as_the_snapshot_says() {
        let ollama = name("ollama");
        let ready = readiness(&status_with(ServiceState::Ready, true, false), &ollama);
        assert_eq!((ready.now, ready.demanded), (Now::Ready, true));
        let stopped = readiness(&status_with(ServiceState::Stopped, false, false), &ollama);
        assert_eq!((stopped.now, stopped.demanded), (Now::NotYet, false));
        let held = readiness(&status_with(ServiceState::Stopped, false, true), &ollama);
        assert_eq!(held.now, Now::Held);
        let draining = readiness(&status_with(ServiceState::Draining, true, false), &ollama);
        assert_eq!(draining.now, Now::NotYet, "requests wait out a drain");
    }
}
