//! Push routing with offers, transfer and forward, business hours and the grace period of an absent agent,
//! on one router over the in-memory store and in-memory presence. Paused tokio time and an injected clock,
//! advanced together: no sleeps.

mod common;

use common::{
    ABANDON_AFTER, CUSTOMER_GRACE, CUSTOMER_HEARTBEAT, Fixture, GRACE, OFFER_TIMEOUT_MS, agent, fixture, group, settle,
    start_request, tenant,
};
use switchboard_domain::{
    AgentId, AgentStatus, Author, CancelReason, ConversationId, ConversationState, EventBody, OfferEnd, Refusal,
    WaitingEntry,
};
use switchboard_presence::{CustomerSession, Presence};
use switchboard_proto::internal::v1::{GetConversationRequest, SetLicenseLimitRequest};
use switchboard_proto::router::{
    AgentChange, Caller, ChatCommand, ChatView, LeftQueue, OfferUpdate, OfflineMessage, PeerApi, Push, QueueChange,
    RouterApi, RouterError, ShownOffer, StartChat, SystemCommand,
};
use switchboard_proto::store::StoreApi as _;

fn caller(name: &str) -> Caller {
    Caller::Agent { tenant: tenant(), agent: agent(name) }
}

/// Signs an agent in (online) and subscribes the fixture's gateway to their pushes.
async fn sign_in(fixture: &Fixture, name: &str) {
    fixture.router.subscribe_agent(&fixture.gateway, &tenant(), &agent(name), &[]).await.unwrap();
    fixture.router.set_agent_status(&tenant(), &agent(name), AgentStatus::Online).await.unwrap();
    // As if a gateway kept refreshing the connection all along.
    let expires = fixture.clock_ms() + 30 * 24 * 60 * 60_000;
    fixture.presence.session_alive(&tenant(), &agent(name), &format!("s-{name}"), "gw-1", expires).await.unwrap();
    settle().await;
}

trait ClockMs {
    fn clock_ms(&self) -> i64;
}

impl ClockMs for Fixture {
    fn clock_ms(&self) -> i64 {
        switchboard_domain::Clock::now_ms(self.clock.as_ref())
    }
}

/// The offers shown so far, in order: to whom, the entry, its expiry, and since when (µs) its chat had
/// waited for it.
fn shown(pushes: &[Push]) -> Vec<(&AgentId, &WaitingEntry, i64, i64)> {
    pushes
        .iter()
        .filter_map(|push| match push {
            Push::Agent { agent, change: AgentChange::Offered { entry, expires_at_ms, waiting_since_us }, .. } => {
                Some((agent, entry, *expires_at_ms, *waiting_since_us))
            }
            _ => None,
        })
        .collect()
}

/// The offers made so far, in order: (agent, conversation).
fn offers(pushes: &[Push]) -> Vec<(AgentId, ConversationId)> {
    shown(pushes).into_iter().map(|(agent, entry, ..)| (agent.clone(), entry.conversation)).collect()
}

/// Since when (µs) each offer's chat had waited for it.
fn offers_waiting_since(pushes: &[Push]) -> Vec<i64> {
    shown(pushes).into_iter().map(|(.., waiting_since_us)| waiting_since_us).collect()
}

/// The expiry of each offer shown, in order.
fn offer_expiries(pushes: &[Push]) -> Vec<i64> {
    shown(pushes).into_iter().map(|(_, _, expires_at_ms, _)| expires_at_ms).collect()
}

fn offer_ends(pushes: &[Push]) -> Vec<(AgentId, OfferEnd)> {
    pushes
        .iter()
        .filter_map(|push| match push {
            Push::Agent { agent, change: AgentChange::OfferEnded { reason, .. }, .. } => Some((agent.clone(), *reason)),
            _ => None,
        })
        .collect()
}

#[tokio::test(start_paused = true)]
async fn offers_go_longest_idle_first_and_reject_and_timeout_move_on() {
    let mut fixture = fixture().await;
    // Idle since: y first, then z, then x.
    for name in ["y", "z", "x"] {
        sign_in(&fixture, name).await;
        fixture.pass(1_000).await;
    }
    fixture.drain();
    let chat = fixture.start_chat("push", "ann").await;
    let queued_us = fixture.clock_ms() * 1_000;
    settle().await;
    let pushes = fixture.drain();
    assert_eq!(offers(&pushes), [(agent("y"), chat)], "the longest idle agent is offered the chat first");
    // The offer latency counts from the chat's arrival in the queue...
    assert_eq!(offers_waiting_since(&pushes), [queued_us]);

    // Only the offered agent may accept.
    let refused = fixture.router.accept_chat(&tenant(), &agent("z"), chat).await;
    assert_eq!(refused, Err(RouterError::Refused(Refusal::NotOffered)));

    fixture.pass(1_000).await;
    let rejected_us = fixture.clock_ms() * 1_000;
    fixture.router.reject_offer(&tenant(), &group("push"), &agent("y"), chat).await.unwrap();
    settle().await;
    let pushes = fixture.drain();
    assert_eq!(offer_ends(&pushes), [(agent("y"), OfferEnd::Rejected)]);
    assert_eq!(offers(&pushes), [(agent("z"), chat)], "a reject passes it to the next agent");
    // ... and a later offer's from the end of the one before, not from the arrival.
    assert_eq!(offers_waiting_since(&pushes), [rejected_us]);

    fixture.pass(OFFER_TIMEOUT_MS).await;
    let pushes = fixture.drain();
    assert_eq!(offer_ends(&pushes), [(agent("z"), OfferEnd::TimedOut)]);
    assert_eq!(offers(&pushes), [(agent("x"), chat)], "a timeout passes it to the next agent");
    let since = offers_waiting_since(&pushes);
    let timed_out_us = rejected_us + OFFER_TIMEOUT_MS * 1_000;
    assert!(since.len() == 1 && (timed_out_us..=fixture.clock_ms() * 1_000).contains(&since[0]), "{since:?}");

    let view = fixture.router.accept_chat(&tenant(), &agent("x"), chat).await.unwrap();
    assert_eq!(view.owner, Some(agent("x")));
    // The log tells the whole story.
    let events = fixture.router.read_events(&caller("x"), chat, 0).await.unwrap().events;
    let kinds: Vec<&str> = events.iter().map(|event| event.body.kind()).collect();
    assert_eq!(
        kinds,
        ["created", "message", "offered", "offer_ended", "offered", "offer_ended", "offered", "accepted"]
    );
}

#[tokio::test(start_paused = true)]
async fn a_chat_that_finds_an_agent_free_is_stored_with_its_offer_in_one_append() {
    let mut fixture = fixture().await;
    sign_in(&fixture, "x").await;
    fixture.drain();
    let appends = fixture.counted.appends();
    let chat = fixture.start_chat("push", "ann").await;
    let queued_us = fixture.clock_ms() * 1_000;
    assert_eq!(fixture.counted.appends(), appends + 1, "the chat and its offer in one append");
    settle().await;
    let pushes = fixture.drain();
    assert_eq!(offers(&pushes), [(agent("x"), chat)]);
    assert_eq!(offers_waiting_since(&pushes), [queued_us], "the offer latency counts from the start");
    assert_eq!(fixture.counted.appends(), appends + 1, "showing the offer stores nothing more");

    // Another chat finds x busy with that offer: it waits, stored alone.
    let next = fixture.start_chat("push", "bob").await;
    settle().await;
    assert_eq!(offers(&fixture.drain()), []);
    let view = fixture.router.accept_chat(&tenant(), &agent("x"), chat).await.unwrap();
    assert_eq!(view.owner, Some(agent("x")));
    let kinds = |events: &[switchboard_domain::Event]| events.iter().map(|event| event.body.kind()).collect::<Vec<_>>();
    let events = fixture.router.read_events(&caller("x"), chat, 0).await.unwrap().events;
    assert_eq!(kinds(&events), ["created", "message", "offered", "accepted"]);
    let events = fixture.router.read_events(&caller("x"), next, 0).await.unwrap().events;
    assert_eq!(kinds(&events), ["created", "message"], "{next} waits without an offer");
}

