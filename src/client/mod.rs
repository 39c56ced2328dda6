//! The client commands (`status`, `can-fit MB`, `phase N`, `start NAME`, `stop NAME`,
//! `claim NAME`, `release NAME`, `forget NAME`): they talk to a
//! running daemon over its HTTP API. Transitions follow `GET /gpu/events` while the POST
//! is pending, so people see each action and state change as it happens.
//!
//! Exit codes: 0 done, 1 refused or failed (the daemon's message is printed), 2 the
//! daemon cannot be reached.

mod reload;
mod render;
mod sse;

pub use reload::run_reload;

use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use reqwest::{StatusCode, Url};
use tokio::sync::mpsc;

use crate::can_fit::CanFit;
use crate::config::{Config, Phase, ServiceName};
use crate::footprints::{Footprints, Forgotten};
use crate::status::{DaemonEvent, Status};
use crate::transition::TransitionReport;

pub use render::status_table;

/// Where the daemon is when neither `--url` nor `--config` says.
pub const DEFAULT_URL: &str = "http://127.0.0.1:8000";
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Reads answer from the snapshot at once; this only bounds a daemon that hangs.
const READ_TIMEOUT: Duration = Duration::from_secs(30);
/// The POST's answer may overtake the last events (they travel on another connection):
/// how long to wait for them before printing the report.
const EVENT_CATCH_UP: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach gpu-manager at {url}: {detail}\nIs the daemon running? Start it with `gpu-manager serve --config FILE`, or point at it with --url URL or --config FILE.")]
    Unreachable { url: String, detail: String },
    #[error("{0}")]
    Setup(String),
    /// The daemon answered with an error; `body` is its JSON, as sent.
    #[error("error (HTTP {code}): {message}")]
    Refused {
        code: u16,
        message: String,
        body: String,
    },
    #[error("unexpected answer from {url}: {detail}")]
    Protocol { url: String, detail: String },
}

impl ClientError {
    pub fn exit_code(&self) -> ExitCode {
        match self {
            ClientError::Unreachable { .. } | ClientError::Setup(_) => ExitCode::from(2),
            ClientError::Refused { .. } | ClientError::Protocol { .. } => ExitCode::from(1),
        }
    }
}

/// A change a client command asks for.
#[derive(Debug, Clone)]
pub enum Request {
    Phase(Phase),
    Start(String),
    Stop(String),
    /// Take or renew `holder`'s claim on a service for `ttl_s` seconds.
    Claim {
        name: String,
        holder: String,
        ttl_s: u64,
    },
    Release {
        name: String,
        holder: String,
    },
}

impl Request {
    fn path(&self) -> Vec<String> {
        let service =
            |name: &str, verb: &str| ["gpu", "service", name, verb].map(String::from).to_vec();
        match self {
            Request::Phase(phase) => vec!["gpu".into(), "prepare-phase".into(), phase.to_string()],
            Request::Start(name) => service(name, "start"),
            Request::Stop(name) => service(name, "stop"),
            Request::Claim { name, .. } => service(name, "claim"),
            Request::Release { name, .. } => service(name, "release"),
        }
    }

    fn query(&self) -> Vec<(&'static str, String)> {
        match self {
            Request::Claim { holder, ttl_s, .. } => {
                vec![("holder", holder.clone()), ("ttl_s", ttl_s.to_string())]
            }
            Request::Release { holder, .. } => vec![("holder", holder.clone())],
            Request::Phase(_) | Request::Start(_) | Request::Stop(_) => Vec::new(),
        }
    }

    fn title(&self) -> String {
        match self {
            Request::Phase(phase) => format!("phase {phase}"),
            Request::Start(name) => format!("start {name}"),
            Request::Stop(name) => format!("stop {name}"),
            Request::Claim {
                name,
                holder,
                ttl_s,
            } => format!("claim {name} for {holder:?} ({ttl_s} s)"),
            Request::Release { name, holder } => format!("release {name} by {holder:?}"),
        }
    }
}

