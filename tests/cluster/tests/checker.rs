//! The checker against hand-made data in fresh PostgreSQL databases: a consistent run passes, and each
//! invariant fails on data that breaks it (and only that invariant, where the bad data breaks nothing else).

use std::collections::BTreeSet;

use switchboard_cluster_tests::log::{Ack, Author, Following, LogData, Received};
use switchboard_cluster_tests::{Db, Invariant, check, schema};
use switchboard_testservices::Postgres;
use tokio::time::Instant;

const NOW: &str = "CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS BIGINT)";

fn conversation(id: &str, state: &str, last_seq: u64, shard: u32) -> String {
    format!(
        "INSERT INTO conversations (id, tenant_id, group_id, customer_name, first_question, state, created_at_ms, \
         queued_at_ms, last_seq, shard) VALUES ('{id}', 'acme', 'g1', 'Ann', 'hi', '{state}', 1, 1, {last_seq}, {shard});"
    )
}

/// An event row as the store writes it: the dedup key in `client_msg_id`, the client's id in the payload.
fn event(
    conversation: &str,
    seq: u64,
    role: &str,
    id: &str,
    client_msg_id: Option<&str>,
    kind: &str,
    epoch: Option<u64>,
) -> String {
    let key = client_msg_id.map_or("NULL".to_owned(), |client_msg_id| format!("'{role}/{id}/{client_msg_id}'"));
    let payload = match client_msg_id {
        Some(client_msg_id) => format!(r#"{{"kind":"{kind}","client_msg_id":"{client_msg_id}"}}"#),
        None => format!(r#"{{"kind":"{kind}"}}"#),
    };
    let epoch = epoch.map_or("NULL".to_owned(), |epoch| epoch.to_string());
    format!(
        "INSERT INTO events (conversation_id, seq, at_ms, author_role, author_id, client_msg_id, kind, payload_json, \
         epoch) VALUES ('{conversation}', {seq}, 1, '{role}', '{id}', {key}, '{kind}', '{payload}', {epoch});"
    )
}

fn lease(shard: u32, owner: &str, epoch: u64, expires_in_ms: i64) -> String {
    format!(
        "INSERT INTO shard_leases (shard, owner, epoch, expires_at_ms) VALUES ({shard}, '{owner}', {epoch}, {NOW} + ({expires_in_ms}));"
    )
}

fn grant(shard: u32, epoch: u64, node: &str) -> String {
    format!(
        "INSERT INTO shard_lease_history (shard, epoch, node_id, acquired_at_ms) VALUES ({shard}, {epoch}, '{node}', 1);"
    )
}

/// A consistent run: shard 7 went from router-0 (epoch 1) to router-1 (epoch 2) in the middle of an active
/// chat (c1); c2 is closed on shard 9, whose lease has expired.
fn consistent_data() -> String {
    [
        grant(7, 1, "router-0"),
        grant(7, 2, "router-1"),
        grant(9, 1, "router-0"),
        lease(7, "router-1", 2, 60_000),
        lease(9, "router-0", 1, -60_000),
        conversation("c1", "active", 5, 7),
        event("c1", 1, "system", "", None, "created", Some(1)),
        event("c1", 2, "customer", "", None, "message", Some(1)),
        event("c1", 3, "agent", "agent-0", None, "accepted", Some(1)),
        event("c1", 4, "agent", "agent-0", Some("a-0"), "message", Some(1)),
        event("c1", 5, "customer", "", Some("c-0"), "message", Some(2)),
        conversation("c2", "closed", 2, 9),
        event("c2", 1, "system", "", None, "created", Some(1)),
        event("c2", 2, "customer", "", None, "cancelled", Some(1)),
    ]
    .concat()
}

fn received(connection: u64, seq: u64, kind: &str, author: Author, client_msg_id: Option<&str>) -> Received {
    Received {
        client: "customer-0".to_owned(),
        connection,
        conversation: "c1".to_owned(),
        seq,
        kind: kind.to_owned(),
        author,
        client_msg_id: client_msg_id.map(str::to_owned),
    }
}

fn ack(author: Author, client_msg_id: &str, seq: u64) -> Ack {
    Ack {
        client: if author.role == "customer" { "customer-0".to_owned() } else { author.id.clone() },
        conversation: "c1".to_owned(),
        author,
        client_msg_id: client_msg_id.to_owned(),
        seq,
        duplicate: false,
        started: Instant::now(),
        acked: Instant::now(),
    }
}

fn consistent_logs() -> LogData {
    let agent = || Author::agent("agent-0");
    LogData {
        acks: vec![ack(agent(), "a-0", 4), ack(Author::customer(), "c-0", 5), ack(Author::customer(), "c-0", 5)],
        following: vec![Following {
            client: "customer-0".into(),
            connection: 1,
            conversation: "c1".into(),
            after_seq: 0,
        }],
        received: vec![
            received(1, 1, "created", Author { role: "system".into(), id: String::new() }, None),
            received(1, 2, "message", Author::customer(), None),
            received(1, 3, "accepted", agent(), None),
            received(1, 4, "message", agent(), Some("a-0")),
            received(1, 5, "message", Author::customer(), Some("c-0")),
        ],
        ..LogData::default()
    }
}

struct Case {
    name: &'static str,
    /// Tables whose uniqueness is dropped first, so that the bad rows can be stored.
    unconstrained: &'static [&'static str],
    sql: String,
    logs: fn(&mut LogData),
    live: &'static [&'static str],
    /// The invariants reported: exactly these, or at least these when `exact` is false.
    expected: &'static [Invariant],
    exact: bool,
}

