//! The answers the proxy gives itself, instead of the service's: a refusal from the gate,
//! or a 502 when the upstream could not be asked. Always JSON, always naming the service.

use hyper::body::Bytes;
use hyper::header::{self, HeaderValue};
use hyper::{Response, StatusCode};
use serde_json::{Map, Value};

use super::body::ProxyBody;
use super::upstream::UpstreamError;
use super::{Refusal, Route};
use crate::config::ServiceName;

/// `{"error", "kind", "service", ...detail}` with the refusal's status and `Retry-After`.
pub(super) fn refusal<P>(service: &ServiceName, refusal: Refusal) -> Response<ProxyBody<P>> {
    let mut body = refusal.detail;
    body.insert("error".into(), Value::String(refusal.error));
    body.insert("kind".into(), Value::String(refusal.kind.into()));
    body.insert("service".into(), Value::String(service.to_string()));
    let mut response = json(refusal.status, body);
    if let Some(seconds) = refusal.retry_after_s {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
    }
    response
}

/// The upstream refused, or failed before its answer's headers: what happened, what to do.
pub(super) fn bad_gateway<P>(route: &Route, err: &UpstreamError) -> Response<ProxyBody<P>> {
    let service = &route.service;
    // As the config writes it: a `Uri` prints a trailing `/`.
    let upstream = match (route.upstream.scheme_str(), route.upstream.authority()) {
        (Some(scheme), Some(authority)) => format!("{scheme}://{authority}"),
        _ => route.upstream.to_string(),
    };
    let cause = causes(err);
    let error = if let UpstreamError::Connect(_) = err {
        format!(
            "{service} at {upstream} could not be reached ({cause}): check that it is running \
             and listening there (gpu-manager status {service}, and its log)"
        )
    } else {
        format!(
            "{service} at {upstream} failed before answering ({cause}): it may have crashed or \
             closed the connection; see its log, then retry"
        )
    };
    let mut body = Map::new();
    body.insert("error".into(), Value::String(error));
    body.insert("kind".into(), Value::String("upstream".into()));
    body.insert("service".into(), Value::String(service.to_string()));
    json(StatusCode::BAD_GATEWAY, body)
}

/// The error and its sources in one line: the error alone ("the connection failed") does
/// not say that the connection was refused.
fn causes(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

fn json<P>(status: StatusCode, body: Map<String, Value>) -> Response<ProxyBody<P>> {
    let bytes = Bytes::from(Value::Object(body).to_string());
    let mut response = Response::new(ProxyBody::full(bytes));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}
