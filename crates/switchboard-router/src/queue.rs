//! The support-queue actor: the chats waiting in one group, first come first served, and the gateways
//! that watch them. Each change is pushed to every watching gateway with the queue's version.
//!
//! In a push-routed group it also routes: the chat at the head of the queue without an offer is offered to
//! one available agent (online, a free slot, no other offer), longest idle first; a reject or the offer
//! timeout passes it to the next agent. An offer is recorded in the conversation's log (with its expiry)
//! before the agent is shown it, so the timer survives a takeover: a queue activated on another node re-arms
//! it from the store. The queue never waits on another actor: the calls an offer needs run in a task that
//! reports back with a message.
//!
//! A new chat whose queue is on its node may be offered in its opening append: before storing it, the
//! conversation asks the queue to reserve an agent free now ([`QueueMsg::Reserve`]: only once the chats
//! already waiting have had theirs), stores the offer with the chat, and hands it back to the queue to show
//! ([`QueueMsg::AddOffered`]). The agent then sees the offer after one durable write rather than two. A
//! reserved agent is busy to the queue until the chat is added or the reservation let go.
//!
//! Every heartbeat it also evaluates the group's status (open by business hours, agents signed in) and
//! publishes it to presence, and keeps an estimate of the wait per queue position.
//!
//! Every few heartbeats it reads from presence whether the customers of its waiting chats are still
//! connected ([`QueueActorState::check_customers`]): a chat whose customer presence says has been gone for
//! the abandonment grace period (and its reads have found gone for a confirmation span, see
//! [`GoneCustomers`]) is cancelled as abandoned by its conversation's owner, so that it stops holding a
//! license permit and a place ahead of every later chat, and stops being offered.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;
use switchboard_telemetry::names;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use switchboard_domain::{
    AgentAvailability, AgentId, AgentStatus, BusinessHours, Conversation, ConversationId, ConversationState, GroupId,
    Offer, OfferEnd, Refusal, Routing, TenantId, WaitingEntry, WaitingQueue, queue_key,
};
use switchboard_presence::{Connections, GroupStatus};
use switchboard_proto::convert::conversation_from_record;
use switchboard_proto::internal::v1::{GetConversationRequest, ListConversationsRequest};
use switchboard_proto::router::{GatewayId, LeftQueue, OfferUpdate, Push, QueueChange, RouterError, SystemCommand};
use switchboard_proto::store::{LIST_PAGE, list_all_conversations};
use tracing::{debug, info, warn};

use crate::context::Context;
use crate::conversation::waiting_entry;
use crate::error::from_store;
use crate::presence::GoneCustomers;
use crate::remote;

type Reply<T> = RpcReplyPort<Result<T, RouterError>>;

/// How many recent accepts the wait estimate is made from.
const ESTIMATE_WINDOW: usize = 10;
/// How long a chat whose offer could not be made waits before it is tried again.
const OFFER_RETRY_MS: i64 = 1_000;

/// How many heartbeats pass between two comparisons of the waiting list with the store
/// ([`QueueActorState::reconcile`]).
const RECONCILE_EVERY_TICKS: u32 = 30;

pub(crate) enum QueueMsg {
    Add {
        entry: WaitingEntry,
        /// When the chat began to wait (µs since the epoch; 0: when the queue takes it in).
        waiting_since_us: i64,
        /// Answered once taken (see [`QueueMsg::AddOffered`]).
        reply: RpcReplyPort<()>,
    },
    Remove {
        conversation: ConversationId,
        reason: LeftQueue,
    },
    /// The gateway gets a snapshot now and every change after it.
    Subscribe {
        gateway: GatewayId,
    },
    Unsubscribe {
        gateway: GatewayId,
    },
    /// An agent of the group changed availability.
    AgentChanged {
        availability: AgentAvailability,
    },
    /// The agent declines the chat offered to them.
    RejectOffer {
        agent: AgentId,
        conversation: ConversationId,
        reply: Reply<()>,
    },
    /// What became of an offer being made (from the task that made it).
    OfferMade {
        conversation: ConversationId,
        agent: AgentId,
        result: Result<i64, OfferFailure>,
    },
    /// An offer's end is recorded (from the task that ended it).
    OfferEnded {
        conversation: ConversationId,
        agent: AgentId,
        reason: OfferEnd,
        recorded: bool,
    },
    OfferExpired {
        conversation: ConversationId,
        agent: AgentId,
        expires_at_ms: i64,
    },
    /// What became of an offer this queue found outstanding in the store and showed its agent again (see
    /// [`QueueActorState::show_again`]): taken, or `refused`.
    ShownAgain {
        conversation: ConversationId,
        agent: AgentId,
        expires_at_ms: i64,
        refused: bool,
    },
    AvailabilityLoaded {
        agents: Vec<AgentAvailability>,
    },
    /// How many agents presence counts signed in to the group (from the task that read it): for the gauge,
    /// which a queue stopped meanwhile no longer sets.
    SignedInCounted {
        signed_in: u32,
    },
    /// The heartbeat: timers' safety net, routing, group status.
    Tick,
    /// Reserves an agent free now for a new chat about to be stored with its offer, unless none is free
    /// once the chats waiting have had theirs: the agent and the offer's expiry (see the module's doc).
    Reserve {
        conversation: ConversationId,
        reply: RpcReplyPort<Option<(AgentId, i64)>>,
    },
    /// A new chat stored with the offer to the agent reserved for it: it waits from `waiting_since_us`,
    /// and the agent is shown the offer. Answered once taken, so that a chat handed to a queue that stopped
    /// meanwhile is handed to its new owner instead.
    AddOffered {
        entry: WaitingEntry,
        agent: AgentId,
        expires_at_ms: i64,
        waiting_since_us: i64,
        reply: RpcReplyPort<()>,
    },
    /// The chat reserved for was not stored with its offer (refused, failed, a start sent again).
    Unreserve {
        conversation: ConversationId,
    },
    /// The group's waiting chats as the store has them (see [`QueueActorState::reconcile`]): those it has,
    /// and those listed here when the read began that it has not, each with how it left the queue.
    Reconciled {
        stored: Vec<Conversation>,
        gone: Vec<(ConversationId, LeftQueue)>,
    },
    /// Whether the customers of the chats listed were connected at `at_ms` (from the task that read
    /// presence; `None`: it could not be read).
    CustomersRead {
        at_ms: i64,
        read: Option<Vec<(ConversationId, Connections)>>,
    },
}

#[derive(Debug)]
pub(crate) enum OfferFailure {
    /// The agent could not take it (their availability is read again).
    Agent,
    /// The conversation refused or could not be reached.
    Conversation,
    /// The conversation has an offer this queue did not know of (stored as the chat was, while the queue's
    /// shard moved): the queue takes it as its own.
    Outstanding(Offer),
    /// The chat waits no more (taken, closed): it left the queue without this queue hearing of it (listed
    /// again by a late hand-over, after its new owner had read it from the store and seen it leave).
    Gone(LeftQueue),
}

/// What the queue knows of one waiting chat's routing.
#[derive(Debug, Default)]
struct ChatRouting {
    offer: Option<Offer>,
    /// Agents whose offer ended without an accept in this round.
    offered_to: Vec<AgentId>,
    /// An offer is being made to this agent.
    making: Option<Offer>,
    /// The offer's end is being recorded.
    ending: bool,
    /// Why the offer ended, when that could not be recorded: the heartbeat records it so (by then the offer
    /// has expired), not as a timeout.
    unrecorded_end: Option<OfferEnd>,
    /// Replies waiting for the end of the offer (a reject).
    waiting_end: Vec<Reply<()>>,
    last_end_ms: i64,
    retry_at_ms: i64,
    /// Since when (µs) the chat has waited for its next offer: when it was stored as waiting (its
    /// `queued_at_ms` for a chat this queue found in the store), or the end of its last offer.
    waiting_since_us: i64,
}

