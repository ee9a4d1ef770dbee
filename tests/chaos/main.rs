//! The seeded chaos suite: rolling updates of supervised 3-node (or `CHAOS_NODES`) clusters, each trial with
//! one fault (a "nemesis") injected at a random moment of the rollout while a kv writer
//! runs throughout; after every trial the product's promises are checked:
//!
//! - every acknowledged write is readable;
//! - the kv history of several concurrent clients is linearizable (stateright's checker,
//!   `history.rs`);
//! - a leader accepts writes;
//! - no rollout is left active (none stalls);
//! - every node runs, on the release its `current` points at, and that release verifies;
//! - nodes on different builds only after a rollout that ended failed or aborted;
//! - no panic in any node's log.
//!
//! Nemeses: kill -9 of the leader, of the node being updated, of a supervisor; SIGSTOP of
//! the leader, a follower, the node being updated; `rollout abort` (and `--revert`); a
//! byte flipped in a held release; chunks damaged in flight (served with a byte flipped);
//! a concurrent update; kill -9 of the update client; a jump of one node's wall clock
//! (libfaketime); one node's disk full for a while; a partition of the leader or of the
//! node being updated (every node in a network namespace of its own, its link cut).
//!
//! Needs the `crash-points` feature (its chunk-damaging fault point) and root (tmpfs,
//! network namespaces): `cargo test --features crash-points --test chaos`.
//!
//! Everything about a trial follows from its seed: the nemesis (`seed % NEMESES.len()`,
//! so consecutive seeds cover every nemesis), its target and its moment. A failure prints
//! the seed and the command that runs that trial again.
//!
//! - `CHAOS_TRIALS=N`: trials to run (default 2; `.ci/run` runs one per nemesis).
//! - `CHAOS_SEED=S`: the first trial's seed (default: from the clock, printed).
//! - `CHAOS_SEEDS=S,S:Nemesis,...`: exactly these seeds instead (a failure's seed, say);
//!   `S:Nemesis` pins the nemesis, so a seed keeps its fault when nemeses are added.
//! - `CHAOS_NODES=N`: the cluster size of every trial (default 3).
//! - `CHAOS_REPORT=FILE`: appends one JSON line per trial (`scripts/chaos.sh` reads them).
//! - `CHAOS_KEEP=1`: a trial that breaks a promise keeps its nodes' data dirs and logs.
//!
//! Seeds that found a bug, each also pinned by a deterministic test where it was fixed:
//! - 105:PauseUpdating (SIGSTOP of the updating node): a cancelled activation ran after the restore
//!   that undid it (`agent::tests::a_mutation_whose_caller_gave_up_...`).
//! - 24:FullDisk: a node its supervisor restarted while its disk was still full opened its
//!   store, which sled damaged for good; it never started again (the store now refuses to
//!   open with less than 8 MiB free: `faults::a_node_whose_disk_fills_up_...`).

#[path = "../it/harness.rs"]
#[allow(dead_code)]
mod harness;
mod history;
mod net;

use std::path::Path;
use std::time::{Duration, Instant};

use harness::{cli, make_release, signal, wait_for, Cluster, Start, Writer};

/// The faults a trial can inject, one per trial.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Nemesis {
    /// kill -9 of the leader's node process (its supervisor starts it again).
    KillLeader,
    /// kill -9 of the node being updated.
    KillUpdating,
    /// kill -9 of a node's supervisor and node together, started again after a pause.
    KillSupervisor,
    /// SIGSTOP of the leader for a while, then SIGCONT.
    PauseLeader,
    /// SIGSTOP of a follower for a while.
    PauseFollower,
    /// SIGSTOP of the node being updated for a while.
    PauseUpdating,
    /// `cluster rollout abort`.
    Abort,
    /// `cluster rollout abort --revert`.
    AbortRevert,
    /// One byte of the target release flipped on a node that holds it.
    CorruptHeld,
    /// A second `cluster update` while one runs.
    ConcurrentUpdate,
    /// kill -9 of the `cluster update` client that started the rollout: the rollout is
    /// the cluster's, and goes on without it.
    KillClient,
    /// The wall clock of one node jumps (Debian's libfaketime, forward or back by up to
    /// 50 minutes; its monotonic clock runs on): nothing may compare wall clocks.
    ClockJump,
    /// One node's data dir (a tmpfs of its own) filled to its last byte for a while,
    /// then freed.
    FullDisk,
    /// The leader cut off from every other node and client for a while (its network
    /// namespace's link down), then healed.
    PartitionLeader,
    /// The node being updated cut off for a while.
    PartitionUpdating,
    /// For a while, one node that holds the target serves its chunks to peers with a byte
    /// flipped (as a bad link or bad memory would), which every receiver must catch.
    CorruptInFlight,
}