#[tokio::test(start_paused = true)]
async fn an_agent_reserved_for_a_start_that_is_refused_is_free_again() {
    let mut fixture = fixture().await;
    // The one permit goes to a chat of a pull-routed group.
    fixture.counted.set_license_limit(SetLicenseLimitRequest { max_sessions: 1 }).await.unwrap();
    fixture.start_chat("g1", "ann").await;
    sign_in(&fixture, "x").await;
    fixture.drain();
    // x is reserved for the next chat, which the store then refuses.
    fixture.clock.advance_ms(1);
    let request = start_request(ConversationId::new_v7(fixture.clock_ms()), group("push"), "bob", "hello?");
    let refused = fixture.router.start_chat(request).await;
    assert_eq!(refused, Err(RouterError::Refused(Refusal::LicenseExhausted { max_sessions: 1 })));
    settle().await;
    assert_eq!(offers(&fixture.drain()), []);
    // x was let go: the next chat is offered to them.
    fixture.counted.set_license_limit(SetLicenseLimitRequest { max_sessions: 0 }).await.unwrap();
    let chat = fixture.start_chat("push", "carl").await;
    settle().await;
    assert_eq!(offers(&fixture.drain()), [(agent("x"), chat)]);
}

#[tokio::test(start_paused = true)]
async fn a_start_whose_caller_goes_away_while_the_chat_is_stored_with_its_offer_still_offers_it() {
    let mut fixture = fixture().await;
    sign_in(&fixture, "x").await;
    fixture.drain();
    fixture.clock.advance_ms(1);
    let request = start_request(ConversationId::new_v7(fixture.clock_ms()), group("push"), "ann", "hello?");
    let chat = request.conversation;
    // The chat is stored with its offer to x; before the answer comes, the caller goes (a call reset).
    let release = fixture.counted.hold_next_opening_offer();
    let cancelled = tokio::time::timeout(std::time::Duration::from_millis(10), fixture.router.start_chat(request));
    assert!(cancelled.await.is_err(), "the start was still storing the chat");
    let _ = release.send(());
    settle().await;
    // The start was carried through: the chat waits in its queue, and x is shown its offer.
    assert_eq!(offers(&fixture.drain()), [(agent("x"), chat)]);
    let view = fixture.router.chat_view(&caller("x"), chat).await.unwrap();
    assert_eq!(view.state, ConversationState::Queued);
}

/// x signed in, and a new chat of `customer` in `push` offered to them.
async fn offered_to_x(fixture: &mut Fixture, customer: &str) -> ConversationId {
    sign_in(fixture, "x").await;
    fixture.drain();
    let chat = fixture.start_chat("push", customer).await;
    settle().await;
    assert_eq!(offers(&fixture.drain()), [(agent("x"), chat)]);
    chat
}

#[tokio::test(start_paused = true)]
async fn a_new_chat_may_take_an_agent_only_once_the_chats_waiting_have_had_theirs() {
    let mut fixture = fixture().await;
    let first = offered_to_x(&mut fixture, "ann").await;
    fixture.router.reject_offer(&tenant(), &group("push"), &agent("x"), first).await.unwrap();
    settle().await;
    fixture.drain();
    // The first chat waits, but x had it in this round: a new chat may have x.
    let second = fixture.start_chat("push", "bob").await;
    settle().await;
    assert_eq!(offers(&fixture.drain()), [(agent("x"), second)]);
    let events = fixture.router.read_events(&caller("x"), second, 0).await.unwrap().events;
    assert_eq!(events.last().map(|event| event.body.kind()), Some("offered"));
    // Another agent signs in: the chat waiting longest is theirs, not a new one.
    sign_in(&fixture, "y").await;
    let third = fixture.start_chat("push", "carl").await;
    settle().await;
    let made = offers(&fixture.drain());
    assert_eq!(made, [(agent("y"), first)], "{third} waits behind {first}");
}

#[tokio::test(start_paused = true)]
async fn a_start_sent_again_while_the_first_stores_the_chat_with_its_offer_leaves_that_offer_to_be_shown() {
    let mut fixture = fixture().await;
    // y idle the longest: the first start reserves y.
    sign_in(&fixture, "y").await;
    fixture.pass(1_000).await;
    sign_in(&fixture, "x").await;
    fixture.drain();
    fixture.clock.advance_ms(1);
    let request = start_request(ConversationId::new_v7(fixture.clock_ms()), group("push"), "ann", "hello?");
    let chat = request.conversation;
    // The first try stores the chat with its offer to y, and its answer is held.
    let release = fixture.counted.hold_next_opening_offer();
    let Fixture { router, pushes, .. } = &mut fixture;
    let mut drain = || std::iter::from_fn(|| pushes.try_recv().ok()).collect::<Vec<Push>>();
    let first = router.start_chat(request.clone());
    let meanwhile = async {
        settle().await;
        // The gateway tries again: the chat is found stored, and its queue told of it while y is reserved.
        let again = router.start_chat(StartChat { tried_before: true, ..request }).await.unwrap();
        assert!(again.duplicate);
        settle().await;
        assert_eq!(offers(&drain()), [], "no offer beside the stored one (x is free, y reserved)");
        release.send(()).unwrap();
    };
    let (first, ()) = tokio::join!(first, meanwhile);
    assert!(!first.unwrap().duplicate);
    settle().await;
    assert_eq!(offers(&drain()), [(agent("y"), chat)], "the stored offer is shown at once");
    // And it times out when it said it would, then moves on.
    fixture.pass(OFFER_TIMEOUT_MS).await;
    let pushes = fixture.drain();
    assert_eq!(offer_ends(&pushes), [(agent("y"), OfferEnd::TimedOut)]);
    assert_eq!(offers(&pushes), [(agent("x"), chat)]);
    let events = fixture.router.read_events(&caller("x"), chat, 0).await.unwrap().events;
    let kinds: Vec<&str> = events.iter().map(|event| event.body.kind()).collect();
    assert_eq!(kinds, ["created", "message", "offered", "offer_ended", "offered"]);
}

#[tokio::test(start_paused = true)]
async fn no_agent_is_offered_more_than_their_capacity() {
    let mut fixture = fixture().await;
    for name in ["x", "y", "z"] {
        sign_in(&fixture, name).await;
    }
    fixture.drain();
    let mut chats = Vec::new();
    for n in 0..8 {
        chats.push(fixture.start_chat("push", &format!("c{n}")).await);
    }
    // Accept every offer as it comes, until no more come: x holds 1, y 2, z 3, and two chats wait.
    for _ in 0..20 {
        settle().await;
        let pushes = fixture.drain();
        let made = offers(&pushes);
        if made.is_empty() {
            break;
        }
        for (name, chat) in made {
            fixture.router.accept_chat(&tenant(), &name, chat).await.unwrap();
        }
    }
    for (name, capacity) in [("x", 1), ("y", 2), ("z", 3)] {
        let view = fixture.router.set_agent_status(&tenant(), &agent(name), AgentStatus::Online).await.unwrap();
        assert_eq!(view.active.len(), capacity, "{name} holds exactly their capacity");
    }
    // A chat ends: its agent gets the next waiting chat.
    let held_by_x = fixture.router.set_agent_status(&tenant(), &agent("x"), AgentStatus::Online).await.unwrap().active;
    fixture.router.command(&caller("x"), held_by_x[0], ChatCommand::Close).await.unwrap();
    settle().await;
    let made = offers(&fixture.drain());
    assert_eq!(made.len(), 1);
    assert_eq!(made[0].0, agent("x"));
}

#[tokio::test(start_paused = true)]
async fn an_agent_who_goes_away_has_their_offer_withdrawn() {
    let mut fixture = fixture().await;
    sign_in(&fixture, "x").await;
    sign_in(&fixture, "y").await;
    fixture.drain();
    let chat = fixture.start_chat("push", "ann").await;
    settle().await;
    let first = offers(&fixture.drain());
    let (offered, other) = if first[0].0 == agent("x") { ("x", "y") } else { ("y", "x") };
    fixture.router.set_agent_status(&tenant(), &agent(offered), AgentStatus::Away).await.unwrap();
    settle().await;
    let pushes = fixture.drain();
    assert_eq!(offer_ends(&pushes), [(agent(offered), OfferEnd::Withdrawn)]);
    assert_eq!(offers(&pushes), [(agent(other), chat)]);
}

