//! Real services for tests, started on free loopback ports and stopped when dropped.
//!
//! - [`Postgres`]: Debian's PostgreSQL (`apt-get install postgresql`; `scripts/test` installs it). A server is
//!   started per [`Postgres::start`] with its own data directory; [`Postgres::create_database`] gives each
//!   test a database of its own.
//! - [`Redis`]: Debian's `redis-server` (`apt-get install redis-server`; `scripts/test` installs it), without
//!   persistence, in a directory of its own; [`Redis::stop`] and [`Redis::start_again`] make an outage on the
//!   same port.
//! - [`OtlpReceiver`]: an OTLP/gRPC trace receiver in the test process (a tonic server on a free port), which
//!   keeps the spans the processes under test export and wakes waiters on each export.
//!
//! PostgreSQL refuses to run as root: when the tests run as root, the server runs as the `postgres` user.

mod otlp;
mod postgres;
mod redis;

pub use otlp::{OtlpReceiver, ReceivedSpan};
pub use postgres::Postgres;
pub use redis::Redis;

/// A port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}
