//! `services.NAME.park` and `services.NAME.drain` (docs/ARCHITECTURE.md, "Parking and
//! draining"): how a service gives its VRAM back while it keeps running, and how the
//! daemon knows it has no work in flight before a stop or a park.

use std::time::Duration;

use serde::Deserialize;

/// A parked http service still holds this much until its residual is observed: ComfyUI
/// keeps 1-2 GB after `POST /free`.
const DEFAULT_HTTP_RESIDUAL_MB: u64 = 1024;
const DEFAULT_PARK_TIMEOUT_MS: u64 = 30_000;
const DEFAULT_DRAIN_TIMEOUT_MS: u64 = 600_000;
const HTTP_METHODS: [&str; 5] = ["GET", "POST", "PUT", "PATCH", "DELETE"];

/// How a service parks: gives its VRAM back while its process or container lives on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParkSpec {
    pub method: ParkMethod,
    /// What it still holds while parked, until a park has been observed.
    pub residual_mb: u64,
    /// How long the GPU may take to show it down to its residual; then it is stopped.
    pub timeout: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParkMethod {
    /// A request that releases VRAM (ComfyUI `POST /free`, vLLM `POST /sleep`), and one
    /// that brings it back (vLLM `POST /wake_up`); without it, it reloads on first use.
    Http {
        park: HttpRequest,
        resume: Option<HttpRequest>,
    },
    /// Unload every model through the Ollama API at this base URL (`keep_alive: 0`);
    /// it loads them again on first use.
    Ollama { url: String },
    /// The CUDA driver's checkpoint API moves the process's device memory to host RAM
    /// and back (driver 570 and later).
    CudaCheckpoint,
}

