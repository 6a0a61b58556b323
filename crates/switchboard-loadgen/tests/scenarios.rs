//! Every scenario, briefly, against a real `switchboard serve` (each test its own server).

mod harness;

use harness::{Server, run_loadgen};

#[test]
fn steady_delivers_every_message_exactly_once() {
    let server = Server::start(&["--agents", "4", "--capacity", "3"], &[]);
    let run = server.run("steady", &["--agents", "4", "--pairs", "4", "--rate", "200", "--duration-s", "2"]);
    run.assert_clean();
    assert_eq!(run.report["scenario"], "steady");
    assert_eq!(run.count("messages_sent"), 400, "200/s for 2 s");
    assert_eq!(run.count("messages_acked"), 400);
    assert_eq!(run.count("messages_received"), 400);
    assert_eq!(run.count("messages_undelivered"), 0);
    assert_eq!(run.count("chats_closed"), 4);
    assert_eq!(run.report["latency_us"]["message"]["count"], 400);
    assert_eq!(run.report["latency_us"]["ack"]["count"], 400);
    assert!(run.report["throughput_per_s"].as_f64().unwrap() > 150.0, "{}", run.report);
    assert!(run.stdout.contains("invariants: ok"), "{}", run.stdout);
    assert_eq!(run.report["parameters"]["pacing"], "coarse");

    // Paced by a timerfd per pair: the same messages, each send's lateness measured as before.
    let precise = ["--agents", "4", "--pairs", "4", "--rate", "100", "--duration-s", "1", "--precise-pacing"];
    let run = server.run("steady", &precise);
    run.assert_clean();
    assert_eq!(run.report["parameters"]["pacing"], "precise");
    assert_eq!(run.count("messages_sent"), 100, "100/s for 1 s");
    assert_eq!(run.count("messages_received"), 100);
    assert_eq!(run.report["latency_us"]["schedule_lag"]["count"], 100, "{}", run.report);

    // More pairs than the agents' free slots: a setup error, before any chat starts.
    let run = server.run("steady", &["--agents", "1", "--pairs", "4", "--rate", "10", "--duration-s", "1"]);
    assert_eq!(run.code, 2, "{}", run.stderr);
    assert!(run.stderr.contains("free agent slots"), "{}", run.stderr);
}

#[test]
fn license_rounds_admit_exactly_the_limit() {
    let server = Server::start(&["--agents", "1"], &[("SWITCHBOARD_LICENSE_MAX_SESSIONS", "20")]);
    let run = server.run("license", &["--limit", "20", "--burst", "60", "--rounds", "2"]);
    run.assert_clean();
    let rounds = run.report["license"]["rounds"].as_array().unwrap();
    assert_eq!(rounds.len(), 2);
    for round in rounds {
        assert_eq!((round["attempted"].as_u64(), round["admitted"].as_u64()), (Some(60), Some(20)), "{round}");
        assert_eq!((round["refused"].as_u64(), round["closed"].as_u64()), (Some(40), Some(20)), "{round}");
    }
    assert!(run.report["invariants"]["preconditions"][0].as_str().unwrap().contains("no open chat"));

    // A run that expects another limit sees its invariant broken: exit code 1.
    let run = server.run("license", &["--limit", "25", "--burst", "30", "--rounds", "1"]);
    assert_eq!(run.code, 1, "{}", run.stdout);
    let violations = run.report["invariants"]["violations"].to_string();
    assert!(violations.contains("max_sessions 20, expected 25"), "{violations}");
    assert!(violations.contains("20 of 30 chats admitted, expected exactly 25"), "{violations}");
}

