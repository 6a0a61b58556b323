//! One client connection, whatever carries it (a WebSocket, a gRPC stream): read a request, check who may
//! make it, ask the router, answer with an ack or an error; and between requests, write the pushes the hub
//! queued for this connection.
//!
//! The session is written once, against [`Transport`]: a transport only decodes what the client sends into
//! [`Inbound`]s and encodes the [`Outgoing`] frames (`ws.rs`, `grpc.rs`). Everything else is here, so that the
//! transports behave the same by construction: roles, requests handled one at a time in order with exactly
//! one answer each, the events a request returns written after its answer, pushes written while a message,
//! delivery mark or typing request waits for the router (they change nothing of the connection, and a
//! socket's deliveries would otherwise wait for its own requests: so the echo of a message sent may come
//! before its ack), the bounded outbound queue and the
//! disconnect of a slow client, each conversation's events written in seq order at most once with gaps
//! filled from the log, resume by seq.

use std::collections::HashMap;
use std::future::Future;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use futures_util::FutureExt;
use switchboard_domain::{
    AgentId, AgentStatus, ConversationId, Event, GroupId, Refusal, TenantId, customer_token_for_start,
    new_customer_token,
};
use switchboard_proto::router::{
    Caller, ChatCommand, ChatList, ChatView, EventPage, OfflineMessage, RouterError, StartChat,
};
use switchboard_telemetry::names;
use tokio::sync::{Notify, mpsc, watch};
use tokio::time::Instant;
use tracing::{Instrument, debug, warn};
use uuid::Uuid;

use crate::Shared;
use crate::addresses::{AddressSlot, StartTaken};
use crate::admission::Budget;
use crate::hub::{Needs, Outbound, Role, SocketId, SocketLink};
use crate::protocol::{Ack, ErrorReply, GroupInfo, ListName, OFFLINE_REASONS, PushFrame, Request};

const MAX_NAME_CHARS: usize = 100;
const MAX_CLIENT_MSG_ID_CHARS: usize = 128;
const MAX_CONTACT_CHARS: usize = 254;
const MAX_IDEMPOTENCY_KEY_CHARS: usize = 128;
/// How long the last frame (a close) may wait for a client that is being disconnected to read.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a session closed by a shutdown may take to leave what it followed and presence before its close.
const END_AT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(1);
/// How long the close of a connection refused over the limit may wait: such connections are not counted.
const REFUSAL_CLOSE_TIMEOUT: Duration = Duration::from_secs(1);
/// The most pushes written before a flush, when more are queued.
const WRITE_BATCH: usize = 64;

/// What a transport hands the session: one frame of the client, decoded.
#[derive(Debug)]
pub(crate) enum Inbound {
    /// A request to carry out and answer.
    Request { id: String, request: Request },
    /// A frame that is not a valid request: answered with this error (with the request's id when it had a
    /// usable one), and the connection goes on.
    Refused { id: Option<String>, error: ErrorReply },
    /// A frame that only shows the client is there (a WebSocket ping or pong): nothing to answer.
    Alive,
    /// Something after which the connection cannot go on (a frame over the size limit, a stream that cannot
    /// be decoded): the connection is closed with this reason.
    Fatal(Close),
}

/// What the session asks a transport to write.
#[derive(Debug)]
pub(crate) enum Outgoing<'a> {
    Welcome { max_message_bytes: usize },
    Ack { id: &'a str, ack: &'a Ack },
    Error { id: Option<&'a str>, error: &'a ErrorReply },
    Push(&'a Outbound),
}

/// Why the server ends a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Close {
    /// The client read too slowly and its outbound queue filled: it reconnects and resumes from its last seq.
    SlowConsumer,
    /// A frame larger than the server reads.
    FrameTooLarge { max_message_bytes: usize },
    /// What the client sends cannot be decoded at all.
    Undecodable { detail: String },
    /// The gateway is shutting down: reconnect (elsewhere) and resume.
    ShuttingDown,
    /// The client sent nothing, not even a pong, for [`GatewaySettings::idle_ping`] after it was pinged.
    ///
    /// [`GatewaySettings::idle_ping`]: crate::GatewaySettings::idle_ping
    Unresponsive,
    /// The gateway serves as many connections as it may ([`GatewaySettings::max_connections`]).
    ///
    /// [`GatewaySettings::max_connections`]: crate::GatewaySettings::max_connections
    Full { max_connections: usize },
    /// The client's address has as many connections open as one address may
    /// ([`AddressLimits::max_connections`]).
    ///
    /// [`AddressLimits::max_connections`]: crate::AddressLimits::max_connections
    AddressFull { max_connections: usize },
}

impl Close {
    /// The reason given to the client.
    pub(crate) fn reason(&self) -> String {
        match self {
            Close::SlowConsumer => "too slow to read: reconnect and resume from your last seq".to_owned(),
            Close::FrameTooLarge { max_message_bytes } => {
                format!("frame too large: a message body is at most {max_message_bytes} bytes")
            }
            Close::Undecodable { detail } => format!("the frame cannot be decoded: {detail}"),
            Close::ShuttingDown => "the server is shutting down: reconnect and resume from your last seq".to_owned(),
            Close::Unresponsive => "no answer to a ping: reconnect and resume from your last seq".to_owned(),
            Close::Full { max_connections } => {
                format!("the server has as many connections as it serves ({max_connections}): try again later")
            }
            Close::AddressFull { max_connections } => {
                format!("this address has as many connections as one address may ({max_connections}): try again later")
            }
        }
    }
}

/// One client connection as the session sees it.
pub(crate) trait Transport: Send {
    /// The transport's label in metrics (`websocket`, `grpc`).
    const NAME: &'static str;