#[tokio::test(start_paused = true)]
async fn an_agent_whose_offer_was_withdrawn_is_offered_the_chat_again_once_back_online() {
    let mut fixture = fixture().await;
    let chat = offered_to_x(&mut fixture, "ann").await;
    fixture.router.set_agent_status(&tenant(), &agent("x"), AgentStatus::Away).await.unwrap();
    settle().await;
    assert_eq!(offer_ends(&fixture.drain()), [(agent("x"), OfferEnd::Withdrawn)]);
    // Back well inside one offer timeout: the only agent gets the chat again, not after a new round.
    fixture.router.set_agent_status(&tenant(), &agent("x"), AgentStatus::Online).await.unwrap();
    settle().await;
    assert_eq!(offers(&fixture.drain()), [(agent("x"), chat)]);
}

#[tokio::test(start_paused = true)]
async fn an_end_or_a_showing_of_an_older_offer_that_arrives_late_leaves_the_agents_newer_offer_of_the_chat_alone() {
    let mut fixture = fixture().await;
    sign_in(&fixture, "x").await;
    fixture.drain();
    let chat = fixture.start_chat("push", "ann").await;
    settle().await;
    let pushes = fixture.drain();
    let first = offer_expiries(&pushes);
    let entry = shown(&pushes).first().map(|(_, entry, ..)| (*entry).clone());
    // Withdrawn (x went away), then offered to x again once back, a second later: a newer offer of the chat.
    fixture.router.set_agent_status(&tenant(), &agent("x"), AgentStatus::Away).await.unwrap();
    settle().await;
    fixture.pass(1_000).await;
    fixture.router.set_agent_status(&tenant(), &agent("x"), AgentStatus::Online).await.unwrap();
    settle().await;
    let second = offer_expiries(&fixture.drain());
    assert!(first.len() == 1 && second.len() == 1 && second[0] > first[0], "{first:?} then {second:?}");

    // The first offer's end and showing, arriving late (a queue's task across a slow hop), change nothing.
    let late_end =
        OfferUpdate::Ended { conversation: chat, reason: OfferEnd::Withdrawn, expires_at_ms: Some(first[0]) };
    fixture.router.agent_offer(&tenant(), &agent("x"), late_end).await.unwrap();
    let entry = entry.unwrap();
    let late_showing = OfferUpdate::Made { entry: entry.clone(), expires_at_ms: first[0], waiting_since_us: 0 };
    fixture.router.agent_offer(&tenant(), &agent("x"), late_showing).await.unwrap();
    settle().await;
    assert_eq!(fixture.drain(), [], "the console is told nothing");
    let held = fixture.router.agent_availability(&tenant(), &agent("x")).await.unwrap();
    assert_eq!(held.offer, Some(chat), "x still holds the newer offer");
    // A console that connects now is shown the newer offer's expiry.
    fixture.router.subscribe_agent(&fixture.gateway, &tenant(), &agent("x"), &[]).await.unwrap();
    settle().await;
    assert_eq!(offer_expiries(&fixture.drain()), second);

    // A showing of a later offer of the chat (the end of the one before never reached x) is the one x holds.
    let third = second[0] + 5_000;
    let later = OfferUpdate::Made { entry: entry.clone(), expires_at_ms: third, waiting_since_us: 0 };
    fixture.router.agent_offer(&tenant(), &agent("x"), later).await.unwrap();
    assert_eq!(offer_expiries(&fixture.drain()), [third], "the console is shown its expiry");
    let older = OfferUpdate::Ended { conversation: chat, reason: OfferEnd::Withdrawn, expires_at_ms: Some(second[0]) };
    fixture.router.agent_offer(&tenant(), &agent("x"), older).await.unwrap();
    assert_eq!(fixture.drain(), []);

    // Its own end ends it.
    let end = OfferUpdate::Ended { conversation: chat, reason: OfferEnd::Withdrawn, expires_at_ms: Some(third) };
    fixture.router.agent_offer(&tenant(), &agent("x"), end).await.unwrap();
    assert_eq!(offer_ends(&fixture.drain()), [(agent("x"), OfferEnd::Withdrawn)]);
    assert_eq!(fixture.router.agent_availability(&tenant(), &agent("x")).await.unwrap().offer, None);
}

#[tokio::test(start_paused = true)]
async fn an_offer_stored_without_its_queue_knowing_is_taken_over_by_the_queue_not_left_to_block_the_chat() {
    let mut fixture = fixture().await;
    // A chat waits, with no agent online; an offer to y is then stored on it behind its queue's back (as a
    // chat stored with its offer while its queue's shard moved, the queue rebuilt before the chat was stored).
    let chat = fixture.start_chat("push", "ann").await;
    let expires_at_ms = fixture.clock_ms() + OFFER_TIMEOUT_MS;
    let offer = SystemCommand::Offer { agent: agent("y"), expires_at_ms, group: Some(group("push")) };
    fixture.router.conversation_system(chat, offer).await.unwrap();
    fixture.drain();
    // x comes online: the queue's offer to x is refused (one offer at a time); the queue takes the stored one
    // as its own and shows it to y, who is offline and refuses it: it is withdrawn, and x has the chat.
    sign_in(&fixture, "x").await;
    settle().await;
    assert_eq!(offers(&fixture.drain()), [(agent("x"), chat)]);
    let customer = Caller::Customer { conversation: chat };
    let events = fixture.router.read_events(&customer, chat, 0).await.unwrap().events;
    let kinds: Vec<&str> = events.iter().map(|event| event.body.kind()).collect();
    assert_eq!(kinds, ["created", "message", "offered", "offer_ended", "offered"]);
}

/// Lists `chat` in `push`'s queue again, as it was when it waited there (`queued`): as a late hand-over would,
/// reaching the queue after the chat had left it.
async fn list_again_in_push(fixture: &Fixture, chat: ConversationId, queued: ChatView) {
    let entry = WaitingEntry {
        conversation: chat,
        group: group("push"),
        queued_at_ms: queued.created_at_ms,
        customer_name: queued.customer_name,
        question: queued.first_question,
    };
    fixture.router.queue_add(&tenant(), entry, 0).await.unwrap();
    settle().await;
}

/// The chats `push`'s queue lists now, from the snapshot a new subscription gets.
async fn listed_in_push(fixture: &mut Fixture) -> Option<Vec<WaitingEntry>> {
    fixture.router.subscribe_queue(&fixture.gateway, &tenant(), &group("push")).await.unwrap();
    settle().await;
    fixture.drain().into_iter().find_map(|push| match push {
        Push::Queue { change: QueueChange::Snapshot { entries }, .. } => Some(entries),
        _ => None,
    })
}

#[tokio::test(start_paused = true)]
async fn a_chat_listed_again_after_it_left_the_queue_is_removed_when_its_conversation_refuses_an_offer() {
    let mut fixture = fixture().await;
    let chat = fixture.start_chat("push", "ann").await;
    let customer = Caller::Customer { conversation: chat };
    let queued = fixture.router.chat_view(&customer, chat).await.unwrap();
    fixture.router.command(&customer, chat, ChatCommand::Close).await.unwrap();
    settle().await;
    // A late hand-over lists the closed chat again.
    list_again_in_push(&fixture, chat, queued).await;
    fixture.drain();
    // x comes online: the offer is refused (the chat is closed) and the chat leaves the list for good.
    sign_in(&fixture, "x").await;
    settle().await;
    assert_eq!(offers(&fixture.drain()), []);
    assert_eq!(listed_in_push(&mut fixture).await, Some(Vec::new()));
}