/// The daemon to talk to, and the token its POSTs need.
pub struct Client {
    base: Url,
    token: Option<String>,
    http: reqwest::Client,
}

impl Client {
    /// `--url` wins; else the config's `api.listen` (and its token); else [`DEFAULT_URL`].
    /// A token file given explicitly overrides the config's.
    pub fn new(
        url: Option<Url>,
        config: Option<&Path>,
        token_file: Option<&Path>,
    ) -> Result<Self, ClientError> {
        let config = config
            .map(Config::load)
            .transpose()
            .map_err(|e| ClientError::Setup(format!("cannot find the daemon: {e}")))?;
        let base = match (url, &config) {
            (Some(url), _) => url,
            (None, Some(config)) => url_of(config.api.listen)?,
            (None, None) => Url::parse(DEFAULT_URL).expect("a valid default URL"),
        };
        let token_file = token_file.or_else(|| config.as_ref()?.api.token_file.as_deref());
        let token = token_file.map(read_token).transpose()?;
        let http = reqwest::Client::builder()
            .no_proxy()
            .connect_timeout(CONNECT_TIMEOUT)
            .build()
            .map_err(|e| ClientError::Setup(format!("cannot build the HTTP client: {e}")))?;
        Ok(Self { base, token, http })
    }

    fn url(&self, segments: &[String]) -> Url {
        let mut url = self.base.clone();
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty().extend(segments);
        }
        url
    }

    fn unreachable(&self, error: &reqwest::Error) -> ClientError {
        let mut detail = error.to_string();
        let mut source = std::error::Error::source(error);
        while let Some(cause) = source {
            detail.push_str(&format!(": {cause}"));
            source = cause.source();
        }
        ClientError::Unreachable {
            url: self.base.to_string(),
            detail,
        }
    }

    /// A GET of `segments` with `query`: the URL asked and the JSON text answered.
    async fn get(
        &self,
        segments: &[&str],
        query: &[(&str, String)],
    ) -> Result<(Url, String), ClientError> {
        let segments: Vec<String> = segments.iter().map(|s| s.to_string()).collect();
        let mut url = self.url(&segments);
        if !query.is_empty() {
            url.query_pairs_mut().extend_pairs(query);
        }
        let response = self
            .http
            .get(url.clone())
            .timeout(READ_TIMEOUT)
            .send()
            .await
            .map_err(|e| self.unreachable(&e))?;
        let body = answer(&url, response).await?;
        Ok((url, body))
    }

    /// `gpu-manager can-fit MB`: whether MB fit now (and what a start at `priority`
    /// would stop), as text or the daemon's JSON; the bool is the answer.
    pub async fn can_fit(
        &self,
        mb: u64,
        priority: Option<i64>,
        json: bool,
    ) -> Result<(bool, String), ClientError> {
        let mut query = vec![("mb", mb.to_string())];
        query.extend(priority.map(|p| ("priority", p.to_string())));
        let (url, body) = self.get(&["gpu", "can-fit"], &query).await?;
        let answer: CanFit = serde_json::from_str(&body).map_err(|e| ClientError::Protocol {
            url: url.to_string(),
            detail: format!("not a can-fit answer: {e}"),
        })?;
        let text = if json {
            format!("{body}\n")
        } else {
            render::can_fit(&answer)
        };
        Ok((answer.fits, text))
    }

    /// `gpu-manager forget NAME`: asks the daemon to reset what it learned of NAME.
    pub async fn forget(&self, name: &str, json: bool) -> Result<String, ClientError> {
        let segments = ["gpu", "service", name, "forget"].map(String::from);
        let url = self.url(&segments);
        let mut post = self.http.post(url.clone()).timeout(READ_TIMEOUT);
        if let Some(token) = &self.token {
            post = post.bearer_auth(token);
        }
        let response = post.send().await.map_err(|e| self.unreachable(&e))?;
        let body = answer(&url, response).await?;
        if json {
            return Ok(format!("{body}\n"));
        }
        let forgotten: Forgotten =
            serde_json::from_str(&body).map_err(|e| ClientError::Protocol {
                url: url.to_string(),
                detail: format!("not a forget answer: {e}"),
            })?;
        Ok(render::forgotten(&forgotten, "the daemon forgot"))
    }

    /// `gpu-manager status`: the table, or the daemon's JSON with `json`.
    pub async fn status(&self, json: bool) -> Result<String, ClientError> {
        let (url, body) = self.get(&["gpu", "status"], &[]).await?;
        if json {
            return Ok(format!("{body}\n"));
        }
        let status: Status = serde_json::from_str(&body).map_err(|e| ClientError::Protocol {
            url: url.to_string(),
            detail: format!("not a status: {e}"),
        })?;
        Ok(status_table(&status))
    }

    /// `gpu-manager phase|start|stop`: POSTs the change and waits for its answer,
    /// calling `progress` with a line per event meanwhile. Returns what to print.
    /// `force` skips draining (`?force=true`): work in flight is lost.
    pub async fn transition(
        &self,
        request: &Request,
        force: bool,
        json: bool,
        mut progress: impl FnMut(&str),
    ) -> Result<String, ClientError> {
        let started = Instant::now();
        let (events_tx, mut events) = mpsc::unbounded_channel();
        let follower = if json {
            None
        } else {
            Some(tokio::spawn(self.follow_events(events_tx).await?))
        };
        let mut url = self.url(&request.path());
        for (key, value) in request.query() {
            url.query_pairs_mut().append_pair(key, &value);
        }
        if force {
            url.query_pairs_mut().append_pair("force", "true");
        }
        let mut post = self.http.post(url.clone());
        if let Some(token) = &self.token {
            post = post.bearer_auth(token);
        }
        let answered = post.send();
        tokio::pin!(answered);
        let mut print = |event: &DaemonEvent| {
            let elapsed = started.elapsed().as_secs_f64();
            progress(&format!("[{elapsed:6.2}s] {}", render::event_line(event)));
        };
        let response = loop {
            tokio::select! {
                response = &mut answered => break response,
                Some(event) = events.recv() => print(&event),
            }
        };
        let outcome = match response {
            Ok(response) => answer(&url, response).await,
            Err(error) => Err(self.unreachable(&error)),
        };
        let report = outcome
            .as_ref()
            .ok()
            .and_then(|body| serde_json::from_str::<TransitionReport>(body).ok());
        if let Some(follower) = follower {
            catch_up(&mut events, report.as_ref(), &mut print).await;
            follower.abort();
        }
        let body = outcome?;
        if json {
            return Ok(format!("{body}\n"));
        }
        let report = report.ok_or_else(|| ClientError::Protocol {
            url: url.to_string(),
            detail: format!("not a transition report: {body}"),
        })?;
        Ok(render::report(&request.title(), &report))
    }

    /// Subscribes to the event stream before anything is posted, so no event of the
    /// transition is missed; returns the task that forwards the events.
    async fn follow_events(
        &self,
        events: mpsc::UnboundedSender<DaemonEvent>,
    ) -> Result<impl std::future::Future<Output = ()>, ClientError> {
        let url = self.url(&["gpu".into(), "events".into()]);
        let mut response = self
            .http
            .get(url.clone())
            .send()
            .await
            .map_err(|e| self.unreachable(&e))?;
        if !response.status().is_success() {
            return Err(ClientError::Protocol {
                url: url.to_string(),
                detail: format!("the event stream answered {}", response.status()),
            });
        }
        Ok(async move {
            let mut parser = sse::SseParser::default();
            while let Ok(Some(chunk)) = response.chunk().await {
                for data in parser.push(&chunk) {
                    if let Ok(event) = serde_json::from_str::<DaemonEvent>(&data) {
                        if events.send(event).is_err() {
                            return;
                        }
                    }
                }
            }
        })
    }
}