    /// The next frame of the client; `None` once the client is gone (or closed the connection).
    fn recv(&mut self) -> impl Future<Output = Option<Inbound>> + Send;
    /// Writes one frame to the client, or into a buffer that [`Transport::flush`] writes out, and answers its
    /// size on the wire when `measure` is set (the request budget's, for an answer), else 0; `None` when the
    /// client can no longer be written to.
    fn send(&mut self, frame: Outgoing<'_>, measure: bool) -> impl Future<Output = Option<usize>> + Send;
    /// Writes out the frames buffered by [`Transport::send`]; false when the client can no longer be written
    /// to.
    fn flush(&mut self) -> impl Future<Output = bool> + Send;
    /// Ends the connection, telling the client why (the last thing written), and waits a little for the
    /// client's side of the close where the protocol has one.
    fn close(&mut self, reason: Close) -> impl Future<Output = ()> + Send;
    /// Whether the transport can ask the client to show it is there ([`Transport::ping`]).
    const PINGS: bool = false;
    /// Writes a ping that the client's stack answers by itself (a WebSocket ping, answered with a pong that
    /// [`Transport::recv`] hands over as [`Inbound::Alive`]), into the buffer that [`Transport::flush`]
    /// writes out; false when the client can no longer be written to.
    fn ping(&mut self) -> impl Future<Output = bool> + Send {
        std::future::ready(true)
    }
}

/// Why the session loop stops.
#[derive(Debug)]
enum End {
    /// The client went away, or cannot be written to: nothing more to tell it.
    Gone,
    /// The server ends the connection and tells the client why.
    Close(Close),
}

type Flow = Result<(), End>;

struct Session<T> {
    shared: Arc<Shared>,
    socket_id: SocketId,
    link: SocketLink,
    role: Option<Role>,
    /// The connection as counted (its gauge, its slot); `None` once it begins to end.
    counted: Option<Counted>,
    /// The highest seq written to this connection, per conversation.
    written_seq: HashMap<ConversationId, u64>,
    /// A customer's connection wrote its chat's end (`closed`, `cancelled`): its owner need not be told when
    /// the connection ends.
    own_chat_ended: bool,
    transport: T,
    /// Frames were written to the transport since its last flush.
    unflushed: bool,
    /// The latencies of frames written since the last flush, each a histogram and when its frame's wait
    /// began (µs): recorded once the flush wrote them to the connection.
    unflushed_latencies: Vec<(&'static str, i64)>,
    /// How many more requests the connection may make now.
    budget: Budget,
    /// The bytes written of the answer being written, which the budget is charged for (`None` between
    /// answers: the pushes cost the connection nothing).
    answer_bytes: Option<u64>,
    /// The client's address, against the chat starts per address.
    client: Option<IpAddr>,
}

type Reply = Result<(Ack, Backlog), ErrorReply>;

/// What a request's ack is followed by: the events of the chat it subscribed to, a first page of them (the
/// pages after it are read and written once it is).
#[derive(Default)]
struct Backlog(Option<(ConversationId, EventPage)>);

/// The answer of a request whose ack is followed by no events.
fn answered(ack: Ack) -> Reply {
    Ok((ack, Backlog::default()))
}

/// How a request is handled (see [`Session::detach`]).
enum Handling {
    /// Its answer, made without the session: the pushes are written while it waits.
    Beside(std::pin::Pin<Box<dyn Future<Output = Reply> + Send>>),
    /// Handled by the session, pushes waiting until it is answered.
    InOrder(Request),
}

/// A connection's slot against [`GatewaySettings::max_connections`], given back when it is dropped.
///
/// [`GatewaySettings::max_connections`]: crate::GatewaySettings::max_connections
struct Admitted(Arc<AtomicUsize>);

impl Admitted {
    fn new(open: &Arc<AtomicUsize>, max: usize) -> Option<Admitted> {
        let admit = |now: usize| (max == 0 || now < max).then_some(now + 1);
        open.fetch_update(Ordering::AcqRel, Ordering::Acquire, admit).ok().map(|_| Admitted(open.clone()))
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A session as a shutdown waits for it ([`Gateway::serve`](crate::Gateway::serve)), from the request that
/// opens it until it is dropped.
pub(crate) struct Running(watch::Sender<usize>);

impl Running {
    pub(crate) fn new(sessions: &watch::Sender<usize>) -> Running {
        sessions.send_modify(|running| *running += 1);
        Running(sessions.clone())
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.0.send_modify(|running| *running = running.saturating_sub(1));
    }
}

/// An open connection as it is counted: in `switchboard_gateway_connections` by transport and role, and
/// against the limit (its slot; none while the gateway drains). Dropped, it counts no more, whichever way
/// the session ended.
struct Counted {
    transport: &'static str,
    role: &'static str,
    _slot: Option<Admitted>,
    /// Its place in its client address's count, if counted.
    _address: Option<AddressSlot>,
}

impl Counted {
    fn new(transport: &'static str, slot: Option<Admitted>, address: Option<AddressSlot>) -> Counted {
        let counted = Counted { transport, role: role_label(None), _slot: slot, _address: address };
        counted.gauge().increment(1.0);
        counted
    }

    fn gauge(&self) -> metrics::Gauge {
        metrics::gauge!(names::GATEWAY_CONNECTIONS, "transport" => self.transport, "role" => self.role)
    }

    /// The connection's role changed: the gauges follow it.
    fn set_role(&mut self, role: Option<&Role>) {
        self.gauge().decrement(1.0);
        self.role = role_label(role);
        self.gauge().increment(1.0);
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.gauge().decrement(1.0);
    }
}

/// Serves one connection until it ends: the welcome frame, then requests and pushes.
/// `running` counts the session from before its transport existed (an upgrade under way is waited for too);
/// `client` is the address its chat starts and the connection itself count against (`None`: not counted).
pub(crate) async fn run<T: Transport>(shared: Arc<Shared>, transport: T, client: Option<IpAddr>, running: Running) {
    let _running = running;
    let max_connections = shared.settings.max_connections;
    let admitted = Admitted::new(&shared.open_connections, max_connections);
    // A gateway that drains closes every new connection at once anyway, and says so (1001), full or not.
    if admitted.is_none() && !*shared.draining.borrow() {
        return refuse(transport, Close::Full { max_connections }, "gateway_full").await;
    }
    let address_slot = match client.map(|client| shared.address_connections.admit(client)) {
        Some(Some(slot)) => slot,
        None => None,
        // As one over the gateway's limit, but for the address.
        Some(None) if *shared.draining.borrow() => None,
        Some(None) => {
            drop(admitted);
            let max_connections = shared.address_connections.max();
            return refuse(transport, Close::AddressFull { max_connections }, "address_full").await;
        }
    };
    let socket_id = shared.next_socket_id.fetch_add(1, Ordering::Relaxed);
    let (outbound, mut queued) = mpsc::channel(shared.settings.outbound_queue_len);
    let link = SocketLink { outbound, kicked: Arc::new(Notify::new()), is_kicked: Arc::new(AtomicBool::new(false)) };
    let kicked = link.kicked.clone();
    let mut draining = shared.draining.subscribe();
    let budget = Budget::new(shared.settings.request_rate, shared.clock.now_us());
    metrics::counter!(names::GATEWAY_CONNECTIONS_OPENED, "transport" => T::NAME).increment(1);
    let mut session = Session {
        shared,
        socket_id,
        link,
        role: None,
        counted: Some(Counted::new(T::NAME, admitted, address_slot)),
        written_seq: HashMap::new(),
        own_chat_ended: false,
        transport,
        unflushed: false,
        unflushed_latencies: Vec::new(),
        budget,
        answer_bytes: None,
        client,
    };
    let welcome = Outgoing::Welcome { max_message_bytes: session.shared.settings.max_message_bytes };
    if session.transport.send(welcome, false).await.is_none() || !session.transport.flush().await {
        return;
    }
    // A client that sends nothing for `idle_ping` is pinged, and one that then sends nothing, not even the
    // pong, for as long again is disconnected: its process hangs, or it stopped reading. (TCP keepalive finds
    // the peers that are gone, not these.) One timer, moved only when it fires.
    let idle_ping = session.shared.settings.idle_ping;
    let mut heard = Instant::now();
    let mut pinged_at: Option<Instant> = None;
    let liveness = tokio::time::sleep(idle_ping);
    tokio::pin!(liveness);
    let end = loop {
        let step = tokio::select! {
            inbound = session.transport.recv() => match inbound {
                Some(inbound) => {
                    heard = Instant::now();
                    session.on_inbound(inbound, &mut queued).await
                }
                None => Err(End::Gone),
            },
            Some(outbound) = queued.recv() => session.write_outbound(&outbound).await,
            () = kicked.notified() => Err(End::Close(Close::SlowConsumer)),
            () = shutting_down(&mut draining) => Err(End::Close(Close::ShuttingDown)),
            () = &mut liveness, if T::PINGS => {
                let now = Instant::now();
                match pinged_at {
                    // An answer may wait unread while the session was busy past its time (a flush to a slow
                    // reader, a long backlog): it is read before the client is given up on (outside tokio's
                    // budget, which a task that was busy may have spent, and which would make it seem pending).
                    Some(pinged) if heard <= pinged => match tokio::task::unconstrained(session.transport.recv()).now_or_never() {
                        Some(Some(inbound)) => {
                            heard = Instant::now();
                            session.on_inbound(inbound, &mut queued).await
                        }
                        Some(None) => Err(End::Gone),
                        None => Err(End::Close(Close::Unresponsive)),
                    },
                    _ if now.saturating_duration_since(heard) >= idle_ping => {
                        pinged_at = Some(now);
                        liveness.as_mut().reset(now + idle_ping);
                        session.ping().await
                    }
                    _ => {
                        pinged_at = None;
                        liveness.as_mut().reset(heard + idle_ping);
                        Ok(())
                    }
                }
            }
        };
        let step = match step {
            Ok(()) => session.write_queued(&mut queued).await,
            Err(end) => Err(end),
        };
        if let Err(end) = step {
            break end;
        }
    };
    let socket_id = session.socket_id;
    // The connection no longer counts, in the gauge or against the limit, as it begins to end (its close may
    // wait for a client that does not read).
    session.counted = None;
    match end {
        End::Close(Close::SlowConsumer) => metrics::counter!(names::GATEWAY_SLOW_CONSUMER_DISCONNECTS).increment(1),
        End::Close(Close::Unresponsive) => {
            metrics::counter!(names::GATEWAY_UNRESPONSIVE_DISCONNECTS, "transport" => "websocket").increment(1);
        }
        _ => {}
    }
    // The connection leaves the hub and presence first: the close below may wait on a client that does not
    // read. At shutdown that is bounded too: with the routers gone, its unsubscribes would each wait for their
    // timeout, and the client for its close (presence entries left behind expire).
    if matches!(end, End::Close(Close::ShuttingDown)) {
        let _ = tokio::time::timeout(END_AT_SHUTDOWN_TIMEOUT, session.end()).await;
    } else {
        session.end().await;
    }
    let mut transport = session.transport;
    if let End::Close(close) = end {
        debug!(socket = socket_id, reason = %close.reason(), "closing the connection");
        // A client that reads nothing would hold the close forever; after a while it is dropped without.
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, transport.close(close)).await;
    }
}

/// Closes a connection refused over a limit (the gateway's, its address's) before its welcome, and counts it
/// under `reason`. Refused connections are outside the limits: they are not waited for long.
async fn refuse<T: Transport>(mut transport: T, close: Close, reason: &'static str) {
    debug!(transport = T::NAME, reason, why = %close.reason(), "a connection over a limit; closed");
    metrics::counter!(names::GATEWAY_REFUSALS, "reason" => reason).increment(1);
    let _ = tokio::time::timeout(REFUSAL_CLOSE_TIMEOUT, transport.close(close)).await;
}

/// A role's label in the connection gauge.
fn role_label(role: Option<&Role>) -> &'static str {
    match role {
        None => "none",
        Some(Role::Customer { .. }) => "customer",
        Some(Role::Agent { .. }) => "agent",
    }
}

/// Counts a refused request by its error code.
fn count_refusal(error: &ErrorReply) {
    metrics::counter!(names::GATEWAY_REFUSALS, "reason" => error.reason).increment(1);
}

/// Resolves `timeout` after it is first polled: a write that completes at once (nearly every one) leaves it
/// unpolled and never starts a timer.
async fn stall_timer(timeout: Duration) {
    tokio::time::sleep(timeout).await;
}

/// What `write` answers, unless the client is kicked meanwhile for reading too slowly, or `write` waits
/// `stall` for it: both close the connection as a slow consumer (no push may come to kick a client that
/// stopped reading in the middle of a long backlog).
async fn bounded<O>(write: impl Future<Output = O>, kicked: &Notify, stall: Duration) -> Result<O, End> {
    tokio::select! {
        biased;
        written = write => Ok(written),
        () = kicked.notified() => Err(End::Close(Close::SlowConsumer)),
        () = stall_timer(stall) => Err(End::Close(Close::SlowConsumer)),
    }
}

/// Resolves once the gateway drains; never if it does not.
async fn shutting_down(draining: &mut watch::Receiver<bool>) {
    if draining.wait_for(|draining| *draining).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Takes a chat start from the client address's budget ([`GatewaySettings::per_address`]), or refuses the
/// request `rate_limited`. (Not a method: a session's transport is not `Sync`, and its future holds no
/// reference to it across the wait on presence.)
///
/// [`GatewaySettings::per_address`]: crate::GatewaySettings::per_address
async fn take_chat_start(shared: &Shared, client: Option<IpAddr>) -> Result<StartTaken, ErrorReply> {
    let Some(client) = client else {
        return Ok(StartTaken::Unlimited);
    };
    shared.take_chat_start(client).await.map_err(|retry_after_ms| {
        debug!(%client, retry_after_ms, "a chat start over the address's limit");
        ErrorReply::address_rate_limited(retry_after_ms)
    })
}

impl<T: Transport> Session<T> {
    /// Writes one frame, into the transport's buffer until [`Session::flush`]. A client kicked for reading
    /// too slowly while the write waits is disconnected at once, rather than when (if ever) it reads again;
    /// so is one that has not let the write through for [`GatewaySettings::write_stall_timeout`] (no push
    /// may come to kick it: the rest of a closed chat's backlog, say).
    ///
    /// [`GatewaySettings::write_stall_timeout`]: crate::GatewaySettings::write_stall_timeout
    async fn send(&mut self, frame: Outgoing<'_>) -> Flow {
        self.unflushed = true;
        let stall = self.shared.settings.write_stall_timeout;
        let measure = self.answer_bytes.is_some();
        let bytes = bounded(self.transport.send(frame, measure), &self.link.kicked, stall).await?.ok_or(End::Gone)?;
        if let Some(answer_bytes) = self.answer_bytes.as_mut() {
            *answer_bytes = answer_bytes.saturating_add(bytes as u64);
        }
        Ok(())
    }

    /// Pings the client ([`Transport::ping`]), as [`Session::send`] writes.
    async fn ping(&mut self) -> Flow {
        self.unflushed = true;
        let stall = self.shared.settings.write_stall_timeout;
        let pinged = bounded(self.transport.ping(), &self.link.kicked, stall).await?;
        if pinged { Ok(()) } else { Err(End::Gone) }
    }

    /// Writes out what [`Session::send`] buffered, as [`Session::send`] writes.
    async fn flush(&mut self) -> Flow {
        if !std::mem::take(&mut self.unflushed) {
            return Ok(());
        }
        let stall = self.shared.settings.write_stall_timeout;
        if !bounded(self.transport.flush(), &self.link.kicked, stall).await? {
            return Err(End::Gone);
        }
        if !self.unflushed_latencies.is_empty() {
            let now_us = self.shared.clock.now_us();
            for (histogram, since_us) in self.unflushed_latencies.drain(..) {
                metrics::histogram!(histogram).record(now_us.saturating_sub(since_us).max(0) as f64 / 1e6);
            }
        }
        Ok(())
    }

    /// Writes the pushes queued now (at most [`WRITE_BATCH`] of them), then flushes: the frames that are
    /// ready together (an ack and the echo of the message it acknowledges, a burst of queue changes) leave
    /// in one write instead of one each.
    async fn write_queued(&mut self, queued: &mut mpsc::Receiver<Arc<Outbound>>) -> Flow {
        for _ in 0..WRITE_BATCH {
            let Ok(outbound) = queued.try_recv() else { break };
            self.write_outbound(&outbound).await?;
        }
        self.flush().await
    }

    async fn on_inbound(&mut self, inbound: Inbound, queued: &mut mpsc::Receiver<Arc<Outbound>>) -> Flow {
        // Every frame answered counts against the budget, a valid request or not.
        let id = match &inbound {
            Inbound::Request { id, .. } => Some(Some(id.as_str())),
            Inbound::Refused { id, .. } => Some(id.as_deref()),
            Inbound::Fatal(_) | Inbound::Alive => None,
        };
        if let Some(id) = id
            && let Err(retry_after_ms) = self.budget.take(|| self.shared.clock.now_us())
        {
            let error = ErrorReply::rate_limited(retry_after_ms);
            count_refusal(&error);
            return self.send(Outgoing::Error { id, error: &error }).await;
        }
        match inbound {
            Inbound::Request { id, request } => {
                let reply = self.handle_beside_pushes(request, queued).await?;
                if self.role.is_none() {
                    // A connection without a role gets no pushes: what is queued was queued for the role it
                    // has just left (signed out, or the request that took it failed), and the hub sends it no
                    // more. Written, an event of that role's chats would find its seq cleared.
                    while queued.try_recv().is_ok() {}
                }
                match reply {
                    Ok((ack, Backlog(backlog))) => {
                        // The answer's cost beyond the request's own token (`admission`), taken once it is
                        // written, or as far as it was written when the connection ended.
                        self.answer_bytes = Some(0);
                        let written = self.write_answer(&id, &ack, backlog).await;
                        let bytes = self.answer_bytes.take().unwrap_or(0);
                        self.budget.charge_reply(bytes, || self.shared.clock.now_us());
                        written
                    }
                    Err(error) => {
                        count_refusal(&error);
                        self.send(Outgoing::Error { id: Some(&id), error: &error }).await
                    }
                }
            }
            Inbound::Refused { id, error } => {
                metrics::counter!(names::GATEWAY_REQUESTS, "type" => "invalid").increment(1);
                count_refusal(&error);
                self.send(Outgoing::Error { id: id.as_deref(), error: &error }).await
            }
            Inbound::Fatal(close) => {
                if let Close::FrameTooLarge { .. } = close {
                    metrics::counter!(names::GATEWAY_REFUSALS, "reason" => "frame_too_large").increment(1);
                }
                Err(End::Close(close))
            }
            Inbound::Alive => Ok(()),
        }
    }

    /// Handles a request inside its `gateway.request` span, with the moment it arrived in scope: the events
    /// it causes carry both to the gateways that deliver them. A request that changes nothing of the
    /// connection ([`Session::detach`]) waits for the router while the pushes queued meanwhile are written.
    async fn handle_beside_pushes(
        &mut self,
        request: Request,
        queued: &mut mpsc::Receiver<Arc<Outbound>>,
    ) -> Result<Reply, End> {
        let kind = request.kind();
        metrics::counter!(names::GATEWAY_REQUESTS, "type" => kind).increment(1);
        let received_at_us = self.shared.clock.now_us();
        let span = tracing::info_span!("gateway.request", otel.name = kind, otel.kind = "server");
        let request = match self.detach(request) {
            Handling::Beside(reply) => {
                let reply = switchboard_telemetry::trace::with_received_at(received_at_us, reply.instrument(span));
                let mut reply = std::pin::pin!(reply);
                let kicked = self.link.kicked.clone();
                return loop {
                    tokio::select! {
                        biased;
                        reply = &mut reply => break Ok(reply),
                        Some(outbound) = queued.recv() => {
                            self.write_outbound(&outbound).await?;
                            self.write_queued(queued).await?;
                        }
                        () = kicked.notified() => break Err(End::Close(Close::SlowConsumer)),
                    }
                };
            }
            Handling::InOrder(request) => request,
        };
        Ok(switchboard_telemetry::trace::with_received_at(received_at_us, self.handle(request).instrument(span)).await)
    }

    /// The requests that change nothing of the connection (its role, subscriptions, written seqs) are
    /// checked against the connection now and answered by the router beside the pushes; any other is
    /// handled in order.
    fn detach(&self, request: Request) -> Handling {
        match request {
            Request::MessageSend { conversation, client_msg_id, body } => {
                Handling::Beside(Box::pin(self.send_message(conversation, client_msg_id, body)))
            }
            Request::MessageDelivered { conversation, up_to_seq } => {
                Handling::Beside(Box::pin(self.confirm_delivery(conversation, up_to_seq)))
            }
            Request::Typing { conversation, typing } => Handling::Beside(Box::pin(self.typing(conversation, typing))),
            other => Handling::InOrder(other),
        }
    }

    fn send_message(
        &self,
        conversation: ConversationId,
        client_msg_id: String,
        body: String,
    ) -> impl Future<Output = Reply> + Send + 'static {
        let checked = self.caller_for(conversation).and_then(|caller| {
            self.check_message(&client_msg_id, &body)?;
            Ok(caller)
        });
        let router = self.shared.router.clone();
        async move {
            let caller = checked?;
            let command = ChatCommand::Send { client_msg_id, body };
            let outcome = router.command(&caller, conversation, command).await?;
            let seq = outcome.event.as_ref().map(|event| event.seq);
            answered(Ack::MessageSend { seq, duplicate: outcome.duplicate })
        }
    }

    fn confirm_delivery(
        &self,
        conversation: ConversationId,
        up_to_seq: u64,
    ) -> impl Future<Output = Reply> + Send + 'static {
        let caller = self.caller_for(conversation);
        let router = self.shared.router.clone();
        async move {
            let outcome = router.command(&caller?, conversation, ChatCommand::ConfirmDelivery { up_to_seq }).await?;
            answered(Ack::MessageDelivered { seq: outcome.event.map(|event| event.seq) })
        }
    }