#[tokio::test(start_paused = true)]
async fn a_queue_that_still_lists_a_chat_moved_to_another_group_does_not_offer_it_and_drops_it() {
    let mut fixture = fixture().await;
    sign_in(&fixture, "w").await;
    let chat = fixture.start_chat("push", "ann").await;
    let customer = Caller::Customer { conversation: chat };
    let queued = fixture.router.chat_view(&customer, chat).await.unwrap();
    fixture.router.transfer_chat(&caller("x"), chat, &group("t")).await.unwrap();
    settle().await;
    // A late hand-over lists it in `push` again.
    list_again_in_push(&fixture, chat, queued).await;
    // x (of `push` only) comes online: the chat waits in `t`, and is neither offered to x nor left in `push`.
    fixture.drain();
    sign_in(&fixture, "x").await;
    settle().await;
    assert_eq!(offers(&fixture.drain()), []);
    let events = fixture.router.read_events(&customer, chat, 0).await.unwrap().events;
    assert!(events.iter().all(|event| event.body.kind() != "offered"));
    assert_eq!(listed_in_push(&mut fixture).await, Some(Vec::new()));
}

#[tokio::test(start_paused = true)]
async fn a_closed_group_refuses_new_chats_and_takes_offline_messages() {
    let fixture = fixture().await;
    let request = start_request(ConversationId::new_v7(fixture.clock_ms()), group("never"), "ann", "anyone?");
    assert_eq!(fixture.router.start_chat(request).await, Err(RouterError::Refused(Refusal::GroupClosed)));
    let message = OfflineMessage {
        tenant: tenant(),
        group: group("never"),
        customer_name: "ann".into(),
        contact: "ann@example.com".into(),
        body: "please call me back".into(),
        reason: "group_closed".into(),
        idempotency_key: "k-1".into(),
    };
    let ticket = fixture.router.leave_offline_message(message.clone()).await.unwrap();
    assert!(!ticket.duplicate);
    let again = fixture.router.leave_offline_message(message).await.unwrap();
    assert_eq!((again.id, again.duplicate), (ticket.id, true), "the same message is stored once");
}

#[tokio::test(start_paused = true)]
async fn a_start_tried_again_after_its_group_closed_gets_the_chat_its_unanswered_try_started() {
    let fixture = fixture().await;
    // Friday 2026-03-27 16:59:30 in Berlin (UTC+1): `office` closes at 17:00.
    let now = fixture.clock_ms();
    fixture.clock.advance_ms(utc_ms("2026-03-27T15:59:30Z") - now);
    // A start without a key: its id is the gateway's, the same in every try.
    let request = start_request(ConversationId::new_v7(fixture.clock_ms()), group("office"), "ann", "still open?");
    let first = fixture.router.start_chat(request.clone()).await.unwrap();
    assert!(!first.duplicate);
    // Its answer is lost; the gateway tries again a minute later, after closing time.
    fixture.pass(60_000).await;
    let again = StartChat { tried_before: true, ..request.clone() };
    let started = fixture.router.start_chat(again).await.unwrap();
    assert_eq!(
        (started.view.conversation, started.view.state, started.customer_token.clone()),
        (request.conversation, ConversationState::Queued, first.customer_token),
        "the chat the first try stored, with its token"
    );
    assert!(started.duplicate, "the router found it stored (the gateway's client tells its caller otherwise)");
    // A start not tried before is refused without looking: nothing of that id is stored.
    let late = StartChat { conversation: ConversationId::new_v7(fixture.clock_ms()), ..request };
    assert_eq!(fixture.router.start_chat(late.clone()).await, Err(RouterError::Refused(Refusal::GroupClosed)));
    // Tried before but never stored (the first try failed before the store): still refused.
    let late = StartChat { tried_before: true, ..late };
    assert_eq!(fixture.router.start_chat(late).await, Err(RouterError::Refused(Refusal::GroupClosed)));
}

