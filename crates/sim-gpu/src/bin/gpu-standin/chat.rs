//! The chat endpoints: an answer of `--tokens` tokens ("tok1 ", "tok2 ", ...), one every
//! `--token-ms`, in the shapes Ollama's `POST /api/chat` and OpenAI's
//! `POST /v1/chat/completions` give it, streamed or whole. The real clients (the `ollama`
//! and `openai` Python packages) parse these shapes; the pace lets a test tell a stream
//! passed through as it comes from one held back until its end.

use std::iter;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use crate::stream::{Piece, Stream};
use crate::{Reply, OK};

/// How the stand-in "generates": how many tokens, and how long each takes.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Tokens {
    pub(crate) count: u64,
    pub(crate) pace: Duration,
}

impl Tokens {
    /// Token `n`, counted from 1.
    fn text(n: u64) -> String {
        format!("tok{n} ")
    }

    fn all(self) -> String {
        (1..=self.count).map(Self::text).collect()
    }

    /// Each token's text with the wait before it.
    fn each(self) -> impl Iterator<Item = (Duration, String)> {
        (1..=self.count).map(move |n| (self.pace, Self::text(n)))
    }

    /// How long a whole answer takes: what an answer that is not streamed waits.
    fn generation(self) -> Duration {
        self.pace * u32::try_from(self.count).unwrap_or(u32::MAX)
    }
}

/// The words of the request's messages, for the prompt counts the answers report.
fn prompt_tokens(asked: &Value) -> u64 {
    let messages = asked["messages"].as_array().map_or(&[][..], Vec::as_slice);
    let words = messages
        .iter()
        .filter_map(|message| message["content"].as_str())
        .map(|content| content.split_whitespace().count())
        .sum::<usize>();
    u64::try_from(words).unwrap_or(u64::MAX)
}

fn nanos(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

/// `POST /api/chat` for `model`, already loaded: streamed unless `"stream": false`, as
/// Ollama's default is. A stream is one JSON line per token, then a line with
/// `done: true` and the stats; a whole answer is that last line with all the content.
pub(crate) fn ollama(model: &str, asked: &Value, tokens: Tokens) -> Reply {
    let started = Instant::now();
    let prompt = prompt_tokens(asked);
    let done = {
        let model = model.to_owned();
        move |content: String| {
            json!({
                "model": model,
                "created_at": rfc3339(SystemTime::now()),
                "message": { "role": "assistant", "content": content },
                "done": true,
                "done_reason": "stop",
                "total_duration": nanos(started.elapsed()),
                "load_duration": 0,
                "prompt_eval_count": prompt,
                "prompt_eval_duration": 0,
                "eval_count": tokens.count,
                "eval_duration": nanos(tokens.generation()),
            })
        }
    };
    if asked["stream"] == false {
        thread::sleep(tokens.generation());
        return Reply::json(OK, &done(tokens.all()));
    }
    let model = model.to_owned();
    let lines = tokens.each().map(move |(wait, content)| {
        let line = json!({
            "model": model,
            "created_at": rfc3339(SystemTime::now() + wait),
            "message": { "role": "assistant", "content": content },
            "done": false,
        });
        Piece {
            wait,
            text: format!("{line}\n"),
        }
    });
    let last = iter::once_with(move || Piece {
        wait: Duration::ZERO,
        text: format!("{}\n", done(String::new())),
    });
    Reply::streamed(Stream {
        content_type: "application/x-ndjson",
        pieces: Box::new(lines.chain(last)),
    })
}

/// Tells the completions apart, as OpenAI's ids do.
static COMPLETIONS: AtomicU64 = AtomicU64::new(0);

/// `POST /v1/chat/completions`, OpenAI's shape, which vLLM and Ollama serve too: with
/// `"stream": true` server-sent events, one `chat.completion.chunk` per token, then one
/// with `finish_reason: "stop"`, then `data: [DONE]`; else one `chat.completion`.
/// `model` is the one asked for, else `default_model`.
pub(crate) fn openai(asked: &Value, default_model: &str, tokens: Tokens) -> Reply {
    let model = asked["model"].as_str().unwrap_or(default_model).to_owned();
    let number = COMPLETIONS.fetch_add(1, Ordering::Relaxed) + 1;
    let id = format!("chatcmpl-standin-{}-{number}", std::process::id());
    let created = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_secs());
    if asked["stream"] != true {
        thread::sleep(tokens.generation());
        let prompt = prompt_tokens(asked);
        let body = json!({
            "id": id,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [{
                "index": 0,
                "message": { "role": "assistant", "content": tokens.all() },
                "finish_reason": "stop",
            }],
            "usage": {
                "prompt_tokens": prompt,
                "completion_tokens": tokens.count,
                "total_tokens": prompt + tokens.count,
            },
        });
        return Reply::json(OK, &body);
    }
    let chunk = move |delta: Value, finish_reason: Value| {
        let chunk = json!({
            "id": id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [{ "index": 0, "delta": delta, "finish_reason": finish_reason }],
        });
        format!("data: {chunk}\n\n")
    };
    let events = tokens.each().enumerate().map({
        let chunk = chunk.clone();
        move |(index, (wait, content))| {
            // The first chunk says whose message it is, as OpenAI's does.
            let delta = if index == 0 {
                json!({ "role": "assistant", "content": content })
            } else {
                json!({ "content": content })
            };
            Piece {
                wait,
                text: chunk(delta, Value::Null),
            }
        }
    });
    let end = [
        chunk(json!({}), json!("stop")),
        "data: [DONE]\n\n".to_owned(),
    ];
    let end = end.into_iter().map(|text| Piece {
        wait: Duration::ZERO,
        text,
    });
    Reply::streamed(Stream {
        content_type: "text/event-stream",
        pieces: Box::new(events.chain(end)),
    })
}

