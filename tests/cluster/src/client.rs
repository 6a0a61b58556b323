//! Test clients that behave as a well-written widget or console does under faults: a retryable error is
//! retried, a broken connection is replaced by a new one to a gateway (re-authenticated, resumed from the last
//! seq received), and an unacknowledged message is resent with the same client message id. Everything they
//! see goes into the shared [`ClientLog`].

use std::time::Duration;

use anyhow::{Context, bail};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::log::{Ack, Author, ClientLog, Following, Operation, Received};

/// A request not answered in this time counts as a broken connection (the client reconnects and resends).
const REQUEST_DEADLINE: Duration = Duration::from_secs(5);
const CONNECT_DEADLINE: Duration = Duration::from_secs(5);
/// An operation still failing after this long is given up and recorded as a failure.
const OPERATION_DEADLINE: Duration = Duration::from_secs(30);
/// Pacing of retries (not a wait for a condition: each retry is the check).
const RETRY_PAUSE_MIN: Duration = Duration::from_millis(10);
const RETRY_PAUSE_MAX: Duration = Duration::from_millis(100);
/// At most this many failed tries are kept per operation.
const ERRORS_KEPT: usize = 5;

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// One WebSocket connection: requests answered in order, pushes kept for the owner to take.
pub struct Connection {
    sink: SplitSink<Socket, Message>,
    stream: SplitStream<Socket>,
    next_id: u64,
    pushes: Vec<Value>,
}

/// A frame read: its JSON, `None` for one to skip (a ping, a pong), or the end of the connection.
fn frame_of(message: Option<Result<Message, tokio_tungstenite::tungstenite::Error>>) -> anyhow::Result<Option<Value>> {
    match message.context("connection closed")?? {
        Message::Text(text) => Ok(Some(serde_json::from_str(text.as_str())?)),
        Message::Close(frame) => bail!("connection closed by the server: {frame:?}"),
        _ => Ok(None),
    }
}

impl Connection {
    pub async fn connect(url: &str) -> anyhow::Result<Connection> {
        let (socket, _) = tokio::time::timeout(CONNECT_DEADLINE, tokio_tungstenite::connect_async(url))
            .await
            .context("connect timed out")?
            .with_context(|| format!("cannot connect to {url}"))?;
        let (sink, stream) = socket.split();
        let mut connection = Connection { sink, stream, next_id: 0, pushes: Vec::new() };
        let welcome = connection.read_frame(CONNECT_DEADLINE).await?;
        if welcome["type"] != "welcome" {
            bail!("expected a welcome frame, got {welcome}");
        }
        Ok(connection)
    }

    async fn read_frame(&mut self, deadline: Duration) -> anyhow::Result<Value> {
        loop {
            let message =
                tokio::time::timeout(deadline, self.stream.next()).await.context("no frame before the deadline")?;
            if let Some(frame) = frame_of(message)? {
                return Ok(frame);
            }
        }
    }

    /// Sends a request and waits for its answer: `Ok(ack)` or `Err(error frame)`. Pushes read meanwhile are
    /// kept (see [`Connection::take_pushes`]).
    pub async fn request(&mut self, kind: &str, fields: &Value) -> anyhow::Result<Result<Value, Value>> {
        self.next_id += 1;
        let id = format!("r{}", self.next_id);
        let mut frame = json!({ "type": kind, "id": id });
        if let (Some(frame), Value::Object(fields)) = (frame.as_object_mut(), fields) {
            frame.extend(fields.clone());
        }
        let deadline = Instant::now() + REQUEST_DEADLINE;
        // Sent while reading, as a browser does: a long frame's send may wait for the server to read it while
        // the server waits for this client to read what it writes (a long event of its own chat), until the
        // server gives up on it as a slow consumer.
        let mut read = std::collections::VecDeque::new();
        {
            let Connection { sink, stream, .. } = self;
            let mut send = std::pin::pin!(sink.send(Message::Text(frame.to_string().into())));
            loop {
                tokio::select! {
                    sent = &mut send => break sent?,
                    message = stream.next() => read.extend(frame_of(message)?),
                }
            }
        }
        loop {
            let frame = match read.pop_front() {
                Some(frame) => frame,
                None => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    self.read_frame(left).await.with_context(|| format!("waiting for the answer to {kind}"))?
                }
            };
            match (frame["type"].as_str(), frame["id"].as_str()) {
                (Some("ack"), Some(answered)) if answered == id => return Ok(Ok(frame)),
                (Some("error"), Some(answered)) if answered == id => return Ok(Err(frame)),
                (Some("ack" | "error"), _) => bail!("answer to another request while waiting for {id}: {frame}"),
                _ => self.pushes.push(frame),
            }
        }
    }

    /// Sends a request and answers its ack; an error frame fails it.
    pub async fn ok(&mut self, kind: &str, fields: Value) -> anyhow::Result<Value> {
        match self.request(kind, &fields).await? {
            Ok(ack) => Ok(ack),
            Err(error) => bail!("{kind} refused: {error}"),
        }
    }

    /// Reads one more push (at most `deadline`).
    pub async fn read_push(&mut self, deadline: Duration) -> anyhow::Result<()> {
        let frame = self.read_frame(deadline).await?;
        self.pushes.push(frame);
        Ok(())
    }

    pub fn take_pushes(&mut self) -> Vec<Value> {
        std::mem::take(&mut self.pushes)
    }
}

