//! The HTTP API (warp). Reads are served from the reconciler's latest snapshot, never
//! from a blocking NVML call; changes are sent to the reconciler, which rewrites the
//! desired-state file and answers when it has converged (or failed).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use futures_util::StreamExt;
use serde::Deserialize;
use tokio::sync::oneshot;
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;
use tokio_stream::wrappers::BroadcastStream;
use warp::http::StatusCode;
use warp::reply::{Reply, Response};
use warp::{Filter, Rejection};

use crate::config::{ApiConfig, Phase, ServiceName};
use crate::reconcile::{Command, ReconcilerHandle};
use crate::reload::{ReloadTrigger, RemovedServices};
use crate::status::DaemonEvent;
use crate::transition::{Change, TransitionError};

mod status_cache;
use status_cache::StatusCache;

/// Requests carry no body; anything larger than this is refused.
const MAX_BODY_BYTES: u64 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("refusing to listen on {addr}: it is not a loopback address and api.token_file is not set; set a token or listen on 127.0.0.1")]
    UnsafeListen { addr: SocketAddr },
    #[error("cannot read api.token_file {path}: {source}")]
    Token {
        path: String,
        source: std::io::Error,
    },
    #[error("api.token_file {path} is empty: put a secret token in it")]
    EmptyToken { path: String },
    #[error(
        "cannot listen on {addr}: {source} (is another gpu-manager running? change api.listen)"
    )]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// The bearer token POSTs need, if one is configured.
#[derive(Clone)]
pub struct Auth {
    token: Option<Arc<Vec<u8>>>,
}

impl Auth {
    /// Reads the token and enforces the listen rule: no token, loopback only.
    pub fn from_config(api: &ApiConfig) -> Result<Self, ApiError> {
        let token = match &api.token_file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ApiError::Token {
                    path: path.display().to_string(),
                    source,
                })?;
                let token = text.trim().as_bytes().to_vec();
                if token.is_empty() {
                    return Err(ApiError::EmptyToken {
                        path: path.display().to_string(),
                    });
                }
                Some(Arc::new(token))
            }
            None => None,
        };
        if token.is_none() && !api.listen.ip().is_loopback() {
            return Err(ApiError::UnsafeListen { addr: api.listen });
        }
        Ok(Self { token })
    }

    fn allows(&self, header: Option<&str>) -> bool {
        let Some(expected) = &self.token else {
            return true;
        };
        let given = header
            .and_then(|h| h.strip_prefix("Bearer "))
            .unwrap_or("")
            .as_bytes();
        constant_time_eq(given, expected)
    }
}

/// Compares without stopping at the first difference, so timing reveals nothing of the
/// token but its length.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// `POST /gpu/reload?keep_removed=true`.
#[derive(Debug, Deserialize)]
struct ReloadQuery {
    keep_removed: Option<bool>,
}

#[derive(Debug, Deserialize)]
struct WaitQuery {
    wait: Option<bool>,
    /// `?force=true` skips draining: work in flight may be lost (docs/openapi.json).
    force: Option<bool>,
}

/// `POST /gpu/service/{name}/claim?holder=H&ttl_s=N` and `.../release?holder=H`.
#[derive(Debug, Deserialize)]
struct ClaimQuery {
    holder: Option<String>,
    ttl_s: Option<String>,
    wait: Option<bool>,
}

#[derive(Debug, Deserialize)]
struct PlanQuery {
    phase: Option<Phase>,
    start: Option<String>,
    stop: Option<String>,
}

#[derive(Debug, Deserialize)]
struct CanFitQuery {
    mb: Option<String>,
    priority: Option<String>,
}

/// A rejection carrying an error reply (the reply is built in `recover`).
#[derive(Debug)]
struct Refused(TransitionError);
impl warp::reject::Reject for Refused {}

#[derive(Debug)]
struct Unauthorized;
impl warp::reject::Reject for Unauthorized {}

