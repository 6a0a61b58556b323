use proptest::prelude::*;

use super::*;

fn facts() -> NewConversation {
    NewConversation {
        id: ConversationId::from_uuid(uuid::Uuid::nil()),
        tenant: TenantId::new("demo").unwrap(),
        group: GroupId::new("sales").unwrap(),
        customer_name: "Ann".into(),
        question: "where is my order?".into(),
        created_at_ms: 1_000,
    }
}

fn agent(name: &str) -> AgentId {
    AgentId::new(name).unwrap()
}

/// Decide, then append and apply as an actor would.
fn run(conversation: &mut Conversation, author: Author, command: Command) -> Result<Option<Event>, Refusal> {
    let Some(body) = decide(conversation, &command)? else {
        return Ok(None);
    };
    let event = Event { seq: conversation.last_seq + 1, at_ms: 2_000, author, client_msg_id: None, body };
    apply(conversation, &event);
    Ok(Some(event))
}

fn opened() -> Conversation {
    let facts = facts();
    let mut conversation = Conversation::new(&facts);
    for (seq, (author, body)) in (1..).zip(Conversation::opening_events(&facts)) {
        apply(&mut conversation, &Event { seq, at_ms: 1_000, author, client_msg_id: None, body });
    }
    conversation
}

#[test]
fn a_chat_opens_queued_with_the_question_as_first_message() {
    let conversation = opened();
    assert_eq!(conversation.state, ConversationState::Queued);
    assert_eq!(conversation.last_seq, 2);
    assert_eq!(conversation.owner, None);
}

#[test]
fn the_first_accept_wins_and_the_second_is_told_the_chat_was_taken() {
    let mut conversation = opened();
    let a = agent("a");
    let b = agent("b");
    run(&mut conversation, Author::Agent(a.clone()), Command::Accept { agent: a.clone(), offered_only: false })
        .unwrap();
    assert_eq!(conversation.state, ConversationState::Active);
    assert_eq!(conversation.owner, Some(a.clone()));
    assert_eq!(decide(&conversation, &Command::Accept { agent: b, offered_only: false }), Err(Refusal::ChatTaken));
    // Accepting again is harmless for the owner.
    assert_eq!(decide(&conversation, &Command::Accept { agent: a, offered_only: false }), Ok(None));
}

#[test]
fn an_agent_cannot_write_before_accepting() {
    let conversation = opened();
    let send = Command::Send { author: Author::Agent(agent("a")), body: "hello".into() };
    assert_eq!(decide(&conversation, &send), Err(Refusal::NotAccepted));
    let customer = Command::Send { author: Author::Customer, body: "anyone?".into() };
    assert!(matches!(decide(&conversation, &customer), Ok(Some(EventBody::Message { .. }))));
}

#[test]
fn only_the_owner_writes_and_nobody_writes_after_the_end() {
    let mut conversation = opened();
    let a = agent("a");
    run(&mut conversation, Author::Agent(a.clone()), Command::Accept { agent: a.clone(), offered_only: false })
        .unwrap();
    let intruder = Command::Send { author: Author::Agent(agent("b")), body: "hi".into() };
    assert_eq!(decide(&conversation, &intruder), Err(Refusal::NotParticipant));
    run(&mut conversation, Author::Agent(a.clone()), Command::Close { by: Author::Agent(a.clone()) }).unwrap();
    assert_eq!(conversation.state, ConversationState::Closed);
    let late = Command::Send { author: Author::Agent(a), body: "hi".into() };
    assert_eq!(decide(&conversation, &late), Err(Refusal::ChatClosed));
    assert_eq!(decide(&conversation, &Command::Close { by: Author::Customer }), Ok(None));
}

#[test]
fn a_customer_leaving_a_waiting_chat_cancels_it() {
    let mut conversation = opened();
    run(&mut conversation, Author::Customer, Command::Close { by: Author::Customer }).unwrap();
    assert_eq!(conversation.state, ConversationState::Cancelled);
    assert!(conversation.closed_at_ms.is_some());
}