/// Which side of a chat a participant is, with what it authenticates.
#[derive(Debug, Clone)]
pub enum Side {
    Customer { token: String },
    Agent { agent_id: String, token: String },
}

/// The result of one try of an operation.
enum Try {
    Done(Value),
    /// Retryable: an error frame that says so, or a connection that broke or could not be made.
    Failed(String),
    /// A non-retryable error frame.
    Refused(Value),
}

fn is_retryable(error: &Value) -> bool {
    error["retryable"] == true
}

/// One side of one conversation, with its own connection.
pub struct Participant {
    pub name: String,
    pub side: Side,
    pub conversation: String,
    gateways: Vec<String>,
    next_gateway: usize,
    connection: Option<Connection>,
    connection_number: u64,
    /// The highest seq of the conversation received.
    last_seq: u64,
    /// An agent follows the chat once it accepted it.
    accepted: bool,
    messages_sent: u64,
    log: ClientLog,
}

impl std::fmt::Debug for Participant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Participant")
            .field("name", &self.name)
            .field("conversation", &self.conversation)
            .field("last_seq", &self.last_seq)
            .finish()
    }
}

impl Participant {
    fn new(log: &ClientLog, name: &str, side: Side, gateways: &[String], gateway: usize) -> Participant {
        Participant {
            name: name.to_owned(),
            side,
            conversation: String::new(),
            gateways: gateways.to_vec(),
            next_gateway: gateway,
            connection: None,
            connection_number: 0,
            last_seq: 0,
            accepted: false,
            messages_sent: 0,
            log: log.clone(),
        }
    }

    /// A customer starts a chat on `gateways[gateway]`. A retryable refusal is retried; a connection that
    /// breaks before the answer fails the start (a resent `chat.start` could open a second chat).
    pub async fn start_chat(
        log: &ClientLog,
        name: &str,
        gateways: &[String],
        gateway: usize,
        start: Value,
    ) -> anyhow::Result<Participant> {
        let mut participant = Participant::new(log, name, Side::Customer { token: String::new() }, gateways, gateway);
        let url = participant.gateway_url();
        let mut connection = Connection::connect(&url).await?;
        participant.connection_number += 1;
        let deadline = Instant::now() + OPERATION_DEADLINE;
        let ack = loop {
            match connection.request("chat.start", &start).await? {
                Ok(ack) => break ack,
                Err(error) if is_retryable(&error) && Instant::now() < deadline => {
                    tokio::time::sleep(RETRY_PAUSE_MAX).await;
                }
                Err(error) => bail!("{name}: chat.start failed: {error}"),
            }
        };
        participant.conversation = ack["conversation"].as_str().context("no conversation id")?.to_owned();
        let token = ack["customer_token"].as_str().context("no customer token")?.to_owned();
        participant.side = Side::Customer { token };
        participant.follow(0);
        participant.connection = Some(connection);
        participant.record_pushes();
        Ok(participant)
    }

    /// An agent signs in on `gateways[gateway]` and accepts `conversation`.
    pub async fn accept_chat(
        log: &ClientLog,
        name: &str,
        gateways: &[String],
        gateway: usize,
        (agent_id, token): (&str, &str),
        conversation: &str,
    ) -> anyhow::Result<Participant> {
        let side = Side::Agent { agent_id: agent_id.to_owned(), token: token.to_owned() };
        let mut participant = Participant::new(log, name, side, gateways, gateway);
        participant.conversation = conversation.to_owned();
        participant.op("chat.accept", json!({ "conversation": conversation })).await?;
        participant.accepted = true;
        participant.follow(0);
        Ok(participant)
    }