pub(crate) struct QueueActor;

pub(crate) struct QueueActorState {
    context: Arc<Context>,
    myself: Option<ActorRef<QueueMsg>>,
    tenant: TenantId,
    group: GroupId,
    routing: Routing,
    hours: BusinessHours,
    waiting: WaitingQueue,
    version: u64,
    subscribers: BTreeSet<GatewayId>,
    chats: HashMap<ConversationId, ChatRouting>,
    /// Agents reserved for new chats being stored with their offer, by chat.
    reserved: HashMap<ConversationId, AgentId>,
    agents: HashMap<AgentId, AgentAvailability>,
    /// Accept times while the queue was busy, for the estimate.
    departures: VecDeque<i64>,
    /// Whether chats were still waiting right after the last accept (so the next interval measures service).
    busy_after_last_departure: bool,
    /// Recent waits (queued → accepted), used before there are intervals.
    waits: VecDeque<i64>,
    estimate: Option<u64>,
    metrics: QueueMetrics,
    /// Heartbeats since the waiting list was last compared with the store.
    ticks_since_reconciled: u32,
    /// While a comparison with the store is on its way: the chats a message added to the list or removed from
    /// it since it began, whether or not the list changed (what the read says of them may be older than the
    /// message).
    changed_while_reconciling: Option<HashSet<ConversationId>>,
    /// A read of the customers is on its way.
    reading_customers: bool,
    /// Since when each waiting chat's customer has been found gone.
    customers_gone: GoneCustomers,
}

/// The group's metrics, registered once per actor (the queue updates them after every message).
struct QueueMetrics {
    waiting: metrics::Gauge,
    oldest_wait: metrics::Gauge,
    wait: metrics::Histogram,
    open: metrics::Gauge,
    signed_in: metrics::Gauge,
    online: metrics::Gauge,
    /// Those of the group's waiting-time SLA: none for a group without one (its series are never made, so
    /// that no rule compares a wait with a threshold of 0).
    sla: Option<SlaMetrics>,
}

struct SlaMetrics {
    wait_sla_ms: i64,
    breached: metrics::Gauge,
    breaches: metrics::Counter,
}

impl QueueMetrics {
    fn new(tenant: &TenantId, group: &GroupId, wait_sla_ms: Option<i64>) -> QueueMetrics {
        let labels = [("tenant", tenant.to_string()), ("group", group.to_string())];
        let sla = wait_sla_ms.map(|wait_sla_ms| {
            metrics::gauge!(names::QUEUE_WAIT_SLA, &labels).set(wait_sla_ms as f64 / 1000.0);
            SlaMetrics {
                wait_sla_ms,
                breached: metrics::gauge!(names::QUEUE_SLA_BREACHED_CHATS, &labels),
                breaches: metrics::counter!(names::QUEUE_SLA_BREACHES, &labels),
            }
        });
        QueueMetrics {
            waiting: metrics::gauge!(names::QUEUE_WAITING_CHATS, &labels),
            oldest_wait: metrics::gauge!(names::QUEUE_OLDEST_WAIT, &labels),
            wait: metrics::histogram!(names::QUEUE_WAIT, &labels),
            open: metrics::gauge!(names::GROUP_OPEN, &labels),
            signed_in: metrics::gauge!(names::GROUP_AGENTS_SIGNED_IN, &labels),
            online: metrics::gauge!(names::GROUP_AGENTS_ONLINE, &labels),
            sla,
        }
    }
}

impl Actor for QueueActor {
    type Msg = QueueMsg;
    type State = QueueActorState;
    type Arguments = QueueActorState;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        mut state: Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        state.myself = Some(myself);
        metrics::gauge!(names::ROUTER_ACTORS, "kind" => "queue").increment(1.0);
        if state.is_push() {
            state.load_availability();
            let now_ms = state.now_ms();
            let offers: Vec<(WaitingEntry, Offer, i64)> = state
                .waiting
                .iter()
                .filter_map(|entry| {
                    let chat = state.chats.get(&entry.conversation)?;
                    Some((entry.clone(), chat.offer.clone()?, chat.waiting_since_us))
                })
                .collect();
            for (entry, offer, waiting_since_us) in offers {
                // Timers survive a takeover: an offer outstanding in the store expires when it said it would.
                state.take_stored_offer(entry, offer, waiting_since_us, now_ms);
            }
        }
        Ok(state)
    }

    async fn post_stop(&self, myself: ActorRef<Self::Msg>, state: &mut Self::State) -> Result<(), ActorProcessingErr> {
        metrics::gauge!(names::ROUTER_ACTORS, "kind" => "queue").decrement(1.0);
        // The queue lives on elsewhere now: its figures are that router's (a count still on its way to this
        // actor is not handled any more).
        state.report(0, 0, 0);
        state.metrics.open.set(0.0);
        state.metrics.signed_in.set(0.0);
        state.metrics.online.set(0.0);
        let key = (state.tenant.clone(), state.group.clone());
        state.context.queues.forget(&key, &myself);
        Ok(())
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            QueueMsg::Add { entry, waiting_since_us, reply } => {
                state.note_change(entry.conversation);
                if !state.waiting.contains(&entry.conversation) {
                    let since = match waiting_since_us {
                        0 => state.context.clock.now_us(),
                        since => since,
                    };
                    state.chats.entry(entry.conversation).or_default().waiting_since_us = since;
                    state.waiting.insert(entry.clone());
                    state.broadcast(QueueChange::Added { entry });
                }
                let _ = reply.send(());
            }
            QueueMsg::Remove { conversation, reason } => state.remove(conversation, reason, true),
            QueueMsg::Subscribe { gateway } => {
                let entries = state.waiting.iter().cloned().collect();
                if state.push(&gateway, QueueChange::Snapshot { entries }) {
                    state.subscribers.insert(gateway);
                    if state.estimate.is_some() {
                        state.broadcast(QueueChange::Estimate { wait_per_position_ms: state.estimate });
                    }
                }
            }
            QueueMsg::Unsubscribe { gateway } => {
                state.subscribers.remove(&gateway);
            }
            QueueMsg::AgentChanged { availability } => {
                state.agent_changed(availability);
                state.report_online();
            }
            QueueMsg::RejectOffer { agent, conversation, reply } => state.reject(agent, conversation, reply),
            QueueMsg::OfferMade { conversation, agent, result } => state.offer_made(conversation, agent, result),
            QueueMsg::OfferEnded { conversation, agent, reason, recorded } => {
                state.offer_ended(conversation, agent, reason, recorded);
            }
            QueueMsg::OfferExpired { conversation, agent, expires_at_ms } => {
                let chat = state.chats.get(&conversation);
                let current = chat.filter(|chat| !chat.ending).and_then(|chat| chat.offer.as_ref());
                if current.is_some_and(|offer| offer.agent == agent && offer.expires_at_ms == expires_at_ms) {
                    let reason = chat.and_then(|chat| chat.unrecorded_end).unwrap_or(OfferEnd::TimedOut);
                    state.end_offer(conversation, agent, reason, None);
                }
            }
            QueueMsg::ShownAgain { conversation, agent, expires_at_ms, refused } => {
                state.shown_again(conversation, agent, expires_at_ms, refused);
            }
            QueueMsg::AvailabilityLoaded { agents } => {
                merge_loaded(&mut state.agents, agents);
                state.report_online();
            }
            QueueMsg::SignedInCounted { signed_in } => state.metrics.signed_in.set(f64::from(signed_in)),
            QueueMsg::Tick => state.tick(),
            QueueMsg::Reserve { conversation, reply } => {
                // The chats waiting come first: each takes its agent before a new one may.
                state.dispatch();
                if reply.send(state.reserve(conversation)).is_err() {
                    // The asker is gone (its start cancelled): nothing will let go of the reservation.
                    state.reserved.remove(&conversation);
                }
            }
            QueueMsg::AddOffered { entry, agent, expires_at_ms, waiting_since_us, reply } => {
                state.add_offered(entry, agent, expires_at_ms, waiting_since_us);
                let _ = reply.send(());
            }
            QueueMsg::Unreserve { conversation } => {
                state.reserved.remove(&conversation);
            }
            QueueMsg::Reconciled { stored, gone } => state.reconciled(stored, gone),
            QueueMsg::CustomersRead { at_ms, read } => state.customers_read(at_ms, read),
        }
        state.dispatch();
        // The waiting list is in arrival order: its head has waited longest, and those past the SLA are
        // a head of it.
        let now_ms = state.now_ms();
        let oldest_ms = state.waiting.iter().next().map(|entry| entry.queued_at_ms);
        let oldest_wait_ms = oldest_ms.map_or(0, |queued| now_ms.saturating_sub(queued).max(0));
        let breached = state.metrics.sla.as_ref().map_or(0, |sla| {
            // Waited longer than the SLA: queued before now − SLA.
            state.waiting.queued_by(now_ms.saturating_sub(sla.wait_sla_ms).saturating_sub(1))
        });
        state.report(state.waiting.len(), oldest_wait_ms, breached);
        Ok(())
    }
}

