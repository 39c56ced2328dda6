//! The proxy's own threads: one single-threaded runtime per core, as nginx has one worker
//! process per core (docs/ARCHITECTURE.md, "The demand proxy: HTTP"). Each consumer
//! connection is served on one of them, with that worker's pool of upstream connections,
//! so a request and its answer never cross threads: on the daemon's shared runtime every
//! hand-off between the consumer's connection and the upstream's could wake the other
//! worker thread, a cost that `benches/proxy.rs` measures as CPU per request.

use std::future::Future;
use std::io;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::runtime::{Builder, Handle};
use tokio::sync::oneshot;

use super::upstream::UpstreamPool;

/// The worker threads; dropped, each finishes its runtime, which drops the tasks still
/// there (the proxy drops them only after its shutdown has let the answers under way end).
#[derive(Debug)]
pub(super) struct Workers {
    workers: Vec<Worker>,
    /// Round robin: connections are long-lived (keep-alive), so even shares suffice.
    next: AtomicUsize,
}

#[derive(Debug)]
struct Worker {
    runtime: Handle,
    /// This worker's keep-alive connections to every upstream.
    upstream: UpstreamPool,
    /// Its thread runs until this is dropped.
    _running: oneshot::Sender<()>,
}

impl Workers {
    /// One worker per core the daemon may use.
    pub(super) async fn start() -> io::Result<Self> {
        let count = std::thread::available_parallelism().map_or(1, NonZeroUsize::get);
        let mut workers = Vec::with_capacity(count);
        for index in 0..count {
            workers.push(Worker::start(index).await?);
        }
        Ok(Self {
            workers,
            next: AtomicUsize::new(0),
        })
    }

    /// Runs `task`, given its worker's upstream pool, on the next worker.
    pub(super) fn spawn<T, F>(&self, task: T)
    where
        T: FnOnce(UpstreamPool) -> F,
        F: Future<Output = ()> + Send + 'static,
    {
        let index = self.next.fetch_add(1, Ordering::Relaxed) % self.workers.len();
        let worker = &self.workers[index];
        worker.runtime.spawn(task(worker.upstream.clone()));
    }
}

impl Worker {
    /// The runtime is built on its own thread and dropped there: a runtime dropped
    /// inside the daemon's async context would panic.
    async fn start(index: usize) -> io::Result<Self> {
        let (started, runtime) = oneshot::channel();
        let (running, stopped) = oneshot::channel::<()>();
        std::thread::Builder::new()
            .name(format!("proxy-worker-{index}"))
            .spawn(move || {
                let runtime = match Builder::new_current_thread().enable_all().build() {
                    Ok(runtime) => runtime,
                    Err(err) => {
                        let _ = started.send(Err(err));
                        return;
                    }
                };
                if started.send(Ok(runtime.handle().clone())).is_ok() {
                    // Ends when `running` is dropped (or sends, which nothing does).
                    let _ = runtime.block_on(stopped);
                }
            })?;
        let runtime = runtime
            .await
            .map_err(|_| io::Error::other("the proxy worker thread ended before its runtime"))??;
        Ok(Self {
            runtime,
            upstream: UpstreamPool::default(),
            _running: running,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    #[tokio::test]
    async fn connections_are_shared_round_robin_by_every_worker_thread() {
        let workers = Workers::start().await.unwrap();
        let count = workers.workers.len();
        let (ran_on, mut threads) = tokio::sync::mpsc::unbounded_channel();
        for _ in 0..2 * count {
            let ran_on = ran_on.clone();
            workers.spawn(|_upstream| async move {
                let thread = std::thread::current().name().map(str::to_owned);
                ran_on.send(thread).unwrap();
            });
        }
        let mut seen = BTreeSet::new();
        for _ in 0..2 * count {
            seen.insert(threads.recv().await.unwrap());
        }
        let expected: BTreeSet<_> = (0..count)
            .map(|index| Some(format!("proxy-worker-{index}")))
            .collect();
        assert_eq!(seen, expected);
    }

    #[tokio::test]
    async fn dropped_workers_end_their_threads_and_tasks() {
        let workers = Workers::start().await.unwrap();
        let (ended_tx, ended) = oneshot::channel::<()>();
        workers.spawn(|_upstream| async move {
            // Never ends by itself: only the worker's runtime dropping it drops `ended_tx`.
            let _ended = ended_tx;
            std::future::pending::<()>().await;
        });
        drop(workers);
        let dropped = tokio::time::timeout(std::time::Duration::from_secs(10), ended).await;
        assert!(
            matches!(dropped, Ok(Err(_))),
            "the task outlived its worker"
        );
    }
}
