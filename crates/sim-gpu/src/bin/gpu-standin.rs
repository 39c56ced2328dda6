//! gpu-standin: a stand-in GPU service for tests and the demo.
//!
//! It behaves as the daemon expects a real service to: it takes its VRAM on the simulated
//! GPU folder at start (and dies with a CUDA-like message when that does not fit),
//! answers health checks (503 until it has "loaded", 200 after), and stops on SIGTERM
//! after a delay. It never frees its memory itself: as with a CUDA process, the memory
//! goes back when the folder's reclaim rule sees the process dead, which is what the
//! daemon's "confirm VRAM reclaimed" step must wait for. Only std, libc and the folder
//! library, so that it builds static and runs in a bare container.
//!
//! With `--ollama MODEL` it also speaks the two Ollama endpoints the daemon uses to evict
//! it: `GET /api/ps` lists MODEL while it is loaded (its VRAM is the model), and
//! `POST /api/generate {"model": MODEL, "keep_alive": 0}` unloads it, freeing the memory
//! `--unload-delay-ms` later as Ollama's runner does when it exits; a generate request
//! without `keep_alive: 0` loads it again.

use std::fmt::Display;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use sim_gpu::{AllocError, SimGpuDir, ENV_VAR};

const USAGE: &str =
    "usage: gpu-standin --vram-mb N [--sim-dir DIR] [--port P | --listen ADDR:PORT] \
[--start-delay-ms MS] [--stop-delay-ms MS] [--ignore-sigterm] [--exit-after-ms MS] [--name NAME] \
[--ollama MODEL [--unload-delay-ms MS]]";

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
/// Enough for any Ollama request body the daemon sends.
const MAX_BODY_BYTES: usize = 64 * 1024;

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
    ollama_model: Option<String>,
    unload_delay: Duration,
}

/// What the HTTP endpoints report.
struct Service {
    name: String,
    vram_mb: u64,
    ready_at: Instant,
    ollama: Option<Ollama>,
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
    if let Some(address) = options.listen {
        let service = Service {
            name: options.name.clone(),
            vram_mb: options.vram_mb,
            ready_at: started + options.start_delay,
            ollama: options.ollama_model.as_ref().map(|model| Ollama {
                model: model.clone(),
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
    wait_for_end(options, started)
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
        ollama_model: None,
        unload_delay: Duration::ZERO,
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
            "--ollama" => options.ollama_model = Some(value()?),
            "--unload-delay-ms" => options.unload_delay = millis(&flag, &value()?)?,
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
            say(&format_args!(
                "CUDA out of memory. Tried to allocate {requested_mb} MiB (GPU 0; {free_mb} MiB free)"
            ));
            Err(ExitCode::from(EXIT_OOM))
        }
        Err(AllocError::Io(error)) => {
            say(&format_args!("cannot allocate: {error}"));
            Err(ExitCode::from(EXIT_SETUP))
        }
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

fn answer(mut stream: TcpStream, service: &Service) -> io::Result<()> {
    stream.set_read_timeout(Some(READ_TIMEOUT))?;
    let request = read_request(&mut stream)?;
    let (status, body) = respond(&request, service);
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes())
}

/// A request's first line and its body (as long as its Content-Length says).
struct Request {
    line: String,
    body: Vec<u8>,
}

/// Reads up to the blank line that ends a request head, then the body it announces.
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
    let length = head
        .lines()
        .filter_map(|line| line.split_once(':'))
        .find(|(name, _)| name.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, value)| value.trim().parse::<usize>().ok())
        .unwrap_or(0)
        .min(MAX_BODY_BYTES);
    let mut body = data[head_end..].to_vec();
    while body.len() < length {
        let read = stream.read(&mut buffer)?;
        if read == 0 {
            break;
        }
        body.extend_from_slice(&buffer[..read]);
    }
    body.truncate(length);
    let line = head.lines().next().unwrap_or_default().to_owned();
    Ok(Request { line, body })
}

/// Ollama's two endpoints in `--ollama` mode; any other GET path is the health endpoint:
/// 503 while "loading", 200 once ready.
fn respond(request: &Request, service: &Service) -> (&'static str, String) {
    let mut words = request.line.split_whitespace();
    let (method, path) = (
        words.next().unwrap_or_default(),
        words.next().unwrap_or_default(),
    );
    if let Some(ollama) = &service.ollama {
        match (method, path) {
            ("GET", "/api/ps") => return ollama.ps(service.vram_mb),
            ("POST", "/api/generate") => return ollama.generate(&request.body, service),
            _ => {}
        }
    }
    if method != "GET" {
        let body = serde_json::json!({ "error": "only GET is served" });
        return ("405 Method Not Allowed", body.to_string());
    }
    let ready = Instant::now() >= service.ready_at;
    let body = serde_json::json!({
        "name": service.name,
        "status": if ready { "ready" } else { "starting" },
        "vram_mb": service.vram_mb,
        "pid": std::process::id(),
    });
    let status = if ready {
        "200 OK"
    } else {
        "503 Service Unavailable"
    };
    (status, body.to_string())
}

impl Ollama {
    fn state(&self) -> ModelState {
        *self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn set_state(&self, state: ModelState) {
        *self.state.lock().unwrap_or_else(PoisonError::into_inner) = state;
    }

    /// `GET /api/ps`: the model while it holds memory (loaded, or still unloading).
    fn ps(&self, vram_mb: u64) -> (&'static str, String) {
        let models = match self.state() {
            ModelState::Unloaded => Vec::new(),
            ModelState::Loaded | ModelState::Unloading => vec![serde_json::json!({
                "name": self.model,
                "model": self.model,
                "size_vram": vram_mb * 1024 * 1024,
            })],
        };
        (
            "200 OK",
            serde_json::json!({ "models": models }).to_string(),
        )
    }

    /// `POST /api/generate`: with `keep_alive: 0` unloads the model, else loads it.
    fn generate(&self, body: &[u8], service: &Service) -> (&'static str, String) {
        let request: serde_json::Value = match serde_json::from_slice(body) {
            Ok(value) => value,
            Err(error) => {
                let body = serde_json::json!({ "error": format!("invalid JSON: {error}") });
                return ("400 Bad Request", body.to_string());
            }
        };
        let model = request["model"].as_str().unwrap_or_default();
        if model != self.model {
            let body = serde_json::json!({
                "error": format!("model \"{model}\" not found, try pulling it first")
            });
            return ("404 Not Found", body.to_string());
        }
        let (status, done_reason) = if unloads(&request["keep_alive"]) {
            self.unload(service);
            ("200 OK", "unload")
        } else {
            match self.load(service) {
                Ok(()) => ("200 OK", "load"),
                Err(message) => {
                    return (
                        "500 Internal Server Error",
                        serde_json::json!({ "error": message }).to_string(),
                    )
                }
            }
        };
        let body = serde_json::json!({
            "model": self.model,
            "response": "",
            "done": true,
            "done_reason": done_reason,
        });
        (status, body.to_string())
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
fn wait_for_end(options: &Options, started: Instant) -> ExitCode {
    let say = |message: &dyn Display| log(&options.name, message);
    loop {
        let signal = STOP_SIGNAL.load(Ordering::SeqCst);
        if signal != 0 {
            say(&format_args!(
                "signal {signal} received: stopping in {} ms",
                options.stop_delay.as_millis()
            ));
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