#[test]
fn a_waiting_chat_whose_customer_went_away_is_abandoned_and_nothing_else_is() {
    // Waiting, offered or not: cancelled, saying why, its offer gone.
    let mut conversation = opened();
    let a = agent("a");
    run(&mut conversation, Author::System, Command::Offer { agent: a.clone(), expires_at_ms: 9_000 }).unwrap();
    let event = run(&mut conversation, Author::System, Command::Abandon).unwrap().expect("an event");
    assert_eq!(event.body, EventBody::Cancelled { reason: Some(CancelReason::Abandoned) });
    assert_eq!((conversation.state, conversation.offer.clone()), (ConversationState::Cancelled, None));
    assert_eq!(decide(&conversation, &Command::Abandon), Ok(None), "once");
    // Accepted since the customer was found gone: the agent's now; so is an ended chat.
    let mut taken = opened();
    run(&mut taken, Author::Agent(a.clone()), Command::Accept { agent: a.clone(), offered_only: false }).unwrap();
    assert_eq!(decide(&taken, &Command::Abandon), Ok(None));
    run(&mut taken, Author::Agent(a.clone()), Command::Close { by: Author::Agent(a) }).unwrap();
    assert_eq!(decide(&taken, &Command::Abandon), Ok(None));
}

#[test]
fn an_ongoing_chats_customer_leaving_and_returning_is_recorded_once_each_way() {
    let here = Command::CustomerPresence { here: true };
    let gone = Command::CustomerPresence { here: false };
    // Waiting: a departure is the queue's (abandonment), not recorded; nor a presence it knows already.
    let mut conversation = opened();
    assert_eq!((decide(&conversation, &gone), decide(&conversation, &here)), (Ok(None), Ok(None)));
    let a = agent("a");
    run(&mut conversation, Author::Agent(a.clone()), Command::Accept { agent: a.clone(), offered_only: false })
        .unwrap();
    let left = run(&mut conversation, Author::System, gone.clone()).unwrap().expect("an event");
    assert_eq!((&left.body, left.seq, conversation.customer_away), (&EventBody::CustomerLeft, 4, true));
    let json = serde_json::to_value(&left).unwrap();
    assert_eq!(json["kind"].as_str(), Some("customer_left"), "its name in the protocol");
    assert_eq!(decide(&conversation, &gone), Ok(None), "once");
    let back = run(&mut conversation, Author::System, here.clone()).unwrap().expect("an event");
    assert_eq!((back.body, conversation.customer_away), (EventBody::CustomerReturned, false));
    assert_eq!(decide(&conversation, &here), Ok(None), "once");
    // Gone, then the chat went back to a queue: the customer's return is still told.
    run(&mut conversation, Author::System, gone.clone()).unwrap().expect("left again");
    run(&mut conversation, Author::System, Command::Requeue { agent: a.clone(), reason: RequeueReason::AgentOffline })
        .unwrap();
    assert_eq!(decide(&conversation, &here), Ok(Some(EventBody::CustomerReturned)));
    // Ended: nothing more, either way.
    run(&mut conversation, Author::Customer, Command::Close { by: Author::Customer }).unwrap();
    assert_eq!((decide(&conversation, &here), decide(&conversation, &gone)), (Ok(None), Ok(None)));
}

#[test]
fn an_event_of_a_kind_written_by_a_newer_version_reads_as_unknown_and_changes_nothing() {
    let newer = r#"{"seq":5,"at_ms":7,"author":{"role":"system"},"kind":"customer_rated","stars":4}"#;
    let event: Event = serde_json::from_str(newer).expect("an event of a later kind");
    assert_eq!((event.seq, &event.body, event.body.kind()), (5, &EventBody::Unknown, "unknown"));
    assert_eq!(serde_json::to_value(&event).unwrap()["kind"], "unknown", "as clients get it");
    let mut conversation = opened();
    let before = conversation.clone();
    apply(&mut conversation, &event);
    assert_eq!(conversation, Conversation { last_seq: 5, ..before }, "its seq counts, nothing else");
}

#[test]
fn a_cancellation_without_a_reason_reads_as_before_and_one_with_a_reason_says_it() {
    let old = r#"{"seq":3,"at_ms":5,"author":{"role":"customer"},"kind":"cancelled"}"#;
    let event: Event = serde_json::from_str(old).expect("an event stored before reasons");
    assert_eq!(event.body, EventBody::Cancelled { reason: None });
    assert_eq!(serde_json::to_string(&event).unwrap(), old, "written as before");
    let abandoned = Event { body: EventBody::Cancelled { reason: Some(CancelReason::Abandoned) }, ..event };
    let json = serde_json::to_value(&abandoned).unwrap();
    assert_eq!((json["kind"].as_str(), json["reason"].as_str()), (Some("cancelled"), Some("abandoned")));
    // A router from before reasons (the event a unit variant) reads it as a cancellation.
    #[derive(Debug, PartialEq, serde::Deserialize)]
    #[serde(tag = "kind", rename_all = "snake_case")]
    enum OldBody {
        Cancelled,
    }
    #[derive(Debug, serde::Deserialize)]
    struct OldEvent {
        seq: u64,
        #[serde(flatten)]
        body: OldBody,
    }
    let old: OldEvent = serde_json::from_value(json).expect("read by the old shape");
    assert_eq!((old.seq, old.body), (3, OldBody::Cancelled));
}

