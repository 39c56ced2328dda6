//! The routes beside the API proper: the dashboard page (`GET /` and its assets), the
//! OpenAPI document (`GET /openapi.json`) and the VRAM history behind the dashboard's
//! timeline (`GET /gpu/history`). They come after the API's own routes, so they cost
//! `GET /gpu/status` nothing.

use warp::http::header::{HeaderValue, ALLOW};
use warp::http::StatusCode;
use warp::path::FullPath;
use warp::reply::{Reply, Response};
use warp::{Filter, Rejection};

use crate::history::History;
use crate::reconcile::ReconcilerHandle;

/// The OpenAPI 3.1 document of the whole API, kept in the repository as `docs/openapi.json`.
pub const OPENAPI_JSON: &str = include_str!("../docs/openapi.json");

pub fn routes(
    handle: &ReconcilerHandle,
) -> impl Filter<Extract = (Response,), Error = Rejection> + Clone {
    let history = History::start(handle.status.clone());
    let history = warp::path!("gpu" / "history")
        .and(warp::get())
        .map(move || warp::reply::json(&history.reply()).into_response());
    let openapi = warp::path!("openapi.json").and(warp::get()).map(|| {
        warp::reply::with_header(OPENAPI_JSON, "content-type", "application/json").into_response()
    });
    crate::dashboard::routes()
        .or(openapi)
        .unify()
        .or(history)
        .unify()
}

/// A 405 says which method the path takes (RFC 9110 requires the `Allow` header): the
/// changes are POSTs, everything else is a GET.
pub fn with_allow_header(path: FullPath, mut response: Response) -> Response {
    if response.status() == StatusCode::METHOD_NOT_ALLOWED {
        let path = path.as_str();
        let post = path.starts_with("/gpu/prepare-phase/")
            || path.starts_with("/gpu/service/")
            || path == "/gpu/reload";
        let allow = HeaderValue::from_static(if post { "POST" } else { "GET" });
        response.headers_mut().insert(ALLOW, allow);
    }
    response
}
