//! `cluster dist stamp|hash|verify`: the command line over [`crate::dist`].

use std::io::Write;
use std::path::PathBuf;

use crate::dist::{self, Limits, VersionInfo};

/// One-line help for `cluster dist`, for the parent command's `about`.
pub const ABOUT: &str = "Stamp, hash and verify a release directory (a dist)";

/// Full help for `cluster dist`, for the parent command's `long_about`.
pub const LONG_ABOUT: &str = "\
Stamp, hash and verify a release directory (a dist).

A dist is a directory holding everything one release of cluster needs on a host: at least
the binary bin/cluster, plus any other files, directories and relative symlinks that stay
inside it. Nodes install dists under <data>/releases/<build-hash>/ and run
<data>/current/bin/cluster.

The build hash identifies a dist by its content: SHA-256 over the sorted list of every
entry's relative path, kind (file, directory, symlink), permission bits, size and content
SHA-256 (the target, for a symlink). It ignores mtimes, owners and version.json, so the
same tree hashes the same on every machine. Devices, FIFOs, sockets, setuid/setgid/sticky
bits and symlinks that leave the dist are refused.";

/// What to do with a dist.
#[derive(Debug, Clone, PartialEq, Eq, clap::Subcommand)]
pub enum DistCommand {
    /// Write DIR/version.json with the dist's build hash, and print the hash
    #[command(long_about = "\
Write DIR/version.json with the dist's build hash, and print the hash.

version.json records buildHash, builtAt (now, RFC 3339), gitCommit (the short commit of the
git repository holding DIR, or \"unknown\"), files (how many regular files) and the hashed
fields of every entry, so that `cluster dist verify` can name what changed. The file is
replaced atomically; if the dist is invalid nothing is written.")]
    Stamp {
        /// The dist directory; it must contain bin/cluster
        dir: PathBuf,
        /// Print the version record as JSON (without the per-entry list) instead of the hash
        #[arg(long)]
        json: bool,
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
an error.")]
    Verify {
        /// The dist directory; it must contain bin/cluster and version.json
        dir: PathBuf,
        /// On success, print the version record as JSON (without the per-entry list)
        #[arg(long)]
        json: bool,
    },
}

/// Runs `command`, printing results on stdout; returns the process exit status.
pub fn run(command: DistCommand) -> anyhow::Result<i32> {
    execute(command, &mut std::io::stdout(), &mut std::io::stderr())
}

/// [`run`] with its output streams as arguments, so tests can read what it prints.
fn execute(command: DistCommand, out: &mut dyn Write, err: &mut dyn Write) -> anyhow::Result<i32> {
    // The CLI has no flag for limits yet: the defaults are far above any real release.
    let limits = Limits::default();
    match command {
        DistCommand::Stamp { dir, json } => {
            let info = dist::stamp(&dir, &limits)?;
            if json {
                print_json(out, &info)?;
            } else {
                writeln!(out, "{}", info.build_hash)?;
            }
            Ok(0)
        }
        DistCommand::Hash { dir } => {
            writeln!(out, "{}", dist::hash(&dir, &limits)?)?;
            Ok(0)
        }
        DistCommand::Verify { dir, json } => match dist::verify(&dir, &limits) {
            Ok(info) if json => {
                print_json(out, &info)?;
                Ok(0)
            }
            Ok(info) => {
                writeln!(
                    out,
                    "{}: ok, build {} ({} files, built {}, commit {})",
                    dir.display(),
                    info.build_hash,
                    info.files,
                    info.built_at,
                    info.git_commit
                )?;
                Ok(0)
            }
            Err(error) if error.is_mismatch() => {
                writeln!(err, "{error}")?;
                Ok(1)
            }
            Err(error) => Err(error.into()),
        },
    }
}

fn print_json(out: &mut dyn Write, info: &VersionInfo) -> anyhow::Result<()> {
    serde_json::to_writer_pretty(&mut *out, &info.without_manifest())?;
    writeln!(out)?;
    Ok(())
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
                json: true
            }
        );
        let help = DistCli::command().render_long_help().to_string();
        assert!(help.contains("build hash"), "{help}");
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
    fn invalid_dist_is_an_error() {
        let holder = tempfile::tempdir().unwrap();
        let missing = holder.path().join("nope");
        let (status, out, _) = exec(&["verify", missing.to_str().unwrap()]);
        let message = status.unwrap_err().to_string();
        assert!(message.contains("does not exist"), "{message}");
        assert!(out.is_empty());
    }
}
