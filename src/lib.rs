//! `cluster`: a Raft-replicated rolling-update orchestrator.
//!
//! Every node runs one binary containing an openraft node and an agent. Module map
//! (see ARCHITECTURE.md for the invariants):
//!
//! - [`cli`]: clap definitions, validated configuration, commands; the only place that prints.
//! - [`node`]: composition root of a running node; the Control operations it serves.
//! - [`raft`]: openraft glue: types, the gRPC network, configuration, replication view.
//! - [`raft_store`]: Raft storage on sled: log store and state machine (the only module that sees sled).
//! - [`state`]: the replicated data model and its pure `apply`.
//! - [`rpc`]: gRPC servers, client and channel pool (the only module that sees prost/tonic).
//! - [`agent`]: what a node does with releases on its disk: hold, serve, materialize.
//! - [`api`]: the Control service's domain types, shared by server, client and CLI.
//! - [`clock`]: the wall clock in unix milliseconds, for records operators read.
//! - [`supervise`]: the restart loop for hosts without systemd (and for tests).
//! - [`release`]: releases: manifest and build hash, directory scan, version.json.
//! - [`rollout`]: the rolling update's pure core: preflight, plan, engine (no I/O).

pub mod agent;
pub mod api;
pub mod cli;
pub mod clock;
pub mod node;
pub mod raft;
pub mod raft_store;
pub mod release;
pub mod rollout;
pub mod rpc;
pub mod state;
pub mod supervise;
