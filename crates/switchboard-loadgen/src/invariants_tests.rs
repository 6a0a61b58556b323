use std::time::Duration;

use super::*;

#[test]
fn violations_list_the_first_fifty_and_count_all() {
    let mut violations = Violations::default();
    for n in 0..60 {
        violations.add(format!("v{n}"));
    }
    assert_eq!((violations.total, violations.first.len()), (60, 50));
    let mut merged = Violations::default();
    merged.add("mine".into());
    merged.merge(&violations);
    assert_eq!(merged.total, 61);
    assert_eq!(merged.first.len(), 50);
    assert_eq!(merged.first[0], "mine");
}

#[test]
fn seqs_must_follow_each_other_per_conversation() {
    let mut checker = SeqChecker::default();
    assert_eq!(checker.observe("a", 1), Ok(()));
    assert_eq!(checker.observe("a", 2), Ok(()));
    // The first events of a chat missed: a socket follows each chat from its first event.
    assert!(checker.observe("b", 5).unwrap_err().contains("seq 5 was the first event on a socket, not seq 1"));
    assert_eq!(checker.observe("b", 6), Ok(()), "checking goes on from there");
    assert!(checker.observe("a", 2).unwrap_err().contains("seq 2 received after seq 2"));
    assert!(checker.observe("a", 1).is_err());
    assert!(checker.observe("a", 4).unwrap_err().contains("gap"));
    assert_eq!(checker.observe("a", 5), Ok(()), "checking resumes after a gap");
}

fn key(conversation: &str, sender: Side, id: &str) -> MessageKey {
    MessageKey { conversation: conversation.into(), sender, client_msg_id: id.into() }
}

#[test]
fn every_acked_message_is_received_exactly_once() {
    let start = Instant::now();
    let mut ledger = MessageLedger::default();
    let on_time = key("c1", Side::Customer, "m1");
    ledger.expect(on_time.clone(), start, true);
    // The other side may receive the event before the sender has its ack.
    assert_eq!(ledger.received(&on_time), Receipt::First { intended: start, measured: true });
    assert_eq!(ledger.acked(&on_time, 3), Some((start, true)));

    let lost = key("c1", Side::Agent, "m1");
    ledger.expect(lost.clone(), start + Duration::from_millis(5), false);
    assert!(ledger.acked(&lost, 4).is_some());
    assert_eq!(ledger.undelivered(), 1);

    let twice = key("c2", Side::Customer, "m1");
    ledger.expect(twice.clone(), start, true);
    ledger.acked(&twice, 3);
    ledger.received(&twice);
    assert_eq!(ledger.received(&twice), Receipt::Duplicate(2));

    let unacked = key("c3", Side::Customer, "m1");
    ledger.expect(unacked.clone(), start, true);
    ledger.received(&unacked);
    assert_eq!(ledger.received_unacked(), 1);
    assert_eq!(ledger.received(&key("c9", Side::Agent, "x")), Receipt::Unknown);

    let violations = ledger.violations();
    assert_eq!(violations.len(), 2, "{violations:?}");
    assert!(violations[0].contains("agent in conversation c1 was acked sent (seq 4) but the customer never"));
    assert!(violations[1].contains("received 2 times by the agent"));
}

#[test]
fn every_chat_is_accepted_exactly_once() {
    let mut chats = ChatLedger::default();
    chats.started("c1");
    chats.started("c2");
    chats.started("c3");
    assert_eq!(chats.accept_acked("c1", "agent0"), None);
    assert_eq!(chats.accept_acked("c1", "agent0"), None, "the owner accepting again is acked again");
    assert_eq!(chats.accepted_event("c1"), None);
    assert_eq!(chats.accepted_event("c2"), None);
    assert_eq!(chats.accept_acked("c1", "agent1").unwrap(), "conversation c1: chat.accept acked to agent0 and agent1");
    assert!(chats.accepted_event("c2").unwrap().contains("2 accepted events"));
    // An accept of a chat another process started is checked over every process (its `won` list).
    assert_eq!(chats.accept_acked("elsewhere", "agent0"), None);
    assert_eq!(chats.won(), vec!["c1".to_owned(), "elsewhere".to_owned()]);
    assert_eq!((chats.started_count(), chats.accepted_count()), (3, 2));
    assert_eq!(chats.unaccepted(), vec!["conversation c3 was never accepted".to_owned()]);
}