#[tokio::test(start_paused = true)]
async fn a_transfer_needs_an_online_group_and_keeps_the_arrival_time() {
    let mut fixture = fixture().await;
    sign_in(&fixture, "b").await;
    let chat = fixture.start_chat("g1", "ann").await;
    fixture.router.subscribe(&fixture.gateway, &Caller::Customer { conversation: chat }, chat, 0).await.unwrap();
    fixture.router.accept_chat(&tenant(), &agent("b"), chat).await.unwrap();
    // `never` is closed, `t` is open but nobody is signed in.
    for target in ["never", "t"] {
        let refused = fixture.router.transfer_chat(&caller("b"), chat, &group(target)).await;
        assert_eq!(refused, Err(RouterError::Refused(Refusal::GroupOffline)), "{target}");
    }
    sign_in(&fixture, "w").await;
    fixture.router.subscribe_queue(&fixture.gateway, &tenant(), &group("t")).await.unwrap();
    fixture.drain();
    let view = fixture.router.transfer_chat(&caller("b"), chat, &group("t")).await.unwrap();
    assert_eq!((view.state, view.group.clone(), view.owner.clone()), (ConversationState::Queued, group("t"), None));
    settle().await;
    let pushes = fixture.drain();
    let added = pushes.iter().find_map(|push| match push {
        Push::Queue { change: QueueChange::Added { entry }, .. } => Some(entry.clone()),
        _ => None,
    });
    let added = added.expect("the chat joins t's queue");
    assert_eq!(added.conversation, chat);
    assert_eq!(added.queued_at_ms, view.created_at_ms, "placed by its original arrival");
    let told = pushes.iter().any(|push| {
        matches!(push, Push::Event { conversation, event, .. } if *conversation == chat
            && matches!(&event.body, EventBody::Transferred { from_agent: Some(from), to_group } if *from == agent("b") && *to_group == group("t")))
    });
    assert!(told, "both sides are told by the transferred event: {pushes:?}");
    // b's slot is free again; w can take the chat from t's queue.
    let b = fixture.router.set_agent_status(&tenant(), &agent("b"), AgentStatus::Online).await.unwrap();
    assert!(b.active.is_empty());
    fixture.router.accept_chat(&tenant(), &agent("w"), chat).await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_forward_needs_an_online_agent_with_a_free_slot() {
    let mut fixture = fixture().await;
    sign_in(&fixture, "b").await;
    let chat = fixture.start_chat("g1", "ann").await;
    fixture.router.subscribe(&fixture.gateway, &caller("b"), chat, 0).await.unwrap();
    fixture.router.accept_chat(&tenant(), &agent("b"), chat).await.unwrap();
    let refused = fixture.router.forward_chat(&caller("b"), chat, &agent("c")).await;
    assert_eq!(refused, Err(RouterError::Refused(Refusal::AgentUnavailable)), "c is offline");
    sign_in(&fixture, "c").await;
    fixture.drain();
    let view = fixture.router.forward_chat(&caller("b"), chat, &agent("c")).await.unwrap();
    assert_eq!(view.owner, Some(agent("c")));
    settle().await;
    let pushes = fixture.drain();
    let assigned = pushes.iter().any(|push| {
        matches!(push, Push::Agent { agent: to, change: AgentChange::Assigned { chat: view }, .. } if *to == agent("c") && view.conversation == chat)
    });
    assert!(assigned, "the new agent is told");
    let told = pushes.iter().any(|push| {
        matches!(push, Push::Event { event, .. } if matches!(&event.body, EventBody::Forwarded { to_agent, .. } if *to_agent == agent("c")))
    });
    assert!(told, "the customer and the previous agent are told");
    let send = ChatCommand::Send { client_msg_id: "m".into(), body: "still mine?".into() };
    let refused = fixture.router.command(&caller("b"), chat, send).await;
    assert_eq!(refused, Err(RouterError::Refused(Refusal::NotParticipant)));
}

/// A gateway follows an agent on their new owner only once it learns of a move: a chat forwarded to the
/// agent in between, on the new owner, reaches the agent's consoles when their gateway does follow the agent
/// there, as does any gateway that starts following the agent within 30 s while the chat is still theirs.
#[tokio::test(start_paused = true)]
async fn a_chat_forwarded_before_a_gateway_follows_the_agent_is_told_to_it_when_it_does() {
    let mut fixture = fixture().await;
    sign_in(&fixture, "b").await;
    sign_in(&fixture, "c").await;
    let assigned_of = |pushes: &[Push], to: &str| {
        pushes
            .iter()
            .filter_map(|push| match push {
                Push::Agent { agent: pushed, change: AgentChange::Assigned { chat }, .. } if *pushed == agent(to) => {
                    Some(chat.conversation)
                }
                _ => None,
            })
            .collect::<Vec<_>>()
    };
    async fn forward(fixture: &Fixture, chat: ConversationId) {
        fixture.router.accept_chat(&tenant(), &agent("b"), chat).await.unwrap();
        fixture.router.forward_chat(&caller("b"), chat, &agent("c")).await.unwrap();
        settle().await;
    }
    // No gateway follows c here yet, as on a new owner.
    fixture.router.unsubscribe_agent(&fixture.gateway, &tenant(), &agent("c")).await;
    let chat = fixture.start_chat("g1", "ann").await;
    forward(&fixture, chat).await;
    assert_eq!(assigned_of(&fixture.drain(), "c"), [], "nobody to tell");

    fixture.router.subscribe_agent(&fixture.gateway, &tenant(), &agent("c"), &[]).await.unwrap();
    settle().await;
    assert_eq!(assigned_of(&fixture.drain(), "c"), [chat], "told once the gateway follows c");
    fixture.router.subscribe_agent(&fixture.gateway, &tenant(), &agent("c"), &[]).await.unwrap();
    settle().await;
    assert_eq!(assigned_of(&fixture.drain(), "c"), [], "not again to a gateway that followed c already");

    // A chat forwarded while the gateway follows c is told at once, and to a gateway that starts following c
    // later, with the first, but not once it is no longer c's.
    let second = fixture.start_chat("g1", "bea").await;
    forward(&fixture, second).await;
    assert_eq!(assigned_of(&fixture.drain(), "c"), [second]);
    let closed = fixture.start_chat("g1", "cid").await;
    forward(&fixture, closed).await;
    fixture.router.command(&caller("c"), closed, ChatCommand::Close).await.unwrap();
    fixture.pass(20_000).await;
    assert_eq!(assigned_of(&another_follows_c(&fixture, "gw-2").await, "c"), [chat, second], "each still c's");

    // 30 s after they were assigned, they are no longer told.
    fixture.pass(10_001).await;
    assert_eq!(assigned_of(&another_follows_c(&fixture, "gw-3").await, "c"), []);
}

/// A gateway follows an agent again (after a move of the agent, or a lost push stream) telling the offers it
/// showed their consoles: those that ended while it did not follow the agent are ended for it, each with the
/// reason its expiry gives; an offer still outstanding, or of a chat the agent took, is not.
#[tokio::test(start_paused = true)]
async fn offers_that_ended_while_a_gateway_did_not_follow_the_agent_are_ended_when_it_follows_again() {
    let mut fixture = fixture().await;
    sign_in(&fixture, "y").await;
    let offered = |pushes: &[Push]| match shown(pushes)[..] {
        [(offered_to, entry, expires_at_ms, _)] if *offered_to == agent("y") => (entry.conversation, expires_at_ms),
        ref other => panic!("one offer to y expected: {other:?}"),
    };
    let ended = |pushes: &[Push]| {
        let ends = pushes.iter().filter_map(|push| match push {
            Push::Agent { change: AgentChange::OfferEnded { conversation, reason }, .. } => {
                Some((*conversation, *reason))
            }
            _ => None,
        });
        ends.collect::<Vec<_>>()
    };
    let held = fixture.start_chat("push", "ann").await;
    settle().await;
    let (_, held_expiry) = offered(&fixture.drain());
    fixture.router.accept_chat(&tenant(), &agent("y"), held).await.unwrap();
    let chat = fixture.start_chat("push", "bea").await;
    settle().await;
    let (_, expires_at_ms) = offered(&fixture.drain());

    // The gateway stops following y, as when y moves to another router; y declines meanwhile.
    fixture.router.unsubscribe_agent(&fixture.gateway, &tenant(), &agent("y")).await;
    fixture.router.reject_offer(&tenant(), &group("push"), &agent("y"), chat).await.unwrap();
    settle().await;
    assert_eq!(ended(&fixture.drain()), [], "nobody follows y here");

    let long_gone = ConversationId::new_v7(fixture.clock_ms() - 60_000);
    let shown_here = [
        ShownOffer { conversation: chat, expires_at_ms },
        ShownOffer { conversation: held, expires_at_ms: held_expiry },
        ShownOffer { conversation: long_gone, expires_at_ms: fixture.clock_ms() - 1 },
    ];
    fixture.router.subscribe_agent(&fixture.gateway, &tenant(), &agent("y"), &shown_here).await.unwrap();
    settle().await;
    let pushes = fixture.drain();
    assert_eq!(ended(&pushes), [(chat, OfferEnd::Withdrawn), (long_gone, OfferEnd::TimedOut)]);
    assert_eq!(offers(&pushes), [], "nothing outstanding to show again");

    // A gateway already told of the end is told nothing more; the chat is offered to y again (the only agent)
    // in a new round: an offer shown before of the same chat is not ended by it.
    fixture.pass(OFFER_TIMEOUT_MS + 1_000).await;
    let (again, later_expiry) = offered(&fixture.drain());
    assert_eq!(again, chat);
    assert!(later_expiry > expires_at_ms);
    fixture.router.unsubscribe_agent(&fixture.gateway, &tenant(), &agent("y")).await;
    let shown_here = [ShownOffer { conversation: chat, expires_at_ms }];
    fixture.router.subscribe_agent(&fixture.gateway, &tenant(), &agent("y"), &shown_here).await.unwrap();
    settle().await;
    let pushes = fixture.drain();
    assert_eq!(ended(&pushes), []);
    assert_eq!(offered(&pushes), (chat, later_expiry), "shown again, with its own expiry");
}

/// A gateway named `name` connects and follows agent c: what it is pushed at once.
async fn another_follows_c(fixture: &Fixture, name: &str) -> Vec<Push> {
    let (sink, mut pushes) = tokio::sync::mpsc::unbounded_channel();
    let gateway = switchboard_proto::router::GatewayId(name.into());
    fixture.router.connect_gateway(gateway.clone(), sink);
    fixture.router.subscribe_agent(&gateway, &tenant(), &agent("c"), &[]).await.unwrap();
    settle().await;
    let mut pushed = Vec::new();
    while let Ok(push) = pushes.try_recv() {
        pushed.push(push);
    }
    pushed
}

#[tokio::test(start_paused = true)]
async fn an_agent_without_connection_keeps_their_chats_for_the_grace_period_then_they_are_requeued() {
    let mut fixture = fixture().await;
    sign_in(&fixture, "b").await;
    let chat = fixture.start_chat("g1", "ann").await;
    fixture.router.accept_chat(&tenant(), &agent("b"), chat).await.unwrap();
    fixture.router.subscribe_queue(&fixture.gateway, &tenant(), &group("g1")).await.unwrap();
    fixture.presence.session_gone(&tenant(), &agent("b"), "s-b", fixture.clock_ms()).await.unwrap();
    let grace_ms = i64::try_from(GRACE.as_millis()).unwrap();
    fixture.pass(grace_ms - 2_000).await;
    let view = fixture.router.chat_view(&caller("b"), chat).await.unwrap();
    assert_eq!(view.owner, Some(agent("b")), "kept during the grace period");
    // Coming back within the grace period would keep everything; staying away does not.
    fixture.pass(3_000).await;
    let view = fixture.router.chat_view(&caller("b"), chat).await.unwrap();
    assert_eq!((view.state, view.owner), (ConversationState::Queued, None), "back in the queue");
    let agent_view = fixture.router.set_agent_status(&tenant(), &agent("b"), AgentStatus::Offline).await.unwrap();
    assert!(agent_view.active.is_empty());
    let pushes = fixture.drain();
    let requeued = pushes.iter().any(
        |push| matches!(push, Push::Queue { change: QueueChange::Added { entry }, .. } if entry.conversation == chat),
    );
    assert!(requeued, "the queue shows the chat again: {pushes:?}");
    let went_offline = pushes.iter().any(|push| {
        matches!(push, Push::Agent { change: AgentChange::Status { agent }, .. } if agent.status == AgentStatus::Offline)
    });
    assert!(went_offline);
}

/// Milliseconds since the epoch of a UTC date and time.
fn utc_ms(date: &str) -> i64 {
    date.parse::<jiff::Timestamp>().unwrap().as_millisecond()
}

#[tokio::test(start_paused = true)]
async fn group_status_follows_business_hours_in_the_group_time_zone_across_dst() {
    let fixture = fixture().await;
    // Friday 2026-03-27, before the change to summer time: Berlin is UTC+1.
    let now = fixture.clock_ms();
    fixture.clock.advance_ms(utc_ms("2026-03-27T07:30:00Z") - now);
    sign_in(&fixture, "w").await;
    let office = |fixture: &Fixture| {
        let presence = fixture.presence.clone();
        async move {
            let statuses = presence.group_statuses(&tenant()).await.unwrap();
            let status = statuses.into_iter().find(|status| status.group == group("office")).unwrap();
            (status.open, status.signed_in, status.online)
        }
    };
    fixture.pass(1_000).await;
    assert_eq!(office(&fixture).await, (false, 1, false), "08:30 in Berlin: not open yet");
    fixture.pass(60 * 60_000).await;
    assert_eq!(office(&fixture).await, (true, 1, true), "09:30 in Berlin: open with w signed in");
    // Monday 2026-03-30, summer time (UTC+2): 07:30 UTC is 09:30 in Berlin, open, though it was closed at
    // that UTC time on Friday.
    let now = fixture.clock_ms();
    fixture.clock.advance_ms(utc_ms("2026-03-30T07:30:00Z") - now);
    // Three days passed at once: the signed-in mark expired meanwhile and is refreshed at the next heartbeat.
    fixture.pass(2_000).await;
    assert_eq!(office(&fixture).await, (true, 1, true), "09:30 in Berlin in summer time");
    let now = fixture.clock_ms();
    fixture.clock.advance_ms(utc_ms("2026-03-30T15:30:00Z") - now);
    fixture.pass(1_000).await;
    assert_eq!(office(&fixture).await, (false, 1, false), "17:30 in Berlin: closed");
}

#[tokio::test(start_paused = true)]
async fn signing_out_puts_the_agents_chats_back_in_their_queue_at_once() {
    let fixture = fixture().await;
    sign_in(&fixture, "b").await;
    let chat = fixture.start_chat("g1", "ann").await;
    fixture.router.accept_chat(&tenant(), &agent("b"), chat).await.unwrap();
    let view = fixture.router.set_agent_status(&tenant(), &agent("b"), AgentStatus::Offline).await.unwrap();
    assert_eq!((view.status, view.active.len()), (AgentStatus::Offline, 0));
    let chat_view = fixture.router.chat_view(&caller("c"), chat).await.unwrap();
    assert_eq!((chat_view.state, chat_view.owner), (ConversationState::Queued, None), "no grace period");
}

/// The state of a chat, as its customer sees it.
async fn state(fixture: &Fixture, chat: ConversationId) -> ConversationState {
    fixture.router.chat_view(&Caller::Customer { conversation: chat }, chat).await.unwrap().state
}

/// The record of a customer's connection to `chat` in presence.
fn customer_session(chat: ConversationId, session: &str) -> CustomerSession {
    CustomerSession { tenant: tenant(), conversation: chat, session: session.into() }
}

#[tokio::test(start_paused = true)]
async fn a_waiting_chat_whose_customer_stays_away_for_the_grace_period_is_abandoned_and_no_other() {
    let mut fixture = fixture().await;
    fixture.router.subscribe_queue(&fixture.gateway, &tenant(), &group("g1")).await.unwrap();
    let gone = fixture.start_chat("g1", "ann").await;
    let here = fixture.start_chat("g1", "bob").await;
    let unknown = fixture.start_chat("g1", "cy").await;
    let back = fixture.start_chat("g1", "dee").await;
    // Good for an hour (not refreshed): far shorter than presence keeps an ended connection.
    let far = fixture.clock_ms() + 60 * 60_000;
    let sessions = [customer_session(gone, "s1"), customer_session(here, "s2"), customer_session(back, "s3")];
    fixture.presence.customers_alive(&sessions, far).await.unwrap();
    // `unknown` has no record at all (a gateway from before customers were recorded): never abandoned.
    let left_at = fixture.clock_ms();
    fixture.presence.customer_gone(&sessions[0], left_at).await.unwrap();
    fixture.presence.customer_gone(&sessions[2], left_at).await.unwrap();
    let grace_ms = i64::try_from(ABANDON_AFTER.as_millis()).unwrap();
    fixture.pass(grace_ms - 1_000).await;
    for chat in [gone, here, unknown, back] {
        assert_eq!(state(&fixture, chat).await, ConversationState::Queued, "within the grace period");
    }
    // `back` reloads the page: a new connection.
    fixture.presence.customers_alive(&[customer_session(back, "s4")], far).await.unwrap();
    fixture.drain();
    // Found gone at most one read (every 5 heartbeats) after they left, abandoned at the first read a grace
    // period after that.
    fixture.pass(2 * 6_000).await;
    assert_eq!(state(&fixture, gone).await, ConversationState::Cancelled);
    for chat in [here, unknown, back] {
        assert_eq!(state(&fixture, chat).await, ConversationState::Queued, "{chat} is not abandoned");
    }
    let page = fixture.router.read_events(&Caller::Customer { conversation: gone }, gone, 0).await.unwrap();
    let last = page.events.last().unwrap();
    assert_eq!(
        (&last.author, &last.body),
        (&Author::System, &EventBody::Cancelled { reason: Some(CancelReason::Abandoned) }),
        "cancelled by the system, saying why"
    );
    let removed: Vec<(ConversationId, LeftQueue)> = fixture
        .drain()
        .into_iter()
        .filter_map(|push| match push {
            Push::Queue { change: QueueChange::Removed { conversation, reason }, .. } => Some((conversation, reason)),
            _ => None,
        })
        .collect();
    assert_eq!(removed, [(gone, LeftQueue::Abandoned)], "the queue's watchers are told why it left");
    // `back` leaves again: the count starts from then, not from their first departure.
    fixture.presence.customer_gone(&customer_session(back, "s4"), fixture.clock_ms()).await.unwrap();
    fixture.pass(grace_ms - 1_000).await;
    assert_eq!(state(&fixture, back).await, ConversationState::Queued);
    fixture.pass(2 * 6_000).await;
    assert_eq!(state(&fixture, back).await, ConversationState::Cancelled);
    assert_eq!(state(&fixture, here).await, ConversationState::Queued);
    assert_eq!(state(&fixture, unknown).await, ConversationState::Queued);
    // Each abandoned chat gave its license permit back (its append named a finished state).
    assert_eq!(fixture.counted.finishing_appends(), 2);
}

/// The events the gateway was pushed, per chat: (chat, author, kind).
fn pushed_events(pushes: &[Push]) -> Vec<(ConversationId, Author, &'static str)> {
    pushes
        .iter()
        .filter_map(|push| match push {
            Push::Event { conversation, event, .. } => Some((*conversation, event.author.clone(), event.body.kind())),
            _ => None,
        })
        .collect()
}

/// Agent b signs in; a chat of each customer starts in g1, then b accepts each and the fixture's gateway
/// follows it.
async fn accepted_by_b<const N: usize>(fixture: &Fixture, customers: [&str; N]) -> [ConversationId; N] {
    sign_in(fixture, "b").await;
    let mut chats = Vec::new();
    for customer in customers {
        chats.push(fixture.start_chat("g1", customer).await);
    }
    for &chat in &chats {
        fixture.router.accept_chat(&tenant(), &agent("b"), chat).await.unwrap();
        fixture.router.subscribe(&fixture.gateway, &caller("b"), chat, 0).await.unwrap();
    }
    chats.try_into().unwrap()
}

#[tokio::test(start_paused = true)]
async fn an_ongoing_chats_customer_who_stays_away_for_the_grace_period_has_left_and_is_back_when_they_connect() {
    let mut fixture = fixture().await;
    let [gone, two_tabs, reloads, unknown] = accepted_by_b(&fixture, ["ann", "bob", "cy", "dee"]).await;
    let far = fixture.clock_ms() + 60 * 60_000;
    let sessions = [customer_session(gone, "s1"), customer_session(two_tabs, "s2a"), customer_session(reloads, "s3")];
    fixture.presence.customers_alive(&sessions, far).await.unwrap();
    fixture.presence.customers_alive(&[customer_session(two_tabs, "s2b")], far).await.unwrap();
    fixture.drain();
    // Each gateway writes a connection's end to presence, then tells the chat's owner. `unknown`'s customer
    // was never recorded (a gateway from before customers were, or presence restarted empty).
    for session in &sessions {
        fixture.presence.customer_gone(session, fixture.clock_ms()).await.unwrap();
        fixture.router.customer_connection(session.conversation).await.unwrap();
    }
    fixture.router.customer_connection(unknown).await.unwrap();
    let grace_ms = i64::try_from(CUSTOMER_GRACE.as_millis()).unwrap();
    fixture.pass(grace_ms / 2).await;
    // `reloads` reloads the page: a new connection, within the grace period.
    fixture.presence.customers_alive(&[customer_session(reloads, "s4")], far).await.unwrap();
    fixture.router.customer_connection(reloads).await.unwrap();
    fixture.pass(grace_ms / 2 - 100).await;
    assert_eq!(pushed_events(&fixture.drain()), [], "nothing within the grace period");
    fixture.pass(200).await;
    assert_eq!(
        pushed_events(&fixture.drain()),
        [(gone, Author::System, "customer_left")],
        "told once, to the gateway following the chat; not for a customer still connected elsewhere, back, or \
         never recorded"
    );
    fixture.pass(3 * grace_ms).await;
    assert_eq!(pushed_events(&fixture.drain()), [], "once");
    let stored = fixture.store.get_conversation(GetConversationRequest { conversation_id: gone.to_string() });
    assert!(stored.await.unwrap().conversation.unwrap().customer_away, "kept in the chat's summary");
    // The customer comes back: at once.
    fixture.presence.customers_alive(&[customer_session(gone, "s5")], far).await.unwrap();
    fixture.router.customer_connection(gone).await.unwrap();
    settle().await;
    assert_eq!(pushed_events(&fixture.drain()), [(gone, Author::System, "customer_returned")]);
    // Ended chats record nothing more.
    fixture.router.command(&caller("b"), gone, ChatCommand::Close).await.unwrap();
    fixture.presence.customer_gone(&customer_session(gone, "s5"), fixture.clock_ms()).await.unwrap();
    fixture.router.customer_connection(gone).await.unwrap();
    fixture.pass(2 * grace_ms).await;
    assert_eq!(pushed_events(&fixture.drain()), [(gone, Author::Agent(agent("b")), "closed")]);
}

/// How long readings confirm a departure in the test routers (two customer heartbeats, shorter than the
/// customers' grace period and the abandonment's).
fn confirm_ms() -> i64 {
    let confirm_ms = 2 * i64::try_from(CUSTOMER_HEARTBEAT.as_millis()).unwrap();
    assert!(confirm_ms < i64::try_from(CUSTOMER_GRACE.min(ABANDON_AFTER).as_millis()).unwrap());
    confirm_ms
}

#[tokio::test(start_paused = true)]
async fn a_chat_whose_customer_went_away_while_it_waited_tells_its_agent_once_a_reading_confirms_it_after_the_accept() {
    let mut fixture = fixture().await;
    sign_in(&fixture, "b").await;
    let chat = fixture.start_chat("g1", "ann").await;
    let session = customer_session(chat, "s1");
    fixture.presence.customers_alive(std::slice::from_ref(&session), fixture.clock_ms() + 60_000).await.unwrap();
    fixture.presence.customer_gone(&session, fixture.clock_ms()).await.unwrap();
    // Waiting, the chat records nothing of it (the queue abandons it if nobody takes it in time).
    fixture.router.customer_connection(chat).await.unwrap();
    let grace_ms = i64::try_from(CUSTOMER_GRACE.as_millis()).unwrap();
    fixture.pass(2 * grace_ms).await;
    fixture.router.accept_chat(&tenant(), &agent("b"), chat).await.unwrap();
    fixture.router.subscribe(&fixture.gateway, &caller("b"), chat, 0).await.unwrap();
    fixture.drain();
    // No gateway says anything more: the accept itself has the customer's presence read, which says they have
    // been gone longer than the grace period: a reading the confirmation span later records it (not a whole
    // grace period after the accept).
    fixture.pass(confirm_ms() - 100).await;
    assert_eq!(pushed_events(&fixture.drain()), []);
    fixture.pass(200).await;
    assert_eq!(pushed_events(&fixture.drain()), [(chat, Author::System, "customer_left")]);
}

#[tokio::test(start_paused = true)]
async fn a_customer_whose_gateway_went_with_them_has_left_once_the_agents_owner_finds_them_gone_for_the_grace_period() {
    let mut fixture = fixture().await;
    let [lapsed, here, _never_recorded] = accepted_by_b(&fixture, ["ann", "bob", "cy"]).await;
    // `lapsed`'s gateway writes its connection once more, then crashes: nothing ends the connection, and no
    // gateway tells the chat; the record lapses. `here`'s customer stays; `unknown`'s was never recorded.
    let lapses_at = fixture.clock_ms() + 3_000;
    fixture.presence.customers_alive(&[customer_session(lapsed, "s1")], lapses_at).await.unwrap();
    let far = fixture.clock_ms() + 60 * 60_000;
    fixture.presence.customers_alive(&[customer_session(here, "s2")], far).await.unwrap();
    fixture.drain();
    let grace_ms = i64::try_from(CUSTOMER_GRACE.as_millis()).unwrap();
    // Found gone by the agent's owner from the first reading past the lapse, for the grace period at least.
    fixture.pass(lapses_at - fixture.clock_ms() + grace_ms - 100).await;
    assert_eq!(pushed_events(&fixture.drain()), []);
    // Its readings come every five heartbeats: one more period to find them gone, one to count the grace.
    fixture.pass(2 * 5 * 1_000 + 1_000).await;
    assert_eq!(
        pushed_events(&fixture.drain()),
        [(lapsed, Author::System, "customer_left")],
        "not for a customer still here or never recorded"
    );
    // Still gone, the chat is told again every grace period, and records nothing more.
    fixture.pass(4 * grace_ms).await;
    assert_eq!(pushed_events(&fixture.drain()), [], "once");
    let stored = fixture.store.get_conversation(GetConversationRequest { conversation_id: lapsed.to_string() });
    assert!(stored.await.unwrap().conversation.unwrap().customer_away);
}

#[tokio::test(start_paused = true)]
async fn a_chat_told_its_customer_is_gone_records_it_once_presence_says_they_have_been_gone_for_the_grace_period() {
    let mut fixture = fixture().await;
    let [closed, lapsed, here] = accepted_by_b(&fixture, ["ann", "bob", "cy"]).await;
    let far = fixture.clock_ms() + 60 * 60_000;
    let lapses_at = fixture.clock_ms() + 1_000;
    fixture.presence.customers_alive(&[customer_session(lapsed, "s2")], lapses_at).await.unwrap();
    fixture.presence.customers_alive(&[customer_session(here, "s3")], far).await.unwrap();
    let grace_ms = i64::try_from(CUSTOMER_GRACE.as_millis()).unwrap();
    // Past the grace period of the accepts' own readings (which found every customer here).
    fixture.pass(grace_ms + 100).await;
    fixture.drain();
    // `closed`'s customer closes the tab; their gateway tells the chat, whose reading finds them gone. The
    // agent's owner says they are gone just after (a telling of an earlier departure, say): each chat's grace
    // period runs from what presence says, in which the customer may reload.
    let session = customer_session(closed, "s1");
    fixture.presence.customers_alive(std::slice::from_ref(&session), far).await.unwrap();
    fixture.presence.customer_gone(&session, fixture.clock_ms()).await.unwrap();
    fixture.router.customer_connection(closed).await.unwrap();
    settle().await;
    // `lapsed`'s gateway went with them, 900 ms short of the grace period ago; `here` is here.
    for chat in [closed, lapsed, here] {
        assert!(!fixture.router.conversation_system(chat, SystemCommand::CustomerGone).await.unwrap());
    }
    fixture.pass(800).await;
    assert_eq!(pushed_events(&fixture.drain()), [], "nobody gone for the grace period yet");
    fixture.pass(200).await;
    assert_eq!(pushed_events(&fixture.drain()), [(lapsed, Author::System, "customer_left")], "from its lapse");
    fixture.pass(grace_ms - 1_200).await;
    assert_eq!(pushed_events(&fixture.drain()), []);
    fixture.pass(200).await;
    assert_eq!(pushed_events(&fixture.drain()), [(closed, Author::System, "customer_left")]);
    // Told again, once recorded away: nothing.
    fixture.router.conversation_system(lapsed, SystemCommand::CustomerGone).await.unwrap();
    fixture.pass(2 * grace_ms).await;
    assert_eq!(pushed_events(&fixture.drain()), []);
}

/// The kind of a chat's last event, as its customer reads it.
async fn last_kind(router: &impl RouterApi, chat: ConversationId) -> &'static str {
    let page = router.read_events(&Caller::Customer { conversation: chat }, chat, 0).await.unwrap();
    page.events.last().unwrap().body.kind()
}

