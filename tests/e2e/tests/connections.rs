//! `serve` keeps TCP keepalive on every client connection, so that a peer gone without a word (a laptop
//! closed, a network lost) is found by the kernel and its session ends, rather than counting as connected for
//! good: an agent's half-open connection would otherwise keep the agent online, with their chats, forever.
//! What the kernel shows of the server's own socket in `/proc/net/tcp` is checked: its keepalive timer runs.

use std::time::Duration;

use anyhow::{Context, bail};
use switchboard_e2e::{SEED_CONFIG, Server};
use switchboard_gateway::KEEPALIVE_IDLE;

/// The timer of the socket from `local` to `remote` (`/proc/net/tcp`'s `tr:tm->when`): which timer, and in
/// how many clock ticks (USER_HZ, 100 a second) it fires.
fn socket_timer(local_port: u16, remote_port: u16) -> anyhow::Result<Option<(u8, u64)>> {
    let table = std::fs::read_to_string("/proc/net/tcp")?;
    for line in table.lines().skip(1) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let port = |address: &str| address.rsplit(':').next().and_then(|hex| u16::from_str_radix(hex, 16).ok());
        if fields.len() < 6 || port(fields[1]) != Some(local_port) || port(fields[2]) != Some(remote_port) {
            continue;
        }
        let (timer, when) = fields[5].split_once(':').context("no tr:tm->when field")?;
        return Ok(Some((u8::from_str_radix(timer, 16)?, u64::from_str_radix(when, 16)?)));
    }
    Ok(None)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_connection_is_watched_by_tcp_keepalive() -> anyhow::Result<()> {
    let data = tempfile::tempdir()?;
    let server = Server::start(SEED_CONFIG, data.path()).await?;
    let client = tokio::net::TcpStream::connect(&server.address).await?;
    let server_port = client.peer_addr()?.port();
    let client_port = client.local_addr()?.port();
    // The server's side of the connection is tuned once accepted; it says nothing until then.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    // The keepalive timer (2) running on the server's socket is the check; anything else until the deadline
    // fails it.
    let when = loop {
        match socket_timer(server_port, client_port)? {
            Some((2, when)) => break when,
            _ if tokio::time::Instant::now() > deadline => {
                bail!("the server's socket has no keepalive timer: {:?}", socket_timer(server_port, client_port)?)
            }
            // Polled: the kernel tells no one when a socket option changes.
            _ => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    };
    let ticks = u64::try_from(KEEPALIVE_IDLE.as_millis() / 10)?;
    assert!(when <= ticks, "the first probe within {KEEPALIVE_IDLE:?} of silence: {when} ticks");
    // The client's own socket (made by this test, without keepalive) shows no such timer: the check sees
    // the server's choice, not a default of the system.
    assert_ne!(socket_timer(client_port, server_port)?.map(|(timer, _)| timer), Some(2));
    drop((client, server));
    Ok(())
}
