//! The routes beside the API proper: the dashboard page (`GET /` and its assets), the
//! OpenAPI document (`GET /openapi.json`) and the VRAM history behind the dashboard's
//! timeline (`GET /gpu/history`). They come after the API's own routes, so they cost
//! `GET /gpu/status` nothing.

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
