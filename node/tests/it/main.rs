//! Integration tests of the `granary` binary, driven as users drive it: real processes,
//! real HTTP, the real AWS CLI and npm where installed (required under `CI=true`). API
//! requests are signed with AWS's own `aws-sigv4`, an oracle independent of the server's.

/// Starting and stopping `granary` processes; signed API calls; tool discovery.
mod harness;

/// The CodeArtifact API: shapes, errors and validation, with signed requests.
mod api;
/// Bad input on every surface: clear 4xx errors, nothing changed.
mod bad_input;
/// The command line: defaults, config errors, first-start credentials.
mod cli;
/// Peer traffic: the cluster secret and mutual TLS.
mod cluster_security;
/// SIGKILL during a publish burst: every acknowledged publish survives a restart.
mod crash_restart;
/// Three nodes in this process, peer links through seeded faults (isolate, drop, delay).
mod inproc;
/// The AWS CLI configures npm; npm publishes and installs (issue #2's walk-through).
mod npm_awscli;
/// More writes at once than a node takes: turned away retryably, before any work.
mod overload;
/// The shipped multi-region configuration, six nodes in this process with cross-region
/// round trips: a steady leader, a lost region, convergence.
mod regions;
/// Upstreams, external connections and origin controls through the AWS CLI.
mod upstream_api;
