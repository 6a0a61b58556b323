//! The conversation actor: one per conversation, on the node that owns its shard. It serialises every
//! command on its chat, appends the events through the store under its fence, and only then replies and
//! pushes the events to the subscribed gateways.

use std::sync::Arc;
use std::time::Duration;
use switchboard_telemetry::names;
use tracing::Instrument;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use switchboard_domain::{
    AgentId, Author, CancelReason, Command, Conversation, ConversationId, ConversationState, Event, EventBody, Fence,
    GroupId, NewConversation, Refusal, Routing, WaitingEntry, apply, conversation_key, customer_token_matches, decide,
    new_customer_token, queue_key, stored_customer_token, unhashed_customer_token,
};
use switchboard_presence::Connections;
use switchboard_proto::convert::{conversation_from_record, dedupe_key, event_from_record, new_event};
use switchboard_proto::internal::v1::{
    self as pb, AppendRequest, ConversationRecord, ConversationUpdate, GetConversationRequest, ReadEventsRequest,
};
use switchboard_proto::router::{
    Caller, ChatCommand, ChatView, CommandOutcome, EventPage, GatewayId, LeftQueue, Origin, Push, RouterError,
    StartedChat, SystemCommand,
};
use tracing::{debug, warn};

use crate::context::Context;
use crate::error::from_store;
use crate::handles::QueueHandle;
use crate::recent::RecentEvents;
use crate::remote;

type Reply<T> = RpcReplyPort<Result<T, RouterError>>;

pub(crate) enum ConversationMsg {
    /// Sent by a finished chat's actor to itself at the end of turn `turn`: it stops if no message came in
    /// between (see [`ConversationActor::handle`]).
    Passivate {
        turn: u64,
    },
    View {
        caller: Option<Caller>,
        reply: Reply<ChatView>,
    },
    /// A start carried out before, sent again (see [`create`]). `first_group` is the group of the stored
    /// `created` event (`None`: not at hand, the chat's group now).
    Started {
        start: Box<NewConversation>,
        first_group: Option<GroupId>,
        /// The token the start sent again carries.
        customer_token: String,
        reply: Reply<StartedChat>,
    },
    CheckToken {
        token: String,
        reply: Reply<ChatView>,
    },
    Subscribe {
        gateway: GatewayId,
        caller: Caller,
        after_seq: u64,
        reply: Reply<EventPage>,
    },
    /// Forgets the gateway again in the actor's turn, after a subscription of its own that waited in the
    /// mailbox (one whose caller gave up on it).
    Unsubscribe {
        gateway: GatewayId,
    },
    ReadEvents {
        caller: Caller,
        after_seq: u64,
        reply: Reply<EventPage>,
    },
    Command {
        caller: Caller,
        command: ChatCommand,
        trace: Trace,
        reply: Reply<CommandOutcome>,
    },
    Accept {
        agent: AgentId,
        reply: Reply<ChatView>,
    },
    Typing {
        caller: Caller,
        typing: bool,
        reply: Reply<()>,
    },
    /// A connection of the customer began or ended at a gateway: presence is read again.
    CustomerConnection,
    /// What presence said of the customer at the actor's `read`th reading (`None`: it could not be read).
    /// `confirming`: a reading made after earlier ones found them gone for the confirmation span (the timer of
    /// an earlier reading, or the agent's owner's telling).
    CustomerRead {
        read: u64,
        presence: Option<Connections>,
        confirming: bool,
    },
    /// The wait that followed the `read`th reading, which found the customer gone, is over.
    CustomerGrace {
        read: u64,
    },
    System {
        command: SystemCommand,
        reply: Reply<bool>,
    },
    Transfer {
        caller: Caller,
        to_group: GroupId,
        reply: Reply<ChatView>,
    },
    Forward {
        caller: Caller,
        to_agent: AgentId,
        reply: Reply<ChatView>,
    },
}

pub(crate) struct ConversationActor;

/// The context of the request behind a command: its span (the parent of the actor's work on it) and when it
/// reached its first gateway. The events it causes are pushed with both.
pub(crate) struct Trace {
    span: tracing::Span,
    received_at_us: Option<i64>,
}

impl Trace {
    /// The context of the task sending the command.
    pub(crate) fn here() -> Trace {
        Trace { span: tracing::Span::current(), received_at_us: switchboard_telemetry::trace::received_at_us() }
    }
}

pub(crate) struct ConversationActorState {
    context: Arc<Context>,
    conversation: Conversation,
    /// What the store keeps of the customer's token (its hash).
    stored_token: String,
    fence: Fence,
    /// While a command is handled: when its request reached the first gateway.
    received_at_us: Option<i64>,
    /// The newest events of the log this actor appended, which answer most catch-ups without a store read.
    recent: RecentEvents,
    /// The pushes of the message being handled, sent once it is answered: the caller's connection then
    /// writes its ack and the events the ack returns together, before their pushes reach it.
    pushes: Vec<Push>,
    /// The messages handled, `Passivate` aside.
    turns: u64,
    /// The readings of the customer's presence begun: only the answer of the last one counts (an earlier
    /// one may answer later, with what was true before).
    customer_reads: u64,
}

pub(crate) struct Loaded {
    context: Arc<Context>,
    conversation: Conversation,
    stored_token: String,
    fence: Fence,
    recent: RecentEvents,
}

impl Actor for ConversationActor {
    type Msg = ConversationMsg;
    type State = ConversationActorState;
    type Arguments = Loaded;