/// All routes.
pub fn routes(
    handle: ReconcilerHandle,
    auth: Auth,
) -> impl Filter<Extract = (Response,), Error = Infallible> + Clone {
    let cache = StatusCache::new(handle.status.clone());
    let counters = crate::metrics::Counters::start(&handle.feed);
    let extra = crate::web::routes(&handle);
    let with_handle = warp::any().map(move || handle.clone());
    let authorized = warp::header::optional::<String>("authorization")
        .and(warp::any().map(move || auth.clone()))
        .and_then(|header: Option<String>, auth: Auth| async move {
            if auth.allows(header.as_deref()) {
                Ok(())
            } else {
                Err(warp::reject::custom(Unauthorized))
            }
        })
        .untuple_one();
    let post_plain = warp::post().and(authorized).and(bounded_body());
    let post = post_plain.clone().and(warp::query::<WaitQuery>());

    let status = warp::path!("gpu" / "status").and(warp::get()).map(move || {
        warp::reply::with_header(cache.body(), "content-type", "application/json").into_response()
    });
    let phase = warp::path!("gpu" / "prepare-phase" / String)
        .and(post.clone())
        .and(with_handle.clone())
        .and_then(|phase: String, query: WaitQuery, handle| async move {
            let phase = phase.parse::<Phase>().map_err(|_| {
                warp::reject::custom(Refused(TransitionError::BadRequest {
                    detail: format!("phase {phase:?} is not a number"),
                }))
            })?;
            transition(handle, Change::Phase(phase), query).await
        });
    let start = warp::path!("gpu" / "service" / String / "start")
        .and(post.clone())
        .and(with_handle.clone())
        .and_then(|name: String, query: WaitQuery, handle| async move {
            let change = Change::Start(service_name(&name, &handle)?);
            transition(handle, change, query).await
        });
    let stop = warp::path!("gpu" / "service" / String / "stop")
        .and(post)
        .and(with_handle.clone())
        .and_then(|name: String, query: WaitQuery, handle| async move {
            let change = Change::Stop(service_name(&name, &handle)?);
            transition(handle, change, query).await
        });
    let claim = warp::path!("gpu" / "service" / String / "claim")
        .and(post_plain.clone())
        .and(warp::query::<ClaimQuery>())
        .and(with_handle.clone())
        .and_then(|name: String, query: ClaimQuery, handle| async move {
            let service = service_name(&name, &handle)?;
            let claim = crate::claim_request::claim(service, query.holder, query.ttl_s)
                .map_err(|e| warp::reject::custom(Refused(e)))?;
            let wait = WaitQuery {
                wait: query.wait,
                force: None,
            };
            transition(handle, Change::Claim(claim), wait).await
        });
    let release = warp::path!("gpu" / "service" / String / "release")
        .and(post_plain.clone())
        .and(warp::query::<ClaimQuery>())
        .and(with_handle.clone())
        .and_then(|name: String, query: ClaimQuery, handle| async move {
            let service = service_name(&name, &handle)?;
            let holder = crate::claim_request::holder(query.holder)
                .map_err(|e| warp::reject::custom(Refused(e)))?;
            let wait = WaitQuery {
                wait: query.wait,
                force: None,
            };
            transition(handle, Change::Release { service, holder }, wait).await
        });
    let reload = warp::path!("gpu" / "reload")
        .and(post_plain.clone())
        .and(warp::query::<ReloadQuery>())
        .and(with_handle.clone())
        .and_then(|query: ReloadQuery, handle| async move {
            let removed = match query.keep_removed.unwrap_or(false) {
                true => RemovedServices::Keep,
                false => RemovedServices::Stop,
            };
            let trigger = ReloadTrigger::Api;
            let report = ask(&handle, |reply| Command::Reload {
                removed,
                trigger,
                reply,
            })
            .await?;
            Ok::<_, Rejection>(warp::reply::json(&report).into_response())
        });
    let forget = warp::path!("gpu" / "service" / String / "forget")
        .and(post_plain)
        .and(with_handle.clone())
        .and_then(|name: String, handle| async move {
            let service = service_name(&name, &handle)?;
            let forgotten = ask(&handle, |reply| Command::Forget { service, reply }).await?;
            Ok::<_, Rejection>(warp::reply::json(&forgotten).into_response())
        });
    let plan = warp::path!("gpu" / "plan")
        .and(warp::get())
        .and(warp::query::<PlanQuery>())
        .and(with_handle.clone())
        .and_then(plan);
    let can_fit = warp::path!("gpu" / "can-fit")
        .and(warp::get())
        .and(warp::query::<CanFitQuery>())
        .and(with_handle.clone())
        .and_then(can_fit);
    let events = warp::path!("gpu" / "events")
        .and(warp::get())
        .and(with_handle.clone())
        .map(|handle: ReconcilerHandle| {
            let stream =
                BroadcastStream::new(handle.feed.subscribe()).filter_map(|event| async move {
                    // A client that fell behind is told how much it missed, not left to
                    // believe it saw everything.
                    let event = event.unwrap_or_else(|BroadcastStreamRecvError::Lagged(missed)| {
                        DaemonEvent::Lagged { missed }
                    });
                    let sse = warp::sse::Event::default().json_data(&event).ok()?;
                    Some(Ok::<_, Infallible>(sse))
                });
            warp::sse::reply(warp::sse::keep_alive().stream(stream)).into_response()
        });
    let metrics_counters = counters.clone();
    let metrics = warp::path!("metrics")
        .and(warp::get())
        .and(with_handle)
        .map(move |handle: ReconcilerHandle| {
            // A copy, so that the loop's next snapshot never waits for the rendering.
            let status = handle.status.borrow().clone();
            let mut text = crate::metrics::render(&status, &metrics_counters);
            text.push_str(&crate::metrics::render_proxy(&handle.traffic));
            warp::reply::with_header(text, "content-type", "text/plain; version=0.0.4")
                .into_response()
        });
    let healthz = warp::path!("healthz")
        .and(warp::get())
        .map(|| warp::reply::json(&serde_json::json!({"ok": true})).into_response());

    let api = status
        .or(phase)
        .unify()
        .or(start)
        .unify()
        .or(stop)
        .unify()
        .or(claim)
        .unify()
        .or(release)
        .unify()
        .or(forget)
        .unify()
        .or(reload)
        .unify()
        .or(plan)
        .unify()
        .or(can_fit)
        .unify()
        .or(events)
        .unify()
        .or(metrics)
        .unify()
        .or(healthz)
        .unify()
        .or(extra)
        .unify()
        .recover(move |rejection| recover(rejection, counters.clone()))
        .unify();
    warp::path::full()
        .and(api)
        .map(crate::web::with_allow_header)
}

