//! `park: {kind: http}` (docs/ARCHITECTURE.md, "Parking and draining"): the request
//! that makes a service release its VRAM while it keeps running (ComfyUI `POST /free`,
//! vLLM `POST /sleep`), and the one that brings it back (vLLM `POST /wake_up`). Only the
//! requests live here: the GPU's confirmation, the timeout and the fallback to a stop
//! are the reconciler's.

use std::time::Duration;

use crate::act::common::error_chain;
use crate::config::HttpRequest;

#[derive(Debug, thiserror::Error)]
#[error("{method} {url}: {detail}")]
pub struct ParkRequestError {
    pub method: String,
    pub url: String,
    pub detail: String,
}

/// Sends the request and returns what the service answered (its body, trimmed, first
/// 200 characters): a 2xx is success; anything else, or no answer, is an error.
pub async fn send(
    client: &reqwest::Client,
    request: &HttpRequest,
    timeout: Duration,
) -> Result<String, ParkRequestError> {
    let failed = |detail: String| ParkRequestError {
        method: request.method.clone(),
        url: request.url.clone(),
        detail,
    };
    let method = reqwest::Method::from_bytes(request.method.as_bytes())
        .map_err(|error| failed(error.to_string()))?;
    let mut builder = client
        .request(method, &request.url)
        .timeout(timeout)
        .header(reqwest::header::CONTENT_TYPE, "application/json");
    if let Some(body) = &request.body {
        builder = builder.body(body.clone());
    }
    let response = builder
        .send()
        .await
        .map_err(|error| failed(error_chain(&error)))?;
    let status = response.status();
    let body = response.text().await.unwrap_or_default();
    let body: String = body.trim().chars().take(200).collect();
    if status.is_success() {
        Ok(body)
    } else {
        Err(failed(format!("answered {status}: {body}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use warp::Filter;

    #[tokio::test]
    async fn sends_the_method_and_body_and_reports_a_refusal() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = seen.clone();
        let route = warp::method()
            .and(warp::path::full())
            .and(warp::body::bytes())
            .map(
                move |method: warp::http::Method, path: warp::path::FullPath, body| {
                    record.lock().unwrap().push(format!(
                        "{method} {} {}",
                        path.as_str(),
                        String::from_utf8_lossy(AsRef::<[u8]>::as_ref(&body))
                    ));
                    let code = if path.as_str() == "/free" { 200 } else { 409 };
                    warp::reply::with_status(
                        "done",
                        warp::http::StatusCode::from_u16(code).unwrap(),
                    )
                },
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(warp::serve(route).incoming(listener).run());
        let client = reqwest::Client::builder().no_proxy().build().unwrap();
        let free = HttpRequest {
            method: "POST".into(),
            url: format!("{base}/free"),
            body: Some(r#"{"unload_models": true}"#.into()),
        };
        assert_eq!(
            send(&client, &free, Duration::from_secs(5)).await.unwrap(),
            "done"
        );
        let refused = HttpRequest {
            method: "PUT".into(),
            url: format!("{base}/sleep"),
            body: None,
        };
        let error = send(&client, &refused, Duration::from_secs(5))
            .await
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("PUT") && error.contains("/sleep") && error.contains("409"),
            "{error}"
        );
        assert_eq!(
            *seen.lock().unwrap(),
            [
                r#"POST /free {"unload_models": true}"#.to_owned(),
                "PUT /sleep ".to_owned()
            ]
        );
    }
}