    async fn pre_start(&self, myself: ActorRef<Self::Msg>, loaded: Loaded) -> Result<Self::State, ActorProcessingErr> {
        metrics::gauge!(names::ROUTER_ACTORS, "kind" => "conversation").increment(1.0);
        let mut state = ConversationActorState {
            context: loaded.context,
            conversation: loaded.conversation,
            stored_token: loaded.stored_token,
            fence: loaded.fence,
            received_at_us: None,
            recent: loaded.recent,
            pushes: Vec::new(),
            turns: 0,
            customer_reads: 0,
        };
        // An active chat activated here (its shard moved, its actor stopped) reads its customer's presence:
        // the timer of a departure seen by the actor before was lost with it (presence says since when they
        // are gone, from which the grace period goes on).
        if state.conversation.state == ConversationState::Active {
            state.read_customer(&myself, false);
        }
        Ok(state)
    }

    async fn post_stop(&self, myself: ActorRef<Self::Msg>, state: &mut Self::State) -> Result<(), ActorProcessingErr> {
        metrics::gauge!(names::ROUTER_ACTORS, "kind" => "conversation").decrement(1.0);
        state.context.conversations.forget(&state.conversation.id, &myself);
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let handled = self.handle_message(myself, message, state).await;
        state.send_pushes();
        handled
    }
}

impl ConversationActor {
    async fn handle_message(
        &self,
        myself: ActorRef<ConversationMsg>,
        message: ConversationMsg,
        state: &mut ConversationActorState,
    ) -> Result<(), ActorProcessingErr> {
        if let ConversationMsg::Passivate { turn } = message {
            if turn == state.turns {
                myself.stop(None);
            }
            return Ok(());
        }
        state.turns += 1;
        let was_active = state.conversation.state == ConversationState::Active;
        match message {
            ConversationMsg::Passivate { .. } => {}
            ConversationMsg::View { caller, reply } => {
                let result = match caller {
                    Some(caller) => state.authorize(&caller).map(|()| state.view()),
                    None => Ok(state.view()),
                };
                let _ = reply.send(result);
            }
            ConversationMsg::Started { start, first_group, customer_token, reply } => {
                let _ = reply.send(state.started_again(&start, first_group.as_ref(), customer_token).await);
            }
            ConversationMsg::CheckToken { token, reply } => {
                let result = if customer_token_matches(&state.stored_token, &token) {
                    Ok(state.view())
                } else {
                    Err(RouterError::NotFound)
                };
                let _ = reply.send(result);
            }
            ConversationMsg::Subscribe { gateway, caller, after_seq, reply } => {
                let result = match state.authorize(&caller) {
                    Ok(()) => state.read(after_seq).await,
                    Err(error) => Err(error),
                };
                match &result {
                    // Its caller gave up on it (a timeout, a cancelled request): the gateway was told it failed,
                    // may have unsubscribed since, and would be pushed events it drops.
                    Ok(_) if reply.is_closed() => {
                        debug!(conversation = %state.conversation.id, ?gateway, "subscription given up by its caller: not kept");
                    }
                    Ok(page) => {
                        debug!(conversation = %state.conversation.id, ?gateway, after_seq, n_events = page.events.len(), "gateway subscribed");
                        state.context.subscribers.add(state.conversation.id, gateway);
                    }
                    Err(_) => {}
                }
                let _ = reply.send(result);
            }
            ConversationMsg::Unsubscribe { gateway } => {
                state.context.subscribers.remove(state.conversation.id, &gateway);
            }
            ConversationMsg::ReadEvents { caller, after_seq, reply } => {
                let result = match state.authorize(&caller) {
                    Ok(()) => state.read(after_seq).await,
                    Err(error) => Err(error),
                };
                let _ = reply.send(result);
            }
            ConversationMsg::Command { caller, command, trace, reply } => {
                let span = tracing::info_span!(
                    parent: &trace.span,
                    "conversation.command",
                    conversation = %state.conversation.id,
                );
                state.received_at_us = trace.received_at_us;
                let result = state.command(&caller, command).instrument(span).await;
                state.received_at_us = None;
                let failed = stop_on_store_failure(&myself, &result);
                let _ = reply.send(result);
                if failed {
                    return Ok(());
                }
            }
            ConversationMsg::Accept { agent, reply } => {
                let command = Command::Accept { agent: agent.clone(), offered_only: state.routed_by_offer() };
                let result = state.decide_and_append(Author::Agent(agent), &command, None).await;
                let failed = stop_on_store_failure(&myself, &result);
                let _ = reply.send(result.map(|_| state.view()));
                if failed {
                    return Ok(());
                }
            }
            ConversationMsg::System { command, reply } => {
                // A queue that still lists a chat now waiting in another group (moved away while a late
                // hand-over listed it there) does not offer it to its own agents.
                if let SystemCommand::Offer { group: Some(group), .. } = &command
                    && *group != state.conversation.group
                {
                    let _ = reply.send(Err(RouterError::Refused(Refusal::NotInGroup)));
                    return Ok(());
                }
                let command = match command {
                    SystemCommand::Offer { agent, expires_at_ms, .. } => Some(Command::Offer { agent, expires_at_ms }),
                    SystemCommand::EndOffer { agent, reason } => Some(Command::EndOffer { agent, reason }),
                    SystemCommand::Requeue { agent, reason } => Some(Command::Requeue { agent, reason }),
                    SystemCommand::Abandon => Some(Command::Abandon),
                    // Presence is read first: what it finds is recorded when it answers.
                    SystemCommand::CustomerGone => None,
                };
                if let Some(command) = command {
                    let result = state.decide_and_append(Author::System, &command, None).await;
                    let failed = stop_on_store_failure(&myself, &result);
                    let _ = reply.send(result.map(|outcome| outcome.event.is_some() && !outcome.duplicate));
                    if failed {
                        return Ok(());
                    }
                } else {
                    state.customer_found_gone(&myself);
                    let _ = reply.send(Ok(false));
                }
            }
            ConversationMsg::Transfer { caller, to_group, reply } => {
                let result = state.transfer(&caller, to_group).await;
                let failed = stop_on_store_failure(&myself, &result);
                let _ = reply.send(result);
                if failed {
                    return Ok(());
                }
            }
            ConversationMsg::Forward { caller, to_agent, reply } => {
                let result = match state.authorize(&caller) {
                    Ok(()) => {
                        let command = Command::Forward { by: caller.author(), to_agent };
                        state.decide_and_append(caller.author(), &command, None).await.map(|_| state.view())
                    }
                    Err(error) => Err(error),
                };
                let failed = stop_on_store_failure(&myself, &result);
                let _ = reply.send(result);
                if failed {
                    return Ok(());
                }
            }
            ConversationMsg::Typing { caller, typing, reply } => {
                let result = state.typing(&caller, typing);
                let _ = reply.send(result);
            }
            ConversationMsg::CustomerConnection => state.read_customer(&myself, false),
            ConversationMsg::CustomerGrace { read } => {
                if read == state.customer_reads {
                    state.read_customer(&myself, true);
                }
            }
            // An earlier reading answering late is ignored (not returned from: a finished chat passivates below).
            ConversationMsg::CustomerRead { read, presence, confirming } if read == state.customer_reads => {
                let result = state.customer_read(&myself, presence, confirming).await;
                if stop_on_store_failure(&myself, &result) {
                    return Ok(());
                }
            }
            ConversationMsg::CustomerRead { .. } => {}
        }
        if !was_active && state.conversation.state == ConversationState::Active {
            // Accepted or forwarded from a queue: the customer may have gone while it waited, unseen by the
            // queue so far (or not for long enough to abandon it).
            state.read_customer(&myself, false);
        }
        if state.conversation.state.is_finished() {
            // Passivate: a finished chat need not stay in memory. Its subscribers are the context's, not the
            // actor's: what comes later (a delivery mark) activates it again from the store and is pushed to
            // them. Consoles keep their closed chats open for hours; the chats need not stay loaded for that.
            // Not at once: a stop drops what waits in the mailbox, and its callers would be told
            // `unavailable` (a retry finds the next actor, which may stop under the one after). The actor
            // stops when its own message comes round with no other handled before it.
            let _ = myself.cast(ConversationMsg::Passivate { turn: state.turns });
        }
        Ok(())
    }
}

