//! The agent actor: an agent's availability (status × capacity × chats held × offer). Accepting a chat, an
//! offer and a forward go through it, so that capacity is checked and held while the conversation decides.
//!
//! It also owns the agent's presence: every heartbeat it reads how many live connections the agent has
//! (gateways keep them in presence) and refreshes the agent's signed-in mark in its groups. An agent with no
//! live connection keeps their chats for the grace period; past it they go offline, their offer moves on and
//! their chats go back to the head of their queue. When presence cannot be read (Redis is down) nothing
//! changes: presence is stale, not absent.
//!
//! Every few heartbeats it also reads whether the customers of the agent's chats are connected: a customer
//! whose gateway went with them (it crashed, its host was lost) ends no connection, and their chat is told
//! by no gateway that they left. Found gone for the grace period, the chat is told so
//! ([`SystemCommand::CustomerGone`]), and records `customer_left` if a reading of its own finds them gone
//! still; told again every grace period while they are gone (the chat ignores it once they are recorded
//! away), so that a telling lost to another node's failure is not lost for good.
//!
//! Every [`COMPARE_CHATS_EVERY_TICKS`] heartbeats it compares the chats it counts as the agent's with the
//! store's ([`AgentActorState::compare_chats`]): an end lost on its way (a chat's node that could not reach
//! this one for its retries) would hold one of the agent's slots for good, and an accept or forward whose
//! answer was lost would leave a chat of theirs uncounted, the agent over capacity.
//!
//! The queues of the agent's groups are told of every change of the agent's availability, and told it again
//! every [`RETELL_EVERY_TICKS`] heartbeats while the agent is signed in: a cast to another node that is
//! given up (its node was unreachable for its retries, without the queue being rebuilt since) would
//! otherwise leave the queue with the agent's old availability until their next change, which, for an
//! agent who came back online, is a queue that never offers them a chat. The versions make a retelling
//! harmless: a queue keeps the newest.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use switchboard_telemetry::names;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use switchboard_domain::{
    AgentAvailability, AgentId, AgentState, AgentStatus, AvailabilityVersion, Conversation, ConversationId,
    ConversationState, EventBody, OfferEnd, Refusal, RequeueReason, TenantId, agent_key,
};
use switchboard_presence::Connections;
use switchboard_proto::convert::{conversation_from_record, conversation_id, event_from_record};
use switchboard_proto::internal::v1::{GetConversationRequest, ListConversationsRequest, ReadEventsRequest};
use switchboard_proto::router::{
    AgentChange, AgentView, Caller, ChatView, GatewayId, OfferUpdate, Push, RouterError, ShownOffer, SystemCommand,
};
use switchboard_proto::store::{LIST_PAGE, list_all_conversations};
use tracing::{debug, info, warn};

use crate::context::Context;
use crate::conversation::waiting_entry;
use crate::error::from_store;
use crate::presence::{GoneCustomers, departure_due};
use crate::remote;

type Reply<T> = RpcReplyPort<Result<T, RouterError>>;

/// How long a chat assigned to an agent without their accept is told again to each gateway that starts
/// following the agent (see [`AgentActorState::recently_assigned`]): longer than a gateway takes to follow
/// an agent on its new owner after a move, retries included.
pub(crate) const ASSIGNED_TOLD_AGAIN_FOR_MS: i64 = 30_000;

/// How many heartbeats pass, at most, between two times the queues are told the agent's availability.
pub const RETELL_EVERY_TICKS: u32 = 10;

/// How many heartbeats pass between two comparisons of the agent's chats with the store's (see
/// [`AgentActorState::compare_chats`]).
pub const COMPARE_CHATS_EVERY_TICKS: u32 = 30;

/// How long past its expiry an offer the agent still holds is checked against the store, at the agent's
/// heartbeat: longer than a queue's hop to the agent's node is retried (some 8 s), so that only an end lost for
/// good is looked for.
pub const OFFER_CHECKED_AFTER_MS: i64 = 10_000;

/// How often an offer found still the agent's past [`OFFER_CHECKED_AFTER_MS`] is checked again.
const OFFER_RECHECKED_EVERY_MS: i64 = 5_000;

/// How many of a chat's last events are read for the end of an offer whose end never reached its agent.
const RECENT_EVENTS_READ: u64 = 32;

pub(crate) enum AgentMsg {
    SetStatus {
        status: AgentStatus,
        reply: Reply<AgentView>,
    },
    Accept {
        conversation: ConversationId,
        reply: Reply<ChatView>,
    },
    /// Another agent (or a supervisor) hands this agent a chat.
    Forward {
        caller: Caller,
        conversation: ConversationId,
        reply: Reply<ChatView>,
    },
    /// A chat of this agent ended (or moved away).
    Finished {
        conversation: ConversationId,
    },
    Offer {
        update: OfferUpdate,
        reply: Reply<()>,
    },
    Availability {
        reply: Reply<AgentAvailability>,
    },
    Subscribe {
        gateway: GatewayId,
        /// The offers the gateway showed the agent's consoles (see [`AgentActorState::end_shown_offers`]).
        shown: Vec<ShownOffer>,
    },
    Unsubscribe {
        gateway: GatewayId,
    },
    /// The heartbeat: check the agent's connections and refresh their signed-in mark.
    Tick,
}

