//! Action tasks (docs/ARCHITECTURE.md, "Action tasks"): each start, stop, park or resume
//! runs in a task of its own and reports its outcome; the loop never awaits one. A task owns no
//! state of the reconciler's: it gets what it needs at launch, tells the loop when it
//! has spawned an instance, and answers to two tokens: `supersede` (a start no longer
//! wanted: stop what it started, wait for its memory) and `abandon` (shutdown: leave
//! things as they are, at a safe point, for the next daemon to adopt).
//!
//! Trust the GPU, not the bookkeeping: a stop is done when the GPU no longer lists the
//! service's processes, a park when it shows them down to the residual. Never kill work
//! silently: a stop or a park first waits for the service's work in flight to end
//! (docs/ARCHITECTURE.md, "Parking and draining").

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use serde_json::Value;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::config::{ParkSpec, ServiceName, ServiceSpec};
use crate::observe::gpu::{GpuProcess, SharedGpu};
use crate::status::FailureKind;
use crate::traffic::Traffic;

use super::effects::{DrainProbe, EffectError, ServiceEffects, StopHow};
use super::observe::{gpu_pids_of, process_name, sample_gpu};
use super::Wake;

/// How often reclaim waits re-read the GPU: an observation costs well under a
/// millisecond, and every poll interval adds to the transition's latency.
const RECLAIM_POLL: Duration = Duration::from_millis(10);
/// How often a drain asks again whether the work in flight has ended.
const DRAIN_POLL: Duration = Duration::from_millis(250);
/// A park is done when the GPU shows the service within this much of its residual (or
/// a tenth of it, if more): allocators keep some slack.
const PARK_TOLERANCE_MB: u64 = 64;

/// What a task gets at launch.
pub(super) struct TaskContext<E: ServiceEffects> {
    pub effects: Arc<E>,
    pub spec: ServiceSpec,
    pub gpu: Option<SharedGpu>,
    pub reclaim_timeout: Duration,
    pub wake: mpsc::Sender<Wake<E::Instance>>,
    pub supersede: CancellationToken,
    pub abandon: CancellationToken,
    /// Cancelled by a forced transition (`?force=true`): drains end at once.
    pub skip_drain: CancellationToken,
    /// The proxy's counts of its requests, when it has a proxy: a drain waits for none
    /// in flight.
    pub traffic: Option<watch::Receiver<Traffic>>,
}

/// How an action ended.
#[derive(Debug)]
pub(super) enum Outcome<I> {
    /// A start, a resume or an adopted instance is ready. `fell_back`: a resume failed
    /// for this reason, and the service was stopped and started cold instead.
    Started {
        instance: I,
        took: Duration,
        fell_back: Option<String>,
    },
    /// A start failed. What it had started was stopped, unless that failed too; then
    /// the instance is left running, to be stopped as unhealthy.
    StartFailed {
        error: EffectError,
        left_running: Option<I>,
    },
    /// The service no longer holds its memory: stopped, or asked to give it back while
    /// it keeps running untracked. `reclaim` says whether the GPU confirmed it.
    Stopped {
        detail: String,
        reclaim: Result<(), EffectError>,
    },
    /// The stop failed: the instance may still run.
    StopFailed { error: EffectError },
    /// Parked: the GPU shows it down to `residual_mb`. `pids`: the processes the park
    /// acted on, which its resume acts on.
    Parked {
        detail: String,
        pids: Vec<u32>,
        residual_mb: u64,
    },
    /// Its work in flight did not end within the drain timeout: nothing was done. The
    /// probe's last answer (the `busy_if` parts).
    Busy {
        answer: serde_json::Value,
        waited: Duration,
    },
    /// Wanted again while it drained: nothing was done.
    Kept,
    /// A superseded start, undone: stopped, and its memory reclaimed (or not).
    Cancelled {
        detail: String,
        reclaim: Result<(), EffectError>,
    },
    /// Shutdown came first: left as it was, for the next daemon to adopt.
    Abandoned,
}