/// After a store failure the actor cannot know whether the write committed: it stops, and the next use
/// activates it again from what the store holds.
fn stop_on_store_failure<T>(myself: &ActorRef<ConversationMsg>, result: &Result<T, RouterError>) -> bool {
    let failed = matches!(result, Err(RouterError::Unavailable(_) | RouterError::NotOwner | RouterError::Internal(_)));
    if failed {
        myself.stop(Some("store write failed".into()));
    }
    failed
}

impl ConversationActorState {
    fn view(&self) -> ChatView {
        view_of(&self.conversation)
    }

    /// The answer to a start sent again: the chat as it is now, with its token, if the first start was for
    /// the same chat and `customer_token` is its token (else `start_key_reused`, and nothing is done; a token
    /// stored before tokens were hashed is answered as it is). A chat still waiting is added to its
    /// queue again: the first start may have stored it and failed before its queue was told (the store's
    /// answer lost). It is told from here, in order with the chat's later changes; a queue that has the chat
    /// already ignores it.
    async fn started_again(
        &self,
        start: &NewConversation,
        first_group: Option<&GroupId>,
        customer_token: String,
    ) -> Result<StartedChat, RouterError> {
        let conversation = &self.conversation;
        // Without the `created` event, the group it was created in is the one it is in unless it was
        // transferred: a transferred chat's start, sent again, is answered as reused, never with another
        // group's chat.
        let same = conversation.tenant == start.tenant
            && *first_group.unwrap_or(&conversation.group) == start.group
            && conversation.customer_name == start.customer_name
            && conversation.first_question == start.question;
        if !same {
            return Err(RouterError::Refused(Refusal::StartKeyReused));
        }
        let customer_token = match unhashed_customer_token(&self.stored_token) {
            Some(unhashed) => unhashed.to_owned(),
            None if customer_token_matches(&self.stored_token, &customer_token) => customer_token,
            // Another token: a start through a gateway from before gateways chose tokens (it sends none).
            None => return Err(RouterError::Refused(Refusal::StartKeyReused)),
        };
        if conversation.state == ConversationState::Queued {
            remote::queue_add(&self.context, &conversation.tenant, waiting_entry(conversation)).await;
        }
        Ok(StartedChat { view: self.view(), customer_token, duplicate: true })
    }

    /// Whether the chat's group routes by offer (only the offered agent may accept).
    fn routed_by_offer(&self) -> bool {
        let conversation = &self.conversation;
        self.context
            .directory
            .group(&conversation.tenant, &conversation.group)
            .is_some_and(|group| matches!(group.routing, Routing::Push { .. }))
    }

