//! The WebSocket transport: JSON text frames (`docs/protocol.md`). It only decodes and encodes; the session
//! does the rest.

use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use futures_util::SinkExt;

use crate::protocol::{self, ErrorReply};
use crate::session::{Close, Inbound, Outgoing, Transport};

/// Close code for a client too slow to read what it is sent: reconnect and resume from the last seq.
pub const CLOSE_SLOW_CONSUMER: u16 = 4008;
/// Close code for a frame larger than the server reads (RFC 6455: message too big).
pub const CLOSE_MESSAGE_TOO_BIG: u16 = 1009;
/// Close code when the server shuts down (RFC 6455: going away).
pub const CLOSE_GOING_AWAY: u16 = 1001;
/// Close code for frames that cannot be decoded at all (RFC 6455: protocol error).
pub const CLOSE_PROTOCOL_ERROR: u16 = 1002;
/// Close code for a client that sent nothing, not even a pong, after it was pinged: reconnect and resume from
/// the last seq.
pub const CLOSE_UNRESPONSIVE: u16 = 4009;
/// Close code for a connection over the gateway's limit of connections (RFC 6455: try again later).
pub const CLOSE_TRY_AGAIN_LATER: u16 = 1013;

/// How long a closed connection reads on for the client's own close frame.
const CLOSE_REPLY_TIMEOUT: Duration = Duration::from_secs(1);

pub(crate) struct WsTransport {
    socket: WebSocket,
    max_message_bytes: usize,
}

impl WsTransport {
    pub(crate) fn new(socket: WebSocket, max_message_bytes: usize) -> Self {
        WsTransport { socket, max_message_bytes }
    }
}

impl Transport for WsTransport {
    const NAME: &'static str = "websocket";

    async fn recv(&mut self) -> Option<Inbound> {
        let frame = match self.socket.recv().await? {
            Ok(frame) => frame,
            // A frame too large to read closes the connection with 1009 and says the limit; other read
            // errors mean the connection is already gone. axum hides tungstenite's error type; its capacity
            // error is the one that says "too long".
            Err(error) if error.to_string().contains("too long") => {
                return Some(Inbound::Fatal(Close::FrameTooLarge { max_message_bytes: self.max_message_bytes }));
            }
            Err(_) => return None,
        };
        Some(match frame {
            Message::Text(text) => match protocol::parse(text.as_str()) {
                Ok((id, request)) => Inbound::Request { id, request },
                Err((id, error)) => Inbound::Refused { id, error },
            },
            Message::Binary(_) => Inbound::Refused {
                id: None,
                error: ErrorReply::new("bad_frame", "binary frames are not supported: send JSON text"),
            },
            Message::Close(_) => return None,
            // tungstenite answers a ping with a pong by itself.
            Message::Ping(_) | Message::Pong(_) => Inbound::Alive,
        })
    }

    /// The text's length is known whether measured or not.
    async fn send(&mut self, frame: Outgoing<'_>, _measure: bool) -> Option<usize> {
        let text: Utf8Bytes = match frame {
            Outgoing::Welcome { max_message_bytes } => protocol::welcome(max_message_bytes).into(),
            Outgoing::Ack { id, ack } => ack.frame(id).into(),
            Outgoing::Error { id, error } => protocol::error(id, error).into(),
            Outgoing::Push(outbound) => outbound.json(),
        };
        let bytes = text.len();
        self.socket.feed(Message::Text(text)).await.ok().map(|()| bytes)
    }

    async fn flush(&mut self) -> bool {
        self.socket.flush().await.is_ok()
    }

    const PINGS: bool = true;

    async fn ping(&mut self) -> bool {
        self.socket.feed(Message::Ping(Default::default())).await.is_ok()
    }

    async fn close(&mut self, reason: Close) {
        let code = match reason {
            Close::SlowConsumer => CLOSE_SLOW_CONSUMER,
            Close::FrameTooLarge { .. } => CLOSE_MESSAGE_TOO_BIG,
            Close::Undecodable { .. } => CLOSE_PROTOCOL_ERROR,
            Close::ShuttingDown => CLOSE_GOING_AWAY,
            Close::Unresponsive => CLOSE_UNRESPONSIVE,
            Close::Full { .. } | Close::AddressFull { .. } => CLOSE_TRY_AGAIN_LATER,
        };
        let mut reason = reason.reason();
        // A close frame's reason is at most 123 bytes.
        while reason.len() > 123 {
            reason.pop();
        }
        let close = CloseFrame { code, reason: reason.into() };
        if self.socket.send(Message::Close(Some(close))).await.is_err() {
            return;
        }
        // RFC 6455 §7.1.1: read on, discarding, until the client's own close, so that the socket is closed with
        // nothing unread. Unread bytes make the kernel reset the connection, and a client still sending (whose
        // write then fails on the reset) may never read the close above. A client that does not answer is not
        // waited for long.
        let _ = tokio::time::timeout(CLOSE_REPLY_TIMEOUT, async {
            while let Some(Ok(message)) = self.socket.recv().await {
                if let Message::Close(_) = message {
                    break;
                }
            }
        })
        .await;
    }
}