#[test]
fn chat_storm_accepts_each_chat_once_in_pull_and_push_groups() {
    let pull = Server::start(&["--agents", "3", "--capacity", "2"], &[]);
    let run = pull.run("chat-storm", &["--agents", "3", "--rate", "40", "--count", "20"]);
    run.assert_clean();
    assert_eq!(run.count("chats_started"), 20);
    assert_eq!(run.count("chats_accepted"), 20);
    assert_eq!(run.count("accept_wins"), 20);
    assert_eq!(run.count("chats_closed"), 20);
    assert_eq!(run.report["latency_us"]["first_queue_added"]["count"], 20);
    assert_eq!(run.report["chat_storm"]["routing"], "pull");
    assert!(run.report["chat_storm"]["queue_drain_ms"].as_f64().is_some());

    let push = Server::start(&["--agents", "3", "--capacity", "2", "--push-offer-timeout-ms", "5000"], &[]);
    let run = push.run("chat-storm", &["--agents", "3", "--rate", "40", "--count", "12", "--routing", "push"]);
    run.assert_clean();
    assert_eq!(run.count("accept_wins"), 12);
    assert_eq!(run.count("chats_accepted"), 12);
    assert_eq!(run.report["latency_us"]["offer"]["count"], 12);
}

#[test]
fn idle_sessions_and_a_connection_storm() {
    let server = Server::start(&["--agents", "1"], &[]);
    let pid = server.pid.to_string();
    let run = server.run("idle", &["--sessions", "50", "--hold-s", "0.3", "--server-pid", &pid]);
    run.assert_clean();
    assert_eq!(run.count("sessions_open"), 50);
    assert_eq!(run.count("sessions_open_at_end"), 50);
    assert_eq!(run.report["latency_us"]["connect"]["count"], 50);
    assert_eq!(run.report["latency_us"]["groups_list"]["count"], 50);
    let memory = &run.report["memory"];
    assert!(memory["server_rss_before_kb"].as_u64().unwrap() > 0, "{memory}");
    assert!(memory["server_rss_after_kb"].as_u64().unwrap() > 0, "{memory}");
    assert!(memory["server_bytes_per_session"].as_f64().is_some(), "{memory}");

    let run = server.run("storm", &["--connections", "40", "--rate", "100"]);
    run.assert_clean();
    assert_eq!(run.count("connections_answered"), 40);
    assert_eq!(run.report["latency_us"]["first_answer"]["count"], 40);
}

#[test]
fn connections_move_to_the_next_loopback_source_when_ports_run_short() {
    // In a network namespace of its own with ten ephemeral ports (the server's listener takes one), 30
    // sessions to one address cannot all come from 127.0.0.1: the kernel refuses the connect with
    // EADDRNOTAVAIL, and the load generator goes on from 127.0.0.2; the bind to it fails with EADDRINUSE
    // once its ports are taken too, then from 127.0.0.3, then from 127.0.0.4.
    let server = Server::start_in_namespace(&["--agents", "1"], (40000, 40009));
    let run = server.run("idle", &["--sessions", "30", "--hold-s", "0.2"]);
    run.assert_clean();
    assert_eq!(run.count("sessions_open"), 30);
    assert_eq!(run.count("sessions_open_at_end"), 30);
    for (from, to) in [("127.0.0.1", "127.0.0.2"), ("127.0.0.3", "127.0.0.4")] {
        let moved = format!("the ports from {from} ran short: connecting from {to} on");
        assert!(run.stderr.contains(&moved), "{moved:?} not in:\n{}", run.stderr);
    }

    // Sources given are taken in turn, and kept to. (Other addresses than the run before: its closed
    // connections hold their ports a while.)
    let run = server.run("idle", &["--sessions", "30", "--hold-s", "0.2", "--source-addrs", "127.0.0.11-127.0.0.14"]);
    run.assert_clean();
    assert_eq!(run.count("sessions_open"), 30);
    assert!(!run.stderr.contains("ran short"), "{}", run.stderr);
    // Too few of them for the sessions: two addresses of ten ports each (the listener's port is taken on
    // 127.0.0.1 only). The connections they cannot hold fail, and say why.
    let run = server.run("idle", &["--sessions", "30", "--hold-s", "0.2", "--source-addrs", "127.0.0.21-127.0.0.22"]);
    assert_eq!(run.count("sessions_open"), 20, "{}", run.stdout);
    assert_eq!(run.report["errors_by_reason"], serde_json::json!({ "no_source_port": 10 }), "{}", run.stdout);
    assert!(!run.stderr.contains("ran short"), "{}", run.stderr);
}

