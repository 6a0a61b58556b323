//! Hot paths of the message path, each measured beside a bare baseline in the same run:
//! - parsing a client `message.send` frame vs parsing the same text into a bare `serde_json::Value`;
//! - encoding a message `event` push as the gateway does (`hub::Outbound::json` of a `PushFrame::Event`) vs
//!   `serde_json::to_string` of a bare struct with the same fields (the same text, checked before measuring);
//! - deciding and applying a message in the conversation state machine vs appending to a bare `Vec`;
//! - merging the waiting queues of three groups vs sorting the same number of bare integers.

use std::hint::black_box;
use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use serde::Serialize;
use switchboard_domain::{
    AgentId, Author, Command, Conversation, ConversationId, Event, EventBody, GroupId, NewConversation, TenantId,
    WaitingEntry, WaitingQueue, apply, decide, merge_waiting,
};
use switchboard_gateway::hub::Outbound;
use switchboard_gateway::protocol::PushFrame;

const FRAME: &str = r#"{"type":"message.send","id":"r42","conversation":"01932c4e-7f1a-7cc2-9b1e-3a1f5c2d4e6f","client_msg_id":"m-42","body":"Hello, I would like to know where my order is."}"#;

fn frame_parsing(c: &mut Criterion) {
    let mut group = c.benchmark_group("frame_parse");
    group.bench_function("baseline_serde_json_value", |b| {
        b.iter(|| black_box(serde_json::from_str::<serde_json::Value>(black_box(FRAME)).unwrap()))
    });
    group.bench_function("switchboard_protocol_parse", |b| {
        b.iter(|| black_box(switchboard_gateway::protocol::parse(black_box(FRAME)).unwrap()))
    });
    group.finish();
}

/// The bare form of an `event` push of a message: the same fields, in the same (alphabetical) order.
#[derive(Serialize)]
struct BareEventFrame<'a> {
    conversation: uuid::Uuid,
    event: BareMessageEvent<'a>,
    #[serde(rename = "type")]
    kind: &'static str,
}

#[derive(Serialize)]
struct BareMessageEvent<'a> {
    at_ms: i64,
    author: BareAuthor<'a>,
    body: &'a str,
    client_msg_id: &'a str,
    kind: &'static str,
    seq: u64,
}

#[derive(Serialize)]
struct BareAuthor<'a> {
    id: &'a str,
    role: &'static str,
}

fn frame_encoding(c: &mut Criterion) {
    const BODY: &str = "Hello, I would like to know where my order is.";
    let uuid = uuid::Uuid::parse_str("01932c4e-7f1a-7cc2-9b1e-3a1f5c2d4e6f").unwrap();
    let conversation = ConversationId::from_uuid(uuid);
    let event = Arc::new(Event {
        seq: 42,
        at_ms: 1_767_225_600_000,
        author: Author::Agent(AgentId::new("alice").unwrap()),
        client_msg_id: Some("m-42".into()),
        body: EventBody::Message { body: BODY.into() },
    });
    let push = || Outbound::new(PushFrame::Event { conversation, event: event.clone() });
    let bare = BareEventFrame {
        conversation: uuid,
        event: BareMessageEvent {
            at_ms: 1_767_225_600_000,
            author: BareAuthor { id: "alice", role: "agent" },
            body: BODY,
            client_msg_id: "m-42",
            kind: "message",
            seq: 42,
        },
        kind: "event",
    };
    // Both sides write the very same text, or the comparison would mean nothing.
    assert_eq!(push().json().as_str(), serde_json::to_string(&bare).unwrap());

    let mut group = c.benchmark_group("frame_encode_event");
    group.bench_function("baseline_serde_json_struct", |b| {
        b.iter(|| black_box(serde_json::to_string(black_box(&bare)).unwrap()))
    });
    // A new `Outbound` each time: the gateway encodes each push once (then shares the text between sockets).
    group.bench_function("switchboard_outbound_json", |b| b.iter(|| black_box(push().json())));
    group.finish();
}

fn active_conversation() -> Conversation {
    let facts = NewConversation {
        id: ConversationId::from_uuid(uuid::Uuid::from_u128(1)),
        tenant: TenantId::new("t").unwrap(),
        group: GroupId::new("g").unwrap(),
        customer_name: "c".into(),
        question: "q".into(),
        created_at_ms: 0,
    };
    let mut conversation = Conversation::new(&facts);
    let agent = AgentId::new("a").unwrap();
    let accepted =
        decide(&conversation, &Command::Accept { agent: agent.clone(), offered_only: false }).unwrap().unwrap();
    apply(
        &mut conversation,
        &Event { seq: 3, at_ms: 0, author: Author::Agent(agent), client_msg_id: None, body: accepted },
    );
    conversation
}

fn message_decision(c: &mut Criterion) {
    let mut group = c.benchmark_group("message_decide_apply");
    group.bench_function("baseline_vec_push", |b| {
        let mut log: Vec<String> = Vec::with_capacity(1 << 20);
        b.iter(|| {
            if log.len() == log.capacity() {
                log.clear();
            }
            log.push(black_box("hello".to_owned()));
        })
    });
    group.bench_function("switchboard_decide_apply", |b| {
        let mut conversation = active_conversation();
        let command = Command::Send { author: Author::Customer, body: "hello".into() };
        b.iter(|| {
            let body = decide(&conversation, black_box(&command)).unwrap().unwrap();
            let event =
                Event { seq: conversation.last_seq + 1, at_ms: 0, author: Author::Customer, client_msg_id: None, body };
            apply(&mut conversation, &event);
        })
    });
    group.finish();
}

fn queue_merge(c: &mut Criterion) {
    const PER_GROUP: u128 = 300;
    let queues: Vec<WaitingQueue> = (0..3u128)
        .map(|group| {
            let mut queue = WaitingQueue::default();
            for n in 0..PER_GROUP {
                queue.insert(WaitingEntry {
                    conversation: ConversationId::from_uuid(uuid::Uuid::from_u128(group * PER_GROUP + n)),
                    group: GroupId::new(format!("g{group}")).unwrap(),
                    queued_at_ms: (n * 3 + group) as i64,
                    customer_name: "c".into(),
                    question: "q".into(),
                });
            }
            queue
        })
        .collect();
    let bare: Vec<u64> = (0..3 * PER_GROUP as u64).rev().collect();
    let mut group = c.benchmark_group("waiting_queue_merge_900");
    group.bench_function("baseline_sort_integers", |b| {
        b.iter(|| {
            let mut values = bare.clone();
            values.sort_unstable();
            black_box(values)
        })
    });
    group.bench_function("switchboard_merge_waiting", |b| b.iter(|| black_box(merge_waiting(&queues))));
    group.finish();
}

criterion_group!(benches, frame_parsing, frame_encoding, message_decision, queue_merge);
criterion_main!(benches);