#[tokio::test(start_paused = true)]
async fn a_new_owner_of_an_active_chat_reads_its_customer_and_knows_whether_they_had_left() {
    let fixture = fixture().await;
    sign_in(&fixture, "b").await;
    let (left, leaving) = (fixture.start_chat("g1", "ann").await, fixture.start_chat("g1", "bob").await);
    for chat in [left, leaving] {
        fixture.router.accept_chat(&tenant(), &agent("b"), chat).await.unwrap();
    }
    let far = fixture.clock_ms() + 60 * 60_000;
    let sessions = [customer_session(left, "s1"), customer_session(leaving, "s2")];
    fixture.presence.customers_alive(&sessions, far).await.unwrap();
    let grace_ms = i64::try_from(CUSTOMER_GRACE.as_millis()).unwrap();
    fixture.presence.customer_gone(&sessions[0], fixture.clock_ms()).await.unwrap();
    fixture.router.customer_connection(left).await.unwrap();
    fixture.pass(grace_ms + 200).await;
    assert_eq!(last_kind(&fixture.router, left).await, "customer_left");
    // `leaving`'s customer goes away just before the node stops for good: the timer goes with it.
    fixture.presence.customer_gone(&sessions[1], fixture.clock_ms()).await.unwrap();
    fixture.router.customer_connection(leaving).await.unwrap();
    settle().await;
    let common::Fixture { router, store, clock, presence, .. } = fixture;
    drop(router);
    let pass = |ms: i64| common::pass(&clock, ms);
    // Its leases lapse (on the store's clock only: none of the stopped node's timers runs meanwhile).
    clock.advance_ms(60_000);
    let new_owner =
        common::start_router_from(common::router_settings("node-2"), store, clock.clone(), presence.clone()).await;
    // The agent reads the chat: its actor starts on the new owner, which reads its customer: presence says
    // they have been gone for longer than the grace period, so the timer does not start again from zero. A
    // reading the confirmation span later records it.
    new_owner.chat_view(&caller("b"), leaving).await.unwrap();
    pass(confirm_ms() - 100).await;
    assert_eq!(last_kind(&new_owner, leaving).await, "accepted");
    pass(200).await;
    assert_eq!(last_kind(&new_owner, leaving).await, "customer_left");
    // `left`'s customer comes back: the new owner knows from the chat's summary that they had left.
    presence.customers_alive(&[customer_session(left, "s3")], far).await.unwrap();
    new_owner.customer_connection(left).await.unwrap();
    settle().await;
    assert_eq!(last_kind(&new_owner, left).await, "customer_returned");
}

