//! The limits per client address. How many chats one address may start: a token bucket per address, so that
//! a script cannot fill a group's queue (or the license) from one machine by opening connection after
//! connection, each with its own request budget. `chat.start` and `offline.message` (a ticket) take a token;
//! one over the limit is refused `rate_limited` with how long to wait, and nothing of it is done. How many
//! connections one address may hold open: one more is closed at once, so that one address cannot take all of
//! the gateway's connections.
//!
//! The address is the connection's peer, or, when the peer is a proxy the operator trusts
//! ([`AddressLimits::trusted_proxies`]), the address its `X-Forwarded-For` names: the rightmost one not itself
//! trusted. IPv6 addresses count by their /64 (one customer's network holds a whole /64). The chat starts of
//! the split gateways are counted in presence, over every gateway ([`AddressLimits::shared`]; at each gateway
//! alone while presence does not answer); the connections are each gateway's: behind a load balancer
//! spreading connections over N gateways an address may hold N times as many.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::str::FromStr;
use std::sync::{Mutex, PoisonError};

/// The limits per client address: chat starts, `per_minute` on average and up to `burst` at once
/// (`per_minute: 0` is no limit, the default), and connections open at once (`max_connections`, 0: no limit,
/// the default).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AddressLimits {
    pub per_minute: u32,
    pub burst: u32,
    /// Sessions (WebSockets and gRPC session streams) one address may have open at once at a gateway, so that
    /// one address cannot take all of `max_connections`; one more is closed at once, as one over that.
    pub max_connections: usize,
    /// The proxies (load balancers, ingress controllers) whose `X-Forwarded-For` is believed. Empty (the
    /// default): the header is ignored and the connection's peer counts.
    pub trusted_proxies: Vec<IpNet>,
    /// Chat starts are taken from each address's budget in presence, shared by every gateway (the split
    /// gateway role), rather than at this gateway alone (`serve`, where it is the only one). While presence
    /// does not answer, each gateway counts alone.
    pub shared: bool,
}

/// A network: an address and a prefix length (`10.0.0.0/8`, `fd00::/8`; a bare address is one host).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpNet {
    address: IpAddr,
    prefix: u8,
}

impl IpNet {
    pub fn contains(&self, address: IpAddr) -> bool {
        match (self.address, canonical(address)) {
            (IpAddr::V4(net), IpAddr::V4(address)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.prefix)).unwrap_or(0);
                u32::from(net) & mask == u32::from(address) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(address)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.prefix)).unwrap_or(0);
                u128::from(net) & mask == u128::from(address) & mask
            }
            _ => false,
        }
    }
}

impl FromStr for IpNet {
    type Err = String;

    fn from_str(text: &str) -> Result<IpNet, String> {
        let (address, prefix) = match text.split_once('/') {
            Some((address, prefix)) => (address, Some(prefix)),
            None => (text, None),
        };
        let address = canonical(address.trim().parse().map_err(|_| format!("{text:?} is not an address or network"))?);
        let bits = if address.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => bits,
            Some(prefix) => prefix
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|prefix| *prefix <= bits)
                .ok_or_else(|| format!("{text:?}: the prefix length is 0 to {bits}"))?,
        };
        Ok(IpNet { address, prefix })
    }
}

/// A network as written in a configuration file: `10.0.0.0/8`, `fd00::/8`, `192.0.2.7`.
impl<'de> serde::Deserialize<'de> for IpNet {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<IpNet, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// An IPv4 address written as IPv6 (`::ffff:a.b.c.d`, as a dual-stack socket reports it) is the IPv4 one.
fn canonical(address: IpAddr) -> IpAddr {
    match address {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(address, IpAddr::V4),
        v4 => v4,
    }
}

/// The client a connection counts as: its peer, or what a trusted proxy peer says in `X-Forwarded-For` (each
/// value a comma-separated list, the proxies appending: the rightmost address not trusted is the client; all
/// trusted, the leftmost). An unreadable entry ends the walk at the address after it.
pub(crate) fn client_address<'a>(
    peer: IpAddr,
    forwarded_for: impl DoubleEndedIterator<Item = &'a str>,
    trusted: &[IpNet],
) -> IpAddr {
    let is_trusted = |address: IpAddr| trusted.iter().any(|net| net.contains(address));
    let mut client = canonical(peer);
    if !is_trusted(client) {
        return client;
    }
    for value in forwarded_for.rev() {
        for entry in value.rsplit(',') {
            let Ok(address) = entry.trim().parse::<IpAddr>() else {
                return client;
            };
            client = canonical(address);
            if !is_trusted(client) {
                return client;
            }
        }
    }
    client
}

