//! Action tasks (docs/ARCHITECTURE.md, "Action tasks"): each start or stop runs in a
//! task of its own and reports its outcome; the loop never awaits one. A task owns no
//! state of the reconciler's: it gets what it needs at launch, tells the loop when it
//! has spawned an instance, and answers to two tokens: `supersede` (a start no longer
//! wanted: stop what it started, wait for its memory) and `abandon` (shutdown: leave
//! things as they are, at a safe point, for the next daemon to adopt).
//!
//! Trust the GPU, not the bookkeeping: a stop is done when the GPU no longer lists the
//! service's processes.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::{ServiceName, ServiceSpec};
use crate::observe::gpu::SharedGpu;
use crate::status::FailureKind;

use super::effects::{EffectError, ServiceEffects, StopHow};
use super::observe::{gpu_pids_of, process_name, sample_gpu};
use super::Wake;

/// How often reclaim waits re-read the GPU: an observation costs well under a
/// millisecond, and every poll interval adds to the transition's latency.
const RECLAIM_POLL: Duration = Duration::from_millis(10);

/// What a task gets at launch.
pub(super) struct TaskContext<E: ServiceEffects> {
    pub effects: Arc<E>,
    pub spec: ServiceSpec,
    pub gpu: Option<SharedGpu>,
    pub reclaim_timeout: Duration,
    pub wake: mpsc::Sender<Wake<E::Instance>>,
    pub supersede: CancellationToken,
    pub abandon: CancellationToken,
}

/// How an action ended.
#[derive(Debug)]
pub(super) enum Outcome<I> {
    /// A start (or an adopted instance) is ready.
    Started { instance: I, took: Duration },
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
    let ready = tokio::select! {
        biased;
        () = ctx.abandon.cancelled() => return Outcome::Abandoned,
        () = ctx.supersede.cancelled() => None,
        ready = ctx.effects.wait_ready(&ctx.spec, &instance) => Some(ready),
    };
    match ready {
        Some(Ok(took)) => Outcome::Started { instance, took },
        None => match stop_and_reclaim(&ctx, &instance).await {
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
        Some(Err(error)) => match stop_and_reclaim(&ctx, &instance).await {
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
        Ok(took) => Outcome::Started { instance, took },
        Err(error) => Outcome::StartFailed {
            error: EffectError::new(
                error.kind,
                format!("adopted instance is not healthy: {error}"),
            ),
            left_running: Some(instance),
        },
    }
}

/// Frees the service's memory: asks it to give the memory back while it keeps running
/// where it can (Ollama), and stops it otherwise or when that fails.
pub(super) async fn stop<E: ServiceEffects>(
    ctx: TaskContext<E>,
    instance: E::Instance,
) -> Outcome<E::Instance> {
    let mut note = String::new();
    let pids = pids_of::<E>(&ctx, &instance).await;
    if let Some(given) = ctx.effects.give_back_memory(&ctx.spec, &instance).await {
        match given {
            Ok(detail) => match wait_pids_gone(&ctx, &pids).await {
                Ok(()) => {
                    ctx.effects.let_go(&instance);
                    tracing::info!(service = %ctx.spec.name, %detail, "memory given back: the GPU shows it free; the service keeps running");
                    return Outcome::Stopped {
                        detail,
                        reclaim: Ok(()),
                    };
                }
                Err(error) => note = format!("giving the memory back did not free it ({error}); "),
            },
            Err(error) => note = format!("giving the memory back failed ({error}); "),
        }
        tracing::warn!(service = %ctx.spec.name, %note, "eviction failed: stopping it instead");
    }
    match stop_then_reclaim(&ctx, &instance, &pids).await {
        Ok((how, reclaim)) => Outcome::Stopped {
            detail: format!("{note}{}", how.describe()),
            reclaim,
        },
        Err(error) => Outcome::StopFailed { error },
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
    let deadline = Instant::now() + ctx.reclaim_timeout;
    loop {
        let sample = sample_gpu(gpu.clone())
            .await
            .map_err(|e| EffectError::new(FailureKind::Other, e))?;
        let left: Vec<_> = sample
            .processes
            .iter()
            .filter(|p| pids.contains(&p.pid))
            .collect();
        if left.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            let holders: Vec<String> = left
                .iter()
                .map(|p| format!("pid {} ({}) {} MB", p.pid, process_name(p.pid), p.used_mb))
                .collect();
            return Err(EffectError::new(
                FailureKind::Timeout,
                format!(
                    "the GPU still lists the memory of {} {:?} after it was asked to free it: {}",
                    ctx.spec.name,
                    ctx.reclaim_timeout,
                    holders.join(", ")
                ),
            ));
        }
        tokio::time::sleep(RECLAIM_POLL).await;
    }
}