#[tokio::test(start_paused = true)]
async fn a_queue_activated_on_a_new_owner_abandons_a_chat_whose_customer_left_before_without_waiting_the_whole_grace() {
    let fixture = fixture().await;
    fixture.router.subscribe_queue(&fixture.gateway, &tenant(), &group("g1")).await.unwrap();
    let chat = fixture.start_chat("g1", "ann").await;
    let session = customer_session(chat, "s1");
    fixture.presence.customers_alive(std::slice::from_ref(&session), fixture.clock_ms() + 60_000).await.unwrap();
    fixture.presence.customer_gone(&session, fixture.clock_ms()).await.unwrap();
    let grace_ms = i64::try_from(ABANDON_AFTER.as_millis()).unwrap();
    fixture.pass(grace_ms / 2).await;
    assert_eq!(state(&fixture, chat).await, ConversationState::Queued, "within the grace period");
    // The queue's node stops for good, half the grace period after the customer left; its leases lapse (on
    // the store's clock only) and a new owner rebuilds the queue from the store.
    let common::Fixture { router, store, clock, presence, .. } = fixture;
    drop(router);
    clock.advance_ms(60_000);
    let new_owner =
        common::start_router_from(common::router_settings("node-2"), store, clock.clone(), presence.clone()).await;
    let (sink, _pushes) = tokio::sync::mpsc::unbounded_channel();
    let gateway = switchboard_proto::router::GatewayId("gw-2".into());
    new_owner.connect_gateway(gateway.clone(), sink);
    new_owner.subscribe_queue(&gateway, &tenant(), &group("g1")).await.unwrap();
    let pass = |ms: i64| common::pass(&clock, ms);
    // Its first reading of the customers (five heartbeats after it started) finds the customer gone, as
    // presence says, since long before the grace period: only the confirmation is left to wait.
    pass(5_500).await;
    let view = new_owner.chat_view(&Caller::Customer { conversation: chat }, chat).await.unwrap();
    assert_eq!(view.state, ConversationState::Queued, "not on one reading");
    // Confirmed over two customer heartbeats, at the first reading after that (readings come every five):
    // not a whole grace period after the new queue first found them gone.
    let confirmed_by = 5_000 + (confirm_ms() + 4_999) / 5_000 * 5_000 + 500;
    assert!(confirmed_by < 5_000 + grace_ms);
    pass(confirmed_by - 5_500).await;
    let view = new_owner.chat_view(&Caller::Customer { conversation: chat }, chat).await.unwrap();
    assert_eq!(view.state, ConversationState::Cancelled);
}