    pub fn author(&self) -> Author {
        match &self.side {
            Side::Customer { .. } => Author::customer(),
            Side::Agent { agent_id, .. } => Author::agent(agent_id),
        }
    }

    /// The highest seq of its conversation received so far.
    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    pub fn messages_sent(&self) -> u64 {
        self.messages_sent
    }

    /// The number of connections it has opened (1 when it never had to reconnect).
    pub fn connections(&self) -> u64 {
        self.connection_number
    }

    fn gateway_url(&self) -> String {
        self.gateways[self.next_gateway % self.gateways.len()].clone()
    }

    fn follow(&self, after_seq: u64) {
        let following = Following {
            client: self.name.clone(),
            connection: self.connection_number,
            conversation: self.conversation.clone(),
            after_seq,
        };
        self.log.record(|data| data.following.push(following));
    }

    /// Moves the pushes read so far into the log and advances `last_seq`.
    fn record_pushes(&mut self) {
        let Some(connection) = self.connection.as_mut() else { return };
        let pushes = connection.take_pushes();
        let mut received = Vec::new();
        for frame in pushes.into_iter().filter(|frame| frame["type"] == "event") {
            let event = &frame["event"];
            let conversation = frame["conversation"].as_str().unwrap_or_default().to_owned();
            let seq = event["seq"].as_u64().unwrap_or_default();
            if conversation == self.conversation {
                self.last_seq = self.last_seq.max(seq);
            }
            received.push(Received {
                client: self.name.clone(),
                connection: self.connection_number,
                conversation,
                seq,
                kind: event["kind"].as_str().unwrap_or_default().to_owned(),
                author: Author {
                    role: event["author"]["role"].as_str().unwrap_or_default().to_owned(),
                    id: event["author"]["id"].as_str().unwrap_or_default().to_owned(),
                },
                client_msg_id: event["client_msg_id"].as_str().map(str::to_owned),
            });
        }
        if !received.is_empty() {
            self.log.record(|data| data.received.extend(received));
        }
    }

    /// Opens a new connection to the next gateway and takes the participant's role again, resuming from
    /// the last seq received.
    async fn reconnect(&mut self) -> Result<(), Try> {
        let url = self.gateway_url();
        let mut connection = match Connection::connect(&url).await {
            Ok(connection) => connection,
            Err(error) => {
                self.next_gateway += 1;
                return Err(Try::Failed(format!("connect to {url}: {error:#}")));
            }
        };
        self.connection_number += 1;
        let after_seq = self.last_seq;
        let steps: Vec<(&str, Value)> = match &self.side {
            Side::Customer { token } => vec![(
                "customer.resume",
                json!({ "conversation": self.conversation, "customer_token": token, "after_seq": after_seq }),
            )],
            Side::Agent { token, .. } if self.accepted => vec![
                ("agent.sign_in", json!({ "token": token })),
                ("chat.subscribe", json!({ "conversation": self.conversation, "after_seq": after_seq })),
            ],
            Side::Agent { token, .. } => vec![("agent.sign_in", json!({ "token": token }))],
        };
        let follows = steps.iter().any(|(kind, _)| *kind != "agent.sign_in");
        for (kind, fields) in steps {
            match connection.request(kind, &fields).await {
                Ok(Ok(_)) => {}
                Ok(Err(error)) if is_retryable(&error) => {
                    self.next_gateway += 1;
                    return Err(Try::Failed(format!("{kind}: {}", error["code"])));
                }
                Ok(Err(error)) => return Err(Try::Refused(error)),
                Err(error) => {
                    self.next_gateway += 1;
                    return Err(Try::Failed(format!("{kind} on {url}: {error:#}")));
                }
            }
        }
        if follows {
            self.follow(after_seq);
        }
        self.connection = Some(connection);
        self.record_pushes();
        Ok(())
    }

    async fn try_once(&mut self, kind: &str, fields: &Value) -> Try {
        if self.connection.is_none()
            && let Err(failed) = self.reconnect().await
        {
            return failed;
        }
        let Some(connection) = self.connection.as_mut() else { return Try::Failed("no connection".to_owned()) };
        let result = connection.request(kind, fields).await;
        self.record_pushes();
        match result {
            Ok(Ok(ack)) => Try::Done(ack),
            Ok(Err(error)) if is_retryable(&error) => Try::Failed(format!("{kind}: {}", error["code"])),
            Ok(Err(error)) => Try::Refused(error),
            Err(error) => {
                self.connection = None;
                self.next_gateway += 1;
                Try::Failed(format!("{kind}: {error:#}"))
            }
        }
    }

