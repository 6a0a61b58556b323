//! [`StoreApi`] over gRPC: what routers (and gateways, for the placement) use in the split roles.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use async_trait::async_trait;
use switchboard_proto::internal::v1::store_service_client::StoreServiceClient;
use switchboard_proto::internal::v1::{
    AcquireShardsRequest, AcquireShardsResponse, AppendCall, AppendRequest, AppendResponse, AppendResult,
    CreateTicketRequest, CreateTicketResponse, GetConversationRequest, GetConversationResponse, GetLicenseRequest,
    GetPlacementRequest, License, ListConversationsRequest, ListConversationsResponse, ListTicketsRequest,
    ListTicketsResponse, Placement, ReadEventsRequest, ReadEventsResponse, RegisterNodeRequest, RegisterNodeResponse,
    ReleaseShardsRequest, ReleaseShardsResponse, RenewShardsRequest, RenewShardsResponse, SetLicenseLimitRequest,
};
use switchboard_proto::store::{StoreApi, StoreError};
use tokio_stream::Stream;
use tonic::Streaming;
use tonic::transport::Channel;

use crate::call_stream::{Attempt, CallStream, Open, append_call};
use crate::channel::{ClientSettings, MAX_MESSAGE_BYTES, lazy_channel, unary};
use crate::error::{ERROR_CODE, store_error_from_status};

/// A store reached over gRPC.
///
/// The channel connects on first use and reconnects by itself, so a store that starts after its client,
/// or restarts, is reached again by the same `GrpcStore`; meanwhile calls fail fast with the retryable
/// [`StoreError::Unavailable`]. Every call has the request timeout of [`ClientSettings`]; a call that
/// times out is `Unavailable` too (the write may or may not have committed, as with any store failure).
/// Cloning is cheap and shares the connection.
#[derive(Clone)]
pub struct GrpcStore {
    url: Arc<str>,
    client: StoreServiceClient<Channel>,
    settings: ClientSettings,
    /// `append`, the call of every message, goes on this stream (the unary `Append` is the fallback for a
    /// store that does not know it). Shared by the clones.
    appends: Arc<CallStream<AppendCall, AppendResult>>,
}

impl std::fmt::Debug for GrpcStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrpcStore").field("url", &self.url).finish_non_exhaustive()
    }
}

impl GrpcStore {
    /// A client of the store at `url` (`http://host:port`); nothing is connected until the first call.
    pub fn connect_lazy(url: &str, settings: ClientSettings) -> Result<Self, StoreError> {
        let channel = lazy_channel(url, &settings).map_err(StoreError::Invalid)?;
        Ok(Self::from_channel(url, channel, settings))
    }

    /// A client over a channel built elsewhere (`url` only names it in errors and logs).
    pub fn from_channel(url: &str, channel: Channel, settings: ClientSettings) -> Self {
        let client = StoreServiceClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        let opener = client.clone();
        let open: Open<AppendCall, AppendResult> = Arc::new(move |calls| {
            let mut client = opener.clone();
            Box::pin(async move { client.appends(calls).await.map(tonic::Response::into_inner) })
        });
        let appends = Arc::new(CallStream::new("Appends", settings.request_timeout, open));
        GrpcStore { url: url.into(), client, settings, appends }
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// The placement now, then again every time it changes, until the stream fails or the server ends it
    /// (an error is the last item). Opening it is bounded by the request timeout; the stream is not.
    pub async fn watch_placement(&self) -> Result<PlacementStream, StoreError> {
        let mut client = self.client.clone();
        let open = async move { client.watch_placement(GetPlacementRequest {}).await };
        let streaming = match tokio::time::timeout(self.settings.request_timeout, open).await {
            Ok(result) => result.map_err(|status| store_error_from_status(&status))?.into_inner(),
            Err(_) => {
                let timeout = self.settings.request_timeout;
                return Err(StoreError::Unavailable(format!("{}: no answer within {timeout:?}", self.url)));
            }
        };
        Ok(PlacementStream { inner: streaming, done: false })
    }

    async fn call<M, R, F, Fut>(&self, message: M, call: F) -> Result<R, StoreError>
    where
        F: FnOnce(StoreServiceClient<Channel>, tonic::Request<M>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<R>, tonic::Status>>,
    {
        let client = self.client.clone();
        unary(self.settings.request_timeout, message, |request| call(client, request))
            .await
            .map_err(|status| self.error_from(&status))
    }

    fn error_from(&self, status: &tonic::Status) -> StoreError {
        match store_error_from_status(status) {
            // A transport failure says which server it could not reach; the server's own errors are kept as
            // they were raised.
            StoreError::Unavailable(text) if !status.metadata().contains_key(ERROR_CODE) => {
                StoreError::Unavailable(format!("{}: {text}", self.url))
            }
            other => other,
        }
    }
}

/// The placements of a `WatchPlacement` stream. After an error, which is its last item, it ends.
pub struct PlacementStream {
    inner: Streaming<Placement>,
    done: bool,
}

impl std::fmt::Debug for PlacementStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PlacementStream").field("done", &self.done).finish_non_exhaustive()
    }
}