    /// Moves the chat to another group's queue, if that group is online.
    async fn transfer(&mut self, caller: &Caller, to_group: GroupId) -> Result<ChatView, RouterError> {
        self.authorize(caller)?;
        let tenant = self.conversation.tenant.clone();
        if self.context.directory.group(&tenant, &to_group).is_none() {
            return Err(RouterError::UnknownGroup);
        }
        let command = Command::Transfer { by: caller.author(), to_group: to_group.clone() };
        // Refusals of the chat's own state first (a closed chat is closed, whatever the target).
        decide(&self.conversation, &command)?;
        if !crate::presence::group_online(&self.context, &tenant, &to_group).await {
            return Err(RouterError::Refused(Refusal::GroupOffline));
        }
        self.decide_and_append(caller.author(), &command, None).await?;
        Ok(self.view())
    }

    /// Customers see only their own chat; agents only their tenant's chats of their groups or their own.
    fn authorize(&self, caller: &Caller) -> Result<(), RouterError> {
        let conversation = &self.conversation;
        let allowed = match caller {
            Caller::Customer { conversation: id } => *id == conversation.id,
            Caller::Agent { tenant, agent } => {
                *tenant == conversation.tenant
                    && (conversation.is_owner(agent)
                        || self
                            .context
                            .directory
                            .agent(tenant, agent)
                            .is_some_and(|entry| entry.groups.contains(&conversation.group)))
            }
        };
        if allowed { Ok(()) } else { Err(RouterError::NotFound) }
    }

    /// The events after `after_seq`, a page of them (`Context::page_bytes`).
    async fn read(&self, after_seq: u64) -> Result<EventPage, RouterError> {
        let last_seq = self.conversation.last_seq;
        // A client cannot have received more than exists: it is refused, rather than believed (a gateway
        // would then take events it never had for received, and not fill a gap in them).
        if after_seq > last_seq {
            return Err(RouterError::Refused(Refusal::BadAfterSeq { last_seq }));
        }
        // A client that has everything gets nothing, without a store read.
        if after_seq == last_seq {
            return Ok(EventPage { events: Vec::new(), last_seq });
        }
        if let Some(events) = self.recent.after(after_seq, last_seq, self.context.page_bytes) {
            return Ok(EventPage { events, last_seq });
        }
        let events = read_page(&self.context, self.conversation.id, after_seq).await?;
        Ok(EventPage { events, last_seq })
    }

    fn typing(&mut self, caller: &Caller, typing: bool) -> Result<(), RouterError> {
        self.authorize(caller)?;
        let author = caller.author();
        let participant = match &author {
            Author::Agent(agent) => self.conversation.is_owner(agent),
            Author::Customer | Author::System => true,
        };
        if !participant {
            let refusal = match self.conversation.state {
                ConversationState::Queued => switchboard_domain::Refusal::NotAccepted,
                _ => switchboard_domain::Refusal::NotParticipant,
            };
            return Err(RouterError::Refused(refusal));
        }
        if self.conversation.state.is_finished() {
            return Err(RouterError::Refused(switchboard_domain::Refusal::ChatClosed));
        }
        let push = Push::Typing { conversation: self.conversation.id, author, typing };
        self.fan_out(push);
        Ok(())
    }

    /// Reads the customer's presence in a task of its own (the actor goes on meanwhile), which answers with
    /// a [`ConversationMsg::CustomerRead`]. Nothing once the chat ended.
    fn read_customer(&mut self, myself: &ActorRef<ConversationMsg>, confirming: bool) {
        if self.conversation.state.is_finished() {
            return;
        }
        self.customer_reads += 1;
        let (read, myself, context) = (self.customer_reads, myself.clone(), self.context.clone());
        let (tenant, conversation) = (self.conversation.tenant.clone(), self.conversation.id);
        tokio::spawn(async move {
            let now_ms = context.clock.now_ms();
            let presence = match context.presence.customers_present(&tenant, &[conversation], now_ms).await {
                Ok(present) => present.into_iter().next(),
                Err(error) => {
                    debug!(%conversation, %error, "the customer's presence not read");
                    None
                }
            };
            let _ = myself.cast(ConversationMsg::CustomerRead { read, presence, confirming });
        });
    }

    /// The agent's owner found the customer gone for the grace period, though no gateway told this chat of
    /// the end of their connection (see [`SystemCommand::CustomerGone`]): a confirming reading, which records
    /// `customer_left` if presence says they have been gone for the grace period still. Nothing when the chat
    /// is not active or the customer is recorded away already.
    fn customer_found_gone(&mut self, myself: &ActorRef<ConversationMsg>) {
        if self.conversation.state != ConversationState::Active || self.conversation.customer_away {
            return;
        }
        self.read_customer(myself, true);
    }

