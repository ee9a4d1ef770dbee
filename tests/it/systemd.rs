//! The systemd unit and the install scripts, statically: `systemd-analyze verify` on the
//! unit in a root of its own, and the scripts' dry runs and flag errors (which change
//! nothing). The unit under a real systemd is tests/nspawn/run.sh.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use crate::harness::{creds, make_release, output_within, skip_outside_ci, tls_dir};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The absolute paths of the executables a unit's Exec*= lines name.
fn executables(unit: &str) -> Vec<String> {
    unit.lines()
        .filter(|line| line.starts_with("Exec"))
        .filter_map(|line| line.split_once('='))
        .filter_map(|(_, command)| {
            let command = command.trim_start_matches(['-', '@', ':', '+', '!']);
            command.split_whitespace().next().map(str::to_string)
        })
        .collect()
}

#[test]
fn the_unit_passes_systemd_analyze_verify_with_no_warning() {
    let Ok(version) = Command::new("systemd-analyze").arg("--version").output() else {
        skip_outside_ci("systemd-analyze is not installed (apt-get install systemd)");
        return;
    };
    assert!(version.status.success());
    let unit_path = repo().join("systemd/cluster.service");
    let unit = std::fs::read_to_string(&unit_path).unwrap();
    let root = tempfile::tempdir().unwrap();
    let system = root.path().join("etc/systemd/system");
    std::fs::create_dir_all(&system).unwrap();
    std::fs::copy(&unit_path, system.join("cluster.service")).unwrap();
    // The distro's units, so dependencies such as network-online.target resolve.
    let distro_units = Path::new("/usr/lib/systemd/system");
    std::fs::create_dir_all(root.path().join("usr/lib/systemd")).unwrap();
    let copied = Command::new("cp")
        .arg("-a")
        .arg(distro_units)
        .arg(root.path().join("usr/lib/systemd/"))
        .status();
    assert!(
        copied.is_ok_and(|s| s.success()),
        "copying {distro_units:?}"
    );
    let named = executables(&unit);
    assert_eq!(
        named,
        [
            "/usr/local/bin/cluster",
            "/var/lib/cluster/current/bin/cluster"
        ],
        "the unit runs the guard from the stable binary and the node from `current`"
    );
    for exe in &named {
        let path = root.path().join(exe.trim_start_matches('/'));
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(format!("--root={}", root.path().display()))
        .arg("cluster.service")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    // Unknown keys and bad values are warnings with exit status 0: any output fails.
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "systemd-analyze verify: {}",
        text(&out)
    );
    // And it does catch a bad key: the check is not vacuous.
    let mut broken = unit.clone();
    broken.push_str("RestartSecs=1\n");
    std::fs::write(system.join("cluster.service"), broken).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(format!("--root={}", root.path().display()))
        .arg("cluster.service")
        .output()
        .unwrap();
    assert!(
        !out.stderr.is_empty(),
        "a bad key is reported: {}",
        text(&out)
    );
}

fn script(name: &str, args: &[&str]) -> Output {
    let mut command = Command::new("bash");
    command.arg(repo().join("scripts").join(name)).args(args);
    output_within(command, Duration::from_secs(120))
}

/// What the scripts could touch on this host, to show a dry run or an error changed nothing.
fn host_state() -> Vec<String> {
    [
        "/var/lib/cluster",
        "/etc/cluster",
        "/usr/local/bin/cluster",
        "/etc/systemd/system/cluster.service",
    ]
    .iter()
    .map(|path| {
        let meta = std::fs::symlink_metadata(path)
            .map(|m| format!("{:?} {:o}", m.file_type(), m.permissions().mode()))
            .unwrap_or_else(|_| "absent".into());
        format!("{path}: {meta}")
    })
    .collect()
}

