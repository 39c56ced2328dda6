//! `GET /ws`: a WebSocket that echoes each text and binary message until the client
//! closes, as a stand-in for ComfyUI's `/ws`, the connection a proxy must upgrade and
//! keep open.

use std::io::{self, Write};
use std::net::TcpStream;

use tungstenite::handshake::derive_accept_key;
use tungstenite::protocol::Role;
use tungstenite::{Error, Message, WebSocket};

use crate::{error, Body, Reply, Request, BAD_REQUEST};

/// The answer to an upgrade request: 101 with the key's proof, or why it is not one.
pub(crate) fn upgrade(request: &Request) -> Result<Reply, Reply> {
    let asks_upgrade = request.header("upgrade").is_some_and(|protocols| {
        protocols
            .split(',')
            .any(|protocol| protocol.trim().eq_ignore_ascii_case("websocket"))
    });
    if !asks_upgrade {
        return Err(error(
            "426 Upgrade Required",
            "/ws is a WebSocket: send Upgrade: websocket",
        ));
    }
    let key = request
        .header("sec-websocket-key")
        .ok_or_else(|| error(BAD_REQUEST, "a WebSocket upgrade needs Sec-WebSocket-Key"))?;
    Ok(Reply {
        status: "101 Switching Protocols",
        body: Body::WebSocket {
            accept: derive_accept_key(key.as_bytes()),
        },
    })
}

/// Switches the connection over, then echoes until the client closes it.
pub(crate) fn echo(status: &str, accept: &str, mut stream: TcpStream) -> io::Result<()> {
    write!(
        stream,
        "HTTP/1.1 {status}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
    )?;
    // The client may stay quiet for as long as it likes: it ends the connection.
    stream.set_read_timeout(None)?;
    stream.set_nodelay(true)?;
    let mut socket = WebSocket::from_raw_socket(stream, Role::Server, None);
    loop {
        match socket.read() {
            Ok(message @ (Message::Text(_) | Message::Binary(_))) => {
                socket.send(message).map_err(io::Error::other)?;
            }
            // Tungstenite answers pings and the close handshake by itself.
            Ok(_) => {}
            Err(Error::ConnectionClosed) => return Ok(()),
            Err(error) => return Err(io::Error::other(error)),
        }
    }
}
