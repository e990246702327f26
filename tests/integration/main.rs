//! One integration test binary: flatdns in-process on port 0 next to a scripted mock upstream.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod alias;
mod binary;
mod caching;
mod flattening;
mod forwarding;
mod harness;
mod operations;
mod tcp_limits;
