//! The integration suite: one binary, real `cluster` processes on loopback.

mod attacks;
mod boot_guard;
mod errors;
mod faults;
mod gates;
mod harness;
mod members;
mod operate;
mod raft;
mod releases;
mod rollout;
mod services;
mod signing;
mod systemd;
mod tools;