#[tokio::test(start_paused = true)]
async fn a_connected_customer_whose_record_presence_restored_stale_has_not_left_once_their_gateway_writes_it_again() {
    let mut fixture = fixture().await;
    let [stale, gone] = accepted_by_b(&fixture, ["ann", "bob"]).await;
    // Presence restarted from an old copy (a snapshot, a lagging replica): both customers' records say their
    // connection expired ten minutes ago. Ann is connected, and her gateway writes her connection again at
    // its next customer heartbeat; Bob's is truly gone. Something (a connection of theirs) has each chat
    // read its customer meanwhile.
    let old = fixture.clock_ms() - 10 * 60_000;
    let sessions = [customer_session(stale, "s1"), customer_session(gone, "s2")];
    fixture.presence.customers_alive(&sessions, old).await.unwrap();
    fixture.drain();
    for chat in [stale, gone] {
        fixture.router.customer_connection(chat).await.unwrap();
    }
    settle().await;
    assert_eq!(pushed_events(&fixture.drain()), [], "not on one reading");
    let heartbeat_ms = i64::try_from(CUSTOMER_HEARTBEAT.as_millis()).unwrap();
    fixture.pass(heartbeat_ms).await;
    fixture.presence.customers_alive(&sessions[..1], fixture.clock_ms() + 3 * heartbeat_ms).await.unwrap();
    fixture.pass(confirm_ms() - heartbeat_ms + 100).await;
    assert_eq!(pushed_events(&fixture.drain()), [(gone, Author::System, "customer_left")], "Ann is here");
}
