//! The service boundaries of Switchboard.
//!
//! - [`internal::v1`]: the protobuf code generated from `proto/switchboard/internal/v1` (committed, checked
//!   by `tests/codegen.rs`), for the gRPC services between gateway, router and store.
//! - [`store`]: the store service as a Rust trait over those messages, with its error enum. `serve` calls an
//!   in-process implementation; the split roles put gRPC behind the same trait.
//! - [`router`]: what a gateway asks of the router (start a chat, accept, send, subscribe...), as a Rust trait
//!   over domain types, and the pushes a router sends back to a gateway.
//! - [`convert`]: conversions between the protobuf records and the domain types.

pub mod convert;
pub mod router;
pub mod store;

#[allow(clippy::all, missing_docs)] // generated code
pub mod internal {
    pub mod v1 {
        include!("generated/switchboard.internal.v1.rs");

        /// The encoded descriptor set of every internal proto, for gRPC reflection.
        pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!("generated/descriptor.bin");
    }
}
