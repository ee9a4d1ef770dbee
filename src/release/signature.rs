//! Release signatures: what a release's signature covers, making one, and the one check
//! every node runs before it installs, offers or activates a release.
//!
//! Pure: no I/O. Key files are `keys`'s business; this module takes keys as values.
//!
//! A signature covers the canonical bytes of the release's identity and version fields
//! ([`Subject::message`]): a domain tag (`cluster-release-v1\n`), then the build hash,
//! `builtAt` and `gitCommit` (each as a big-endian u64 length and its bytes) and the number
//! of regular files (a big-endian u64). The build hash already covers every byte of
//! content, so signing it signs the content; the record says which key signed
//! ([`key_id`]) so a refusal can name it. The signature lives beside the content, never in
//! it (in version.json and in the manifest's `signature` field, neither of which is hashed),
//! so signing never changes the build hash.

use std::fmt;

use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::manifest::Manifest;

/// What every signed message starts with, so a release signature can never be mistaken
/// for a signature over anything else made with the same key.
pub const DOMAIN: &[u8] = b"cluster-release-v1\n";

/// How many hex digits of the public key's SHA-256 name a key.
const KEY_ID_HEX: usize = 16;

/// A release's signature record, as manifests carry it from node to node: who signed,
/// the version fields signed with the build hash (which the manifest alone does not
/// carry), and the signature.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Signature {
    /// The signing key's id ([`key_id`]): lets a node say which key it does not trust.
    pub key_id: String,
    /// `builtAt` of version.json, as stamped: signed, so it cannot be changed afterwards.
    pub built_at: String,
    /// `gitCommit` of version.json, as stamped: signed likewise.
    pub git_commit: String,
    /// The Ed25519 signature over [`Subject::message`], 128 lowercase hex characters.
    pub ed25519: String,
}

/// What a signature covers: the release's identity and the version fields of version.json.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Subject<'a> {
    /// The build hash (64 lowercase hex characters).
    pub build_hash: &'a str,
    /// `builtAt`, RFC 3339.
    pub built_at: &'a str,
    /// `gitCommit`, or "unknown".
    pub git_commit: &'a str,
    /// `files`: the number of regular files.
    pub files: u64,
}

impl Subject<'_> {
    /// The canonical bytes that are signed: [`DOMAIN`], then every field framed by its
    /// length, so two different subjects never give the same bytes.
    pub fn message(&self) -> Vec<u8> {
        let mut message = Vec::with_capacity(DOMAIN.len() + 128);
        message.extend_from_slice(DOMAIN);
        for field in [self.build_hash, self.built_at, self.git_commit] {
            message.extend_from_slice(&(field.len() as u64).to_be_bytes());
            message.extend_from_slice(field.as_bytes());
        }
        message.extend_from_slice(&self.files.to_be_bytes());
        message
    }
}

/// The id of a public key: the first 16 hex digits of the SHA-256 of its 32 bytes.
pub fn key_id(key: &VerifyingKey) -> String {
    let mut id = hex::encode(Sha256::digest(key.as_bytes()));
    id.truncate(KEY_ID_HEX);
    id
}

/// Signs `subject` with `key`.
pub fn sign(key: &SigningKey, subject: &Subject) -> Signature {
    Signature {
        key_id: key_id(&key.verifying_key()),
        built_at: subject.built_at.to_owned(),
        git_commit: subject.git_commit.to_owned(),
        ed25519: hex::encode(key.sign(&subject.message()).to_bytes()),
    }
}

/// The public keys a node accepts release signatures from. Empty: every release is
/// accepted, signed or not (a node configured with no `release_keys`).
#[derive(Clone, Default)]
pub struct TrustedKeys {
    /// Each key with its id, in the order configured.
    keys: Vec<(String, VerifyingKey)>,
}

impl TrustedKeys {
    /// Trusts exactly `keys` (a key given twice counts once).
    pub fn new(keys: impl IntoIterator<Item = VerifyingKey>) -> Self {
        let mut trusted = TrustedKeys::default();
        for key in keys {
            let id = key_id(&key);
            if !trusted.keys.iter().any(|(known, _)| *known == id) {
                trusted.keys.push((id, key));
            }
        }
        trusted
    }