pub(crate) struct AgentActor;

pub(crate) struct AgentActorState {
    context: Arc<Context>,
    agent: AgentState,
    subscribers: BTreeSet<GatewayId>,
    /// The offer outstanding now, as shown to the agent (sent again to a gateway that subscribes later).
    shown_offer: Option<(switchboard_domain::WaitingEntry, i64)>,
    /// When the heartbeats began to find the agent without a live connection (presence read), if they are
    /// signed in: the first of the run.
    found_disconnected_at_ms: Option<i64>,
    /// The version of the agent's availability for the queues.
    versions: Versions,
    /// Heartbeats since the queues were last told the agent's availability.
    ticks_since_told: u32,
    /// The agent's status was lost with their previous owner and not chosen since: each console that follows
    /// them is told the status they have here.
    status_lost: bool,
    /// Not before this is the offer held checked against the store again (see
    /// [`AgentActorState::check_held_offer`]).
    offer_checked_again_at_ms: i64,
    /// The chats assigned to the agent without their accept (forwarded to them, or an accept whose answer was
    /// lost) in the last [`ASSIGNED_TOLD_AGAIN_FOR_MS`], with when, oldest first: each gateway that starts
    /// following the agent is told them again while they are still the agent's. An agent's pushes have no seq
    /// to resume from, and after a move a gateway follows the agent on its new owner only once it learns of
    /// the move: a chat forwarded in between would otherwise never reach the agent's consoles, which follow
    /// it on `chat.assigned`. (An offer is shown again from `shown_offer`.)
    recently_assigned: VecDeque<(i64, ChatView)>,
    /// Since when each chat's customer has been found gone (see [`AgentActorState::check_customers`]).
    customers_gone: GoneCustomers,
    /// Heartbeats since the agent's chats were last compared with the store's.
    ticks_since_compared: u32,
}

/// Stamps the agent's availability with its version: the epoch of the activation, and a count that goes
/// up whenever the availability differs from the one stamped last. Counting at the stamp rather than at
/// each change means a change that forgot to count cannot give two states one version.
///
/// The count is the process's ([`STAMPS`]), not the activation's: an actor that stopped and was activated
/// again under the same lease (a panic in a handler) must not start over below what the queues already
/// heard. A lease's epoch belongs to one process, and a process that restarts takes new epochs.
struct Versions {
    epoch: u64,
    /// The availability stamped last, with its version.
    stamped: Option<AgentAvailability>,
}

/// The states stamped by every agent actor of this process.
static STAMPS: AtomicU64 = AtomicU64::new(0);

impl Versions {
    fn new(epoch: u64) -> Versions {
        Versions { epoch, stamped: None }
    }

    fn stamp(&mut self, agent: &AgentState) -> AgentAvailability {
        let last = self.stamped.as_ref().map_or(0, |stamped| stamped.version.change);
        let now = agent.availability(AvailabilityVersion { epoch: self.epoch, change: last });
        if self.stamped.as_ref() == Some(&now) {
            return now;
        }
        let change = STAMPS.fetch_add(1, Ordering::Relaxed) + 1;
        let now = AgentAvailability { version: AvailabilityVersion { epoch: self.epoch, change }, ..now };
        self.stamped = Some(now.clone());
        now
    }
}

