//! gpu-standin: a stand-in GPU service for tests and the demo.
//!
//! It behaves as the daemon expects a real service to: it takes its VRAM on the simulated
//! GPU folder at start (and dies with a CUDA-like message when that does not fit),
//! answers health checks (503 until it has "loaded", 200 after), and stops on SIGTERM
//! after a delay. It never frees its memory itself: as with a CUDA process, the memory
//! goes back when the folder's reclaim rule sees the process dead, which is what the
//! daemon's "confirm VRAM reclaimed" step must wait for. Only std, libc, serde_json,
//! tungstenite (pure Rust, for `/ws`) and the folder library, so that it builds static
//! and runs in a bare container.
//!
//! Over HTTP it also models a service that gives its VRAM back without exiting, and the
//! work a stop could cut short:
//! - jobs: `POST /job?ms=N` queues a job of N ms, run one at a time; `GET /queue` answers
//!   in ComfyUI's shape, which is what a drain probe polls;
//! - parking: `POST /park` (ComfyUI's `/free`, vLLM's `/sleep`) lowers its allocation to
//!   `--residual-mb` between jobs, as ComfyUI acts on `/free`, `--park-delay-ms` after
//!   the request; `POST /resume` (vLLM's `/wake_up`) raises it back and answers after
//!   `--wake-ms`; a job that arrives while it is parked reloads first;
//! - a stop signal while a job runs or waits appends a line to the folder's `lost.log`;
//! - `POST /alloc?mb=N` makes it hold N MB, more than the daemon declared if asked: what
//!   it holds never depends on the daemon's `vram_mb`.
//!
//! With `--ollama MODEL` it also speaks the two Ollama endpoints the daemon uses to evict
//! it: `GET /api/ps` lists MODEL while it is loaded (its VRAM is the model), and
//! `POST /api/generate {"model": MODEL, "keep_alive": 0}` unloads it, freeing the memory
//! `--unload-delay-ms` later as Ollama's runner does when it exits; a generate request
//! without `keep_alive: 0` loads it again.
//!
//! For a proxy in front of it, it also answers as the services' clients expect a stream
//! to come: chat answers token by token (`POST /api/chat` with `--ollama`, and
//! `POST /v1/chat/completions`; chat.rs), a plain chunked stream (`GET /stream`;
//! stream.rs) and a WebSocket echo (`GET /ws`; websocket.rs).

mod chat;
mod stream;
mod websocket;

use std::collections::VecDeque;
use std::fmt::Display;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sim_gpu::{AllocError, SimGpuDir, ENV_VAR};

const USAGE: &str = "\
usage: gpu-standin --vram-mb N [--sim-dir DIR] [--port P | --listen ADDR:PORT] [--name NAME]
         [--start-delay-ms MS] [--stop-delay-ms MS] [--ignore-sigterm] [--exit-after-ms MS]
         [--residual-mb N] [--wake-ms MS] [--park-delay-ms MS]
         [--ollama MODEL [--unload-delay-ms MS]] [--tokens N] [--token-ms MS]

  --vram-mb N          MB it allocates at start on the simulated GPU folder (--sim-dir, else
                       $FAKE_NVML_DIR), whatever vram_mb the daemon declares for it: declare
                       4096 and give --vram-mb 9000 for a service that takes more than declared
  --start-delay-ms MS  health answers 503 for this long, then 200 (default 0)
  --stop-delay-ms MS   how long it takes to exit after SIGTERM or SIGINT (default 0)
  --ignore-sigterm     only SIGINT or SIGKILL stop it
  --exit-after-ms MS   crash (exit 3) after this long
  --residual-mb N      what it still holds while parked (default 0)
  --wake-ms MS         how long a resume, reloading its weights, takes (default 0)
  --park-delay-ms MS   how long after a park request its memory goes down (default 0)
  --ollama MODEL       also serve Ollama's /api/ps, /api/generate and /api/chat for MODEL
  --unload-delay-ms MS how long an Ollama unload takes to free the memory (default 0)
  --tokens N           how many tokens a chat answer has: \"tok1 \", \"tok2 \", ... (default 5)
  --token-ms MS        how long each token takes, streamed or not (default 50)