impl Case {
    fn new(name: &'static str, expected: &'static [Invariant]) -> Case {
        Case {
            name,
            unconstrained: &[],
            sql: String::new(),
            logs: |_| {},
            live: &["router-0", "router-1"],
            expected,
            exact: true,
        }
    }

    fn sql(mut self, sql: impl Into<String>) -> Case {
        self.sql = sql.into();
        self
    }

    fn logs(mut self, logs: fn(&mut LogData)) -> Case {
        self.logs = logs;
        self
    }

    fn unconstrained(mut self, tables: &'static [&'static str]) -> Case {
        self.unconstrained = tables;
        self
    }

    fn live(mut self, live: &'static [&'static str]) -> Case {
        self.live = live;
        self
    }

    fn at_least(mut self) -> Case {
        self.exact = false;
        self
    }
}

fn cases() -> Vec<Case> {
    use Invariant::*;
    vec![
        Case::new("a consistent run", &[]),
        // (a)
        Case::new("an acked message that is not stored", &[AckedStoredOnce])
            .logs(|logs| logs.acks.push(ack(Author::customer(), "c-1", 6))),
        Case::new("an acked message stored at another seq", &[AckedStoredOnce])
            .logs(|logs| logs.acks.push(ack(Author::agent("agent-0"), "a-0", 5))),
        Case::new("an acked message stored by another author", &[AckedStoredOnce])
            .logs(|logs| logs.acks.push(ack(Author::agent("agent-1"), "c-0", 5))),
        Case::new("an acked message stored twice", &[AckedStoredOnce, UniqueClientMsgId])
            .unconstrained(&["events"])
            .sql(
                event("c1", 6, "customer", "", Some("c-0"), "message", Some(2))
                    + "UPDATE conversations SET last_seq = 6 WHERE id = 'c1';",
            ),
        // (b)
        Case::new("a gap in the seqs", &[GapFreeSequence]).sql(
            [
                conversation("c3", "queued", 3, 7),
                event("c3", 1, "system", "", None, "created", Some(2)),
                event("c3", 3, "customer", "", None, "message", Some(2)),
            ]
            .concat(),
        ),
        Case::new("last_seq behind the log", &[GapFreeSequence])
            .sql("UPDATE conversations SET last_seq = 4 WHERE id = 'c1';"),
        Case::new("last_seq ahead of the log", &[GapFreeSequence])
            .sql("UPDATE conversations SET last_seq = 6 WHERE id = 'c2';"),
        Case::new("a repeated seq", &[GapFreeSequence])
            .unconstrained(&["events"])
            .sql(event("c2", 2, "system", "", None, "closed", Some(1)))
            .at_least(),
        Case::new("a conversation without events", &[GapFreeSequence]).sql(conversation("c4", "closed", 0, 9)),
        // (c)
        Case::new("a client message id stored twice", &[UniqueClientMsgId]).unconstrained(&["events"]).sql(
            [
                event("c2", 3, "customer", "", Some("dup"), "message", Some(1)),
                event("c2", 4, "customer", "", Some("dup"), "message", Some(1)),
                "UPDATE conversations SET last_seq = 4 WHERE id = 'c2';".to_owned(),
            ]
            .concat(),
        ),
        // (d)
        Case::new("an active chat whose lease expired", &[NoStrandedChat])
            .sql(format!("UPDATE shard_leases SET expires_at_ms = {NOW} - 1000 WHERE shard = 7;")),
        Case::new("an active chat leased to a dead router", &[NoStrandedChat]).live(&["router-0"]),
        Case::new("a queued chat whose shard was never leased", &[NoStrandedChat]).sql(
            [
                grant(11, 1, "router-0"),
                conversation("c5", "queued", 1, 11),
                event("c5", 1, "system", "", None, "created", Some(1)),
            ]
            .concat(),
        ),
        // (e)
        Case::new("one epoch granted to two nodes", &[OneNodePerEpoch])
            .unconstrained(&["shard_lease_history"])
            .sql(grant(7, 2, "router-0")),
        Case::new("a lease whose grant was not recorded", &[LeasesRecorded])
            .sql("UPDATE shard_leases SET epoch = 3 WHERE shard = 7;"),
        Case::new("a released lease (no owner, its epoch kept) is no grant", &[])
            .sql(format!("UPDATE shard_leases SET owner = '', expires_at_ms = {NOW} WHERE shard = 9;")),
        Case::new("an event at an epoch never granted", &[FencedEpochs]).sql(
            event("c1", 6, "customer", "", Some("c-1"), "message", Some(5))
                + "UPDATE conversations SET last_seq = 6 WHERE id = 'c1';",
        ),
        Case::new("a stale epoch written after a takeover", &[FencedEpochs]).sql(
            event("c1", 6, "agent", "agent-0", Some("a-1"), "message", Some(1))
                + "UPDATE conversations SET last_seq = 6 WHERE id = 'c1';",
        ),
        Case::new("an event written without a fence (epoch 0, the column's default)", &[FencedEpochs]).sql(
            event("c1", 6, "customer", "", Some("c-1"), "message", Some(0))
                + "UPDATE conversations SET last_seq = 6 WHERE id = 'c1';",
        ),
        // (f)
        Case::new("a client that missed an event", &[ClientViews]).logs(|logs| {
            logs.received.remove(2);
        }),
        Case::new("a client that got an event twice", &[ClientViews]).logs(|logs| {
            let again = logs.received[4].clone();
            logs.received.push(again);
        }),
        Case::new("a client that got an event other than the stored one", &[ClientViews]).logs(|logs| {
            logs.received[4].author = Author::agent("agent-0");
        }),
        Case::new("a resume that does not start after the seq asked for", &[ClientViews]).logs(|logs| {
            logs.following.push(Following {
                client: "customer-0".into(),
                connection: 2,
                conversation: "c1".into(),
                after_seq: 3,
            });
            logs.received.push(received(2, 5, "message", Author::customer(), Some("c-0")));
        }),
        Case::new("a client that got an event that is not stored", &[ClientViews]).logs(|logs| {
            logs.received.push(received(1, 6, "message", Author::customer(), Some("c-9")));
        }),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_checker_passes_consistent_data_and_fails_each_invariant_on_bad_data() -> anyhow::Result<()> {
    let postgres = tokio::task::block_in_place(Postgres::start)?;
    let mut wrong = Vec::new();
    let cases = cases();
    let mut covered = BTreeSet::new();
    for case in &cases {
        let url = tokio::task::block_in_place(|| postgres.create_database())?;
        let db = Db::connect(&url).await?;
        schema::install(&db).await?;
        for table in case.unconstrained {
            schema::drop_uniqueness(&db, table).await?;
        }
        db.execute(&consistent_data()).await?;
        if !case.sql.is_empty() {
            db.execute(&case.sql).await?;
        }
        let mut logs = consistent_logs();
        (case.logs)(&mut logs);
        let live: BTreeSet<String> = case.live.iter().map(|node| node.to_string()).collect();
        let report = check(&db, &logs, &live).await?;
        let got = report.violated_invariants();
        let expected: BTreeSet<Invariant> = case.expected.iter().copied().collect();
        let right = if case.exact { got == expected } else { got.is_superset(&expected) };
        if right {
            covered.extend(expected);
        } else {
            wrong.push(format!("{}: expected {expected:?}, got {:#?}", case.name, report.violations));
        }
        db.pool().close().await;
    }
    assert!(wrong.is_empty(), "{} of {} cases wrong:\n{}", wrong.len(), cases.len(), wrong.join("\n"));
    let all = [
        Invariant::AckedStoredOnce,
        Invariant::GapFreeSequence,
        Invariant::UniqueClientMsgId,
        Invariant::NoStrandedChat,
        Invariant::OneNodePerEpoch,
        Invariant::LeasesRecorded,
        Invariant::FencedEpochs,
        Invariant::ClientViews,
    ];
    assert_eq!(covered, all.into_iter().collect(), "every invariant is shown to fail on bad data");
    Ok(())
}

#[test]
fn a_report_with_violations_is_an_error_that_names_them() {
    let report = switchboard_cluster_tests::Report {
        violations: vec![switchboard_cluster_tests::checker::Violation {
            invariant: Invariant::GapFreeSequence,
            detail: "c1: seqs 1, 3 are not 1..=2".to_owned(),
        }],
        ..Default::default()
    };
    let error = report.ensure_ok().unwrap_err().to_string();
    assert!(error.contains("GapFreeSequence: c1: seqs 1, 3"), "{error}");
    assert!(switchboard_cluster_tests::Report::default().ensure_ok().is_ok());
}
