//! `gpu-manager reload`: asks the daemon to re-read its config file (docs/ARCHITECTURE.md,
//! "Reloading the config") and prints what it did.

use std::process::ExitCode;

use crate::reload::{ReloadReport, RemovedServices};

use super::{answer, finish, Client, ClientError, READ_TIMEOUT};

impl Client {
    /// `POST /gpu/reload`, with `?keep_removed=true` to leave removed services running.
    pub async fn reload(
        &self,
        removed: RemovedServices,
        json: bool,
    ) -> Result<String, ClientError> {
        let mut url = self.url(&["gpu", "reload"].map(String::from));
        if removed == RemovedServices::Keep {
            url.query_pairs_mut().append_pair("keep_removed", "true");
        }
        let mut post = self.http.post(url.clone()).timeout(READ_TIMEOUT);
        if let Some(token) = &self.token {
            post = post.bearer_auth(token);
        }
        let response = post.send().await.map_err(|e| self.unreachable(&e))?;
        let body = answer(&url, response).await?;
        if json {
            return Ok(format!("{body}\n"));
        }
        let report: ReloadReport =
            serde_json::from_str(&body).map_err(|e| ClientError::Protocol {
                url: url.to_string(),
                detail: format!("not a reload report: {e}"),
            })?;
        Ok(format!("config reloaded: {}\n", report.summary()))
    }
}

/// `gpu-manager reload`: the report (stdout) or the refusal (stderr); its exit code.
pub async fn run_reload(
    client: Result<Client, ClientError>,
    removed: RemovedServices,
    json: bool,
) -> ExitCode {
    let result = match client {
        Ok(client) => client.reload(removed, json).await,
        Err(error) => Err(error),
    };
    finish(result.map(|text| (true, text)), json)
}
