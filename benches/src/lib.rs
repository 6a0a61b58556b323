//! Benchmarks of Switchboard beside bare baselines measured in the same run (see README.md): the criterion
//! benches of the hot paths live in `benches/`; this library holds the two programs of the end-to-end
//! comparison: [`relay`], the bare WebSocket relay Switchboard is compared with (binary `bare-relay`), and
//! [`compare`], which runs the load generator against the relay, `switchboard serve` and a split cluster, and
//! reports figures, ratios and the goals (binary `compare`).

pub mod compare;
pub mod relay;