impl Actor for AgentActor {
    type Msg = AgentMsg;
    type State = AgentActorState;
    /// The context, the agent as the store has it (with the status they chose and the offer outstanding, to
    /// show their consoles), the epoch of the lease on its shard, and whether their status stands for one lost
    /// ([`starting_status`]).
    type Arguments = (Arc<Context>, AgentState, Option<(switchboard_domain::WaitingEntry, i64)>, u64, bool);

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        (context, agent, shown_offer, epoch, status_lost): Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        metrics::gauge!(names::ROUTER_ACTORS, "kind" => "agent").increment(1.0);
        // The agents of a node, started together, compare with the store at different heartbeats.
        let ticks_since_compared = crate::queue::phase_of(&(&agent.tenant, &agent.id), COMPARE_CHATS_EVERY_TICKS);
        Ok(AgentActorState {
            context,
            agent,
            subscribers: BTreeSet::new(),
            shown_offer,
            found_disconnected_at_ms: None,
            versions: Versions::new(epoch),
            ticks_since_told: 0,
            status_lost,
            offer_checked_again_at_ms: 0,
            recently_assigned: VecDeque::new(),
            customers_gone: GoneCustomers::default(),
            ticks_since_compared,
        })
    }

    /// An agent who starts signed in (their chosen status, after a takeover) is told to their queues, whose
    /// word on them is the previous owner's, and refreshed in presence at once.
    async fn post_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        if state.agent.status != AgentStatus::Offline {
            state.refresh_signed_in().await;
            state.changed().await;
        }
        Ok(())
    }

    async fn post_stop(&self, myself: ActorRef<Self::Msg>, state: &mut Self::State) -> Result<(), ActorProcessingErr> {
        metrics::gauge!(names::ROUTER_ACTORS, "kind" => "agent").decrement(1.0);
        let key = (state.agent.tenant.clone(), state.agent.id.clone());
        state.context.agents.forget(&key, &myself);
        Ok(())
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            AgentMsg::SetStatus { status, reply } => {
                let view = state.set_status(status).await;
                let _ = reply.send(Ok(view));
            }
            AgentMsg::Accept { conversation, reply } => {
                let result = state.accept(conversation).await;
                let _ = reply.send(result);
            }
            AgentMsg::Forward { caller, conversation, reply } => {
                let result = state.forward(caller, conversation).await;
                let _ = reply.send(result);
            }
            AgentMsg::Finished { conversation } => {
                let held = state.agent.n_held();
                state.agent.finish(&conversation, state.context.clock.now_ms());
                if state.agent.n_held() != held {
                    state.changed().await;
                }
            }
            AgentMsg::Offer { update, reply } => {
                let result = state.offer(update).await;
                let _ = reply.send(result);
            }
            AgentMsg::Availability { reply } => {
                let _ = reply.send(Ok(state.versions.stamp(&state.agent)));
            }
            AgentMsg::Subscribe { gateway, shown } => {
                state.end_shown_offers(&gateway, &shown);
                // A console that connects while an offer is outstanding sees it too (not a new offer: no
                // waiting time for its latency).
                if let Some((entry, expires_at_ms)) = state.shown_offer.clone()
                    && state.agent.offer == Some(entry.conversation)
                {
                    state.push_to(&gateway, AgentChange::Offered { entry, expires_at_ms, waiting_since_us: 0 });
                }
                if state.status_lost {
                    state.push_to(&gateway, AgentChange::Status { agent: view_of(&state.agent) });
                }
                // A gateway already following the agent was told them when they were assigned.
                if !state.subscribers.contains(&gateway) {
                    state.forget_old_assigned();
                    for (_, chat) in &state.recently_assigned {
                        state.push_to(&gateway, AgentChange::Assigned { chat: chat.clone() });
                    }
                }
                state.subscribers.insert(gateway);
            }
            AgentMsg::Unsubscribe { gateway } => {
                state.subscribers.remove(&gateway);
            }
            AgentMsg::Tick => state.tick().await,
        }
        Ok(())
    }
}

impl AgentActorState {
    fn now_ms(&self) -> i64 {
        self.context.clock.now_ms()
    }

    async fn set_status(&mut self, status: AgentStatus) -> AgentView {
        self.status_lost = false;
        if status == self.agent.status {
            return view_of(&self.agent);
        }
        if status == AgentStatus::Offline {
            // Signing out leaves nothing behind: the offer moves on and the chats go back to their queues.
            self.go_offline().await;
            return view_of(&self.agent);
        }
        let now_ms = self.now_ms();
        self.agent.set_status(status, now_ms);
        self.found_disconnected_at_ms = None;
        self.refresh_signed_in().await;
        self.changed().await;
        view_of(&self.agent)
    }

    async fn accept(&mut self, conversation: ConversationId) -> Result<ChatView, RouterError> {
        let caller = Caller::Agent { tenant: self.agent.tenant.clone(), agent: self.agent.id.clone() };
        let view = remote::conversation_view(&self.context, &caller, conversation).await?;
        self.agent.reserve(conversation, &view.group)?;
        let accepted = remote::conversation_accept(&self.context, conversation, &self.agent.id).await;
        match &accepted {
            Ok(_) => self.agent.confirm(conversation, self.context.clock.now_ms()),
            // (An offer refused by the conversation keeps its slot until the queue ends it.)
            Err(_) => self.agent.release(&conversation),
        }
        self.changed().await;
        accepted
    }

    /// Takes a chat forwarded to this agent: online with a free slot, in any group of the tenant.
    async fn forward(&mut self, caller: Caller, conversation: ConversationId) -> Result<ChatView, RouterError> {
        if self.agent.status != AgentStatus::Online || !self.agent.has_free_capacity() {
            return Err(RouterError::Refused(Refusal::AgentUnavailable));
        }
        if self.agent.active.contains(&conversation) {
            return Err(RouterError::Refused(Refusal::SameAgent));
        }
        self.agent.reserved.insert(conversation);
        let forwarded = remote::owner_forward(&self.context, &caller, conversation, &self.agent.id).await;
        match &forwarded {
            Ok(chat) => {
                self.agent.confirm(conversation, self.now_ms());
                self.assigned(chat.clone());
            }
            Err(_) => self.agent.release(&conversation),
        }
        self.changed().await;
        forwarded
    }