    fn typing(&self, conversation: ConversationId, typing: bool) -> impl Future<Output = Reply> + Send + 'static {
        let caller = self.caller_for(conversation);
        let router = self.shared.router.clone();
        async move {
            router.typing(&caller?, conversation, typing).await?;
            answered(Ack::Typing)
        }
    }

    async fn write_outbound(&mut self, outbound: &Outbound) -> Flow {
        if let PushFrame::Typing { conversation, .. } = outbound.frame()
            && !self.written_seq.contains_key(conversation)
        {
            // Queued before the connection stopped following the chat (or before its subscription failed).
            return Ok(());
        }
        let PushFrame::Event { conversation, event } = outbound.frame() else {
            self.send(Outgoing::Push(outbound)).await?;
            if let PushFrame::Offer { waiting_since_us, .. } = outbound.frame()
                && *waiting_since_us > 0
            {
                self.unflushed_latencies.push((names::OFFER_LATENCY, *waiting_since_us));
            }
            return Ok(());
        };
        let (conversation, seq) = (*conversation, event.seq);
        // Not a conversation this connection follows: its subscription failed after the watch that lets
        // no event be missed was set, and the events the watch queued meanwhile are not this connection's.
        let Some(&written) = self.written_seq.get(&conversation) else {
            return Ok(());
        };
        if seq <= written {
            return Ok(());
        }
        if seq > written + 1 {
            self.fill_gap(conversation, written).await?;
        }
        if seq <= self.written_seq.get(&conversation).copied().unwrap_or(0) {
            return Ok(());
        }
        self.written_seq.insert(conversation, seq);
        self.note_written(conversation, &event.body);
        let Some(origin) = outbound.origin() else {
            return self.send(Outgoing::Push(outbound)).await;
        };
        // The last hop of the request's trace (when it is traced): written to this connection.
        let span = origin.traceparent.as_deref().map(|traceparent| {
            let span =
                tracing::info_span!("gateway.deliver", otel.kind = "producer", conversation = %conversation, seq);
            switchboard_telemetry::trace::set_remote_parent(&span, traceparent);
            span
        });
        let other_side = self.role.as_ref().is_some_and(|role| !crate::hub::is_author(role, &event.author));
        let received_at_us = origin.received_at_us;
        let message = matches!(event.body, switchboard_domain::EventBody::Message { .. });
        match span {
            Some(span) => self.send(Outgoing::Push(outbound)).instrument(span).await?,
            None => self.send(Outgoing::Push(outbound)).await?,
        }
        if message && other_side && received_at_us > 0 {
            self.unflushed_latencies.push((names::MESSAGE_LATENCY, received_at_us));
        }
        Ok(())
    }