impl QueueActorState {
    fn now_ms(&self) -> i64 {
        self.context.clock.now_ms()
    }

    /// Sets the queue's gauges: how many chats wait, how long the head has waited, and how many have
    /// waited past the group's SLA.
    fn report(&self, waiting: usize, oldest_wait_ms: i64, breached: usize) {
        self.metrics.waiting.set(waiting as f64);
        self.metrics.oldest_wait.set(oldest_wait_ms as f64 / 1000.0);
        if let Some(sla) = &self.metrics.sla {
            sla.breached.set(breached as f64);
        }
    }

    /// Sets the gauge of the group's agents online, as the queue knows them (after a change of them only:
    /// it counts them all).
    fn report_online(&self) {
        let online = self.agents.values().filter(|agent| agent.status == AgentStatus::Online).count();
        self.metrics.online.set(online as f64);
    }

    fn is_push(&self) -> bool {
        matches!(self.routing, Routing::Push { .. })
    }

    fn broadcast(&mut self, change: QueueChange) {
        self.version += 1;
        let gone: Vec<GatewayId> =
            self.subscribers.iter().filter(|gateway| !self.push(gateway, change.clone())).cloned().collect();
        for gateway in gone {
            self.subscribers.remove(&gateway);
        }
    }

    fn push(&self, gateway: &GatewayId, change: QueueChange) -> bool {
        let push =
            Push::Queue { tenant: self.tenant.clone(), group: self.group.clone(), version: self.version, change };
        self.context.gateways.push(gateway, push)
    }

    /// The chat left the queue; its wait is `counted` in the group's figures unless it was already (a chat
    /// listed again by a late hand-over, removed a second time).
    fn remove(&mut self, conversation: ConversationId, reason: LeftQueue, counted: bool) {
        self.note_change(conversation);
        let Some(entry) = self.waiting.remove(&conversation) else {
            return;
        };
        let chat = self.chats.remove(&conversation).unwrap_or_default();
        // An offer outstanding to someone other than who took the chat frees that agent's slot.
        let taken_by = match &reason {
            LeftQueue::Accepted { agent } => Some(agent.clone()),
            _ => None,
        };
        let offered = chat.offer.or(chat.making);
        let offer_taken = offered.as_ref().is_some_and(|offer| Some(&offer.agent) == taken_by.as_ref());
        if let Some(offer) = offered.filter(|offer| Some(&offer.agent) != taken_by.as_ref()) {
            self.tell_offer_ended(offer.agent, conversation, offer.expires_at_ms);
        }
        for reply in chat.waiting_end {
            let _ = reply.send(Ok(()));
        }
        self.broadcast(QueueChange::Removed { conversation, reason });
        let waited_ms = self.now_ms().saturating_sub(entry.queued_at_ms).max(0);
        if let Some(sla) = self.metrics.sla.as_ref().filter(|sla| counted && waited_ms > sla.wait_sla_ms) {
            // However it left (taken, cancelled, abandoned, transferred): its customer waited too long.
            sla.breaches.increment(1);
        }
        if taken_by.is_some() && counted {
            self.metrics.wait.record(waited_ms as f64 / 1000.0);
            if offer_taken {
                metrics::counter!(names::OFFERS_ENDED, "reason" => "accepted").increment(1);
            }
            self.record_departure(entry.queued_at_ms);
        }
        if self.waiting.is_empty() {
            self.busy_after_last_departure = false;
        }
    }

    fn record_departure(&mut self, queued_at_ms: i64) {
        let now_ms = self.now_ms();
        if !self.busy_after_last_departure {
            // The queue was empty in between: the interval measures arrivals, not service. Start again.
            self.departures.clear();
        }
        self.departures.push_back(now_ms);
        while self.departures.len() > ESTIMATE_WINDOW + 1 {
            self.departures.pop_front();
        }
        self.busy_after_last_departure = !self.waiting.is_empty();
        self.waits.push_back(now_ms.saturating_sub(queued_at_ms).max(0));
        while self.waits.len() > ESTIMATE_WINDOW {
            self.waits.pop_front();
        }
        let estimate = estimate(&self.departures, &self.waits);
        let changed = match (self.estimate, estimate) {
            (Some(old), Some(new)) => old.abs_diff(new).saturating_mul(10) > old.max(1),
            (old, new) => old != new,
        };
        if changed {
            self.estimate = estimate;
            self.broadcast(QueueChange::Estimate { wait_per_position_ms: estimate });
        }
    }

    fn agent_changed(&mut self, availability: AgentAvailability) {
        let agent = availability.agent.clone();
        let unavailable = availability.status != switchboard_domain::AgentStatus::Online;
        if !keep_newest(&mut self.agents, availability) {
            return;
        }
        if unavailable {
            let offered: Vec<ConversationId> = self
                .chats
                .iter()
                .filter(|(_, chat)| !chat.ending && chat.offer.as_ref().is_some_and(|offer| offer.agent == agent))
                .map(|(conversation, _)| *conversation)
                .collect();
            for conversation in offered {
                self.end_offer(conversation, agent.clone(), OfferEnd::Withdrawn, None);
            }
        }
    }

    fn reject(&mut self, agent: AgentId, conversation: ConversationId, reply: Reply<()>) {
        let Some(chat) = self.chats.get_mut(&conversation) else {
            let _ = reply.send(Err(RouterError::Refused(Refusal::NotOffered)));
            return;
        };
        if chat.offer.as_ref().is_some_and(|offer| offer.agent == agent) {
            if chat.ending {
                chat.waiting_end.push(reply);
            } else {
                self.end_offer(conversation, agent, OfferEnd::Rejected, Some(reply));
            }
        } else if chat.offered_to.contains(&agent) {
            // Already over (it timed out meanwhile): rejecting again changes nothing.
            let _ = reply.send(Ok(()));
        } else {
            let _ = reply.send(Err(RouterError::Refused(Refusal::NotOffered)));
        }
    }

