#![doc = include_str!("../README.md")]

pub mod cli;
pub mod gen_config;
pub mod invariants;
pub mod metrics;
pub mod net;
pub mod pacer;
pub mod progress;
pub mod report;
pub mod runner;
pub mod scenario;
pub mod schedule;
pub mod shard;
pub mod table;