impl ParkMethod {
    pub fn kind(&self) -> &'static str {
        match self {
            ParkMethod::Http { .. } => "http",
            ParkMethod::Ollama { .. } => "ollama",
            ParkMethod::CudaCheckpoint => "cuda-checkpoint",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpRequest {
    pub method: String,
    pub url: String,
    pub body: Option<String>,
}

/// How to tell that a service has work in flight.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DrainSpec {
    /// Answers JSON to a GET.
    pub url: String,
    /// JSON pointers (RFC 6901): busy while any is a non-empty array, true, a non-zero
    /// number or a non-empty string or object.
    pub busy_if: Vec<String>,
    /// Still busy after this long: the stop or park is refused (409 `busy`).
    pub timeout: Duration,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPark {
    kind: RawParkKind,
    url: Option<String>,
    method: Option<String>,
    body: Option<String>,
    resume_url: Option<String>,
    resume_method: Option<String>,
    resume_body: Option<String>,
    residual_mb: Option<u64>,
    timeout_ms: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case")]
enum RawParkKind {
    Http,
    Ollama,
    CudaCheckpoint,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDrain {
    url: String,
    busy_if: Vec<String>,
    timeout_ms: Option<u64>,
}

/// A park or drain key that is not valid: the key (under the service) and why.
pub(super) struct Invalid {
    pub key: &'static str,
    pub message: String,
}

fn invalid(key: &'static str, message: String) -> Invalid {
    Invalid { key, message }
}

pub(super) fn parse_park(service: &str, raw: RawPark) -> Result<ParkSpec, Invalid> {
    let at = |key: &str| format!("services.{service}.park.{key}");
    let refuse_extra = |keys: &[(&'static str, bool)], kind: &str| {
        keys.iter().find(|(_, present)| *present).map(|(key, _)| {
            invalid(
                "park",
                format!("{} does not apply to kind: {kind}", at(key)),
            )
        })
    };
    let resume_keys = [
        ("resume_url", raw.resume_url.is_some()),
        ("resume_method", raw.resume_method.is_some()),
        ("resume_body", raw.resume_body.is_some()),
        ("method", raw.method.is_some()),
        ("body", raw.body.is_some()),
    ];
    let (method, default_residual) = match raw.kind {
        RawParkKind::Http => {
            let url = raw.url.ok_or_else(|| {
                invalid(
                    "park",
                    format!("{} is missing: give the request that releases its VRAM, e.g. \"http://127.0.0.1:8188/free\"", at("url")),
                )
            })?;
            let park = http_request([&at("url"), &at("method")], url, raw.method, raw.body)?;
            let resume = match raw.resume_url {
                Some(url) => Some(http_request(
                    [&at("resume_url"), &at("resume_method")],
                    url,
                    raw.resume_method,
                    raw.resume_body,
                )?),
                None => {
                    if let Some(extra) = refuse_extra(&resume_keys[1..3], "http without resume_url")
                    {
                        return Err(extra);
                    }
                    None
                }
            };
            (ParkMethod::Http { park, resume }, DEFAULT_HTTP_RESIDUAL_MB)
        }
        RawParkKind::Ollama => {
            if let Some(extra) = refuse_extra(&resume_keys, "ollama") {
                return Err(extra);
            }
            let url = raw.url.ok_or_else(|| {
                invalid(
                    "park",
                    format!("{} is missing: give the Ollama API base URL, e.g. \"http://localhost:11434\"", at("url")),
                )
            })?;
            check_http_url(&at("url"), &url)?;
            (ParkMethod::Ollama { url }, 0)
        }
        RawParkKind::CudaCheckpoint => {
            let mut keys = resume_keys.to_vec();
            keys.push(("url", raw.url.is_some()));
            if let Some(extra) = refuse_extra(&keys, "cuda-checkpoint") {
                return Err(extra);
            }
            (ParkMethod::CudaCheckpoint, 0)
        }
    };
    let timeout_ms = raw.timeout_ms.unwrap_or(DEFAULT_PARK_TIMEOUT_MS);
    if timeout_ms == 0 {
        return Err(invalid(
            "park",
            format!(
                "{} is 0: give how long the GPU may take to show it parked, in milliseconds",
                at("timeout_ms")
            ),
        ));
    }
    Ok(ParkSpec {
        method,
        residual_mb: raw.residual_mb.unwrap_or(default_residual),
        timeout: Duration::from_millis(timeout_ms),
    })
}

/// `keys`: the full names of the URL's key and of its method's, for the errors.
fn http_request(
    [url_key, method_key]: [&str; 2],
    url: String,
    method: Option<String>,
    body: Option<String>,
) -> Result<HttpRequest, Invalid> {
    check_http_url(url_key, &url)?;
    let method = method.unwrap_or_else(|| "POST".to_owned());
    if !HTTP_METHODS.contains(&method.as_str()) {
        return Err(invalid(
            "park",
            format!(
                "{method_key} {method:?} is not one of {}",
                HTTP_METHODS.join(", ")
            ),
        ));
    }
    Ok(HttpRequest { method, url, body })
}

fn check_http_url(key: &str, url: &str) -> Result<(), Invalid> {
    if url.starts_with("http://") || url.starts_with("https://") {
        Ok(())
    } else {
        Err(invalid(
            "park",
            format!("{key} {url:?} is not an http(s) URL"),
        ))
    }
}

pub(super) fn parse_drain(service: &str, raw: RawDrain) -> Result<DrainSpec, Invalid> {
    let at = |key: &str| format!("services.{service}.drain.{key}");
    if !(raw.url.starts_with("http://") || raw.url.starts_with("https://")) {
        return Err(invalid(
            "drain",
            format!("{} {:?} is not an http(s) URL", at("url"), raw.url),
        ));
    }
    if raw.busy_if.is_empty() {
        return Err(invalid(
            "drain",
            format!("{} is empty: list JSON pointers into the answer, e.g. [\"/queue_running\", \"/queue_pending\"]", at("busy_if")),
        ));
    }
    if let Some(bad) = raw
        .busy_if
        .iter()
        .find(|p| !p.is_empty() && !p.starts_with('/'))
    {
        return Err(invalid(
            "drain",
            format!(
                "{} {bad:?} is not a JSON pointer: it starts with '/', e.g. \"/{bad}\"",
                at("busy_if")
            ),
        ));
    }
    let timeout_ms = raw.timeout_ms.unwrap_or(DEFAULT_DRAIN_TIMEOUT_MS);
    if timeout_ms == 0 {
        return Err(invalid(
            "drain",
            format!("{} is 0: give how long to wait for its work to end, in milliseconds; or use ?force=true to skip draining", at("timeout_ms")),
        ));
    }
    Ok(DrainSpec {
        url: raw.url,
        busy_if: raw.busy_if,
        timeout: Duration::from_millis(timeout_ms),
    })
}

/// `evict:` and `evict_url:` gave way to `park: {kind: ollama}`: the refusal shows the
/// new form, with the old URL in it.
pub(super) fn evict_migration(service: &str, evict_url: Option<&str>) -> String {
    let url = evict_url.unwrap_or("http://localhost:11434");
    format!(
        "services.{service}.evict and evict_url were replaced by park: write\n    park: {{kind: ollama, url: \"{url}\"}}\ninstead (README, \"Migrating from evict\")"
    )
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::time::Duration;

    use super::*;
    use crate::config::{Config, ConfigError};

    /// A config with one native service `vidi` whose last lines are `extra` (indented
    /// under the service).
    fn parse(extra: &str) -> Result<Config, ConfigError> {
        let text = format!(
            "services:\n  vidi:\n    kind: native\n    command: [\"vidi\"]\n    vram_mb: 4096\n    priority: 40\n    phases: [2]\n{extra}"
        );
        Config::parse(Path::new("/etc/gpu/config.yaml"), &text)
    }

    fn park_of(extra: &str) -> ParkSpec {
        let config = parse(extra).unwrap_or_else(|e| panic!("{extra}: {e}"));
        config
            .inventory
            .find("vidi")
            .unwrap()
            .park
            .clone()
            .expect("park")
    }

    fn drain_of(extra: &str) -> DrainSpec {
        let config = parse(extra).unwrap_or_else(|e| panic!("{extra}: {e}"));
        config
            .inventory
            .find("vidi")
            .unwrap()
            .drain
            .clone()
            .expect("drain")
    }

    /// The line of the error and its message.
    fn refusal(extra: &str) -> (usize, String) {
        match parse(extra) {
            Err(ConfigError::Invalid { line, message, .. }) => (line, message),
            other => panic!("{extra} should be refused, got {other:?}"),
        }
    }

    #[test]
    fn http_parks_default_to_post_a_1024_mb_residual_and_30_s() {
        let spec = park_of("    park: { kind: http, url: \"http://127.0.0.1:8188/free\" }\n");
        assert_eq!(spec.residual_mb, 1024);
        assert_eq!(spec.timeout, Duration::from_millis(30_000));
        assert_eq!(
            spec.method,
            ParkMethod::Http {
                park: HttpRequest {
                    method: "POST".into(),
                    url: "http://127.0.0.1:8188/free".into(),
                    body: None,
                },
                resume: None,
            }
        );
        assert_eq!(spec.method.kind(), "http");

        let spec = park_of(
            "    park:\n      kind: http\n      url: \"http://127.0.0.1:8000/sleep?level=1\"\n      body: '{}'\n      resume_url: \"http://127.0.0.1:8000/wake_up\"\n      residual_mb: 300\n      timeout_ms: 5000\n",
        );
        assert_eq!(spec.residual_mb, 300);
        assert_eq!(spec.timeout, Duration::from_millis(5000));
        let ParkMethod::Http { park, resume } = spec.method else {
            panic!("an http park");
        };
        assert_eq!(park.body.as_deref(), Some("{}"));
        let resume = resume.expect("a resume request");
        assert_eq!(
            (resume.method.as_str(), resume.url.as_str(), resume.body),
            ("POST", "http://127.0.0.1:8000/wake_up", None)
        );
    }

    #[test]
    fn ollama_and_cuda_checkpoint_parks_default_to_no_residual() {
        let spec = park_of("    park: { kind: ollama, url: \"http://localhost:11434\" }\n");
        assert_eq!(
            spec.method,
            ParkMethod::Ollama {
                url: "http://localhost:11434".into()
            }
        );
        assert_eq!((spec.residual_mb, spec.method.kind()), (0, "ollama"));
        let spec = park_of("    park: { kind: cuda-checkpoint }\n");
        assert_eq!(spec.method, ParkMethod::CudaCheckpoint);
        assert_eq!(spec.residual_mb, 0);
        assert_eq!(spec.timeout, Duration::from_millis(30_000));
    }

    #[test]
    fn bad_park_kinds_urls_and_methods_are_refused_naming_the_key() {
        let (line, message) = refusal("    park: { kind: sleep, url: \"http://x/free\" }\n");
        assert_eq!(line, 8, "{message}");
        assert!(
            message.contains("services.vidi.park.kind") && message.contains("cuda-checkpoint"),
            "{message}"
        );
        let (line, message) = refusal("    park: { kind: http, url: \"localhost:8188/free\" }\n");
        assert_eq!(line, 8, "{message}");
        assert!(
            message
                .contains("services.vidi.park.url \"localhost:8188/free\" is not an http(s) URL"),
            "{message}"
        );
        let (_, message) = refusal("    park: { kind: http }\n");
        assert!(
            message.contains("services.vidi.park.url is missing"),
            "{message}"
        );
        let (_, message) = refusal("    park: { kind: ollama }\n");
        assert!(
            message.contains("services.vidi.park.url is missing"),
            "{message}"
        );
        let (_, message) =
            refusal("    park: { kind: http, url: \"http://x/free\", method: FETCH }\n");
        assert!(
            message.contains("services.vidi.park.method \"FETCH\" is not one of GET, POST"),
            "{message}"
        );
        let (_, message) = refusal(
            "    park: { kind: http, url: \"http://x/sleep\", resume_url: \"http://x/wake\", resume_method: get }\n",
        );
        assert!(
            message.contains("services.vidi.park.resume_method \"get\""),
            "{message}"
        );
        let (_, message) =
            refusal("    park: { kind: http, url: \"http://x/free\", resume_body: \"{}\" }\n");
        assert!(
            message.contains("services.vidi.park.resume_body does not apply")
                && message.contains("without resume_url"),
            "{message}"
        );
        let (_, message) =
            refusal("    park: { kind: http, url: \"http://x/free\", timeout_ms: 0 }\n");
        assert!(
            message.contains("services.vidi.park.timeout_ms is 0"),
            "{message}"
        );
        let (_, message) =
            refusal("    park: { kind: http, url: \"http://x/free\", residual: 10 }\n");
        assert!(message.contains("residual"), "an unknown key: {message}");
        let (_, message) =
            refusal("    park: { kind: http, url: \"http://x/free\", residual_mb: 5000 }\n");
        assert!(
            message.contains("services.vidi.park.residual_mb 5000 is above vram_mb 4096"),
            "{message}"
        );
    }

    #[test]
    fn cuda_checkpoint_and_ollama_refuse_the_http_keys() {
        for key in [
            "url: \"http://x/free\"",
            "resume_url: \"http://x/wake\"",
            "method: POST",
            "body: x",
        ] {
            let (line, message) =
                refusal(&format!("    park: {{ kind: cuda-checkpoint, {key} }}\n"));
            let name = key.split(':').next().unwrap();
            assert_eq!(line, 8, "{message}");
            assert!(
                message.contains(&format!(
                    "services.vidi.park.{name} does not apply to kind: cuda-checkpoint"
                )),
                "{key}: {message}"
            );
        }
        let (_, message) = refusal(
            "    park: { kind: ollama, url: \"http://localhost:11434\", resume_url: \"http://x/wake\" }\n",
        );
        assert!(
            message.contains("services.vidi.park.resume_url does not apply to kind: ollama"),
            "{message}"
        );
    }

    #[test]
    fn drains_default_to_ten_minutes_and_refuse_bad_urls_and_pointers() {
        let spec = drain_of(
            "    drain: { url: \"http://127.0.0.1:8188/queue\", busy_if: [\"/queue_running\", \"\"] }\n",
        );
        assert_eq!(spec.timeout, Duration::from_millis(600_000));
        assert_eq!(
            spec.busy_if,
            ["/queue_running", ""],
            "\"\" is the whole answer"
        );
        let (line, message) =
            refusal("    drain: { url: \"http://x/queue\", busy_if: [\"queue_running\"] }\n");
        assert_eq!(line, 8, "{message}");
        assert!(
            message.contains("services.vidi.drain.busy_if \"queue_running\" is not a JSON pointer")
                && message.contains("\"/queue_running\""),
            "{message}"
        );
        let (_, message) = refusal("    drain: { url: \"http://x/queue\", busy_if: [] }\n");
        assert!(
            message.contains("services.vidi.drain.busy_if is empty"),
            "{message}"
        );
        let (_, message) = refusal("    drain: { url: \"x/queue\", busy_if: [\"/a\"] }\n");
        assert!(
            message.contains("services.vidi.drain.url \"x/queue\" is not an http(s) URL"),
            "{message}"
        );
        let (_, message) =
            refusal("    drain: { url: \"http://x/queue\", busy_if: [\"/a\"], timeout_ms: 0 }\n");
        assert!(
            message.contains("services.vidi.drain.timeout_ms is 0")
                && message.contains("force=true"),
            "{message}"
        );
    }

    #[test]
    fn evict_keys_are_refused_showing_the_park_form() {
        let (line, message) =
            refusal("    evict: ollama\n    evict_url: \"http://gpu-box:11434\"\n");
        assert_eq!(line, 8, "points at evict: {message}");
        assert!(
            message.contains("park: {kind: ollama, url: \"http://gpu-box:11434\"}"),
            "the old URL in the new form: {message}"
        );
        let (line, message) = refusal("    evict_url: \"http://10.0.0.2:11434\"\n");
        assert_eq!(line, 8, "{message}");
        assert!(
            message.contains("park: {kind: ollama, url: \"http://10.0.0.2:11434\"}"),
            "{message}"
        );
        let (_, message) = refusal("    evict: ollama\n");
        assert!(
            message.contains("park: {kind: ollama, url: \"http://localhost:11434\"}"),
            "{message}"
        );
    }
}
