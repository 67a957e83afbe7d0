//! gRPC services spoken between Granary nodes (`proto/granary.proto`).
//!
//! This crate depends on no other crate of Granary: the node converts its own types to and
//! from these messages. Raft payloads are opaque bytes serialized by the node, so openraft's
//! types never appear here.

/// Generated protobuf messages and tonic clients and servers.
#[allow(missing_docs, unreachable_pub, clippy::all)]
pub mod pb {
    tonic::include_proto!("granary.v1");
}