    async fn offer(&mut self, update: OfferUpdate) -> Result<(), RouterError> {
        match update {
            OfferUpdate::Made { entry, expires_at_ms, waiting_since_us } => {
                if self.agent.offer == Some(entry.conversation) {
                    // Shown again (by a queue rebuilt after a takeover): the agent holds it, and their consoles
                    // were shown it (`shown_offer` is set with it, here and at the activation). Or a later offer
                    // of the same chat (a later expiry), the end of the one before it having never reached
                    // them: it is that one they hold now, and their consoles are shown its expiry.
                    if self.held_offer_expiry().is_none_or(|held| held < expires_at_ms) {
                        self.shown_offer = Some((entry.clone(), expires_at_ms));
                        self.push(AgentChange::Offered { entry, expires_at_ms, waiting_since_us });
                    }
                    return Ok(());
                }
                self.agent.take_offer(entry.conversation, &entry.group)?;
                self.shown_offer = Some((entry.clone(), expires_at_ms));
                self.push(AgentChange::Offered { entry, expires_at_ms, waiting_since_us });
            }
            OfferUpdate::Ended { conversation, reason, expires_at_ms } => {
                if self.agent.offer != Some(conversation) {
                    return Ok(());
                }
                // The end of an older offer of the chat, arriving late, leaves the one they hold alone.
                if let (Some(ended), Some(held)) = (expires_at_ms, self.held_offer_expiry())
                    && ended < held
                {
                    return Ok(());
                }
                self.end_held_offer(reason);
            }
        }
        self.changed().await;
        Ok(())
    }

    /// The expiry of the offer the agent holds, which tells it from another offer of the same chat.
    fn held_offer_expiry(&self) -> Option<i64> {
        let (entry, expires_at_ms) = self.shown_offer.as_ref()?;
        (self.agent.offer == Some(entry.conversation)).then_some(*expires_at_ms)
    }

    /// Frees the slot of the offer the agent holds, and tells their consoles why it ended.
    fn end_held_offer(&mut self, reason: OfferEnd) {
        if let Some(conversation) = self.agent.offer {
            self.agent.end_offer(&conversation);
            self.shown_offer = None;
            self.push(AgentChange::OfferEnded { conversation, reason });
        }
    }

    /// An offer the agent still holds well past its expiry ([`OFFER_CHECKED_AFTER_MS`]): its end should have
    /// reached them by then, from the queue that timed it or recorded the agent's reject. An end can be lost
    /// (the queue's node could not reach this one for all its retries), and the agent would hold the offer,
    /// and be offered nothing, for good. The chat's stored state says what became of it:
    /// - still theirs, its end not recorded yet (the chat's node out of reach): it stays, for its queue to end
    ///   (a queue that lost the chat lists it again from the store, with its offer: see the queue's
    ///   `reconcile`);
    /// - a later offer of the chat to them, whose showing did not reach them either: that is the one they hold;
    /// - the chat theirs (accepted, the answer lost on the way): it counts among their chats;
    /// - else it is over, and freed, with the reason its `offer_ended` event gives.
    ///
    /// Checked again every [`OFFER_RECHECKED_EVERY_MS`] while it stays.
    async fn check_held_offer(&mut self) {
        let Some((entry, expires_at_ms)) = self.shown_offer.clone() else { return };
        let now_ms = self.now_ms();
        let due_ms = expires_at_ms.saturating_add(OFFER_CHECKED_AFTER_MS).max(self.offer_checked_again_at_ms);
        if self.held_offer_expiry().is_none() || now_ms < due_ms {
            return;
        }
        self.offer_checked_again_at_ms = now_ms.saturating_add(OFFER_RECHECKED_EVERY_MS);
        let conversation = entry.conversation;
        let request = GetConversationRequest { conversation_id: conversation.to_string() };
        let stored = match self.context.store.get_conversation(request).await.map(|response| response.conversation) {
            Ok(None) => None,
            Ok(Some(record)) => match conversation_from_record(&record) {
                Ok(stored) => Some(stored),
                Err(error) => {
                    debug!(%error, %conversation, "an offer past its expiry not checked: its chat not read");
                    return;
                }
            },
            Err(error) => {
                debug!(%error, %conversation, "an offer past its expiry not checked");
                return;
            }
        };
        let me = self.agent.id.clone();
        match stored {
            Some(stored) if stored.state == ConversationState::Queued => match stored.offer.clone() {
                Some(offer) if offer.agent == me && offer.expires_at_ms > expires_at_ms => {
                    let entry = waiting_entry(&stored);
                    self.shown_offer = Some((entry.clone(), offer.expires_at_ms));
                    let change =
                        AgentChange::Offered { entry, expires_at_ms: offer.expires_at_ms, waiting_since_us: 0 };
                    self.push(change);
                }
                Some(offer) if offer.agent == me => {}
                _ => self.free_lost_offer(&stored).await,
            },
            Some(stored) if stored.state == ConversationState::Active && stored.owner.as_ref() == Some(&me) => {
                warn!(agent = %me, %conversation, "a chat accepted whose answer never reached the agent: counted");
                metrics::counter!(names::ROUTER_REPAIRS, "kind" => names::REPAIR_ACCEPT_ANSWER_LOST).increment(1);
                self.agent.confirm(conversation, now_ms);
                self.shown_offer = None;
                self.assigned(crate::conversation::view_of(&stored));
                self.changed().await;
            }
            Some(stored) => self.free_lost_offer(&stored).await,
            None => {
                metrics::counter!(names::ROUTER_REPAIRS, "kind" => names::REPAIR_OFFER_END_LOST).increment(1);
                self.end_held_offer(OfferEnd::Withdrawn);
                self.changed().await;
            }
        }
    }