    /// Records the end of an offer on the conversation, then frees the agent's slot, from a task.
    fn end_offer(&mut self, conversation: ConversationId, agent: AgentId, reason: OfferEnd, reply: Option<Reply<()>>) {
        let Some(chat) = self.chats.get_mut(&conversation) else {
            if let Some(reply) = reply {
                let _ = reply.send(Ok(()));
            }
            return;
        };
        chat.ending = true;
        chat.waiting_end.extend(reply);
        // Which offer ended, for the agent: an end that reaches them late must not end a newer one.
        let expires_at_ms = chat.offer.as_ref().filter(|offer| offer.agent == agent).map(|offer| offer.expires_at_ms);
        let (context, tenant, myself) = (self.context.clone(), self.tenant.clone(), self.myself.clone());
        tokio::spawn(async move {
            let command = SystemCommand::EndOffer { agent: agent.clone(), reason };
            let recorded = match remote::conversation_system(&context, conversation, command).await {
                Ok(_) => true,
                Err(error) => {
                    debug!(%error, %conversation, "offer end not recorded; retried at the next heartbeat");
                    false
                }
            };
            if recorded {
                metrics::counter!(names::OFFERS_ENDED, "reason" => offer_end_name(reason)).increment(1);
                let update = OfferUpdate::Ended { conversation, reason, expires_at_ms };
                if let Err(error) = remote::agent_offer(&context, &tenant, &agent, update).await {
                    // The agent's actor asks the store once the offer is well past its expiry.
                    debug!(%error, %agent, "offer slot not freed; the agent frees it past the offer's expiry");
                }
            }
            if let Some(myself) = myself {
                let _ = myself.cast(QueueMsg::OfferEnded { conversation, agent, reason, recorded });
            }
        });
    }

    fn offer_ended(&mut self, conversation: ConversationId, agent: AgentId, reason: OfferEnd, recorded: bool) {
        let now_ms = self.now_ms();
        let Some(chat) = self.chats.get_mut(&conversation) else {
            return;
        };
        chat.ending = false;
        if !recorded {
            // Kept: the heartbeat ends it again, for the same reason (its expiry, which tells the agent which
            // offer ended, is kept too).
            if chat.offer.as_ref().is_some_and(|offer| offer.agent == agent) {
                chat.unrecorded_end = Some(reason);
            }
            return;
        }
        chat.unrecorded_end = None;
        if chat.offer.as_ref().is_some_and(|offer| offer.agent == agent) {
            chat.offer = None;
        }
        // As the conversation counts it (`switchboard_domain::apply`): an agent who became unavailable did not
        // have the chat, and is offered it again in this round once available.
        if reason != OfferEnd::Withdrawn && !chat.offered_to.contains(&agent) {
            chat.offered_to.push(agent.clone());
        }
        chat.last_end_ms = now_ms;
        chat.waiting_since_us = self.context.clock.now_us();
        for reply in chat.waiting_end.drain(..) {
            let _ = reply.send(Ok(()));
        }
        self.refresh_agent(agent);
    }

    fn offer_made(&mut self, conversation: ConversationId, agent: AgentId, result: Result<i64, OfferFailure>) {
        let now_ms = self.now_ms();
        let Some(chat) = self.chats.get_mut(&conversation) else {
            return;
        };
        chat.making = None;
        match result {
            Ok(expires_at_ms) => {
                chat.offer = Some(Offer { agent: agent.clone(), expires_at_ms });
                chat.unrecorded_end = None;
                self.arm_timer(conversation, agent, expires_at_ms, now_ms);
            }
            Err(OfferFailure::Outstanding(offer)) => {
                // Taken as this queue's own, as a rebuilt queue takes those it reads: timed, and shown.
                if chat.offer.is_none() && !chat.ending {
                    debug!(%conversation, agent = %offer.agent, "an offer stored without this queue taken over");
                    chat.offer = Some(offer.clone());
                    let waiting_since_us = chat.waiting_since_us;
                    let entry = self.waiting.iter().find(|entry| entry.conversation == conversation).cloned();
                    match entry {
                        Some(entry) => self.take_stored_offer(entry, offer, waiting_since_us, now_ms),
                        None => self.arm_timer(conversation, offer.agent.clone(), offer.expires_at_ms, now_ms),
                    }
                }
            }
            Err(OfferFailure::Gone(reason)) => {
                debug!(%conversation, "a chat that left the queue unheard of removed");
                self.remove(conversation, reason, false);
            }
            Err(failure) => {
                chat.retry_at_ms = now_ms + OFFER_RETRY_MS;
                if matches!(failure, OfferFailure::Agent) {
                    // The agent could not take it (another offer, no free slot, unavailable to their own
                    // actor if not to the queue): the others free now have it first in this round. (The
                    // conversation does not count them: after a rebuild they may be asked again.)
                    if !chat.offered_to.contains(&agent) {
                        chat.offered_to.push(agent.clone());
                    }
                    self.refresh_agent(agent);
                }
            }
        }
    }