const NEMESES: [Nemesis; 16] = [
    Nemesis::KillLeader,
    Nemesis::KillUpdating,
    Nemesis::KillSupervisor,
    Nemesis::PauseLeader,
    Nemesis::PauseFollower,
    Nemesis::PauseUpdating,
    Nemesis::Abort,
    Nemesis::AbortRevert,
    Nemesis::CorruptHeld,
    Nemesis::ConcurrentUpdate,
    Nemesis::KillClient,
    Nemesis::ClockJump,
    Nemesis::FullDisk,
    Nemesis::PartitionLeader,
    Nemesis::PartitionUpdating,
    Nemesis::CorruptInFlight,
];

/// Where Debian's libfaketime puts the library that fakes a process's clocks.
const FAKETIME_LIB: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";

/// SplitMix64: small, and the same sequence for a seed everywhere.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `lo..hi`.
    fn between(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo).max(1)
    }
}

/// What one trial saw, as a line of the report.
#[derive(Debug, Default, serde::Serialize)]
struct Outcome {
    seed: u64,
    nemesis: String,
    /// What was done, and when (ms after the rollout began).
    fault: String,
    rollout: String,
    acked: usize,
    lost: usize,
    /// Operations of the concurrent history that returned, and puts left undecided.
    ops: usize,
    undecided: usize,
    /// Whether that history is linearizable.
    linearizable: bool,
    stuck: bool,
    unbootable: usize,
    silent_mixed: bool,
    panics: usize,
    violations: Vec<String>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_updates_keep_their_promises_under_faults() {
    let trials: u64 = std::env::var("CHAOS_TRIALS")
        .ok()
        .map(|v| v.parse().expect("CHAOS_TRIALS is a number"))
        .unwrap_or(2);
    let first_seed: u64 = match std::env::var("CHAOS_SEED") {
        Ok(v) => v.parse().expect("CHAOS_SEED is a number"),
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs(),
    };
    let seeds: Vec<(u64, Nemesis)> = match std::env::var("CHAOS_SEEDS") {
        Ok(list) => list
            .split(',')
            .map(|entry| parse_seed(entry.trim()))
            .collect(),
        Err(_) => (first_seed..first_seed + trials)
            .map(|seed| (seed, nemesis_of(seed)))
            .collect(),
    };
    // Cluster size for every trial of this run (`CHAOS_NODES`, 3 or more; default 3).
    let nodes: u64 = std::env::var("CHAOS_NODES")
        .map(|n| n.parse().expect("CHAOS_NODES is a number"))
        .unwrap_or(3);
    assert!(
        nodes >= 3,
        "CHAOS_NODES must be at least 3: a voter must be losable"
    );
    println!(
        "chaos: {} trials on {nodes} nodes, seeds {seeds:?}",
        seeds.len()
    );
    let mut failed = Vec::new();
    for (seed, nemesis) in seeds {
        let outcome = trial(seed, nemesis, nodes).await;
        println!(
            "chaos: seed {seed}: {:?}: {}; rollout {}; {} writes acknowledged, {} lost; \
             {} concurrent operations ({} undecided), {}{}",
            nemesis,
            outcome.fault,
            outcome.rollout,
            outcome.acked,
            outcome.lost,
            outcome.ops,
            outcome.undecided,
            if outcome.linearizable {
                "linearizable"
            } else {
                "NOT linearizable"
            },
            if outcome.violations.is_empty() {
                String::new()
            } else {
                format!("; VIOLATED: {}", outcome.violations.join("; "))
            }
        );
        if let Ok(path) = std::env::var("CHAOS_REPORT") {
            use std::io::Write;
            let mut file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .expect("CHAOS_REPORT file");
            writeln!(file, "{}", serde_json::to_string(&outcome).unwrap()).unwrap();
        }
        if !outcome.violations.is_empty() {
            failed.push(format!(
                "seed {seed} ({:?}): {}\n  rerun: CHAOS_SEEDS={seed}:{nemesis:?} cargo test \
                 --features crash-points --test chaos -- --nocapture",
                nemesis,
                outcome.violations.join("; ")
            ));
        }
    }
    assert!(
        failed.is_empty(),
        "chaos trials failed:\n{}",
        failed.join("\n")
    );
}

/// `S` (the nemesis follows from the seed) or `S:Nemesis` (a seed pinned with the
/// nemesis it found a bug under, whatever the list of nemeses has become since).
fn parse_seed(entry: &str) -> (u64, Nemesis) {
    let (seed, named) = match entry.split_once(':') {
        Some((seed, name)) => (seed, Some(name)),
        None => (entry, None),
    };
    let seed: u64 = seed
        .parse()
        .expect("CHAOS_SEEDS is a comma-separated list of S or S:Nemesis");
    let nemesis = match named {
        None => nemesis_of(seed),
        Some(name) => *NEMESES
            .iter()
            .find(|n| format!("{n:?}") == name)
            .unwrap_or_else(|| panic!("no nemesis {name}: one of {NEMESES:?}")),
    };
    (seed, nemesis)
}

fn nemesis_of(seed: u64) -> Nemesis {
    NEMESES[(seed % NEMESES.len() as u64) as usize]
}

/// One trial: a 3-node supervised cluster on v1, a rollout to v2 with the trial's fault,
/// then every check.
async fn trial(seed: u64, nemesis: Nemesis, nodes: u64) -> Outcome {
    let mut rng = Rng(seed);
    let mut outcome = Outcome {
        seed,
        nemesis: format!("{nemesis:?}"),
        ..Outcome::default()
    };
    let work = tempfile::tempdir().unwrap();
    let (v1, v2) = (work.path().join("v1"), work.path().join("v2"));
    let h1 = make_release(&v1, &[("share/motd", "one")]);
    let h2 = make_release(&v2, &[("share/motd", &format!("two {seed}"))]);
    // Each node in a network namespace of its own, for a link that can be cut. Declared
    // before the cluster, so removed after its processes are killed.
    let partition = matches!(
        nemesis,
        Nemesis::PartitionLeader | Nemesis::PartitionUpdating
    );
    let network = match partition.then(|| net::Network::create(nodes)) {
        None => None,
        Some(Ok(network)) => Some(network),
        Some(Err(why)) => {
            harness::skip_outside_ci(&format!("no network namespaces: {why}"));
            outcome.fault = "no network namespaces: no partition".into();
            return outcome;
        }
    };
    let mut cluster = Cluster::new();
    cluster.supervised = Some(v1.clone());
    if let Some(network) = &network {
        for id in 1..=nodes {
            cluster.node_wrap.insert(id, network.wrap(id));
        }
    }
    if nemesis == Nemesis::ClockJump {
        if !Path::new(FAKETIME_LIB).exists() {
            harness::skip_outside_ci("libfaketime is not installed: apt-get install libfaketime");
            outcome.fault = "no libfaketime: no clock jumped".into();
            return outcome;
        }
        // Every node's wall clock is faked from a file of its own, read at most once a
        // second; its monotonic clock is left alone.
        for id in 1..=nodes {
            let file = work.path().join(format!("faketime-{id}"));
            std::fs::write(&file, "+0").unwrap();
            cluster.node_env.insert(
                id,
                vec![
                    ("LD_PRELOAD".into(), FAKETIME_LIB.into()),
                    ("FAKETIME_TIMESTAMP_FILE".into(), file.display().to_string()),
                    ("FAKETIME_CACHE_DURATION".into(), "1".into()),
                    ("DONT_FAKE_MONOTONIC".into(), "1".into()),
                ],
            );
        }
    }
    // Each node's data dir on a tmpfs of its own, for a disk that can fill up. Declared
    // after the cluster, so unmounted (lazily) before its processes are killed.
    let mut disks = Vec::new();
    if nemesis == Nemesis::FullDisk {
        for id in 1..=nodes {
            let dir = cluster.dir.path().join(format!("n{id}"));
            match harness::SmallDisk::mount(&dir, "1g") {
                Some(disk) => disks.push(disk),
                None => {
                    harness::skip_outside_ci("mounting a tmpfs needs root (mount -t tmpfs)");
                    outcome.fault = "no tmpfs: no disk filled".into();
                    return outcome;
                }
            }
        }
    }
    if nemesis == Nemesis::CorruptInFlight {
        for id in 1..=nodes {
            let switch = work.path().join(format!("corrupt-served-{id}"));
            cluster.node_env.entry(id).or_default().push((
                "CLUSTER_CORRUPT_SERVED".into(),
                switch.display().to_string(),
            ));
        }
    }
    cluster.form(nodes).await;
    harness::wait_all_on(&cluster, &h1).await;
    let writer = Writer::start(cluster.addrs(), &format!("chaos-{seed}"));
    let clients = history::Clients::start(cluster.addrs(), &format!("lin-{seed}"), seed);

    // Chunks are damaged in flight from the start of the rollout, by the leader (which
    // every node may fetch from) or by another node (which serves once it is updated).
    let corrupting = match (nemesis, rng.between(0, 2)) {
        (Nemesis::CorruptInFlight, 0) => Some(rng.between(1, nodes + 1)),
        (Nemesis::CorruptInFlight, _) => Some(leader(&cluster).await),
        _ => None,
    };
    if let Some(id) = corrupting {
        std::fs::write(work.path().join(format!("corrupt-served-{id}")), "").unwrap();
    }
    let asked = cluster.addr(rng.between(1, nodes + 1));
    let update = update_in_background(asked.clone(), v2.clone());
    let began = Instant::now();
    // The fault's moment: a random time once some node has left `pending`.
    wait_for("the rollout under way", Duration::from_secs(60), || async {
        let json = active_rollout(&cluster)?;
        let nodes = json["nodes"].as_object()?;
        nodes
            .values()
            .any(|s| s["phase"] != "pending")
            .then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(rng.between(0, 4000))).await;
    let faults = Faults {
        corrupting,
        disks: &disks,
        network: network.as_ref(),
        work: work.path(),
    };
    outcome.fault = inject(nemesis, &mut cluster, &faults, &mut rng, &h2, &v2).await;
    outcome.fault = format!("{} at {} ms", outcome.fault, began.elapsed().as_millis());

    // The update client ends however the rollout does (its exit status is not a promise).
    tokio::task::spawn_blocking(move || update.join().unwrap())
        .await
        .unwrap();
    check(&mut cluster, writer, clients, &mut outcome).await;
    outcome
}

/// What some nemeses act through.
struct Faults<'a> {
    /// The node serving damaged chunks since the rollout began.
    corrupting: Option<u64>,
    disks: &'a [harness::SmallDisk],
    network: Option<&'a net::Network>,
    work: &'a Path,
}

/// `cluster update` of `dist` through `addr` on a thread of its own.
fn update_in_background(
    addr: String,
    dist: std::path::PathBuf,
) -> std::thread::JoinHandle<std::process::Output> {
    harness::update_in_background(addr, dist, 1500, 20_000)
}

/// The rollout in progress as `rollout status --json` on any node shows it.
fn active_rollout(cluster: &Cluster) -> Option<serde_json::Value> {
    cluster.addrs().iter().find_map(|addr| {
        let out = cli(&["rollout", "status", "--json", "--node", addr]);
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        json.is_object().then_some(json)
    })
}

/// A node in an updating phase of the active rollout, if one is.
fn updating(cluster: &Cluster) -> Option<u64> {
    let json = active_rollout(cluster)?;
    json["nodes"].as_object()?.iter().find_map(|(id, step)| {
        let phase = step["phase"].as_str()?;
        [
            "backup",
            "sync",
            "activate",
            "health",
            "stabilize",
            "restoring",
        ]
        .contains(&phase)
        .then(|| id.parse().ok())?
    })
}

async fn leader(cluster: &Cluster) -> u64 {
    cluster.leader_status().await.leader.expect("a leader")
}

/// Carries out `nemesis`; says what it did.
async fn inject(
    nemesis: Nemesis,
    cluster: &mut Cluster,
    faults: &Faults<'_>,
    rng: &mut Rng,
    target: &str,
    dist: &Path,
) -> String {
    let pause = Duration::from_millis(rng.between(500, 4000));
    let size = cluster.nodes.len() as u64;
    let any = rng.between(1, size + 1);
    match nemesis {
        Nemesis::KillLeader | Nemesis::KillUpdating => {
            let id = match nemesis {
                Nemesis::KillLeader => leader(cluster).await,
                _ => updating(cluster).unwrap_or(any),
            };
            match cluster.node_pid(id) {
                Some(pid) => {
                    signal(pid, libc::SIGKILL);
                    format!("kill -9 of node {id}'s process")
                }
                None => format!("node {id} had no process to kill"),
            }
        }
        Nemesis::KillSupervisor => {
            cluster.kill(any);
            tokio::time::sleep(pause).await;
            cluster.spawn(any, Start::Restart).await;
            format!(
                "kill -9 of node {any} and its supervisor, started again after {} ms",
                pause.as_millis()
            )
        }
        Nemesis::PauseLeader | Nemesis::PauseFollower | Nemesis::PauseUpdating => {
            let leader = leader(cluster).await;
            let id = match nemesis {
                Nemesis::PauseLeader => leader,
                Nemesis::PauseFollower => (1..=size).find(|id| *id != leader).unwrap(),
                _ => updating(cluster).unwrap_or(any),
            };
            let Some(pid) = cluster.node_pid(id) else {
                return format!("node {id} had no process to pause");
            };
            signal(pid, libc::SIGSTOP);
            tokio::time::sleep(pause).await;
            signal(pid, libc::SIGCONT);
            format!("SIGSTOP of node {id} for {} ms", pause.as_millis())
        }
        Nemesis::Abort | Nemesis::AbortRevert => {
            let mut args = vec!["rollout", "abort"];
            if nemesis == Nemesis::AbortRevert {
                args.push("--revert");
            }
            let addr = cluster.addr(any);
            args.extend(["--node", &addr]);
            let out = cli(&args);
            format!(
                "`{}` through node {any}: exit {:?}",
                args[..args.len() - 2].join(" "),
                out.status.code()
            )
        }
        Nemesis::CorruptHeld => {
            // A file only the target has: bin/cluster is shared (hard-linked) with what runs.
            // The rollout answers for the release until it commits it: the damage lands on
            // a node that holds the target but does not run it yet, or has just started it
            // (the commit is at least a stabilization window away).
            let phases: std::collections::BTreeMap<u64, String> = active_rollout(cluster)
                .and_then(|json| {
                    let nodes = json["nodes"].as_object()?.clone();
                    Some(
                        nodes
                            .into_iter()
                            .filter_map(|(id, step)| {
                                Some((id.parse().ok()?, step["phase"].as_str()?.to_string()))
                            })
                            .collect(),
                    )
                })
                .unwrap_or_default();
            let holders: Vec<u64> = (1..=size)
                .filter(|id| {
                    let data = harness::data_dir_of(cluster, *id);
                    let runs_it = current_of(data).as_deref() == Some(target);
                    let just_started = phases
                        .get(id)
                        .is_some_and(|p| p == "activate" || p == "health");
                    data.join("releases")
                        .join(target)
                        .join("share/motd")
                        .exists()
                        && (!runs_it || just_started)
                })
                .collect();
            let holder = (!holders.is_empty())
                .then(|| holders[rng.between(0, holders.len() as u64) as usize]);
            match holder {
                Some(id) => {
                    let path = harness::data_dir_of(cluster, id)
                        .join("releases")
                        .join(target)
                        .join("share/motd");
                    let mut bytes = std::fs::read(&path).unwrap_or_default();
                    if let Some(first) = bytes.first_mut() {
                        *first ^= 0x20;
                    }
                    let _ = std::fs::write(&path, &bytes);
                    format!("a byte of node {id}'s held target release flipped")
                }
                None => "no node held the target uncommitted: nothing flipped".into(),
            }
        }
        Nemesis::FullDisk => {
            let id = rng.between(1, size + 1);
            let disk = &faults.disks[id as usize - 1];
            disk.fill();
            tokio::time::sleep(pause).await;
            disk.free();
            format!("node {id}'s disk full for {} ms", pause.as_millis())
        }
        Nemesis::PartitionLeader | Nemesis::PartitionUpdating => {
            let id = match nemesis {
                Nemesis::PartitionLeader => leader(cluster).await,
                _ => updating(cluster).unwrap_or(any),
            };
            let network = faults.network.expect("a partition trial has its network");
            let pause = Duration::from_millis(rng.between(1000, 8000));
            network.cut(id);
            tokio::time::sleep(pause).await;
            network.heal(id);
            format!("node {id} partitioned for {} ms", pause.as_millis())
        }
        Nemesis::CorruptInFlight => {
            let id = faults.corrupting.expect("a node damages chunks");
            std::fs::remove_file(faults.work.join(format!("corrupt-served-{id}"))).unwrap();
            let log = std::fs::read_to_string(&cluster.nodes[&id].log).unwrap_or_default();
            let served = log.matches("serving a chunk with one byte flipped").count();
            format!("node {id} served {served} chunks damaged until now")
        }
        Nemesis::ClockJump => {
            let id = rng.between(1, size + 1);
            let minutes = rng.between(5, 51) as i64;
            let jump = if rng.between(0, 2) == 0 {
                -minutes
            } else {
                minutes
            };
            let faketime = cluster.node_env[&id]
                .iter()
                .find(|(k, _)| k == "FAKETIME_TIMESTAMP_FILE")
                .map(|(_, v)| v.clone())
                .expect("a faked clock");
            std::fs::write(&faketime, format!("{jump:+}m")).unwrap();
            format!("node {id}'s wall clock jumped {jump:+} minutes")
        }
        Nemesis::KillClient => {
            // The client is the `cluster update --dist <this trial's v2>` process.
            let wanted = dist.to_string_lossy().to_string();
            let mut killed = Vec::new();
            for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
                let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
                    continue;
                };
                let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
                let args: Vec<String> = cmdline
                    .split(|b| *b == 0)
                    .map(|a| String::from_utf8_lossy(a).into_owned())
                    .collect();
                let is_client = args.iter().any(|a| a == "update") && args.contains(&wanted);
                if is_client {
                    harness::signal(pid, libc::SIGKILL);
                    killed.push(pid);
                }
            }
            format!("kill -9 of the update client {killed:?}")
        }
        Nemesis::ConcurrentUpdate => {
            let second = update_in_background(cluster.addr(any), dist.to_path_buf());
            let out = tokio::task::spawn_blocking(move || second.join().unwrap())
                .await
                .unwrap();
            let said = String::from_utf8_lossy(&out.stderr).to_string();
            format!(
                "a second update through node {any}: exit {:?} ({})",
                out.status.code(),
                said.lines().last().unwrap_or("")
            )
        }
    }
}

