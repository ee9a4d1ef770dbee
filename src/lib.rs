//! `cluster`: a Raft-replicated rolling-update orchestrator.
//!
//! Every node runs one binary containing an openraft node and an agent. Module map
//! (see ARCHITECTURE.md for the invariants):
//!
//! - [`cli`]: clap definitions, validated configuration, commands; the only place that prints.
//! - [`node`]: composition root of a running node; the Control operations it serves and
//!   the `Cluster` the rollout runtime drives.
//! - [`raft`]: openraft glue: types, the gRPC network, configuration, replication view.
//! - [`raft_store`]: Raft storage on sled: log store and state machine (the only module that sees sled).
//! - [`state`]: the replicated data model and its pure `apply`.
//! - [`rpc`]: gRPC servers, client and channel pool (the only module that sees prost/tonic).
//! - [`agent`]: what a node does with releases on its disk: hold, serve, materialize.
//! - [`api`]: the services' requests, replies and errors as domain types (the wire and
//!   `--json` schema), shared by server, client and CLI.
//! - [`clock`]: the wall clock, for timestamps people read.
//! - [`error`]: an error with its causes on one line, for people, logs and wire messages.
//! - [`fs`]: crash-safe filesystem helpers: atomic writes and symlink swaps, syncs, tree removal.
//! - [`tls`]: the cluster CA, certificates that carry an identity (node, operator, viewer),
//!   and credentials directories; no network code.
//! - [`supervise`]: the restart loop for hosts without systemd (and for tests).
//! - [`release`]: releases: manifest and build hash, directory scan, version.json, release
//!   signatures and key files, the release store, staging and sync, with their errors.
//! - [`service`]: the operator's own services: definitions (`service.toml`), the ingress
//!   sockets a node holds across its restarts, instances, blue/green cutover.
//! - [`rollout`]: the rolling update: its pure core (preflight, plan, engine, automatic
//!   decisions: no I/O) and the runtime that carries it out through [`rollout::Cluster`].

pub mod agent;
pub mod api;
pub mod cli;
pub mod clock;
pub mod crash;
pub mod error;
pub mod fs;
pub mod logs;
pub mod metrics;
pub mod node;
pub mod notify;
pub mod raft;
pub mod raft_store;
pub mod release;
pub mod rollout;
pub mod rpc;
pub mod service;
pub mod state;
pub mod supervise;
pub mod tls;