    /// Notes a customer's chat's end written to the connection.
    fn note_written(&mut self, conversation: ConversationId, body: &switchboard_domain::EventBody) {
        if let Some(Role::Customer { conversation: own, .. }) = &self.role
            && *own == conversation
            && matches!(body, switchboard_domain::EventBody::Closed | switchboard_domain::EventBody::Cancelled { .. })
        {
            self.own_chat_ended = true;
        }
    }

    /// Writes the events a connection missed (it never should).
    async fn fill_gap(&mut self, conversation: ConversationId, written: u64) -> Flow {
        let missed = self.read_page(conversation, written).await?;
        self.write_pages(conversation, missed).await
    }

    /// Writes a request's ack, then the events that follow it.
    async fn write_answer(&mut self, id: &str, ack: &Ack, backlog: Option<(ConversationId, EventPage)>) -> Flow {
        self.send(Outgoing::Ack { id, ack }).await?;
        match backlog {
            Some((conversation, page)) => self.write_pages(conversation, page).await,
            None => Ok(()),
        }
    }

    /// Writes a page of a chat's events, then reads and writes the pages after it, one at a time: a long
    /// log is never held whole.
    async fn write_pages(&mut self, conversation: ConversationId, mut page: EventPage) -> Flow {
        loop {
            let next_after = page.next_after();
            for event in page.events {
                self.write_event(conversation, event).await?;
            }
            let Some(after_seq) = next_after else { return Ok(()) };
            page = self.read_page(conversation, after_seq).await?;
        }
    }