/// Every promise, checked after the trial's rollout has ended; violations go in `outcome`.
async fn check(
    cluster: &mut Cluster,
    writer: Writer,
    clients: history::Clients,
    outcome: &mut Outcome,
) {
    let violations = &mut outcome.violations;
    // No rollout stalls.
    let ended = wait_for_ok(Duration::from_secs(180), || async {
        let addrs = cluster.addrs();
        let any_active = addrs.iter().any(|addr| {
            let out = cli(&["rollout", "status", "--json", "--node", addr]);
            !out.status.success() || String::from_utf8_lossy(&out.stdout).trim() != "null"
        });
        (!any_active).then_some(())
    })
    .await;
    if ended.is_none() {
        outcome.stuck = true;
        violations.push("a rollout was still active 180 s after the update ended".into());
    }
    // A leader accepts writes.
    let accepted = wait_for_ok(Duration::from_secs(60), || async {
        let mut client = cluster.client(1);
        client.kv_put("chaos-after", "written").await.ok()
    })
    .await;
    if accepted.is_none() {
        violations.push("no leader accepted a write within 60 s".into());
    }
    let history = clients.stop().await;
    outcome.ops = history.completed();
    outcome.undecided = history.indeterminate();
    match history.check(Duration::from_secs(120)) {
        Ok(()) => outcome.linearizable = true,
        Err(why) => violations.push(why),
    }
    let report = writer.stop().await;
    outcome.acked = report.acked.len();
    // A write is lost when a read answers without it; a read that never answers (through
    // any node, for 30 s) is a separate violation: the cluster did not serve.
    let mut unreadable = Vec::new();
    for (key, value) in &report.acked {
        let read = wait_for_ok(Duration::from_secs(30), || async {
            for addr in cluster.addrs() {
                if let Ok(read) = harness::control(&addr).kv_get(key).await {
                    return Some(read);
                }
            }
            None
        })
        .await;
        match read {
            Some(read) if read.as_deref() == Some(value.as_str()) => {}
            Some(read) => {
                outcome.lost += 1;
                eprintln!("chaos: acknowledged {key}={value} reads as {read:?}");
            }
            None => unreadable.push(key.clone()),
        }
    }
    if outcome.lost > 0 {
        violations.push(format!("{} acknowledged writes lost", outcome.lost));
    }
    if !unreadable.is_empty() {
        violations.push(format!(
            "{} acknowledged writes unreadable through any node for 30 s (first: {})",
            unreadable.len(),
            unreadable[0]
        ));
    }
    // Every node runs, on the release `current` points at, and it verifies.
    let settled = wait_for_ok(Duration::from_secs(120), || async {
        let status = cluster.status().await?;
        let all_up = status.nodes.len() == cluster.nodes.len()
            && status
                .nodes
                .iter()
                .all(|n| n.state == "leader" || n.state == "follower");
        let on_current = status.nodes.iter().all(|n| {
            current_of(harness::data_dir_of(cluster, n.id)).as_deref() == Some(&n.build_hash)
        });
        (all_up && on_current).then_some(status)
    })
    .await;
    let builds: std::collections::BTreeSet<String> = match &settled {
        Some(status) => status.nodes.iter().map(|n| n.build_hash.clone()).collect(),
        None => {
            outcome.unbootable += 1;
            let seen: Vec<String> = match cluster.status().await {
                Some(status) => status
                    .nodes
                    .iter()
                    .map(|n| {
                        let current = current_of(harness::data_dir_of(cluster, n.id));
                        format!(
                            "node {} {} runs {} with current -> {}",
                            n.id,
                            n.state,
                            short(&n.build_hash),
                            short(current.as_deref().unwrap_or("nothing"))
                        )
                    })
                    .collect(),
                None => vec!["no leader answered".into()],
            };
            violations.push(format!(
                "nodes not all up on their current release within 120 s: {}",
                seen.join(", ")
            ));
            Default::default()
        }
    };
    for id in 1..=cluster.nodes.len() as u64 {
        let current = harness::data_dir_of(cluster, id).join("current");
        let out = cli(&["dist", "verify", current.to_str().unwrap()]);
        if !out.status.success() {
            outcome.unbootable += 1;
            violations.push(format!(
                "node {id}'s current release does not verify: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
    }
    // Mixed builds only after a rollout that says so.
    let history = cli(&["rollout", "history", "--json", "--node", &cluster.addr(1)]);
    let history: serde_json::Value =
        serde_json::from_slice(&history.stdout).unwrap_or(serde_json::Value::Null);
    let last = history.as_array().and_then(|h| h.last()).cloned();
    let ended_as = last
        .as_ref()
        .and_then(|e| e["outcome"].as_str())
        .unwrap_or("none")
        .to_string();
    outcome.rollout = ended_as.clone();
    if builds.len() > 1 && !["failed", "aborted"].contains(&ended_as.as_str()) {
        outcome.silent_mixed = true;
        violations.push(format!(
            "nodes on {} builds after a rollout that ended {ended_as}",
            builds.len()
        ));
    }
    // No panic anywhere.
    for node in cluster.nodes.values() {
        let log = std::fs::read_to_string(&node.log).unwrap_or_default();
        let panics = log.matches("panicked at").count();
        if panics > 0 {
            outcome.panics += panics;
            violations.push(format!("node {} panicked ({panics} times)", node.id));
        }
    }
    if !outcome.violations.is_empty() {
        eprintln!("{}", cluster.logs());
        // `CHAOS_KEEP=1`: keep the failed trial's data dirs and full node logs.
        if std::env::var_os("CHAOS_KEEP").is_some() {
            let dir = std::mem::replace(&mut cluster.dir, tempfile::tempdir().unwrap());
            eprintln!(
                "chaos: the trial's nodes are kept in {}",
                dir.keep().display()
            );
        }
    }
}

fn short(hash: &str) -> &str {
    &hash[..hash.len().min(12)]
}

/// The build hash `data/current` points at.
fn current_of(data_dir: &Path) -> Option<String> {
    let target = std::fs::read_link(data_dir.join("current")).ok()?;
    Some(target.file_name()?.to_string_lossy().into_owned())
}

/// Like `wait_for`, but `None` at the deadline instead of a panic: a check that fails
/// is a violation to report, not the end of the suite.
async fn wait_for_ok<T, F, Fut>(timeout: Duration, mut check: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return Some(value);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
