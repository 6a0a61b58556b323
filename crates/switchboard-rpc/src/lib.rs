//! gRPC behind the service traits of `switchboard-proto`, for the split roles (`switchboard store`,
//! `router`, `gateway`).
//!
//! In `serve` the gateway, router and store call each other in-process through [`StoreApi`],
//! [`RouterApi`] and [`PeerApi`]; here the very same traits are put on the wire:
//!
//! - [`StoreGrpcServer`] serves any `Arc<dyn StoreApi>` as the generated `StoreService`, and [`GrpcStore`]
//!   is a `StoreApi` that calls one over a lazily connected channel.
//! - [`RouterGrpcServer`] serves any `RouterApi + PeerApi` (a `Router`, or a cluster client) as the
//!   generated `RouterService`, and [`GrpcRouterNode`] is a `RouterApi + PeerApi` that calls *one* router
//!   node; [`GrpcRouterNode::open_push_stream`] is the primitive a cluster client reconnects with.
//! - [`error`] maps `StoreError` and `RouterError` to `tonic::Status` and back, losslessly for what callers
//!   branch on; a transport failure or a deadline always becomes the retryable `Unavailable`.
//! - [`convert`] maps the router's domain types to the `router.proto` messages and back; bad input from
//!   the wire is `INVALID_ARGUMENT`, never a panic.
//! - [`serve_grpc`] serves a set of services on a listener you bound, with TCP_NODELAY, HTTP/2 keepalive,
//!   the standard health service and reflection.
//!
//! [`StoreApi`]: switchboard_proto::store::StoreApi
//! [`RouterApi`]: switchboard_proto::router::RouterApi
//! [`PeerApi`]: switchboard_proto::router::PeerApi

mod call_stream;
mod channel;
pub mod cluster;
pub mod convert;
pub mod error;
mod router_client;
mod router_server;
mod serve;
mod store_client;
mod store_server;

pub use channel::ClientSettings;
pub use router_client::{GrpcRouterNode, PushLinkEvent, PushStream};
pub use router_server::{PushFrames, RouterGrpcServer};
pub use serve::{Draining, GrpcServices, Health, ServerSettings, serve_grpc};
pub use store_client::{GrpcStore, PlacementStream};
pub use store_server::{PlacementWatch, StoreGrpcServer};