    fn arm_timer(&self, conversation: ConversationId, agent: AgentId, expires_at_ms: i64, now_ms: i64) {
        let Some(myself) = self.myself.clone() else { return };
        let delay = Duration::from_millis(u64::try_from(expires_at_ms.saturating_sub(now_ms)).unwrap_or(0));
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let _ = myself.cast(QueueMsg::OfferExpired { conversation, agent, expires_at_ms });
        });
    }

    /// Reads an agent's availability again (an offer to them failed or ended).
    fn refresh_agent(&self, agent: AgentId) {
        let (context, tenant, myself) = (self.context.clone(), self.tenant.clone(), self.myself.clone());
        tokio::spawn(async move {
            if let Ok(availability) = remote::agent_availability(&context, &tenant, &agent).await
                && let Some(myself) = myself
            {
                let _ = myself.cast(QueueMsg::AgentChanged { availability });
            }
        });
    }

    /// Reads the availability of every member of the group, from a task.
    fn load_availability(&self) {
        let members: Vec<AgentId> =
            self.context.directory.members_of(&self.tenant, &self.group).map(|agent| agent.id.clone()).collect();
        let (context, tenant, myself) = (self.context.clone(), self.tenant.clone(), self.myself.clone());
        tokio::spawn(async move {
            let mut agents = Vec::with_capacity(members.len());
            for agent in members {
                match remote::agent_availability(&context, &tenant, &agent).await {
                    Ok(availability) => agents.push(availability),
                    Err(error) => debug!(%error, %agent, "availability not read; the agent tells the queue later"),
                }
            }
            if let Some(myself) = myself {
                let _ = myself.cast(QueueMsg::AvailabilityLoaded { agents });
            }
        });
    }

    fn tick(&mut self) {
        self.ticks_since_reconciled += 1;
        // Alone, a router loses no message to its own queues (they never move): nothing to compare.
        let alone = self.context.peers.is_none();
        if !alone && self.ticks_since_reconciled >= RECONCILE_EVERY_TICKS && self.changed_while_reconciling.is_none() {
            self.ticks_since_reconciled = 0;
            self.reconcile();
        }
        let now_ms = self.now_ms();
        // The safety net of the timers (an end that could not be recorded is retried here).
        let expired: Vec<(ConversationId, AgentId, OfferEnd)> = self
            .chats
            .iter()
            .filter(|(_, chat)| !chat.ending)
            .filter_map(|(conversation, chat)| {
                let reason = chat.unrecorded_end.unwrap_or(OfferEnd::TimedOut);
                chat.offer
                    .as_ref()
                    .filter(|offer| offer.expires_at_ms <= now_ms || chat.unrecorded_end.is_some())
                    .map(|offer| (*conversation, offer.agent.clone(), reason))
            })
            .collect();
        for (conversation, agent, reason) in expired {
            self.end_offer(conversation, agent, reason, None);
        }
        self.publish_status(now_ms);
        // (Heartbeats while a reading is under way do not count.)
        if !self.reading_customers && self.customers_gone.reading_due() {
            self.check_customers(now_ms);
        }
    }

    /// Reads from presence, in a task, whether the customers of the waiting chats are connected (when
    /// abandonment is on and chats wait).
    fn check_customers(&mut self, now_ms: i64) {
        if self.context.presence_settings.abandon_after.is_none() || self.waiting.is_empty() {
            self.customers_gone.clear();
            return;
        }
        let chats: Vec<ConversationId> = self.waiting.iter().map(|entry| entry.conversation).collect();
        self.reading_customers = true;
        let (context, tenant, myself) = (self.context.clone(), self.tenant.clone(), self.myself.clone());
        tokio::spawn(async move {
            let read = match context.presence.customers_present(&tenant, &chats, now_ms).await {
                Ok(present) => Some(chats.into_iter().zip(present).collect()),
                Err(error) => {
                    debug!(%error, "the waiting chats' customers not read from presence");
                    None
                }
            };
            if let Some(myself) = myself {
                let _ = myself.cast(QueueMsg::CustomersRead { at_ms: now_ms, read });
            }
        });
    }

    /// What presence said of the waiting chats' customers ([`Self::check_customers`]): a chat whose customer
    /// has been gone for the abandonment's grace period (see [`GoneCustomers`]) is cancelled as abandoned.
    fn customers_read(&mut self, at_ms: i64, read: Option<Vec<(ConversationId, Connections)>>) {
        self.reading_customers = false;
        let Some(grace) = self.context.presence_settings.abandon_after else {
            self.customers_gone.clear();
            return;
        };
        let grace_ms = i64::try_from(grace.as_millis()).unwrap_or(i64::MAX);
        let confirm_ms = self.context.presence_settings.customer_confirm_ms(grace_ms);
        let waiting = &self.waiting;
        let abandoned = self.customers_gone.read(at_ms, read, grace_ms, confirm_ms, |chat| waiting.contains(chat));
        // The chat leaves the list once its cancellation is stored; a cancellation that failed is asked again a
        // grace period later.
        for conversation in abandoned {
            let (context, group) = (self.context.clone(), self.group.clone());
            tokio::spawn(async move {
                match remote::conversation_system(&context, conversation, SystemCommand::Abandon).await {
                    Ok(true) => info!(%conversation, %group, "a waiting chat whose customer went away was abandoned"),
                    Ok(false) => debug!(%conversation, "a chat found abandoned no longer waits"),
                    Err(error) => {
                        warn!(%error, %conversation, "a chat found abandoned not cancelled; asked again later")
                    }
                }
            });
        }
    }

    /// Notes a chat that a message adds to the list or removes from it, for a comparison with the store on its
    /// way.
    fn note_change(&mut self, conversation: ConversationId) {
        if let Some(changed) = self.changed_while_reconciling.as_mut() {
            changed.insert(conversation);
        }
    }

    /// An offer found outstanding in the store for a chat of the list (a rebuilt queue's, one this queue did
    /// not know of): timed to its stored expiry, and shown to its agent again while it runs.
    fn take_stored_offer(&self, entry: WaitingEntry, offer: Offer, waiting_since_us: i64, now_ms: i64) {
        self.arm_timer(entry.conversation, offer.agent.clone(), offer.expires_at_ms, now_ms);
        if offer.expires_at_ms > now_ms {
            self.show_again(entry, offer, waiting_since_us);
        }
    }

    /// Compares the waiting list with the store, from a task (every [`RECONCILE_EVERY_TICKS`] heartbeats).
    /// The list is kept from messages: a chat's hand-over and its removal reach a queue on another node by a
    /// cast retried for some seconds and then given up, so a long enough partition can leave a chat waiting
    /// in the store that no queue lists (never offered, seen by no agent), or a chat listed that left long
    /// ago (a ghost in every agent's list). The store is the truth: what it has waiting and the list lacks is
    /// listed (with its stored offer, timed and shown); what was listed when the read began and the store no
    /// longer has waiting here is removed, with how it left (read from its record).
    fn reconcile(&mut self) {
        let listed: Vec<ConversationId> = self.waiting.iter().map(|entry| entry.conversation).collect();
        self.changed_while_reconciling = Some(HashSet::new());
        let (context, tenant, group, myself) =
            (self.context.clone(), self.tenant.clone(), self.group.clone(), self.myself.clone());
        tokio::spawn(async move {
            let request = ListConversationsRequest {
                tenant_id: tenant.to_string(),
                states: vec!["queued".into()],
                group_ids: vec![group.to_string()],
                ..Default::default()
            };
            let stored: Vec<Conversation> = match list_all_conversations(&*context.store, request, LIST_PAGE).await {
                Ok(records) => records.iter().filter_map(|record| conversation_from_record(record).ok()).collect(),
                Err(error) => {
                    debug!(%error, %group, "the waiting list not compared with the store");
                    if let Some(myself) = myself {
                        let _ = myself.cast(QueueMsg::Reconciled { stored: Vec::new(), gone: Vec::new() });
                    }
                    return;
                }
            };
            let waiting: HashSet<ConversationId> = stored.iter().map(|chat| chat.id).collect();
            let mut gone = Vec::new();
            for conversation in listed.into_iter().filter(|conversation| !waiting.contains(conversation)) {
                if let OfferFailure::Gone(reason) = stored_state(&context, conversation, &group).await {
                    gone.push((conversation, reason));
                }
            }
            if let Some(myself) = myself {
                let _ = myself.cast(QueueMsg::Reconciled { stored, gone });
            }
        });
    }

    /// What the store said of the waiting list ([`Self::reconcile`]).
    fn reconciled(&mut self, stored: Vec<Conversation>, gone: Vec<(ConversationId, LeftQueue)>) {
        let changed = self.changed_while_reconciling.take().unwrap_or_default();
        for (conversation, reason) in gone {
            if self.waiting.contains(&conversation) && !changed.contains(&conversation) {
                warn!(%conversation, group = %self.group, "a chat listed that left the queue unheard of: removed");
                metrics::counter!(names::ROUTER_REPAIRS, "kind" => names::REPAIR_CHAT_REMOVED).increment(1);
                self.remove(conversation, reason, false);
            }
        }
        let now_ms = self.now_ms();
        for conversation in stored {
            let id = conversation.id;
            // Listed already; listed or gone since the read began (it may be older than that); or the opening
            // append's to hand over.
            if self.waiting.contains(&id) || changed.contains(&id) || self.reserved.contains_key(&id) {
                continue;
            }
            warn!(conversation = %id, group = %self.group, "a chat waiting that no queue listed: listed");
            metrics::counter!(names::ROUTER_REPAIRS, "kind" => names::REPAIR_CHAT_LISTED).increment(1);
            let entry = waiting_entry(&conversation);
            let waiting_since_us = conversation.queued_at_ms.saturating_mul(1_000);
            let chat = self.chats.entry(id).or_default();
            chat.offer = conversation.offer.clone();
            chat.offered_to = conversation.offered_to.clone();
            chat.waiting_since_us = waiting_since_us;
            self.waiting.insert(entry.clone());
            self.broadcast(QueueChange::Added { entry: entry.clone() });
            if let Some(offer) = conversation.offer.filter(|_| self.is_push()) {
                self.take_stored_offer(entry, offer, waiting_since_us, now_ms);
            }
        }
    }

    /// Evaluates the group's status and publishes it to presence, from a task.
    fn publish_status(&self, now_ms: i64) {
        let open = self.hours.is_open(now_ms);
        self.metrics.open.set(if open { 1.0 } else { 0.0 });
        let (context, tenant, group, myself) =
            (self.context.clone(), self.tenant.clone(), self.group.clone(), self.myself.clone());
        tokio::spawn(async move {
            let key = (tenant.clone(), group.clone());
            let signed_in = match context.presence.n_signed_in(&tenant, &group, now_ms).await {
                Ok(n) => n,
                Err(error) => {
                    // Stale presence: the last count known stands, and nothing is published.
                    debug!(%error, %group, "group status not evaluated: presence unavailable");
                    let mut statuses = context.group_statuses.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
                    if let Some(status) = statuses.get_mut(&key) {
                        status.open = open;
                        status.online = open && status.signed_in > 0;
                    }
                    return;
                }
            };
            if let Some(myself) = myself {
                let _ = myself.cast(QueueMsg::SignedInCounted { signed_in });
            }
            let status =
                GroupStatus { tenant, group, open, signed_in, online: open && signed_in > 0, evaluated_at_ms: now_ms };
            if let Err(error) = context.presence.put_group_status(&status).await {
                debug!(%error, "group status not published");
            }
            context.group_statuses.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).insert(key, status);
        });
    }

    /// Push routing: offers each waiting chat without an offer, head first, to the best available agent.
    fn dispatch(&mut self) {
        let Routing::Push { offer_timeout_ms } = self.routing else {
            return;
        };
        let now_ms = self.now_ms();
        // Ordered once, each taken at most once.
        let mut free = self.free_agents();
        if free.is_empty() {
            return;
        }
        let needing: Vec<WaitingEntry> = self
            .waiting
            .iter()
            // A chat being stored with its offer is its opening append's to offer (it may be listed already,
            // by a start sent again meanwhile): an offer made here would meet the stored one.
            .filter(|entry| !self.reserved.contains_key(&entry.conversation))
            .filter(|entry| {
                self.chats.get(&entry.conversation).is_none_or(|chat| {
                    chat.offer.is_none() && chat.making.is_none() && !chat.ending && chat.retry_at_ms <= now_ms
                })
            })
            .cloned()
            .collect();
        for entry in needing {
            if free.is_empty() {
                return;
            }
            let chat = self.chats.entry(entry.conversation).or_default();
            let index = match free.iter().position(|agent| !chat.offered_to.contains(agent)) {
                Some(index) => index,
                // Everyone available has had it: a new round starts once an offer timeout has passed.
                None if now_ms >= chat.last_end_ms.saturating_add(offer_timeout_ms) => {
                    chat.offered_to.clear();
                    0
                }
                None => continue,
            };
            let pick = free.remove(index);
            let expires_at_ms = now_ms.saturating_add(offer_timeout_ms);
            chat.making = Some(Offer { agent: pick.clone(), expires_at_ms });
            let waiting_since_us = chat.waiting_since_us;
            self.make_offer(entry, pick, expires_at_ms, waiting_since_us);
        }
    }

    /// The agents free to take an offer, longest idle first: online with a free slot, and neither offered a
    /// chat, being offered one nor reserved for a new one.
    fn free_agents(&self) -> Vec<AgentId> {
        let busy: HashSet<&AgentId> = self
            .chats
            .values()
            .filter_map(|chat| chat.offer.as_ref().or(chat.making.as_ref()).map(|offer| &offer.agent))
            .chain(self.reserved.values())
            .collect();
        let mut free: Vec<&AgentAvailability> =
            self.agents.values().filter(|agent| agent.can_take_offer() && !busy.contains(&agent.agent)).collect();
        free.sort_by(|a, b| (a.idle_since_ms, &a.agent).cmp(&(b.idle_since_ms, &b.agent)));
        free.into_iter().map(|agent| agent.agent.clone()).collect()
    }

    /// An agent for a new chat, once [`Self::dispatch`] has given the chats waiting theirs: any agent still
    /// free is one none of them may be offered (they had it already in this round).
    fn reserve(&mut self, conversation: ConversationId) -> Option<(AgentId, i64)> {
        let Routing::Push { offer_timeout_ms } = self.routing else {
            return None;
        };
        if self.waiting.contains(&conversation) || self.reserved.contains_key(&conversation) {
            return None;
        }
        let agent = self.free_agents().into_iter().next()?;
        self.reserved.insert(conversation, agent.clone());
        Some((agent, self.now_ms().saturating_add(offer_timeout_ms)))
    }

    /// A new chat stored with its offer: it waits, and the agent is shown the offer, as [`Self::make_offer`]
    /// does once the offer is recorded.
    ///
    /// The chat may be listed already: a start sent again while this one was being stored found it stored
    /// and told the queue (which, the chat being reserved, made it no offer of its own). It then gets the
    /// stored offer all the same.
    fn add_offered(&mut self, entry: WaitingEntry, agent: AgentId, expires_at_ms: i64, waiting_since_us: i64) {
        self.reserved.remove(&entry.conversation);
        self.note_change(entry.conversation);
        let listed = self.waiting.contains(&entry.conversation);
        let chat = self.chats.entry(entry.conversation).or_default();
        if chat.offer.is_some() || chat.making.is_some() {
            return;
        }
        chat.waiting_since_us = waiting_since_us;
        chat.making = Some(Offer { agent: agent.clone(), expires_at_ms });
        if !listed {
            self.waiting.insert(entry.clone());
            self.broadcast(QueueChange::Added { entry: entry.clone() });
        }
        let (context, tenant, myself) = (self.context.clone(), self.tenant.clone(), self.myself.clone());
        tokio::spawn(async move {
            let conversation = entry.conversation;
            let result = show_offer(&context, &tenant, entry, &agent, expires_at_ms, waiting_since_us).await;
            if let Some(myself) = myself {
                let _ = myself.cast(QueueMsg::OfferMade { conversation, agent, result });
            }
        });
    }

    /// Shows an offer found outstanding in the store to its agent again, from a task: the previous owner of the
    /// queue may have stopped between recording it and showing it (or this queue was activated while a new
    /// chat's hand-over was on its way to the one before), and the agent would not see it before it timed
    /// out. An agent shown it already holds it and is not shown it twice. Only the agent's refusal withdraws
    /// it; if they cannot be reached (their node is being taken over too) it stays, to its timer.
    fn show_again(&self, entry: WaitingEntry, offer: Offer, waiting_since_us: i64) {
        let (context, tenant, myself) = (self.context.clone(), self.tenant.clone(), self.myself.clone());
        tokio::spawn(async move {
            let (conversation, Offer { agent, expires_at_ms }) = (entry.conversation, offer);
            let update = OfferUpdate::Made { entry, expires_at_ms, waiting_since_us };
            let refused = match remote::agent_offer(&context, &tenant, &agent, update).await {
                Ok(()) => false,
                Err(RouterError::Refused(refusal)) => {
                    debug!(%refusal, %agent, %conversation, "agent refused an offer shown again");
                    true
                }
                Err(error) => {
                    debug!(%error, %agent, %conversation, "offer not shown again; it stays to its expiry");
                    return;
                }
            };
            if let Some(myself) = myself {
                let _ = myself.cast(QueueMsg::ShownAgain { conversation, agent, expires_at_ms, refused });
            }
        });
    }

    /// An offer shown again was refused (it is withdrawn) or taken. Taken, it may have ended meanwhile (it
    /// expired, was rejected, the chat left the queue) while the showing was on its way (its agent's node
    /// being taken over too): the end reached the agent first and changed nothing, and they took the offer
    /// afresh. They are told it ended, or they would hold it, and their slot, for good.
    fn shown_again(&mut self, conversation: ConversationId, agent: AgentId, expires_at_ms: i64, refused: bool) {
        let chat = self.chats.get(&conversation);
        if refused {
            let current = chat.and_then(|chat| chat.offer.as_ref());
            // (An end being recorded, or to be recorded again at the heartbeat, is that end's.)
            let ending = chat.is_some_and(|chat| chat.ending || chat.unrecorded_end.is_some());
            if !ending && current.is_some_and(|offer| offer.agent == agent && offer.expires_at_ms == expires_at_ms) {
                self.end_offer(conversation, agent, OfferEnd::Withdrawn, None);
            }
            return;
        }
        // An offer of the chat to them now, this one or a newer one, is theirs to hold.
        let theirs = chat.is_some_and(|chat| {
            !chat.ending
                && (chat.offer.as_ref().is_some_and(|offer| offer.agent == agent)
                    || chat.making.as_ref().is_some_and(|making| making.agent == agent))
        });
        if !theirs {
            self.tell_offer_ended(agent, conversation, expires_at_ms);
        }
    }

    /// Tells an agent that the offer of `conversation` that expires at `expires_at_ms`, which they may hold, is
    /// over (withdrawn), from a task, so that their slot is freed: the chat left the queue, or the offer ended
    /// before its showing reached them. (A later offer of the chat to them, from another group's queue after a
    /// transfer, is left alone.)
    fn tell_offer_ended(&self, agent: AgentId, conversation: ConversationId, expires_at_ms: i64) {
        let (context, tenant) = (self.context.clone(), self.tenant.clone());
        tokio::spawn(async move {
            let update =
                OfferUpdate::Ended { conversation, reason: OfferEnd::Withdrawn, expires_at_ms: Some(expires_at_ms) };
            if let Err(error) = remote::agent_offer(&context, &tenant, &agent, update).await {
                warn!(%error, %agent, %conversation, "an ended offer not told to its agent, who may still hold it");
            }
        });
    }

    /// Records the offer on the conversation, then reserves the agent's slot and shows them the offer.
    fn make_offer(&self, entry: WaitingEntry, agent: AgentId, expires_at_ms: i64, waiting_since_us: i64) {
        let (context, tenant, myself) = (self.context.clone(), self.tenant.clone(), self.myself.clone());
        tokio::spawn(async move {
            let conversation = entry.conversation;
            let group = Some(entry.group.clone());
            let command = SystemCommand::Offer { agent: agent.clone(), expires_at_ms, group };
            let result = match remote::conversation_system(&context, conversation, command).await {
                Err(RouterError::Refused(
                    Refusal::OfferOutstanding | Refusal::ChatTaken | Refusal::ChatClosed | Refusal::NotInGroup,
                )) => Err(stored_state(&context, conversation, &entry.group).await),
                Err(error) => {
                    debug!(%error, %conversation, "offer not recorded");
                    Err(OfferFailure::Conversation)
                }
                Ok(_) => show_offer(&context, &tenant, entry, &agent, expires_at_ms, waiting_since_us).await,
            };
            if let Some(myself) = myself {
                let _ = myself.cast(QueueMsg::OfferMade { conversation, agent, result });
            }
        });
    }
}

