//! `cluster dist keygen|stamp|hash|verify|install`: the command line over [`crate::release`].

use std::io::Write;

use anyhow::Context;
use std::path::PathBuf;

use serde::Serialize;

use crate::error::Chain;
use crate::release::keys::{self, GeneratedKey};
use crate::release::{self, Limits, ReleaseStore, VersionInfo};

/// One-line help for `cluster dist`, for the parent command's `about`.
pub const ABOUT: &str = "Stamp, sign, hash, verify and install a release directory (a dist)";

/// Full help for `cluster dist`, for the parent command's `long_about`.
pub const LONG_ABOUT: &str = "\
Stamp, hash, verify and install a release directory (a dist).

A dist is a directory holding everything one release of cluster needs on a host: at least
the binary bin/cluster, plus any other files, directories and relative symlinks that stay
inside it. Nodes install dists under <data>/releases/<build-hash>/ and run
<data>/current/bin/cluster.

The build hash identifies a dist by its content: SHA-256 over the sorted list of every
entry's relative path, kind (file, directory, symlink), permission bits, size and content
SHA-256 (the target, for a symlink). It ignores mtimes, owners and version.json, so the
same tree hashes the same on every machine. Devices, FIFOs, sockets, setuid/setgid/sticky
bits and symlinks that leave the dist are refused.

Signed releases: make a key pair once with `cluster dist keygen <dir>`, sign every dist with
`cluster dist stamp <dist> --sign <dir>/release.key`, and start every node with
`--release-key <dir>/release.pub` (or release_keys in its node.toml). Such a node installs
and activates only releases signed by a key it trusts, and `cluster update` refuses any
other before it changes anything.";