impl Stream for PlacementStream {
    type Item = Result<Placement, StoreError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.done {
            return Poll::Ready(None);
        }
        match Pin::new(&mut self.inner).poll_next(cx) {
            Poll::Ready(Some(Ok(placement))) => Poll::Ready(Some(Ok(placement))),
            Poll::Ready(Some(Err(status))) => {
                self.done = true;
                Poll::Ready(Some(Err(store_error_from_status(&status))))
            }
            Poll::Ready(None) => {
                self.done = true;
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

#[async_trait]
impl StoreApi for GrpcStore {
    async fn acquire_shards(&self, request: AcquireShardsRequest) -> Result<AcquireShardsResponse, StoreError> {
        self.call(request, |mut client, request| async move { client.acquire_shards(request).await }).await
    }

    async fn renew_shards(&self, request: RenewShardsRequest) -> Result<RenewShardsResponse, StoreError> {
        self.call(request, |mut client, request| async move { client.renew_shards(request).await }).await
    }

    async fn append(&self, request: AppendRequest) -> Result<AppendResponse, StoreError> {
        match self.appends.call_or_unary(self.settings.request_timeout, request, append_call).await {
            Attempt::Answered(outcome) => outcome.map_err(|status| self.error_from(&status)),
            Attempt::Unary(request) => {
                self.call(request, |mut client, request| async move { client.append(request).await }).await
            }
        }
    }

    async fn read_events(&self, request: ReadEventsRequest) -> Result<ReadEventsResponse, StoreError> {
        self.call(request, |mut client, request| async move { client.read_events(request).await }).await
    }

    async fn get_conversation(&self, request: GetConversationRequest) -> Result<GetConversationResponse, StoreError> {
        self.call(request, |mut client, request| async move { client.get_conversation(request).await }).await
    }

    async fn list_conversations(
        &self,
        request: ListConversationsRequest,
    ) -> Result<ListConversationsResponse, StoreError> {
        self.call(request, |mut client, request| async move { client.list_conversations(request).await }).await
    }

    async fn release_shards(&self, request: ReleaseShardsRequest) -> Result<ReleaseShardsResponse, StoreError> {
        self.call(request, |mut client, request| async move { client.release_shards(request).await }).await
    }

    async fn register_node(&self, request: RegisterNodeRequest) -> Result<RegisterNodeResponse, StoreError> {
        self.call(request, |mut client, request| async move { client.register_node(request).await }).await
    }

    async fn get_placement(&self, request: GetPlacementRequest) -> Result<Placement, StoreError> {
        self.call(request, |mut client, request| async move { client.get_placement(request).await }).await
    }

    async fn get_license(&self, request: GetLicenseRequest) -> Result<License, StoreError> {
        self.call(request, |mut client, request| async move { client.get_license(request).await }).await
    }

    async fn set_license_limit(&self, request: SetLicenseLimitRequest) -> Result<License, StoreError> {
        self.call(request, |mut client, request| async move { client.set_license_limit(request).await }).await
    }

    async fn create_ticket(&self, request: CreateTicketRequest) -> Result<CreateTicketResponse, StoreError> {
        self.call(request, |mut client, request| async move { client.create_ticket(request).await }).await
    }

    async fn list_tickets(&self, request: ListTicketsRequest) -> Result<ListTicketsResponse, StoreError> {
        self.call(request, |mut client, request| async move { client.list_tickets(request).await }).await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use switchboard_domain::FixedClock;
    use switchboard_store::MemoryStore;

    use super::*;
    use crate::{GrpcServices, ServerSettings, StoreGrpcServer, serve_grpc};

    #[tokio::test]
    async fn once_the_stream_has_opened_appends_keep_no_copy_for_the_fallback() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let store = Arc::new(MemoryStore::new(Arc::new(FixedClock::new(1_700_000_000_000))));
        let mut services = GrpcServices::new();
        services.add_service(StoreGrpcServer::new(store).into_service());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(async move {
            serve_grpc(listener, services, &ServerSettings::default(), async {
                let _ = stopped.await;
            })
            .await
        });
        let client = GrpcStore::connect_lazy(&url, ClientSettings::default()).unwrap();
        assert!(!client.appends.known_supported());
        // No fence: the store refuses it, through the stream, which opened.
        let error = client.append(AppendRequest::default()).await.unwrap_err();
        assert!(matches!(error, StoreError::Invalid(_)), "{error:?}");
        assert!(client.appends.known_supported());
        assert!(client.appends.supported());
        drop(client);
        let _ = stop.send(());
        server.await.unwrap().unwrap();
    }
}