    /// Frees an offer whose end never reached the agent, telling their consoles why it ended: the reason of the
    /// chat's last `offer_ended` event for the agent among its recent events (withdrawn when none is found).
    async fn free_lost_offer(&mut self, stored: &Conversation) {
        let (agent, conversation) = (self.agent.id.clone(), stored.id);
        warn!(%agent, %conversation, "an offer over whose end never reached the agent: freed");
        metrics::counter!(names::ROUTER_REPAIRS, "kind" => names::REPAIR_OFFER_END_LOST).increment(1);
        let request = ReadEventsRequest {
            conversation_id: conversation.to_string(),
            after_seq: stored.last_seq.saturating_sub(RECENT_EVENTS_READ),
            ..Default::default()
        };
        let recent = match self.context.store.read_events(request).await {
            Ok(response) => response.events,
            Err(error) => {
                debug!(%error, %conversation, "the end of a lost offer not read: told as withdrawn");
                Vec::new()
            }
        };
        let reason = recent.iter().rev().filter_map(|record| event_from_record(record).ok()).find_map(|event| {
            match event.body {
                EventBody::OfferEnded { agent: ended, reason } if ended == agent => Some(reason),
                _ => None,
            }
        });
        self.end_held_offer(reason.unwrap_or(OfferEnd::Withdrawn));
        self.changed().await;
    }

    /// Tells the queues of the agent's groups that the agent's availability changed.
    async fn changed(&mut self) {
        self.ticks_since_told = 0;
        let availability = self.versions.stamp(&self.agent);
        for group in self.agent.groups.clone() {
            remote::queue_agent_changed(&self.context, &self.agent.tenant, &group, availability.clone()).await;
        }
    }

    /// Tells the agent's consoles of a chat that became theirs without their accept, and keeps it to tell
    /// gateways that follow the agent later (`recently_assigned`).
    fn assigned(&mut self, chat: ChatView) {
        self.forget_old_assigned();
        self.recently_assigned.push_back((self.now_ms(), chat.clone()));
        self.push(AgentChange::Assigned { chat });
    }

    /// Forgets the chats assigned more than [`ASSIGNED_TOLD_AGAIN_FOR_MS`] ago, and those no longer the agent's.
    fn forget_old_assigned(&mut self) {
        let since_ms = self.now_ms() - ASSIGNED_TOLD_AGAIN_FOR_MS;
        let active = &self.agent.active;
        self.recently_assigned.retain(|(at_ms, chat)| *at_ms >= since_ms && active.contains(&chat.conversation));
    }

    /// Ends, on `gateway` alone, the offers it showed the agent's consoles (`shown`) that are no longer
    /// outstanding: their `OfferEnded` was pushed while the gateway did not follow the agent here (it follows
    /// them again after a move of the agent, or after its push stream broke), so its consoles still show them.
    /// The reason of an end is not kept: an offer past its expiry ended `TimedOut`, any other `Withdrawn`. An
    /// offer of a chat the agent holds now was accepted (or forwarded to them, told as `Assigned`): nothing to
    /// end.
    fn end_shown_offers(&self, gateway: &GatewayId, shown: &[ShownOffer]) {
        let now_ms = self.now_ms();
        for offer in shown {
            let conversation = offer.conversation;
            if self.agent.offer == Some(conversation) || self.agent.active.contains(&conversation) {
                continue;
            }
            let reason = if now_ms >= offer.expires_at_ms { OfferEnd::TimedOut } else { OfferEnd::Withdrawn };
            self.push_to(gateway, AgentChange::OfferEnded { conversation, reason });
        }
    }

    fn agent_push(&self, change: AgentChange) -> Push {
        Push::Agent { tenant: self.agent.tenant.clone(), agent: self.agent.id.clone(), change }
    }

    /// Pushes a change to every gateway that follows the agent.
    fn push(&self, change: AgentChange) {
        let push = self.agent_push(change);
        for gateway in &self.subscribers {
            self.context.gateways.push(gateway, push.clone());
        }
    }

    /// Pushes a change to one gateway (one that starts following the agent).
    fn push_to(&self, gateway: &GatewayId, change: AgentChange) {
        self.context.gateways.push(gateway, self.agent_push(change));
    }

