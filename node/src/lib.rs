//! granary-node: one Granary node — HTTP front, CodeArtifact API, authentication, Raft
//! metadata, RocksDB storage, repository actors — and [`run`], which starts and stops it.
//!
//! ```text
//!  client ─HTTP─▶ http (hyper) ─▶ auth (SigV4 | token) ─┬─▶ api    (/v1/…, CodeArtifact)
//!                                                       └─▶ formats (/npm/{domain}/{repo}/…)
//!                                                              │ via registry (the Registry port)
//!        reads ─▶ state::StateView (RocksDB)     blobs ─▶ store::blob (RocksDB, chunked)
//!        writes ─▶ actors::RepositoryActor ─▶ raft (openraft) ─▶ state::apply on every node
//!        misses ─▶ upstream (chain walk, public registries, one fetch per miss)
//!  peers ─gRPC─▶ grpc (Raft traffic, status)
//! ```
//!
//! The node depends on every other Granary crate; none of them depends on it.

mod actors;
mod api;
mod auth;
pub mod cli;
mod cluster;
pub mod config;
mod docs;
pub mod faults;
mod grpc;
mod http;
mod last_seen;
pub mod limits;
pub mod logging;
mod metrics;
mod node;
pub mod raft;
mod registry;
pub mod state;
pub mod store;
mod upstream;

/// An error with its causes, as one line (`error sending request: … invalid peer
/// certificate: …`): HTTP clients name only the stage that failed.
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cur = c.source();
    }
    text
}

pub use config::Config;
pub use node::{Embedded, Error, Node, run, run_embedded};