/// Prints the events still in flight for the report's actions (bounded in time), so the
/// progress lines end with the transition's last action.
async fn catch_up(
    events: &mut mpsc::UnboundedReceiver<DaemonEvent>,
    report: Option<&TransitionReport>,
    print: &mut impl FnMut(&DaemonEvent),
) {
    let mut unseen = report
        .filter(|r| !r.accepted_only)
        .map_or(0, |r| r.actions.len());
    let deadline = tokio::time::Instant::now() + EVENT_CATCH_UP;
    while let Ok(Some(event)) = tokio::time::timeout_at(deadline, events.recv()).await {
        print(&event);
        if let (DaemonEvent::ActionFinished { action }, Some(report)) = (&event, report) {
            if action.generation == report.generation {
                unseen = unseen.saturating_sub(1);
            }
        }
        if unseen == 0 {
            // Nothing more is owed; print only what has already arrived.
            while let Ok(event) = events.try_recv() {
                print(&event);
            }
            return;
        }
    }
}

/// The JSON text of a 2xx answer, or the daemon's error.
async fn answer(url: &Url, response: reqwest::Response) -> Result<String, ClientError> {
    let code = response.status();
    let body = response.text().await.map_err(|e| ClientError::Protocol {
        url: url.to_string(),
        detail: format!("HTTP {code}, then the answer broke off: {e}"),
    })?;
    if code.is_success() {
        return Ok(body);
    }
    let error: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    let message = error["error"]
        .as_str()
        .map(str::to_owned)
        .unwrap_or_else(|| body.clone());
    Err(ClientError::Refused {
        code: code.as_u16(),
        message: hint(code, &error, message),
        body,
    })
}