    /// Marks the agent signed in to (or out of) their groups, for the groups' online status.
    async fn refresh_signed_in(&self) {
        let presence = &self.context.presence;
        let (tenant, agent, groups) = (&self.agent.tenant, &self.agent.id, &self.agent.groups);
        let result = if self.agent.status == AgentStatus::Offline {
            presence.signed_out(tenant, agent, groups).await
        } else {
            let expires_at_ms = self.now_ms().saturating_add(self.context.presence_settings.ttl_ms());
            presence.signed_in(tenant, agent, self.agent.status, groups, expires_at_ms).await
        };
        if let Err(error) = result {
            warn!(%error, %agent, "presence not updated (stale until the next heartbeat)");
        }
    }

    async fn tick(&mut self) {
        if self.agent.status == AgentStatus::Offline {
            return;
        }
        self.refresh_signed_in().await;
        self.check_connections().await;
        self.check_held_offer().await;
        if self.agent.status != AgentStatus::Offline {
            self.ticks_since_told += 1;
            if self.ticks_since_told >= RETELL_EVERY_TICKS {
                self.changed().await;
            }
            if self.customers_gone.reading_due() {
                self.check_customers().await;
            }
            self.ticks_since_compared += 1;
            if self.ticks_since_compared >= COMPARE_CHATS_EVERY_TICKS {
                self.ticks_since_compared = 0;
                self.compare_chats().await;
            }
        }
    }

    /// Compares the chats counted as the agent's with those the store has active and owned by them. A chat's
    /// end reaches its agent by a cast retried for some seconds and then given up, and an accept or a forward
    /// whose answer was lost leaves the agent without a chat the store says is theirs: a long enough
    /// partition could leave the agent a slot short for good (and their chat's customer read and told again
    /// and again), or over capacity. The store is the truth: a chat counted that it does not have as theirs
    /// is freed, as its end would have freed it; one it has that is not counted is counted, and their
    /// consoles told, as the answer would have. Read inside the actor, so that no accept, forward or end of
    /// this agent's runs meanwhile; an end that arrives after it finds its chat freed already.
    async fn compare_chats(&mut self) {
        let request = ListConversationsRequest {
            tenant_id: self.agent.tenant.to_string(),
            states: vec!["active".into()],
            owner_agent_id: self.agent.id.to_string(),
            ..Default::default()
        };
        let stored = match list_all_conversations(&*self.context.store, request, LIST_PAGE).await {
            Ok(stored) => stored,
            Err(error) => {
                debug!(%error, agent = %self.agent.id, "the agent's chats not compared with the store's");
                return;
            }
        };
        let mut theirs = HashMap::new();
        for record in &stored {
            match conversation_from_record(record) {
                Ok(conversation) => theirs.insert(conversation.id, conversation),
                Err(error) => {
                    debug!(%error, agent = %self.agent.id, "the agent's chats not compared: a record unread");
                    return;
                }
            };
        }
        let now_ms = self.now_ms();
        let mut changed = false;
        for conversation in self.agent.active.clone() {
            if !theirs.contains_key(&conversation) {
                warn!(agent = %self.agent.id, %conversation, "a chat whose end never reached the agent: freed");
                metrics::counter!(names::ROUTER_REPAIRS, "kind" => names::REPAIR_CHAT_FREED).increment(1);
                self.agent.finish(&conversation, now_ms);
                changed = true;
            }
        }
        for (conversation, stored) in theirs {
            if self.agent.active.contains(&conversation) {
                continue;
            }
            warn!(agent = %self.agent.id, %conversation, "a chat of the agent's they did not count: counted");
            metrics::counter!(names::ROUTER_REPAIRS, "kind" => names::REPAIR_CHAT_COUNTED).increment(1);
            if self.agent.offer == Some(conversation) {
                self.shown_offer = None;
            }
            self.agent.confirm(conversation, now_ms);
            self.assigned(crate::conversation::view_of(&stored));
            changed = true;
        }
        if changed {
            self.changed().await;
        }
    }

    /// Reads whether the customers of the agent's chats are connected, and tells each chat whose customer
    /// has been gone for the grace period (see [`GoneCustomers`]).
    async fn check_customers(&mut self) {
        if self.agent.active.is_empty() {
            self.customers_gone.clear();
            return;
        }
        let chats: Vec<ConversationId> = self.agent.active.iter().copied().collect();
        let now_ms = self.now_ms();
        let read = match self.context.presence.customers_present(&self.agent.tenant, &chats, now_ms).await {
            Ok(read) => Some(chats.into_iter().zip(read).collect()),
            Err(error) => {
                debug!(%error, agent = %self.agent.id, "the customers of the agent's chats not read from presence");
                None
            }
        };
        let settings = &self.context.presence_settings;
        let (grace_ms, active) = (settings.customer_grace_ms(), &self.agent.active);
        let confirm_ms = settings.customer_confirm_ms(grace_ms);
        // Told again a grace period later while they are gone.
        for conversation in self.customers_gone.read(now_ms, read, grace_ms, confirm_ms, |chat| active.contains(chat)) {
            let context = self.context.clone();
            tokio::spawn(async move {
                let told = remote::conversation_system(&context, conversation, SystemCommand::CustomerGone).await;
                if let Err(error) = told {
                    debug!(%error, %conversation, "a chat whose customer is gone not told; told again later");
                }
            });
        }
    }