/// Refuses a declared body over [`MAX_BODY_BYTES`]; unlike warp's
/// `content_length_limit` it accepts requests without Content-Length (`curl -X POST`).
fn bounded_body() -> impl Filter<Extract = (), Error = Rejection> + Clone {
    warp::header::optional::<u64>("content-length")
        .and_then(|length: Option<u64>| async move {
            match length {
                Some(length) if length > MAX_BODY_BYTES => {
                    Err(warp::reject::custom(Refused(TransitionError::BadRequest {
                        detail: format!(
                            "request body of {length} bytes refused: these endpoints take no body"
                        ),
                    })))
                }
                _ => Ok(()),
            }
        })
        .untuple_one()
}

/// A path segment as a service name: 404 without touching anything when it is not one.
fn service_name(raw: &str, handle: &ReconcilerHandle) -> Result<ServiceName, Rejection> {
    let known: Vec<String> = handle.status.borrow().services.keys().cloned().collect();
    match ServiceName::parse(raw) {
        Ok(name) if known.iter().any(|k| k == name.as_str()) => Ok(name),
        _ => Err(warp::reject::custom(Refused(
            TransitionError::UnknownService {
                name: raw.chars().take(64).collect(),
                known,
            },
        ))),
    }
}

async fn ask<T>(
    handle: &ReconcilerHandle,
    command: impl FnOnce(oneshot::Sender<Result<T, TransitionError>>) -> Command,
) -> Result<T, Rejection> {
    let (reply, answer) = oneshot::channel();
    // The reconcile loop ends only when the daemon shuts down.
    let down = || warp::reject::custom(Refused(TransitionError::shutting_down()));
    handle
        .commands
        .send(command(reply))
        .await
        .map_err(|_| down())?;
    answer
        .await
        .map_err(|_| down())?
        .map_err(|e| warp::reject::custom(Refused(e)))
}

async fn transition(
    handle: ReconcilerHandle,
    change: Change,
    query: WaitQuery,
) -> Result<Response, Rejection> {
    let wait = query.wait.unwrap_or(true);
    let force = query.force.unwrap_or(false);
    let report = ask(&handle, |reply| Command::Transition {
        change,
        wait,
        force,
        reply,
    })
    .await?;
    let code = if report.accepted_only {
        StatusCode::ACCEPTED
    } else {
        StatusCode::OK
    };
    Ok(warp::reply::with_status(warp::reply::json(&report), code).into_response())
}