/// A finished task's report: whose action, and how it ended.
#[derive(Debug)]
pub(super) struct Finished<I> {
    pub service: ServiceName,
    pub outcome: Outcome<I>,
}

/// Starts the service and waits until it is ready.
pub(super) async fn start<E: ServiceEffects>(ctx: TaskContext<E>) -> Outcome<E::Instance> {
    let spawned = tokio::select! {
        biased;
        () = ctx.abandon.cancelled() => return Outcome::Abandoned,
        spawned = ctx.effects.start(&ctx.spec) => spawned,
    };
    let instance = match spawned {
        Ok(instance) => instance,
        Err(error) => {
            return Outcome::StartFailed {
                error,
                left_running: None,
            }
        }
    };
    let spawned = Wake::Spawned {
        service: ctx.spec.name.clone(),
        instance: instance.clone(),
    };
    // The loop attributes the instance's GPU memory and watches its exit from now on.
    let _ = ctx.wake.send(spawned).await;
    until_ready(&ctx, instance).await
}

/// Waits until the instance answers its health check; what is not ready is stopped.
async fn until_ready<E: ServiceEffects>(
    ctx: &TaskContext<E>,
    instance: E::Instance,
) -> Outcome<E::Instance> {
    let ready = tokio::select! {
        biased;
        () = ctx.abandon.cancelled() => return Outcome::Abandoned,
        () = ctx.supersede.cancelled() => None,
        ready = ctx.effects.wait_ready(&ctx.spec, &instance) => Some(ready),
    };
    match ready {
        Some(Ok(took)) => Outcome::Started {
            instance,
            took,
            fell_back: None,
        },
        None => match stop_and_reclaim(ctx, &instance).await {
            Ok((how, reclaim)) => Outcome::Cancelled {
                detail: format!(
                    "a newer desired state no longer wants it: {}",
                    how.describe()
                ),
                reclaim,
            },
            Err(error) => Outcome::StartFailed {
                error: cancelled_but_running(error),
                left_running: Some(instance),
            },
        },
        // Nothing is left half-started: a start that failed is stopped.
        Some(Err(error)) => match stop_and_reclaim(ctx, &instance).await {
            Ok(_) => Outcome::StartFailed {
                error,
                left_running: None,
            },
            Err(stop_error) => Outcome::StartFailed {
                error: EffectError::new(
                    error.kind,
                    format!("{error}; and stopping it failed: {stop_error}"),
                ),
                left_running: Some(instance),
            },
        },
    }
}

fn cancelled_but_running(error: EffectError) -> EffectError {
    EffectError::new(
        error.kind,
        format!("superseded, but stopping what it had started failed: {error}"),
    )
}

/// Waits until an instance left running by an earlier daemon answers its health check.
pub(super) async fn verify_adopted<E: ServiceEffects>(
    ctx: TaskContext<E>,
    instance: E::Instance,
) -> Outcome<E::Instance> {
    let ready = tokio::select! {
        biased;
        () = ctx.abandon.cancelled() => return Outcome::Abandoned,
        ready = ctx.effects.wait_ready(&ctx.spec, &instance) => ready,
    };
    match ready {
        Ok(took) => Outcome::Started {
            instance,
            took,
            fell_back: None,
        },
        Err(error) => Outcome::StartFailed {
            error: EffectError::new(
                error.kind,
                format!("adopted instance is not healthy: {error}"),
            ),
            left_running: Some(instance),
        },
    }
}

/// Stops the service once its work in flight has ended.
pub(super) async fn stop<E: ServiceEffects>(
    ctx: TaskContext<E>,
    instance: E::Instance,
) -> Outcome<E::Instance> {
    if let Err(outcome) = drain(&ctx).await {
        return outcome;
    }
    let pids = pids_of::<E>(&ctx, &instance).await;
    match stop_then_reclaim(&ctx, &instance, &pids).await {
        Ok((how, reclaim)) => Outcome::Stopped {
            detail: how.describe().to_owned(),
            reclaim,
        },
        Err(error) => Outcome::StopFailed { error },
    }
}