    /// Whether the agent still has a live connection; past the grace period without one, the agent goes
    /// offline. The grace period runs from the end of their last connection as presence recorded it (its
    /// close, or its lapse when its gateway went with it), so an agent taken over from another node goes on
    /// from there rather than starting it again; from the first heartbeat that found them disconnected when
    /// presence has no record (Redis restarted empty). Either way the heartbeats must have found them
    /// disconnected for two heartbeats at least (see [`crate::PresenceSettings::agent_confirm_ms`]): a
    /// connection presence lost or restored stale is written again by its gateway within one.
    async fn check_connections(&mut self) {
        let now_ms = self.now_ms();
        let asked = [(self.agent.tenant.clone(), self.agent.id.clone())];
        let connections = match self.context.presence.agents_present(&asked, now_ms).await {
            Ok(read) => read.first().copied().unwrap_or(Connections::Unknown),
            // Presence is stale, not absent: nobody goes offline because Redis is down.
            Err(_) => return,
        };
        let found_at_ms = match connections {
            Connections::Here => {
                self.found_disconnected_at_ms = None;
                return;
            }
            Connections::Gone { .. } | Connections::Unknown => *self.found_disconnected_at_ms.get_or_insert(now_ms),
        };
        let since_ms = match connections {
            Connections::Gone { since_ms } => since_ms,
            _ => found_at_ms,
        };
        let settings = &self.context.presence_settings;
        if departure_due(now_ms, since_ms, settings.grace_ms(), found_at_ms, settings.agent_confirm_ms()) {
            self.go_offline().await;
        }
    }

    /// The agent signed out, or the grace period is over: the agent is offline, their offer moves on (the
    /// queue sees them offline and withdraws it) and their chats go back to the head of their queues.
    async fn go_offline(&mut self) {
        info!(agent = %self.agent.id, chats = self.agent.active.len(), "agent offline");
        self.status_lost = false;
        let now_ms = self.now_ms();
        self.agent.set_status(AgentStatus::Offline, now_ms);
        self.found_disconnected_at_ms = None;
        self.end_held_offer(OfferEnd::Withdrawn);
        for conversation in self.agent.active.clone() {
            let command = SystemCommand::Requeue { agent: self.agent.id.clone(), reason: RequeueReason::AgentOffline };
            match remote::conversation_system(&self.context, conversation, command).await {
                Ok(_) => self.agent.finish(&conversation, now_ms),
                Err(error) => warn!(%error, %conversation, "chat of an absent agent not requeued; retried next tick"),
            }
        }
        if !self.agent.active.is_empty() {
            // Stay signed in until every chat is back in a queue: the next tick tries again.
            self.agent.status = AgentStatus::Away;
        }
        self.refresh_signed_in().await;
        self.changed().await;
        // The agent did not ask for this: their consoles are told.
        self.push(AgentChange::Status { agent: view_of(&self.agent) });
    }
}

pub(crate) fn view_of(agent: &AgentState) -> AgentView {
    AgentView {
        tenant: agent.tenant.clone(),
        agent: agent.id.clone(),
        status: agent.status,
        capacity: agent.capacity,
        groups: agent.groups.clone(),
        active: agent.active.iter().copied().collect(),
    }
}

/// The running actor of an agent, activated with the chats the store says the agent holds.
pub(crate) async fn activate(
    context: &Arc<Context>,
    tenant: &TenantId,
    agent: &AgentId,
) -> Result<ActorRef<AgentMsg>, RouterError> {
    let key = (tenant.clone(), agent.clone());
    context
        .agents
        .get_or_activate(&key, || async {
            let fence = context.shards.fence_for(&agent_key(tenant, agent))?;
            let entry = context.directory.agent(tenant, agent).ok_or(RouterError::UnknownAgent)?;
            let mut state = AgentState::new(tenant.clone(), agent.clone(), entry.groups.clone(), entry.capacity);
            state.idle_since_ms = context.clock.now_ms();
            let request = ListConversationsRequest {
                tenant_id: tenant.to_string(),
                states: vec!["active".into()],
                owner_agent_id: agent.to_string(),
                ..Default::default()
            };
            let held = context.store.list_conversations(request).await.map_err(from_store)?;
            for record in held.conversations {
                let id = conversation_id(&record.id).map_err(|error| RouterError::Internal(error.to_string()))?;
                state.active.insert(id);
            }
            // An offer outstanding when the previous owner stopped holds its slot again, and is shown to the
            // consoles that subscribe here (which the previous owner may never have shown it).
            let request = ListConversationsRequest {
                tenant_id: tenant.to_string(),
                states: vec!["queued".into()],
                offer_agent_id: agent.to_string(),
                ..Default::default()
            };
            let offered = context.store.list_conversations(request).await.map_err(from_store)?;
            let mut shown_offer = None;
            if let Some(record) = offered.conversations.first() {
                let conversation =
                    conversation_from_record(record).map_err(|error| RouterError::Internal(error.to_string()))?;
                state.reserved.insert(conversation.id);
                state.offer = Some(conversation.id);
                shown_offer =
                    conversation.offer.as_ref().map(|offer| (waiting_entry(&conversation), offer.expires_at_ms));
            }
            let (status, status_lost) = starting_status(context, &state).await;
            state.status = status;
            let arguments = (context.clone(), state, shown_offer, fence.epoch.0, status_lost);
            let (actor, _) = Actor::spawn(None, AgentActor, arguments)
                .await
                .map_err(|error| RouterError::Internal(format!("agent actor did not start: {error}")))?;
            Ok(actor)
        })
        .await
}

