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
