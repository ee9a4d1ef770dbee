//! `version.json`: the build hash of a dist, written into it and checked against it.
//!
//! The file holds the four keys the rest of the system reads (`buildHash`, `builtAt`,
//! `gitCommit`, `files`) plus a fifth, `manifest`: one `[path, kind, mode, size, content]`
//! row per entry, exactly the fields the build hash covers (see [`EntrySummary`]). The hash
//! alone can only say *that* a dist changed; the rows let [`verify`] say *which* entry is
//! missing, extra or changed. Chunk lists stay out: they are recomputed by scanning and
//! would make the file several times larger without helping anyone read it.
//!
//! A signed dist (`cluster dist stamp --sign`) has a sixth key, `signature`: the signing
//! key's id and an Ed25519 signature over the build hash and the version fields (see
//! [`super::signature`]).
//!
//! The file itself is excluded from the build hash, so stamping (and signing) never changes
//! the hash.

use std::fs;
use std::io;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use ed25519_dalek::SigningKey;

use super::manifest::{build_hash_of, EntrySummary, Limits, Manifest, SummaryKind, VERSION_FILE};
use super::scan::{check_root, scan, scan_summary};
use super::signature::{self, Signature, Subject};
use super::DistError;
use crate::fs::{write_atomically, IoError};

/// What `version.json` records about a dist.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VersionInfo {
    /// The build hash: identity of the content, 64 lowercase hex characters.
    pub build_hash: String,
    /// When it was stamped, RFC 3339 in UTC to the second. For people; never compared.
    pub built_at: String,
    /// Short commit of the git repository holding the dist, or "unknown". For people.
    pub git_commit: String,
    /// Number of regular files.
    pub files: u64,
    /// Who signed the release and the signature, for a dist stamped with `--sign`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<VersionSignature>,
    /// The hashed fields of every entry, so `verify` can name what changed. Absent in
    /// `--json` output and in files written by other tools.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manifest: Option<Vec<EntrySummary>>,
}

/// The `signature` of version.json: the part of a [`Signature`] record that the other keys
/// of the file do not already hold.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VersionSignature {
    /// The signing key's id.
    pub key_id: String,
    /// The Ed25519 signature, 128 lowercase hex characters.
    pub ed25519: String,
}

impl VersionInfo {
    /// The version record of `manifest`, stamped at `built_at`.
    pub fn describe(manifest: &Manifest, built_at: SystemTime, git_commit: String) -> Self {
        Self::describe_rows(manifest.summary(), built_at, git_commit)
    }

    /// The version record of a dist whose manifest has `rows`, stamped at `built_at`.
    pub fn describe_rows(
        rows: Vec<EntrySummary>,
        built_at: SystemTime,
        git_commit: String,
    ) -> Self {
        VersionInfo {
            build_hash: build_hash_of(&rows),
            built_at: humantime::format_rfc3339_seconds(built_at).to_string(),
            git_commit,
            files: rows
                .iter()
                .filter(|row| row.kind == SummaryKind::File)
                .count() as u64,
            signature: None,
            manifest: Some(rows),
        }
    }