async fn plan(query: PlanQuery, handle: ReconcilerHandle) -> Result<Response, Rejection> {
    let change = match (query.phase, query.start, query.stop) {
        (Some(phase), None, None) => Some(Change::Phase(phase)),
        (None, Some(name), None) => Some(Change::Start(service_name(&name, &handle)?)),
        (None, None, Some(name)) => Some(Change::Stop(service_name(&name, &handle)?)),
        (None, None, None) => None,
        _ => {
            return Err(warp::reject::custom(Refused(TransitionError::BadRequest {
                detail: "give at most one of ?phase=N, ?start=NAME, ?stop=NAME".into(),
            })))
        }
    };
    let plan = ask(&handle, |reply| Command::Plan { change, reply }).await?;
    let text = crate::plan::render(&plan);
    Ok(warp::reply::json(&serde_json::json!({ "plan": plan, "text": text })).into_response())
}

/// `GET /gpu/can-fit`: answered from the latest snapshot, without asking the reconciler.
async fn can_fit(query: CanFitQuery, handle: ReconcilerHandle) -> Result<Response, Rejection> {
    let (mb, priority) =
        crate::can_fit::parse_query(query.mb.as_deref(), query.priority.as_deref()).map_err(
            |detail| warp::reject::custom(Refused(TransitionError::BadRequest { detail })),
        )?;
    let status = handle.status.borrow().clone();
    let answer = crate::can_fit::can_fit(&status, mb, priority);
    Ok(warp::reply::json(&answer).into_response())
}

