//! Cluster tests: the real `switchboard` binary run as separate store, router and gateway processes on
//! loopback over a real PostgreSQL, with faults injected from outside (SIGKILL, SIGSTOP/SIGCONT, SIGTERM,
//! restarts of the store and of PostgreSQL), clients that retry and resume as real ones do, and an external
//! checker of the invariants (`checker`).
//!
//! Waiting is always for a condition (a line on stdout, a state of the database polled every 50 ms, a client
//! log entry), each with a deadline as a guard; durations are measured with tokio's clock.

pub mod checker;
pub mod client;
pub mod cluster;
pub mod db;
pub mod kube;
pub mod log;
pub mod process;
pub mod scenario;
pub mod schema;
pub mod traffic;

pub use checker::{Invariant, Report, check, check_snapshot};
pub use client::{Connection, Participant, Side};
pub use cluster::{Cluster, ClusterSpec, LeaseSettings};
pub use db::{Db, LicenseState, SHARDS};
pub use log::{ClientLog, LogData};
pub use process::{Process, Role};
pub use scenario::{Outcome, Run};
pub use traffic::{Chat, Traffic, catch_up_all, open_chats};

/// The tenancy of the traffic tests: one tenant, one group, and one agent per chat.
pub mod tenancy {
    pub const WIDGET_KEY: &str = "acme-widget-key";
    pub const GROUP: &str = "g1";

    pub fn agent_id(i: usize) -> String {
        format!("agent-{i}")
    }

    pub fn agent_token(i: usize) -> String {
        format!("token-agent-{i}")
    }

    /// The configuration with `agents` agents, each in the group with room for a few chats.
    pub fn config(agents: usize) -> String {
        let mut yaml = String::from(
            "version: 1\ntenants:\n  - id: acme\n    name: Acme\n    widget_keys: [acme-widget-key]\n    groups:\n      - { id: g1, name: Group one }\n    agents:\n",
        );
        for i in 0..agents {
            yaml.push_str(&format!(
                "      - {{ id: {}, name: Agent {i}, token: {}, groups: [g1], capacity: 3 }}\n",
                agent_id(i),
                agent_token(i)
            ));
        }
        yaml
    }
}
