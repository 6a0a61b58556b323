//! The router's actors on tokio's paused clock, over an in-memory store: replies and pushes are asserted,
//! never sleeps.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{agent, fixture, group, start_router, tenant};
use switchboard_domain::{AgentStatus, ConversationState, EventBody, Refusal};
use switchboard_proto::internal::v1::{AcquireShardsRequest, GetConversationRequest};
use switchboard_proto::router::{Caller, ChatCommand, ChatList, LeftQueue, Push, QueueChange, RouterApi, RouterError};
use switchboard_proto::store::StoreApi;

fn agent_caller(name: &str) -> Caller {
    Caller::Agent { tenant: tenant(), agent: agent(name) }
}

async fn online(router: &impl RouterApi, name: &str) {
    router.set_agent_status(&tenant(), &agent(name), AgentStatus::Online).await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn concurrent_accepts_have_one_winner_and_the_rest_are_told_it_was_taken() {
    let fixture = fixture().await;
    let router = Arc::new(fixture.router);
    for name in ["a", "b", "c"] {
        online(router.as_ref(), name).await;
    }
    for _ in 0..10 {
        let conversation = {
            let now_ms = switchboard_domain::Clock::now_ms(fixture.clock.as_ref());
            let request =
                common::start_request(switchboard_domain::ConversationId::new_v7(now_ms), group("g1"), "x", "q");
            router.start_chat(request).await.unwrap().view.conversation
        };
        let attempts = ["a", "b", "c"].map(|name| {
            let router = router.clone();
            tokio::spawn(async move { router.accept_chat(&tenant(), &agent(name), conversation).await })
        });
        let mut results = Vec::new();
        for attempt in attempts {
            results.push(attempt.await.unwrap());
        }
        let winners: Vec<_> = results.iter().filter_map(|result| result.as_ref().ok()).collect();
        assert_eq!(winners.len(), 1, "{results:?}");
        let losers = results.iter().filter(|result| matches!(result, Err(RouterError::Refused(Refusal::ChatTaken))));
        assert_eq!(losers.count(), 2);
        // Free the winner's slot for the next round.
        let owner = winners[0].owner.clone().unwrap();
        let caller = Caller::Agent { tenant: tenant(), agent: owner };
        router.command(&caller, conversation, ChatCommand::Close).await.unwrap();
    }
}

#[tokio::test(start_paused = true)]
async fn an_agent_never_holds_more_chats_than_their_capacity() {
    let fixture = fixture().await;
    online(&fixture.router, "a").await;
    let chats =
        [fixture.start_chat("g1", "x").await, fixture.start_chat("g2", "y").await, fixture.start_chat("g1", "z").await];
    fixture.router.accept_chat(&tenant(), &agent("a"), chats[0]).await.unwrap();
    fixture.router.accept_chat(&tenant(), &agent("a"), chats[1]).await.unwrap();
    let refused = fixture.router.accept_chat(&tenant(), &agent("a"), chats[2]).await;
    assert_eq!(refused, Err(RouterError::Refused(Refusal::AtCapacity { capacity: 2 })));
    // Ending a chat frees a slot.
    fixture.router.command(&agent_caller("a"), chats[0], ChatCommand::Close).await.unwrap();
    fixture.router.accept_chat(&tenant(), &agent("a"), chats[2]).await.unwrap();
    let ongoing = fixture.router.list_chats(&tenant(), &agent("a"), ChatList::Ongoing).await.unwrap();
    assert_eq!(ongoing.len(), 2);
}

#[tokio::test(start_paused = true)]
async fn away_agents_and_strangers_cannot_accept() {
    let fixture = fixture().await;
    let chat = fixture.start_chat("g2", "x").await;
    fixture.router.set_agent_status(&tenant(), &agent("a"), AgentStatus::Away).await.unwrap();
    let away = fixture.router.accept_chat(&tenant(), &agent("a"), chat).await;
    assert_eq!(away, Err(RouterError::Refused(Refusal::AgentNotOnline)));
    online(&fixture.router, "b").await;
    // b is not in g2: the chat is not even visible to b.
    let stranger = fixture.router.accept_chat(&tenant(), &agent("b"), chat).await;
    assert_eq!(stranger, Err(RouterError::NotFound));
}

#[tokio::test(start_paused = true)]
async fn queue_watchers_get_a_snapshot_then_every_change_in_order() {
    let mut fixture = fixture().await;
    let waiting = fixture.start_chat("g1", "first").await;
    fixture.router.subscribe_queue(&fixture.gateway, &tenant(), &group("g1")).await.unwrap();
    let Some(Push::Queue { change: QueueChange::Snapshot { entries }, version: snapshot_version, .. }) =
        fixture.pushes.recv().await
    else {
        panic!("a snapshot comes first")
    };
    assert_eq!(entries.iter().map(|entry| entry.conversation).collect::<Vec<_>>(), [waiting]);
    let second = fixture.start_chat("g1", "second").await;
    let Some(Push::Queue { change: QueueChange::Added { entry }, version: added_version, .. }) =
        fixture.pushes.recv().await
    else {
        panic!("then the addition")
    };
    assert_eq!(entry.conversation, second);
    assert_eq!(added_version, snapshot_version + 1);
    online(&fixture.router, "b").await;
    fixture.router.accept_chat(&tenant(), &agent("b"), waiting).await.unwrap();
    let Some(Push::Queue { change: QueueChange::Removed { conversation, reason }, version, .. }) =
        fixture.pushes.recv().await
    else {
        panic!("then the removal")
    };
    assert_eq!(
        (conversation, reason, version),
        (waiting, LeftQueue::Accepted { agent: agent("b") }, added_version + 1)
    );
}

/// A catch-up within the chat's newest events (a subscription after the start, a reconnect) is answered by
/// its actor; only an older one reads the store, and both give the log as stored.
#[tokio::test(start_paused = true)]
async fn catch_ups_within_the_newest_events_do_not_read_the_store() {
    let fixture = fixture().await;
    let chat = fixture.start_chat("g1", "x").await;
    let customer = Caller::Customer { conversation: chat };
    let opening = fixture.router.subscribe(&fixture.gateway, &customer, chat, 0).await.unwrap().events;
    assert_eq!(opening.iter().map(|event| event.seq).collect::<Vec<_>>(), [1, 2]);
    assert_eq!(fixture.counted.reads(), 0, "the new chat's subscription is answered from its actor");
    for n in 0..30 {
        let send = ChatCommand::Send { client_msg_id: format!("m{n}"), body: format!("message {n}") };
        fixture.router.command(&customer, chat, send).await.unwrap();
    }
    let stored = fixture
        .store
        .read_events(switchboard_proto::internal::v1::ReadEventsRequest {
            conversation_id: chat.to_string(),
            after_seq: 0,
            ..Default::default()
        })
        .await
        .unwrap()
        .events;
    assert_eq!(stored.len(), 32);
    let reads = fixture.counted.reads();
    let recent = fixture.router.read_events(&customer, chat, 24).await.unwrap().events;
    assert_eq!(recent.iter().map(|event| event.seq).collect::<Vec<_>>(), (25..=32).collect::<Vec<_>>());
    let EventBody::Message { body } = &recent[0].body else { panic!("a message: {:?}", recent[0]) };
    assert_eq!(body, "message 22");
    assert_eq!(recent[0].client_msg_id.as_deref(), Some("m22"));
    assert_eq!(fixture.counted.reads(), reads, "the newest events are answered from the actor");
    let whole = fixture.router.read_events(&customer, chat, 0).await.unwrap().events;
    assert_eq!(whole.len(), 32);
    assert_eq!(whole.iter().map(|event| event.seq).collect::<Vec<_>>(), (1..=32).collect::<Vec<_>>());
    assert_eq!(fixture.counted.reads(), reads + 1, "the whole log is older than the actor keeps: the store is read");
}

#[tokio::test(start_paused = true)]
async fn subscribers_get_the_backlog_then_live_events_without_gap() {
    let mut fixture = fixture().await;
    let chat = fixture.start_chat("g1", "x").await;
    let customer = Caller::Customer { conversation: chat };
    let backlog = fixture.router.subscribe(&fixture.gateway, &customer, chat, 1).await.unwrap().events;
    assert_eq!(backlog.iter().map(|event| event.seq).collect::<Vec<_>>(), [2]);
    let send = ChatCommand::Send { client_msg_id: "m1".into(), body: "hello?".into() };
    let outcome = fixture.router.command(&customer, chat, send.clone()).await.unwrap();
    assert_eq!(outcome.event.as_ref().map(|event| event.seq), Some(3));
    let Some(Push::Event { event, .. }) = fixture.pushes.recv().await else { panic!("the message is pushed") };
    assert_eq!(event.seq, 3);
    // The resend is answered from the store and pushed to nobody.
    let resent = fixture.router.command(&customer, chat, send).await.unwrap();
    assert!(resent.duplicate);
    assert_eq!(resent.event.map(|event| event.seq), Some(3));
    assert!(fixture.pushes.try_recv().is_err());
}

#[tokio::test(start_paused = true)]
async fn leases_are_renewed_without_fencing_off_the_node_itself() {
    let fixture = fixture().await;
    let chat = fixture.start_chat("g1", "x").await;
    // Many renewal rounds pass (database time moves with them).
    for _ in 0..20 {
        fixture.clock.advance_ms(2_000);
        tokio::time::advance(Duration::from_secs(2)).await;
        tokio::task::yield_now().await;
    }
    assert_eq!(fixture.router.n_shards_owned(), 1024);
    let customer = Caller::Customer { conversation: chat };
    let send = ChatCommand::Send { client_msg_id: "m1".into(), body: "still mine".into() };
    fixture.router.command(&customer, chat, send).await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_node_whose_shards_were_taken_over_can_no_longer_write() {
    let fixture = fixture().await;
    let chat = fixture.start_chat("g1", "x").await;
    // The lease expires in database time and another node takes every shard.
    fixture.clock.advance_ms(60_000);
    let taken = fixture
        .store
        .acquire_shards(AcquireShardsRequest { node_id: "node-2".into(), shards: vec![], lease_ms: 10_000, limit: 0 })
        .await
        .unwrap();
    assert_eq!(taken.granted.len(), 1024);
    let customer = Caller::Customer { conversation: chat };
    let send = ChatCommand::Send { client_msg_id: "m1".into(), body: "too late".into() };
    let refused = fixture.router.command(&customer, chat, send).await;
    assert!(matches!(refused, Err(RouterError::NotOwner)), "{refused:?}");
    // Nothing was stored by the old owner; the new owner sees the chat as it was. (The old node stops for
    // good, so that the new one is alone and holds every shard.)
    drop(fixture.router);
    fixture.clock.advance_ms(60_000);
    let new_owner = start_router("node-2", fixture.store.clone(), fixture.clock.clone()).await;
    assert_eq!(new_owner.n_shards_owned(), 1024);
    let events = new_owner.read_events(&customer, chat, 0).await.unwrap().events;
    assert_eq!(events.len(), 2);
    assert!(events.iter().all(|event| !matches!(&event.body, EventBody::Message { body } if body == "too late")));
}

/// A new owner activates a chat's actor from its summary alone, delivery marks included: no event is read
/// (a mark already made is not stored again). A chat stored before the summary kept
/// the marks has them folded from its whole log, a page at a time. A read from its start is answered with
/// a page and the log's end, the next page read after it.
#[tokio::test(start_paused = true)]
async fn a_new_owner_activates_a_chat_from_its_summary_alone_or_from_its_whole_log_when_its_marks_are_unknown() {
    for marks_unknown in [false, true] {
        activates_from_a_log_longer_than_a_page(marks_unknown).await;
    }
}

async fn activates_from_a_log_longer_than_a_page(marks_unknown: bool) {
    const PAGE_BYTES: u64 = 1024;
    let fixture = fixture().await;
    online(&fixture.router, "b").await;
    let chat = fixture.start_chat("g1", "x").await;
    fixture.router.accept_chat(&tenant(), &agent("b"), chat).await.unwrap();
    let customer = Caller::Customer { conversation: chat };
    let mark = |up_to_seq| ChatCommand::ConfirmDelivery { up_to_seq };
    // The agent's mark is early in the log, the customer's late: each in a different page.
    fixture.router.command(&agent_caller("b"), chat, mark(2)).await.unwrap();
    for n in 0..100 {
        let send = ChatCommand::Send { client_msg_id: format!("m{n}"), body: "y".repeat(200) };
        fixture.router.command(&customer, chat, send).await.unwrap();
    }
    let customer_mark = fixture.router.command(&customer, chat, mark(104)).await.unwrap().event.unwrap().seq;
    let last_seq = customer_mark + 1;
    fixture
        .router
        .command(&customer, chat, ChatCommand::Send { client_msg_id: "z".into(), body: "z".into() })
        .await
        .unwrap();

    // The first node stops for good; another takes every shard, reading pages of 1 KiB.
    drop(fixture.router);
    fixture.clock.advance_ms(60_000);
    let mut settings = common::router_settings("node-2");
    settings.page_bytes = PAGE_BYTES;
    let counted = Arc::new(common::CountedReads::new(fixture.store.clone()));
    counted.marks_unknown.store(marks_unknown, std::sync::atomic::Ordering::SeqCst);
    let new_owner =
        common::start_router_from(settings, counted.clone(), fixture.clock.clone(), fixture.presence.clone()).await;
    let view = new_owner.chat_view(&customer, chat).await.unwrap();
    assert_eq!((view.state, view.last_seq), (ConversationState::Active, last_seq));
    let activation_reads = counted.reads();
    assert_eq!(counted.gets(), 1, "activated once");
    // A message of 200 bytes is some 450 bytes stored: two to a page of 1 KiB.
    if marks_unknown {
        assert!(activation_reads >= 50, "the whole log, 105 events: {activation_reads} reads");
    } else {
        assert_eq!(activation_reads, 0, "the summary alone");
    }
    // Both marks are known: made again, neither is stored.
    for (caller, up_to_seq) in [(agent_caller("b"), 2), (customer.clone(), 104)] {
        let again = new_owner.command(&caller, chat, mark(up_to_seq)).await.unwrap();
        assert_eq!(again.event, None, "the mark up to {up_to_seq} is known to the new owner");
    }
    assert!(new_owner.command(&agent_caller("b"), chat, mark(3)).await.unwrap().event.is_some());

    // A read from the start: a page, and where the log ends; the pages after it make the log.
    let first = new_owner.read_events(&customer, chat, 0).await.unwrap();
    assert!(first.more() && first.last_seq == last_seq + 1, "{} events, up to {}", first.events.len(), first.last_seq);
    let mut seqs: Vec<u64> = first.events.iter().map(|event| event.seq).collect();
    let mut next = first.next_after();
    while let Some(after_seq) = next {
        let page = new_owner.read_events(&customer, chat, after_seq).await.unwrap();
        seqs.extend(page.events.iter().map(|event| event.seq));
        next = page.next_after();
    }
    assert_eq!(seqs, (1..=last_seq + 1).collect::<Vec<_>>());
}

/// A delivery mark updates the chat's summary (the store keeps the marks) but not its state when that did not
/// change: an update that names the state `closed` gives the license permit back, which locks the license row
/// that every chat start takes, and the customer's and the agent's marks of a closed chat need not.
#[tokio::test(start_paused = true)]
async fn a_delivery_mark_on_a_closed_chat_updates_its_marks_but_not_its_state() {
    let fixture = fixture().await;
    online(&fixture.router, "b").await;
    let chat = fixture.start_chat("g1", "x").await;
    fixture.router.accept_chat(&tenant(), &agent("b"), chat).await.unwrap();
    let closed = fixture.router.command(&agent_caller("b"), chat, ChatCommand::Close).await.unwrap();
    assert_eq!(fixture.counted.finishing_appends(), 1, "the close");
    let customer = Caller::Customer { conversation: chat };
    let up_to_seq = closed.event.unwrap().seq;
    let marked = fixture.router.command(&customer, chat, ChatCommand::ConfirmDelivery { up_to_seq }).await.unwrap();
    assert!(marked.event.is_some());
    assert_eq!(fixture.counted.finishing_appends(), 1, "the mark does not name the state again");
    let record = fixture.store.get_conversation(GetConversationRequest { conversation_id: chat.to_string() }).await;
    let record = record.unwrap().conversation.unwrap();
    assert_eq!((record.state.as_str(), record.customer_delivered_up_to), ("closed", up_to_seq));
}

/// A finished chat leaves memory even while a gateway follows it (a console keeps its closed chats open for
/// hours): what comes later activates it again from the store and still reaches the gateway, until the
/// gateway unsubscribes, which it may do while no actor runs.
#[tokio::test(start_paused = true)]
async fn a_followed_chat_leaves_memory_once_finished_and_its_later_events_still_reach_its_gateways() {
    let mut fixture = fixture().await;
    online(&fixture.router, "b").await;
    let chat = fixture.start_chat("g1", "x").await;
    fixture.router.accept_chat(&tenant(), &agent("b"), chat).await.unwrap();
    fixture.router.subscribe(&fixture.gateway, &agent_caller("b"), chat, 0).await.unwrap();
    let closed = fixture.router.command(&agent_caller("b"), chat, ChatCommand::Close).await.unwrap();
    common::settle().await;
    let pushed_seqs = |pushes: Vec<Push>| -> Vec<u64> {
        pushes
            .into_iter()
            .filter_map(|push| match push {
                Push::Event { conversation, event, .. } if conversation == chat => Some(event.seq),
                _ => None,
            })
            .collect()
    };
    let closed_seq = closed.event.unwrap().seq;
    assert_eq!(pushed_seqs(fixture.drain()), [closed_seq]);

    // The customer's delivery mark finds no actor: one is activated from the store.
    let gets = fixture.counted.gets();
    let customer = Caller::Customer { conversation: chat };
    let mark = ChatCommand::ConfirmDelivery { up_to_seq: closed_seq };
    let marked = fixture.router.command(&customer, chat, mark).await.unwrap().event.unwrap();
    assert_eq!(fixture.counted.gets(), gets + 1, "the closed chat's actor was passivated: activated again");
    common::settle().await;
    assert_eq!(pushed_seqs(fixture.drain()), [marked.seq], "the gateway still follows the chat");

    // Unsubscribed while no actor runs: the next mark is not pushed to it.
    fixture.router.unsubscribe(&fixture.gateway, chat).await;
    let mark = ChatCommand::ConfirmDelivery { up_to_seq: marked.seq };
    fixture.router.command(&agent_caller("b"), chat, mark).await.unwrap().event.unwrap();
    common::settle().await;
    assert_eq!(pushed_seqs(fixture.drain()), Vec::<u64>::new());
}

#[tokio::test(start_paused = true)]
async fn a_finished_chat_stays_readable_after_its_actor_passivates() {
    let fixture = fixture().await;
    online(&fixture.router, "b").await;
    let chat = fixture.start_chat("g1", "x").await;
    fixture.router.accept_chat(&tenant(), &agent("b"), chat).await.unwrap();
    fixture.router.command(&agent_caller("b"), chat, ChatCommand::Close).await.unwrap();
    let view = fixture.router.chat_view(&agent_caller("b"), chat).await.unwrap();
    assert_eq!(view.state, ConversationState::Closed);
    let closed = fixture.router.list_chats(&tenant(), &agent("b"), ChatList::Closed).await.unwrap();
    assert_eq!(closed.iter().map(|view| view.conversation).collect::<Vec<_>>(), [chat]);
    let events = fixture.router.read_events(&agent_caller("b"), chat, 0).await.unwrap().events;
    assert_eq!(events.last().map(|event| event.body.kind()), Some("closed"));
}

#[tokio::test(start_paused = true)]
async fn two_participants_choosing_the_same_client_message_id_both_get_their_message_stored() {
    let fixture = fixture().await;
    online(&fixture.router, "b").await;
    let chat = fixture.start_chat("g1", "x").await;
    fixture.router.accept_chat(&tenant(), &agent("b"), chat).await.unwrap();
    let customer = Caller::Customer { conversation: chat };
    let from_customer = ChatCommand::Send { client_msg_id: "m-1".into(), body: "from the customer".into() };
    let from_agent = ChatCommand::Send { client_msg_id: "m-1".into(), body: "from the agent".into() };
    let first = fixture.router.command(&customer, chat, from_customer.clone()).await.unwrap();
    let second = fixture.router.command(&agent_caller("b"), chat, from_agent).await.unwrap();
    assert!(!first.duplicate && !second.duplicate);
    assert_ne!(first.event.as_ref().unwrap().seq, second.event.as_ref().unwrap().seq);
    // Each author's resend is still recognised, and clients see the id they chose.
    let again = fixture.router.command(&customer, chat, from_customer).await.unwrap();
    assert!(again.duplicate);
    assert_eq!(again.event.as_ref().map(|event| event.seq), first.event.as_ref().map(|event| event.seq));
    assert_eq!(again.event.unwrap().client_msg_id.as_deref(), Some("m-1"));
}

#[tokio::test(start_paused = true)]
async fn a_resend_after_the_chat_closed_is_answered_with_the_stored_message() {
    let fixture = fixture().await;
    online(&fixture.router, "b").await;
    let chat = fixture.start_chat("g1", "x").await;
    fixture.router.accept_chat(&tenant(), &agent("b"), chat).await.unwrap();
    let send = ChatCommand::Send { client_msg_id: "last".into(), body: "bye".into() };
    let sent = fixture.router.command(&agent_caller("b"), chat, send.clone()).await.unwrap();
    fixture.router.command(&agent_caller("b"), chat, ChatCommand::Close).await.unwrap();
    let resent = fixture.router.command(&agent_caller("b"), chat, send).await.unwrap();
    assert!(resent.duplicate);
    assert_eq!(resent.event.map(|event| event.seq), sent.event.map(|event| event.seq));
    // A new message is refused: the chat is closed.
    let late = ChatCommand::Send { client_msg_id: "later".into(), body: "hello?".into() };
    let refused = fixture.router.command(&agent_caller("b"), chat, late).await;
    assert_eq!(refused, Err(RouterError::Refused(Refusal::ChatClosed)));
}

#[tokio::test(start_paused = true)]
async fn an_unsubscribed_gateway_gets_no_more_pushes() {
    let mut fixture = fixture().await;
    let chat = fixture.start_chat("g1", "x").await;
    let customer = Caller::Customer { conversation: chat };
    fixture.router.subscribe(&fixture.gateway, &customer, chat, 0).await.unwrap();
    fixture.router.unsubscribe(&fixture.gateway, chat).await;
    let send = ChatCommand::Send { client_msg_id: "m1".into(), body: "anyone?".into() };
    let sent = fixture.router.command(&customer, chat, send).await.unwrap();
    assert_eq!(sent.event.map(|event| event.seq), Some(3));
    assert!(fixture.pushes.try_recv().is_err(), "nothing is pushed to a gateway that left");
}

/// A gateway's subscription whose caller gave up on it (a timeout: the gateway was told it failed) while it
/// waited behind the conversation's turn is not kept: the gateway does not follow the chat, and would be
/// pushed its events, dropped there, for as long as the router holds its shard.
#[tokio::test(start_paused = true)]
async fn a_subscription_given_up_before_its_turn_is_not_kept() {
    let mut fixture = fixture().await;
    let chat = fixture.start_chat("g1", "x").await;
    let customer = Caller::Customer { conversation: chat };
    let send = |id: &str| ChatCommand::Send { client_msg_id: id.into(), body: "anyone?".into() };
    // The conversation is busy in its turn: an append waits on the store.
    let release = fixture.counted.hold_next_append();
    let mut sending = Box::pin(fixture.router.command(&customer, chat, send("m1")));
    tokio::select! {
        sent = &mut sending => panic!("the append is held: {sent:?}"),
        () = common::settle() => {}
    }
    let mut subscribing = Box::pin(fixture.router.subscribe(&fixture.gateway, &customer, chat, 0));
    tokio::select! {
        subscribed = &mut subscribing => panic!("the conversation is busy: {subscribed:?}"),
        () = common::settle() => {}
    }
    drop(subscribing);
    drop(release);
    sending.await.unwrap();
    let sent = fixture.router.command(&customer, chat, send("m2")).await.unwrap().event.unwrap();
    assert_eq!(sent.seq, 4);
    common::settle().await;
    let pushed = fixture.drain();
    assert!(pushed.is_empty(), "nothing is pushed to a gateway whose subscription was given up: {pushed:?}");
}

/// A finished chat's actor leaves memory, but not while requests wait for it: those already in its mailbox
/// when a turn ends are answered (by this actor, or by the next one activated), not dropped with it as
/// `unavailable`. A console that closes a chat while its other tab, and the customer's widget, still send to
/// it must not see errors.
#[tokio::test(start_paused = true)]
async fn requests_waiting_for_a_finished_chat_are_answered_however_many_come_at_once() {
    let fixture = fixture().await;
    let router = Arc::new(fixture.router);
    online(router.as_ref(), "b").await;
    let now_ms = switchboard_domain::Clock::now_ms(fixture.clock.as_ref());
    let request = common::start_request(switchboard_domain::ConversationId::new_v7(now_ms), group("g1"), "x", "q");
    let chat = router.start_chat(request).await.unwrap().view.conversation;
    router.accept_chat(&tenant(), &agent("b"), chat).await.unwrap();
    router.command(&agent_caller("b"), chat, ChatCommand::Close).await.unwrap();
    for round in 0..5 {
        let views: Vec<_> = (0..20)
            .map(|_| {
                let router = router.clone();
                tokio::spawn(async move { router.chat_view(&agent_caller("b"), chat).await })
            })
            .collect();
        for view in views {
            let view = view.await.unwrap();
            assert_eq!(view.map(|view| view.state), Ok(ConversationState::Closed), "round {round}");
        }
    }
}
