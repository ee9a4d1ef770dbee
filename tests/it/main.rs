//! The integration suite: one binary, real `cluster` processes on loopback.

mod errors;
mod harness;
mod raft;
mod releases;
mod rollout;