/// Adds what to do next where the daemon's message does not say it (or says it for
/// the API rather than the command line).
fn hint(code: StatusCode, error: &serde_json::Value, message: String) -> String {
    match code {
        StatusCode::UNAUTHORIZED => format!(
            "{message}\n(the client sends the token from --token-file, or from api.token_file with --config)"
        ),
        StatusCode::CONFLICT if error["kind"] == "busy" => busy(error),
        _ => message,
    }
}

/// A 409 `busy`: which service still had work in flight, what its drain probe answered,
/// and the two ways on. The daemon's own message speaks of `?force=true`; on the
/// command line that is `--force`.
fn busy(error: &serde_json::Value) -> String {
    let service = error["service"].as_str().unwrap_or("a service");
    let answer = match &error["answer"] {
        serde_json::Value::Null => "nothing".to_owned(),
        answer => answer.to_string(),
    };
    format!(
        "{service} is busy: its work in flight did not end within its drain timeout, so it was left as it was (the daemon tries again later)\n  its drain probe answered: {answer}\n  retry later, or add --force to skip draining (its work in flight is lost)"
    )
}

/// The URL of a daemon listening on `addr`: a wildcard address is reached on loopback.
fn url_of(addr: std::net::SocketAddr) -> Result<Url, ClientError> {
    if addr.port() == 0 {
        return Err(ClientError::Setup(format!(
            "the config's api.listen {addr} picks a free port at start: give the daemon's --url"
        )));
    }
    let ip = match addr.ip() {
        std::net::IpAddr::V4(ip) if ip.is_unspecified() => std::net::Ipv4Addr::LOCALHOST.into(),
        std::net::IpAddr::V6(ip) if ip.is_unspecified() => std::net::Ipv6Addr::LOCALHOST.into(),
        ip => ip,
    };
    let addr = std::net::SocketAddr::new(ip, addr.port());
    Url::parse(&format!("http://{addr}"))
        .map_err(|e| ClientError::Setup(format!("api.listen {addr} gives no URL: {e}")))
}

fn read_token(path: &Path) -> Result<String, ClientError> {
    let token = std::fs::read_to_string(path).map_err(|e| {
        ClientError::Setup(format!(
            "cannot read the token file {}: {e}",
            path.display()
        ))
    })?;
    Ok(token.trim().to_owned())
}