/// Every error as JSON `{"error": ..., "kind": ...}` with the status the contract names:
/// clients branch on `kind`, routing and authorization errors included.
async fn recover(
    rejection: Rejection,
    counters: Arc<crate::metrics::Counters>,
) -> Result<Response, Infallible> {
    let (code, body) = if let Some(Refused(error)) = rejection.find::<Refused>() {
        (
            StatusCode::from_u16(error.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            error.body(),
        )
    } else if rejection.find::<Unauthorized>().is_some() {
        (
            StatusCode::UNAUTHORIZED,
            serde_json::json!({"error": "this request needs the API token: send Authorization: Bearer <token from api.token_file>", "kind": "unauthorized"}),
        )
    } else if rejection.is_not_found() {
        (
            StatusCode::NOT_FOUND,
            serde_json::json!({"error": "no such endpoint: see GET /gpu/status, POST /gpu/prepare-phase/N, POST /gpu/service/NAME/start|stop|claim|release|forget, POST /gpu/reload, GET /gpu/plan, GET /gpu/can-fit?mb=N, GET /gpu/events, GET /metrics", "kind": "no_such_endpoint"}),
        )
    } else if rejection.find::<warp::reject::MethodNotAllowed>().is_some() {
        (
            StatusCode::METHOD_NOT_ALLOWED,
            serde_json::json!({"error": "method not allowed: changes are POSTs, reads are GETs", "kind": "method_not_allowed"}),
        )
    } else if rejection.find::<warp::reject::InvalidQuery>().is_some() {
        (
            StatusCode::BAD_REQUEST,
            serde_json::json!({"error": "malformed query: use ?wait=true|false, or ?phase=N / ?start=NAME / ?stop=NAME for /gpu/plan", "kind": "bad_request"}),
        )
    } else {
        (
            StatusCode::BAD_REQUEST,
            serde_json::json!({"error": format!("bad request: {rejection:?}"), "kind": "bad_request"}),
        )
    };
    counters.record_refusal(code.as_u16(), &body);
    Ok(warp::reply::with_status(warp::reply::json(&body), code).into_response())
}

/// Binds the configured address; returns the bound address and the server to run.
/// Binds the API; the server it returns runs until `stop` resolves, then finishes the
/// requests under way (the answers owed to callers of a transition at shutdown).
pub async fn serve(
    handle: ReconcilerHandle,
    api: &ApiConfig,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(SocketAddr, impl std::future::Future<Output = ()>), ApiError> {
    let auth = Auth::from_config(api)?;
    let listener = tokio::net::TcpListener::bind(api.listen)
        .await
        .map_err(|source| ApiError::Bind {
            addr: api.listen,
            source,
        })?;
    let addr = listener.local_addr().unwrap_or(api.listen);
    tracing::info!(%addr, auth = auth.token.is_some(), "API listening");
    Ok((
        addr,
        warp::serve(routes(handle, auth))
            .incoming(listener)
            .graceful(stop)
            .run(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::{now_ms, Status};
    use tokio::sync::watch;

    /// A handle to no loop: the tests play the loop's part.
    fn handle_of(
        commands: tokio::sync::mpsc::Sender<Command>,
        status: watch::Receiver<Status>,
    ) -> ReconcilerHandle {
        let config = crate::config::Config::parse(
            std::path::Path::new("/etc/gpu-manager/config.yaml"),
            "services:\n  vidi: { kind: native, command: [vidi], vram_mb: 1024 }\n",
        )
        .unwrap();
        ReconcilerHandle {
            commands,
            status,
            feed: tokio::sync::broadcast::channel(1).0,
            traffic: Default::default(),
            config: watch::channel(Arc::new(config)).1,
        }
    }

    #[tokio::test]
    async fn status_answers_the_latest_snapshot_with_its_age() {
        let (commands, _received) = tokio::sync::mpsc::channel(1);
        let (snapshots, status) = watch::channel(Status::default());
        let handle = handle_of(commands, status);
        let routes = routes(handle, Auth { token: None });
        let get = || async {
            let reply = warp::test::request()
                .path("/gpu/status")
                .reply(&routes)
                .await;
            assert_eq!(reply.status(), 200);
            assert_eq!(reply.headers()["content-type"], "application/json");
            serde_json::from_slice::<serde_json::Value>(reply.body()).unwrap()
        };
        let first = get().await;
        assert_eq!(first["vram"]["total_mb"], 0);
        assert!(
            first["snapshot_age_ms"].as_u64().unwrap() > 1_000_000,
            "observed at 0"
        );

        let mut next = Status::default();
        next.vram.total_mb = 24576;
        next.observed_at_ms = now_ms();
        snapshots.send_replace(next.clone());
        let body = get().await;
        assert!(body["snapshot_age_ms"].as_u64().unwrap() < 60_000);
        let parsed: Status = serde_json::from_value(body).unwrap();
        assert_eq!(parsed, next, "every field of the new snapshot");
    }

    #[tokio::test]
    async fn routing_and_authorization_errors_carry_a_kind() {
        let (commands, _received) = tokio::sync::mpsc::channel(1);
        let handle = handle_of(commands, watch::channel(Status::default()).1);
        let token = Some(Arc::new(b"s3cret".to_vec()));
        let routes = routes(handle, Auth { token });
        for (method, path, code, kind) in [
            ("POST", "/gpu/prepare-phase/1", 401, "unauthorized"),
            ("GET", "/gpu/nope", 404, "no_such_endpoint"),
            ("DELETE", "/gpu/status", 405, "method_not_allowed"),
            ("GET", "/gpu/prepare-phase/1", 405, "method_not_allowed"),
        ] {
            let reply = warp::test::request()
                .method(method)
                .path(path)
                .reply(&routes)
                .await;
            assert_eq!(reply.status(), code, "{method} {path}");
            let body: serde_json::Value = serde_json::from_slice(reply.body()).unwrap();
            assert_eq!(body["kind"], kind, "{method} {path}: {body}");
            assert!(
                body["error"].as_str().is_some_and(|e| !e.is_empty()),
                "{body}"
            );
        }
    }

    #[test]
    fn token_comparison_is_exact() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
    }

    #[test]
    fn non_loopback_needs_a_token() {
        let api = ApiConfig {
            listen: "0.0.0.0:8000".parse().unwrap(),
            token_file: None,
        };
        assert!(matches!(
            Auth::from_config(&api),
            Err(ApiError::UnsafeListen { .. })
        ));
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        std::fs::write(&token, "s3cret\n").unwrap();
        let auth = Auth::from_config(&ApiConfig {
            listen: "0.0.0.0:8000".parse().unwrap(),
            token_file: Some(token),
        })
        .unwrap();
        assert!(auth.allows(Some("Bearer s3cret")));
        assert!(!auth.allows(Some("Bearer s3cre")));
        assert!(!auth.allows(None));
    }
}