/// Parks the service once its work in flight has ended: asks it to give its memory
/// back, and waits until the GPU shows it down to its residual. If the request fails,
/// or the GPU does not show it within `park.timeout_ms`, the service is stopped
/// instead, and the outcome says why.
pub(super) async fn park<E: ServiceEffects>(
    ctx: TaskContext<E>,
    instance: E::Instance,
    park: ParkSpec,
) -> Outcome<E::Instance> {
    if let Err(outcome) = drain(&ctx).await {
        return outcome;
    }
    let pids = pids_of::<E>(&ctx, &instance).await;
    let note = match ctx.effects.park(&ctx.spec, &park, &pids).await {
        Ok(detail) => match wait_down_to(&ctx, &pids, &park).await {
            Ok(residual_mb) => {
                tracing::info!(service = %ctx.spec.name, %detail, residual_mb, "parked: the GPU shows it down to its residual");
                return Outcome::Parked {
                    detail,
                    pids,
                    residual_mb,
                };
            }
            Err(error) => format!("the park did not free its memory ({error})"),
        },
        Err(error) => format!("the park failed ({error})"),
    };
    tracing::warn!(service = %ctx.spec.name, %note, "park failed: stopping it instead");
    match stop_then_reclaim(&ctx, &instance, &pids).await {
        Ok((how, reclaim)) => Outcome::Stopped {
            detail: format!("{note}; {}", how.describe()),
            reclaim,
        },
        Err(error) => Outcome::StopFailed {
            error: EffectError::new(error.kind, format!("{note}; and the stop failed: {error}")),
        },
    }
}

/// Brings a parked service back: the same process or container, not a restart. A
/// resume that fails (or does not become ready) falls back to a stop and a cold start.
pub(super) async fn resume<E: ServiceEffects>(
    ctx: TaskContext<E>,
    instance: E::Instance,
    park: ParkSpec,
    parked_pids: Vec<u32>,
) -> Outcome<E::Instance> {
    let resumed = tokio::select! {
        biased;
        () = ctx.abandon.cancelled() => return Outcome::Abandoned,
        resumed = ctx.effects.resume(&ctx.spec, &park, &parked_pids) => resumed,
    };
    let failure = match resumed {
        Ok(detail) => {
            tracing::info!(service = %ctx.spec.name, %detail, "resume asked; waiting for it to be ready");
            match until_ready(&ctx, instance.clone()).await {
                Outcome::StartFailed {
                    error,
                    left_running: None,
                } => format!("it was not ready after the resume ({error})"),
                done => return done,
            }
        }
        Err(error) => match stop_and_reclaim(&ctx, &instance).await {
            Ok(_) => format!("the resume failed ({error})"),
            Err(stop_error) => {
                return Outcome::StartFailed {
                    error: EffectError::new(
                        error.kind,
                        format!(
                            "the resume failed ({error}), and stopping it failed: {stop_error}"
                        ),
                    ),
                    left_running: Some(instance),
                }
            }
        },
    };
    tracing::warn!(service = %ctx.spec.name, %failure, "resume failed: starting it cold");
    match start(ctx).await {
        Outcome::Started { instance, took, .. } => Outcome::Started {
            instance,
            took,
            fell_back: Some(failure),
        },
        Outcome::StartFailed {
            error,
            left_running,
        } => Outcome::StartFailed {
            error: EffectError::new(
                error.kind,
                format!("{failure}; then the cold start failed: {error}"),
            ),
            left_running,
        },
        other => other,
    }
}

