//! Integration tests of the npm format: requests as npm CLI 11 sends them (bodies from
//! `tests/fixtures/`), driven in-process through `NpmFormat` against a `MemRegistry`.

// Helpers: the registry, fixtures, request builders.
mod support;
// Publishing: scoped, unscoped, validation failures, duplicates.
mod publish;
// Streamed publish bodies: 64 MiB in bounded memory, odd frames, refused shapes.
mod streaming;
// Packuments (full, abbreviated), tarballs, ETag/304, HEAD.
mod read;
// Dist-tags, deprecate, unpublish.
mod writes;
// Paths, methods, small endpoints, the replayed CLI transcript, the core conformance suite.
mod routing;