/// What to do with a dist.
#[derive(Debug, Clone, PartialEq, Eq, clap::Subcommand)]
pub enum DistCommand {
    /// Make a release signing key pair: DIR/release.key (private) and DIR/release.pub
    #[command(long_about = "\
Make a release signing key pair: DIR/release.key and DIR/release.pub, and print the key id.

release.key is the Ed25519 private key (PKCS#8 PEM, mode 0600): it signs releases with
`cluster dist stamp <dist> --sign DIR/release.key`. Keep it where releases are built, never
on the nodes. release.pub is the public key (SPKI PEM): give it to every node with
`cluster node run --release-key DIR/release.pub` (or release_keys in node.toml), and the
node accepts only releases signed with this key. The key id (16 hex digits of the SHA-256
of the public key) is how signatures and refusals name the key.

DIR is created if missing. An existing release.key or release.pub is never replaced:
nothing is written then.")]
    Keygen {
        /// Directory for release.key and release.pub
        dir: PathBuf,
        /// Print JSON: {keyId, privateKey, publicKey}
        #[arg(long)]
        json: bool,
    },

    /// Write DIR/version.json with the dist's build hash (signed with --sign), and print the hash
    #[command(long_about = "\
Write DIR/version.json with the dist's build hash, and print the hash.

version.json records buildHash, builtAt (now, RFC 3339), gitCommit (the short commit of the
git repository holding DIR, or \"unknown\"), files (how many regular files) and the hashed
fields of every entry, so that `cluster dist verify` can name what changed. The file is
replaced atomically; if the dist is invalid nothing is written.

With --sign KEY (a release.key from `cluster dist keygen`), version.json also gets a
signature: the key's id and an Ed25519 signature over the build hash, builtAt, gitCommit
and files. It travels with the release to every node (uploads, fetches, rollouts); nodes
started with --release-key accept only releases signed by a key they trust. The signature
is not part of the build hash. Changing the dist afterwards voids it: stamp and sign again.
Without --sign, version.json is written unsigned.")]
    Stamp {
        /// The dist directory; it must contain bin/cluster
        dir: PathBuf,
        /// Sign the release with this private key (release.key from `cluster dist keygen`)
        #[arg(long, value_name = "KEY_FILE")]
        sign: Option<PathBuf>,
        /// Print the version record as JSON (without the per-entry list) instead of the hash
        #[arg(long)]
        json: bool,
        /// Record this commit as gitCommit (letters and digits, e.g. `git rev-parse
        /// --short HEAD` in the checkout it was built from) instead of asking git in DIR
        #[arg(long, value_name = "REV", value_parser = commit_id)]
        git_commit: Option<String>,
    },

    /// Print the build hash of a dist without writing anything
    Hash {
        /// The dist directory; it must contain bin/cluster
        dir: PathBuf,
    },

    /// Check that a dist's content still matches its version.json
    #[command(long_about = "\
Check that a dist's content still matches its version.json.

Exit status 0: the content hashes to the recorded buildHash. Exit status 1: it does not,
or version.json is missing; the first missing, extra or changed entry is named on stderr.
Any other failure (no such directory, an invalid dist, an unreadable file) is reported as
an error.

With --release-key (repeatable), the dist must also be signed by one of those keys, as a
node started with the same keys requires; an unsigned or foreign-signed dist exits 1.")]
    Verify {
        /// The dist directory; it must contain bin/cluster and version.json
        dir: PathBuf,
        /// On success, print the version record as JSON (without the per-entry list)
        #[arg(long)]
        json: bool,
        /// Also require a signature by this public key (release.pub); repeat for several
        #[arg(long = "release-key", value_name = "FILE")]
        release_keys: Vec<PathBuf>,
    },

    /// Install a dist into a node's data directory and make it the current release
    #[command(long_about = "\
Install a dist into a node's data directory and make it the current release.

The dist is copied to <data-dir>/releases/<build-hash>/ (files that an installed release
already has are hard-linked from it), its version.json is written, the copy is verified
against the build hash, and only then is it renamed into place. <data-dir>/current is then
pointed at it with an atomic symlink swap; what it pointed at before is printed.

Nothing is restarted and <data-dir>/previous is left as it is: use this to put the first
release on a host before `cluster node run` starts from <data-dir>/current/bin/cluster, or to
switch releases by hand on a stopped node. Installing a release that is already there only
moves current. If the dist is invalid, or
another process (a running node) has the data directory open, nothing changes.

Give the node's --release-key files here too: a dist not signed by one of them is then
refused before anything is copied, as the node itself would refuse it.")]
    Install {
        /// The dist directory; it must contain bin/cluster
        dist: PathBuf,
        /// The node's data directory (created if missing)
        #[arg(long)]
        data_dir: PathBuf,
        /// Require a signature by this public key (release.pub); repeat for several
        #[arg(long = "release-key", value_name = "FILE")]
        release_keys: Vec<PathBuf>,
        /// Print the result as JSON: buildHash, currentBefore (null if none), dataDir
        #[arg(long)]
        json: bool,
    },
}

/// What `cluster dist install --json` prints.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Installed {
    /// The release now current.
    build_hash: String,
    /// The release current pointed at before, if any.
    current_before: Option<String>,
    /// Where it was installed.
    data_dir: PathBuf,
}

/// Runs `command`, printing results on stdout; returns the process exit status.
pub fn run(command: DistCommand) -> anyhow::Result<i32> {
    execute(command, &mut std::io::stdout(), &mut std::io::stderr())
}

/// Refuses a dist whose `service.toml` no node would run, naming the field.
fn check_services(dir: &std::path::Path) -> anyhow::Result<()> {
    crate::service::definitions_of(dir)
        .map(|_| ())
        .with_context(|| format!("{} is not a valid release", dir.display()))
}

/// [`run`] with its output streams as arguments, so tests can read what it prints.
fn execute(command: DistCommand, out: &mut dyn Write, err: &mut dyn Write) -> anyhow::Result<i32> {
    // The CLI has no flag for limits yet: the defaults are far above any real release.
    let limits = Limits::default();
    match command {
        DistCommand::Keygen { dir, json } => {
            let generated = keys::keygen(&dir)?;
            if json {
                serde_json::to_writer_pretty(&mut *out, &generated)?;
                writeln!(out)?;
            } else {
                print_generated(out, &generated)?;
            }
            Ok(0)
        }
        DistCommand::Stamp {
            dir,
            sign,
            json,
            git_commit,
        } => {
            // The key first: a bad key file must not leave a fresh, unsigned version.json.
            let key = sign.as_deref().map(keys::read_signing_key).transpose()?;
            // Nor may a service definition that no node would run.
            check_services(&dir)?;
            let info = release::stamp_from(&dir, &limits, key.as_ref(), git_commit.as_deref())?;
            if json {
                print_json(out, &info)?;
            } else {
                writeln!(out, "{}", info.build_hash)?;
            }
            if let Some(signed) = &info.signature {
                writeln!(err, "signed with key {}", signed.key_id)?;
            }
            Ok(0)
        }
        DistCommand::Hash { dir } => {
            writeln!(out, "{}", release::hash(&dir, &limits)?)?;
            Ok(0)
        }
        DistCommand::Verify {
            dir,
            json,
            release_keys,
        } => {
            let trusted = keys::read_trusted_keys(&release_keys)?;
            let info = match release::verify(&dir, &limits) {
                Ok(info) => info,
                Err(error) if error.is_mismatch() => {
                    writeln!(err, "{}", Chain(&error))?;
                    return Ok(1);
                }
                Err(error) => return Err(error.into()),
            };
            // Verified: the recorded hash and file count are the content's.
            let record = info.signature_record();
            let signed = release::signature::check_release(
                &trusted,
                &info.build_hash,
                info.files,
                record.as_ref(),
            );
            if let Err(refused) = signed {
                writeln!(err, "{}: {}", dir.display(), Chain(&refused))?;
                return Ok(1);
            }
            if json {
                print_json(out, &info)?;
            } else {
                writeln!(
                    out,
                    "{}: ok, build {} ({} files, built {}, commit {}, {})",
                    dir.display(),
                    info.build_hash,
                    info.files,
                    info.built_at,
                    info.git_commit,
                    match &info.signature {
                        Some(signed) if !trusted.is_empty() =>
                            format!("signed by trusted key {}", signed.key_id),
                        Some(signed) => format!("signed by key {}", signed.key_id),
                        None => "unsigned".to_owned(),
                    }
                )?;
            }
            Ok(0)
        }
        DistCommand::Install {
            dist,
            data_dir,
            json,
            release_keys,
        } => {
            let trusted = keys::read_trusted_keys(&release_keys)?;
            if !trusted.is_empty() {
                // Before anything is copied: the check a node makes on what it installs.
                release::signature::check(&trusted, &release::scan_signed(&dist, &limits)?)?;
            }
            check_services(&dist)?;
            let store = ReleaseStore::open(&data_dir)?;
            let current_before = store.current()?;
            let build_hash = store.install_dir(&dist, &limits)?;
            store.activate(&build_hash)?;
            if json {
                serde_json::to_writer_pretty(
                    &mut *out,
                    &Installed {
                        build_hash,
                        current_before,
                        data_dir,
                    },
                )?;
                writeln!(out)?;
            } else {
                writeln!(out, "{build_hash}")?;
                writeln!(
                    out,
                    "current: {} -> {build_hash} (in {})",
                    current_before.as_deref().unwrap_or("none"),
                    data_dir.display()
                )?;
            }
            Ok(0)
        }
    }
}

fn print_generated(out: &mut dyn Write, generated: &GeneratedKey) -> anyhow::Result<()> {
    writeln!(out, "key {}", generated.key_id)?;
    writeln!(
        out,
        "private key: {} (signs: cluster dist stamp <dist> --sign {}; keep it off the nodes)",
        generated.private_key.display(),
        generated.private_key.display()
    )?;
    writeln!(
        out,
        "public key:  {} (give every node: cluster node run --release-key {})",
        generated.public_key.display(),
        generated.public_key.display()
    )?;
    Ok(())
}

fn print_json(out: &mut dyn Write, info: &VersionInfo) -> anyhow::Result<()> {
    serde_json::to_writer_pretty(&mut *out, &info.without_manifest())?;
    writeln!(out)?;
    Ok(())
}

/// `--git-commit`: what version.json may record as gitCommit.
fn commit_id(text: &str) -> Result<String, String> {
    if !text.is_empty() && text.len() <= 64 && text.bytes().all(|b| b.is_ascii_alphanumeric()) {
        Ok(text.to_owned())
    } else {
        Err("a commit is letters and digits, at most 64 (e.g. `git rev-parse --short HEAD`)".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, Parser};
    use std::fs;
    use std::os::unix::fs::PermissionsExt;

    /// Stands in for the real top-level CLI, which mounts these as `cluster dist ...`.
    #[derive(Debug, Parser)]
    #[command(name = "dist", about = ABOUT, long_about = LONG_ABOUT)]
    struct DistCli {
        #[command(subcommand)]
        command: DistCommand,
    }

    fn parse(args: &[&str]) -> DistCommand {
        DistCli::try_parse_from(std::iter::once("dist").chain(args.iter().copied()))
            .unwrap()
            .command
    }

    /// Runs a command line; returns (status, stdout, stderr).
    fn exec(args: &[&str]) -> (anyhow::Result<i32>, String, String) {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let status = execute(parse(args), &mut out, &mut err);
        (
            status,
            String::from_utf8(out).unwrap(),
            String::from_utf8(err).unwrap(),
        )
    }

    fn sample_dist() -> tempfile::TempDir {
        let dist = tempfile::tempdir().unwrap();
        let binary = dist.path().join("bin/cluster");
        fs::create_dir_all(binary.parent().unwrap()).unwrap();
        fs::write(&binary, b"binary").unwrap();
        fs::set_permissions(&binary, fs::Permissions::from_mode(0o755)).unwrap();
        dist
    }

    #[test]
    fn definitions_are_consistent() {
        DistCli::command().debug_assert();
        assert_eq!(
            parse(&["stamp", "--json", "d"]),
            DistCommand::Stamp {
                dir: "d".into(),
                sign: None,
                json: true,
                git_commit: None,
            }
        );
        assert_eq!(
            parse(&[
                "stamp",
                "d",
                "--sign",
                "k/release.key",
                "--git-commit",
                "0ab12cd"
            ]),
            DistCommand::Stamp {
                dir: "d".into(),
                sign: Some("k/release.key".into()),
                json: false,
                git_commit: Some("0ab12cd".into()),
            }
        );
        let refused = DistCli::try_parse_from(["dist", "stamp", "d", "--git-commit", "a-b"]);
        assert!(refused
            .unwrap_err()
            .to_string()
            .contains("letters and digits"));
        let help = DistCli::command().render_long_help().to_string();
        assert!(help.contains("build hash"), "{help}");
        assert_eq!(
            parse(&["install", "d", "--data-dir", "/var/lib/cluster"]),
            DistCommand::Install {
                dist: "d".into(),
                data_dir: "/var/lib/cluster".into(),
                json: false,
                release_keys: vec![],
            }
        );
        let mut cli = DistCli::command();
        let install = cli.find_subcommand_mut("install").unwrap();
        let help = install.render_long_help().to_string();
        assert!(help.contains("atomic symlink swap"), "{help}");
        assert!(help.contains("--data-dir"), "{help}");
    }

    #[test]
    fn stamp_hash_verify() {
        let dist = sample_dist();
        let dir = dist.path().to_str().unwrap();

        let (status, hash_out, _) = exec(&["hash", dir]);
        assert_eq!(status.unwrap(), 0);
        let (status, stamp_out, _) = exec(&["stamp", dir]);
        assert_eq!(status.unwrap(), 0);
        assert_eq!(stamp_out, hash_out);
        assert_eq!(stamp_out.trim().len(), 64);

        let (status, out, _) = exec(&["verify", dir]);
        assert_eq!(status.unwrap(), 0);
        assert!(out.contains(": ok, build "), "{out}");

        let (status, out, _) = exec(&["verify", "--json", dir]);
        assert_eq!(status.unwrap(), 0);
        let value: serde_json::Value = serde_json::from_str(&out).unwrap();
        let mut keys: Vec<&String> = value.as_object().unwrap().keys().collect();
        keys.sort();
        assert_eq!(keys, ["buildHash", "builtAt", "files", "gitCommit"]);
        assert_eq!(value["buildHash"], stamp_out.trim());
    }

    #[test]
    fn keygen_then_a_signed_stamp() {
        let keys = tempfile::tempdir().unwrap();
        let key_dir = keys.path().join("k");
        let (status, out, _) = exec(&["keygen", key_dir.to_str().unwrap()]);
        assert_eq!(status.unwrap(), 0);
        let key_id = out
            .lines()
            .next()
            .and_then(|line| line.strip_prefix("key "))
            .unwrap()
            .to_owned();
        assert_eq!(key_id.len(), 16, "{out}");
        assert!(
            out.contains("--sign") && out.contains("--release-key"),
            "{out}"
        );

        // Again: refused, and the key pair is untouched.
        let private = fs::read(key_dir.join("release.key")).unwrap();
        let (status, out, _) = exec(&["keygen", key_dir.to_str().unwrap(), "--json"]);
        let message = format!("{:#}", status.unwrap_err());
        assert!(message.contains("already exists"), "{message}");
        assert!(out.is_empty());
        assert_eq!(fs::read(key_dir.join("release.key")).unwrap(), private);

        let dist = sample_dist();
        let dir = dist.path().to_str().unwrap();
        let key = key_dir.join("release.key");
        let (status, out, err) = exec(&["stamp", dir, "--sign", key.to_str().unwrap(), "--json"]);
        assert_eq!(status.unwrap(), 0);
        assert!(err.contains(&format!("signed with key {key_id}")), "{err}");
        let value: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(value["signature"]["keyId"], key_id.as_str(), "{out}");
        let (status, out, _) = exec(&["verify", dir]);
        assert_eq!(status.unwrap(), 0);
        assert!(out.contains(&format!("signed by key {key_id}")), "{out}");

        // Signing with the public key is refused and leaves version.json as it was.
        let before = fs::read(dist.path().join("version.json")).unwrap();
        let public = key_dir.join("release.pub");
        let (status, _, _) = exec(&["stamp", dir, "--sign", public.to_str().unwrap()]);
        let message = format!("{:#}", status.unwrap_err());
        assert!(message.contains("it is a public key"), "{message}");
        assert_eq!(fs::read(dist.path().join("version.json")).unwrap(), before);

        // Stamping without --sign writes an unsigned version.json.
        exec(&["stamp", dir]).0.unwrap();
        let (_, out, _) = exec(&["verify", dir]);
        assert!(out.contains("unsigned"), "{out}");
    }

    #[test]
    fn verify_and_install_with_release_keys_accept_only_their_signatures() {
        let keys = tempfile::tempdir().unwrap();
        let (ours, theirs) = (keys.path().join("ours"), keys.path().join("theirs"));
        exec(&["keygen", ours.to_str().unwrap()]).0.unwrap();
        exec(&["keygen", theirs.to_str().unwrap()]).0.unwrap();
        let pub_of = |dir: &std::path::Path| dir.join("release.pub").to_str().unwrap().to_owned();
        let dist = sample_dist();
        let dir = dist.path().to_str().unwrap();
        let key = ours.join("release.key");
        exec(&["stamp", dir, "--sign", key.to_str().unwrap()])
            .0
            .unwrap();

        let (status, out, _) = exec(&["verify", dir, "--release-key", &pub_of(&ours)]);
        assert_eq!(status.unwrap(), 0);
        assert!(out.contains("signed by trusted key"), "{out}");
        let (status, out, err) = exec(&["verify", dir, "--release-key", &pub_of(&theirs)]);
        assert_eq!(status.unwrap(), 1);
        assert!(out.is_empty());
        assert!(
            err.contains("not trusted") || err.contains("trust"),
            "{err}"
        );

        let data = tempfile::tempdir().unwrap();
        let data_dir = data.path().join("node");
        let install = |key: &str| {
            exec(&[
                "install",
                dir,
                "--data-dir",
                data_dir.to_str().unwrap(),
                "--release-key",
                key,
            ])
        };
        let message = format!("{:#}", install(&pub_of(&theirs)).0.unwrap_err());
        assert!(message.contains("trust"), "{message}");
        assert!(!data_dir.exists(), "a refused install touches nothing");
        assert_eq!(install(&pub_of(&ours)).0.unwrap(), 0);
        assert!(data_dir.join("current/bin/cluster").exists());

        // Unsigned: refused by both once a key is given.
        exec(&["stamp", dir]).0.unwrap();
        let (status, _, err) = exec(&["verify", dir, "--release-key", &pub_of(&ours)]);
        assert_eq!(status.unwrap(), 1);
        assert!(
            err.contains("unsigned") || err.contains("not signed"),
            "{err}"
        );
    }

    #[test]
    fn verify_mismatch_exits_1_and_says_why() {
        let dist = sample_dist();
        let dir = dist.path().to_str().unwrap();
        exec(&["stamp", dir]).0.unwrap();
        fs::write(dist.path().join("extra"), b"x").unwrap();
        let (status, out, err) = exec(&["verify", dir]);
        assert_eq!(status.unwrap(), 1);
        assert!(out.is_empty());
        assert!(err.contains("extra is in the dist but not listed"), "{err}");
    }

    #[test]
    fn install_points_current_at_the_dist() {
        let data = tempfile::tempdir().unwrap();
        let data_dir = data.path().join("node");
        let data_arg = data_dir.to_str().unwrap();
        let first = sample_dist();
        let (status, out, _) = exec(&[
            "install",
            first.path().to_str().unwrap(),
            "--data-dir",
            data_arg,
        ]);
        assert_eq!(status.unwrap(), 0);
        let first_hash = out.lines().next().unwrap().to_owned();
        assert_eq!(first_hash.len(), 64, "{out}");
        assert!(
            out.contains(&format!("current: none -> {first_hash}")),
            "{out}"
        );
        assert!(data_dir.join("current/bin/cluster").is_file());
        assert!(data_dir.join("current/version.json").is_file());

        let second = sample_dist();
        fs::write(second.path().join("bin/cluster"), b"binary 2").unwrap();
        let (status, out, _) = exec(&[
            "install",
            second.path().to_str().unwrap(),
            "--data-dir",
            data_arg,
            "--json",
        ]);
        assert_eq!(status.unwrap(), 0);
        let value: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(value["currentBefore"], first_hash.as_str());
        assert_eq!(value["dataDir"], data_arg);
        let second_hash = value["buildHash"].as_str().unwrap();
        assert_ne!(second_hash, first_hash);
        assert_eq!(
            fs::read(data_dir.join("current/bin/cluster")).unwrap(),
            b"binary 2"
        );
        assert!(
            !data_dir.join("previous").exists(),
            "install does not pin a backup"
        );
    }

    #[test]
    fn install_of_a_bad_dist_changes_nothing() {
        let data = tempfile::tempdir().unwrap();
        let good = sample_dist();
        let data_arg = data.path().to_str().unwrap();
        exec(&[
            "install",
            good.path().to_str().unwrap(),
            "--data-dir",
            data_arg,
        ])
        .0
        .unwrap();
        let before = fs::read_link(data.path().join("current")).unwrap();
        let bad = sample_dist();
        fs::remove_file(bad.path().join("bin/cluster")).unwrap();
        let (status, out, _) = exec(&[
            "install",
            bad.path().to_str().unwrap(),
            "--data-dir",
            data_arg,
        ]);
        let message = format!("{:#}", status.unwrap_err());
        assert!(message.contains("bin/cluster is missing"), "{message}");
        assert!(out.is_empty());
        assert_eq!(fs::read_link(data.path().join("current")).unwrap(), before);
    }

    #[test]
    fn invalid_dist_is_an_error() {
        let holder = tempfile::tempdir().unwrap();
        let missing = holder.path().join("nope");
        let (status, out, _) = exec(&["verify", missing.to_str().unwrap()]);
        let message = format!("{:#}", status.unwrap_err());
        assert!(message.contains("does not exist"), "{message}");
        assert!(out.is_empty());
    }
}