    /// A page of a chat's events after `after_seq`. When it cannot be read, the connection ends rather than
    /// go on with a gap: the client reconnects and resumes from its last seq.
    async fn read_page(&mut self, conversation: ConversationId, after_seq: u64) -> Result<EventPage, End> {
        let Ok(caller) = self.caller_for(conversation) else { return Err(End::Gone) };
        match self.shared.router.read_events(&caller, conversation, after_seq).await {
            Ok(page) => Ok(page),
            Err(error) => {
                warn!(%conversation, %error, "cannot read a chat's events: closing the connection so that the client resumes");
                Err(End::Gone)
            }
        }
    }

    async fn write_event(&mut self, conversation: ConversationId, event: Event) -> Flow {
        let written = self.written_seq.entry(conversation).or_insert(0);
        if event.seq <= *written {
            return Ok(());
        }
        *written = event.seq;
        self.note_written(conversation, &event.body);
        let outbound = Outbound::new(PushFrame::Event { conversation, event: Arc::new(event) });
        self.send(Outgoing::Push(&outbound)).await
    }

    async fn handle(&mut self, request: Request) -> Reply {
        let router = self.shared.router.clone();
        match request {
            Request::Ping {} => answered(Ack::Ping),
            Request::ChatStart { widget_key, group, name, question, start_key } => {
                self.start_chat(widget_key, group, name, question, start_key).await
            }
            Request::CustomerResume { conversation, customer_token, after_seq } => {
                self.no_role_yet()?;
                let view =
                    router.authorize_customer(conversation, &customer_token).await.map_err(|error| match error {
                        switchboard_proto::router::RouterError::NotFound => unauthorized_customer(),
                        other => other.into(),
                    })?;
                let role = Role::Customer { conversation, tenant: view.tenant.clone(), group: view.group.clone() };
                self.become_role(role).await;
                self.customer_alive(&view.tenant, conversation).await;
                if !view.state.is_finished() {
                    // A customer who had left the ongoing chat returns.
                    self.shared.tell_customer_connection(conversation);
                }
                match self.subscribe(conversation, after_seq).await {
                    Ok(events) => Ok((Ack::CustomerResume { chat: view }, events)),
                    Err(error) => {
                        // A refused resume leaves the connection as it was: free to resume properly.
                        self.abandon_role().await;
                        Err(error)
                    }
                }
            }
            Request::AgentSignIn { token } => self.sign_in(&token).await,
            Request::AgentSignOut {} => {
                let (tenant, agent, _) = self.agent()?;
                let view = router.set_agent_status(&tenant, &agent, AgentStatus::Offline).await?;
                self.shared.session_gone(self.socket_id, &tenant, &agent).await;
                self.abandon_role().await;
                answered(Ack::AgentSignOut { agent: view })
            }
            Request::GroupsList { widget_key } => self.list_groups(widget_key).await,
            Request::OfflineMessage { widget_key, group, name, contact, body, reason, idempotency_key } => {
                let Some(tenant) = self.shared.directory.tenant_of_widget_key(&widget_key).cloned() else {
                    return Err(ErrorReply::new("unauthorized", "unknown widget key"));
                };
                let group = GroupId::new(group)
                    .ok()
                    .filter(|group| self.shared.directory.group(&tenant, group).is_some())
                    .ok_or_else(|| ErrorReply::new("unknown_group", "no such support group"))?;
                let customer_name = check_name(&name)?;
                let contact = contact.trim().to_owned();
                no_nul("contact", &contact)?;
                if contact.is_empty() || contact.chars().count() > MAX_CONTACT_CHARS {
                    return Err(ErrorReply::new(
                        "bad_request",
                        format!("contact has 1 to {MAX_CONTACT_CHARS} characters"),
                    ));
                }
                self.check_body(&body)?;
                if !OFFLINE_REASONS.contains(&reason.as_str()) {
                    return Err(ErrorReply::new(
                        "bad_request",
                        format!("reason is one of {}", OFFLINE_REASONS.join(", ")),
                    ));
                }
                no_nul("idempotency_key", &idempotency_key)?;
                if idempotency_key.is_empty() || idempotency_key.chars().count() > MAX_IDEMPOTENCY_KEY_CHARS {
                    return Err(ErrorReply::new(
                        "bad_request",
                        format!("idempotency_key has 1 to {MAX_IDEMPOTENCY_KEY_CHARS} characters"),
                    ));
                }
                let taken = take_chat_start(&self.shared, self.client).await?;
                let message = OfflineMessage { tenant, group, customer_name, contact, body, reason, idempotency_key };
                let ticket = router.leave_offline_message(message).await?;
                if ticket.duplicate {
                    // Counted when it was first left.
                    self.shared.give_back_chat_start(taken).await;
                }
                answered(Ack::OfflineMessage { ticket })
            }
            Request::OfferReject { conversation } => {
                let (tenant, agent, _) = self.agent()?;
                let Some(group) = self.shared.hub.offer_group(&tenant, &agent, conversation) else {
                    return Err(RouterError::Refused(Refusal::NotOffered).into());
                };
                router.reject_offer(&tenant, &group, &agent, conversation).await?;
                answered(Ack::OfferReject)
            }
            Request::ChatTransfer { conversation, group } => {
                let (tenant, agent, _) = self.agent()?;
                let group = GroupId::new(group)
                    .ok()
                    .filter(|group| self.shared.directory.group(&tenant, group).is_some())
                    .ok_or_else(|| ErrorReply::new("unknown_group", "no such support group"))?;
                let caller = Caller::Agent { tenant, agent };
                let chat = router.transfer_chat(&caller, conversation, &group).await?;
                answered(Ack::ChatTransfer { chat })
            }
            Request::ChatForward { conversation, agent: to_agent } => {
                let (tenant, agent, _) = self.agent()?;
                let to_agent = AgentId::new(to_agent)
                    .ok()
                    .filter(|to_agent| self.shared.directory.agent(&tenant, to_agent).is_some())
                    .ok_or_else(|| ErrorReply::new("unknown_agent", "no such agent"))?;
                let caller = Caller::Agent { tenant, agent };
                let chat = router.forward_chat(&caller, conversation, &to_agent).await?;
                answered(Ack::ChatForward { chat })
            }
            Request::AgentSetStatus { status } => {
                let (tenant, agent, _) = self.agent()?;
                let view = router.set_agent_status(&tenant, &agent, status.into()).await?;
                answered(Ack::AgentSetStatus { agent: view })
            }
            Request::QueueList {} => {
                let (tenant, _, groups) = self.agent()?;
                let entries = self.shared.hub.waiting_for(&tenant, &groups);
                answered(Ack::QueueList { entries })
            }
            Request::ChatAccept { conversation } => {
                let (tenant, agent, _) = self.agent()?;
                let view = router.accept_chat(&tenant, &agent, conversation).await?;
                let after = self.written_seq.get(&conversation).copied().unwrap_or(0);
                let events = self.subscribe(conversation, after).await?;
                Ok((Ack::ChatAccept { chat: view }, events))
            }
            Request::ChatSubscribe { conversation, after_seq } => {
                let caller = self.caller_for(conversation)?;
                let view = router.chat_view(&caller, conversation).await?;
                self.check_follow_limit(conversation, &view)?;
                let events = self.subscribe(conversation, after_seq).await?;
                Ok((Ack::ChatSubscribe { chat: view }, events))
            }
            Request::ChatUnsubscribe { conversation } => {
                if let Some(Role::Customer { .. }) = self.role {
                    // Unsubscribed, it would no longer follow its chat's transfers (its queue positions).
                    return Err(ErrorReply::new(
                        "forbidden",
                        "a customer's connection follows its chat for as long as it is open",
                    ));
                }
                self.agent()?;
                let followed = self.unsubscribe(conversation).await;
                answered(Ack::ChatUnsubscribe { followed })
            }
            Request::ChatTranscript { conversation, after_seq } => {
                let caller = self.caller_for(conversation)?;
                let view = router.chat_view(&caller, conversation).await?;
                let page = router.read_events(&caller, conversation, after_seq).await?;
                let more = page.more();
                let ack = Ack::ChatTranscript { chat: view, events: page.events, more };
                answered(ack)
            }
            Request::ChatList { list } => {
                let (tenant, agent, _) = self.agent()?;
                let list = match list {
                    ListName::Ongoing => ChatList::Ongoing,
                    ListName::Closed => ChatList::Closed,
                };
                let chats = router.list_chats(&tenant, &agent, list).await?;
                answered(Ack::ChatList { chats })
            }
            // Handled by `detach` (beside the pushes); here too, so that every request has its answer here.
            Request::MessageSend { conversation, client_msg_id, body } => {
                self.send_message(conversation, client_msg_id, body).await
            }
            Request::MessageDelivered { conversation, up_to_seq } => {
                self.confirm_delivery(conversation, up_to_seq).await
            }
            Request::Typing { conversation, typing } => self.typing(conversation, typing).await,
            Request::ChatClose { conversation } => {
                let seq = self.end_chat(conversation, ChatCommand::Close).await?;
                answered(Ack::ChatClose { seq })
            }
            Request::ChatCancel { conversation } => {
                let seq = self.end_chat(conversation, ChatCommand::Cancel).await?;
                answered(Ack::ChatCancel { seq })
            }
        }
    }