/// Why the conversation refused the offer of `group`'s queue, from its stored state: an offer the queue did
/// not know of, or the chat gone from the queue (to another group's too); else (not read, or changed since)
/// the offer is tried again later.
async fn stored_state(context: &Context, conversation: ConversationId, group: &GroupId) -> OfferFailure {
    let request = GetConversationRequest { conversation_id: conversation.to_string() };
    let stored = match context.store.get_conversation(request).await {
        Ok(response) => response.conversation.and_then(|record| conversation_from_record(&record).ok()),
        Err(error) => {
            debug!(%error, %conversation, "the conversation that refused an offer not read");
            None
        }
    };
    let Some(stored) = stored else { return OfferFailure::Conversation };
    match (stored.state, stored.offer, stored.owner) {
        (ConversationState::Queued, ..) if stored.group != *group => {
            OfferFailure::Gone(LeftQueue::Transferred { to_group: stored.group })
        }
        (ConversationState::Queued, Some(offer), _) => OfferFailure::Outstanding(offer),
        (ConversationState::Active, _, Some(agent)) => OfferFailure::Gone(LeftQueue::Accepted { agent }),
        (ConversationState::Closed, ..) => OfferFailure::Gone(LeftQueue::Closed),
        (ConversationState::Cancelled, ..) => OfferFailure::Gone(LeftQueue::Cancelled),
        _ => OfferFailure::Conversation,
    }
}