    /// What a signature of this record covers.
    pub fn subject(&self) -> Subject<'_> {
        Subject {
            build_hash: &self.build_hash,
            built_at: &self.built_at,
            git_commit: &self.git_commit,
            files: self.files,
        }
    }

    /// Signs this record with `key`, replacing any signature it had.
    pub fn sign(&mut self, key: &SigningKey) {
        let record = signature::sign(key, &self.subject());
        self.signature = Some(VersionSignature {
            key_id: record.key_id,
            ed25519: record.ed25519,
        });
    }

    /// The signature record a manifest of this release carries, if the dist is signed.
    pub fn signature_record(&self) -> Option<Signature> {
        self.signature.as_ref().map(|signed| Signature {
            key_id: signed.key_id.clone(),
            built_at: self.built_at.clone(),
            git_commit: self.git_commit.clone(),
            ed25519: signed.ed25519.clone(),
        })
    }

    /// The same record without the per-entry rows: what people and scripts want to see.
    pub fn without_manifest(&self) -> VersionInfo {
        VersionInfo {
            manifest: None,
            ..self.clone()
        }
    }

    /// The text of version.json: indented like `serde_json::to_string_pretty`, except that
    /// each manifest row stays on one line so the file reads (and diffs) as a list.
    pub fn to_file_text(&self) -> String {
        fn json<T: Serialize + ?Sized>(value: &T) -> String {
            serde_json::to_string(value).expect("strings and rows always serialize")
        }
        let mut text = format!(
            "{{\n  \"buildHash\": {},\n  \"builtAt\": {},\n  \"gitCommit\": {},\n  \"files\": {}",
            json(&self.build_hash),
            json(&self.built_at),
            json(&self.git_commit),
            self.files
        );
        if let Some(signed) = &self.signature {
            text.push_str(",\n  \"signature\": ");
            text.push_str(&json(signed));
        }
        if let Some(rows) = &self.manifest {
            text.push_str(",\n  \"manifest\": [");
            for (index, row) in rows.iter().enumerate() {
                text.push_str(if index == 0 { "\n    " } else { ",\n    " });
                text.push_str(&json(row));
            }
            text.push_str(if rows.is_empty() { "]" } else { "\n  ]" });
        }
        text.push_str("\n}\n");
        text
    }
}

/// Scans the dist at `dir` and writes `<dir>/version.json` for it, atomically: a reader
/// sees the old file or the new one, never a mix. On error nothing on disk has changed
/// (except in the unlikely case that only the final directory sync fails, after the rename).
pub fn stamp(dir: &Path, limits: &Limits) -> Result<VersionInfo, DistError> {
    stamp_signed(dir, limits, None)
}

/// [`stamp`], and with `signer` also sign the record: the build hash, `builtAt`,
/// `gitCommit` and `files` (see [`super::signature`]). Unsigned without a signer, even
/// when the old version.json was signed.
pub fn stamp_signed(
    dir: &Path,
    limits: &Limits,
    signer: Option<&SigningKey>,
) -> Result<VersionInfo, DistError> {
    stamp_from(dir, limits, signer, None)
}

/// [`stamp_signed`] recording `commit` as `gitCommit` (the commit the dist was built
/// from, when `dir` is not in its checkout) instead of asking git in `dir`.
pub fn stamp_from(
    dir: &Path,
    limits: &Limits,
    signer: Option<&SigningKey>,
    commit: Option<&str>,
) -> Result<VersionInfo, DistError> {
    let rows = scan_summary(dir, limits)?;
    let commit = commit.map_or_else(|| git_commit(dir), str::to_owned);
    let mut info = VersionInfo::describe_rows(rows, SystemTime::now(), commit);
    if let Some(key) = signer {
        info.sign(key);
    }
    write_atomically(dir, VERSION_FILE, info.to_file_text().as_bytes())
        .map_err(|error| DistError::from(error).in_dist(dir))?;
    Ok(info)
}

/// The build hash of the dist at `dir`, without writing anything.
pub fn hash(dir: &Path, limits: &Limits) -> Result<String, DistError> {
    Ok(build_hash_of(&scan_summary(dir, limits)?))
}

/// Checks that the content of `dir` still hashes to the `buildHash` in its version.json.
///
/// Returns what version.json records when it does. Otherwise the error names the first
/// entry (in path order) that is missing, extra or changed, or, when version.json has no
/// rows to compare with or its rows match but its hash does not, says so. Reads only.
pub fn verify(dir: &Path, limits: &Limits) -> Result<VersionInfo, DistError> {
    check_root(dir)?;
    let recorded = read_version_file(dir).map_err(|error| error.in_dist(dir))?;
    let actual_rows = scan_summary(dir, limits)?;
    let actual_hash = build_hash_of(&actual_rows);
    if actual_hash == recorded.build_hash {
        return Ok(recorded);
    }
    let difference = recorded
        .manifest
        .as_deref()
        .and_then(|recorded_rows| first_difference(recorded_rows, &actual_rows));
    Err(difference
        .unwrap_or(DistError::HashMismatch {
            recorded: recorded.build_hash,
            actual: actual_hash,
        })
        .in_dist(dir))
}