    /// What the last reading of the customer's presence found: a customer connected who had left returns. One
    /// gone from an ongoing chat has left once presence says they have been gone for the grace period (from
    /// the end or lapse of their last connection, whoever read it first) and readings have found them gone
    /// for the confirmation span (see [`crate::PresenceSettings::customer_confirm_ms`]): until then a
    /// confirming reading is timed for when both will hold (a connection that begins or ends meanwhile begins
    /// another reading, whose answer counts instead). A customer nobody recorded (`Unknown`: presence
    /// restarted empty, a gateway from before customers were recorded), or a reading that failed, changes
    /// nothing.
    async fn customer_read(
        &mut self,
        myself: &ActorRef<ConversationMsg>,
        presence: Option<Connections>,
        confirming: bool,
    ) -> Result<(), RouterError> {
        let here = match presence {
            Some(Connections::Here) => true,
            Some(Connections::Gone { since_ms }) => {
                let command = Command::CustomerPresence { here: false };
                if !matches!(decide(&self.conversation, &command), Ok(Some(_))) {
                    return Ok(());
                }
                let settings = &self.context.presence_settings;
                let grace_ms = settings.customer_grace_ms();
                let left_ms = grace_ms.saturating_sub(self.context.clock.now_ms().saturating_sub(since_ms));
                let wait_ms = if confirming { left_ms } else { left_ms.max(settings.customer_confirm_ms(grace_ms)) };
                if wait_ms > 0 {
                    let read = self.customer_reads;
                    let wait = Duration::from_millis(u64::try_from(wait_ms).unwrap_or(0));
                    myself.send_after(wait, move || ConversationMsg::CustomerGrace { read });
                    return Ok(());
                }
                false
            }
            Some(Connections::Unknown) | None => return Ok(()),
        };
        self.decide_and_append(Author::System, &Command::CustomerPresence { here }, None).await.map(|_| ())
    }

    async fn command(&mut self, caller: &Caller, command: ChatCommand) -> Result<CommandOutcome, RouterError> {
        self.authorize(caller)?;
        let author = caller.author();
        let (domain_command, client_msg_id) = match command {
            ChatCommand::Send { client_msg_id, body } => {
                (Command::Send { author: author.clone(), body }, Some(client_msg_id))
            }
            ChatCommand::ConfirmDelivery { up_to_seq } => {
                (Command::ConfirmDelivery { by: author.clone(), up_to_seq }, None)
            }
            ChatCommand::Close => (Command::Close { by: author.clone() }, None),
            ChatCommand::Cancel => (Command::Cancel { by: author.clone() }, None),
        };
        self.decide_and_append(author, &domain_command, client_msg_id).await
    }

    /// Decide, append under the fence, apply, push, and tell the queue and the agent what changed.
    async fn decide_and_append(
        &mut self,
        author: Author,
        command: &Command,
        client_msg_id: Option<String>,
    ) -> Result<CommandOutcome, RouterError> {
        // A resent message is answered from the store even when the chat has moved on since.
        let decision = decide(&self.conversation, command);
        let body = match (decision, &client_msg_id) {
            (Ok(Some(body)), _) => body,
            (Ok(None), _) => {
                return Ok(CommandOutcome { event: None, duplicate: false });
            }
            (Err(refusal), Some(_)) if matches!(command, Command::Send { .. }) => {
                return self.find_duplicate(&author, client_msg_id.as_deref(), refusal).await;
            }
            (Err(refusal), _) => return Err(RouterError::Refused(refusal)),
        };
        let event = Event { seq: 0, at_ms: self.context.clock.now_ms(), author, client_msg_id, body };
        // Messages only grow the log (the store keeps last_seq); the summary is rewritten only by the events
        // that change it. Its state is sent only when it changes: a state sent as `closed` gives the license
        // permit back, which locks the license row (a delivery mark on a closed chat need not).
        let update = event.body.changes_summary().then(|| {
            let mut next = self.conversation.clone();
            let seq = next.last_seq + 1;
            apply(&mut next, &Event { seq, ..event.clone() });
            let mut update = update_of(&next);
            if next.state == self.conversation.state {
                update.state.clear();
            }
            update
        });
        let (mut stored, duplicate) = self.append(vec![event], update, None).await?;
        let Some(stored) = stored.pop() else {
            return Err(RouterError::Internal("the store returned no event for an append".into()));
        };
        if !duplicate {
            let before = self.conversation.clone();
            apply(&mut self.conversation, &stored);
            let shared = Arc::new(stored.clone());
            self.recent.push(shared.clone());
            self.after_change(&stored, &before).await;
            let traceparent = switchboard_telemetry::trace::current_traceparent();
            let origin = (self.received_at_us.is_some() || traceparent.is_some())
                .then(|| Origin { received_at_us: self.received_at_us.unwrap_or(0), traceparent });
            self.fan_out(Push::Event { conversation: self.conversation.id, event: shared, origin });
        }
        Ok(CommandOutcome { event: Some(stored), duplicate })
    }

    /// A refused send may be the resend of a message stored before the refusal became true (the chat was
    /// closed meanwhile): the store's deduplication answers it.
    async fn find_duplicate(
        &self,
        author: &Author,
        client_msg_id: Option<&str>,
        refusal: switchboard_domain::Refusal,
    ) -> Result<CommandOutcome, RouterError> {
        let Some(client_msg_id) = client_msg_id else { return Err(RouterError::Refused(refusal)) };
        // Found by its key's index, however long the log.
        let request = ReadEventsRequest {
            conversation_id: self.conversation.id.to_string(),
            dedupe_key: dedupe_key(author, client_msg_id),
            ..Default::default()
        };
        let response = self.context.store.read_events(request).await.map_err(from_store)?;
        let found = response.events.first().map(event_from_record).transpose();
        match found.map_err(|error| RouterError::Internal(error.to_string()))? {
            Some(event) => Ok(CommandOutcome { event: Some(event), duplicate: true }),
            None => Err(RouterError::Refused(refusal)),
        }
    }