/// A time as Ollama's `created_at` gives it: RFC 3339 in UTC, with nanoseconds.
fn rfc3339(time: SystemTime) -> String {
    let since = time.duration_since(UNIX_EPOCH).unwrap_or_default();
    let seconds = since.as_secs();
    let (days, of_day) = (seconds / 86_400, seconds % 86_400);
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:09}Z",
        of_day / 3600,
        of_day % 3600 / 60,
        of_day % 60,
        since.subsec_nanos()
    )
}

/// The (year, month, day) `days` after 1970-01-01, by Howard Hinnant's `civil_from_days`
/// (eras of 400 years, years counted from March so that leap days come last).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let shifted = days + 719_468;
    let era = shifted / 146_097;
    let of_era = shifted % 146_097;
    let year_of_era = (of_era - of_era / 1460 + of_era / 36_524 - of_era / 146_096) / 365;
    let day_of_year = of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_from_march = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_from_march + 2) / 5 + 1;
    let month = if month_from_march < 10 {
        month_from_march + 3
    } else {
        month_from_march - 9
    };
    let year = year_of_era + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Body;

    const TOKENS: Tokens = Tokens {
        count: 3,
        pace: Duration::from_millis(20),
    };

    fn streamed(reply: Reply) -> Vec<Piece> {
        match reply.body {
            Body::Streamed(stream) => stream.pieces.collect(),
            _ => panic!("not streamed"),
        }
    }

    fn whole(reply: Reply) -> Value {
        match reply.body {
            Body::Json(text) => serde_json::from_str(&text).unwrap(),
            _ => panic!("not JSON"),
        }
    }

    #[test]
    fn rfc3339_gives_the_utc_date_and_time_with_nanoseconds() {
        let time = UNIX_EPOCH + Duration::new(951_827_696, 5);
        assert_eq!(rfc3339(time), "2000-02-29T12:34:56.000000005Z");
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000000000Z");
        let new_year = UNIX_EPOCH + Duration::from_secs(1_798_761_599);
        assert_eq!(rfc3339(new_year), "2026-12-31T23:59:59.000000000Z");
    }

    #[test]
    fn an_ollama_stream_is_a_line_per_token_then_the_done_line() {
        let asked = json!({"model": "llama3", "messages": [{"role": "user", "content": "say hi"}]});
        let pieces = streamed(ollama("llama3:latest", &asked, TOKENS));
        let lines: Vec<Value> = pieces
            .iter()
            .map(|piece| {
                let line = piece.text.strip_suffix('\n').unwrap();
                serde_json::from_str(line).unwrap()
            })
            .collect();
        assert_eq!(lines.len(), 4);
        assert_eq!(lines[0]["message"]["content"], "tok1 ");
        assert_eq!(lines[2]["done"], false);
        assert_eq!(pieces[2].wait, TOKENS.pace);
        let done = &lines[3];
        assert_eq!(
            (&done["done"], &done["done_reason"]),
            (&json!(true), &json!("stop"))
        );
        assert_eq!(done["eval_count"], 3);
        assert_eq!(done["prompt_eval_count"], 2);
        assert_eq!(done["model"], "llama3:latest");
        assert!(done["created_at"].as_str().unwrap().ends_with('Z'));
    }

    #[test]
    fn an_ollama_answer_not_streamed_is_the_done_line_with_all_the_content() {
        let asked = json!({"model": "llama3", "stream": false});
        let answer = whole(ollama("llama3", &asked, TOKENS));
        assert_eq!(answer["message"]["content"], "tok1 tok2 tok3 ");
        assert_eq!(answer["done"], true);
    }

    #[test]
    fn an_openai_stream_is_an_event_per_token_then_the_stop_and_done() {
        let asked = json!({"model": "qwen", "stream": true});
        let events: Vec<String> = streamed(openai(&asked, "standin", TOKENS))
            .into_iter()
            .map(|piece| piece.text)
            .collect();
        assert_eq!(events.len(), 5);
        assert_eq!(events[4], "data: [DONE]\n\n");
        let chunks: Vec<Value> = events[..4]
            .iter()
            .map(|event| {
                let data = event.strip_prefix("data: ").unwrap();
                serde_json::from_str(data.trim_end()).unwrap()
            })
            .collect();
        assert_eq!(chunks[0]["object"], "chat.completion.chunk");
        assert_eq!(chunks[0]["model"], "qwen");
        let first = &chunks[0]["choices"][0];
        assert_eq!(
            first["delta"],
            json!({"role": "assistant", "content": "tok1 "})
        );
        assert_eq!(first["finish_reason"], Value::Null);
        assert_eq!(
            chunks[2]["choices"][0]["delta"],
            json!({"content": "tok3 "})
        );
        assert_eq!(chunks[3]["choices"][0]["finish_reason"], "stop");
        assert_eq!(chunks[1]["id"], chunks[3]["id"], "one completion");
    }

    #[test]
    fn an_openai_answer_not_streamed_is_one_completion() {
        let answer = whole(openai(&json!({}), "standin", TOKENS));
        assert_eq!(answer["object"], "chat.completion");
        assert_eq!(answer["model"], "standin");
        let choice = &answer["choices"][0];
        assert_eq!(choice["message"]["content"], "tok1 tok2 tok3 ");
        assert_eq!(choice["finish_reason"], "stop");
        assert_eq!(answer["usage"]["completion_tokens"], 3);
    }
}
