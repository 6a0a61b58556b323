//! A protocol client: sends requests with fresh ids, returns their ack or error, and keeps every pushed
//! frame in order for the test to inspect.

use std::collections::VecDeque;
use std::time::Duration;

use anyhow::{Context, bail};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// A guard against a hung server, not a wait: every wait returns as soon as its frame arrives.
const DEADLINE: Duration = Duration::from_secs(20);

pub type Frame = Value;

pub struct Client {
    socket: WebSocketStream<MaybeTlsStream<TcpStream>>,
    next_id: u64,
    /// Frames pushed by the server (no request id), in arrival order, not yet taken by the test.
    pushes: VecDeque<Frame>,
    pub welcome: Frame,
}

impl Client {
    pub async fn connect(url: &str) -> anyhow::Result<Client> {
        let (socket, _) = tokio_tungstenite::connect_async(url).await.context("websocket connect")?;
        let mut client = Client { socket, next_id: 0, pushes: VecDeque::new(), welcome: Value::Null };
        client.welcome = client.read_frame().await?;
        if client.welcome["type"] != "welcome" {
            bail!("expected a welcome frame, got {}", client.welcome);
        }
        Ok(client)
    }

    async fn read_frame(&mut self) -> anyhow::Result<Frame> {
        loop {
            let message = tokio::time::timeout(DEADLINE, self.socket.next())
                .await
                .context("no frame from the server before the deadline")?
                .context("connection closed")??;
            match message {
                Message::Text(text) => return Ok(serde_json::from_str(text.as_str())?),
                Message::Close(frame) => bail!("connection closed by the server: {frame:?}"),
                _ => continue,
            }
        }
    }

    /// Sends a raw text frame.
    pub async fn send_raw(&mut self, text: &str) -> anyhow::Result<()> {
        self.socket.send(Message::Text(text.into())).await?;
        Ok(())
    }

    /// Sends a request without waiting for its answer; returns its id.
    pub async fn send(&mut self, kind: &str, fields: Value) -> anyhow::Result<String> {
        self.next_id += 1;
        let id = format!("r{}", self.next_id);
        let mut frame = json!({ "type": kind, "id": id });
        if let (Some(frame), Value::Object(fields)) = (frame.as_object_mut(), fields) {
            frame.extend(fields);
        }
        self.send_raw(&frame.to_string()).await?;
        Ok(id)
    }

    /// Waits for the ack or error frame of request `id`; pushes that arrive meanwhile are kept.
    pub async fn answer(&mut self, id: &str) -> anyhow::Result<Result<Frame, Frame>> {
        loop {
            let frame = self.read_frame().await?;
            match (frame["type"].as_str(), frame["id"].as_str()) {
                (Some("ack"), Some(answered)) if answered == id => return Ok(Ok(frame)),
                (Some("error"), Some(answered)) if answered == id => return Ok(Err(frame)),
                (Some("ack" | "error"), _) => bail!("answer to another request while waiting for {id}: {frame}"),
                _ => self.pushes.push_back(frame),
            }
        }
    }

    /// Sends a request and returns its ack or error frame.
    pub async fn request(&mut self, kind: &str, fields: Value) -> anyhow::Result<Result<Frame, Frame>> {
        let id = self.send(kind, fields).await?;
        self.answer(&id).await
    }

    /// Sends a request that must succeed.
    pub async fn ok(&mut self, kind: &str, fields: Value) -> anyhow::Result<Frame> {
        match self.request(kind, fields).await? {
            Ok(ack) => Ok(ack),
            Err(error) => bail!("{kind} failed: {error}"),
        }
    }

    /// Sends a request that must fail; returns the error code.
    pub async fn refused(&mut self, kind: &str, fields: Value) -> anyhow::Result<String> {
        match self.request(kind, fields).await? {
            Ok(ack) => bail!("{kind} should have been refused, got {ack}"),
            Err(error) => Ok(error["code"].as_str().unwrap_or_default().to_owned()),
        }
    }

    /// The next pushed frame that matches, skipping (and dropping) the others before it.
    pub async fn push_matching(&mut self, mut matches: impl FnMut(&Frame) -> bool) -> anyhow::Result<Frame> {
        while let Some(frame) = self.pushes.pop_front() {
            if matches(&frame) {
                return Ok(frame);
            }
        }
        loop {
            let frame = self.read_frame().await?;
            if matches(&frame) {
                return Ok(frame);
            }
        }
    }

    /// The next pushed frame of this type.
    pub async fn push_of(&mut self, kind: &str) -> anyhow::Result<Frame> {
        self.push_matching(|frame| frame["type"] == kind).await
    }

    /// The next pushed event of a conversation with this kind.
    pub async fn event_of(&mut self, conversation: &str, kind: &str) -> anyhow::Result<Frame> {
        self.push_matching(|frame| {
            frame["type"] == "event" && frame["conversation"] == conversation && frame["event"]["kind"] == kind
        })
        .await
        .map(|frame| frame["event"].clone())
    }

    /// Pushed events of a conversation until one with seq `last_seq` arrives; returns them all in order.
    pub async fn events_up_to(&mut self, conversation: &str, last_seq: u64) -> anyhow::Result<Vec<Frame>> {
        let mut events = Vec::new();
        loop {
            let frame =
                self.push_matching(|frame| frame["type"] == "event" && frame["conversation"] == conversation).await?;
            let event = frame["event"].clone();
            let seq = event["seq"].as_u64().unwrap_or(0);
            events.push(event);
            if seq >= last_seq {
                return Ok(events);
            }
        }
    }

    /// Pushed frames received so far and not taken yet.
    pub fn pending_pushes(&self) -> &VecDeque<Frame> {
        &self.pushes
    }

    pub async fn close(mut self) -> anyhow::Result<()> {
        self.socket.close(None).await?;
        Ok(())
    }
}

/// Helpers that read like the product: a customer starts a chat, an agent signs in.
impl Client {
    pub async fn start_chat(
        url: &str,
        widget_key: &str,
        group: &str,
        name: &str,
        question: &str,
    ) -> anyhow::Result<(Client, String, String)> {
        let mut client = Client::connect(url).await?;
        let ack = client
            .ok("chat.start", json!({ "widget_key": widget_key, "group": group, "name": name, "question": question }))
            .await?;
        let conversation = ack["conversation"].as_str().context("no conversation id")?.to_owned();
        let token = ack["customer_token"].as_str().context("no customer token")?.to_owned();
        Ok((client, conversation, token))
    }

    pub async fn sign_in(url: &str, token: &str) -> anyhow::Result<Client> {
        let mut client = Client::connect(url).await?;
        client.ok("agent.sign_in", json!({ "token": token })).await?;
        Ok(client)
    }
}
