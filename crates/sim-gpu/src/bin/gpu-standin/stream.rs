//! Bodies written a piece at a time as they are produced, in chunked transfer encoding:
//! what a test needs to see whether a proxy passes a stream through as it comes or holds
//! it back until the end.

use std::io::{self, Write};
use std::net::TcpStream;
use std::thread;
use std::time::Duration;

/// One piece of a streamed body, written `wait` after the one before it.
pub(crate) struct Piece {
    pub(crate) wait: Duration,
    pub(crate) text: String,
}

/// A streamed body. Its pieces are made as they are due, so that what they say (a
/// timestamp, a total duration) is true when they are sent.
pub(crate) struct Stream {
    pub(crate) content_type: &'static str,
    pub(crate) pieces: Box<dyn Iterator<Item = Piece>>,
}

impl Stream {
    /// Writes the head, then each piece as one chunk when it is due, then the last chunk.
    pub(crate) fn send(self, status: &str, mut stream: TcpStream) -> io::Result<()> {
        // Each piece is one small write: without this, Nagle's algorithm would hold a
        // piece back until the one before it is acknowledged.
        stream.set_nodelay(true)?;
        write!(
            stream,
            "HTTP/1.1 {status}\r\nContent-Type: {}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
            self.content_type
        )?;
        for piece in self.pieces {
            thread::sleep(piece.wait);
            stream.write_all(&chunk(&piece.text))?;
        }
        stream.write_all(&chunk(""))
    }
}

/// One chunk of chunked transfer encoding; the empty one ends the body.
fn chunk(text: &str) -> Vec<u8> {
    format!("{:x}\r\n{text}\r\n", text.len()).into_bytes()
}

/// `GET /stream?chunks=N&ms=M`: N lines, the first at once, then one every M ms.
pub(crate) fn lines(chunks: u64, pace: Duration) -> Stream {
    let pieces = (1..=chunks).map(move |n| Piece {
        wait: if n == 1 { Duration::ZERO } else { pace },
        text: format!("chunk {n} of {chunks}\n"),
    });
    Stream {
        content_type: "text/plain; charset=utf-8",
        pieces: Box::new(pieces),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chunk_gives_its_length_in_hex_and_the_empty_one_ends_the_body() {
        let text = "x".repeat(26);
        assert_eq!(chunk(&text), format!("1a\r\n{text}\r\n").into_bytes());
        assert_eq!(chunk(""), b"0\r\n\r\n");
    }

    #[test]
    fn lines_come_at_the_pace_after_the_first() {
        let pieces: Vec<Piece> = lines(3, Duration::from_millis(40)).pieces.collect();
        let waits: Vec<u128> = pieces.iter().map(|p| p.wait.as_millis()).collect();
        assert_eq!(waits, [0, 40, 40]);
        assert_eq!(pieces[2].text, "chunk 3 of 3\n");
    }
}