/// Reserves the agent's slot for an offer recorded on the conversation and shows them the offer: its expiry,
/// or why not. An agent who cannot take it has the offer ended (withdrawn) on the conversation.
async fn show_offer(
    context: &Arc<Context>,
    tenant: &TenantId,
    entry: WaitingEntry,
    agent: &AgentId,
    expires_at_ms: i64,
    waiting_since_us: i64,
) -> Result<i64, OfferFailure> {
    let conversation = entry.conversation;
    let update = OfferUpdate::Made { entry, expires_at_ms, waiting_since_us };
    match remote::agent_offer(context, tenant, agent, update).await {
        Ok(()) => Ok(expires_at_ms),
        Err(error) => {
            debug!(%error, %agent, "agent could not take the offer");
            let end = SystemCommand::EndOffer { agent: agent.clone(), reason: OfferEnd::Withdrawn };
            if let Err(error) = remote::conversation_system(context, conversation, end).await {
                warn!(%error, %conversation, "offer to an unavailable agent not ended; it times out");
                Ok(expires_at_ms)
            } else {
                Err(OfferFailure::Agent)
            }
        }
    }
}

/// The wait per queue position: the mean interval between accepts while chats were waiting, or before there
/// are two accepts, the mean wait of the recent accepts.
fn estimate(departures: &VecDeque<i64>, waits: &VecDeque<i64>) -> Option<u64> {
    if let (Some(first), Some(last)) = (departures.front(), departures.back())
        && departures.len() >= 2
    {
        let intervals = i64::try_from(departures.len() - 1).unwrap_or(1);
        return u64::try_from(last.saturating_sub(*first) / intervals).ok();
    }
    if waits.is_empty() {
        return None;
    }
    // Saturating: a wait comes from a `queued_at_ms` another node sent.
    let total = waits.iter().fold(0_i64, |total, wait| total.saturating_add(*wait));
    u64::try_from(total / i64::try_from(waits.len()).unwrap_or(1)).ok()
}

