//! The integration suite: one binary, real `cluster` processes on loopback.

mod errors;
mod harness;
mod operate;
mod raft;
mod releases;
mod rollout;