/// The manifest of the dist at `dir`, with the signature its version.json records for this
/// content (none when the dist is unsigned, or changed after it was stamped): what is
/// uploaded and rolled out.
pub fn scan_signed(dir: &Path, limits: &Limits) -> Result<Manifest, DistError> {
    let mut manifest = scan(dir, limits)?;
    manifest.signature = recorded_version(dir, &manifest.build_hash())
        .and_then(|info| info.signature_record().map(Box::new));
    Ok(manifest)
}

/// The version.json of the dist at `dir` if it is readable and records build `hash`; a
/// stale or unreadable one describes other content, so it is ignored.
pub(super) fn recorded_version(dir: &Path, hash: &str) -> Option<VersionInfo> {
    let info = read_version_file(dir).ok()?;
    (info.build_hash == hash).then_some(info)
}

fn read_version_file(dir: &Path) -> Result<VersionInfo, DistError> {
    let path = dir.join(VERSION_FILE);
    match fs::symlink_metadata(&path) {
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Err(DistError::NotStamped),
        Err(source) => {
            return Err(DistError::Io(IoError::new(
                "read metadata of",
                path,
                source,
            )))
        }
        Ok(metadata) if !metadata.is_file() => return Err(DistError::VersionFileNotRegular),
        Ok(_) => {}
    }
    let text = fs::read_to_string(&path)
        .map_err(|source| DistError::Io(IoError::new("read", path, source)))?;
    serde_json::from_str(&text).map_err(|source| DistError::BadVersionFile { source })
}

/// The first entry, in path order, where `recorded` and `actual` disagree.
pub(super) fn first_difference(
    recorded: &[EntrySummary],
    actual: &[EntrySummary],
) -> Option<DistError> {
    let mut recorded: Vec<&EntrySummary> = recorded.iter().collect();
    recorded.sort_by(|a, b| a.path.cmp(&b.path));
    let mut actual: Vec<&EntrySummary> = actual.iter().collect();
    actual.sort_by(|a, b| a.path.cmp(&b.path));

    let (mut recorded, mut actual) = (
        recorded.into_iter().peekable(),
        actual.into_iter().peekable(),
    );
    loop {
        let missing = |row: &EntrySummary| DistError::EntryMissing {
            path: row.path.clone(),
        };
        let extra = |row: &EntrySummary| DistError::EntryExtra {
            path: row.path.clone(),
        };
        match (recorded.peek(), actual.peek()) {
            (None, None) => return None,
            (Some(was), None) => return Some(missing(was)),
            (None, Some(is)) => return Some(extra(is)),
            (Some(was), Some(is)) => match was.path.cmp(&is.path) {
                std::cmp::Ordering::Less => return Some(missing(was)),
                std::cmp::Ordering::Greater => return Some(extra(is)),
                std::cmp::Ordering::Equal if was != is => {
                    return Some(DistError::EntryChanged {
                        path: is.path.clone(),
                        change: describe_change(was, is),
                    })
                }
                std::cmp::Ordering::Equal => {
                    recorded.next();
                    actual.next();
                }
            },
        }
    }
}

/// "mode 0644 -> 0755, content" and the like.
fn describe_change(was: &EntrySummary, is: &EntrySummary) -> String {
    if was.kind != is.kind {
        return format!("was a {}, now a {}", was.kind.as_str(), is.kind.as_str());
    }
    let mut changes = Vec::new();
    if was.mode != is.mode {
        changes.push(format!("mode {:04o} -> {:04o}", was.mode, is.mode));
    }
    if was.size != is.size {
        changes.push(format!("size {} -> {} bytes", was.size, is.size));
    }
    if was.content != is.content {
        changes.push(match is.kind {
            super::manifest::SummaryKind::Symlink => {
                format!("target {:?} -> {:?}", was.content, is.content)
            }
            _ => "content".to_owned(),
        });
    }
    changes.join(", ")
}

