//! The router's domain types and the `router.proto` messages, both ways.
//!
//! `*_to_proto` never fails. `*_from_proto` reads what came from the wire: an unparseable id, an unknown
//! enum string or a missing required field is an error (`Status::invalid_argument`), never a panic. A
//! server answers such an error to its caller as is; a client that gets a reply it cannot read reports
//! `RouterError::Internal` (see [`reply_error`]).
//!
//! Optional values are encoded as protobuf does: an absent owner is `""` (an agent id is never empty) and
//! an absent time is `0` (the domain never uses 0 for a real time).

use std::sync::Arc;

use switchboard_domain::{
    AgentAvailability, AgentId, AgentStatus, Author, AvailabilityVersion, CancelReason, ConversationId,
    ConversationState, Event, GroupId, OfferEnd, RequeueReason, TenantId, WaitingEntry,
};
use switchboard_proto::convert::{author_parts, new_event};
use switchboard_proto::internal::v1::{
    self as pb, AbandonCommand, AgentAvailabilityMsg, AgentOfferEnded, AgentOffered, AgentRef, AgentViewReply,
    ChatViewMsg, CommandReply, CustomerGoneCommand, EndOfferCommand, EventRecord, OfferCommand, OfferMade,
    OfflineMessageRequest, PushAgent, PushEvent, PushFrame, PushQueue, PushTyping, QueueEstimate, QueueRemoved,
    QueueSnapshot, RequeueCommand, SendCommand, ShownOffer as ShownOfferMsg, StartChatRequest, StartedChatReply,
    TicketReply, WaitingEntryMsg, agent_offer_request, caller, command_request, conversation_system_request,
    push_agent, push_frame, push_queue,
};
use switchboard_proto::router::{
    AgentChange, AgentView, Caller, ChatCommand, ChatList, ChatView, CommandOutcome, EventPage, GatewayId, LeftQueue,
    OfferUpdate, OfflineMessage, Origin, Push, QueueChange, RouterError, ShownOffer, StartChat, StartedChat,
    SystemCommand, Ticket,
};
use tonic::Status;

fn invalid(what: &str, detail: impl std::fmt::Display) -> Status {
    Status::invalid_argument(format!("bad {what}: {detail}"))
}

fn missing(what: &str) -> Status {
    Status::invalid_argument(format!("missing {what}"))
}

/// The error a client reports when a server's reply cannot be read (a bug or a version mismatch, not
/// something to retry).
pub fn reply_error(status: Status) -> RouterError {
    RouterError::Internal(format!("unreadable reply: {}", status.message()))
}

// ---- identifiers ----

pub fn conversation_id(text: &str) -> Result<ConversationId, Status> {
    ConversationId::parse(text).map_err(|error| invalid("conversation id", format_args!("{text:?}: {error}")))
}

pub fn tenant_id(text: &str) -> Result<TenantId, Status> {
    TenantId::new(text).map_err(|error| invalid("tenant id", format_args!("{text:?}: {error}")))
}

pub fn group_id(text: &str) -> Result<GroupId, Status> {
    GroupId::new(text).map_err(|error| invalid("group id", format_args!("{text:?}: {error}")))
}

pub fn agent_id(text: &str) -> Result<AgentId, Status> {
    AgentId::new(text).map_err(|error| invalid("agent id", format_args!("{text:?}: {error}")))
}

/// A gateway id: any non-empty string.
pub fn gateway_id(text: &str) -> Result<GatewayId, Status> {
    if text.is_empty() { Err(missing("gateway id")) } else { Ok(GatewayId(text.to_owned())) }
}

/// An agent id where `""` means none.
fn optional_agent(text: &str) -> Result<Option<AgentId>, Status> {
    if text.is_empty() { Ok(None) } else { agent_id(text).map(Some) }
}

fn optional_ms(ms: i64) -> Option<i64> {
    (ms != 0).then_some(ms)
}

// ---- enums as strings ----

pub fn agent_status(text: &str) -> Result<AgentStatus, Status> {
    AgentStatus::parse(text).ok_or_else(|| invalid("agent status", format_args!("{text:?}")))
}

pub fn chat_list_str(list: ChatList) -> &'static str {
    match list {
        ChatList::Ongoing => "ongoing",
        ChatList::Closed => "closed",
    }
}

pub fn chat_list(text: &str) -> Result<ChatList, Status> {
    match text {
        "ongoing" => Ok(ChatList::Ongoing),
        "closed" => Ok(ChatList::Closed),
        _ => Err(invalid("chat list", format_args!("{text:?}"))),
    }
}

/// The wire spelling of why an offer ended (the domain's serde spelling).
pub fn offer_end_str(reason: OfferEnd) -> &'static str {
    reason.as_str()
}

/// Why an offer ended, from its wire spelling.
pub fn offer_end(text: &str) -> Result<OfferEnd, Status> {
    match text {
        "rejected" => Ok(OfferEnd::Rejected),
        "timed_out" => Ok(OfferEnd::TimedOut),
        "withdrawn" => Ok(OfferEnd::Withdrawn),
        _ => Err(invalid("reason an offer ended", format_args!("{text:?}"))),
    }
}

/// The wire spelling of why a chat was requeued (the domain's serde spelling).
pub fn requeue_reason_str(reason: RequeueReason) -> &'static str {
    match reason {
        RequeueReason::AgentOffline => "agent_offline",
    }
}

/// Why a chat was requeued, from its wire spelling.
pub fn requeue_reason(text: &str) -> Result<RequeueReason, Status> {
    match text {
        "agent_offline" => Ok(RequeueReason::AgentOffline),
        _ => Err(invalid("reason a chat was requeued", format_args!("{text:?}"))),
    }
}

fn conversation_state(text: &str) -> Result<ConversationState, Status> {
    ConversationState::parse(text).ok_or_else(|| invalid("conversation state", format_args!("{text:?}")))
}

/// The author of `(role, id)`, as `switchboard_proto::convert::author_parts` writes it.
pub fn author(role: &str, id: &str) -> Result<Author, Status> {
    match role {
        "customer" => Ok(Author::Customer),
        "agent" => agent_id(id).map(Author::Agent),
        "system" => Ok(Author::System),
        _ => Err(invalid("author role", format_args!("{role:?}"))),
    }
}

// ---- caller ----

pub fn caller_to_proto(caller: &Caller) -> pb::Caller {
    let who = match caller {
        Caller::Customer { conversation } => caller::Who::CustomerConversationId(conversation.to_string()),
        Caller::Agent { tenant, agent } => {
            caller::Who::Agent(AgentRef { tenant_id: tenant.to_string(), agent_id: agent.to_string() })
        }
    };
    pb::Caller { who: Some(who) }
}

