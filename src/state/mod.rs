//! The replicated data model: what every member agrees on, and how commands change it.
//!
//! Architecture invariant: this module does no I/O. `State::apply` is a pure function
//! of the state and a command; the store persists the records it reports as touched.
//!
//! Compatibility: log entries carry `Command`s as JSON, and binaries of two releases
//! read each other's entries during a rollout. Fields are `#[serde(default)]`; a new
//! command kind is only proposed once every member reports a `protocol` that knows it.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// The protocol number this binary speaks: the set of command kinds it can apply.
pub const PROTOCOL: u32 = 1;

/// What a node reports about itself when it starts.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(default)]
pub struct NodeInfo {
    /// Address other members and clients reach the node at.
    pub addr: String,
    /// Build hash of the running binary (from its release's version.json), or "dev".
    pub build_hash: String,
    /// Which command kinds the node's binary understands.
    pub protocol: u32,
    /// Random per process start: a changed boot id means the node restarted.
    pub boot_id: String,
    /// Wall-clock start time of the process (unix ms), for operators only: never
    /// compared across machines for decisions.
    pub started_at_ms: u64,
}

/// A change to the replicated state. Applied in log order on every member.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Command {
    /// Names the cluster once, when it is first bootstrapped; later proposals are no-ops.
    InitCluster {
        cluster_id: String,
    },
    /// A node's self-report at start; replaces its previous report.
    RegisterNode {
        id: u64,
        info: NodeInfo,
    },
    KvPut {
        key: String,
        value: String,
    },
    KvDelete {
        key: String,
    },
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Command::InitCluster { cluster_id } => write!(f, "init-cluster {cluster_id}"),
            Command::RegisterNode { id, info } => {
                write!(f, "register-node {id} {} {}", info.addr, info.build_hash)
            }
            Command::KvPut { key, .. } => write!(f, "kv-put {key}"),
            Command::KvDelete { key } => write!(f, "kv-delete {key}"),
        }
    }
}

/// The result of applying one command.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Response {
    #[default]
    Ok,
    /// The command was valid Raft-wise but the state refused it (e.g. a stale generation).
    Rejected { reason: String },
}

/// A unit of persistence: the store writes exactly the records `apply` reports as touched.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Record {
    ClusterId,
    Node(u64),
    Kv(String),
}

/// The whole replicated state. `deployment` and `history` join it with the rollout.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(default)]
pub struct State {
    /// Random id chosen at bootstrap: a node of another cluster cannot join this one.
    pub cluster_id: String,
    pub nodes: BTreeMap<u64, NodeInfo>,
    pub kv: BTreeMap<String, String>,
}

impl State {
    /// Applies `command`, returning its response and the records it changed.
    pub fn apply(&mut self, command: &Command) -> (Response, Vec<Record>) {
        match command {
            Command::InitCluster { cluster_id } => {
                if !self.cluster_id.is_empty() {
                    return (Response::Ok, vec![]);
                }
                self.cluster_id = cluster_id.clone();
                (Response::Ok, vec![Record::ClusterId])
            }
            Command::RegisterNode { id, info } => {
                self.nodes.insert(*id, info.clone());
                (Response::Ok, vec![Record::Node(*id)])
            }
            Command::KvPut { key, value } => {
                self.kv.insert(key.clone(), value.clone());
                (Response::Ok, vec![Record::Kv(key.clone())])
            }
            Command::KvDelete { key } => {
                if self.kv.remove(key).is_none() {
                    return (Response::Ok, vec![]);
                }
                (Response::Ok, vec![Record::Kv(key.clone())])
            }
        }
    }

    /// The JSON value of `record`, or `None` when it no longer exists.
    pub fn record_value(&self, record: &Record) -> Option<serde_json::Value> {
        match record {
            Record::ClusterId => Some(serde_json::Value::String(self.cluster_id.clone())),
            Record::Node(id) => self.nodes.get(id).map(|n| serde_json::to_value(n).ok())?,
            Record::Kv(key) => self.kv.get(key).cloned().map(serde_json::Value::String),
        }
    }