    async fn append(
        &self,
        events: Vec<Event>,
        update: Option<ConversationUpdate>,
        create: Option<ConversationRecord>,
    ) -> Result<(Vec<Event>, bool), RouterError> {
        // Self-fencing: a node that lost the shard stops writing even before the store would refuse.
        let key = conversation_key(&self.conversation.id);
        if self.context.shards.fence_for(&key)? != self.fence {
            return Err(RouterError::NotOwner);
        }
        let events = events.iter().map(new_event).collect();
        append(&self.context, self.conversation.id, self.fence, events, update, create).await
    }

    /// Tells the queues and agents what an event changed. `before` is the state before the event.
    async fn after_change(&self, event: &Event, before: &Conversation) {
        let conversation = &self.conversation;
        let finished = match &event.body {
            EventBody::Closed => Some("closed"),
            EventBody::Cancelled { reason: None } => Some("cancelled"),
            EventBody::Cancelled { reason: Some(reason) } => Some(reason.as_str()),
            _ => None,
        };
        if let Some(reason) = finished.filter(|_| !before.state.is_finished()) {
            let (tenant, group) = (conversation.tenant.to_string(), conversation.group.to_string());
            metrics::counter!(names::CHATS_FINISHED, "tenant" => tenant, "group" => group, "reason" => reason)
                .increment(1);
        }
        if matches!(event.body, EventBody::CustomerLeft) {
            let (tenant, group) = (conversation.tenant.to_string(), conversation.group.to_string());
            metrics::counter!(names::CUSTOMERS_LEFT, "tenant" => tenant, "group" => group).increment(1);
        }
        let was_queued = before.state == ConversationState::Queued;
        let left_queue = match &event.body {
            EventBody::Accepted { agent } => Some(LeftQueue::Accepted { agent: agent.clone() }),
            EventBody::Forwarded { to_agent, .. } if was_queued => {
                Some(LeftQueue::Accepted { agent: to_agent.clone() })
            }
            EventBody::Transferred { to_group, .. } if was_queued => {
                Some(LeftQueue::Transferred { to_group: to_group.clone() })
            }
            EventBody::Cancelled { reason: None } if was_queued => Some(LeftQueue::Cancelled),
            EventBody::Cancelled { reason: Some(CancelReason::Abandoned) } if was_queued => Some(LeftQueue::Abandoned),
            EventBody::Closed if was_queued => Some(LeftQueue::Closed),
            _ => None,
        };
        if let Some(reason) = left_queue {
            remote::queue_remove(&self.context, &before.tenant, &before.group, conversation.id, reason).await;
        }
        if matches!(event.body, EventBody::Transferred { .. } | EventBody::Requeued { .. }) {
            remote::queue_add(&self.context, &conversation.tenant, waiting_entry(conversation)).await;
        }
        // The previous owner's slot is free when the chat ended or moved away from them.
        if let Some(previous) = &before.owner
            && (conversation.owner.as_ref() != Some(previous) || conversation.state.is_finished())
        {
            remote::agent_finished(&self.context, &conversation.tenant, previous, conversation.id).await;
        }
    }

    /// Sends `push` to the gateways following the chat once the message being handled is answered.
    fn fan_out(&mut self, push: Push) {
        self.pushes.push(push);
    }

    /// Sends the pushes of the message just handled, in the order they were made.
    fn send_pushes(&mut self) {
        if self.pushes.is_empty() {
            return;
        }
        let gateways = self.context.subscribers.of(self.conversation.id);
        for push in std::mem::take(&mut self.pushes) {
            if let Push::Event { event, .. } = &push {
                debug!(conversation = %self.conversation.id, seq = event.seq, ?gateways, "event pushed");
            }
            for gateway in &gateways {
                self.context.gateways.push(gateway, push.clone());
            }
        }
    }
}

pub(crate) fn view_of(conversation: &Conversation) -> ChatView {
    ChatView {
        conversation: conversation.id,
        tenant: conversation.tenant.clone(),
        group: conversation.group.clone(),
        state: conversation.state,
        owner: conversation.owner.clone(),
        customer_name: conversation.customer_name.clone(),
        first_question: conversation.first_question.clone(),
        created_at_ms: conversation.created_at_ms,
        accepted_at_ms: conversation.accepted_at_ms,
        closed_at_ms: conversation.closed_at_ms,
        last_seq: conversation.last_seq,
        customer_away: conversation.customer_away,
    }
}

fn update_of(conversation: &Conversation) -> ConversationUpdate {
    ConversationUpdate {
        state: conversation.state.as_str().to_owned(),
        owner_agent_id: conversation.owner.as_ref().map(|agent| agent.to_string()).unwrap_or_default(),
        accepted_at_ms: conversation.accepted_at_ms.unwrap_or(0),
        closed_at_ms: conversation.closed_at_ms.unwrap_or(0),
        group_id: conversation.group.to_string(),
        queued_at_ms: conversation.queued_at_ms,
        offer_agent_id: conversation.offer.as_ref().map(|offer| offer.agent.to_string()).unwrap_or_default(),
        offer_expires_at_ms: conversation.offer.as_ref().map(|offer| offer.expires_at_ms).unwrap_or(0),
        offered_to: conversation.offered_to.iter().map(|agent| agent.to_string()).collect(),
        customer_delivered_up_to: conversation.customer_delivered_up_to,
        agent_delivered_up_to: conversation.agent_delivered_up_to,
        delivery_marks_known: true,
        customer_away: Some(conversation.customer_away),
    }
}

