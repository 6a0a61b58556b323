//! One gRPC hop on loopback, Switchboard's against a bare tonic call in the same run: the hop every message
//! makes twice in the split cluster (gateway → router, router → store) and back.
//!
//! One server on a loopback port serves both: Switchboard's store service over an in-memory store, and
//! tonic-health (generated code, no work in the handler: the bare baseline). One iteration is 64 calls:
//! - `switchboard_concurrent` / `switchboard_sequential`: 64 `StoreApi::append`s of one message each to 64
//!   conversations through the store's gRPC client ([`GrpcStore`]: the calls go as frames on one
//!   long-lived call stream), at once and one after the other;
//! - `unary_append_concurrent` / `unary_append_sequential`: the same appends as unary
//!   `StoreService/Append` calls (an HTTP/2 stream each) through the generated client: the same server work
//!   and messages, without the call stream;
//! - `baseline_unary_concurrent` / `baseline_unary_sequential`: 64 bare unary `grpc.health.v1.Health/Check`
//!   calls on one connection (an HTTP/2 stream each), at once and one after the other;
//! - `in_process_append_sequential`: the appends on the in-memory store itself, what the server does.
//!
//! The appends are the same 64 messages each iteration, answered as the duplicates they are after the first.
//! The Switchboard side carries more (an append request and its stored events, ~200 bytes each way, against
//! a few bytes) and does more (the in-memory store's append: fence, deduplication, sequence): the ratio is an
//! upper bound of what the call stream costs over a bare call. Criterion reports the time of 64 calls and,
//! from the throughput, calls per second.

mod common;

use std::sync::Arc;

use common::{APPENDS, START_MS, requests, runtime};
use criterion::{Criterion, SamplingMode, Throughput, criterion_group, criterion_main};
use futures_util::future::join_all;
use switchboard_domain::FixedClock;
use switchboard_proto::internal::v1::AppendRequest;
use switchboard_proto::internal::v1::store_service_client::StoreServiceClient;
use switchboard_proto::store::StoreApi;
use switchboard_rpc::{ClientSettings, GrpcStore, StoreGrpcServer};
use switchboard_store::MemoryStore;
use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Channel, Endpoint, Server};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

/// Serves the store (over `store`) and tonic-health on a loopback port, with `TCP_NODELAY` as the roles do
/// (`serve_grpc`); answers its URL.
async fn serve(store: Arc<MemoryStore>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (_reporter, health) = tonic_health::server::health_reporter();
    let store = StoreGrpcServer::new(store).into_service();
    let routes = Server::builder().add_service(health).add_service(store);
    tokio::spawn(routes.serve_with_incoming(TcpIncoming::from(listener).with_nodelay(Some(true))));
    url
}

async fn channel(url: &str) -> Channel {
    Endpoint::from_shared(url.to_owned()).unwrap().tcp_nodelay(true).connect().await.unwrap()
}

fn grpc_hops(c: &mut Criterion) {
    let runtime = runtime();
    let memory = Arc::new(MemoryStore::new(Arc::new(FixedClock::new(START_MS))));
    let (store, health, unary, fences) = runtime.block_on(async {
        let url = serve(memory.clone()).await;
        let fences = common::conversations(memory.as_ref()).await;
        let store = GrpcStore::from_channel(&url, channel(&url).await, ClientSettings::default());
        let health = HealthClient::new(channel(&url).await);
        let unary = StoreServiceClient::new(channel(&url).await);
        (store, health, unary, fences)
    });
    // Every iteration sends the same 64 messages again, each answered as the duplicate it is (the message as
    // stored): the store's work stays the same from one iteration to the next (the in-memory store looks for
    // a message id through the conversation's log, which a fresh message each time would lengthen).
    let resends = requests(&fences, 0);
    runtime.block_on(async {
        for request in resends.clone() {
            assert!(!memory.append(request).await.unwrap().duplicate);
        }
    });
    let check = |mut health: HealthClient<Channel>| async move {
        let request = HealthCheckRequest { service: String::new() };
        assert_eq!(health.check(request).await.unwrap().into_inner().status, 1, "SERVING");
    };

    let append = |mut client: StoreServiceClient<Channel>, request: AppendRequest| async move {
        assert!(client.append(request).await.unwrap().into_inner().duplicate);
    };

    let mut group = c.benchmark_group("grpc_hop_64");
    group.throughput(Throughput::Elements(APPENDS as u64));
    group.sampling_mode(SamplingMode::Flat).sample_size(20);
    group.bench_function("baseline_unary_concurrent", |b| {
        b.iter(|| runtime.block_on(join_all((0..APPENDS).map(|_| check(health.clone())))))
    });
    group.bench_function("baseline_unary_sequential", |b| {
        b.iter(|| {
            runtime.block_on(async {
                for _ in 0..APPENDS {
                    check(health.clone()).await;
                }
            })
        })
    });
    group.bench_function("in_process_append_sequential", |b| {
        b.iter(|| {
            let requests = resends.clone();
            runtime.block_on(async {
                for request in requests {
                    assert!(memory.append(request).await.unwrap().duplicate);
                }
            })
        })
    });
    group.bench_function("unary_append_concurrent", |b| {
        b.iter(|| {
            let requests = resends.clone();
            runtime.block_on(join_all(requests.into_iter().map(|request| append(unary.clone(), request))))
        })
    });
    group.bench_function("unary_append_sequential", |b| {
        b.iter(|| {
            let requests = resends.clone();
            runtime.block_on(async {
                for request in requests {
                    append(unary.clone(), request).await;
                }
            })
        })
    });
    group.bench_function("switchboard_concurrent", |b| {
        b.iter(|| {
            let requests = resends.clone();
            runtime.block_on(async {
                for response in join_all(requests.into_iter().map(|request| store.append(request))).await {
                    assert!(response.unwrap().duplicate);
                }
            })
        })
    });
    group.bench_function("switchboard_sequential", |b| {
        b.iter(|| {
            let requests = resends.clone();
            runtime.block_on(async {
                for request in requests {
                    assert!(store.append(request).await.unwrap().duplicate);
                }
            })
        })
    });
    group.finish();
}

criterion_group!(benches, grpc_hops);
criterion_main!(benches);
