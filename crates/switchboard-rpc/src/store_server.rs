//! A [`StoreApi`] served as the generated `StoreService`.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use switchboard_proto::internal::v1::store_service_server::{StoreService, StoreServiceServer};
use switchboard_proto::internal::v1::{
    AcquireShardsRequest, AcquireShardsResponse, AppendCall, AppendRequest, AppendResponse, AppendResult,
    CreateTicketRequest, CreateTicketResponse, GetConversationRequest, GetConversationResponse, GetLicenseRequest,
    GetPlacementRequest, License, ListConversationsRequest, ListConversationsResponse, ListTicketsRequest,
    ListTicketsResponse, Placement, ReadEventsRequest, ReadEventsResponse, RegisterNodeRequest, RegisterNodeResponse,
    ReleaseShardsRequest, ReleaseShardsResponse, RenewShardsRequest, RenewShardsResponse, SetLicenseLimitRequest,
};
use switchboard_proto::store::{StoreApi, StoreError};
use switchboard_telemetry::serve_streamed_call;
use tokio::sync::{mpsc, watch};
use tokio::time::MissedTickBehavior;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::debug;

use crate::call_stream::{append_result, serve_call_stream, within_deadline};
use crate::channel::MAX_MESSAGE_BYTES;
use crate::error::status_from_store_error;
use crate::serve::Draining;

/// How often a `WatchPlacement` stream polls the placement by default.
const DEFAULT_POLL_EVERY: Duration = Duration::from_millis(500);

/// Serves a store (the SQL store in the `store` role) to routers and gateways.
///
/// `WatchPlacement` sends the placement at once, then again whenever it changed: checked every poll
/// interval (leases expire on the database's clock without any call) and right after every acquire,
/// renew, release or register this server handled. It sends only what differs from what it sent last,
/// compared on what placement is for (each shard's owner and epoch, each node's id and address), not on
/// the nodes' expiry times, which move at every heartbeat.
pub struct StoreGrpcServer {
    store: Arc<dyn StoreApi>,
    /// Bumped after every call that may have changed the placement.
    changed: watch::Sender<u64>,
    poll_every: Duration,
    draining: Draining,
}

impl std::fmt::Debug for StoreGrpcServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreGrpcServer").field("poll_every", &self.poll_every).finish_non_exhaustive()
    }
}

impl StoreGrpcServer {
    pub fn new(store: Arc<dyn StoreApi>) -> Self {
        StoreGrpcServer {
            store,
            changed: watch::channel(0).0,
            poll_every: DEFAULT_POLL_EVERY,
            draining: Draining::never(),
        }
    }

    /// How often `WatchPlacement` streams poll the placement (default 500 ms).
    pub fn with_poll_interval(mut self, every: Duration) -> Self {
        self.poll_every = every.max(Duration::from_millis(1));
        self
    }

    /// Ends every `WatchPlacement` stream when the server drains (see [`crate::GrpcServices::draining`]), so
    /// that a graceful shutdown does not wait for them.
    pub fn with_draining(mut self, draining: Draining) -> Self {
        self.draining = draining;
        self
    }

    /// The generated service, to add to [`crate::GrpcServices`].
    pub fn into_service(self) -> StoreServiceServer<Self> {
        StoreServiceServer::new(self)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }

    fn placement_may_have_changed(&self) {
        self.changed.send_modify(|version| *version = version.wrapping_add(1));
    }
}

fn answer<T>(result: Result<T, StoreError>) -> Result<Response<T>, Status> {
    result.map(Response::new).map_err(|error| status_from_store_error(&error))
}

/// Whether two placements place the same shards on the same nodes at the same addresses.
fn same_placement(a: &Placement, b: &Placement) -> bool {
    a.owners == b.owners
        && a.nodes.len() == b.nodes.len()
        && a.nodes.iter().zip(&b.nodes).all(|(a, b)| a.node_id == b.node_id && a.address == b.address)
}

/// The service's name in its calls' metrics and spans.
const STORE_SERVICE: &str = "switchboard.internal.v1.StoreService";

/// The stream of a `WatchPlacement` call.
pub type PlacementWatch = ReceiverStream<Result<Placement, Status>>;

#[async_trait]
impl StoreService for StoreGrpcServer {
    async fn acquire_shards(
        &self,
        request: Request<AcquireShardsRequest>,
    ) -> Result<Response<AcquireShardsResponse>, Status> {
        let result = self.store.acquire_shards(request.into_inner()).await;
        self.placement_may_have_changed();
        answer(result)
    }

    async fn renew_shards(
        &self,
        request: Request<RenewShardsRequest>,
    ) -> Result<Response<RenewShardsResponse>, Status> {
        let result = self.store.renew_shards(request.into_inner()).await;
        self.placement_may_have_changed();
        answer(result)
    }

    async fn append(&self, request: Request<AppendRequest>) -> Result<Response<AppendResponse>, Status> {
        answer(self.store.append(request.into_inner()).await)
    }

    type AppendsStream = ReceiverStream<Result<AppendResult, Status>>;

    async fn appends(&self, request: Request<Streaming<AppendCall>>) -> Result<Response<Self::AppendsStream>, Status> {
        let store = self.store.clone();
        let results = serve_call_stream(request.into_inner(), self.draining.clone(), move |call: AppendCall| {
            let store = store.clone();
            async move {
                let context = call.context.unwrap_or_default();
                let request = call.request.unwrap_or_default();
                let append = async { store.append(request).await.map_err(|error| status_from_store_error(&error)) };
                let append = within_deadline(&context, append);
                let outcome =
                    serve_streamed_call(STORE_SERVICE, "Append", &context.traceparent, context.received_at_us, append)
                        .await;
                append_result(call.id, outcome)
            }
        });
        Ok(Response::new(results))
    }