    /// Starts a chat; with a `start_key`, the chat's id is derived from it, so that the same start sent
    /// again (its answer lost) is answered with the chat the first one made, wherever it is sent.
    async fn start_chat(
        &mut self,
        widget_key: String,
        group: String,
        name: String,
        question: String,
        start_key: Option<Uuid>,
    ) -> Reply {
        self.no_role_yet()?;
        let Some(tenant) = self.shared.directory.tenant_of_widget_key(&widget_key).cloned() else {
            return Err(ErrorReply::new("unauthorized", "unknown widget key"));
        };
        let group = GroupId::new(group).map_err(|_| ErrorReply::new("unknown_group", "no such support group"))?;
        let name = check_name(&name)?;
        self.check_body(&question)?;
        let taken = take_chat_start(&self.shared, self.client).await?;
        let (conversation, customer_token) = match start_key {
            Some(key) => (ConversationId::for_start(&tenant, key), customer_token_for_start(&tenant, key)),
            None => (ConversationId::new_v7(self.shared.clock.now_ms()), new_customer_token()),
        };
        let request = StartChat {
            conversation,
            tenant: tenant.clone(),
            group: group.clone(),
            customer_name: name,
            question,
            tried_before: false,
            customer_token,
        };
        let started = self.shared.router.start_chat(request).await?;
        if started.duplicate {
            // Counted when it was first started.
            self.shared.give_back_chat_start(taken).await;
        }
        let conversation = started.view.conversation;
        self.customer_alive(&tenant, conversation).await;
        self.become_role(Role::Customer { conversation, tenant, group }).await;
        // The chat exists now: the customer must get its token even if the subscription failed, and then
        // subscribes again with `chat.subscribe`.
        let (events, subscribed) = match self.subscribe(conversation, 0).await {
            Ok(events) => (events, true),
            Err(error) => {
                warn!(%conversation, code = error.code, "new chat not subscribed");
                (Backlog::default(), false)
            }
        };
        let ack = Ack::ChatStart {
            conversation,
            customer_token: started.customer_token,
            chat: started.view,
            subscribed,
            duplicate: started.duplicate,
        };
        Ok((ack, events))
    }

