//! `park: {kind: ollama}`: Ollama gives its GPU memory back without stopping when its
//! models are unloaded (`keep_alive: 0`), as the old `gpu_manager.py` did; it stays up,
//! holding no VRAM, and loads models again on first use.
//!
//! Only the HTTP calls live here; whether to park, the GPU's confirmation and the
//! fallback to a stop are the reconciler's (docs/ARCHITECTURE.md, "Parking and draining").

use std::time::Duration;

use serde::Deserialize;

use crate::act::common::error_chain;
use crate::config::ServiceName;

/// Why the models could not be unloaded; the reconciler then stops the service.
#[derive(Debug, thiserror::Error)]
pub enum OllamaError {
    #[error("cannot list the models {service} has loaded (GET {url}): {detail}")]
    List {
        service: ServiceName,
        url: String,
        detail: String,
    },
    #[error("{service} did not unload model {model:?} (POST {url}): {detail}")]
    Unload {
        service: ServiceName,
        url: String,
        model: String,
        detail: String,
    },
}

/// `GET /api/ps`: the models loaded now.
#[derive(Debug, Deserialize)]
struct Loaded {
    #[serde(default)]
    models: Vec<LoadedModel>,
}

#[derive(Debug, Deserialize)]
struct LoadedModel {
    #[serde(default)]
    name: String,
    #[serde(default)]
    model: String,
}

impl LoadedModel {
    /// The name `/api/generate` takes: `model`, or `name` from older Ollamas.
    fn id(self) -> String {
        if self.model.is_empty() {
            self.name
        } else {
            self.model
        }
    }
}

/// Asks the Ollama API at `base_url` to unload every loaded model: `GET /api/ps`, then
/// `POST /api/generate {"model": m, "keep_alive": 0}` for each. Returns the models asked
/// to unload. Each request may take up to `timeout`. Ollama frees the memory shortly
/// after it answers, when the model's runner exits: confirm it through the GPU.
pub async fn unload_ollama_models(
    client: &reqwest::Client,
    service: &ServiceName,
    base_url: &str,
    timeout: Duration,
) -> Result<Vec<String>, OllamaError> {
    let base = base_url.trim_end_matches('/');
    let ps_url = format!("{base}/api/ps");
    let list_error = |detail: String| OllamaError::List {
        service: service.clone(),
        url: ps_url.clone(),
        detail,
    };
    let response = client
        .get(&ps_url)
        .timeout(timeout)
        .send()
        .await
        .map_err(|error| list_error(error_chain(&error)))?;
    let loaded: Loaded = success(response)
        .await
        .map_err(list_error)?
        .json()
        .await
        .map_err(|error| list_error(format!("unexpected answer: {}", error_chain(&error))))?;
    let generate_url = format!("{base}/api/generate");
    let mut unloaded = Vec::new();
    for model in loaded.models.into_iter().map(LoadedModel::id) {
        let unload_error = |detail: String| OllamaError::Unload {
            service: service.clone(),
            url: generate_url.clone(),
            model: model.clone(),
            detail,
        };
        let response = client
            .post(&generate_url)
            .timeout(timeout)
            .json(&serde_json::json!({ "model": model, "keep_alive": 0 }))
            .send()
            .await
            .map_err(|error| unload_error(error_chain(&error)))?;
        success(response).await.map_err(unload_error)?;
        tracing::info!(%service, model, "asked Ollama to unload the model");
        unloaded.push(model);
    }
    Ok(unloaded)
}

/// The response if it is 2xx, else its status and body (Ollama explains in its body).
async fn success(response: reqwest::Response) -> Result<reqwest::Response, String> {
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    let body = response.text().await.unwrap_or_default();
    Err(format!("answered {status}: {}", body.trim()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use warp::Filter;

    /// A minimal Ollama: `/api/ps` lists `models`; `/api/generate` records its bodies
    /// and answers `status`.
    async fn fake_ollama(
        models: serde_json::Value,
        status: u16,
    ) -> (String, Arc<Mutex<Vec<serde_json::Value>>>) {
        let asked = Arc::new(Mutex::new(Vec::new()));
        let recorded = asked.clone();
        let ps = warp::get()
            .and(warp::path!("api" / "ps"))
            .map(move || warp::reply::json(&serde_json::json!({ "models": models })));
        let generate = warp::post()
            .and(warp::path!("api" / "generate"))
            .and(warp::body::json())
            .map(move |body: serde_json::Value| {
                recorded.lock().unwrap().push(body);
                warp::reply::with_status(
                    r#"{"error":"busy"}"#,
                    warp::http::StatusCode::from_u16(status).unwrap(),
                )
            });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(warp::serve(ps.or(generate)).incoming(listener).run());
        (url, asked)
    }

    fn client() -> reqwest::Client {
        reqwest::Client::builder().no_proxy().build().unwrap()
    }

    fn svc() -> ServiceName {
        ServiceName::parse("ollama").unwrap()
    }

    #[tokio::test]
    async fn unloads_every_loaded_model_with_keep_alive_0() {
        let models = serde_json::json!([
            { "name": "llama3:8b", "model": "llama3:8b" },
            { "name": "qwen2:7b" }
        ]);
        let (url, asked) = fake_ollama(models, 200).await;
        let unloaded = unload_ollama_models(
            &client(),
            &svc(),
            &format!("{url}/"),
            Duration::from_secs(5),
        )
        .await
        .unwrap();
        assert_eq!(unloaded, ["llama3:8b", "qwen2:7b"]);
        assert_eq!(
            *asked.lock().unwrap(),
            [
                serde_json::json!({ "model": "llama3:8b", "keep_alive": 0 }),
                serde_json::json!({ "model": "qwen2:7b", "keep_alive": 0 }),
            ]
        );
    }

    #[tokio::test]
    async fn a_refused_unload_names_the_model_and_the_answer() {
        let (url, _) = fake_ollama(serde_json::json!([{ "model": "llama3:8b" }]), 500).await;
        let error = unload_ollama_models(&client(), &svc(), &url, Duration::from_secs(5))
            .await
            .unwrap_err()
            .to_string();
        assert!(error.contains("\"llama3:8b\""), "{error}");
        assert!(error.contains("500") && error.contains("busy"), "{error}");
    }

    #[tokio::test]
    async fn an_unreachable_api_fails_the_listing() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let url = format!("http://127.0.0.1:{port}");
        let error = unload_ollama_models(&client(), &svc(), &url, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(matches!(error, OllamaError::List { .. }), "{error:?}");
        assert!(
            error.to_string().contains(&format!("{url}/api/ps")),
            "{error}"
        );
    }
}