    /// True when no key is configured: signatures are not checked at all.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The ids of the trusted keys, in the order configured.
    pub fn ids(&self) -> Vec<String> {
        self.keys.iter().map(|(id, _)| id.clone()).collect()
    }

    fn get(&self, id: &str) -> Option<&VerifyingKey> {
        self.keys
            .iter()
            .find(|(known, _)| known == id)
            .map(|(_, key)| key)
    }
}

impl fmt::Debug for TrustedKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("TrustedKeys").field(&self.ids()).finish()
    }
}

/// Accepts the release `manifest` describes if `trusted` is empty, or if its signature
/// record was made, over this manifest's build hash and file count and the record's version
/// fields, by one of the trusted keys (checked with `verify_strict`).
///
/// The one check: installing (upload, prepare), offering a release for a rollout
/// (preflight) and activating it all call this, before any byte of the release runs.
pub fn check(trusted: &TrustedKeys, manifest: &Manifest) -> Result<(), SignatureError> {
    if trusted.is_empty() {
        return Ok(());
    }
    check_release(
        trusted,
        &manifest.build_hash(),
        manifest.file_count(),
        manifest.signature.as_deref(),
    )
}

/// [`check`] for a release known by its build hash and file count (a dist whose
/// version.json was just verified against its content), with its signature record.
pub fn check_release(
    trusted: &TrustedKeys,
    build_hash: &str,
    files: u64,
    record: Option<&Signature>,
) -> Result<(), SignatureError> {
    if trusted.is_empty() {
        return Ok(());
    }
    let release = build_hash.to_owned();
    let trusted_ids = trusted.ids().join(", ");
    let Some(record) = record else {
        return Err(SignatureError::Unsigned {
            release,
            trusted: trusted_ids,
        });
    };
    let Some(key) = trusted.get(&record.key_id) else {
        return Err(SignatureError::UntrustedKey {
            release,
            key_id: record.key_id.clone(),
            trusted: trusted_ids,
        });
    };
    let malformed = |problem: String| SignatureError::Malformed {
        release: release.clone(),
        key_id: record.key_id.clone(),
        problem,
    };
    let bytes = hex::decode(&record.ed25519)
        .map_err(|_| malformed("the signature is not hex".to_owned()))?;
    let bytes: [u8; 64] = bytes
        .as_slice()
        .try_into()
        .map_err(|_| malformed(format!("the signature has {} bytes, not 64", bytes.len())))?;
    let subject = Subject {
        build_hash: &release,
        built_at: &record.built_at,
        git_commit: &record.git_commit,
        files,
    };
    key.verify_strict(
        &subject.message(),
        &ed25519_dalek::Signature::from_bytes(&bytes),
    )
    .map_err(|_| SignatureError::Mismatch {
        release: release.clone(),
        key_id: record.key_id.clone(),
    })
}