pub fn caller_from_proto(caller: Option<&pb::Caller>) -> Result<Caller, Status> {
    match caller.and_then(|caller| caller.who.as_ref()) {
        Some(caller::Who::CustomerConversationId(id)) => Ok(Caller::Customer { conversation: conversation_id(id)? }),
        Some(caller::Who::Agent(agent)) => {
            Ok(Caller::Agent { tenant: tenant_id(&agent.tenant_id)?, agent: agent_id(&agent.agent_id)? })
        }
        None => Err(missing("caller")),
    }
}

// ---- events ----

/// The record of a stored event of `conversation`, as the store writes it (the payload is the whole event;
/// the other fields are there for readers that do not parse it).
pub fn event_to_record(conversation: ConversationId, event: &Event) -> EventRecord {
    let new = new_event(event);
    EventRecord {
        conversation_id: conversation.to_string(),
        seq: event.seq,
        at_ms: event.at_ms,
        author_role: new.author_role,
        author_id: new.author_id,
        client_msg_id: new.client_msg_id,
        kind: new.kind,
        payload_json: new.payload_json,
    }
}

pub fn event_from_record(record: &EventRecord) -> Result<Event, Status> {
    switchboard_proto::convert::event_from_record(record).map_err(|error| Status::invalid_argument(error.to_string()))
}

pub fn events_to_proto(conversation: ConversationId, page: &EventPage) -> pb::EventsReply {
    let events = page.events.iter().map(|event| event_to_record(conversation, event)).collect();
    pb::EventsReply { events, last_seq: page.last_seq }
}

pub fn events_from_proto(reply: &pb::EventsReply) -> Result<EventPage, Status> {
    let events = reply.events.iter().map(event_from_record).collect::<Result<_, _>>()?;
    Ok(EventPage { events, last_seq: reply.last_seq })
}

// ---- views ----

pub fn chat_view_to_proto(view: &ChatView) -> ChatViewMsg {
    ChatViewMsg {
        conversation_id: view.conversation.to_string(),
        tenant_id: view.tenant.to_string(),
        group_id: view.group.to_string(),
        state: view.state.as_str().to_owned(),
        owner_agent_id: view.owner.as_ref().map(ToString::to_string).unwrap_or_default(),
        customer_name: view.customer_name.clone(),
        first_question: view.first_question.clone(),
        created_at_ms: view.created_at_ms,
        accepted_at_ms: view.accepted_at_ms.unwrap_or(0),
        closed_at_ms: view.closed_at_ms.unwrap_or(0),
        last_seq: view.last_seq,
        customer_away: view.customer_away,
    }
}

pub fn chat_view_from_proto(view: &ChatViewMsg) -> Result<ChatView, Status> {
    Ok(ChatView {
        conversation: conversation_id(&view.conversation_id)?,
        tenant: tenant_id(&view.tenant_id)?,
        group: group_id(&view.group_id)?,
        state: conversation_state(&view.state)?,
        owner: optional_agent(&view.owner_agent_id)?,
        customer_name: view.customer_name.clone(),
        first_question: view.first_question.clone(),
        created_at_ms: view.created_at_ms,
        accepted_at_ms: optional_ms(view.accepted_at_ms),
        closed_at_ms: optional_ms(view.closed_at_ms),
        last_seq: view.last_seq,
        customer_away: view.customer_away,
    })
}

/// The view of a `ChatViewReply`, which must be there.
pub fn chat_view_from_reply(reply: &pb::ChatViewReply) -> Result<ChatView, Status> {
    chat_view_from_proto(reply.view.as_ref().ok_or_else(|| missing("chat view"))?)
}

pub fn agent_view_to_proto(view: &AgentView) -> AgentViewReply {
    AgentViewReply {
        tenant_id: view.tenant.to_string(),
        agent_id: view.agent.to_string(),
        status: view.status.as_str().to_owned(),
        capacity: view.capacity,
        group_ids: view.groups.iter().map(ToString::to_string).collect(),
        active_conversation_ids: view.active.iter().map(ToString::to_string).collect(),
    }
}

pub fn agent_view_from_proto(view: &AgentViewReply) -> Result<AgentView, Status> {
    Ok(AgentView {
        tenant: tenant_id(&view.tenant_id)?,
        agent: agent_id(&view.agent_id)?,
        status: agent_status(&view.status)?,
        capacity: view.capacity,
        groups: view.group_ids.iter().map(|id| group_id(id)).collect::<Result<_, _>>()?,
        active: view.active_conversation_ids.iter().map(|id| conversation_id(id)).collect::<Result<_, _>>()?,
    })
}

pub fn start_chat_to_proto(request: &StartChat) -> StartChatRequest {
    StartChatRequest {
        conversation_id: request.conversation.to_string(),
        tenant_id: request.tenant.to_string(),
        group_id: request.group.to_string(),
        customer_name: request.customer_name.clone(),
        question: request.question.clone(),
        tried_before: request.tried_before,
        customer_token: request.customer_token.clone(),
    }
}

pub fn start_chat_from_proto(request: &StartChatRequest) -> Result<StartChat, Status> {
    Ok(StartChat {
        conversation: conversation_id(&request.conversation_id)?,
        tenant: tenant_id(&request.tenant_id)?,
        group: group_id(&request.group_id)?,
        customer_name: request.customer_name.clone(),
        question: request.question.clone(),
        tried_before: request.tried_before,
        customer_token: request.customer_token.clone(),
    })
}

pub fn started_chat_to_proto(started: &StartedChat) -> StartedChatReply {
    StartedChatReply {
        view: Some(chat_view_to_proto(&started.view)),
        customer_token: started.customer_token.clone(),
        duplicate: started.duplicate,
    }
}

pub fn started_chat_from_proto(reply: &StartedChatReply) -> Result<StartedChat, Status> {
    Ok(StartedChat {
        view: chat_view_from_proto(reply.view.as_ref().ok_or_else(|| missing("chat view"))?)?,
        customer_token: reply.customer_token.clone(),
        duplicate: reply.duplicate,
    })
}

// ---- commands ----

pub fn command_to_proto(command: &ChatCommand) -> command_request::Command {
    match command {
        ChatCommand::Send { client_msg_id, body } => {
            command_request::Command::Send(SendCommand { client_msg_id: client_msg_id.clone(), body: body.clone() })
        }
        ChatCommand::ConfirmDelivery { up_to_seq } => command_request::Command::ConfirmDeliveryUpToSeq(*up_to_seq),
        ChatCommand::Close => command_request::Command::Close(pb::Empty {}),
        ChatCommand::Cancel => command_request::Command::Cancel(pb::Empty {}),
    }
}