/// The header in which proxies name the client they forward (and in gRPC, the metadata key).
pub(crate) const X_FORWARDED_FOR: &str = "x-forwarded-for";

/// The bucket's key: an IPv4 address, or an IPv6 address's /64.
fn key(address: IpAddr) -> IpAddr {
    match canonical(address) {
        IpAddr::V6(v6) => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & (u128::MAX << 64))),
        v4 => v4,
    }
}

/// The name an address's chat starts go by in presence: the IPv4 address, or the IPv6 /64 (`2001:db8::/64`).
pub(crate) fn key_text(address: IpAddr) -> String {
    match key(address) {
        IpAddr::V6(network) => format!("{network}/64"),
        v4 => v4.to_string(),
    }
}

/// Which budget a chat start was taken from, to give it back to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StartTaken {
    /// None: no limit (or no client address).
    Unlimited,
    /// The budget shared by every gateway, in presence.
    Shared(IpAddr),
    /// This gateway's own (presence was down).
    Here(IpAddr),
}

/// One token, in the bucket's unit (a 60-millionth of a chat start, so that a microsecond refills
/// `per_minute` units).
const TOKEN: i64 = 60_000_000;

/// How many addresses are followed at once. Past it the buckets that are full again are forgotten; if that
/// frees less than a tenth of them (a flood from that many networks), every address starts afresh, so that a
/// scan of them all frees room for a tenth more at least.
const MAX_ADDRESSES: usize = 100_000;

/// The buckets of the addresses that started chats lately.
#[derive(Debug)]
pub(crate) struct AddressLimiter {
    per_minute: i64,
    full: i64,
    buckets: Mutex<HashMap<IpAddr, (i64, i64)>>,
}

impl AddressLimiter {
    pub(crate) fn new(limits: &AddressLimits) -> AddressLimiter {
        AddressLimiter {
            per_minute: i64::from(limits.per_minute),
            full: i64::from(limits.burst.max(1)).saturating_mul(TOKEN),
            buckets: Mutex::default(),
        }
    }

    /// Takes one chat start's token for `address`, or answers how long until there is one, in whole
    /// milliseconds (at least 1). `now_us` is read only when there is a limit.
    pub(crate) fn take(&self, address: IpAddr, now_us: impl FnOnce() -> i64) -> Result<(), u64> {
        if self.per_minute == 0 {
            return Ok(());
        }
        let now_us = now_us();
        let mut buckets = self.buckets.lock().unwrap_or_else(PoisonError::into_inner);
        let key = key(address);
        if buckets.len() >= MAX_ADDRESSES && !buckets.contains_key(&key) {
            let (per_minute, full) = (self.per_minute, self.full);
            buckets.retain(|_, bucket| refilled(*bucket, now_us, per_minute, full) < full);
            if buckets.len() > MAX_ADDRESSES - MAX_ADDRESSES / 10 {
                buckets.clear();
            }
        }
        let bucket = buckets.entry(key).or_insert((self.full, now_us));
        let available = refilled(*bucket, now_us, self.per_minute, self.full);
        let at_us = bucket.1.max(now_us);
        *bucket = (available, at_us);
        if available >= TOKEN {
            bucket.0 -= TOKEN;
            return Ok(());
        }
        let missing = u64::try_from(TOKEN - available).unwrap_or(1);
        let missing_us = missing.div_ceil(u64::try_from(self.per_minute).unwrap_or(1));
        Err(missing_us.div_ceil(1_000).max(1))
    }

    /// Gives back one chat start's token taken from `address` (a start that started nothing), never beyond a
    /// full bucket.
    pub(crate) fn give_back(&self, address: IpAddr, now_us: impl FnOnce() -> i64) {
        if self.per_minute == 0 {
            return;
        }
        let now_us = now_us();
        let mut buckets = self.buckets.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(bucket) = buckets.get_mut(&key(address)) {
            let available = refilled(*bucket, now_us, self.per_minute, self.full);
            *bucket = (available.saturating_add(TOKEN).min(self.full), bucket.1.max(now_us));
        }
    }
}

/// What a bucket (tokens at a time) holds at `now_us`: a clock that steps back refills nothing.
fn refilled((available, at_us): (i64, i64), now_us: i64, per_minute: i64, full: i64) -> i64 {
    let elapsed = now_us.saturating_sub(at_us).max(0);
    available.saturating_add(elapsed.saturating_mul(per_minute)).min(full)
}

/// The sessions open per client address (an IPv6 address's /64), against
/// [`AddressLimits::max_connections`]. An address is followed while it has sessions open.
#[derive(Debug, Default)]
pub(crate) struct AddressConnections {
    max: usize,
    open: Mutex<HashMap<IpAddr, usize>>,
}

