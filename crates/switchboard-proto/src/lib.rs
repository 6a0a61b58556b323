//! The service boundaries of Switchboard.
//!
//! - [`internal::v1`]: the protobuf code generated from `proto/switchboard/internal/v1` (committed, checked
//!   by `tests/codegen.rs`), for the gRPC services between gateway, router and store.
//! - [`public::v1`]: the same for `proto/switchboard/v1`, the public client API (`switchboard.v1.ChatService`,
//!   the WebSocket protocol of `docs/protocol.md` over gRPC), served by the gateway.
//! - [`store`]: the store service as a Rust trait over those messages, with its error enum. `serve` calls an
//!   in-process implementation; the split roles put gRPC behind the same trait.
//! - [`router`]: what a gateway asks of the router (start a chat, accept, send, subscribe...), as a Rust trait
//!   over domain types, and the pushes a router sends back to a gateway.
//! - [`convert`]: conversions between the protobuf records and the domain types.
//! - [`keyed_locks`]: async locks by key, which order the subscription changes of one thing on either side
//!   of [`router::RouterApi`].

pub mod convert;
pub mod keyed_locks;
pub mod router;
pub mod store;

#[allow(clippy::all, missing_docs)] // generated code
pub mod internal {
    pub mod v1 {
        include!("generated/switchboard.internal.v1.rs");

        /// The encoded descriptor set for gRPC reflection. It is one set for every proto of the workspace
        /// (the internal ones and the public `switchboard.v1`), the same bytes as
        /// [`crate::public::v1::FILE_DESCRIPTOR_SET`]: registering either describes both packages, and
        /// registering both is harmless (reflection keeps the first copy of each file).
        pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!("generated/descriptor.bin");
    }
}

#[allow(clippy::all, missing_docs)] // generated code
pub mod public {
    pub mod v1 {
        include!("generated/switchboard.v1.rs");

        /// The encoded descriptor set for gRPC reflection: the same shared set as
        /// [`crate::internal::v1::FILE_DESCRIPTOR_SET`], which describes `switchboard.v1` too.
        pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!("generated/descriptor.bin");
    }
}