pub fn command_from_proto(command: Option<&command_request::Command>) -> Result<ChatCommand, Status> {
    Ok(match command.ok_or_else(|| missing("command"))? {
        command_request::Command::Send(send) => {
            ChatCommand::Send { client_msg_id: send.client_msg_id.clone(), body: send.body.clone() }
        }
        command_request::Command::ConfirmDeliveryUpToSeq(up_to_seq) => {
            ChatCommand::ConfirmDelivery { up_to_seq: *up_to_seq }
        }
        command_request::Command::Close(_) => ChatCommand::Close,
        command_request::Command::Cancel(_) => ChatCommand::Cancel,
    })
}

pub fn outcome_to_proto(conversation: ConversationId, outcome: &CommandOutcome) -> CommandReply {
    CommandReply {
        event: outcome.event.as_ref().map(|event| event_to_record(conversation, event)),
        duplicate: outcome.duplicate,
    }
}

pub fn outcome_from_proto(reply: &CommandReply) -> Result<CommandOutcome, Status> {
    Ok(CommandOutcome { event: reply.event.as_ref().map(event_from_record).transpose()?, duplicate: reply.duplicate })
}

// ---- queues ----

pub fn waiting_entry_to_proto(entry: &WaitingEntry) -> WaitingEntryMsg {
    WaitingEntryMsg {
        conversation_id: entry.conversation.to_string(),
        group_id: entry.group.to_string(),
        queued_at_ms: entry.queued_at_ms,
        customer_name: entry.customer_name.clone(),
        question: entry.question.clone(),
    }
}

pub fn waiting_entry_from_proto(entry: &WaitingEntryMsg) -> Result<WaitingEntry, Status> {
    Ok(WaitingEntry {
        conversation: conversation_id(&entry.conversation_id)?,
        group: group_id(&entry.group_id)?,
        queued_at_ms: entry.queued_at_ms,
        customer_name: entry.customer_name.clone(),
        question: entry.question.clone(),
    })
}

pub fn left_queue_to_proto(conversation: ConversationId, reason: &LeftQueue) -> QueueRemoved {
    let cancel_reason = match reason {
        LeftQueue::Abandoned => CancelReason::Abandoned.as_str(),
        _ => "",
    };
    let (reason, agent, to_group) = match reason {
        LeftQueue::Accepted { agent } => ("accepted", agent.to_string(), String::new()),
        LeftQueue::Cancelled | LeftQueue::Abandoned => ("cancelled", String::new(), String::new()),
        LeftQueue::Closed => ("closed", String::new(), String::new()),
        LeftQueue::Transferred { to_group } => ("transferred", String::new(), to_group.to_string()),
    };
    QueueRemoved {
        conversation_id: conversation.to_string(),
        reason: reason.to_owned(),
        agent_id: agent,
        to_group_id: to_group,
        cancel_reason: cancel_reason.to_owned(),
    }
}

pub fn left_queue_from_proto(removed: &QueueRemoved) -> Result<(ConversationId, LeftQueue), Status> {
    let reason = match removed.reason.as_str() {
        "accepted" => LeftQueue::Accepted { agent: agent_id(&removed.agent_id)? },
        "cancelled" => match removed.cancel_reason.as_str() {
            "" => LeftQueue::Cancelled,
            "abandoned" => LeftQueue::Abandoned,
            other => return Err(invalid("reason a chat was cancelled", format_args!("{other:?}"))),
        },
        "closed" => LeftQueue::Closed,
        "transferred" => LeftQueue::Transferred { to_group: group_id(&removed.to_group_id)? },
        other => return Err(invalid("reason a chat left its queue", format_args!("{other:?}"))),
    };
    Ok((conversation_id(&removed.conversation_id)?, reason))
}

pub fn queue_change_to_proto(change: &QueueChange) -> push_queue::Change {
    match change {
        QueueChange::Snapshot { entries } => push_queue::Change::Snapshot(QueueSnapshot {
            entries: entries.iter().map(waiting_entry_to_proto).collect(),
        }),
        QueueChange::Added { entry } => push_queue::Change::Added(waiting_entry_to_proto(entry)),
        QueueChange::Removed { conversation, reason } => {
            push_queue::Change::Removed(left_queue_to_proto(*conversation, reason))
        }
        QueueChange::Estimate { wait_per_position_ms } => {
            push_queue::Change::Estimate(QueueEstimate { wait_per_position_ms: *wait_per_position_ms })
        }
    }
}

pub fn queue_change_from_proto(change: Option<&push_queue::Change>) -> Result<QueueChange, Status> {
    Ok(match change.ok_or_else(|| missing("queue change"))? {
        push_queue::Change::Snapshot(snapshot) => QueueChange::Snapshot {
            entries: snapshot.entries.iter().map(waiting_entry_from_proto).collect::<Result<_, _>>()?,
        },
        push_queue::Change::Added(entry) => QueueChange::Added { entry: waiting_entry_from_proto(entry)? },
        push_queue::Change::Removed(removed) => {
            let (conversation, reason) = left_queue_from_proto(removed)?;
            QueueChange::Removed { conversation, reason }
        }
        push_queue::Change::Estimate(estimate) => {
            QueueChange::Estimate { wait_per_position_ms: estimate.wait_per_position_ms }
        }
    })
}

// ---- agents ----

fn required<'a, T>(value: Option<&'a T>, what: &str) -> Result<&'a T, Status> {
    value.ok_or_else(|| missing(what))
}

/// An agent's push as the `PushAgent` change.
pub fn agent_change_to_proto(change: &AgentChange) -> push_agent::Change {
    match change {
        AgentChange::Offered { entry, expires_at_ms, waiting_since_us } => push_agent::Change::Offered(AgentOffered {
            entry: Some(waiting_entry_to_proto(entry)),
            expires_at_ms: *expires_at_ms,
            waiting_since_us: *waiting_since_us,
        }),
        AgentChange::OfferEnded { conversation, reason } => push_agent::Change::OfferEnded(AgentOfferEnded {
            conversation_id: conversation.to_string(),
            reason: offer_end_str(*reason).to_owned(),
            expires_at_ms: 0,
        }),
        AgentChange::Assigned { chat } => push_agent::Change::Assigned(chat_view_to_proto(chat)),
        AgentChange::Status { agent } => push_agent::Change::Status(agent_view_to_proto(agent)),
    }
}