/// A session's place in its address's count, given back when dropped.
pub(crate) struct AddressSlot {
    connections: std::sync::Arc<AddressConnections>,
    key: IpAddr,
}

impl AddressConnections {
    pub(crate) fn new(max: usize) -> std::sync::Arc<AddressConnections> {
        std::sync::Arc::new(AddressConnections { max, open: Mutex::default() })
    }

    /// A place for one more session of `address`; `None` when it has `max` open already. Always one without
    /// a limit (and then nothing is counted).
    pub(crate) fn admit(self: &std::sync::Arc<Self>, address: IpAddr) -> Option<Option<AddressSlot>> {
        if self.max == 0 {
            return Some(None);
        }
        let key = key(address);
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        let count = open.entry(key).or_insert(0);
        if *count >= self.max {
            return None;
        }
        *count += 1;
        Some(Some(AddressSlot { connections: self.clone(), key }))
    }

    pub(crate) fn max(&self) -> usize {
        self.max
    }

    #[cfg(test)]
    fn open(&self, address: IpAddr) -> usize {
        self.open.lock().unwrap().get(&key(address)).copied().unwrap_or(0)
    }
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut open = self.connections.open.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = open.get_mut(&self.key) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                open.remove(&self.key);
            }
        }
    }
}

/// The TCP peer of a client connection, put in each request's extensions by [`Gateway::serve`].
///
/// [`Gateway::serve`]: crate::Gateway::serve
#[derive(Debug, Clone, Copy)]
pub(crate) struct Peer(pub(crate) SocketAddr);

#[cfg(test)]
mod tests {
    use super::*;