endpoints, with --port or --listen (answers are JSON unless said otherwise; request bodies
by Content-Length or chunked, up to 64 KiB; each connection serves one request):
  POST /job?ms=N             202 {\"job\": id}: queues a job of N ms; jobs run one at a time
  GET  /queue                200 {\"queue_running\": [[id, ms]], \"queue_pending\": [[id, ms], ...]}
  POST /park, /free, /sleep  200 {\"parked\": true, \"residual_mb\": N} at once; the memory goes
                             down to N after the running job ends and --park-delay-ms passes.
                             A body asking for neither unload_models nor free_memory frees
                             nothing and answers {\"parked\": false}, as ComfyUI's /free does
  POST /resume, /wake_up     200 {\"parked\": false, \"took_ms\": T} once its memory is back and
                             --wake-ms has passed; 507 {\"error\": CUDA OOM text} when the memory
                             does not fit (it stays parked). A job queued while parked reloads first
  POST /alloc?mb=N           200 {\"vram_mb\": N}: holds N MB from now on (resumes too); 507 when a
                             grow does not fit, 409 while parked
  GET  /state                200 {\"parked\", \"parking\", \"waking\", \"jobs_running\", \"jobs_pending\",
                             \"vram_mb\"}, vram_mb being what the folder shows it holding
  POST /v1/chat/completions  OpenAI's chat: with \"stream\": true, text/event-stream, chunked: one
                             `data: {chat.completion.chunk}` per token every --token-ms (the first
                             with role assistant), one with finish_reason stop, then
                             `data: [DONE]`; else one chat.completion after --tokens x --token-ms.
                             model: the one asked for, else NAME; with --ollama, MODEL only (404
                             for another), loaded first if unloaded
  GET  /stream?chunks=N&ms=M text/plain, chunked: N lines \"chunk I of N\", the first at once, then
                             one every M ms: a request that stays in flight
  GET  /ws                   a WebSocket (101) that echoes each text and binary message until the
                             client closes; 426 without Upgrade: websocket
  GET  any other path        health: 503 until --start-delay-ms has passed, then 200, parked too
With --ollama MODEL (a MODEL without a tag is MODEL:latest, as Ollama names it):
  GET  /api/ps               200 {\"models\": [{\"name\", \"model\", \"size_vram\"}]}: MODEL while it
                             holds memory
  POST /api/generate         {\"model\": MODEL, \"keep_alive\": 0} unloads it, frees its memory after
                             --unload-delay-ms; without keep_alive 0 loads it; 404 for another model
  POST /api/chat             Ollama's chat, loading MODEL first if unloaded (404 for another): by
                             default application/x-ndjson, chunked: a line per token every
                             --token-ms ({\"model\", \"created_at\", \"message\": {\"role\": \"assistant\",
                             \"content\": \"tok1 \"}, \"done\": false}), then one with done true,
                             done_reason stop and the stats (total_duration, eval_count...);
                             with \"stream\": false that last line alone, with all the content
A stop signal while a job runs or waits appends a line to lost.log in the folder:
  EPOCH_MS NAME pid PID: job ID lost after DONE of MS ms[; job ID lost after 0 of MS ms ...]";

/// Exit codes, distinct so that tests can tell the failures apart.
const EXIT_SETUP: u8 = 1;
const EXIT_OOM: u8 = 2;
const EXIT_CRASH: u8 = 3;
const EXIT_USAGE: u8 = 64;

/// How often the main thread looks for a signal or the crash deadline.
const POLL: Duration = Duration::from_millis(5);
/// A client that sends nothing must not hold a connection thread forever.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Enough for any health probe's request head.
const MAX_HEAD_BYTES: usize = 16 * 1024;
/// Enough for any Ollama or park request body the daemon sends.
const MAX_BODY_BYTES: usize = 64 * 1024;

const OK: &str = "200 OK";
const BAD_REQUEST: &str = "400 Bad Request";
const INSUFFICIENT: &str = "507 Insufficient Storage";
const INTERNAL: &str = "500 Internal Server Error";

/// The stop signal received (0: none). Set by the signal handler, which may only touch
/// an atomic.
static STOP_SIGNAL: AtomicI32 = AtomicI32::new(0);

struct Options {
    sim_dir: Option<PathBuf>,
    vram_mb: u64,
    listen: Option<SocketAddr>,
    start_delay: Duration,
    stop_delay: Duration,
    ignore_sigterm: bool,
    exit_after: Option<Duration>,
    name: String,
    residual_mb: u64,
    wake: Duration,
    park_delay: Duration,
    ollama_model: Option<String>,
    unload_delay: Duration,
    tokens: chat::Tokens,
}

/// What the HTTP endpoints report.
struct Service {
    name: String,
    vram_mb: u64,
    ready_at: Instant,
    engine: Arc<Engine>,
    ollama: Option<Ollama>,
    tokens: chat::Tokens,
}

/// The stand-in's weights and its jobs: what parks, resumes and runs work. Shared by the
/// HTTP threads, the worker thread that runs jobs and parks between them, and the main
/// thread, which reports the work a stop cuts short.
struct Engine {
    name: String,
    dir: SimGpuDir,
    residual_mb: u64,
    wake: Duration,
    park_delay: Duration,
    /// Held through a whole change of memory (a park, a resume with its wake, an
    /// `/alloc`) so that they never interleave; holds what a resume brings back.
    /// Taken before `work` whenever both are held.
    memory: Mutex<u64>,
    work: Mutex<Work>,
    /// Signalled when a job is queued, a park is asked for or a stop begins.
    work_changed: Condvar,
}

#[derive(Default)]
struct Work {
    /// Holding only the residual.
    parked: bool,
    /// Asked to park; the worker acts on it between jobs.
    park_asked: bool,
    /// Memory back, the wake time not over yet.
    waking: bool,
    /// A stop signal came: no more jobs start.
    stopping: bool,
    running: Option<Running>,
    pending: VecDeque<Job>,
    last_id: u64,
}

#[derive(Debug, Clone, Copy)]
struct Job {
    id: u64,
    ms: u64,
}

struct Running {
    job: Job,
    /// `None` while it reloads parked weights: the job itself has not begun.
    started: Option<Instant>,
}

/// What the worker does next.
enum Task {
    Park,
    Run(Job),
}

/// The Ollama side of `--ollama`: one model, which holds the stand-in's VRAM while it is
/// loaded.
struct Ollama {
    model: String,
    dir: SimGpuDir,
    unload_delay: Duration,
    state: Arc<Mutex<ModelState>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ModelState {
    Loaded,
    /// Asked to unload; the memory is freed after the unload delay.
    Unloading,
    Unloaded,
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|arg| arg == "--help" || arg == "-h") {
        println!("{USAGE}");
        return ExitCode::SUCCESS;
    }
    match parse_options(args) {
        Ok(options) => run(&options),
        Err(message) => {
            eprintln!("gpu-standin: {message}\n{USAGE}");
            ExitCode::from(EXIT_USAGE)
        }
    }
}

fn run(options: &Options) -> ExitCode {
    let started = Instant::now();
    install_signal_handlers(options.ignore_sigterm);
    let say = |message: &dyn Display| log(&options.name, message);
    let dir = match open_folder(options) {
        Ok(dir) => dir,
        Err(error) => {
            say(&format_args!(
                "cannot open the simulated GPU folder: {error}"
            ));
            return ExitCode::from(EXIT_SETUP);
        }
    };
    if let Err(code) = take_vram(&dir, options) {
        return code;
    }
    let engine = Arc::new(Engine {
        name: options.name.clone(),
        dir: dir.clone(),
        residual_mb: options.residual_mb,
        wake: options.wake,
        park_delay: options.park_delay,
        memory: Mutex::new(options.vram_mb),
        work: Mutex::default(),
        work_changed: Condvar::new(),
    });
    if let Some(address) = options.listen {
        let worker = Arc::clone(&engine);
        thread::spawn(move || worker.serve());
        let service = Service {
            name: options.name.clone(),
            vram_mb: options.vram_mb,
            ready_at: started + options.start_delay,
            engine: Arc::clone(&engine),
            tokens: options.tokens,
            ollama: options.ollama_model.as_ref().map(|model| Ollama {
                model: full_model_name(model),
                dir: dir.clone(),
                unload_delay: options.unload_delay,
                state: Arc::new(Mutex::new(ModelState::Loaded)),
            }),
        };
        if let Err(error) = start_http(address, service) {
            say(&format_args!("cannot listen on {address}: {error}"));
            return ExitCode::from(EXIT_SETUP);
        }
    }
    wait_for_end(options, started, &engine)
}

fn parse_options(args: Vec<String>) -> Result<Options, String> {
    let mut options = Options {
        sim_dir: None,
        vram_mb: 0,
        listen: None,
        start_delay: Duration::ZERO,
        stop_delay: Duration::ZERO,
        ignore_sigterm: false,
        exit_after: None,
        name: "gpu-standin".into(),
        residual_mb: 0,
        wake: Duration::ZERO,
        park_delay: Duration::ZERO,
        ollama_model: None,
        unload_delay: Duration::ZERO,
        tokens: chat::Tokens {
            count: 5,
            pace: Duration::from_millis(50),
        },
    };
    let mut vram_mb = None;
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((flag, value)) => (flag.to_owned(), Some(value.to_owned())),
            None => (arg, None),
        };
        let mut value = || {
            inline
                .clone()
                .or_else(|| args.next())
                .ok_or_else(|| format!("{flag} needs a value"))
        };
        match flag.as_str() {
            "--sim-dir" => options.sim_dir = Some(value()?.into()),
            "--vram-mb" => vram_mb = Some(number(&flag, &value()?)?),
            "--port" => {
                let port = number(&flag, &value()?)?;
                let port =
                    u16::try_from(port).map_err(|_| format!("{flag} {port} is not a port"))?;
                options.listen = Some(SocketAddr::from(([127, 0, 0, 1], port)));
            }
            "--listen" => {
                let text = value()?;
                let address = text
                    .parse()
                    .map_err(|_| format!("{flag} {text:?} is not ADDR:PORT"))?;
                options.listen = Some(address);
            }
            "--start-delay-ms" => options.start_delay = millis(&flag, &value()?)?,
            "--stop-delay-ms" => options.stop_delay = millis(&flag, &value()?)?,
            "--exit-after-ms" => options.exit_after = Some(millis(&flag, &value()?)?),
            "--ignore-sigterm" if inline.is_none() => options.ignore_sigterm = true,
            "--name" => options.name = value()?,
            "--residual-mb" => options.residual_mb = number(&flag, &value()?)?,
            "--wake-ms" => options.wake = millis(&flag, &value()?)?,
            "--park-delay-ms" => options.park_delay = millis(&flag, &value()?)?,
            "--ollama" => options.ollama_model = Some(value()?),
            "--unload-delay-ms" => options.unload_delay = millis(&flag, &value()?)?,
            "--tokens" => options.tokens.count = number(&flag, &value()?)?,
            "--token-ms" => options.tokens.pace = millis(&flag, &value()?)?,
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    options.vram_mb = vram_mb.ok_or("--vram-mb is required")?;
    Ok(options)
}

fn number(flag: &str, text: &str) -> Result<u64, String> {
    text.parse()
        .map_err(|_| format!("{flag} {text:?} is not a whole number"))
}

fn millis(flag: &str, text: &str) -> Result<Duration, String> {
    number(flag, text).map(Duration::from_millis)
}

/// Every line says who speaks, so that logs of several stand-ins can be told apart.
fn log(name: &str, message: &dyn Display) {
    eprintln!("gpu-standin[{name}] pid {}: {message}", std::process::id());
}

/// What PyTorch says when CUDA refuses an allocation.
fn oom_text(requested_mb: u64, free_mb: u64) -> String {
    format!("CUDA out of memory. Tried to allocate {requested_mb} MiB (GPU 0; {free_mb} MiB free)")
}

extern "C" fn on_stop_signal(signal: libc::c_int) {
    STOP_SIGNAL.store(signal, Ordering::SeqCst);
}

/// SIGTERM (unless ignored) and SIGINT ask for a stop; the main thread acts on it.
fn install_signal_handlers(ignore_sigterm: bool) {
    let handler = on_stop_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
    let sigterm = if ignore_sigterm {
        libc::SIG_IGN
    } else {
        handler
    };
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGTERM, sigterm);
        libc::signal(libc::SIGINT, handler);
    }
}

fn open_folder(options: &Options) -> io::Result<SimGpuDir> {
    match &options.sim_dir {
        Some(path) => SimGpuDir::open(path),
        None => SimGpuDir::from_env().map_err(|error| {
            io::Error::new(
                error.kind(),
                format!("{error} (give --sim-dir or set {ENV_VAR})"),
            )
        }),
    }
}

/// Allocates the service's VRAM as its model load would; on failure, the exit code.
fn take_vram(dir: &SimGpuDir, options: &Options) -> Result<(), ExitCode> {
    let say = |message: &dyn Display| log(&options.name, message);
    match dir.allocate(std::process::id(), options.vram_mb) {
        Ok(()) => {
            say(&format_args!(
                "allocated {} MB on {}",
                options.vram_mb,
                dir.path().display()
            ));
            Ok(())
        }
        Err(AllocError::OutOfMemory {
            requested_mb,
            free_mb,
        }) => {
            say(&oom_text(requested_mb, free_mb));
            Err(ExitCode::from(EXIT_OOM))
        }
        Err(AllocError::Io(error)) => {
            say(&format_args!("cannot allocate: {error}"));
            Err(ExitCode::from(EXIT_SETUP))
        }
    }
}

impl Engine {
    fn memory(&self) -> MutexGuard<'_, u64> {
        self.memory.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn work(&self) -> MutexGuard<'_, Work> {
        self.work.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn say(&self, message: &dyn Display) {
        log(&self.name, message);
    }

    /// The worker thread: parks when asked, between jobs, and runs the jobs one at a
    /// time, until a stop.
    fn serve(&self) {
        while let Some(task) = self.next_task() {
            match task {
                Task::Park => self.park(),
                Task::Run(job) => self.run(job),
            }
        }
    }

    fn next_task(&self) -> Option<Task> {
        let mut work = self.work();
        loop {
            if work.stopping {
                return None;
            }
            if work.park_asked {
                return Some(Task::Park);
            }
            if let Some(job) = work.pending.pop_front() {
                work.running = Some(Running { job, started: None });
                return Some(Task::Run(job));
            }
            work = self
                .work_changed
                .wait(work)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }

    fn submit(&self, ms: u64) -> u64 {
        let mut work = self.work();
        work.last_id += 1;
        let job = Job {
            id: work.last_id,
            ms,
        };
        work.pending.push_back(job);
        self.work_changed.notify_all();
        self.say(&format_args!("job {} queued ({ms} ms)", job.id));
        job.id
    }

    /// Runs a job, reloading parked weights first; a reload that does not fit fails the
    /// job, as a CUDA out-of-memory error fails a ComfyUI prompt.
    fn run(&self, job: Job) {
        if let Err(error) = self.load() {
            self.say(&format_args!(
                "job {} failed: cannot reload: {}",
                job.id,
                refusal_text(&error)
            ));
            self.work().running = None;
            return;
        }
        self.work().running = Some(Running {
            job,
            started: Some(Instant::now()),
        });
        self.say(&format_args!("job {} started", job.id));
        thread::sleep(Duration::from_millis(job.ms));
        self.work().running = None;
        self.say(&format_args!("job {} done", job.id));
    }

    /// A park request: the worker acts on it once the running job, if any, has ended.
    fn ask_park(&self) {
        self.work().park_asked = true;
        self.work_changed.notify_all();
        self.say(&format_args!(
            "park asked: down to {} MB after the running job and {} ms",
            self.residual_mb,
            self.park_delay.as_millis()
        ));
    }

    /// Lowers the memory to the residual, unless a resume cancelled the request during
    /// the park delay.
    fn park(&self) {
        thread::sleep(self.park_delay);
        let _memory = self.memory();
        let mut work = self.work();
        if !std::mem::take(&mut work.park_asked) || work.parked {
            return;
        }
        match self.dir.resize(std::process::id(), self.residual_mb) {
            Ok(()) => {
                work.parked = true;
                self.say(&format_args!("parked: holding {} MB", self.residual_mb));
            }
            Err(error) => self.say(&format_args!("cannot park: {}", refusal_text(&error))),
        }
    }

    /// A resume request: cancels a park not yet done, then reloads if parked.
    fn resume(&self) -> Result<Duration, AllocError> {
        self.work().park_asked = false;
        self.load()
    }

    /// Brings the parked weights back: the whole allocation, then the wake time. Returns
    /// how long it took, waiting for a change of memory under way included. A refused
    /// allocation leaves it parked.
    fn load(&self) -> Result<Duration, AllocError> {
        let asked = Instant::now();
        let loaded_mb = self.memory();
        {
            let mut work = self.work();
            if !work.parked {
                return Ok(asked.elapsed());
            }
            self.dir.resize(std::process::id(), *loaded_mb)?;
            work.parked = false;
            work.waking = true;
        }
        self.say(&format_args!(
            "resuming: {} MB back, awake in {} ms",
            *loaded_mb,
            self.wake.as_millis()
        ));
        thread::sleep(self.wake);
        self.work().waking = false;
        self.say(&"awake");
        Ok(asked.elapsed())
    }

    /// `POST /alloc`: holds `mb` from now on, and a later resume brings `mb` back.
    fn reallocate(&self, mb: u64) -> Result<Reply, Reply> {
        let mut loaded_mb = self.memory();
        if self.work().parked {
            return Err(error("409 Conflict", "parked: resume it first"));
        }
        self.dir
            .resize(std::process::id(), mb)
            .map_err(|error| alloc_refusal(&error))?;
        *loaded_mb = mb;
        self.say(&format_args!("now holding {mb} MB"));
        Ok(reply(OK, &json!({ "vram_mb": mb })))
    }

    fn state(&self) -> io::Result<Value> {
        let pid = std::process::id();
        let vram_mb = self
            .dir
            .snapshot()?
            .processes
            .iter()
            .find(|allocation| allocation.pid == pid)
            .map_or(0, |allocation| allocation.mb);
        let work = self.work();
        Ok(json!({
            "parked": work.parked,
            "parking": work.park_asked,
            "waking": work.waking,
            "jobs_running": usize::from(work.running.is_some()),
            "jobs_pending": work.pending.len(),
            "vram_mb": vram_mb,
        }))
    }

    /// ComfyUI's `GET /queue` shape, each entry `[id, ms]`.
    fn queue(&self) -> Value {
        let work = self.work();
        let entry = |job: &Job| json!([job.id, job.ms]);
        let running: Vec<Value> = work.running.iter().map(|r| entry(&r.job)).collect();
        let pending: Vec<Value> = work.pending.iter().map(entry).collect();
        json!({ "queue_running": running, "queue_pending": pending })
    }

    /// On a stop signal: starts no more jobs, and says what work the stop cuts short
    /// (`None` when there is none).
    fn stop(&self) -> Option<String> {
        let mut work = self.work();
        work.stopping = true;
        self.work_changed.notify_all();
        let running = work.running.iter().map(|running| {
            let done = running.started.map_or(0, |started| {
                u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX)
            });
            (running.job, done.min(running.job.ms))
        });
        let pending = work.pending.iter().map(|&job| (job, 0));
        let lost: Vec<String> = running
            .chain(pending)
            .map(|(job, done)| format!("job {} lost after {done} of {} ms", job.id, job.ms))
            .collect();
        (!lost.is_empty()).then(|| {
            format!(
                "{} pid {}: {}",
                self.name,
                std::process::id(),
                lost.join("; ")
            )
        })
    }
}

/// Binds (port 0 picks a free port; the log line says which) and answers on a thread.
fn start_http(address: SocketAddr, service: Service) -> io::Result<()> {
    let listener = TcpListener::bind(address)?;
    log(
        &service.name,
        &format_args!("listening on {}", listener.local_addr()?),
    );
    let service = Arc::new(service);
    thread::spawn(move || {
        for stream in listener.incoming() {
            let service = Arc::clone(&service);
            match stream {
                Ok(stream) => {
                    thread::spawn(move || {
                        if let Err(error) = answer(stream, &service) {
                            log(&service.name, &format_args!("connection failed: {error}"));
                        }
                    });
                }
                Err(error) => log(&service.name, &format_args!("accept failed: {error}")),
            }
        }
    });
    Ok(())
}

/// An HTTP status line's reason and what follows it.
struct Reply {
    status: &'static str,
    body: Body,
}

enum Body {
    /// Written whole.
    Json(String),
    /// Written a piece at a time as it is produced.
    Streamed(stream::Stream),
    /// A WebSocket upgrade with its `Sec-WebSocket-Accept`: the connection then echoes.
    WebSocket { accept: String },
}

impl Reply {
    fn json(status: &'static str, body: &Value) -> Self {
        Self {
            status,
            body: Body::Json(body.to_string()),
        }
    }

    fn streamed(stream: stream::Stream) -> Self {
        Self {
            status: OK,
            body: Body::Streamed(stream),
        }
    }
}

fn reply(status: &'static str, body: &Value) -> Reply {
    Reply::json(status, body)
}

fn error(status: &'static str, message: impl Display) -> Reply {
    reply(status, &json!({ "error": message.to_string() }))
}

fn refusal_text(refusal: &AllocError) -> String {
    match refusal {
        AllocError::OutOfMemory {
            requested_mb,
            free_mb,
        } => oom_text(*requested_mb, *free_mb),
        AllocError::Io(error) => format!("cannot allocate: {error}"),
    }
}

/// 507 for memory that does not fit, as a storage server says it is full; 500 when the
/// folder itself failed.
fn alloc_refusal(refusal: &AllocError) -> Reply {
    let status = match refusal {
        AllocError::OutOfMemory { .. } => INSUFFICIENT,
        AllocError::Io(_) => INTERNAL,
    };
    error(status, refusal_text(refusal))
}

fn answer(mut stream: TcpStream, service: &Service) -> io::Result<()> {
    stream.set_read_timeout(Some(READ_TIMEOUT))?;
    let request = read_request(&mut stream)?;
    let Reply { status, body } = route(&request, service).unwrap_or_else(|refusal| refusal);
    match body {
        Body::Json(body) => {
            let response = format!(
                "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            stream.write_all(response.as_bytes())
        }
        Body::Streamed(body) => body.send(status, stream),
        Body::WebSocket { accept } => websocket::echo(status, &accept, stream),
    }
}

/// A request's method, path and query, its headers, and its body (as long as its
/// Content-Length says).
struct Request {
    method: String,
    path: String,
    query: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Request {
    /// The value of the first header called `name`, whatever the case of either.
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find_map(|(key, value)| key.eq_ignore_ascii_case(name).then_some(value.as_str()))
    }

    /// The whole-number query parameter `name`, which the endpoint requires.
    fn number(&self, name: &str) -> Result<u64, Reply> {
        let text = self
            .query
            .split('&')
            .filter_map(|pair| pair.split_once('='))
            .find_map(|(key, value)| (key == name).then_some(value))
            .ok_or_else(|| error(BAD_REQUEST, format!("give ?{name}=N")))?;
        text.parse().map_err(|_| {
            error(
                BAD_REQUEST,
                format!("{name}={text:?} is not a whole number"),
            )
        })
    }

    fn json(&self) -> Result<Value, Reply> {
        serde_json::from_slice(&self.body)
            .map_err(|e| error(BAD_REQUEST, format!("invalid JSON: {e}")))
    }
}

/// Reads up to the blank line that ends a request head, then the body it announces: as
/// long as its Content-Length says, or in chunks, as a proxy may forward a body it streams.
fn read_request(stream: &mut TcpStream) -> io::Result<Request> {
    let mut data = Vec::new();
    let mut buffer = [0u8; 1024];
    let head_end = loop {
        if let Some(at) = data.windows(4).position(|window| window == b"\r\n\r\n") {
            break at + 4;
        }
        if data.len() >= MAX_HEAD_BYTES {
            break data.len();
        }
        let read = stream.read(&mut buffer)?;
        if read == 0 {
            break data.len();
        }
        data.extend_from_slice(&buffer[..read]);
    };
    let head = String::from_utf8_lossy(&data[..head_end]).into_owned();
    let headers: Vec<(String, String)> = head
        .lines()
        .skip(1)
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.trim().to_owned(), value.trim().to_owned()))
        .collect();
    let mut words = head.lines().next().unwrap_or_default().split_whitespace();
    let method = words.next().unwrap_or_default().to_owned();
    let target = words.next().unwrap_or_default();
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let mut request = Request {
        method,
        path: path.to_owned(),
        query: query.to_owned(),
        headers,
        body: Vec::new(),
    };
    let rest = io::Cursor::new(data[head_end..].to_vec()).chain(&mut *stream);
    let chunked = request
        .header("transfer-encoding")
        .is_some_and(|coding| coding.eq_ignore_ascii_case("chunked"));
    if chunked {
        request.body = read_chunks(&mut BufReader::new(rest))?;
    } else {
        let length = request
            .header("content-length")
            .and_then(|value| value.parse::<u64>().ok())
            .unwrap_or(0)
            .min(MAX_BODY_BYTES as u64);
        rest.take(length).read_to_end(&mut request.body)?;
    }
    Ok(request)
}

/// A body in chunked transfer encoding, up to its last chunk; what trailers follow are
/// left unread, as the connection closes after the answer.
fn read_chunks(reader: &mut impl BufRead) -> io::Result<Vec<u8>> {
    let invalid = |message: String| io::Error::new(io::ErrorKind::InvalidData, message);
    let mut body = Vec::new();
    loop {
        let mut line = String::new();
        reader.read_line(&mut line)?;
        // A size may come with extensions after a ';', which mean nothing here.
        let size = line.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size, 16)
            .map_err(|_| invalid(format!("not a chunk size: {line:?}")))?;
        if size == 0 {
            return Ok(body);
        }
        if body.len() + size > MAX_BODY_BYTES {
            return Err(invalid(format!("a body over {MAX_BODY_BYTES} bytes")));
        }
        let start = body.len();
        body.resize(start + size, 0);
        reader.read_exact(&mut body[start..])?;
        let mut end = [0; 2];
        reader.read_exact(&mut end)?;
        if &end != b"\r\n" {
            return Err(invalid("a chunk longer than its size".into()));
        }
    }
}

/// The endpoints listed in USAGE; any other GET path is the health endpoint.
fn route(request: &Request, service: &Service) -> Result<Reply, Reply> {
    let engine = &service.engine;
    let endpoint = (request.method.as_str(), request.path.as_str());
    if let Some(ollama) = &service.ollama {
        match endpoint {
            ("GET", "/api/ps") => return Ok(ollama.ps(service.vram_mb)),
            ("POST", "/api/generate") => return ollama.generate(request, service),
            ("POST", "/api/chat") => {
                let asked = request.json()?;
                ollama.serve(&asked, service)?;
                return Ok(chat::ollama(&ollama.model, &asked, service.tokens));
            }
            ("POST", "/v1/chat/completions") => {
                let asked = request.json()?;
                ollama.serve(&asked, service)?;
                return Ok(chat::openai(&asked, &ollama.model, service.tokens));
            }
            _ => {}
        }
    }
    match endpoint {
        ("POST", "/job") => {
            let id = engine.submit(request.number("ms")?);
            Ok(reply("202 Accepted", &json!({ "job": id })))
        }
        ("GET", "/queue") => Ok(reply(OK, &engine.queue())),
        ("POST", "/park" | "/free" | "/sleep") => park(request, engine),
        ("POST", "/resume" | "/wake_up") => {
            let took = engine.resume().map_err(|error| alloc_refusal(&error))?;
            let took_ms = u64::try_from(took.as_millis()).unwrap_or(u64::MAX);
            Ok(reply(OK, &json!({ "parked": false, "took_ms": took_ms })))
        }
        ("POST", "/alloc") => engine.reallocate(request.number("mb")?),
        ("POST", "/v1/chat/completions") => Ok(chat::openai(
            &request.json()?,
            &service.name,
            service.tokens,
        )),
        ("GET", "/stream") => {
            let pace = Duration::from_millis(request.number("ms")?);
            Ok(Reply::streamed(stream::lines(
                request.number("chunks")?,
                pace,
            )))
        }
        ("GET", "/ws") => websocket::upgrade(request),
        ("GET", "/state") => engine
            .state()
            .map(|state| reply(OK, &state))
            .map_err(|e| error(INTERNAL, format!("cannot read the GPU folder: {e}"))),
        ("GET", _) => Ok(health(service)),
        (method, path) => Err(error(
            "405 Method Not Allowed",
            format!("{method} {path} is not served (see gpu-standin --help)"),
        )),
    }
}

/// A park request. ComfyUI's `/free` body names what to free; one that names nothing
/// frees nothing, as ComfyUI's does, which lets a test make a park that never lands.
fn park(request: &Request, engine: &Engine) -> Result<Reply, Reply> {
    if !request.body.is_empty() {
        let asked = request.json()?;
        if asked["unload_models"] != true && asked["free_memory"] != true {
            let body = json!({ "parked": false, "residual_mb": engine.residual_mb });
            return Ok(reply(OK, &body));
        }
    }
    engine.ask_park();
    let body = json!({ "parked": true, "residual_mb": engine.residual_mb });
    Ok(reply(OK, &body))
}

/// 503 while "loading", 200 once ready, parked or not: the process is alive.
fn health(service: &Service) -> Reply {
    let ready = Instant::now() >= service.ready_at;
    let body = json!({
        "name": service.name,
        "status": if ready { "ready" } else { "starting" },
        "vram_mb": service.vram_mb,
        "pid": std::process::id(),
    });
    let status = if ready { OK } else { "503 Service Unavailable" };
    reply(status, &body)
}

impl Ollama {
    fn state(&self) -> ModelState {
        *self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn set_state(&self, state: ModelState) {
        *self.state.lock().unwrap_or_else(PoisonError::into_inner) = state;
    }

    /// `GET /api/ps`: the model while it holds memory (loaded, or still unloading).
    fn ps(&self, vram_mb: u64) -> Reply {
        let models = match self.state() {
            ModelState::Unloaded => Vec::new(),
            ModelState::Loaded | ModelState::Unloading => vec![json!({
                "name": self.model,
                "model": self.model,
                "size_vram": vram_mb * 1024 * 1024,
            })],
        };
        reply(OK, &json!({ "models": models }))
    }

    /// Ollama's 404 unless the request names this model.
    fn check_model(&self, asked: &Value) -> Result<(), Reply> {
        let model = asked["model"].as_str().unwrap_or_default();
        if full_model_name(model) == self.model {
            return Ok(());
        }
        Err(error(
            "404 Not Found",
            format!("model \"{model}\" not found, try pulling it first"),
        ))
    }

    /// Before a chat: the model asked for, loaded as Ollama loads it for any request.
    fn serve(&self, asked: &Value, service: &Service) -> Result<(), Reply> {
        self.check_model(asked)?;
        self.load(service)
            .map_err(|message| error(INTERNAL, message))
    }

    /// `POST /api/generate`: with `keep_alive: 0` unloads the model, else loads it.
    fn generate(&self, request: &Request, service: &Service) -> Result<Reply, Reply> {
        let asked = request.json()?;
        self.check_model(&asked)?;
        let done_reason = if unloads(&asked["keep_alive"]) {
            self.unload(service);
            "unload"
        } else {
            self.load(service)
                .map_err(|message| error(INTERNAL, message))?;
            "load"
        };
        let body = json!({
            "model": self.model,
            "response": "",
            "done": true,
            "done_reason": done_reason,
        });
        Ok(reply(OK, &body))
    }
    /// Frees the model's memory after the unload delay, on a thread of its own so that
    /// the answer comes at once, as Ollama's does.
    fn unload(&self, service: &Service) {
        if self.state() != ModelState::Loaded {
            return;
        }
        self.set_state(ModelState::Unloading);
        log(
            &service.name,
            &format_args!(
                "unloading model {} in {} ms",
                self.model,
                self.unload_delay.as_millis()
            ),
        );
        let (dir, delay, state) = (self.dir.clone(), self.unload_delay, self.state.clone());
        let (name, model) = (service.name.clone(), self.model.clone());
        thread::spawn(move || {
            thread::sleep(delay);
            match dir.release(std::process::id()) {
                Ok(()) => {
                    *state.lock().unwrap_or_else(PoisonError::into_inner) = ModelState::Unloaded;
                    log(
                        &name,
                        &format_args!("model {model} unloaded: its memory is free"),
                    );
                }
                Err(error) => log(
                    &name,
                    &format_args!("cannot free the model's memory: {error}"),
                ),
            }
        });
    }

    /// Takes the model's memory again, unless it still holds it.
    fn load(&self, service: &Service) -> Result<(), String> {
        if self.state() != ModelState::Unloaded {
            return Ok(());
        }
        match self.dir.allocate(std::process::id(), service.vram_mb) {
            Ok(()) => {
                self.set_state(ModelState::Loaded);
                log(
                    &service.name,
                    &format_args!("model {} loaded: {} MB", self.model, service.vram_mb),
                );
                Ok(())
            }
            Err(error) => Err(format!("cannot load model {}: {error}", self.model)),
        }
    }
}

/// A model's name as Ollama keeps it: `llama3` is `llama3:latest`.
fn full_model_name(model: &str) -> String {
    if model.contains(':') {
        model.to_owned()
    } else {
        format!("{model}:latest")
    }
}

/// Whether a `keep_alive` asks for an unload: 0, or a zero duration such as "0" or "0s".
fn unloads(keep_alive: &serde_json::Value) -> bool {
    match keep_alive {
        serde_json::Value::Number(number) => number.as_f64() == Some(0.0),
        serde_json::Value::String(text) => {
            let digits = text.trim_end_matches(['s', 'm', 'h']);
            !digits.is_empty() && digits.parse::<f64>().is_ok_and(|n| n == 0.0)
        }
        _ => false,
    }
}

/// Runs until a stop signal (exit 0 after the stop delay) or the crash deadline (exit 3).
/// A stop that cuts work short says so in the folder's `lost.log` first; a crash is not a
/// stop, and the daemon learns of it otherwise.
fn wait_for_end(options: &Options, started: Instant, engine: &Engine) -> ExitCode {
    let say = |message: &dyn Display| log(&options.name, message);
    loop {
        let signal = STOP_SIGNAL.load(Ordering::SeqCst);
        if signal != 0 {
            say(&format_args!(
                "signal {signal} received: stopping in {} ms",
                options.stop_delay.as_millis()
            ));
            if let Some(lost) = engine.stop() {
                say(&format_args!("work lost: {lost}"));
                if let Err(error) = engine.dir.record_lost(&lost) {
                    say(&format_args!("cannot record the lost work: {error}"));
                }
            }
            thread::sleep(options.stop_delay);
            say(&"stopped");
            return ExitCode::SUCCESS;
        }
        if options
            .exit_after
            .is_some_and(|after| started.elapsed() >= after)
        {
            say(&"crashing as asked by --exit-after-ms");
            return ExitCode::from(EXIT_CRASH);
        }
        thread::sleep(POLL);
    }
}