#[test]
fn install_dry_run_prints_every_step_and_changes_nothing() {
    let work = tempfile::tempdir().unwrap();
    let dist = work.path().join("dist");
    make_release(&dist, &[]);
    let node_creds = creds("n2");
    let before = host_state();
    let out = script(
        "install.sh",
        &[
            "--dist",
            dist.to_str().unwrap(),
            "--id",
            "2",
            "--listen",
            "10.0.0.2:7100",
            "--join",
            "10.0.0.1:7100",
            "--tls",
            node_creds.to_str().unwrap(),
            "--health-command",
            "test -e current/bin/cluster",
            "--dry-run",
        ],
    );
    let shown = text(&out);
    assert!(out.status.success(), "{shown}");
    let key_copy = format!(
        "would copy {}/key.pem to /etc/cluster/tls/key.pem (mode 0640, root:cluster)",
        node_creds.display()
    );
    for expected in [
        "/usr/local/bin/cluster",
        "dist install",
        "would create /etc/cluster/tls (mode 0750, root:cluster)",
        &key_copy,
        "/etc/cluster/node.toml",
        "id = 2",
        "listen = \"10.0.0.2:7100\"",
        "join = \"10.0.0.1:7100\"",
        "data_dir = \"/var/lib/cluster\"",
        "health_command = \"test -e current/bin/cluster\"",
        "tls = \"/etc/cluster/tls\"",
        "systemctl enable",
        "systemctl start cluster.service",
    ] {
        assert!(
            shown.contains(expected),
            "dry run shows {expected:?}: {shown}"
        );
    }
    assert_eq!(host_state(), before, "a dry run changes nothing");

    // The config it would write is one the node accepts.
    let toml: String = shown
        .lines()
        .skip_while(|line| !line.starts_with("would write /etc/cluster/node.toml"))
        .skip(1)
        .take_while(|line| line.starts_with("    "))
        .map(|line| format!("{}\n", line.trim_start()))
        .collect();
    let config = work.path().join("node.toml");
    let toml = toml
        .replace("/var/lib/cluster", "/nonexistent/x")
        .replace("/etc/cluster/tls", node_creds.to_str().unwrap());
    std::fs::write(&config, toml).unwrap();
    let node = crate::harness::cli(&[
        "node",
        "run",
        "--config",
        config.to_str().unwrap(),
        "--listen",
        "127.0.0.1:1",
        "--election-timeout-ms",
        "1",
    ]);
    let said = text(&node);
    assert!(
        !said.contains("malformed") && said.contains("election"),
        "the written config parses (only the flag given here is refused): {said}"
    );

    // Without credentials only by saying so: plaintext in node.toml, and a warning.
    let out = script(
        "install.sh",
        &[
            "--dist",
            dist.to_str().unwrap(),
            "--id",
            "1",
            "--listen",
            "10.0.0.1:7100",
            "--bootstrap",
            "--insecure",
            "--dry-run",
        ],
    );
    let shown = text(&out);
    assert!(out.status.success(), "{shown}");
    assert!(shown.contains("    insecure = true"), "{shown}");
    assert!(shown.contains("WARNING: --insecure"), "{shown}");
    assert!(!shown.contains("/etc/cluster/tls"), "{shown}");
    assert_eq!(host_state(), before, "a dry run changes nothing");

    let uninstall = script("uninstall.sh", &["--purge", "--dry-run"]);
    assert!(uninstall.status.success(), "{}", text(&uninstall));
    assert_eq!(host_state(), before, "an uninstall dry run changes nothing");
}