    async fn read_events(&self, request: Request<ReadEventsRequest>) -> Result<Response<ReadEventsResponse>, Status> {
        answer(self.store.read_events(request.into_inner()).await)
    }

    async fn get_conversation(
        &self,
        request: Request<GetConversationRequest>,
    ) -> Result<Response<GetConversationResponse>, Status> {
        answer(self.store.get_conversation(request.into_inner()).await)
    }

    async fn list_conversations(
        &self,
        request: Request<ListConversationsRequest>,
    ) -> Result<Response<ListConversationsResponse>, Status> {
        answer(self.store.list_conversations(request.into_inner()).await)
    }

    async fn release_shards(
        &self,
        request: Request<ReleaseShardsRequest>,
    ) -> Result<Response<ReleaseShardsResponse>, Status> {
        let result = self.store.release_shards(request.into_inner()).await;
        self.placement_may_have_changed();
        answer(result)
    }

    async fn register_node(
        &self,
        request: Request<RegisterNodeRequest>,
    ) -> Result<Response<RegisterNodeResponse>, Status> {
        let result = self.store.register_node(request.into_inner()).await;
        self.placement_may_have_changed();
        answer(result)
    }

    async fn get_placement(&self, request: Request<GetPlacementRequest>) -> Result<Response<Placement>, Status> {
        answer(self.store.get_placement(request.into_inner()).await)
    }

    async fn get_license(&self, request: Request<GetLicenseRequest>) -> Result<Response<License>, Status> {
        answer(self.store.get_license(request.into_inner()).await)
    }

    async fn set_license_limit(&self, request: Request<SetLicenseLimitRequest>) -> Result<Response<License>, Status> {
        answer(self.store.set_license_limit(request.into_inner()).await)
    }

    async fn create_ticket(
        &self,
        request: Request<CreateTicketRequest>,
    ) -> Result<Response<CreateTicketResponse>, Status> {
        answer(self.store.create_ticket(request.into_inner()).await)
    }

    async fn list_tickets(
        &self,
        request: Request<ListTicketsRequest>,
    ) -> Result<Response<ListTicketsResponse>, Status> {
        answer(self.store.list_tickets(request.into_inner()).await)
    }

    type WatchPlacementStream = PlacementWatch;

    async fn watch_placement(&self, request: Request<GetPlacementRequest>) -> Result<Response<PlacementWatch>, Status> {
        let request = request.into_inner();
        // Subscribe before the first read, so that a change made during it is not missed.
        let mut changed = self.changed.subscribe();
        changed.borrow_and_update();
        // A store that cannot answer now fails the call: the caller polls or retries.
        let first = self.store.get_placement(request).await.map_err(|error| status_from_store_error(&error))?;
        let (sender, receiver) = mpsc::channel(2);
        sender.try_send(Ok(first.clone())).expect("a fresh channel has room");
        let watch = Watch {
            store: self.store.clone(),
            changed,
            poll_every: self.poll_every,
            draining: self.draining.clone(),
            sender,
            last: first,
        };
        tokio::spawn(watch.run());
        Ok(Response::new(ReceiverStream::new(receiver)))
    }
}

/// The task behind one `WatchPlacement` stream.
struct Watch {
    store: Arc<dyn StoreApi>,
    changed: watch::Receiver<u64>,
    poll_every: Duration,
    draining: Draining,
    sender: mpsc::Sender<Result<Placement, Status>>,
    last: Placement,
}

impl Watch {
    async fn run(mut self) {
        let start = tokio::time::Instant::now() + self.poll_every;
        let mut ticks = tokio::time::interval_at(start, self.poll_every);
        ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = self.sender.closed() => return,
                () = self.draining.wait() => return,
                _ = ticks.tick() => {}
                changed = self.changed.changed() => {
                    if changed.is_err() {
                        return; // the server is gone
                    }
                }
            }
            match self.store.get_placement(GetPlacementRequest {}).await {
                Ok(placement) if !same_placement(&placement, &self.last) => {
                    if self.sender.send(Ok(placement.clone())).await.is_err() {
                        return;
                    }
                    self.last = placement;
                }
                Ok(_) => {}
                // A store that cannot answer for a moment does not end the stream: the next poll retries.
                Err(error) => debug!(%error, "placement watch: the store did not answer"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use switchboard_proto::internal::v1::{NodeInfo, ShardOwner};

    use super::*;

    #[test]
    fn placements_differ_on_owners_and_addresses_not_on_expiry() {
        let node =
            |address: &str, expires_at_ms| NodeInfo { node_id: "n1".into(), address: address.into(), expires_at_ms };
        let owner = |epoch| ShardOwner { shard: 3, node_id: "n1".into(), epoch };
        let a = Placement { owners: vec![owner(1)], nodes: vec![node("http://a", 10)] };
        assert!(same_placement(&a, &Placement { nodes: vec![node("http://a", 20)], ..a.clone() }));
        assert!(!same_placement(&a, &Placement { nodes: vec![node("http://b", 10)], ..a.clone() }));
        assert!(!same_placement(&a, &Placement { owners: vec![owner(2)], ..a.clone() }));
        assert!(!same_placement(&a, &Placement { nodes: vec![], ..a.clone() }));
    }
}