    /// Signs an agent in: the connection becomes the agent's (its groups' queues and the agent's own pushes
    /// followed) and is recorded in presence, then the agent goes online. The agent's pushes are followed
    /// before it is online, so that no offer made to it is missed; when that cannot be done the sign-in fails
    /// (retryable) and the connection is left as it was. A presence failure fails nothing (the heartbeat
    /// writes the connection again).
    async fn sign_in(&mut self, token: &str) -> Reply {
        self.no_role_yet()?;
        let Some((tenant, agent)) = self.shared.directory.agent_of_token(token).cloned() else {
            return Err(ErrorReply::new("unauthorized", "unknown agent token"));
        };
        let Some(entry) = self.shared.directory.agent(&tenant, &agent) else {
            return Err(RouterError::UnknownAgent.into());
        };
        let role = Role::Agent { tenant: tenant.clone(), agent: agent.clone(), groups: entry.groups.clone() };
        let mut needs = self.shared.hub.register(self.socket_id, self.link.clone(), role.clone());
        self.set_role(Some(role));
        // The agent is followed here whatever the hub's hint says: another socket of the agent may have
        // registered first and not subscribed yet (or failed to).
        needs.subscribe_agents.clear();
        self.apply_needs(needs).await;
        if let Err(error) = self.shared.sync_agent_subscription(&tenant, &agent).await {
            self.abandon_role().await;
            return Err(error.into());
        }
        self.shared.session_alive(self.socket_id, &tenant, &agent).await;
        match self.shared.router.set_agent_status(&tenant, &agent, AgentStatus::Online).await {
            Ok(view) => answered(Ack::AgentSignIn { agent: view }),
            Err(error) => {
                self.abandon_role().await;
                self.shared.session_gone(self.socket_id, &tenant, &agent).await;
                Err(error.into())
            }
        }
    }

    /// The groups of a tenant with their status, read from presence in one read (the last statuses read,
    /// marked stale, while presence cannot be read).
    async fn list_groups(&mut self, widget_key: Option<String>) -> Reply {
        let tenant = match widget_key {
            Some(key) => self
                .shared
                .directory
                .tenant_of_widget_key(&key)
                .cloned()
                .ok_or_else(|| ErrorReply::new("unauthorized", "unknown widget key"))?,
            None => match &self.role {
                Some(Role::Agent { tenant, .. } | Role::Customer { tenant, .. }) => tenant.clone(),
                None => {
                    return Err(ErrorReply::new("not_signed_in", "give the tenant's widget_key, or sign in first"));
                }
            },
        };
        let (statuses, stale) = match self.shared.presence.group_statuses(&tenant).await {
            Ok(statuses) => {
                let mut cache = self.shared.group_statuses.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
                cache.insert(tenant.clone(), statuses.clone());
                (statuses, false)
            }
            Err(error) => {
                // Not a warning per request: the heartbeat says presence is down, once.
                debug!(%error, %tenant, "group statuses not read: answering the last ones read");
                let cache = self.shared.group_statuses.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
                match cache.get(&tenant) {
                    Some(statuses) => (statuses.clone(), true),
                    None => return Err(RouterError::Unavailable(error.to_string()).into()),
                }
            }
        };
        let Some(entry) = self.shared.directory.tenant(&tenant) else {
            return answered(Ack::GroupsList { groups: vec![], stale });
        };
        let now_ms = self.shared.clock.now_ms();
        let groups = entry
            .groups
            .values()
            .map(|group| match statuses.iter().find(|status| status.group == group.id) {
                Some(status) => GroupInfo {
                    id: group.id.clone(),
                    name: group.name.clone(),
                    online: status.online,
                    open: status.open,
                    signed_in: status.signed_in,
                    wait_sla_ms: group.wait_sla_ms,
                },
                // Not evaluated by its queue's owner yet: nobody is known to be signed in.
                None => GroupInfo {
                    id: group.id.clone(),
                    name: group.name.clone(),
                    online: false,
                    open: group.hours.is_open(now_ms),
                    signed_in: 0,
                    wait_sla_ms: group.wait_sla_ms,
                },
            })
            .collect();
        answered(Ack::GroupsList { groups, stale })
    }

    /// Closes or cancels a chat; the seq of the event that ended it, `None` when it had already ended.
    async fn end_chat(
        &mut self,
        conversation: ConversationId,
        command: ChatCommand,
    ) -> Result<Option<u64>, ErrorReply> {
        let caller = self.caller_for(conversation)?;
        let outcome = self.shared.router.command(&caller, conversation, command).await?;
        Ok(outcome.event.map(|event| event.seq))
    }

    /// Watches a conversation and returns the first page of the events after `after_seq`, which the ack is
    /// followed by (`write_pages` reads the rest; later events are pushed).
    async fn subscribe(&mut self, conversation: ConversationId, after_seq: u64) -> Result<Backlog, ErrorReply> {
        let caller = self.caller_for(conversation)?;
        let shared = self.shared.clone();
        let _ordered = shared.conversation_lock(conversation).await;
        // Watch before subscribing, so that no event pushed in between is missed.
        let watch = self.shared.hub.watch(self.socket_id, conversation);
        let subscribed = self.shared.router.subscribe(&self.shared.gateway_id, &caller, conversation, after_seq).await;
        let page = match subscribed {
            Ok(page) => page,
            // A subscription of this socket's from before stays as it was.
            Err(error) if watch.already_watching => return Err(error.into()),
            Err(error) => {
                // Undo the watch; the gateway stays subscribed if another socket was already watching.
                if self.shared.hub.unwatch(self.socket_id, conversation) && !watch.first_of_gateway {
                    self.shared.router.unsubscribe(&self.shared.gateway_id, conversation).await;
                }
                return Err(error.into());
            }
        };
        // A client resuming from `after_seq` has seen everything up to it.
        // The client has everything up to `after_seq`; a socket that wrote more before is asked to send those
        // again.
        let written = self.written_seq.entry(conversation).or_insert(after_seq);
        *written = (*written).min(after_seq);
        Ok(Backlog(Some((conversation, page))))
    }