#[test]
fn empty_messages_are_refused() {
    let conversation = opened();
    let send = Command::Send { author: Author::Customer, body: "  \n".into() };
    assert_eq!(decide(&conversation, &send), Err(Refusal::EmptyMessage));
}

#[test]
fn delivery_marks_only_move_forward_and_only_over_existing_events() {
    let mut conversation = opened();
    let a = agent("a");
    run(&mut conversation, Author::Agent(a.clone()), Command::Accept { agent: a.clone(), offered_only: false })
        .unwrap();
    let mark = |up_to_seq| Command::ConfirmDelivery { by: Author::Agent(a.clone()), up_to_seq };
    assert_eq!(decide(&conversation, &mark(99)), Err(Refusal::BadDeliveryMark { last_seq: 3 }));
    run(&mut conversation, Author::Agent(a.clone()), mark(2)).unwrap();
    assert_eq!(conversation.agent_delivered_up_to, 2);
    assert_eq!(decide(&conversation, &mark(2)), Ok(None));
    assert_eq!(decide(&conversation, &mark(1)), Ok(None));
    let stranger = Command::ConfirmDelivery { by: Author::Agent(agent("b")), up_to_seq: 2 };
    assert_eq!(decide(&conversation, &stranger), Err(Refusal::NotParticipant));
}

#[test]
fn events_round_trip_through_json_with_stable_tags() {
    let event = Event {
        seq: 3,
        at_ms: 5,
        author: Author::Agent(agent("a")),
        client_msg_id: Some("m1".into()),
        body: EventBody::Message { body: "hi".into() },
    };
    let json = serde_json::to_value(&event).unwrap();
    assert_eq!(json["kind"], "message");
    assert_eq!(json["author"]["role"], "agent");
    assert_eq!(json["author"]["id"], "a");
    let back: Event = serde_json::from_value(json).unwrap();
    assert_eq!(back, event);
}

fn any_command() -> impl Strategy<Value = Command> {
    let agent_name = prop::sample::select(vec!["a", "b", "c"]).prop_map(agent);
    let author = prop_oneof![Just(Author::Customer), agent_name.clone().prop_map(Author::Agent)];
    prop_oneof![
        agent_name.prop_map(|agent| Command::Accept { agent, offered_only: false }),
        author.clone().prop_map(|author| Command::Send { author, body: "x".into() }),
        (author.clone(), 0u64..12).prop_map(|(by, up_to_seq)| Command::ConfirmDelivery { by, up_to_seq }),
        author.clone().prop_map(|by| Command::Close { by }),
        author.prop_map(|by| Command::Cancel { by }),
    ]
}

proptest! {
    /// Whatever agents and customers do in whatever order, a chat has at most one owner, the owner never
    /// changes once set, sequence numbers have no gap, and nothing happens after the end.
    #[test]
    fn a_chat_never_has_two_owners(commands in prop::collection::vec(any_command(), 0..40)) {
        let mut conversation = opened();
        let mut first_owner: Option<AgentId> = None;
        let mut finished_at_seq = None;
        for command in commands {
            let author = match &command {
                Command::Accept { agent, .. } => Author::Agent(agent.clone()),
                Command::Send { author, .. } => author.clone(),
                Command::ConfirmDelivery { by, .. } | Command::Close { by } | Command::Cancel { by } => by.clone(),
                _ => Author::System,
            };
            let before = conversation.last_seq;
            if let Ok(Some(event)) = run(&mut conversation, author, command) {
                prop_assert_eq!(event.seq, before + 1);
                if finished_at_seq.is_some() {
                    prop_assert!(matches!(event.body, EventBody::Delivered { .. }), "{:?} after the end", event.body);
                }
            }
            if let Some(owner) = &conversation.owner {
                let first = first_owner.get_or_insert_with(|| owner.clone());
                prop_assert_eq!(first, owner);
            }
            if conversation.state.is_finished() && finished_at_seq.is_none() {
                finished_at_seq = Some(conversation.last_seq);
            }
            prop_assert_eq!(conversation.state == ConversationState::Active, conversation.owner.is_some() && !conversation.state.is_finished());
        }
    }
}