/// Why a node refuses a release: it trusts release keys, and this release is not signed
/// by one of them.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    /// The release carries no signature.
    #[error("release {release} is unsigned, and this node accepts only releases signed by key {trusted}: sign the dist with `cluster dist stamp <dist> --sign <release.key>` (a dist changed after signing counts as unsigned: sign it again)")]
    Unsigned {
        /// Build hash of the release.
        release: String,
        /// Ids of the keys this node trusts, comma-separated.
        trusted: String,
    },

    /// Signed, but by a key this node does not trust.
    #[error("release {release} is signed by key {key_id}, which this node does not trust (it trusts key {trusted}): sign the dist with a trusted key, or give the node that key's public half with --release-key")]
    UntrustedKey {
        /// Build hash of the release.
        release: String,
        /// Id of the key that signed it.
        key_id: String,
        /// Ids of the keys this node trusts, comma-separated.
        trusted: String,
    },

    /// The signature record names a trusted key but its signature cannot be decoded.
    #[error("release {release} has a damaged signature by key {key_id} ({problem}): sign the dist again with `cluster dist stamp <dist> --sign <release.key>`")]
    Malformed {
        /// Build hash of the release.
        release: String,
        /// Id of the key the record names.
        key_id: String,
        /// What is wrong with it.
        problem: String,
    },

    /// A well-formed signature by a trusted key that does not match this release: its
    /// content or its version fields changed after it was signed.
    #[error("the signature by key {key_id} does not match release {release}: the content or its version fields (builtAt, gitCommit, files) changed after signing; sign the dist again")]
    Mismatch {
        /// Build hash of the release.
        release: String,
        /// Id of the key the record names.
        key_id: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::release::{Chunk, Entry, EntryKind};

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    fn file(path: &str, content: &str) -> Entry {
        let sha256 = hex::encode(Sha256::digest(content.as_bytes()));
        Entry {
            path: path.into(),
            kind: EntryKind::File {
                mode: 0o755,
                size: content.len() as u64,
                sha256: sha256.clone(),
                chunks: vec![Chunk {
                    sha256,
                    size: content.len() as u64,
                }],
            },
        }
    }

    fn release(content: &str) -> Manifest {
        Manifest::from_unsorted(vec![
            Entry {
                path: "bin".into(),
                kind: EntryKind::Dir { mode: 0o755 },
            },
            file("bin/cluster", content),
        ])
    }

    /// `manifest` signed by `key` as `cluster dist stamp --sign` would sign it.
    fn signed(mut manifest: Manifest, key: &SigningKey) -> Manifest {
        let build_hash = manifest.build_hash();
        manifest.signature = Some(Box::new(sign(
            key,
            &Subject {
                build_hash: &build_hash,
                built_at: "2024-05-01T12:00:00Z",
                git_commit: "abc1234",
                files: manifest.file_count(),
            },
        )));
        manifest
    }

    fn trusting(keys: &[&SigningKey]) -> TrustedKeys {
        TrustedKeys::new(keys.iter().map(|key| key.verifying_key()))
    }

    #[test]
    fn a_release_signed_by_a_trusted_key_passes() {
        let (ours, other) = (key(1), key(2));
        let manifest = signed(release("v1"), &ours);
        check(&trusting(&[&ours]), &manifest).unwrap();
        check(&trusting(&[&other, &ours]), &manifest).unwrap();
        assert_eq!(
            manifest.signature.as_ref().unwrap().key_id,
            key_id(&ours.verifying_key())
        );
    }

    #[test]
    fn a_node_with_no_trusted_keys_accepts_anything() {
        let nobody = TrustedKeys::default();
        check(&nobody, &release("v1")).unwrap();
        let mut garbled = signed(release("v1"), &key(1));
        garbled.signature.as_mut().unwrap().ed25519 = "zz".into();
        check(&nobody, &garbled).unwrap();
    }

    #[test]
    fn every_way_of_not_being_signed_by_a_trusted_key_is_refused_naming_the_key() {
        let (ours, foreign) = (key(1), key(2));
        let trusted = trusting(&[&ours]);
        let ours_id = key_id(&ours.verifying_key());
        let foreign_id = key_id(&foreign.verifying_key());
        type Tamper = fn(&mut Manifest);
        type Expect = fn(&SignatureError) -> bool;
        let cases: Vec<(&str, Manifest, Tamper, Expect)> = vec![
            (
                "unsigned",
                release("v1"),
                |_| {},
                |e| matches!(e, SignatureError::Unsigned { .. }),
            ),
            (
                "signed by a foreign key",
                signed(release("v1"), &foreign),
                |_| {},
                |e| matches!(e, SignatureError::UntrustedKey { .. }),
            ),
            (
                "content changed after signing (another build hash)",
                signed(release("v1"), &ours),
                |m| {
                    let signature = m.signature.take();
                    *m = release("v2");
                    m.signature = signature;
                },
                |e| matches!(e, SignatureError::Mismatch { .. }),
            ),
            (
                "builtAt changed after signing",
                signed(release("v1"), &ours),
                |m| m.signature.as_mut().unwrap().built_at = "2024-05-02T12:00:00Z".into(),
                |e| matches!(e, SignatureError::Mismatch { .. }),
            ),
            (
                "gitCommit changed after signing",
                signed(release("v1"), &ours),
                |m| m.signature.as_mut().unwrap().git_commit = "def5678".into(),
                |e| matches!(e, SignatureError::Mismatch { .. }),
            ),
            (
                "a file added after signing (files and build hash differ)",
                signed(release("v1"), &ours),
                |m| {
                    let mut entries = m.entries.clone();
                    entries.push(file("bin/extra", "x"));
                    let signature = m.signature.take();
                    *m = Manifest::from_unsorted(entries);
                    m.signature = signature;
                },
                |e| matches!(e, SignatureError::Mismatch { .. }),
            ),
            (
                "truncated signature",
                signed(release("v1"), &ours),
                |m| m.signature.as_mut().unwrap().ed25519.truncate(126),
                |e| matches!(e, SignatureError::Malformed { problem, .. } if problem.contains("63 bytes")),
            ),
            (
                "signature not hex",
                signed(release("v1"), &ours),
                |m| {
                    m.signature
                        .as_mut()
                        .unwrap()
                        .ed25519
                        .replace_range(0..2, "zz")
                },
                |e| matches!(e, SignatureError::Malformed { .. }),
            ),
            (
                "a flipped bit in the signature",
                signed(release("v1"), &ours),
                |m| {
                    let record = m.signature.as_mut().unwrap();
                    let mut bytes = hex::decode(&record.ed25519).unwrap();
                    bytes[10] ^= 1;
                    record.ed25519 = hex::encode(bytes);
                },
                |e| matches!(e, SignatureError::Mismatch { .. }),
            ),
            (
                "a foreign signature relabelled with the trusted key's id",
                signed(release("v1"), &foreign),
                |m| m.signature.as_mut().unwrap().key_id = key_id(&key(1).verifying_key()),
                |e| matches!(e, SignatureError::Mismatch { .. }),
            ),
        ];
        for (why, mut manifest, tamper, expected) in cases {
            tamper(&mut manifest);
            let error = check(&trusted, &manifest).unwrap_err();
            assert!(expected(&error), "{why}: wrong error: {error:?}");
            let message = error.to_string();
            assert!(
                message.contains(&manifest.build_hash()),
                "{why}: names the release: {message}"
            );
            let named = if matches!(error, SignatureError::UntrustedKey { .. }) {
                &foreign_id
            } else {
                &ours_id
            };
            assert!(
                message.contains(named.as_str()),
                "{why}: names the key: {message}"
            );
        }
        let unsigned = check(&trusted, &release("v1")).unwrap_err().to_string();
        assert!(unsigned.contains("is unsigned"), "{unsigned}");
        let foreign_message = check(&trusted, &signed(release("v1"), &foreign))
            .unwrap_err()
            .to_string();
        assert!(
            foreign_message.contains(&format!("signed by key {foreign_id}"))
                && foreign_message.contains(&format!("it trusts key {ours_id}")),
            "{foreign_message}"
        );
    }

    #[test]
    fn the_message_is_framed_and_tagged() {
        let subject = Subject {
            build_hash: "ab",
            built_at: "c",
            git_commit: "",
            files: 3,
        };
        let message = subject.message();
        assert!(message.starts_with(b"cluster-release-v1\n"));
        // Moving a byte from one field to the next changes the message.
        let shifted = Subject {
            build_hash: "a",
            built_at: "bc",
            ..subject
        };
        assert_ne!(message, shifted.message());
        assert_eq!(message.len(), DOMAIN.len() + 3 * 8 + 3 + 8);
    }

    #[test]
    fn key_ids_are_16_hex_digits_and_duplicates_count_once() {
        let id = key_id(&key(1).verifying_key());
        assert_eq!(id.len(), 16);
        assert!(id.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_ne!(id, key_id(&key(2).verifying_key()));
        let trusted = trusting(&[&key(1), &key(1), &key(2)]);
        assert_eq!(trusted.ids().len(), 2);
        assert_eq!(
            format!("{trusted:?}"),
            format!("TrustedKeys({:?})", trusted.ids())
        );
    }
}