/// The status an agent activated here starts with, and whether it stands for one lost.
///
/// It is the status they chose, kept in presence by their previous owner, so that a takeover neither
/// withdraws their offer nor hides them from their queues until the agent sets a status again. Whether they
/// are still connected is the heartbeat's to see, as ever: an agent without a live connection has what is
/// left of the grace period since their last connection ended, as presence recorded it (at least two
/// heartbeats here, which confirm it), and past it their chats go back to their queues.
///
/// Presence may have lost the status (Redis restarted empty, or the key outlived by a cluster down for
/// longer than its expiry) or not answer. An agent who then holds chats or an offer, or is connected, was
/// signed in (signing out removes the status only once every chat is back in a queue, and ends the agent's
/// sessions): they start away, so that the heartbeat gives their chats back if they are gone rather than
/// leaving them with an absent agent, and consoles that follow them are told (the answer's `true`). So does
/// an agent whose connections presence does not tell either: started offline, a connected agent would be
/// left out of their queues, their console unaware, until they chose a status again; started away, they
/// go offline after the grace period once presence answers and shows them gone. Anyone else starts offline.
async fn starting_status(context: &Context, agent: &AgentState) -> (AgentStatus, bool) {
    let (tenant, id) = (&agent.tenant, &agent.id);
    match context.presence.chosen_status(tenant, id).await {
        Ok(Some(status)) => return (status, false),
        Ok(None) => {}
        Err(error) => warn!(%error, agent = %id, "the agent's chosen status was not read"),
    }
    let holds = !agent.active.is_empty() || agent.offer.is_some();
    let asked = [(tenant.clone(), id.clone())];
    // Unknown counts as connected: presence that does not answer is stale, not absent (as in the heartbeat).
    let maybe_connected = || async {
        match context.presence.agents_present(&asked, context.clock.now_ms()).await {
            Ok(read) => read.first() == Some(&Connections::Here),
            Err(error) => {
                warn!(%error, agent = %id, "the agent's connections were not read");
                true
            }
        }
    };
    if holds || maybe_connected().await {
        warn!(agent = %id, chats = agent.active.len(), "the agent's status was lost: away until they choose one");
        (AgentStatus::Away, true)
    } else {
        (AgentStatus::Offline, false)
    }
}

#[cfg(test)]
mod tests {
    use switchboard_domain::GroupId;

    use super::*;

    #[test]
    fn each_new_state_gets_a_newer_version_and_a_later_activation_newer_still() {
        let group = GroupId::new("sales").unwrap();
        let mut agent =
            AgentState::new(TenantId::new("acme").unwrap(), AgentId::new("a").unwrap(), vec![group.clone()], 2);
        let mut versions = Versions::new(5);
        let offline = versions.stamp(&agent);
        assert_eq!(offline.version.epoch, 5);
        assert_eq!(versions.stamp(&agent), offline, "read again unchanged: the same version");

        agent.set_status(AgentStatus::Online, 1_000);
        let online = versions.stamp(&agent);
        assert!(online.version > offline.version);
        // Any difference counts, not only the status: a slot reserved for an offer.
        let conversation = ConversationId::new_v7(1_000);
        agent.take_offer(conversation, &group).unwrap();
        let offered = versions.stamp(&agent);
        assert!(offered.version > online.version && offered.offer == Some(conversation));

        // Activated again under the same lease (the actor stopped): newer than all it said before.
        let mut again = Versions::new(5);
        let restarted = again.stamp(&agent);
        assert!(restarted.version > offered.version, "{:?} after {:?}", restarted.version, offered.version);
        // The next owner (a new lease on the shard, a higher epoch): newer whatever its count.
        let moved = AvailabilityVersion { epoch: 6, change: 1 };
        assert!(moved > restarted.version);
    }
}
