use std::time::Duration;

use tokio::time::Instant;

use super::*;
use crate::metrics::Metrics;

fn report_of(latencies_ms: &[u64], counts: &[(&str, u64)], errors: &[&str]) -> Report {
    let metrics = Metrics::new();
    let start = Instant::now();
    for ms in latencies_ms {
        metrics.record("message", start, start + Duration::from_millis(*ms));
    }
    for (name, n) in counts {
        metrics.count(name, *n);
    }
    for reason in errors {
        metrics.error(reason);
    }
    Report::new("steady", serde_json::json!({}), metrics.snapshot(), 2.0, latencies_ms.len() as u64)
}

#[test]
fn merged_histograms_equal_one_histogram_of_everything() {
    let first: Vec<u64> = (1..=500).collect();
    let second: Vec<u64> = (400..=2000).step_by(3).collect();
    let all: Vec<u64> = first.iter().chain(&second).copied().collect();
    let merged = merge(vec![
        report_of(&first, &[("sent", 500)], &["unavailable"]),
        report_of(&second, &[("sent", 534), ("received", 7)], &["unavailable", "request_timeout"]),
    ]);
    let whole = report_of(&all, &[], &[]);
    assert_eq!(merged.latency_us["message"], whole.latency_us["message"]);
    assert_eq!(merged.latency_us["message"].count, 1034);
    assert_eq!(merged.histograms["message"], whole.histograms["message"]);
    assert_eq!(merged.processes, 2);
    assert_eq!(merged.count("sent"), 1034);
    assert_eq!(merged.count("received"), 7);
    assert_eq!(merged.errors_by_reason["unavailable"], 2);
    assert_eq!(merged.errors_by_reason["request_timeout"], 1);
    assert_eq!(merged.throughput_per_s, 250.0 + 267.0);
    assert!(merged.invariants.ok);
}

#[test]
fn merged_reports_keep_every_violation_count_and_sum_the_rounds() {
    let mut first = report_of(&[], &[], &[]);
    first.scenario = "license".into();
    first.add_violation("one".into());
    let round = |admitted, refused| LicenseRound {
        round: 1,
        attempted: 30,
        admitted,
        refused,
        closed: admitted,
        ..LicenseRound::default()
    };
    first.license = Some(LicenseSection { limit: 20, rounds: vec![round(12, 18)] });
    let mut second = first.clone();
    second.license = Some(LicenseSection { limit: 20, rounds: vec![round(8, 22)] });
    let mut merged = merge(vec![first.clone(), second]);
    assert_eq!(merged.invariants.violations_total, 2);
    check_merged(&mut merged);
    assert_eq!(
        merged.license.as_ref().unwrap().rounds,
        vec![LicenseRound {
            round: 1,
            attempted: 60,
            admitted: 20,
            refused: 40,
            closed: 20,
            ..LicenseRound::default()
        }]
    );
    assert_eq!(merged.invariants.violations_total, 2, "20 of 60 admitted is right");

    let mut over = first.clone();
    over.license = Some(LicenseSection { limit: 20, rounds: vec![round(9, 21)] });
    let mut merged = merge(vec![first, over]);
    check_merged(&mut merged);
    assert!(!merged.invariants.ok);
    assert!(merged.invariants.violations.iter().any(|v| v.contains("21 chats admitted, above the limit")));
}

#[test]
fn the_server_memory_per_session_comes_from_the_merged_session_count() {
    let mut first = report_of(&[], &[("sessions_open", 600)], &[]);
    first.scenario = "idle".into();
    first.memory = Some(MemorySection {
        server_rss_before_kb: Some(10_000),
        server_rss_after_kb: Some(11_000),
        loadgen_rss_kb: Some(500),
        ..MemorySection::default()
    });
    let mut second = report_of(&[], &[("sessions_open", 400)], &[]);
    second.memory = Some(MemorySection { loadgen_rss_kb: Some(300), ..MemorySection::default() });
    let mut merged = merge(vec![first, second]);
    check_merged(&mut merged);
    let memory = merged.memory.unwrap();
    assert_eq!(memory.server_bytes_per_session, Some(1024.0));
    assert_eq!(memory.loadgen_rss_kb, Some(800));
}

#[test]
fn a_report_round_trips_through_json() {
    let report = report_of(&[1, 2, 3], &[("sent", 3)], &["x"]);
    let json = serde_json::to_string(&report).unwrap();
    let back: Report = serde_json::from_str(&json).unwrap();
    assert_eq!(back.latency_us, report.latency_us);
    assert_eq!(back.histograms, report.histograms);
    let value: serde_json::Value = serde_json::from_str(&json).unwrap();
    for field in ["scenario", "processes", "duration_s", "throughput_per_s", "counts", "latency_us", "errors_by_reason"]
    {
        assert!(value.get(field).is_some(), "{field} missing");
    }
    assert_eq!(value["invariants"]["ok"], true);
    assert_eq!(value["latency_us"]["message"]["count"], 3);
}

#[test]
fn a_chat_won_by_agents_of_two_processes_is_a_violation_of_the_merged_run() {
    let storm = |won: &[&str]| {
        let mut report = report_of(&[], &[("accept_wins", won.len() as u64)], &[]);
        report.scenario = "chat-storm".into();
        let won = vec![won.iter().map(|conversation| conversation.to_string()).collect()];
        report.chat_storm = Some(ChatStormSection { routing: "push".into(), queue_drain_ms: None, won });
        report
    };
    // Each process's list comes through its JSON report.
    let through_json =
        |report: Report| serde_json::from_str::<Report>(&serde_json::to_string(&report).unwrap()).unwrap();
    let mut clean = merge(vec![storm(&["c1", "c2"]), through_json(storm(&["c3"])), through_json(storm(&["c4"]))]);
    check_merged(&mut clean);
    assert!(clean.invariants.ok, "{:?}", clean.invariants.violations);

    let mut twice = merge(vec![storm(&["c1", "c2"]), through_json(storm(&["c3"])), through_json(storm(&["c2"]))]);
    check_merged(&mut twice);
    assert_eq!(twice.invariants.violations, vec!["conversation c2: chat.accept acked to agents of processes 1 and 3"]);
    // The lists are the check's, not the report's.
    let written = serde_json::to_value(&twice).unwrap();
    assert!(written["chat_storm"].get("won").is_none(), "{written}");
}
