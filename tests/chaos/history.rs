//! A concurrent kv history, and its linearizability check.
//!
//! Several clients put and get a few shared keys at once, through any node, for the whole
//! trial; each operation is recorded with the moments it was invoked and returned (one
//! monotonic clock: the test process's). A put that failed may or may not have taken
//! effect: it stays invoked and never returns, and its client goes on as a new thread of
//! the history. A get that failed constrains nothing and is left out.
//!
//! The clients stop after `MAX_OPS` operations, or when the trial ends.
//!
//! The check is stateright's `LinearizabilityTester` with a register per key (a key's
//! value, `None` before its first put): linearizability is local, so a history is
//! linearizable exactly when each key's sub-history is, and checking key by key keeps
//! the search small.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use stateright::semantics::register::{Register, RegisterOp, RegisterRet};
use stateright::semantics::{ConsistencyTester, LinearizabilityTester};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::harness::{control, WRITER_TIMEOUT};

/// Concurrent clients of one history.
pub const CLIENTS: u64 = 3;
/// The keys they share.
pub const KEYS: usize = 6;
/// Operations after which the clients stop: enough to span a rollout and its fault, few
/// enough for the checker (its search copies what remains of a key's history at every
/// step: quadratic in the history's length).
pub const MAX_OPS: usize = 3000;

type Op = RegisterOp<Option<String>>;
type Ret = RegisterRet<Option<String>>;

/// One operation of the history.
#[derive(Clone, Debug)]
pub struct Entry {
    /// The history's thread: a client, until one of its puts fails.
    pub thread: u64,
    pub key: usize,
    pub op: Op,
    pub invoked: Instant,
    /// The result and its moment; `None` for a put whose outcome is unknown.
    pub returned: Option<(Instant, Ret)>,
}

/// The clients, running until stopped.
pub struct Clients {
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<Vec<Entry>>>,
    prefix: String,
}

impl Clients {
    /// `CLIENTS` clients over `addrs`, each starting at its own node and moving to the
    /// next one after an error; their choices follow from `seed`.
    pub fn start(addrs: Vec<String>, prefix: &str, seed: u64) -> Self {
        let (stop, stopped) = watch::channel(false);
        let issued = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let tasks = (0..CLIENTS)
            .map(|client| {
                let issued = issued.clone();
                let addrs = addrs.clone();
                let prefix = prefix.to_string();
                let mut stopped = stopped.clone();
                tokio::spawn(async move {
                    let mut rng = crate::Rng(seed ^ (client + 1).wrapping_mul(0x5851_f42d));
                    let mut target = client as usize;
                    let mut thread = client * 1_000_000;
                    let mut entries = Vec::new();
                    let mut n = 0u64;
                    while !*stopped.borrow_and_update()
                        && issued.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < MAX_OPS
                    {
                        let key = rng.between(0, KEYS as u64) as usize;
                        let name = format!("{prefix}-{key}");
                        let node = control(&addrs[target % addrs.len()]).timeout(WRITER_TIMEOUT);
                        let invoked = Instant::now();
                        let (op, result) = if rng.between(0, 10) < 6 {
                            n += 1;
                            let value = format!("c{client}-{n}");
                            let put = node.clone().kv_put(&name, &value).await;
                            (
                                RegisterOp::Write(Some(value)),
                                put.map(|_| RegisterRet::WriteOk),
                            )
                        } else {
                            let got = node.clone().kv_get(&name).await;
                            (RegisterOp::Read, got.map(RegisterRet::ReadOk))
                        };
                        let returned = Instant::now();
                        match result {
                            Ok(ret) => entries.push(Entry {
                                thread,
                                key,
                                op,
                                invoked,
                                returned: Some((returned, ret)),
                            }),
                            Err(_) => {
                                if matches!(op, RegisterOp::Write(_)) {
                                    entries.push(Entry {
                                        thread,
                                        key,
                                        op,
                                        invoked,
                                        returned: None,
                                    });
                                    thread += 1;
                                }
                                target += 1;
                                // A refused connection fails at once: do not spin on a dead node.
                                tokio::time::sleep(Duration::from_millis(5)).await;
                            }
                        }
                    }
                    entries
                })
            })
            .collect();
        Self {
            stop,
            tasks,
            prefix: prefix.to_string(),
        }
    }

    /// Stops the clients; their history.
    pub async fn stop(self) -> History {
        let _ = self.stop.send(true);
        let mut entries = Vec::new();
        for task in self.tasks {
            entries.extend(task.await.expect("history client"));
        }
        History {
            entries,
            prefix: self.prefix,
        }
    }
}

/// What the clients did.
pub struct History {
    pub entries: Vec<Entry>,
    prefix: String,
}

impl History {
    /// Operations that returned.
    pub fn completed(&self) -> usize {
        self.entries.iter().filter(|e| e.returned.is_some()).count()
    }

    /// Puts whose outcome the client never learned.
    pub fn indeterminate(&self) -> usize {
        self.entries.len() - self.completed()
    }

