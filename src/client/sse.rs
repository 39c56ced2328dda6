//! Just enough of Server-Sent Events to read `GET /gpu/events`: the `data:` of each event,
//! whatever way the bytes were split into chunks.

/// Accumulates chunks and yields each complete event's data.
#[derive(Default)]
pub struct SseParser {
    pending: String,
}

impl SseParser {
    /// Feeds a chunk; returns the data of every event it completed (an event ends at a
    /// blank line; comments such as keep-alives carry no data and yield nothing).
    pub fn push(&mut self, chunk: &[u8]) -> Vec<String> {
        self.pending.push_str(&String::from_utf8_lossy(chunk));
        let mut events = Vec::new();
        while let Some((block, rest)) = split_event(&self.pending) {
            let data: Vec<&str> = block
                .lines()
                .filter_map(|line| line.strip_prefix("data:"))
                .map(|data| data.strip_prefix(' ').unwrap_or(data))
                .collect();
            if !data.is_empty() {
                events.push(data.join("\n"));
            }
            self.pending = rest;
        }
        events
    }
}

/// The first event block and what follows it, if a blank line ends one.
fn split_event(text: &str) -> Option<(String, String)> {
    let text = text.replace("\r\n", "\n");
    let (block, rest) = text.split_once("\n\n")?;
    Some((block.to_owned(), rest.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_split_across_chunks_are_joined() {
        let mut parser = SseParser::default();
        assert!(parser.push(b"data:{\"a\"").is_empty());
        assert!(parser.push(b":1}\n").is_empty());
        assert_eq!(
            parser.push(b"\ndata: {\"b\":2}\n\n:\n\n"),
            ["{\"a\":1}", "{\"b\":2}"]
        );
        assert!(parser.push(b"").is_empty(), "nothing left over");
    }

    #[test]
    fn crlf_and_multi_line_data_are_understood() {
        let mut parser = SseParser::default();
        assert_eq!(
            parser.push(b"event: x\r\ndata: one\r\ndata: two\r\n\r\n"),
            ["one\ntwo"]
        );
    }
}
