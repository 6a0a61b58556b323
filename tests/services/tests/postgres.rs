//! The launcher starts a real server that takes connections, and gives each caller its own database.

use std::process::Command;

use switchboard_testservices::Postgres;

fn psql(url: &str, sql: &str) -> String {
    let output = Command::new("psql").args([url, "-tAc", sql]).output().expect("psql runs");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

#[test]
fn starts_a_server_with_separate_databases_and_survives_a_restart() {
    let postgres = Postgres::start().unwrap();
    let first = postgres.create_database().unwrap();
    let second = postgres.create_database().unwrap();
    assert_ne!(first, second);
    psql(&first, "CREATE TABLE t (x int); INSERT INTO t VALUES (41)");
    assert_eq!(psql(&second, "SELECT count(*) FROM pg_tables WHERE tablename = 't'"), "0");
    postgres.stop().unwrap();
    assert!(Command::new("psql").args([first.as_str(), "-tAc", "SELECT 1"]).output().unwrap().status.code() != Some(0));
    postgres.restart().unwrap();
    assert_eq!(psql(&first, "SELECT x + 1 FROM t"), "42");
}

#[test]
fn names_the_postmaster_whose_children_do_the_servers_work() {
    let postgres = Postgres::start().unwrap();
    let postmaster = postgres.postmaster_pid().expect("a running server has a postmaster");
    // Its background processes (checkpointer, WAL writer, ...) are its children.
    let parent_of = |pid: &str| {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        stat.rsplit(')').next()?.split_whitespace().nth(1).map(str::to_owned)
    };
    let children = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|entry| entry.file_name().into_string().ok())
        .filter(|pid| parent_of(pid).as_deref() == Some(postmaster.to_string().as_str()))
        .count();
    assert!(children > 0, "no process has {postmaster} for its parent");
    postgres.stop().unwrap();
    assert_eq!(postgres.postmaster_pid(), None, "a stopped server has none");
}