    /// `Ok` if every key's history is linearizable; otherwise the first key's that is
    /// not, with its operations. Gives up (an error too) after `budget`: the search is
    /// exponential in the worst case, and a history that takes that long to decide is
    /// worth a look anyway.
    pub fn check(&self, budget: Duration) -> Result<(), String> {
        let mut by_key: BTreeMap<usize, Vec<Entry>> = BTreeMap::new();
        for entry in &self.entries {
            by_key.entry(entry.key).or_default().push(entry.clone());
        }
        let (tx, rx) = std::sync::mpsc::channel();
        let prefix = self.prefix.clone();
        // The tester's search recurses once per operation: a thread with room for it.
        std::thread::Builder::new()
            .name("linearizability".into())
            .stack_size(512 << 20)
            .spawn(move || {
                let verdict = by_key.iter().try_for_each(|(key, entries)| {
                    if linearizable(entries) {
                        Ok(())
                    } else {
                        Err(format!(
                            "the history of key {prefix}-{key} ({} operations) is not \
                             linearizable:\n{}",
                            entries.len(),
                            describe(entries)
                        ))
                    }
                });
                let _ = tx.send(verdict);
            })
            .expect("checker thread");
        rx.recv_timeout(budget).unwrap_or_else(|_| {
            Err(format!(
                "linearizability of the history not decided within {budget:?}"
            ))
        })
    }
}

/// One key's entries, fed to the tester in the order of their moments.
fn linearizable(entries: &[Entry]) -> bool {
    #[derive(PartialEq, Eq, PartialOrd, Ord)]
    enum Kind {
        // At the same instant an invocation goes first: the weaker order.
        Invoke,
        Return,
    }
    let mut events: Vec<(Instant, Kind, usize)> = Vec::new();
    for (i, entry) in entries.iter().enumerate() {
        events.push((entry.invoked, Kind::Invoke, i));
        if let Some((at, _)) = &entry.returned {
            events.push((*at, Kind::Return, i));
        }
    }
    events.sort();
    let mut tester = LinearizabilityTester::new(Register(None::<String>));
    for (_, kind, i) in events {
        let entry = &entries[i];
        let recorded = match kind {
            Kind::Invoke => tester.on_invoke(entry.thread, entry.op.clone()).map(|_| ()),
            Kind::Return => {
                let (_, ret) = entry.returned.clone().expect("a return event has a result");
                tester.on_return(entry.thread, ret).map(|_| ())
            }
        };
        if let Err(e) = recorded {
            panic!("the recorded history is malformed: {e}");
        }
    }
    tester.is_consistent()
}

fn describe(entries: &[Entry]) -> String {
    let start = entries.iter().map(|e| e.invoked).min();
    let ms = |at: Instant| start.map_or(0, |s| at.duration_since(s).as_millis());
    entries
        .iter()
        .map(|e| {
            let ret = match &e.returned {
                Some((at, ret)) => format!("{ret:?} at {} ms", ms(*at)),
                None => "unknown".into(),
            };
            format!(
                "  thread {} {:?} invoked at {} ms -> {ret}",
                e.thread,
                e.op,
                ms(e.invoked)
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(thread: u64, op: Op, at: (u64, Option<u64>), ret: Option<Ret>, t0: Instant) -> Entry {
        Entry {
            thread,
            key: 0,
            op,
            invoked: t0 + Duration::from_millis(at.0),
            returned: at
                .1
                .map(|r| (t0 + Duration::from_millis(r), ret.expect("a result"))),
        }
    }

    fn history(entries: Vec<Entry>) -> History {
        History {
            entries,
            prefix: "k".into(),
        }
    }

    fn put(v: &str) -> Op {
        RegisterOp::Write(Some(v.into()))
    }

    fn got(v: Option<&str>) -> Option<Ret> {
        Some(RegisterRet::ReadOk(v.map(String::from)))
    }

    #[test]
    fn a_read_of_an_overwritten_value_after_the_overwrite_returned_is_caught() {
        let t0 = Instant::now();
        let bad = history(vec![
            entry(0, put("a"), (0, Some(10)), Some(RegisterRet::WriteOk), t0),
            entry(0, put("b"), (20, Some(30)), Some(RegisterRet::WriteOk), t0),
            // Invoked after b's put returned, yet reads a: stale.
            entry(1, RegisterOp::Read, (40, Some(50)), got(Some("a")), t0),
        ]);
        assert!(bad.check(Duration::from_secs(10)).is_err());
    }

    #[test]
    fn concurrent_and_indeterminate_operations_may_land_either_way() {
        let t0 = Instant::now();
        let good = history(vec![
            entry(0, put("a"), (0, Some(10)), Some(RegisterRet::WriteOk), t0),
            // A put whose outcome is unknown, seen by a later read...
            entry(1, put("x"), (5, None), None, t0),
            entry(2, RegisterOp::Read, (20, Some(25)), got(Some("x")), t0),
            // ...and one never seen at all.
            entry(3, put("y"), (30, None), None, t0),
            // A read concurrent with a put may see either value.
            entry(4, put("b"), (40, Some(60)), Some(RegisterRet::WriteOk), t0),
            entry(5, RegisterOp::Read, (45, Some(50)), got(Some("x")), t0),
            entry(5, RegisterOp::Read, (70, Some(80)), got(Some("b")), t0),
        ]);
        assert_eq!(good.check(Duration::from_secs(10)), Ok(()));
        let t0 = Instant::now();
        let before_any = history(vec![
            entry(0, RegisterOp::Read, (0, Some(5)), got(None), t0),
            entry(0, put("a"), (10, Some(20)), Some(RegisterRet::WriteOk), t0),
            entry(1, RegisterOp::Read, (30, Some(40)), got(None), t0),
        ]);
        assert!(before_any.check(Duration::from_secs(10)).is_err());
    }
}
