//! Presence writes on a real Redis (Debian's `redis-server`, started on a free loopback port), Switchboard's
//! against bare commands in the same run: what every agent costs Redis at each heartbeat.
//!
//! One iteration is 64 agents' worth:
//! - `session_alive_*`: a gateway's heartbeat of one connection of each agent ([`Presence::session_alive`]:
//!   trim, add, map the session to its gateway, two expiries; one pipeline);
//! - `signed_in_*`: a router's heartbeat of each agent, a member of two groups ([`Presence::signed_in`]: the
//!   chosen status, then trim, add and expiry per group; one pipeline);
//! - `baseline_set_*`: one bare `SET key value PX ttl` per agent on a multiplexed connection: the least one
//!   round trip to Redis costs.
//!
//! Each at once (`_concurrent`: the 64 on the wire together) and one after the other (`_sequential`).
//! Criterion reports the time of 64 and, from the throughput, operations per second.

mod common;

use common::{APPENDS, START_MS, runtime};
use criterion::{Criterion, SamplingMode, Throughput, criterion_group, criterion_main};
use futures_util::future::join_all;
use switchboard_domain::{AgentId, AgentStatus, GroupId, TenantId};
use switchboard_presence::{Presence, RedisPresence, RedisSettings};
use switchboard_testservices::Redis;

/// A session's or a mark's expiry: an hour after the fixed start (nothing expires during a run).
const EXPIRES_AT_MS: i64 = START_MS + 3_600_000;

fn presence_writes(c: &mut Criterion) {
    let runtime = runtime();
    let server = Redis::start().expect("redis-server (scripts/test installs it)");
    let (presence, bare) = runtime.block_on(async {
        let presence = RedisPresence::connect(&server.url(), RedisSettings::default()).await.unwrap();
        let client = redis::Client::open(server.url()).unwrap();
        (presence, client.get_multiplexed_async_connection().await.unwrap())
    });
    let tenant = TenantId::new("bench").unwrap();
    let agents: Vec<AgentId> = (0..APPENDS).map(|i| AgentId::new(format!("agent-{i}")).unwrap()).collect();
    let groups = [GroupId::new("g0").unwrap(), GroupId::new("g1").unwrap()];
    let (presence, tenant, groups) = (&presence, &tenant, &groups);
    let session_alive = |agent: &AgentId| {
        let (agent, session) = (agent.clone(), format!("session-{agent}"));
        async move { presence.session_alive(tenant, &agent, &session, "gateway-1", EXPIRES_AT_MS).await.unwrap() }
    };
    let signed_in = |agent: &AgentId| {
        let agent = agent.clone();
        async move { presence.signed_in(tenant, &agent, AgentStatus::Online, groups, EXPIRES_AT_MS).await.unwrap() }
    };
    let set = |agent: &AgentId| {
        let mut connection = bare.clone();
        let key = format!("bare:{agent}");
        async move {
            let () = redis::cmd("SET")
                .arg(key)
                .arg("online")
                .arg("PX")
                .arg(3_600_000)
                .query_async(&mut connection)
                .await
                .unwrap();
        }
    };

    let mut group = c.benchmark_group("presence_64");
    group.throughput(Throughput::Elements(APPENDS as u64));
    group.sampling_mode(SamplingMode::Flat).sample_size(20);
    group.bench_function("baseline_set_concurrent", |b| b.iter(|| runtime.block_on(join_all(agents.iter().map(set)))));
    group.bench_function("baseline_set_sequential", |b| {
        b.iter(|| {
            runtime.block_on(async {
                for agent in &agents {
                    set(agent).await;
                }
            })
        })
    });
    group.bench_function("session_alive_concurrent", |b| {
        b.iter(|| runtime.block_on(join_all(agents.iter().map(session_alive))))
    });
    group.bench_function("session_alive_sequential", |b| {
        b.iter(|| {
            runtime.block_on(async {
                for agent in &agents {
                    session_alive(agent).await;
                }
            })
        })
    });
    group.bench_function("signed_in_concurrent", |b| {
        b.iter(|| runtime.block_on(join_all(agents.iter().map(signed_in))))
    });
    group.bench_function("signed_in_sequential", |b| {
        b.iter(|| {
            runtime.block_on(async {
                for agent in &agents {
                    signed_in(agent).await;
                }
            })
        })
    });
    group.finish();
}

criterion_group!(benches, presence_writes);
criterion_main!(benches);