/// `git rev-parse --short HEAD` in `dir`, or "unknown" when that fails for any reason (no
/// git, not a repository, no commits): the commit is informational, never required.
fn git_commit(dir: &Path) -> String {
    let output = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(["rev-parse", "--short", "HEAD"])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output();
    match output {
        Ok(output) if output.status.success() => {
            let commit = String::from_utf8_lossy(&output.stdout).trim().to_owned();
            if !commit.is_empty() && commit.bytes().all(|b| b.is_ascii_hexdigit()) {
                commit
            } else {
                "unknown".to_owned()
            }
        }
        _ => "unknown".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::release::ManifestError;
    use std::os::unix::fs::PermissionsExt;

    /// Checks that an error is the expected one.
    type Expect = fn(&DistError) -> bool;

    fn write_file(path: &Path, content: &[u8], mode: u32) {
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, content).unwrap();
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
    }

    fn sample_dist() -> tempfile::TempDir {
        let dist = tempfile::tempdir().unwrap();
        write_file(&dist.path().join("bin/cluster"), b"binary", 0o755);
        write_file(&dist.path().join("share/readme"), b"hello", 0o644);
        std::os::unix::fs::symlink("readme", dist.path().join("share/link")).unwrap();
        dist
    }

    fn limits() -> Limits {
        Limits::default()
    }

    fn inner_of<T: std::fmt::Debug>(result: Result<T, DistError>) -> DistError {
        match result.unwrap_err() {
            DistError::InDist { error, .. } => *error,
            other => other,
        }
    }

    /// Every path in the directory (recursively) with its bytes, to show nothing changed.
    fn snapshot(dir: &Path) -> Vec<(String, Vec<u8>)> {
        walkdir::WalkDir::new(dir)
            .sort_by_file_name()
            .into_iter()
            .map(|entry| {
                let entry = entry.unwrap();
                let content = if entry.file_type().is_file() {
                    fs::read(entry.path()).unwrap()
                } else {
                    Vec::new()
                };
                (entry.path().display().to_string(), content)
            })
            .collect()
    }

    #[test]
    fn stamp_then_verify() {
        let dist = sample_dist();
        let stamped = stamp(dist.path(), &limits()).unwrap();
        assert_eq!(stamped.files, 2);
        assert_eq!(stamped.git_commit, "unknown");
        assert_eq!(stamped.build_hash, hash(dist.path(), &limits()).unwrap());
        assert!(humantime::parse_rfc3339(&stamped.built_at).is_ok());

        let verified = verify(dist.path(), &limits()).unwrap();
        assert_eq!(verified, stamped);
        // Stamping again changes nothing that counts: version.json is not hashed.
        assert_eq!(
            stamp(dist.path(), &limits()).unwrap().build_hash,
            stamped.build_hash
        );
        let leftovers: Vec<_> = fs::read_dir(dist.path())
            .unwrap()
            .map(|entry| entry.unwrap().file_name())
            .filter(|name| name.to_string_lossy().contains(".tmp"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    #[test]
    fn version_file_has_the_documented_keys() {
        let dist = sample_dist();
        let stamped = stamp(dist.path(), &limits()).unwrap();
        let text = fs::read_to_string(dist.path().join(VERSION_FILE)).unwrap();
        let value: serde_json::Value = serde_json::from_str(&text).unwrap();
        let keys: Vec<&str> = value
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(keys.len(), 5);
        for key in ["buildHash", "builtAt", "gitCommit", "files", "manifest"] {
            assert!(keys.contains(&key), "{key} missing from {text}");
        }
        assert_eq!(value["buildHash"], stamped.build_hash.as_str());
        assert_eq!(value["files"], 2);
        assert!(
            text.contains("\n    [\"bin/cluster\",\"file\",\"0755\",6,"),
            "one row per line: {text}"
        );
        let parsed: VersionInfo = serde_json::from_str(&text).unwrap();
        assert_eq!(parsed, stamped);

        let brief = serde_json::to_value(stamped.without_manifest()).unwrap();
        assert_eq!(brief.as_object().unwrap().len(), 4);
    }

    #[test]
    fn a_signed_stamp_signs_the_hash_and_version_fields_and_travels_in_the_manifest() {
        use crate::release::signature::{check, TrustedKeys};
        let dist = sample_dist();
        let key = SigningKey::from_bytes(&[7; 32]);
        let trusted = TrustedKeys::new([key.verifying_key()]);
        let unsigned = stamp(dist.path(), &limits()).unwrap();
        assert_eq!(unsigned.signature, None);
        assert!(scan_signed(dist.path(), &limits())
            .unwrap()
            .signature
            .is_none());

        let signed = stamp_signed(dist.path(), &limits(), Some(&key)).unwrap();
        assert_eq!(
            signed.build_hash, unsigned.build_hash,
            "signing never changes the hash"
        );
        let text = fs::read_to_string(dist.path().join(VERSION_FILE)).unwrap();
        let value: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(value.as_object().unwrap().len(), 6, "{text}");
        let record = &value["signature"];
        assert_eq!(
            record["keyId"],
            crate::release::signature::key_id(&key.verifying_key()).as_str()
        );
        assert_eq!(record["ed25519"].as_str().unwrap().len(), 128, "{text}");
        assert_eq!(verify(dist.path(), &limits()).unwrap(), signed);

        // What is uploaded carries the signature, and it checks out.
        let manifest = scan_signed(dist.path(), &limits()).unwrap();
        assert_eq!(
            manifest.signature.as_deref(),
            signed.signature_record().as_ref()
        );
        check(&trusted, &manifest).unwrap();

        // A hand-edited builtAt voids it.
        let edited = VersionInfo {
            built_at: "2001-01-01T00:00:00Z".into(),
            ..signed.clone()
        };
        fs::write(dist.path().join(VERSION_FILE), edited.to_file_text()).unwrap();
        let manifest = scan_signed(dist.path(), &limits()).unwrap();
        assert!(matches!(
            check(&trusted, &manifest),
            Err(crate::release::SignatureError::Mismatch { .. })
        ));

        // Content changed after signing: version.json describes other content, so the
        // dist counts as unsigned.
        stamp_signed(dist.path(), &limits(), Some(&key)).unwrap();
        fs::write(dist.path().join("share/readme"), b"changed").unwrap();
        let manifest = scan_signed(dist.path(), &limits()).unwrap();
        assert!(manifest.signature.is_none());
        assert!(matches!(
            check(&trusted, &manifest),
            Err(crate::release::SignatureError::Unsigned { .. })
        ));
    }

    #[test]
    fn verify_names_the_first_difference() {
        type Edit = fn(&Path);
        let cases: Vec<(&str, Edit, Expect)> = vec![
            (
                "changed content, same size",
                |root| fs::write(root.join("share/readme"), b"HELLO").unwrap(),
                |e| matches!(e, DistError::EntryChanged { path, change } if path == "share/readme" && change == "content"),
            ),
            (
                "changed size",
                |root| fs::write(root.join("share/readme"), b"hello!").unwrap(),
                |e| matches!(e, DistError::EntryChanged { change, .. } if change == "size 5 -> 6 bytes, content"),
            ),
            (
                "changed mode",
                |root| {
                    fs::set_permissions(
                        root.join("share/readme"),
                        fs::Permissions::from_mode(0o600),
                    )
                    .unwrap()
                },
                |e| matches!(e, DistError::EntryChanged { change, .. } if change == "mode 0644 -> 0600"),
            ),
            (
                "missing",
                |root| fs::remove_file(root.join("share/link")).unwrap(),
                |e| matches!(e, DistError::EntryMissing { path } if path == "share/link"),
            ),
            (
                "extra",
                |root| fs::write(root.join("share/new"), b"x").unwrap(),
                |e| matches!(e, DistError::EntryExtra { path } if path == "share/new"),
            ),
            (
                "kind",
                |root| {
                    fs::remove_file(root.join("share/link")).unwrap();
                    fs::write(root.join("share/link"), b"x").unwrap();
                },
                |e| matches!(e, DistError::EntryChanged { change, .. } if change == "was a symlink, now a file"),
            ),
        ];
        for (why, edit, expected) in cases {
            let dist = sample_dist();
            stamp(dist.path(), &limits()).unwrap();
            edit(dist.path());
            let error = verify(dist.path(), &limits()).unwrap_err();
            assert!(error.is_mismatch(), "{why}: {error}");
            assert!(expected(error.innermost()), "{why}: wrong error: {error}");
        }
    }

    #[test]
    fn verify_without_rows_or_with_edited_hash() {
        let dist = sample_dist();
        let stamped = stamp(dist.path(), &limits()).unwrap();
        let version_path = dist.path().join(VERSION_FILE);

        // A version.json with only the four keys still verifies.
        let brief = serde_json::to_string(&stamped.without_manifest()).unwrap();
        fs::write(&version_path, &brief).unwrap();
        verify(dist.path(), &limits()).unwrap();

        // ... and, when the content changed, can only report the hash.
        fs::write(dist.path().join("share/readme"), b"other").unwrap();
        assert!(matches!(
            inner_of(verify(dist.path(), &limits())),
            DistError::HashMismatch { .. }
        ));

        // Rows that match but a hand-edited hash: also a plain hash mismatch.
        let restamped = stamp(dist.path(), &limits()).unwrap();
        let edited = VersionInfo {
            build_hash: "0".repeat(64),
            ..restamped
        };
        fs::write(&version_path, edited.to_file_text()).unwrap();
        let error = verify(dist.path(), &limits()).unwrap_err();
        assert!(
            matches!(error.innermost(), DistError::HashMismatch { .. }),
            "{error}"
        );
    }

    #[test]
    fn verify_reports_unstamped_and_garbled() {
        let dist = sample_dist();
        let error = verify(dist.path(), &limits()).unwrap_err();
        assert!(matches!(error.innermost(), DistError::NotStamped));
        assert!(error.is_mismatch());
        assert!(crate::error::Chain(&error)
            .to_string()
            .ends_with("version.json is missing: run `cluster dist stamp <dir>` first"));

        fs::write(dist.path().join(VERSION_FILE), "{not json").unwrap();
        let error = verify(dist.path(), &limits()).unwrap_err();
        assert!(matches!(
            error.innermost(),
            DistError::BadVersionFile { .. }
        ));
        assert!(!error.is_mismatch());

        let holder = tempfile::tempdir().unwrap();
        assert!(matches!(
            verify(&holder.path().join("nope"), &limits()).unwrap_err(),
            DistError::DirMissing { .. }
        ));
    }

    #[test]
    fn failed_stamp_leaves_the_dist_unchanged() {
        // A bad dist without version.json: none is created.
        let dist = sample_dist();
        fs::remove_file(dist.path().join("bin/cluster")).unwrap();
        let before = snapshot(dist.path());
        let error = stamp(dist.path(), &limits()).unwrap_err();
        assert!(
            matches!(
                error.innermost(),
                DistError::Invalid(ManifestError::MissingBinary)
            ),
            "{error}"
        );
        assert_eq!(snapshot(dist.path()), before);

        // A dist stamped once, then broken: its version.json is left as it was.
        let dist = sample_dist();
        stamp(dist.path(), &limits()).unwrap();
        std::os::unix::fs::symlink("../../outside", dist.path().join("share/escape")).unwrap();
        let before = snapshot(dist.path());
        let error = stamp(dist.path(), &limits()).unwrap_err();
        assert!(
            matches!(
                error.innermost(),
                DistError::Invalid(ManifestError::SymlinkEscapes { .. })
            ),
            "{error}"
        );
        assert_eq!(snapshot(dist.path()), before);
    }

    #[test]
    fn git_commit_of_a_repository() {
        let dist = sample_dist();
        let git = |args: &[&str]| {
            Command::new("git")
                .arg("-C")
                .arg(dist.path())
                .args(args)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|status| status.success())
        };
        // Without git on the machine, "unknown" is the right answer and covered elsewhere.
        if !git(&["init", "-q"]) {
            return;
        }
        assert!(git(&["add", "-A"]));
        assert!(git(&[
            "-c",
            "user.name=test",
            "-c",
            "user.email=test@example.com",
            "commit",
            "-qm",
            "dist"
        ]));
        let commit = git_commit(dist.path());
        assert!(commit.len() >= 7 && commit != "unknown", "{commit}");
    }
}