proptest! {
    /// The store rewrites the summary only for events that say they change it: every other event must
    /// leave state, owner, times, offer and delivery marks exactly as they were.
    #[test]
    fn only_summary_changing_events_change_the_summary(commands in prop::collection::vec(any_command(), 0..30)) {
        let mut conversation = opened();
        for command in commands {
            let Ok(Some(body)) = decide(&conversation, &command) else { continue };
            let summary = |c: &Conversation| {
                let marks = (c.customer_delivered_up_to, c.agent_delivered_up_to);
                (c.state, c.owner.clone(), c.accepted_at_ms, c.closed_at_ms, c.group.clone(), c.offer.clone(), c.offered_to.clone(), marks)
            };
            let before = summary(&conversation);
            let changes = body.changes_summary();
            // (A delivery mark is its author's.)
            let author = match &command {
                Command::ConfirmDelivery { by, .. } => by.clone(),
                _ => Author::Customer,
            };
            let event = Event { seq: conversation.last_seq + 1, at_ms: 9_000, author, client_msg_id: None, body };
            apply(&mut conversation, &event);
            prop_assert_eq!(summary(&conversation) != before, changes, "{:?}", event.body);
        }
    }
}

fn group(name: &str) -> GroupId {
    GroupId::new(name).unwrap()
}

#[test]
fn in_push_mode_only_the_offered_agent_accepts() {
    let (a, b) = (agent("a"), agent("b"));
    let mut conversation = opened();
    let accept = |agent: &AgentId| Command::Accept { agent: agent.clone(), offered_only: true };
    assert_eq!(decide(&conversation, &accept(&a)), Err(Refusal::NotOffered));
    run(&mut conversation, Author::System, Command::Offer { agent: a.clone(), expires_at_ms: 5_000 }).unwrap();
    let second = Command::Offer { agent: b.clone(), expires_at_ms: 5_000 };
    assert_eq!(decide(&conversation, &second), Err(Refusal::OfferOutstanding), "one offer at a time");
    assert_eq!(decide(&conversation, &accept(&b)), Err(Refusal::NotOffered));
    // The offer to a ends: it is remembered, and b may be offered the chat next.
    let end = Command::EndOffer { agent: a.clone(), reason: OfferEnd::TimedOut };
    run(&mut conversation, Author::System, end.clone()).unwrap();
    assert_eq!(decide(&conversation, &end), Ok(None), "ending twice changes nothing");
    assert_eq!(conversation.offered_to, vec![a.clone()]);
    assert_eq!(decide(&conversation, &accept(&a)), Err(Refusal::NotOffered), "a's offer is over");
    run(&mut conversation, Author::System, second).unwrap();
    run(&mut conversation, Author::Agent(b.clone()), accept(&b)).unwrap();
    assert_eq!(conversation.owner, Some(b));
    assert_eq!(conversation.offer, None);
    assert!(conversation.offered_to.is_empty());
}

#[test]
fn a_withdrawn_offer_does_not_count_as_the_agent_having_had_the_chat() {
    let a = agent("a");
    let mut conversation = opened();
    run(&mut conversation, Author::System, Command::Offer { agent: a.clone(), expires_at_ms: 5_000 }).unwrap();
    run(&mut conversation, Author::System, Command::EndOffer { agent: a.clone(), reason: OfferEnd::Withdrawn })
        .unwrap();
    assert_eq!(conversation.offer, None);
    assert!(conversation.offered_to.is_empty(), "the agent became unavailable; they did not decline it");
    run(&mut conversation, Author::System, Command::Offer { agent: a.clone(), expires_at_ms: 9_000 }).unwrap();
    run(&mut conversation, Author::System, Command::EndOffer { agent: a.clone(), reason: OfferEnd::Rejected }).unwrap();
    assert_eq!(conversation.offered_to, vec![a]);
}

#[test]
fn a_transfer_queues_the_chat_in_the_other_group_and_frees_the_owner() {
    let (a, b) = (agent("a"), agent("b"));
    let mut conversation = opened();
    let to_same = Command::Transfer { by: Author::Agent(a.clone()), to_group: group("sales") };
    assert_eq!(decide(&conversation, &to_same), Err(Refusal::SameGroup));
    run(&mut conversation, Author::Agent(a.clone()), Command::Accept { agent: a.clone(), offered_only: false })
        .unwrap();
    let by_b = Command::Transfer { by: Author::Agent(b.clone()), to_group: group("support") };
    assert_eq!(decide(&conversation, &by_b), Err(Refusal::NotParticipant), "only the owner transfers an ongoing chat");
    let by_a = Command::Transfer { by: Author::Agent(a.clone()), to_group: group("support") };
    let event = run(&mut conversation, Author::Agent(a.clone()), by_a).unwrap().unwrap();
    assert_eq!(event.body, EventBody::Transferred { from_agent: Some(a), to_group: group("support") });
    assert_eq!(conversation.state, ConversationState::Queued);
    assert_eq!(conversation.group, group("support"));
    assert_eq!(conversation.owner, None);
    assert_eq!(conversation.queued_at_ms, 1_000, "it keeps its original arrival time");
}

