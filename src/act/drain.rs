//! Draining (docs/ARCHITECTURE.md, "Parking and draining"): asks a service whether it has
//! work in flight, so that a stop or a park never kills a job silently. One probe here;
//! the waiting and the timeout are the action task's.

use serde_json::Value;

use crate::act::common::error_chain;
use crate::config::DrainSpec;

/// What one probe of the drain URL said.
#[derive(Debug, Clone, PartialEq)]
pub enum DrainProbe {
    /// Nothing in flight.
    Idle,
    /// Work in flight: the parts of the answer that `busy_if` named, by pointer.
    Busy { answer: Value },
    /// No usable answer (not reachable, not 2xx, not JSON). A service that cannot answer
    /// has no work left to lose: counted as not busy, with a warning.
    Unanswered { error: String },
}

/// One GET of the drain URL, judged by `busy_if`.
pub async fn probe(client: &reqwest::Client, drain: &DrainSpec) -> DrainProbe {
    let unanswered = |error: String| DrainProbe::Unanswered {
        error: format!("GET {}: {error}", drain.url),
    };
    // A probe may not hold the action longer than the drain itself may wait.
    let response = match client.get(&drain.url).timeout(drain.timeout).send().await {
        Ok(response) => response,
        Err(error) => return unanswered(error_chain(&error)),
    };
    let status = response.status();
    if !status.is_success() {
        return unanswered(format!("answered {status}"));
    }
    match response.json::<Value>().await {
        Ok(answer) => judge(&answer, &drain.busy_if),
        Err(error) => unanswered(format!("not JSON: {}", error_chain(&error))),
    }
}

/// Busy while any pointer names a non-empty array, object or string, `true`, or a
/// non-zero number; a pointer the answer lacks names nothing in flight.
pub fn judge(answer: &Value, busy_if: &[String]) -> DrainProbe {
    let busy: serde_json::Map<String, Value> = busy_if
        .iter()
        .filter_map(|pointer| {
            let value = answer.pointer(pointer)?;
            in_flight(value).then(|| (pointer.clone(), value.clone()))
        })
        .collect();
    if busy.is_empty() {
        DrainProbe::Idle
    } else {
        DrainProbe::Busy {
            answer: Value::Object(busy),
        }
    }
}

fn in_flight(value: &Value) -> bool {
    match value {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64().is_some_and(|n| n != 0.0),
        Value::String(s) => !s.is_empty(),
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::time::Duration;
    use warp::Filter;

    fn pointers(list: &[&str]) -> Vec<String> {
        list.iter().map(|p| (*p).to_owned()).collect()
    }

    #[test]
    fn a_comfyui_queue_is_busy_while_a_list_is_non_empty() {
        let busy_if = pointers(&["/queue_running", "/queue_pending"]);
        let idle = json!({"queue_running": [], "queue_pending": []});
        assert_eq!(judge(&idle, &busy_if), DrainProbe::Idle);
        let running = json!({"queue_running": [[3, "abc"]], "queue_pending": []});
        assert_eq!(
            judge(&running, &busy_if),
            DrainProbe::Busy {
                answer: json!({"/queue_running": [[3, "abc"]]})
            }
        );
    }

    #[test]
    fn true_and_non_zero_numbers_are_busy_missing_pointers_are_not() {
        let busy_if = pointers(&["/busy", "/jobs/active", "/absent"]);
        assert_eq!(
            judge(&json!({"busy": false, "jobs": {"active": 0}}), &busy_if),
            DrainProbe::Idle
        );
        assert!(matches!(
            judge(&json!({"busy": true, "jobs": {"active": 0}}), &busy_if),
            DrainProbe::Busy { .. }
        ));
        assert!(matches!(
            judge(&json!({"jobs": {"active": 2.5}}), &busy_if),
            DrainProbe::Busy { .. }
        ));
    }

    fn spec(url: String) -> DrainSpec {
        DrainSpec {
            url,
            busy_if: pointers(&["/running"]),
            timeout: Duration::from_secs(5),
        }
    }

    #[tokio::test]
    async fn probes_over_http_and_an_unreachable_service_is_unanswered() {
        let route = warp::path("queue").map(|| warp::reply::json(&json!({"running": [1]})));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(warp::serve(route).incoming(listener).run());
        let client = reqwest::Client::builder().no_proxy().build().unwrap();
        let busy = probe(&client, &spec(format!("http://{address}/queue"))).await;
        assert_eq!(
            busy,
            DrainProbe::Busy {
                answer: json!({"/running": [1]})
            }
        );
        let missing = probe(&client, &spec(format!("http://{address}/nothing"))).await;
        assert!(
            matches!(&missing, DrainProbe::Unanswered { error } if error.contains("404")),
            "{missing:?}"
        );
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/queue", closed.local_addr().unwrap());
        drop(closed);
        let down = probe(&client, &spec(url.clone())).await;
        assert!(
            matches!(&down, DrainProbe::Unanswered { error } if error.contains(&url)),
            "{down:?}"
        );
    }
}