#[test]
fn install_gives_the_node_its_release_keys_and_refuses_a_private_one() {
    let work = tempfile::tempdir().unwrap();
    let dist = work.path().join("dist");
    make_release(&dist, &[]);
    let keys = work.path().join("keys");
    let made = crate::harness::cli(&["dist", "keygen", keys.to_str().unwrap()]);
    assert!(made.status.success(), "{}", text(&made));
    let public = keys.join("release.pub");
    let before = host_state();
    let install = |key: &Path| {
        script(
            "install.sh",
            &[
                "--dist",
                dist.to_str().unwrap(),
                "--id",
                "1",
                "--listen",
                "10.0.0.1:7100",
                "--bootstrap",
                "--insecure",
                "--release-key",
                key.to_str().unwrap(),
                "--dry-run",
            ],
        )
    };
    let out = install(&public);
    let shown = text(&out);
    assert!(out.status.success(), "{shown}");
    assert!(
        shown.contains("would write /etc/cluster/release-key-1.pub")
            && shown.contains("BEGIN PUBLIC KEY")
            && shown.contains("release_keys = [\"/etc/cluster/release-key-1.pub\"]"),
        "{shown}"
    );
    assert_eq!(host_state(), before, "a dry run changes nothing");

    // The config it would write is one the node accepts, keys included.
    let toml: String = shown
        .lines()
        .skip_while(|line| !line.starts_with("would write /etc/cluster/node.toml"))
        .skip(1)
        .take_while(|line| line.starts_with("    "))
        .map(|line| format!("{}\n", line.trim_start()))
        .collect();
    // A data dir that is a file: the node gets past its configuration, then stops there.
    let not_a_dir = work.path().join("not-a-dir");
    std::fs::write(&not_a_dir, "").unwrap();
    let config = work.path().join("node.toml");
    let toml = toml
        .replace("/var/lib/cluster", not_a_dir.to_str().unwrap())
        .replace("/etc/cluster/release-key-1.pub", public.to_str().unwrap());
    std::fs::write(&config, toml).unwrap();
    let node = crate::harness::cli(&[
        "node",
        "run",
        "--config",
        config.to_str().unwrap(),
        "--insecure",
    ]);
    let said = text(&node);
    assert!(
        !node.status.success()
            && !said.contains("malformed")
            && !said.contains("release key")
            && said.contains("is not usable"),
        "the written config parses, keys and all: {said}"
    );

    let out = install(&keys.join("release.key"));
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("is a private key"), "{}", text(&out));
    assert_eq!(host_state(), before);
}