async fn append(
    context: &Context,
    conversation: ConversationId,
    fence: Fence,
    events: Vec<pb::NewEvent>,
    update: Option<ConversationUpdate>,
    create: Option<ConversationRecord>,
) -> Result<(Vec<Event>, bool), RouterError> {
    let request = AppendRequest {
        fence: Some(pb::Fence { shard: fence.shard.0, epoch: fence.epoch.0 }),
        conversation_id: conversation.to_string(),
        create,
        events,
        update,
    };
    let response = context.store.append(request).await.map_err(from_store)?;
    let stored = response
        .events
        .iter()
        .map(event_from_record)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| RouterError::Internal(error.to_string()))?;
    Ok((stored, response.duplicate))
}

/// The events after `after_seq`, as many as fit in a page (`Context::page_bytes`), at least one when there
/// is one.
async fn read_page(context: &Context, conversation: ConversationId, after_seq: u64) -> Result<Vec<Event>, RouterError> {
    let request = ReadEventsRequest {
        conversation_id: conversation.to_string(),
        after_seq,
        max_bytes: context.page_bytes,
        ..Default::default()
    };
    let response = context.store.read_events(request).await.map_err(from_store)?;
    response
        .events
        .iter()
        .map(event_from_record)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| RouterError::Internal(error.to_string()))
}

/// The key the store deduplicates a conversation's first event (`created`) on, so that a start carried out
/// twice with the same conversation id stores the chat once. Never the key of a message, which is its
/// author's role and id and its client's id, with `/` between them (`dedupe_key`); and not in the event
/// itself, which clients see.
const START_DEDUPE_KEY: &str = "chat.start";

/// Creates a conversation: its opening events are stored, its actor is started, its queue is told.
///
/// A conversation of this id may exist already: the same start carried out before (a `chat.start` sent
/// again with its `start_key`, after an answer that never reached the client). The store then finds the
/// opening event by its key ([`START_DEDUPE_KEY`]) and stores nothing, and the chat is
/// answered as it is now, marked `duplicate`; or refused with `start_key_reused` when the first start was
/// for another name, group or question. So is a start without a key that the gateway tries again after a
/// try whose answer it lost (`tried_before`): the conversation id is the gateway's, the same in every try.
pub(crate) async fn create(
    context: &Arc<Context>,
    facts: NewConversation,
    customer_token: String,
    tried_before: bool,
) -> Result<StartedChat, RouterError> {
    let fence = context.shards.fence_for(&conversation_key(&facts.id))?;
    let group = context.directory.group(&facts.tenant, &facts.group).ok_or(RouterError::UnknownGroup)?;
    if !group.hours.is_open(facts.created_at_ms) {
        // A start sent again may have been carried out before the group closed: the store knows. Only such a
        // start (by its key, or tried again by the gateway) costs the refusal a read.
        if !facts.id.is_from_start_key() && !tried_before {
            return Err(RouterError::Refused(Refusal::GroupClosed));
        }
        let request = GetConversationRequest { conversation_id: facts.id.to_string() };
        return match context.store.get_conversation(request).await.map_err(from_store)?.conversation {
            Some(_) => started_before(context, facts, customer_token, None).await,
            None => Err(RouterError::Refused(Refusal::GroupClosed)),
        };
    }
    // Everything that can fail is done before the chat is stored: once it is, the customer must get its token.
    // (A queue on another node is told after the store: the cast is retried, and a queue rebuilt from the
    // store finds the chat anyway.)
    let local_queue = if context.shards.owns(&queue_key(&facts.tenant, &facts.group)) || context.peers.is_none() {
        Some(QueueHandle::activate(context, &facts.tenant, &facts.group).await?)
    } else {
        None
    };
    // A gateway from before gateways chose tokens sends none.
    let customer_token = if customer_token.is_empty() { new_customer_token() } else { customer_token };
    let stored_token = stored_customer_token(&customer_token);
    let mut record = ConversationRecord {
        id: facts.id.to_string(),
        tenant_id: facts.tenant.to_string(),
        group_id: facts.group.to_string(),
        customer_name: facts.customer_name.clone(),
        first_question: facts.question.clone(),
        state: ConversationState::Queued.as_str().to_owned(),
        owner_agent_id: String::new(),
        created_at_ms: facts.created_at_ms,
        queued_at_ms: facts.created_at_ms,
        accepted_at_ms: 0,
        closed_at_ms: 0,
        last_seq: 0,
        shard: fence.shard.0,
        customer_token: stored_token.clone(),
        ..Default::default()
    };
    // A chat whose queue is here is offered in its opening append when an agent is free now: the agent sees
    // the offer after one durable write rather than two (see the queue's doc). Its wait counts from here.
    let waiting_since_us = context.clock.now_us();
    let reservation = match &local_queue {
        Some(queue) if matches!(group.routing, Routing::Push { .. }) => queue.reserve(facts.id).await,
        _ => None,
    };
    let mut opening: Vec<Event> = Conversation::opening_events(&facts)
        .into_iter()
        .zip(1..)
        .map(|((author, body), seq)| Event { seq, at_ms: facts.created_at_ms, author, client_msg_id: None, body })
        .collect();
    let reservation = reservation.and_then(|reservation| {
        let mut opened = Conversation::new(&facts);
        for event in &opening {
            apply(&mut opened, event);
        }
        let offer = Command::Offer { agent: reservation.agent.clone(), expires_at_ms: reservation.expires_at_ms };
        // Dropped (the agent let go) if the domain would not have it.
        let body = decide(&opened, &offer).ok().flatten()?;
        let event = Event {
            seq: opened.last_seq + 1,
            at_ms: facts.created_at_ms,
            author: Author::System,
            client_msg_id: None,
            body,
        };
        apply(&mut opened, &event);
        opening.push(event);
        let summary = update_of(&opened);
        record.offer_agent_id = summary.offer_agent_id;
        record.offer_expires_at_ms = summary.offer_expires_at_ms;
        record.offered_to = summary.offered_to;
        Some(reservation)
    });
    let mut events: Vec<pb::NewEvent> =
        opening.iter().map(|event| new_event(&Event { seq: 0, ..event.clone() })).collect();
    if let Some(created) = events.first_mut() {
        created.client_msg_id = START_DEDUPE_KEY.to_owned();
    }
    let (stored, duplicate) = append(context, facts.id, fence, events, None, Some(record)).await?;
    if duplicate {
        return started_before(context, facts, customer_token, stored.first()).await;
    }
    let mut conversation = Conversation::new(&facts);
    for event in &stored {
        apply(&mut conversation, event);
    }
    let view = view_of(&conversation);
    let entry = waiting_entry(&conversation);
    let recent = RecentEvents::of_log(stored, context.page_bytes);
    let loaded = Loaded { context: context.clone(), conversation, stored_token, fence, recent };
    if let Err(error) = context.conversations.get_or_activate(&facts.id, || spawn(loaded)).await {
        // The chat is stored: its actor is activated from the store on first use instead.
        warn!(%error, conversation = %facts.id, "new conversation actor not started");
    }
    let taken = match (local_queue, reservation) {
        (_, Some(reservation)) => reservation.offered(entry.clone(), waiting_since_us).await,
        // The chat waits from now: its first offer's latency counts from here.
        (Some(queue), None) => queue.add(entry.clone(), context.clock.now_us()).await,
        (None, None) => {
            remote::queue_add(context, &facts.tenant, entry.clone()).await;
            true
        }
    };
    if !taken {
        // The queue's shard moved while the chat was stored: its new owner is told (a stored offer it did
        // not read is learnt when the conversation refuses it another, see the queue's `make_offer`).
        debug!(conversation = %facts.id, "the chat's queue stopped before taking it; told its new owner");
        remote::queue_add(context, &facts.tenant, entry).await;
    }
    Ok(StartedChat { view, customer_token, duplicate: false })
}