/// Waits until the service has no work in flight (docs/ARCHITECTURE.md, "Parking and
/// draining"): its `drain:` probe and its proxy's count, when it has them, must both say
/// idle. Err: the outcome to report instead of acting (busy at the timeout, wanted
/// again, or shutdown).
async fn drain<E: ServiceEffects>(ctx: &TaskContext<E>) -> Result<(), Outcome<E::Instance>> {
    let Some(timeout) = ctx.spec.drain_timeout() else {
        return Ok(());
    };
    let deadline = Instant::now() + timeout;
    let mut logged = false;
    let result = loop {
        let busy = tokio::select! {
            biased;
            () = ctx.abandon.cancelled() => break Err(Outcome::Abandoned),
            () = ctx.skip_drain.cancelled() => break Ok(()),
            () = ctx.supersede.cancelled() => break Err(Outcome::Kept),
            busy = work_in_flight(ctx) => busy,
        };
        let Some(answer) = busy else {
            break Ok(());
        };
        if Instant::now() >= deadline {
            break Err(Outcome::Busy {
                answer,
                waited: timeout,
            });
        }
        if !logged {
            logged = true;
            tracing::info!(service = %ctx.spec.name, %answer, "draining: waiting for its work in flight to end");
        }
        tokio::select! {
            biased;
            () = ctx.abandon.cancelled() => break Err(Outcome::Abandoned),
            () = ctx.skip_drain.cancelled() => break Ok(()),
            () = ctx.supersede.cancelled() => break Err(Outcome::Kept),
            () = proxy_idle(ctx) => {}
            () = tokio::time::sleep(DRAIN_POLL.min(deadline - Instant::now())) => {}
        }
    };
    if result.is_ok() {
        // The service was `draining` from the action's start: it is stopping now.
        let drained = Wake::Drained {
            service: ctx.spec.name.clone(),
        };
        let _ = ctx.wake.send(drained).await;
    }
    result
}

/// What is still in flight, as one JSON object: the parts of the drain probe's answer
/// that say busy, and `proxy_in_flight`; None when nothing is.
async fn work_in_flight<E: ServiceEffects>(ctx: &TaskContext<E>) -> Option<Value> {
    let mut busy = serde_json::Map::new();
    if let Some(drain) = &ctx.spec.drain {
        match ctx.effects.drain_probe(drain).await {
            DrainProbe::Idle => {}
            DrainProbe::Unanswered { error } => {
                tracing::warn!(service = %ctx.spec.name, %error, "the drain probe got no answer: a service that cannot answer has no work left; going on");
            }
            DrainProbe::Busy {
                answer: Value::Object(parts),
            } => busy.extend(parts),
            DrainProbe::Busy { answer } => {
                busy.insert("probe".into(), answer);
            }
        }
    }
    let in_flight = ctx.traffic.as_ref().map_or(0, |t| t.borrow().in_flight);
    if in_flight > 0 {
        busy.insert("proxy_in_flight".into(), in_flight.into());
    }
    (!busy.is_empty()).then_some(Value::Object(busy))
}

/// Returns once the proxy has no request in flight for the service; never without a
/// proxy (the drain probe is polled instead).
async fn proxy_idle<E: ServiceEffects>(ctx: &TaskContext<E>) {
    match ctx.traffic.clone() {
        Some(mut traffic) => {
            if traffic.wait_for(|t| t.in_flight == 0).await.is_err() {
                std::future::pending::<()>().await;
            }
        }
        None => std::future::pending().await,
    }
}

/// Waits until the GPU shows `pids` down to the residual (within the tolerance), for at
/// most the park's timeout; returns what they hold then.
async fn wait_down_to<E: ServiceEffects>(
    ctx: &TaskContext<E>,
    pids: &[u32],
    park: &ParkSpec,
) -> Result<u64, EffectError> {
    let Some(gpu) = &ctx.gpu else {
        return Ok(park.residual_mb);
    };
    let ceiling = park.residual_mb + PARK_TOLERANCE_MB.max(park.residual_mb / 10);
    let held = |listed: &[GpuProcess]| listed.iter().map(|p| p.used_mb).sum::<u64>();
    match poll_gpu(gpu, pids, park.timeout, |listed| held(listed) <= ceiling).await? {
        Polled::Done(listed) => Ok(held(&listed)),
        Polled::TimedOut(listed) => Err(EffectError::new(
            FailureKind::Timeout,
            format!(
                "the GPU still shows {} MB for {} after {:?}, above its {} MB residual",
                held(&listed),
                ctx.spec.name,
                park.timeout,
                park.residual_mb
            ),
        )),
    }
}