/// `gpu-manager status`: prints the status (stdout) or the error (stderr); its exit code.
pub async fn run_status(client: Result<Client, ClientError>, json: bool) -> ExitCode {
    let result = match client {
        Ok(client) => client.status(json).await,
        Err(error) => Err(error),
    };
    finish(result.map(|text| (true, text)), json)
}

/// `gpu-manager phase|start|stop`: runs the transition to its exit code, printing its
/// progress and report (stdout) or the error (stderr).
pub async fn run_transition(
    client: Result<Client, ClientError>,
    request: Request,
    force: bool,
    json: bool,
) -> ExitCode {
    let result = match client {
        Ok(client) => {
            client
                .transition(&request, force, json, |line| println!("{line}"))
                .await
        }
        Err(error) => Err(error),
    };
    finish(result.map(|text| (true, text)), json)
}

/// `gpu-manager can-fit MB`: exit 0 when MB fit now, 1 when not (or refused), 2 when
/// the daemon cannot be reached.
pub async fn run_can_fit(
    client: Result<Client, ClientError>,
    mb: u64,
    priority: Option<i64>,
    json: bool,
) -> ExitCode {
    let result = match client {
        Ok(client) => client.can_fit(mb, priority, json).await,
        Err(error) => Err(error),
    };
    finish(result, json)
}

/// `gpu-manager forget NAME`: through the daemon when it answers; when it cannot be
/// reached and `config` is given, in `state_dir/footprints.json` directly, saying so.
pub async fn run_forget(
    client: Result<Client, ClientError>,
    config: Option<&Path>,
    name: &str,
    json: bool,
) -> ExitCode {
    let result = match client {
        Ok(client) => match (client.forget(name, json).await, config) {
            (Err(ClientError::Unreachable { url, .. }), Some(config)) => {
                forget_in_file(config, name, json).map(|text| {
                    let note = format!("gpu-manager does not answer at {url}: edited the file directly; a daemon running elsewhere with this state_dir keeps what it learned in memory");
                    if json {
                        eprintln!("{note}");
                        text
                    } else {
                        format!("{note}\n{text}")
                    }
                })
            }
            (result, _) => result,
        },
        Err(error) => Err(error),
    };
    finish(result.map(|text| (true, text)), json)
}

/// Resets what was learned of `name` in the file of the config's `state_dir`.
fn forget_in_file(config: &Path, name: &str, json: bool) -> Result<String, ClientError> {
    let config = Config::load(config).map_err(|e| ClientError::Setup(e.to_string()))?;
    let service = ServiceName::parse(name)
        .ok()
        .filter(|n| config.inventory.get(n).is_some())
        .ok_or_else(|| {
            let known: Vec<String> = config
                .inventory
                .names()
                .iter()
                .map(|n| n.to_string())
                .collect();
            ClientError::Setup(format!(
                "unknown service {name:?}: known services are {}",
                known.join(", ")
            ))
        })?;
    let mut footprints = Footprints::load(&config.state_dir, &config.inventory)
        .map_err(|e| ClientError::Setup(e.to_string()))?;
    let forgotten = Forgotten {
        service: service.to_string(),
        forgotten: footprints.forget(&service),
    };
    footprints
        .save()
        .map_err(|e| ClientError::Setup(e.to_string()))?;
    if json {
        let body = serde_json::to_string(&forgotten).expect("a forget answer serializes");
        return Ok(format!("{body}\n"));
    }
    let whence = format!("forgot in {}", footprints.path().display());
    Ok(render::forgotten(&forgotten, &whence))
}

/// Prints a command's answer (stdout) or error (stderr; with `--json` the daemon's error
/// body also goes to stdout) and gives its exit code: 0 for a yes, 1 for a no.
fn finish(result: Result<(bool, String), ClientError>, json: bool) -> ExitCode {
    match result {
        Ok((yes, text)) => {
            print!("{text}");
            if yes {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(error) => {
            if let (true, ClientError::Refused { body, .. }) = (json, &error) {
                println!("{body}");
            }
            eprintln!("{error}");
            error.exit_code()
        }
    }
}