/// The agent's push of a `PushAgent` change, which must be there.
pub fn agent_change_from_proto(change: Option<&push_agent::Change>) -> Result<AgentChange, Status> {
    Ok(match required(change, "agent change")? {
        push_agent::Change::Offered(offered) => AgentChange::Offered {
            entry: waiting_entry_from_proto(required(offered.entry.as_ref(), "offered entry")?)?,
            expires_at_ms: offered.expires_at_ms,
            waiting_since_us: offered.waiting_since_us,
        },
        push_agent::Change::OfferEnded(ended) => AgentChange::OfferEnded {
            conversation: conversation_id(&ended.conversation_id)?,
            reason: offer_end(&ended.reason)?,
        },
        push_agent::Change::Assigned(chat) => AgentChange::Assigned { chat: chat_view_from_proto(chat)? },
        push_agent::Change::Status(agent) => AgentChange::Status { agent: agent_view_from_proto(agent)? },
    })
}

/// An agent's availability; no offer is `""`.
pub fn availability_to_proto(availability: &AgentAvailability) -> AgentAvailabilityMsg {
    AgentAvailabilityMsg {
        agent_id: availability.agent.to_string(),
        status: availability.status.as_str().to_owned(),
        capacity: availability.capacity,
        held: availability.held,
        offer_conversation_id: availability.offer.map(|offer| offer.to_string()).unwrap_or_default(),
        idle_since_ms: availability.idle_since_ms,
        version_epoch: availability.version.epoch,
        version_change: availability.version.change,
    }
}

/// An agent's availability from the wire.
pub fn availability_from_proto(availability: &AgentAvailabilityMsg) -> Result<AgentAvailability, Status> {
    Ok(AgentAvailability {
        agent: agent_id(&availability.agent_id)?,
        status: agent_status(&availability.status)?,
        capacity: availability.capacity,
        held: availability.held,
        offer: match availability.offer_conversation_id.as_str() {
            "" => None,
            id => Some(conversation_id(id)?),
        },
        idle_since_ms: availability.idle_since_ms,
        version: AvailabilityVersion { epoch: availability.version_epoch, change: availability.version_change },
    })
}

/// What a queue's owner tells an agent's owner about an offer.
pub fn offer_update_to_proto(update: &OfferUpdate) -> agent_offer_request::Update {
    match update {
        OfferUpdate::Made { entry, expires_at_ms, waiting_since_us } => agent_offer_request::Update::Made(OfferMade {
            entry: Some(waiting_entry_to_proto(entry)),
            expires_at_ms: *expires_at_ms,
            waiting_since_us: *waiting_since_us,
        }),
        OfferUpdate::Ended { conversation, reason, expires_at_ms } => {
            agent_offer_request::Update::Ended(AgentOfferEnded {
                conversation_id: conversation.to_string(),
                reason: offer_end_str(*reason).to_owned(),
                expires_at_ms: expires_at_ms.unwrap_or(0),
            })
        }
    }
}

/// The offer update of an `AgentOfferRequest`, which must be there.
pub fn offer_update_from_proto(update: Option<&agent_offer_request::Update>) -> Result<OfferUpdate, Status> {
    Ok(match required(update, "offer update")? {
        agent_offer_request::Update::Made(made) => OfferUpdate::Made {
            entry: waiting_entry_from_proto(required(made.entry.as_ref(), "offered entry")?)?,
            expires_at_ms: made.expires_at_ms,
            waiting_since_us: made.waiting_since_us,
        },
        agent_offer_request::Update::Ended(ended) => OfferUpdate::Ended {
            conversation: conversation_id(&ended.conversation_id)?,
            reason: offer_end(&ended.reason)?,
            expires_at_ms: Some(ended.expires_at_ms).filter(|&expires_at_ms| expires_at_ms != 0),
        },
    })
}

/// The offers a gateway showed an agent's consoles, in an `AgentSubscriptionRequest`.
pub fn shown_offers_to_proto(shown: &[ShownOffer]) -> Vec<ShownOfferMsg> {
    let offer = |offer: &ShownOffer| ShownOfferMsg {
        conversation_id: offer.conversation.to_string(),
        expires_at_ms: offer.expires_at_ms,
    };
    shown.iter().map(offer).collect()
}

pub fn shown_offers_from_proto(shown: &[ShownOfferMsg]) -> Result<Vec<ShownOffer>, Status> {
    let offer = |offer: &ShownOfferMsg| {
        Ok(ShownOffer { conversation: conversation_id(&offer.conversation_id)?, expires_at_ms: offer.expires_at_ms })
    };
    shown.iter().map(offer).collect()
}

/// A command of the system to a conversation's owner.
pub fn system_command_to_proto(command: &SystemCommand) -> conversation_system_request::Command {
    use conversation_system_request::Command;
    match command {
        SystemCommand::Offer { agent, expires_at_ms, group } => Command::Offer(OfferCommand {
            agent_id: agent.to_string(),
            expires_at_ms: *expires_at_ms,
            group_id: group.as_ref().map(ToString::to_string).unwrap_or_default(),
        }),
        SystemCommand::EndOffer { agent, reason } => Command::EndOffer(EndOfferCommand {
            agent_id: agent.to_string(),
            reason: offer_end_str(*reason).to_owned(),
        }),
        SystemCommand::Requeue { agent, reason } => Command::Requeue(RequeueCommand {
            agent_id: agent.to_string(),
            reason: requeue_reason_str(*reason).to_owned(),
        }),
        SystemCommand::Abandon => Command::Abandon(AbandonCommand {}),
        SystemCommand::CustomerGone => Command::CustomerGone(CustomerGoneCommand {}),
    }
}

/// The command of a `ConversationSystemRequest`, which must be there.
pub fn system_command_from_proto(
    command: Option<&conversation_system_request::Command>,
) -> Result<SystemCommand, Status> {
    use conversation_system_request::Command;
    Ok(match required(command, "system command")? {
        Command::Offer(offer) => SystemCommand::Offer {
            agent: agent_id(&offer.agent_id)?,
            expires_at_ms: offer.expires_at_ms,
            group: if offer.group_id.is_empty() { None } else { Some(group_id(&offer.group_id)?) },
        },
        Command::EndOffer(end) => {
            SystemCommand::EndOffer { agent: agent_id(&end.agent_id)?, reason: offer_end(&end.reason)? }
        }
        Command::Requeue(requeue) => {
            SystemCommand::Requeue { agent: agent_id(&requeue.agent_id)?, reason: requeue_reason(&requeue.reason)? }
        }
        Command::Abandon(AbandonCommand {}) => SystemCommand::Abandon,
        Command::CustomerGone(CustomerGoneCommand {}) => SystemCommand::CustomerGone,
    })
}

// ---- offline messages ----

/// A customer's offline message as its request.
pub fn offline_message_to_proto(message: &OfflineMessage) -> OfflineMessageRequest {
    OfflineMessageRequest {
        tenant_id: message.tenant.to_string(),
        group_id: message.group.to_string(),
        customer_name: message.customer_name.clone(),
        contact: message.contact.clone(),
        body: message.body.clone(),
        reason: message.reason.clone(),
        idempotency_key: message.idempotency_key.clone(),
    }
}