#[test]
fn several_processes_add_up_to_one_report() {
    let server = Server::start(&["--agents", "4", "--capacity", "3"], &[("SWITCHBOARD_LICENSE_MAX_SESSIONS", "10")]);
    let steady = ["--processes", "2", "--agents", "4", "--pairs", "4", "--rate", "200", "--duration-s", "1"];
    let run = server.run("steady", &steady);
    run.assert_clean();
    assert_eq!(run.report["processes"], 2);
    assert_eq!(run.count("messages_sent"), 200);
    assert_eq!(run.count("messages_received"), 200);
    assert_eq!(run.report["latency_us"]["message"]["count"], 200);
    assert_eq!(run.count("chats_closed"), 4);
    assert!(run.report.get("histograms").is_none(), "the raw histograms stay between the processes");

    let run = server.run("license", &["--processes", "2", "--limit", "10", "--burst", "25", "--rounds", "2"]);
    run.assert_clean();
    for round in run.report["license"]["rounds"].as_array().unwrap() {
        assert_eq!((round["attempted"].as_u64(), round["admitted"].as_u64()), (Some(25), Some(10)), "{round}");
    }
}

#[test]
fn customers_who_go_away_have_their_chats_abandoned_and_their_permits_given_back_round_after_round() {
    let config = ["--agents", "1", "--customer-heartbeat-ms", "500", "--abandon-after-ms", "1000"];
    let env = [("SWITCHBOARD_LICENSE_MAX_SESSIONS", "10"), ("SWITCHBOARD_PRESENCE_HEARTBEAT_MS", "200")];
    let server = Server::start(&config, &env);
    let args = ["--limit", "10", "--burst", "15", "--rounds", "3", "--release", "vanish", "--processes", "2"];
    let run = server.run("license", &args);
    run.assert_clean();
    for round in run.report["license"]["rounds"].as_array().unwrap() {
        assert_eq!((round["attempted"].as_u64(), round["admitted"].as_u64()), (Some(15), Some(10)), "{round}");
        assert_eq!((round["abandoned"].as_u64(), round["closed"].as_u64()), (Some(10), Some(0)), "{round}");
    }
    assert_eq!(run.count("chats_abandoned"), 30);
    let abandoned = &run.report["latency_us"]["abandoned"];
    assert_eq!(abandoned["count"], 30);
    // Never before the customer has been found gone for `abandon_after_ms`.
    assert!(abandoned["p50"].as_u64().unwrap() >= 1_000_000, "{abandoned}");

    // A server that abandons nothing: the chats are missed at the deadline, and hold their permits after.
    let config = ["--agents", "1", "--abandon-after-ms", "0"];
    let server = Server::start(&config, &[("SWITCHBOARD_LICENSE_MAX_SESSIONS", "10")]);
    let args = ["--limit", "10", "--burst", "15", "--rounds", "2", "--release", "vanish", "--abandon-deadline-s", "2"];
    let run = server.run("license", &args);
    assert_eq!(run.code, 1, "{}", run.stdout);
    let rounds = run.report["license"]["rounds"].as_array().unwrap();
    assert_eq!((rounds[0]["admitted"].as_u64(), rounds[0]["not_abandoned"].as_u64()), (Some(10), Some(10)));
    assert_eq!((rounds[1]["admitted"].as_u64(), rounds[1]["open_before"].as_u64()), (Some(0), Some(10)));
    let violations = run.report["invariants"]["violations"].to_string();
    assert!(violations.contains("was not abandoned within 2 s"), "{violations}");
}

#[test]
fn an_unreachable_server_is_a_setup_error() {
    // A port nothing listens on: bind one, then let it go.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let url = format!("ws://127.0.0.1:{port}/v1/ws");
    let run = run_loadgen("storm", &["--url", &url], &["--connections", "3", "--rate", "100"]);
    assert_eq!(run.code, 2, "{}", run.stderr);
    assert!(run.stderr.contains("connection refused"), "{}", run.stderr);
}
