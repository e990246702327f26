//! Support code for `tests/interop.rs`: hand-built DNS messages, the real servers (BIND,
//! Unbound, flatdns) under drop guards, and the external client tools.

pub mod compliance;
pub mod dns;
pub mod procs;
pub mod tools;