    /// Carries out one request, retrying through retryable errors and broken connections, and records it.
    pub async fn op(&mut self, kind: &str, fields: Value) -> anyhow::Result<Value> {
        let started = Instant::now();
        let deadline = started + OPERATION_DEADLINE;
        let mut operation = Operation {
            client: self.name.clone(),
            kind: kind.to_owned(),
            started,
            first_failure: None,
            finished: started,
            tries: 0,
            errors: Vec::new(),
            succeeded: false,
        };
        let mut pause = RETRY_PAUSE_MIN;
        loop {
            operation.tries += 1;
            let failure = match self.try_once(kind, &fields).await {
                Try::Done(ack) => {
                    operation.finished = Instant::now();
                    operation.succeeded = true;
                    self.log.record(|data| data.operations.push(operation));
                    return Ok(ack);
                }
                Try::Refused(error) => format!("{}: {kind} refused: {error}", self.name),
                Try::Failed(description) => {
                    operation.first_failure.get_or_insert_with(Instant::now);
                    if operation.errors.len() < ERRORS_KEPT {
                        operation.errors.push(description);
                    }
                    if Instant::now() < deadline {
                        tokio::time::sleep(pause).await;
                        pause = (pause * 2).min(RETRY_PAUSE_MAX);
                        continue;
                    }
                    format!("{}: {kind} still failing after {OPERATION_DEADLINE:?}: {:?}", self.name, operation.errors)
                }
            };
            operation.finished = Instant::now();
            let logged = failure.clone();
            self.log.record(|data| {
                data.operations.push(operation);
                data.failures.push(logged);
            });
            bail!(failure);
        }
    }

    /// Sends its next message (`<name>-<n>`) until it is acknowledged; records the ack.
    pub async fn send_message(&mut self) -> anyhow::Result<u64> {
        let client_msg_id = format!("{}-{}", self.name, self.messages_sent);
        let body = format!("message {} from {}", self.messages_sent, self.name);
        let fields = json!({ "conversation": self.conversation, "client_msg_id": client_msg_id, "body": body });
        let started = Instant::now();
        let ack = self.op("message.send", fields).await?;
        self.messages_sent += 1;
        let seq = ack["seq"].as_u64().with_context(|| format!("an ack without seq: {ack}"))?;
        let record = Ack {
            client: self.name.clone(),
            conversation: self.conversation.clone(),
            author: self.author(),
            client_msg_id,
            seq,
            duplicate: ack["duplicate"] == true,
            started,
            acked: Instant::now(),
        };
        self.log.record(|data| data.acks.push(record));
        Ok(seq)
    }

    /// Reads pushes until it has received its conversation up to `seq`. With `live_only`, a connection that
    /// breaks fails this (the events must arrive as pushes); otherwise it reconnects and resumes.
    /// A participant whose connection broke before (while the traffic ran) first connects again.
    pub async fn catch_up(&mut self, seq: u64, deadline: Duration, live_only: bool) -> anyhow::Result<()> {
        let end = Instant::now() + deadline;
        while self.connection.is_none() && self.last_seq < seq {
            if Instant::now() >= end {
                bail!("{}: could not connect again to catch up", self.name);
            }
            if self.reconnect().await.is_err() {
                tokio::time::sleep(RETRY_PAUSE_MAX).await;
            }
        }
        while self.last_seq < seq {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!(
                    "{}: received {} up to seq {} of {seq} within {deadline:?}",
                    self.name,
                    self.conversation,
                    self.last_seq
                );
            }
            if self.connection.is_none() {
                if live_only {
                    bail!("{}: its connection broke while catching up", self.name);
                }
                if self.reconnect().await.is_err() {
                    tokio::time::sleep(RETRY_PAUSE_MAX).await;
                }
                continue;
            }
            // A client allowed to reconnect behaves like a widget that notices a silent connection: after a
            // second without the push it waits for, it resumes from its last seq on a new connection.
            let wait = if live_only { left } else { left.min(Duration::from_secs(1)) };
            let read = match self.connection.as_mut() {
                Some(connection) => connection.read_push(wait).await,
                None => continue,
            };
            self.record_pushes();
            if let Err(error) = read {
                if live_only {
                    bail!(
                        "{}: no push of {} after seq {} (waiting for {seq}): {error:#}",
                        self.name,
                        self.conversation,
                        self.last_seq
                    );
                }
                self.connection = None;
            }
        }
        Ok(())
    }

    /// Closes its connection.
    pub async fn close(mut self) {
        if let Some(mut connection) = self.connection.take() {
            let _ = connection.sink.close().await;
        }
    }
}