    /// Refuses to follow one more chat when the connection follows `max_followed_chats` already, unless the
    /// chat is the agent's own (a console that reconnects follows its chats again, whatever it followed
    /// besides) or the connection follows it already.
    fn check_follow_limit(&self, conversation: ConversationId, view: &ChatView) -> Result<(), ErrorReply> {
        let limit = self.shared.settings.max_followed_chats;
        let own = match &self.role {
            Some(Role::Agent { agent, .. }) => view.owner.as_ref() == Some(agent),
            _ => true,
        };
        if own
            || self.shared.hub.watches(self.socket_id, conversation)
            || self.shared.hub.n_watched(self.socket_id) < limit
        {
            return Ok(());
        }
        Err(ErrorReply::new(
            "follow_limit_reached",
            format!("this connection follows {limit} chats already: send chat.unsubscribe for some"),
        ))
    }

    /// Stops following a conversation: no event of it is written to this connection after this returns (the
    /// pushes already queued for it included). The gateway unsubscribes when no socket of its own follows it
    /// any more. Returns whether the connection followed it.
    async fn unsubscribe(&mut self, conversation: ConversationId) -> bool {
        let followed = self.written_seq.remove(&conversation).is_some();
        let watched = self.shared.hub.watches(self.socket_id, conversation);
        if watched && self.shared.hub.unwatch(self.socket_id, conversation) {
            self.apply_needs(Needs { unsubscribe_conversations: vec![conversation], ..Needs::default() }).await;
        }
        followed || watched
    }

    async fn become_role(&mut self, role: Role) {
        let needs = self.shared.hub.register(self.socket_id, self.link.clone(), role.clone());
        self.set_role(Some(role));
        self.apply_needs(needs).await;
    }

    /// The connection's role now; the connection gauges follow it.
    fn set_role(&mut self, role: Option<Role>) {
        if let Some(counted) = self.counted.as_mut() {
            counted.set_role(role.as_ref());
        }
        self.role = role;
    }

    /// Records in presence that the customer of `conversation` is connected here (then every customer
    /// heartbeat, until the connection ends).
    async fn customer_alive(&mut self, tenant: &TenantId, conversation: ConversationId) {
        let (shared, session) =
            (self.shared.clone(), self.shared.customer_session(self.socket_id, tenant, conversation));
        shared.customers_alive(std::slice::from_ref(&session)).await;
    }

    /// Records in presence that this connection of a customer ended (or gave its chat up).
    async fn customer_gone(&mut self) {
        if let Some(Role::Customer { tenant, conversation, .. }) = &self.role {
            let (shared, session) =
                (self.shared.clone(), self.shared.customer_session(self.socket_id, tenant, *conversation));
            shared.customer_gone(&session).await;
            // Once written to presence: the owner reads it to find whether this was the customer's last.
            if !self.own_chat_ended {
                shared.tell_customer_connection(session.conversation);
            }
        }
    }

    /// Undoes `become_role` after the request that took the role failed.
    async fn abandon_role(&mut self) {
        self.customer_gone().await;
        let needs = self.shared.hub.unregister(self.socket_id);
        self.set_role(None);
        self.written_seq.clear();
        self.apply_needs(needs).await;
    }

    // `&mut self`: the session is not `Sync` (a WebSocket is not), so it cannot be borrowed shared across an
    // await.
    async fn apply_needs(&mut self, needs: Needs) {
        let shared = self.shared.clone();
        shared.apply_needs(needs).await;
    }

    /// Leaves the hub and presence; returns the transport for its last words. The agent is *not* set offline
    /// here when this was its last connection: its owner does, after a grace period without a live
    /// connection (a reload of the console must not make the agent offline).
    /// Leaves the hub (and what it followed) and presence.
    async fn end(&mut self) {
        let needs = self.shared.hub.unregister(self.socket_id);
        // Before the unsubscriptions, which wait on the routers (retried while an owner moves): the
        // customer's departure counts from now, not from when those are done. After the hub forgot the
        // socket, so that a heartbeat writing it meanwhile sees it gone and ends it again.
        self.customer_gone().await;
        self.apply_needs(needs).await;
        if let Some(Role::Agent { tenant, agent, .. }) = &self.role {
            self.shared.session_gone(self.socket_id, tenant, agent).await;
        }
    }

    fn no_role_yet(&self) -> Result<(), ErrorReply> {
        match self.role {
            None => Ok(()),
            Some(_) => Err(ErrorReply::new(
                "already_signed_in",
                "this connection already has a chat or a signed-in agent: open another connection",
            )),
        }
    }

    fn agent(&self) -> Result<(TenantId, AgentId, Vec<GroupId>), ErrorReply> {
        match &self.role {
            Some(Role::Agent { tenant, agent, groups }) => Ok((tenant.clone(), agent.clone(), groups.clone())),
            Some(Role::Customer { .. }) => Err(ErrorReply::new("forbidden", "only agents can do that")),
            None => Err(not_signed_in()),
        }
    }

    fn caller_for(&self, conversation: ConversationId) -> Result<Caller, ErrorReply> {
        match &self.role {
            Some(Role::Customer { conversation: own, .. }) if *own == conversation => {
                Ok(Caller::Customer { conversation })
            }
            Some(Role::Customer { .. }) => Err(ErrorReply::new("not_found", "no such conversation")),
            Some(Role::Agent { tenant, agent, .. }) => {
                Ok(Caller::Agent { tenant: tenant.clone(), agent: agent.clone() })
            }
            None => Err(not_signed_in()),
        }
    }

    fn check_body(&self, body: &str) -> Result<(), ErrorReply> {
        let max = self.shared.settings.max_message_bytes;
        if body.len() > max {
            return Err(ErrorReply::new(
                "message_too_large",
                format!("a message is at most {max} bytes; this one is {} bytes", body.len()),
            ));
        }
        if body.trim().is_empty() {
            return Err(ErrorReply::new("empty_message", "a message must not be empty"));
        }
        no_nul("the text", body)
    }

    fn check_message(&self, client_msg_id: &str, body: &str) -> Result<(), ErrorReply> {
        no_nul("client_msg_id", client_msg_id)?;
        if client_msg_id.is_empty() || client_msg_id.chars().count() > MAX_CLIENT_MSG_ID_CHARS {
            return Err(ErrorReply::new(
                "bad_request",
                format!("client_msg_id has 1 to {MAX_CLIENT_MSG_ID_CHARS} characters"),
            ));
        }
        self.check_body(body)
    }
}

/// A customer's name: 1 to [`MAX_NAME_CHARS`] characters after trimming white space.
fn check_name(name: &str) -> Result<String, ErrorReply> {
    let name = name.trim();
    no_nul("a name", name)?;
    if name.is_empty() || name.chars().count() > MAX_NAME_CHARS {
        return Err(ErrorReply::new("bad_request", format!("a name has 1 to {MAX_NAME_CHARS} characters")));
    }
    Ok(name.to_owned())
}

/// Text that is stored must not hold U+0000: PostgreSQL's text cannot, and a chat's text is the same
/// whichever database holds it.
fn no_nul(what: &str, text: &str) -> Result<(), ErrorReply> {
    if text.contains('\0') {
        return Err(ErrorReply::new("bad_request", format!("{what} must not contain the character U+0000")));
    }
    Ok(())
}

fn not_signed_in() -> ErrorReply {
    ErrorReply::new("not_signed_in", "start a chat, resume one, or sign in as an agent first")
}

fn unauthorized_customer() -> ErrorReply {
    ErrorReply::new("unauthorized", "unknown conversation or wrong customer token")
}