/// A customer's offline message from its request (its texts are checked by the router).
pub fn offline_message_from_proto(message: &OfflineMessageRequest) -> Result<OfflineMessage, Status> {
    Ok(OfflineMessage {
        tenant: tenant_id(&message.tenant_id)?,
        group: group_id(&message.group_id)?,
        customer_name: message.customer_name.clone(),
        contact: message.contact.clone(),
        body: message.body.clone(),
        reason: message.reason.clone(),
        idempotency_key: message.idempotency_key.clone(),
    })
}

/// A stored ticket as its reply.
pub fn ticket_to_proto(ticket: &Ticket) -> TicketReply {
    TicketReply { id: ticket.id.clone(), created_at_ms: ticket.created_at_ms, duplicate: ticket.duplicate }
}

/// A stored ticket from its reply; a ticket has an id.
pub fn ticket_from_proto(ticket: &TicketReply) -> Result<Ticket, Status> {
    if ticket.id.is_empty() {
        return Err(missing("ticket id"));
    }
    Ok(Ticket { id: ticket.id.clone(), created_at_ms: ticket.created_at_ms, duplicate: ticket.duplicate })
}

// ---- pushes ----

pub fn push_to_frame(push: &Push) -> PushFrame {
    let push = match push {
        Push::Event { conversation, event, origin } => push_frame::Push::Event(PushEvent {
            conversation_id: conversation.to_string(),
            event: Some(event_to_record(*conversation, event)),
            received_at_us: origin.as_ref().map_or(0, |origin| origin.received_at_us),
            traceparent: origin.as_ref().and_then(|origin| origin.traceparent.clone()).unwrap_or_default(),
        }),
        Push::Typing { conversation, author, typing } => {
            let (role, id) = author_parts(author);
            push_frame::Push::Typing(PushTyping {
                conversation_id: conversation.to_string(),
                author_role: role.to_owned(),
                author_id: id.to_owned(),
                typing: *typing,
            })
        }
        Push::Queue { tenant, group, version, change } => push_frame::Push::Queue(PushQueue {
            tenant_id: tenant.to_string(),
            group_id: group.to_string(),
            version: *version,
            change: Some(queue_change_to_proto(change)),
        }),
        Push::Agent { tenant, agent, change } => push_frame::Push::Agent(PushAgent {
            tenant_id: tenant.to_string(),
            agent_id: agent.to_string(),
            change: Some(agent_change_to_proto(change)),
        }),
    };
    PushFrame { push: Some(push) }
}

/// The keepalive frame of a push stream.
pub fn keepalive_frame() -> PushFrame {
    PushFrame { push: Some(push_frame::Push::Keepalive(pb::Empty {})) }
}