#[test]
fn license_rounds_admit_exactly_the_limit() {
    let round = |attempted, admitted, failed| LicenseRound {
        round: 1,
        attempted,
        admitted,
        refused: attempted - admitted - failed,
        failed,
        closed: admitted,
        ..LicenseRound::default()
    };
    assert!(license_round_violations(20, &round(60, 20, 0)).is_empty());
    assert!(license_round_violations(20, &round(10, 10, 0)).is_empty(), "fewer attempts than the limit");
    let above = license_round_violations(20, &round(60, 21, 0));
    assert_eq!(above.len(), 2);
    assert!(above[0].contains("above the limit of 20"));
    let below = license_round_violations(20, &round(60, 19, 0));
    assert!(below[0].contains("expected exactly 20") && below[0].contains("precondition"));
    assert!(license_round_violations(20, &round(60, 19, 1)).is_empty(), "a failed start skips the exact check");
    assert_eq!(license_round_violations(20, &round(60, 21, 1)).len(), 1, "never above, even then");
}

#[test]
fn chats_an_earlier_round_left_open_count_against_the_limit_of_the_rounds_after() {
    // Round 1 admits the limit, and the server refuses 3 of its closes: those chats stay open, holding their
    // permits.
    let first = LicenseRound {
        round: 1,
        attempted: 60,
        admitted: 20,
        refused: 40,
        closed: 17,
        close_refused: 3,
        ..LicenseRound::default()
    };
    assert!(license_round_violations(20, &first).is_empty());
    assert_eq!(first.carried(), (3, 0));
    // Closes that got no answer may have closed their chats or not: the rounds after are checked against the
    // limit only.
    let unanswered = LicenseRound { close_refused: 1, ..first.clone() };
    assert_eq!(unanswered.carried(), (1, 2));
    let next = |admitted| {
        let (open_before, failed_before) = first.carried();
        LicenseRound {
            round: 2,
            attempted: 60,
            admitted,
            refused: 60 - admitted,
            closed: admitted,
            open_before,
            failed_before,
            ..LicenseRound::default()
        }
    };
    assert!(license_round_violations(20, &next(17)).is_empty(), "17 more make the limit");
    // A server that admits the limit again is above it, though the round alone looks exact.
    let again = license_round_violations(20, &next(20));
    assert_eq!(again.len(), 2, "{again:?}");
    assert!(again[0].contains("20 chats admitted while 3 admitted before were still open, above the limit of 20"));
    assert!(again[1].contains("expected exactly 17") && again[1].contains("less the 3 chats"), "{}", again[1]);
    assert!(license_round_violations(20, &next(16))[0].contains("16 of 60 chats admitted, expected exactly 17"));

    // A start of round 1 that failed may have been admitted: the rounds after are not checked exactly, but
    // never above the limit all the same.
    let failed = LicenseRound {
        round: 1,
        attempted: 60,
        admitted: 19,
        refused: 40,
        failed: 1,
        closed: 19,
        ..LicenseRound::default()
    };
    assert_eq!(failed.carried(), (0, 1));
    let after = LicenseRound {
        round: 2,
        attempted: 60,
        admitted: 19,
        refused: 41,
        closed: 19,
        failed_before: 1,
        ..LicenseRound::default()
    };
    assert!(license_round_violations(20, &after).is_empty());
    let over = LicenseRound { admitted: 21, refused: 39, ..after };
    assert_eq!(license_round_violations(20, &over).len(), 1);
}

#[test]
fn chats_of_customers_who_went_away_free_their_permits_once_abandoned_and_hold_them_until() {
    // Round 1 admits the limit; its customers go away: 8 chats are abandoned, 2 not by the deadline.
    let first = LicenseRound {
        round: 1,
        attempted: 15,
        admitted: 10,
        refused: 5,
        abandoned: 8,
        not_abandoned: 2,
        ..LicenseRound::default()
    };
    assert!(license_round_violations(10, &first).is_empty());
    assert_eq!(first.carried(), (2, 0), "the 2 still open; nothing unknown");
    let (open_before, failed_before) = first.carried();
    let second = |admitted| LicenseRound {
        round: 2,
        attempted: 15,
        admitted,
        refused: 15 - admitted,
        open_before,
        failed_before,
        ..LicenseRound::default()
    };
    assert!(license_round_violations(10, &second(8)).is_empty());
    // A permit of a chat not abandoned taken again: above the limit, counting the chats left open.
    let violations = license_round_violations(10, &second(9));
    assert!(violations.iter().any(|v| v.contains("above the limit")), "{violations:?}");
}
