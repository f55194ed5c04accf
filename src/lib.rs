//! The esq gRPC API: the code generated from `proto/`, the descriptor set that reflection
//! serves, and conversions between the wire types and the domain types of `esq-domain`.
//!
//! This crate owns every proto <-> domain conversion, so services stay thin and every client
//! (tests, the CLI) speaks the same types. It does no IO.

pub mod convert;

/// Generated code of the `esq.*` proto packages.
#[allow(missing_docs, clippy::all)]
pub mod pb {
    /// `esq.v1`: the event store, the generic state queries and the projections' operator API.
    pub mod v1 {
        tonic::include_proto!("esq.v1");
    }
    /// `esq.cart.v1`: cart commands and queries.
    pub mod cart {
        /// Version 1.
        pub mod v1 {
            tonic::include_proto!("esq.cart.v1");
        }
    }
    /// `esq.bookshop.v1`: book commands and queries.
    pub mod bookshop {
        /// Version 1.
        pub mod v1 {
            tonic::include_proto!("esq.bookshop.v1");
        }
    }
}

/// The encoded `FileDescriptorSet` of every esq proto, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/esq_descriptor.bin"));