/// The answer to a start carried out before (see [`create`]), from the chat's actor.
/// `created` is the stored opening event when the store returned it.
async fn started_before(
    context: &Arc<Context>,
    facts: NewConversation,
    customer_token: String,
    created: Option<&Event>,
) -> Result<StartedChat, RouterError> {
    let first_group = match created.map(|event| &event.body) {
        Some(EventBody::Created { group, .. }) => Some(group.clone()),
        _ => None,
    };
    let actor = activate(context, facts.id).await?;
    let start = Box::new(facts);
    ractor::call!(actor, |reply| ConversationMsg::Started { start, first_group, customer_token, reply })
        .map_err(|error| RouterError::Internal(format!("conversation actor did not answer: {error}")))?
}

/// What a chat's queue lists of it while it waits.
pub(crate) fn waiting_entry(conversation: &Conversation) -> WaitingEntry {
    WaitingEntry {
        conversation: conversation.id,
        group: conversation.group.clone(),
        queued_at_ms: conversation.queued_at_ms,
        customer_name: conversation.customer_name.clone(),
        question: WaitingEntry::question_preview(&conversation.first_question),
    }
}

async fn spawn(loaded: Loaded) -> Result<ActorRef<ConversationMsg>, RouterError> {
    let (actor, _) = Actor::spawn(None, ConversationActor, loaded)
        .await
        .map_err(|error| RouterError::Internal(format!("conversation actor did not start: {error}")))?;
    Ok(actor)
}

/// The running actor of a conversation, activated from the store when needed.
pub(crate) async fn activate(
    context: &Arc<Context>,
    conversation: ConversationId,
) -> Result<ActorRef<ConversationMsg>, RouterError> {
    context
        .conversations
        .get_or_activate(&conversation, || async {
            let fence = context.shards.fence_for(&conversation_key(&conversation))?;
            let request = GetConversationRequest { conversation_id: conversation.to_string() };
            let response = context.store.get_conversation(request).await.map_err(from_store)?;
            let record = response.conversation.ok_or(RouterError::NotFound)?;
            let mut state =
                conversation_from_record(&record).map_err(|error| RouterError::Internal(error.to_string()))?;
            // The summary is the state: no event is read. (The newest events, kept to answer catch-ups, are
            // those appended from now on: a catch-up right after an activation reads the store, as it would
            // have had to anyway. Reading them here made every activation, and every takeover of a node's
            // chats, wait for up to 16 events, megabytes in a chat of long messages.) A chat stored before
            // the summary kept its delivery marks has them folded from its whole log, a page at a time (it
            // may be longer than one answer of the store can carry); the next update stores them.
            let mut recent = RecentEvents::new(context.page_bytes);
            let mut after_seq = match record.delivery_marks_known {
                true => state.last_seq,
                false => 0,
            };
            while after_seq < state.last_seq {
                let page = read_page(context, conversation, after_seq).await?;
                let Some(last) = page.last() else { break };
                after_seq = last.seq;
                for event in page {
                    if matches!(event.body, EventBody::Delivered { .. }) {
                        apply(&mut state, &event);
                    }
                    recent.push(Arc::new(event));
                }
            }
            let stored_token = record.customer_token;
            let loaded = Loaded { context: context.clone(), conversation: state, stored_token, fence, recent };
            spawn(loaded).await
        })
        .await
}