/// The push in a frame, or `None` for a keepalive.
pub fn push_from_frame(frame: &PushFrame) -> Result<Option<Push>, Status> {
    Ok(Some(match frame.push.as_ref().ok_or_else(|| missing("push"))? {
        push_frame::Push::Keepalive(_) => return Ok(None),
        push_frame::Push::Event(push) => Push::Event {
            conversation: conversation_id(&push.conversation_id)?,
            event: Arc::new(event_from_record(push.event.as_ref().ok_or_else(|| missing("event"))?)?),
            origin: (push.received_at_us != 0 || !push.traceparent.is_empty()).then(|| Origin {
                received_at_us: push.received_at_us,
                traceparent: (!push.traceparent.is_empty()).then(|| push.traceparent.clone()),
            }),
        },
        push_frame::Push::Typing(push) => Push::Typing {
            conversation: conversation_id(&push.conversation_id)?,
            author: author(&push.author_role, &push.author_id)?,
            typing: push.typing,
        },
        push_frame::Push::Queue(push) => Push::Queue {
            tenant: tenant_id(&push.tenant_id)?,
            group: group_id(&push.group_id)?,
            version: push.version,
            change: queue_change_from_proto(push.change.as_ref())?,
        },
        push_frame::Push::Agent(push) => Push::Agent {
            tenant: tenant_id(&push.tenant_id)?,
            agent: agent_id(&push.agent_id)?,
            change: agent_change_from_proto(push.change.as_ref())?,
        },
    }))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use switchboard_domain::EventBody;
    use uuid::Uuid;

    use super::*;

    fn slug() -> impl Strategy<Value = String> {
        "[a-zA-Z0-9._-]{1,64}"
    }

    fn any_conversation() -> impl Strategy<Value = ConversationId> {
        any::<u128>().prop_map(|bits| ConversationId::from_uuid(Uuid::from_u128(bits)))
    }

    fn any_tenant() -> impl Strategy<Value = TenantId> {
        slug().prop_map(|text| TenantId::new(text).unwrap())
    }

    fn any_group() -> impl Strategy<Value = GroupId> {
        slug().prop_map(|text| GroupId::new(text).unwrap())
    }

    fn any_agent() -> impl Strategy<Value = AgentId> {
        slug().prop_map(|text| AgentId::new(text).unwrap())
    }

    /// A time as the domain uses them: never 0 (0 means "not yet" on the wire).
    fn any_ms() -> impl Strategy<Value = i64> {
        any::<i64>().prop_filter("0 means absent", |ms| *ms != 0)
    }

    fn any_author() -> impl Strategy<Value = Author> {
        prop_oneof![Just(Author::Customer), Just(Author::System), any_agent().prop_map(Author::Agent)]
    }

    fn any_state() -> impl Strategy<Value = ConversationState> {
        prop_oneof![
            Just(ConversationState::Queued),
            Just(ConversationState::Active),
            Just(ConversationState::Closed),
            Just(ConversationState::Cancelled),
        ]
    }

    fn any_body() -> impl Strategy<Value = EventBody> {
        prop_oneof![
            (any_group(), any::<String>(), any::<String>())
                .prop_map(|(group, customer_name, question)| EventBody::Created { group, customer_name, question }),
            any_agent().prop_map(|agent| EventBody::Accepted { agent }),
            any::<String>().prop_map(|body| EventBody::Message { body }),
            any::<u64>().prop_map(|up_to_seq| EventBody::Delivered { up_to_seq }),
            Just(EventBody::Closed),
            Just(EventBody::Cancelled { reason: None }),
            Just(EventBody::Cancelled { reason: Some(CancelReason::Abandoned) }),
            (any_agent(), any::<i64>()).prop_map(|(agent, expires_at_ms)| EventBody::Offered { agent, expires_at_ms }),
            (any_agent(), any_offer_end()).prop_map(|(agent, reason)| EventBody::OfferEnded { agent, reason }),
            (proptest::option::of(any_agent()), any_group())
                .prop_map(|(from_agent, to_group)| EventBody::Transferred { from_agent, to_group }),
            (proptest::option::of(any_agent()), any_agent())
                .prop_map(|(from_agent, to_agent)| EventBody::Forwarded { from_agent, to_agent }),
            any_agent().prop_map(|from_agent| EventBody::Requeued { from_agent, reason: RequeueReason::AgentOffline }),
            Just(EventBody::CustomerLeft),
            Just(EventBody::CustomerReturned),
        ]
    }

    fn any_offer_end() -> impl Strategy<Value = OfferEnd> {
        prop_oneof![Just(OfferEnd::Rejected), Just(OfferEnd::TimedOut), Just(OfferEnd::Withdrawn)]
    }

    fn any_event() -> impl Strategy<Value = Event> {
        (any::<u64>(), any::<i64>(), any_author(), proptest::option::of(any::<String>()), any_body())
            .prop_map(|(seq, at_ms, author, client_msg_id, body)| Event { seq, at_ms, author, client_msg_id, body })
    }

    fn any_caller() -> impl Strategy<Value = Caller> {
        prop_oneof![
            any_conversation().prop_map(|conversation| Caller::Customer { conversation }),
            (any_tenant(), any_agent()).prop_map(|(tenant, agent)| Caller::Agent { tenant, agent }),
        ]
    }

    fn any_view() -> impl Strategy<Value = ChatView> {
        (
            (any_conversation(), any_tenant(), any_group(), any_state(), proptest::option::of(any_agent())),
            (any::<String>(), any::<String>(), any::<i64>()),
            (proptest::option::of(any_ms()), proptest::option::of(any_ms()), any::<u64>(), any::<bool>()),
        )
            .prop_map(
                |(
                    (conversation, tenant, group, state, owner),
                    (customer_name, first_question, created_at_ms),
                    (accepted_at_ms, closed_at_ms, last_seq, customer_away),
                )| ChatView {
                    conversation,
                    tenant,
                    group,
                    state,
                    owner,
                    customer_name,
                    first_question,
                    created_at_ms,
                    accepted_at_ms,
                    closed_at_ms,
                    last_seq,
                    customer_away,
                },
            )
    }

    fn any_status() -> impl Strategy<Value = AgentStatus> {
        prop_oneof![Just(AgentStatus::Online), Just(AgentStatus::Away), Just(AgentStatus::Offline)]
    }

    fn any_agent_view() -> impl Strategy<Value = AgentView> {
        (
            any_tenant(),
            any_agent(),
            any_status(),
            any::<u32>(),
            proptest::collection::vec(any_group(), 0..4),
            proptest::collection::vec(any_conversation(), 0..4),
        )
            .prop_map(|(tenant, agent, status, capacity, groups, active)| AgentView {
                tenant,
                agent,
                status,
                capacity,
                groups,
                active,
            })
    }

    fn any_entry() -> impl Strategy<Value = WaitingEntry> {
        (any_conversation(), any_group(), any::<i64>(), any::<String>(), any::<String>()).prop_map(
            |(conversation, group, queued_at_ms, customer_name, question)| WaitingEntry {
                conversation,
                group,
                queued_at_ms,
                customer_name,
                question,
            },
        )
    }

    fn any_left() -> impl Strategy<Value = LeftQueue> {
        prop_oneof![
            any_agent().prop_map(|agent| LeftQueue::Accepted { agent }),
            Just(LeftQueue::Cancelled),
            Just(LeftQueue::Abandoned),
            Just(LeftQueue::Closed),
            any_group().prop_map(|to_group| LeftQueue::Transferred { to_group }),
        ]
    }

    fn any_change() -> impl Strategy<Value = QueueChange> {
        prop_oneof![
            proptest::collection::vec(any_entry(), 0..4).prop_map(|entries| QueueChange::Snapshot { entries }),
            any_entry().prop_map(|entry| QueueChange::Added { entry }),
            (any_conversation(), any_left())
                .prop_map(|(conversation, reason)| QueueChange::Removed { conversation, reason }),
            proptest::option::of(any::<u64>())
                .prop_map(|wait_per_position_ms| QueueChange::Estimate { wait_per_position_ms }),
        ]
    }

    fn any_agent_change() -> impl Strategy<Value = AgentChange> {
        prop_oneof![
            (any_entry(), any::<i64>(), any::<i64>()).prop_map(|(entry, expires_at_ms, waiting_since_us)| {
                AgentChange::Offered { entry, expires_at_ms, waiting_since_us }
            }),
            (any_conversation(), any_offer_end())
                .prop_map(|(conversation, reason)| AgentChange::OfferEnded { conversation, reason }),
            any_view().prop_map(|chat| AgentChange::Assigned { chat }),
            any_agent_view().prop_map(|agent| AgentChange::Status { agent }),
        ]
    }

    fn any_availability() -> impl Strategy<Value = AgentAvailability> {
        let fields = (any_agent(), any_status(), any::<u32>(), any::<u32>(), proptest::option::of(any_conversation()));
        (fields, any::<i64>(), any::<u64>(), any::<u64>()).prop_map(
            |((agent, status, capacity, held, offer), idle_since_ms, epoch, change)| AgentAvailability {
                agent,
                status,
                capacity,
                held,
                offer,
                idle_since_ms,
                version: AvailabilityVersion { epoch, change },
            },
        )
    }

    fn any_offer_update() -> impl Strategy<Value = OfferUpdate> {
        prop_oneof![
            (any_entry(), any::<i64>(), any::<i64>()).prop_map(|(entry, expires_at_ms, waiting_since_us)| {
                OfferUpdate::Made { entry, expires_at_ms, waiting_since_us }
            }),
            (
                any_conversation(),
                any_offer_end(),
                proptest::option::of(any::<i64>().prop_filter("0 is none", |&ms| ms != 0))
            )
                .prop_map(|(conversation, reason, expires_at_ms)| OfferUpdate::Ended {
                    conversation,
                    reason,
                    expires_at_ms
                }),
        ]
    }

    fn any_system_command() -> impl Strategy<Value = SystemCommand> {
        prop_oneof![
            (any_agent(), any::<i64>(), proptest::option::of(any_group()))
                .prop_map(|(agent, expires_at_ms, group)| SystemCommand::Offer { agent, expires_at_ms, group }),
            (any_agent(), any_offer_end()).prop_map(|(agent, reason)| SystemCommand::EndOffer { agent, reason }),
            any_agent().prop_map(|agent| SystemCommand::Requeue { agent, reason: RequeueReason::AgentOffline }),
            Just(SystemCommand::Abandon),
            Just(SystemCommand::CustomerGone),
        ]
    }

    fn any_offline_message() -> impl Strategy<Value = OfflineMessage> {
        (
            (any_tenant(), any_group(), any::<String>(), any::<String>()),
            (any::<String>(), any::<String>(), any::<String>()),
        )
            .prop_map(|((tenant, group, customer_name, contact), (body, reason, idempotency_key))| {
                OfflineMessage { tenant, group, customer_name, contact, body, reason, idempotency_key }
            })
    }

    fn any_push() -> impl Strategy<Value = Push> {
        prop_oneof![
            (any_conversation(), any_event()).prop_map(|(conversation, event)| Push::Event {
                conversation,
                event: Arc::new(event),
                origin: None
            }),
            (any_conversation(), any_author(), any::<bool>()).prop_map(|(conversation, author, typing)| Push::Typing {
                conversation,
                author,
                typing
            }),
            (any_tenant(), any_group(), any::<u64>(), any_change())
                .prop_map(|(tenant, group, version, change)| Push::Queue { tenant, group, version, change }),
            (any_tenant(), any_agent(), any_agent_change()).prop_map(|(tenant, agent, change)| Push::Agent {
                tenant,
                agent,
                change
            }),
        ]
    }

    fn any_command() -> impl Strategy<Value = ChatCommand> {
        prop_oneof![
            (any::<String>(), any::<String>())
                .prop_map(|(client_msg_id, body)| ChatCommand::Send { client_msg_id, body }),
            any::<u64>().prop_map(|up_to_seq| ChatCommand::ConfirmDelivery { up_to_seq }),
            Just(ChatCommand::Close),
            Just(ChatCommand::Cancel),
        ]
    }

    /// Encodes and decodes a message, as the wire does.
    fn wire<M: prost::Message + Default>(message: &M) -> M {
        M::decode(message.encode_to_vec().as_slice()).unwrap()
    }

    proptest! {
        #[test]
        fn callers_round_trip(caller in any_caller()) {
            prop_assert_eq!(caller_from_proto(Some(&wire(&caller_to_proto(&caller))))?, caller);
        }

        #[test]
        fn chat_views_round_trip(view in any_view()) {
            prop_assert_eq!(chat_view_from_proto(&wire(&chat_view_to_proto(&view)))?, view);
        }

        #[test]
        fn agent_views_round_trip(view in any_agent_view()) {
            prop_assert_eq!(agent_view_from_proto(&wire(&agent_view_to_proto(&view)))?, view);
        }

        #[test]
        fn shown_offers_round_trip(
            shown in proptest::collection::vec((any_conversation(), any::<i64>()), 0..4),
        ) {
            let shown: Vec<ShownOffer> = shown
                .into_iter()
                .map(|(conversation, expires_at_ms)| ShownOffer { conversation, expires_at_ms })
                .collect();
            let request = pb::AgentSubscriptionRequest { shown_offers: shown_offers_to_proto(&shown), ..Default::default() };
            prop_assert_eq!(shown_offers_from_proto(&wire(&request).shown_offers)?, shown);
        }

        #[test]
        fn waiting_entries_round_trip(entry in any_entry()) {
            prop_assert_eq!(waiting_entry_from_proto(&wire(&waiting_entry_to_proto(&entry)))?, entry);
        }

        #[test]
        fn pushes_round_trip(push in any_push()) {
            prop_assert_eq!(push_from_frame(&wire(&push_to_frame(&push)))?, Some(push));
        }

        #[test]
        fn availabilities_round_trip(availability in any_availability()) {
            prop_assert_eq!(availability_from_proto(&wire(&availability_to_proto(&availability)))?, availability);
        }

        #[test]
        fn offer_updates_round_trip(update in any_offer_update(), tenant in any_tenant(), agent in any_agent()) {
            let request = pb::AgentOfferRequest {
                tenant_id: tenant.to_string(),
                agent_id: agent.to_string(),
                update: Some(offer_update_to_proto(&update)),
            };
            prop_assert_eq!(offer_update_from_proto(wire(&request).update.as_ref())?, update);
        }

        #[test]
        fn system_commands_round_trip(command in any_system_command(), conversation in any_conversation()) {
            let request = pb::ConversationSystemRequest {
                conversation_id: conversation.to_string(),
                command: Some(system_command_to_proto(&command)),
            };
            prop_assert_eq!(system_command_from_proto(wire(&request).command.as_ref())?, command);
        }

        #[test]
        fn offline_messages_and_tickets_round_trip(
            message in any_offline_message(),
            id in "[a-z0-9-]{1,40}",
            created_at_ms in any::<i64>(),
            duplicate in any::<bool>(),
        ) {
            prop_assert_eq!(offline_message_from_proto(&wire(&offline_message_to_proto(&message)))?, message);
            let ticket = Ticket { id, created_at_ms, duplicate };
            prop_assert_eq!(ticket_from_proto(&wire(&ticket_to_proto(&ticket)))?, ticket);
        }

        #[test]
        fn commands_round_trip(command in any_command(), conversation in any_conversation()) {
            let request = pb::CommandRequest {
                caller: None,
                conversation_id: conversation.to_string(),
                command: Some(command_to_proto(&command)),
            };
            prop_assert_eq!(command_from_proto(wire(&request).command.as_ref())?, command);
        }

        #[test]
        fn outcomes_round_trip(
            conversation in any_conversation(),
            event in proptest::option::of(any_event()),
            duplicate in any::<bool>(),
        ) {
            let outcome = CommandOutcome { event, duplicate };
            prop_assert_eq!(outcome_from_proto(&wire(&outcome_to_proto(conversation, &outcome)))?, outcome);
        }

        #[test]
        fn started_chats_round_trip(view in any_view(), customer_token in any::<String>(), tried_before in any::<bool>()) {
            let request = StartChat {
                conversation: view.conversation,
                tenant: view.tenant.clone(),
                group: view.group.clone(),
                customer_name: view.customer_name.clone(),
                question: view.first_question.clone(),
                tried_before,
                customer_token: customer_token.clone(),
            };
            prop_assert_eq!(start_chat_from_proto(&wire(&start_chat_to_proto(&request)))?, request);
            for duplicate in [false, true] {
                let started = StartedChat { view: view.clone(), customer_token: customer_token.clone(), duplicate };
                prop_assert_eq!(started_chat_from_proto(&wire(&started_chat_to_proto(&started)))?, started);
            }
        }

        /// Whatever arrives, reading it answers a value or an error: never a panic.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            use prost::Message;
            if let Ok(frame) = PushFrame::decode(bytes.as_slice()) {
                let _ = push_from_frame(&frame);
            }
            if let Ok(view) = ChatViewMsg::decode(bytes.as_slice()) {
                let _ = chat_view_from_proto(&view);
            }
            if let Ok(view) = AgentViewReply::decode(bytes.as_slice()) {
                let _ = agent_view_from_proto(&view);
            }
            if let Ok(request) = pb::CommandRequest::decode(bytes.as_slice()) {
                let _ = caller_from_proto(request.caller.as_ref());
                let _ = command_from_proto(request.command.as_ref());
            }
            if let Ok(request) = pb::ConversationSystemRequest::decode(bytes.as_slice()) {
                let _ = system_command_from_proto(request.command.as_ref());
            }
            if let Ok(request) = pb::AgentOfferRequest::decode(bytes.as_slice()) {
                let _ = offer_update_from_proto(request.update.as_ref());
            }
            if let Ok(availability) = AgentAvailabilityMsg::decode(bytes.as_slice()) {
                let _ = availability_from_proto(&availability);
            }
            if let Ok(message) = OfflineMessageRequest::decode(bytes.as_slice()) {
                let _ = offline_message_from_proto(&message);
            }
        }
    }

    #[test]
    fn enum_strings_round_trip() {
        for status in [AgentStatus::Online, AgentStatus::Away, AgentStatus::Offline] {
            assert_eq!(agent_status(status.as_str()).unwrap(), status);
            // The same spelling as the domain's serde (the public protocol).
            assert_eq!(serde_json::to_string(&status).unwrap(), format!("\"{}\"", status.as_str()));
        }
        for list in [ChatList::Ongoing, ChatList::Closed] {
            assert_eq!(chat_list(chat_list_str(list)).unwrap(), list);
        }
        for reason in [OfferEnd::Rejected, OfferEnd::TimedOut, OfferEnd::Withdrawn] {
            assert_eq!(offer_end(offer_end_str(reason)).unwrap(), reason);
            assert_eq!(serde_json::to_string(&reason).unwrap(), format!("\"{}\"", offer_end_str(reason)));
        }
        let reason = RequeueReason::AgentOffline;
        assert_eq!(requeue_reason(requeue_reason_str(reason)).unwrap(), reason);
        assert_eq!(serde_json::to_string(&reason).unwrap(), format!("\"{}\"", requeue_reason_str(reason)));
    }

    #[test]
    fn bad_input_from_the_wire_is_invalid_argument() {
        let code = |result: Result<(), Status>| result.unwrap_err().code();
        let invalid = tonic::Code::InvalidArgument;
        assert_eq!(code(conversation_id("not-a-uuid").map(drop)), invalid);
        assert_eq!(code(tenant_id("").map(drop)), invalid);
        assert_eq!(code(group_id("a/b").map(drop)), invalid);
        assert_eq!(code(agent_id("a b").map(drop)), invalid);
        assert_eq!(code(gateway_id("").map(drop)), invalid);
        assert_eq!(code(agent_status("busy").map(drop)), invalid);
        assert_eq!(code(chat_list("all").map(drop)), invalid);
        assert_eq!(code(author("robot", "").map(drop)), invalid);
        assert_eq!(code(author("agent", "").map(drop)), invalid);
        assert_eq!(code(caller_from_proto(None).map(drop)), invalid);
        assert_eq!(code(caller_from_proto(Some(&pb::Caller { who: None })).map(drop)), invalid);
        assert_eq!(code(command_from_proto(None).map(drop)), invalid);
        assert_eq!(code(push_from_frame(&PushFrame { push: None }).map(drop)), invalid);
        let event = PushFrame {
            push: Some(push_frame::Push::Event(PushEvent {
                conversation_id: Uuid::nil().to_string(),
                event: None,
                ..Default::default()
            })),
        };
        assert_eq!(code(push_from_frame(&event).map(drop)), invalid);
        let corrupt = EventRecord { payload_json: "{".into(), ..Default::default() };
        assert_eq!(code(event_from_record(&corrupt).map(drop)), invalid);
        let view = ChatViewMsg { state: "pending".into(), ..Default::default() };
        assert_eq!(code(chat_view_from_proto(&view).map(drop)), invalid);
        let removed = QueueRemoved {
            conversation_id: Uuid::nil().to_string(),
            reason: "accepted".into(),
            agent_id: String::new(),
            to_group_id: String::new(),
            cancel_reason: String::new(),
        };
        assert_eq!(code(left_queue_from_proto(&removed).map(drop)), invalid, "accepted names its agent");
        let removed = QueueRemoved { reason: "expired".into(), ..removed };
        assert_eq!(code(left_queue_from_proto(&removed).map(drop)), invalid);
        assert_eq!(code(queue_change_from_proto(None).map(drop)), invalid);
        let removed = QueueRemoved {
            conversation_id: Uuid::nil().to_string(),
            reason: "cancelled".into(),
            cancel_reason: "bored".into(),
            ..Default::default()
        };
        assert_eq!(code(left_queue_from_proto(&removed).map(drop)), invalid, "an unknown reason of a cancellation");
        let removed = QueueRemoved { reason: "transferred".into(), ..Default::default() };
        assert_eq!(code(left_queue_from_proto(&removed).map(drop)), invalid, "transferred names its group");
        assert_eq!(code(offer_end("declined").map(drop)), invalid);
        assert_eq!(code(requeue_reason("bored").map(drop)), invalid);
        assert_eq!(code(agent_change_from_proto(None).map(drop)), invalid);
        let offered = push_agent::Change::Offered(AgentOffered { entry: None, expires_at_ms: 1, waiting_since_us: 0 });
        assert_eq!(code(agent_change_from_proto(Some(&offered)).map(drop)), invalid);
        assert_eq!(code(offer_update_from_proto(None).map(drop)), invalid);
        assert_eq!(code(system_command_from_proto(None).map(drop)), invalid);
        let availability = AgentAvailabilityMsg {
            agent_id: "a".into(),
            status: "online".into(),
            offer_conversation_id: "x".into(),
            ..Default::default()
        };
        assert_eq!(code(availability_from_proto(&availability).map(drop)), invalid);
        assert_eq!(code(ticket_from_proto(&TicketReply::default()).map(drop)), invalid);
        let message =
            OfflineMessageRequest { tenant_id: "acme".into(), group_id: "no/group".into(), ..Default::default() };
        assert_eq!(code(offline_message_from_proto(&message).map(drop)), invalid);
        assert_eq!(code(chat_view_from_reply(&pb::ChatViewReply { view: None }).map(drop)), invalid);
    }

    #[test]
    fn a_keepalive_is_no_push() {
        assert_eq!(push_from_frame(&keepalive_frame()).unwrap(), None);
    }
}