    fn net(text: &str) -> IpNet {
        text.parse().unwrap()
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn networks_parse_and_contain_their_addresses() {
        assert!(net("10.0.0.0/8").contains(ip("10.200.3.4")));
        assert!(!net("10.0.0.0/8").contains(ip("11.0.0.1")));
        assert!(net("192.168.1.7").contains(ip("192.168.1.7")) && !net("192.168.1.7").contains(ip("192.168.1.8")));
        assert!(net("0.0.0.0/0").contains(ip("8.8.8.8")) && !net("0.0.0.0/0").contains(ip("::1")));
        assert!(net("fd00::/8").contains(ip("fd12::1")) && !net("fd00::/8").contains(ip("fe80::1")));
        assert!(net("::/0").contains(ip("2001:db8::1")));
        // A dual-stack socket's IPv4 peer is the IPv4 address.
        assert!(net("127.0.0.0/8").contains(ip("::ffff:127.0.0.1")));
        for bad in ["", "10.0.0.0/33", "::/129", "10.0.0/8", "10.0.0.0/x", "example.com"] {
            assert!(bad.parse::<IpNet>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_client_is_the_peer_unless_a_trusted_proxy_names_it() {
        let trusted = [net("10.0.0.0/8")];
        let header = ["203.0.113.9, 10.1.1.1"];
        // An untrusted peer's header is not believed: it could say anything.
        assert_eq!(client_address(ip("198.51.100.1"), header.into_iter(), &trusted), ip("198.51.100.1"));
        // A trusted peer: the rightmost address not trusted.
        assert_eq!(client_address(ip("10.0.0.5"), header.into_iter(), &trusted), ip("203.0.113.9"));
        // A client that forges addresses to the left of its own gains nothing.
        let forged = ["1.2.3.4, 203.0.113.9"];
        assert_eq!(client_address(ip("10.0.0.5"), forged.into_iter(), &trusted), ip("203.0.113.9"));
        // Several header lines are one list, in order.
        let lines = ["1.2.3.4", "203.0.113.9, 10.9.9.9"];
        assert_eq!(client_address(ip("10.0.0.5"), lines.into_iter(), &trusted), ip("203.0.113.9"));
        // No header, or only trusted addresses: the last trusted one seen.
        assert_eq!(client_address(ip("10.0.0.5"), std::iter::empty(), &trusted), ip("10.0.0.5"));
        assert_eq!(client_address(ip("10.0.0.5"), ["10.7.7.7"].into_iter(), &trusted), ip("10.7.7.7"));
        // An unreadable entry: the address after it (the proxy that wrote it) counts.
        assert_eq!(client_address(ip("10.0.0.5"), ["bogus, 10.2.2.2"].into_iter(), &trusted), ip("10.2.2.2"));
        // Nothing trusted: the header is ignored.
        assert_eq!(client_address(ip("10.0.0.5"), header.into_iter(), &[]), ip("10.0.0.5"));
    }

    #[test]
    fn an_address_starts_its_burst_then_at_the_rate_and_is_told_how_long_to_wait() {
        let limiter = AddressLimiter::new(&AddressLimits { per_minute: 6, burst: 2, ..Default::default() });
        let (one, other) = (ip("203.0.113.9"), ip("198.51.100.1"));
        assert_eq!(limiter.take(one, || 0), Ok(()));
        assert_eq!(limiter.take(one, || 0), Ok(()));
        assert_eq!(limiter.take(one, || 0), Err(10_000), "one start every 10 s");
        assert_eq!(limiter.take(one, || 4_000_000), Err(6_000));
        // Another address has its own bucket.
        assert_eq!(limiter.take(other, || 4_000_000), Ok(()));
        assert_eq!(limiter.take(one, || 10_000_000), Ok(()));
        assert_eq!(limiter.take(one, || 10_000_000), Err(10_000));
        // A clock that steps back refills nothing.
        assert_eq!(limiter.take(one, || 0), Err(10_000));
        // Idle for long: the burst, no more.
        assert_eq!(limiter.take(one, || 600_000_000), Ok(()));
        assert_eq!(limiter.take(one, || 600_000_000), Ok(()));
        assert!(limiter.take(one, || 600_000_000).is_err());
    }

    #[test]
    fn an_ipv6_network_counts_as_one_address_and_no_limit_admits_all() {
        let limiter = AddressLimiter::new(&AddressLimits { per_minute: 1, burst: 1, ..Default::default() });
        assert_eq!(limiter.take(ip("2001:db8:1:2::1"), || 0), Ok(()));
        assert!(limiter.take(ip("2001:db8:1:2:ffff::9"), || 0).is_err(), "the same /64");
        assert_eq!(limiter.take(ip("2001:db8:1:3::1"), || 0), Ok(()), "another /64");
        let unlimited = AddressLimiter::new(&AddressLimits::default());
        assert!((0..1_000).all(|_| unlimited.take(ip("203.0.113.9"), || 0).is_ok()));
    }

    #[test]
    fn an_address_has_at_most_its_connections_open_and_gets_them_back() {
        let connections = AddressConnections::new(2);
        let (one, other) = (ip("203.0.113.9"), ip("2001:db8:1:2::1"));
        let first = connections.admit(one).expect("admitted");
        let second = connections.admit(one).expect("admitted");
        assert!(connections.admit(one).is_none(), "a third at once");
        let in_network = connections.admit(other).expect("its own count");
        let in_network_too = connections.admit(ip("2001:db8:1:2::9")).expect("the same /64, one more");
        assert!(connections.admit(ip("2001:db8:1:2::7")).is_none(), "the same /64, full");
        drop((in_network, in_network_too));
        drop(first);
        assert_eq!(connections.open(one), 1);
        let third = connections.admit(one).expect("a place given back");
        drop((second, third));
        assert_eq!(connections.open(one), 0);
        assert!(connections.open.lock().unwrap().get(&one).is_none(), "an address with none open is forgotten");
        let unlimited = AddressConnections::new(0);
        assert!((0..100).all(|_| matches!(unlimited.admit(one), Some(None))));
    }

    #[test]
    fn the_addresses_followed_are_bounded() {
        let limiter = AddressLimiter::new(&AddressLimits { per_minute: 60, burst: 1, ..Default::default() });
        let address = |n: usize| IpAddr::V4(std::net::Ipv4Addr::from(u32::try_from(n).unwrap()));
        for n in 0..MAX_ADDRESSES {
            assert_eq!(limiter.take(address(n), || 0), Ok(()));
        }
        // A second later every bucket is full again: they are forgotten to make room.
        assert_eq!(limiter.take(address(MAX_ADDRESSES), || 1_000_000), Ok(()));
        assert_eq!(limiter.buckets.lock().unwrap().len(), 1);
        // Full of buckets in use, but for a few: forgetting those few would free too little room (each new
        // address would scan them all again), so every address starts afresh.
        let limiter = AddressLimiter::new(&AddressLimits { per_minute: 1, burst: 1, ..Default::default() });
        for n in 0..MAX_ADDRESSES - 5 {
            assert_eq!(limiter.take(address(n), || 1_000_000), Ok(()));
        }
        for n in MAX_ADDRESSES - 5..MAX_ADDRESSES {
            assert_eq!(limiter.take(address(n), || 0), Ok(()));
        }
        // A minute after the last five started: theirs are full again, the others not quite.
        assert_eq!(limiter.take(address(MAX_ADDRESSES), || 60_000_000), Ok(()));
        assert_eq!(limiter.buckets.lock().unwrap().len(), 1);
        assert_eq!(limiter.take(address(0), || 60_000_000), Ok(()), "started afresh");
    }
}