/// The running actor of a support queue, activated with the chats the store says are waiting in it.
pub(crate) async fn activate(
    context: &Arc<Context>,
    tenant: &TenantId,
    group: &GroupId,
) -> Result<ActorRef<QueueMsg>, RouterError> {
    let key = (tenant.clone(), group.clone());
    context
        .queues
        .get_or_activate(&key, || async {
            if !context.shards.owns(&queue_key(tenant, group)) {
                return Err(RouterError::NotOwner);
            }
            let entry = context.directory.group(tenant, group).ok_or(RouterError::UnknownGroup)?;
            let request = ListConversationsRequest {
                tenant_id: tenant.to_string(),
                states: vec!["queued".into()],
                group_ids: vec![group.to_string()],
                ..Default::default()
            };
            let records = list_all_conversations(&*context.store, request, LIST_PAGE).await.map_err(from_store)?;
            let mut waiting = WaitingQueue::default();
            let mut chats = HashMap::new();
            for record in &records {
                let conversation =
                    conversation_from_record(record).map_err(|error| RouterError::Internal(error.to_string()))?;
                chats.insert(
                    conversation.id,
                    ChatRouting {
                        offer: conversation.offer.clone(),
                        offered_to: conversation.offered_to.clone(),
                        waiting_since_us: conversation.queued_at_ms.saturating_mul(1_000),
                        ..Default::default()
                    },
                );
                waiting.insert(waiting_entry(&conversation));
            }
            let state = QueueActorState {
                context: context.clone(),
                myself: None,
                tenant: tenant.clone(),
                group: group.clone(),
                routing: entry.routing,
                hours: entry.hours.clone(),
                waiting,
                version: 0,
                subscribers: BTreeSet::new(),
                chats,
                reserved: HashMap::new(),
                agents: HashMap::new(),
                departures: VecDeque::new(),
                busy_after_last_departure: false,
                waits: VecDeque::new(),
                estimate: None,
                metrics: QueueMetrics::new(tenant, group, entry.wait_sla_ms),
                // The queues of a node, started together, compare with the store at different heartbeats.
                ticks_since_reconciled: phase_of(&(tenant, group), RECONCILE_EVERY_TICKS),
                changed_while_reconciling: None,
                reading_customers: false,
                customers_gone: GoneCustomers::default(),
            };
            let (actor, _) = Actor::spawn(None, QueueActor, state)
                .await
                .map_err(|error| RouterError::Internal(format!("queue actor did not start: {error}")))?;
            Ok(actor)
        })
        .await
}

/// Where in a period of `period` heartbeats an actor's periodic work starts, from its key: the actors of a
/// node, started together, do it at different heartbeats.
pub(crate) fn phase_of(key: &impl std::hash::Hash, period: u32) -> u32 {
    use std::hash::Hasher as _;
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    key.hash(&mut hasher);
    u32::try_from(hasher.finish() % u64::from(period.max(1))).unwrap_or(0)
}

/// The label value of an offer's end.
fn offer_end_name(reason: OfferEnd) -> &'static str {
    match reason {
        OfferEnd::Rejected => "rejected",
        OfferEnd::TimedOut => "timed_out",
        OfferEnd::Withdrawn => "withdrawn",
    }
}

/// Adds the availability read when the queue was activated. The read asks each member in turn and
/// arrives as one message, so an agent can change meanwhile: their own word (`AgentChanged`, sent on
/// every change) is then newer than what was read, and is kept. An unversioned read (a router of an
/// older version) never replaces what the agent told the queue: letting it took an agent who went online
/// while their old status was read for offline until they changed again.
fn merge_loaded(agents: &mut HashMap<AgentId, AgentAvailability>, loaded: Vec<AgentAvailability>) {
    for availability in loaded {
        if availability.version.is_versioned() {
            keep_newest(agents, availability);
        } else {
            agents.entry(availability.agent.clone()).or_insert(availability);
        }
    }
}

/// Keeps `availability` unless the queue already knows a newer version of the agent (see
/// [`switchboard_domain::AvailabilityVersion`]); true when kept. An equal version is the same state, read
/// again; an unversioned report is kept, as it comes.
fn keep_newest(agents: &mut HashMap<AgentId, AgentAvailability>, availability: AgentAvailability) -> bool {
    let stale = availability.version.is_versioned()
        && agents.get(&availability.agent).is_some_and(|known| known.version > availability.version);
    if !stale {
        agents.insert(availability.agent.clone(), availability);
    }
    !stale
}

#[cfg(test)]
mod tests {
    use switchboard_domain::AvailabilityVersion;

    use super::*;

    fn availability(agent: &str, status: switchboard_domain::AgentStatus) -> AgentAvailability {
        versioned(agent, status, 0, 0)
    }

    fn versioned(agent: &str, status: switchboard_domain::AgentStatus, epoch: u64, change: u64) -> AgentAvailability {
        AgentAvailability {
            agent: AgentId::new(agent).unwrap(),
            status,
            capacity: 2,
            held: 0,
            offer: None,
            idle_since_ms: 0,
            version: AvailabilityVersion { epoch, change },
        }
    }

    fn status_of(agents: &HashMap<AgentId, AgentAvailability>, agent: &str) -> switchboard_domain::AgentStatus {
        agents[&AgentId::new(agent).unwrap()].status
    }

    #[test]
    fn the_read_at_activation_does_not_replace_what_an_agent_told_the_queue_since() {
        use switchboard_domain::AgentStatus::{Offline, Online};
        for (told, read) in [((0, 0), (0, 0)), ((7, 3), (7, 2))] {
            let mut agents = HashMap::new();
            // `a` went online while the queue was reading every member's availability.
            agents.insert(AgentId::new("a").unwrap(), versioned("a", Online, told.0, told.1));
            merge_loaded(&mut agents, vec![versioned("a", Offline, read.0, read.1), availability("b", Offline)]);
            assert_eq!(status_of(&agents, "a"), Online, "told {told:?}, read {read:?}");
            assert_eq!(status_of(&agents, "b"), Offline, "an agent not heard from is as read");
            assert!(agents[&AgentId::new("a").unwrap()].can_take_offer());
        }
        // A read newer than what the agent told: it replaces it.
        let mut agents = HashMap::new();
        agents.insert(AgentId::new("a").unwrap(), versioned("a", Online, 7, 3));
        merge_loaded(&mut agents, vec![versioned("a", Offline, 7, 4)]);
        assert_eq!(status_of(&agents, "a"), Offline);
    }

    #[test]
    fn a_report_older_than_what_the_queue_knows_is_dropped() {
        use switchboard_domain::AgentStatus::{Away, Offline, Online};
        let mut agents = HashMap::new();
        assert!(keep_newest(&mut agents, versioned("a", Offline, 7, 1)));
        assert!(keep_newest(&mut agents, versioned("a", Online, 7, 2)));
        // The "offline" of change 1 again, late (a retried cast, or a read answered before the change).
        assert!(!keep_newest(&mut agents, versioned("a", Offline, 7, 1)));
        assert_eq!(status_of(&agents, "a"), Online);
        assert!(keep_newest(&mut agents, versioned("a", Online, 7, 2)), "the same state, read again");
        // A later activation (a higher epoch) counts from 1 again, and is newer than every change before.
        assert!(keep_newest(&mut agents, versioned("a", Away, 8, 1)));
        assert!(!keep_newest(&mut agents, versioned("a", Online, 7, 9)));
        assert_eq!(status_of(&agents, "a"), Away);
        // An unversioned report (an older router) is taken as it comes.
        assert!(keep_newest(&mut agents, availability("a", Online)));
        assert_eq!(status_of(&agents, "a"), Online);
    }

    #[test]
    fn the_estimate_is_the_service_interval_or_else_the_mean_wait() {
        let none = VecDeque::new();
        assert_eq!(estimate(&none, &none), None);
        let waits = VecDeque::from([30_000, 50_000]);
        assert_eq!(estimate(&VecDeque::from([1_000]), &waits), Some(40_000), "one accept: the mean wait");
        let departures = VecDeque::from([0, 20_000, 40_000, 90_000]);
        assert_eq!(estimate(&departures, &waits), Some(30_000), "three intervals of 20 s, 20 s, 50 s");
        // Times another node sent, however far off, make a large estimate, not an overflow.
        let far = VecDeque::from([i64::MAX, i64::MAX]);
        assert_eq!(estimate(&VecDeque::from([1_000]), &far), Some(i64::MAX as u64 / 2));
        assert_eq!(estimate(&VecDeque::from([i64::MIN, i64::MAX]), &none), Some(i64::MAX as u64));
    }
}
