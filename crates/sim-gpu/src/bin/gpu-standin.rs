//! gpu-standin: a stand-in GPU service for tests and the demo.
//!
//! It behaves as the daemon expects a real service to: it takes its VRAM on the simulated
//! GPU folder at start (and dies with a CUDA-like message when that does not fit),
//! answers health checks (503 until it has "loaded", 200 after), and stops on SIGTERM
//! after a delay. It never frees its memory itself: as with a CUDA process, the memory
//! goes back when the folder's reclaim rule sees the process dead, which is what the
//! daemon's "confirm VRAM reclaimed" step must wait for. Only std, libc and the folder
//! library, so that it builds static and runs in a bare container.

use std::fmt::Display;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use sim_gpu::{AllocError, SimGpuDir, ENV_VAR};

const USAGE: &str =
    "usage: gpu-standin --vram-mb N [--sim-dir DIR] [--port P | --listen ADDR:PORT] \
[--start-delay-ms MS] [--stop-delay-ms MS] [--ignore-sigterm] [--exit-after-ms MS] [--name NAME]";

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
}

/// What the health endpoint reports.
struct Service {
    name: String,
    vram_mb: u64,
    ready_at: Instant,
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
    let head = read_head(&mut stream)?;
    let request_line = head.lines().next().unwrap_or_default();
    let (status, body) = respond(request_line, service);
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes())
}

/// Reads up to the blank line that ends a request head; a body, if any, is ignored.
fn read_head(stream: &mut TcpStream) -> io::Result<String> {
    let mut head = Vec::new();
    let mut buffer = [0u8; 1024];
    while !head.windows(4).any(|window| window == b"\r\n\r\n") && head.len() < MAX_HEAD_BYTES {
        let read = stream.read(&mut buffer)?;
        if read == 0 {
            break;
        }
        head.extend_from_slice(&buffer[..read]);
    }
    Ok(String::from_utf8_lossy(&head).into_owned())
}

/// Any GET path is the health endpoint: 503 while "loading", 200 once ready.
fn respond(request_line: &str, service: &Service) -> (&'static str, String) {
    if !request_line.starts_with("GET ") {
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