    /// Every record of the state, for writing a whole snapshot.
    pub fn records(&self) -> Vec<Record> {
        let mut all = vec![Record::ClusterId];
        all.extend(self.nodes.keys().map(|id| Record::Node(*id)));
        all.extend(self.kv.keys().map(|k| Record::Kv(k.clone())));
        all
    }

    /// Restores one record read back from storage.
    pub fn load_record(
        &mut self,
        record: Record,
        value: serde_json::Value,
    ) -> Result<(), serde_json::Error> {
        match record {
            Record::ClusterId => self.cluster_id = serde_json::from_value(value)?,
            Record::Node(id) => {
                self.nodes.insert(id, serde_json::from_value(value)?);
            }
            Record::Kv(key) => {
                self.kv.insert(key, serde_json::from_value(value)?);
            }
        }
        Ok(())
    }

    /// The lowest protocol any registered member speaks: gate new command kinds on it.
    pub fn min_protocol(&self) -> Option<u32> {
        self.nodes.values().map(|n| n.protocol).min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(addr: &str) -> NodeInfo {
        NodeInfo {
            addr: addr.into(),
            build_hash: "dev".into(),
            protocol: PROTOCOL,
            boot_id: "b".into(),
            started_at_ms: 1,
        }
    }

    #[test]
    fn apply_table() {
        struct Case {
            name: &'static str,
            before: State,
            command: Command,
            touched: Vec<Record>,
            check: fn(&State) -> bool,
        }
        let named = State {
            cluster_id: "first".into(),
            ..State::default()
        };
        let cases = vec![
            Case {
                name: "init names an unnamed cluster",
                before: State::default(),
                command: Command::InitCluster {
                    cluster_id: "c1".into(),
                },
                touched: vec![Record::ClusterId],
                check: |s| s.cluster_id == "c1",
            },
            Case {
                name: "init never renames a cluster",
                before: named.clone(),
                command: Command::InitCluster {
                    cluster_id: "second".into(),
                },
                touched: vec![],
                check: |s| s.cluster_id == "first",
            },
            Case {
                name: "register replaces a report",
                before: State::default(),
                command: Command::RegisterNode {
                    id: 2,
                    info: info("127.0.0.1:2"),
                },
                touched: vec![Record::Node(2)],
                check: |s| s.nodes[&2].addr == "127.0.0.1:2",
            },
            Case {
                name: "put stores",
                before: State::default(),
                command: Command::KvPut {
                    key: "k".into(),
                    value: "v".into(),
                },
                touched: vec![Record::Kv("k".into())],
                check: |s| s.kv["k"] == "v",
            },
            Case {
                name: "delete of a missing key touches nothing",
                before: State::default(),
                command: Command::KvDelete { key: "k".into() },
                touched: vec![],
                check: |s| s.kv.is_empty(),
            },
        ];
        for case in cases {
            let mut state = case.before.clone();
            let (response, touched) = state.apply(&case.command);
            assert_eq!(response, Response::Ok, "{}", case.name);
            assert_eq!(touched, case.touched, "{}", case.name);
            assert!((case.check)(&state), "{}", case.name);
        }
    }

    #[test]
    fn records_round_trip() {
        let mut state = State::default();
        state.apply(&Command::InitCluster {
            cluster_id: "c".into(),
        });
        state.apply(&Command::RegisterNode {
            id: 1,
            info: info("a"),
        });
        state.apply(&Command::KvPut {
            key: "x".into(),
            value: "y".into(),
        });
        let mut restored = State::default();
        for record in state.records() {
            let value = state.record_value(&record).unwrap();
            restored.load_record(record, value).unwrap();
        }
        assert_eq!(restored, state);
    }

    #[test]
    fn old_entries_without_new_fields_still_decode() {
        // A NodeInfo written by a binary that knew fewer fields.
        let json = r#"{"type":"register_node","id":3,"info":{"addr":"h:1"}}"#;
        let command: Command = serde_json::from_str(json).unwrap();
        let Command::RegisterNode { id, info } = command else {
            panic!("wrong kind")
        };
        assert_eq!((id, info.addr.as_str(), info.protocol), (3, "h:1", 0));
    }
}
