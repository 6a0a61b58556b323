//! End-to-end harness: runs the real `switchboard` binary on a free loopback port with its own data
//! directory, and drives it over real WebSockets as widgets and agent consoles do.
//!
//! Waiting is always for a condition (a frame that matches) with a generous deadline as a guard, never a
//! sleep.

mod client;
pub mod exposition;
mod server;

pub use client::{Client, Frame};
pub use server::{Server, StoreRole, http_get};

/// The seed scenario's tenancy: groups g1 and g2; agent A in both, agent B in g1 only; and a second tenant
/// whose agent must never see the first tenant's chats.
pub const SEED_CONFIG: &str = r#"
version: 1
limits:
  max_message_bytes: 256
tenants:
  - id: acme
    name: Acme
    widget_keys: [acme-widget-key]
    groups:
      - { id: g1, name: Group one }
      - { id: g2, name: Group two }
    agents:
      - { id: agent-a, name: Agent A, token: token-agent-a, groups: [g1, g2], capacity: 50 }
      - { id: agent-b, name: Agent B, token: token-agent-b, groups: [g1], capacity: 50 }
  - id: other
    name: Other Inc
    widget_keys: [other-widget-key]
    groups:
      - { id: g1, name: Their group }
    agents:
      - { id: agent-x, name: Agent X, token: token-agent-x, groups: [g1], capacity: 5 }
"#;