/// How a [`poll_gpu`] ended: with what the GPU listed of the pids then.
enum Polled {
    Done(Vec<GpuProcess>),
    TimedOut(Vec<GpuProcess>),
}

/// Re-reads the GPU every `RECLAIM_POLL` until `done` holds for what it lists of `pids`,
/// for at most `timeout`.
async fn poll_gpu(
    gpu: &SharedGpu,
    pids: &[u32],
    timeout: Duration,
    done: impl Fn(&[GpuProcess]) -> bool,
) -> Result<Polled, EffectError> {
    let deadline = Instant::now() + timeout;
    loop {
        let sample = sample_gpu(gpu.clone())
            .await
            .map_err(|e| EffectError::new(FailureKind::Other, e))?;
        let listed: Vec<GpuProcess> = sample
            .processes
            .into_iter()
            .filter(|p| pids.contains(&p.pid))
            .collect();
        if done(&listed) {
            return Ok(Polled::Done(listed));
        }
        if Instant::now() >= deadline {
            return Ok(Polled::TimedOut(listed));
        }
        tokio::time::sleep(RECLAIM_POLL).await;
    }
}

impl StopHow {
    fn describe(self) -> &'static str {
        match self {
            StopHow::Graceful => "stopped",
            StopHow::Killed => "killed: it did not stop on SIGTERM within its stop timeout",
        }
    }
}

/// Stops the instance, then waits until the GPU no longer lists its processes.
async fn stop_and_reclaim<E: ServiceEffects>(
    ctx: &TaskContext<E>,
    instance: &E::Instance,
) -> Result<(StopHow, Result<(), EffectError>), EffectError> {
    let pids = pids_of::<E>(ctx, instance).await;
    stop_then_reclaim(ctx, instance, &pids).await
}

/// Stops the instance, then waits until the GPU no longer lists `pids` (its processes,
/// read before the stop: afterwards its process tree is gone).
async fn stop_then_reclaim<E: ServiceEffects>(
    ctx: &TaskContext<E>,
    instance: &E::Instance,
    pids: &[u32],
) -> Result<(StopHow, Result<(), EffectError>), EffectError> {
    let how = ctx.effects.stop(&ctx.spec, instance).await?;
    Ok((how, wait_pids_gone(ctx, pids).await))
}

/// The GPU processes that belong to the instance now (before it is stopped: afterwards
/// its process tree is gone).
async fn pids_of<E: ServiceEffects>(ctx: &TaskContext<E>, instance: &E::Instance) -> Vec<u32> {
    match &ctx.gpu {
        Some(gpu) => {
            gpu_pids_of(
                gpu.clone(),
                E::root_pid(instance),
                E::container_id(instance),
            )
            .await
        }
        None => Vec::new(),
    }
}

/// Trusts the GPU: done when it no longer lists these pids; skipped when they held no
/// GPU memory.
async fn wait_pids_gone<E: ServiceEffects>(
    ctx: &TaskContext<E>,
    pids: &[u32],
) -> Result<(), EffectError> {
    let Some(gpu) = &ctx.gpu else {
        return Ok(());
    };
    if pids.is_empty() {
        return Ok(());
    }
    let Polled::TimedOut(left) =
        poll_gpu(gpu, pids, ctx.reclaim_timeout, <[GpuProcess]>::is_empty).await?
    else {
        return Ok(());
    };
    let holders: Vec<String> = left
        .iter()
        .map(|p| format!("pid {} ({}) {} MB", p.pid, process_name(p.pid), p.used_mb))
        .collect();
    Err(EffectError::new(
        FailureKind::Timeout,
        format!(
            "the GPU still lists the memory of {} {:?} after it was asked to free it: {}",
            ctx.spec.name,
            ctx.reclaim_timeout,
            holders.join(", ")
        ),
    ))
}
