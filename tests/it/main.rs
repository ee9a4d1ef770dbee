//! The integration suite: one binary, real `cluster` processes on loopback.

mod attacks;
mod boot_guard;
mod errors;
mod faults;
mod harness;
mod members;
mod operate;
mod progressive;
mod raft;
mod releases;
mod rollout;
mod services;
mod signing;
mod systemd;
mod tools;
mod topology;