#[test]
fn a_forward_hands_the_chat_to_another_agent() {
    let (a, b) = (agent("a"), agent("b"));
    let mut conversation = opened();
    run(&mut conversation, Author::Agent(a.clone()), Command::Accept { agent: a.clone(), offered_only: false })
        .unwrap();
    let to_self = Command::Forward { by: Author::Agent(a.clone()), to_agent: a.clone() };
    assert_eq!(decide(&conversation, &to_self), Err(Refusal::SameAgent));
    let forward = Command::Forward { by: Author::Agent(a.clone()), to_agent: b.clone() };
    run(&mut conversation, Author::Agent(a.clone()), forward).unwrap();
    assert_eq!(conversation.owner, Some(b.clone()));
    assert_eq!(conversation.state, ConversationState::Active);
    let send = Command::Send { author: Author::Agent(a), body: "still here?".into() };
    assert_eq!(decide(&conversation, &send), Err(Refusal::NotParticipant), "the previous agent is out");
}

#[test]
fn a_requeued_chat_waits_again_without_its_absent_agent() {
    let a = agent("a");
    let mut conversation = opened();
    let requeue = Command::Requeue { agent: a.clone(), reason: RequeueReason::AgentOffline };
    assert_eq!(decide(&conversation, &requeue), Ok(None), "nothing to do for a waiting chat");
    run(&mut conversation, Author::Agent(a.clone()), Command::Accept { agent: a.clone(), offered_only: false })
        .unwrap();
    run(&mut conversation, Author::System, requeue).unwrap();
    assert_eq!(conversation.state, ConversationState::Queued);
    assert_eq!(conversation.owner, None);
    assert_eq!(conversation.offered_to, vec![a], "the absent agent is not offered it again in this round");
}

fn any_routing_command() -> impl Strategy<Value = Command> {
    let agent_name = prop::sample::select(vec!["a", "b", "c"]).prop_map(agent);
    let reason = prop::sample::select(vec![OfferEnd::Rejected, OfferEnd::TimedOut, OfferEnd::Withdrawn]);
    prop_oneof![
        agent_name.clone().prop_map(|agent| Command::Accept { agent, offered_only: true }),
        agent_name.clone().prop_map(|agent| Command::Offer { agent, expires_at_ms: 9_999 }),
        (agent_name.clone(), reason).prop_map(|(agent, reason)| Command::EndOffer { agent, reason }),
        agent_name.clone().prop_map(|agent| Command::Requeue { agent, reason: RequeueReason::AgentOffline }),
        agent_name.clone().prop_map(|agent| Command::Transfer { by: Author::Agent(agent), to_group: group("support") }),
        (agent_name.clone(), agent_name)
            .prop_map(|(by, to_agent)| Command::Forward { by: Author::Agent(by), to_agent }),
        Just(Command::Close { by: Author::Customer }),
    ]
}

proptest! {
    /// Under push routing, whatever happens: at most one offer is outstanding, only a waiting chat has one,
    /// an accepted chat's owner is the agent it was offered to, and every event is a summary change.
    #[test]
    fn push_routing_keeps_one_offer_and_one_owner(commands in prop::collection::vec(any_routing_command(), 0..40)) {
        let mut conversation = opened();
        for command in commands {
            let offer_before = conversation.offer.clone();
            let Ok(Some(body)) = decide(&conversation, &command) else { continue };
            prop_assert!(body.changes_summary());
            if let EventBody::Accepted { agent } = &body {
                prop_assert_eq!(offer_before.map(|offer| offer.agent), Some(agent.clone()));
            }
            let event = Event { seq: conversation.last_seq + 1, at_ms: 9_000, author: Author::System, client_msg_id: None, body };
            apply(&mut conversation, &event);
            if conversation.offer.is_some() {
                prop_assert_eq!(conversation.state, ConversationState::Queued);
            }
            match conversation.state {
                ConversationState::Active => prop_assert!(conversation.owner.is_some()),
                ConversationState::Queued => prop_assert!(conversation.owner.is_none()),
                _ => {}
            }
        }
    }
}