#[test]
fn install_refuses_bad_flags_with_a_clear_error_and_changes_nothing() {
    let work = tempfile::tempdir().unwrap();
    let dist = work.path().join("dist");
    make_release(&dist, &[]);
    let dist = dist.to_str().unwrap();
    let before = host_state();
    let cases: [(&[&str], &str); 10] = [
        (
            &["--id", "1", "--listen", "10.0.0.1:7100", "--bootstrap"],
            "--dist",
        ),
        (
            &[
                "--dist",
                "/nonexistent",
                "--id",
                "1",
                "--listen",
                "10.0.0.1:7100",
                "--bootstrap",
            ],
            "missing or not executable",
        ),
        (
            &[
                "--dist",
                dist,
                "--id",
                "0",
                "--listen",
                "10.0.0.1:7100",
                "--bootstrap",
            ],
            "--id",
        ),
        (
            &[
                "--dist",
                dist,
                "--id",
                "1",
                "--listen",
                "somewhere",
                "--bootstrap",
            ],
            "--listen",
        ),
        (
            &[
                "--dist",
                dist,
                "--id",
                "1",
                "--listen",
                "10.0.0.1:0",
                "--bootstrap",
            ],
            "port",
        ),
        (
            &["--dist", dist, "--id", "1", "--listen", "10.0.0.1:7100"],
            "--bootstrap",
        ),
        (
            &[
                "--dist",
                dist,
                "--id",
                "1",
                "--listen",
                "10.0.0.1:7100",
                "--bootstrap",
                "--join",
                "10.0.0.2:7100",
            ],
            "exclude each other",
        ),
        (
            &[
                "--dist",
                dist,
                "--id",
                "2",
                "--listen",
                "10.0.0.2:7100",
                "--join",
                "10.0.0.1:7100,leader",
            ],
            "or several separated by commas",
        ),
        (
            &[
                "--dist",
                dist,
                "--id",
                "1",
                "--listen",
                "0.0.0.0:7100",
                "--bootstrap",
            ],
            "--advertise",
        ),
        (
            &[
                "--dist",
                dist,
                "--id",
                "1",
                "--listen",
                "10.0.0.1:7100",
                "--bootstrap",
                "--bogus",
            ],
            "unknown argument",
        ),
    ];
    for (args, expected) in cases {
        let out = script("install.sh", args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", text(&out));
        assert!(text(&out).contains(expected), "{args:?}: {}", text(&out));
    }
    // Credentials: required, and checked before any change (no --dry-run here).
    let tls_arg = |name: &str| creds(name).to_str().unwrap().to_string();
    let (node_1, node_3, operator, ca) = (
        tls_arg("n1"),
        tls_arg("n3"),
        tls_arg("operator"),
        tls_arg("ca"),
    );
    let node = [
        "--dist",
        dist,
        "--id",
        "1",
        "--listen",
        "10.0.0.1:7100",
        "--bootstrap",
    ];
    let tls_cases: [(&[&str], &str); 6] = [
        (&[], "--tls <dir> is required"),
        (&["--tls", &node_1, "--insecure"], "exclude each other"),
        (&["--tls", "/nonexistent"], "is not a directory"),
        (&["--tls", &ca], "cert.pem is missing"),
        (
            &["--tls", &node_3],
            "is for cluster://node/3, and this is node 1",
        ),
        (&["--tls", &operator], "is for cluster://operator/test"),
    ];
    for (extra, expected) in tls_cases {
        let args: Vec<&str> = node.iter().chain(extra).copied().collect();
        let out = script("install.sh", &args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", text(&out));
        assert!(text(&out).contains(expected), "{args:?}: {}", text(&out));
    }
    // A dist that does not match its version.json.
    std::fs::write(Path::new(dist).join("bin/extra"), "tampered").unwrap();
    let out = script(
        "install.sh",
        &[
            "--dist",
            dist,
            "--id",
            "1",
            "--listen",
            "10.0.0.1:7100",
            "--bootstrap",
            "--tls",
            &node_1,
            "--dry-run",
        ],
    );
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("version.json"), "{}", text(&out));
    assert_eq!(host_state(), before);
}

/// The README's production block is what tests/nspawn/run.sh runs; this checks it without
/// root: every line sits under a host marker the runner knows, and every install.sh line
/// is accepted by install.sh (as a dry run, on a real dist).
#[test]
fn the_readme_production_block_is_runnable_as_written() {
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let block: Vec<&str> = readme
        .lines()
        .skip_while(|line| !line.starts_with("<!-- production-install: tests/nspawn/run.sh"))
        .skip_while(|line| *line != "```sh")
        .skip(1)
        .take_while(|line| *line != "```")
        .collect();
    assert!(block.len() > 5, "README.md has the production block");
    let work = tempfile::tempdir().unwrap();
    let dist = work.path().join("dist");
    make_release(&dist, &[]);
    let mut context = None;
    let mut installs = 0;
    for line in block {
        if let Some(marker) = line.strip_prefix("# ") {
            let known = ["build host", "any host", "host "]
                .iter()
                .find(|m| marker.starts_with(*m));
            if let Some(known) = known {
                context = Some(*known);
            }
            continue;
        }
        assert!(context.is_some(), "{line:?} comes after a host marker");
        if let Some(install) = line.strip_prefix("sudo scripts/install.sh ") {
            assert!(context == Some("host "), "{line:?} runs on a host");
            // Each host's copy of the credentials the build host issued for it.
            let node_creds = format!("{}/n", tls_dir().display());
            let mut args: Vec<String> = install
                .split_whitespace()
                .map(|arg| {
                    arg.replace("/tmp/cluster-dist", dist.to_str().unwrap())
                        .replace("/tmp/cluster-node-", &node_creds)
                })
                .collect();
            args.push("--dry-run".into());
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let out = script("install.sh", &args);
            assert!(out.status.success(), "{line}: {}", text(&out));
            installs += 1;
        }
    }
    assert_eq!(installs, 3, "three hosts are installed");
}
