//! Release key files: making a key pair (`cluster dist keygen`), reading the private key
//! that signs (`cluster dist stamp --sign`) and the public keys a node trusts
//! (`release_keys`, `--release-key`).
//!
//! The private key is PKCS#8 PEM ("PRIVATE KEY"), the public key SPKI PEM ("PUBLIC KEY"):
//! the formats `openssl pkey` reads and writes for Ed25519, so keys can be inspected and
//! made with standard tools too.

use std::fs::{self, DirBuilder};
use std::io::{self, Write};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
use ed25519_dalek::pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey};
use ed25519_dalek::{SigningKey, VerifyingKey};

use super::signature::{key_id, TrustedKeys};
use crate::fs::{create_new, random_name, sync_dir, IoError};

/// File name of the private key `keygen` writes.
pub const PRIVATE_KEY_FILE: &str = "release.key";
/// File name of the public key `keygen` writes.
pub const PUBLIC_KEY_FILE: &str = "release.pub";

/// Key files are a few hundred bytes; anything much larger is not one.
const MAX_KEY_FILE_BYTES: u64 = 64 * 1024;

/// A key pair `keygen` wrote.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GeneratedKey {
    /// The key's id, as signatures and refusals name it.
    pub key_id: String,
    /// The private key (mode 0600): signs releases; keep it off the nodes.
    pub private_key: PathBuf,
    /// The public key: give it to every node (`--release-key`).
    pub public_key: PathBuf,
}

/// Generates a new Ed25519 key pair from the OS's random source and writes
/// `<dir>/release.key` (mode 0600) and `<dir>/release.pub` (mode 0644), creating `dir`
/// (mode 0700) if it is missing. Refuses, changing nothing, when either file exists.
///
/// Each file is written in full under a temporary name and then hard-linked to its name,
/// which never replaces an existing file, so a reader never sees half a key.
pub fn keygen(dir: &Path) -> Result<GeneratedKey, KeyError> {
    let private_key = dir.join(PRIVATE_KEY_FILE);
    let public_key = dir.join(PUBLIC_KEY_FILE);
    for path in [&private_key, &public_key] {
        if fs::symlink_metadata(path).is_ok() {
            return Err(KeyError::Exists { path: path.clone() });
        }
    }
    match DirBuilder::new().recursive(true).mode(0o700).create(dir) {
        Ok(()) => {}
        Err(source) => return Err(KeyError::Io(IoError::new("create", dir, source))),
    }
    let key = SigningKey::generate(&mut rand::rngs::OsRng);
    let private_pem = key
        .to_pkcs8_pem(LineEnding::LF)
        .expect("an Ed25519 key always encodes as PKCS#8");
    let public_pem = key
        .verifying_key()
        .to_public_key_pem(LineEnding::LF)
        .expect("an Ed25519 public key always encodes as SPKI");
    write_new(dir, PRIVATE_KEY_FILE, private_pem.as_bytes(), 0o600)?;
    if let Err(error) = write_new(dir, PUBLIC_KEY_FILE, public_pem.as_bytes(), 0o644) {
        // Nothing changed: the private key alone is of no use, and no one has seen it.
        let _ = fs::remove_file(&private_key);
        return Err(error);
    }
    sync_dir(dir)?;
    Ok(GeneratedKey {
        key_id: key_id(&key.verifying_key()),
        private_key,
        public_key,
    })
}

/// Reads the private key at `path` (PKCS#8 PEM, as `keygen` writes `release.key`).
pub fn read_signing_key(path: &Path) -> Result<SigningKey, KeyError> {
    let text = read_key_file(path)?;
    SigningKey::from_pkcs8_pem(&text).map_err(|error| KeyError::BadPrivateKey {
        path: path.to_path_buf(),
        problem: if text.contains("PUBLIC KEY") {
            "it is a public key; sign with the private key (release.key)".to_owned()
        } else if !text.contains("-----BEGIN PRIVATE KEY-----") {
            "it has no -----BEGIN PRIVATE KEY----- block".to_owned()
        } else {
            format!("{error}")
        },
    })
}

/// Reads the public key at `path` (SPKI PEM, as `keygen` writes `release.pub`).
pub fn read_public_key(path: &Path) -> Result<VerifyingKey, KeyError> {
    let text = read_key_file(path)?;
    let bad = |problem: String| KeyError::BadPublicKey {
        path: path.to_path_buf(),
        problem,
    };
    if text.contains("PRIVATE KEY") {
        return Err(bad(
            "it is a private key; give nodes the public key (release.pub) and keep the private one off them".to_owned(),
        ));
    }
    if !text.contains("-----BEGIN PUBLIC KEY-----") {
        return Err(bad("it has no -----BEGIN PUBLIC KEY----- block".to_owned()));
    }
    let key = VerifyingKey::from_public_key_pem(&text).map_err(|error| bad(format!("{error}")))?;
    if key.is_weak() {
        return Err(bad(
            "it is a weak (small-order) key that anyone can forge signatures for".to_owned(),
        ));
    }
    Ok(key)
}

/// Reads every public key in `paths`: the keys a node trusts. The first bad file fails
/// the whole list, named.
pub fn read_trusted_keys(paths: &[PathBuf]) -> Result<TrustedKeys, KeyError> {
    let keys = paths
        .iter()
        .map(|path| read_public_key(path))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(TrustedKeys::new(keys))
}

fn read_key_file(path: &Path) -> Result<String, KeyError> {
    let read = |source| KeyError::Io(IoError::new("read the key file", path, source));
    let metadata = fs::metadata(path).map_err(read)?;
    if !metadata.is_file() || metadata.len() > MAX_KEY_FILE_BYTES {
        return Err(KeyError::NotAKeyFile {
            path: path.to_path_buf(),
        });
    }
    let bytes = fs::read(path).map_err(read)?;
    String::from_utf8(bytes).map_err(|_| KeyError::NotAKeyFile {
        path: path.to_path_buf(),
    })
}

/// Writes `dir/name` with `bytes` and `mode`, never replacing an existing file.
fn write_new(dir: &Path, name: &str, bytes: &[u8], mode: u32) -> Result<(), KeyError> {
    let temporary = dir.join(random_name(&format!(".{name}.tmp")));
    let written = create_new(&temporary, mode).and_then(|mut file| {
        file.write_all(bytes)?;
        file.sync_all()
    });
    if let Err(source) = written {
        let _ = fs::remove_file(&temporary);
        return Err(KeyError::Io(IoError::new("write", temporary, source)));
    }
    let target = dir.join(name);
    let linked = fs::hard_link(&temporary, &target);
    let _ = fs::remove_file(&temporary);
    match linked {
        Ok(()) => Ok(()),
        Err(error) if error.kind() == io::ErrorKind::AlreadyExists => {
            Err(KeyError::Exists { path: target })
        }
        Err(source) => Err(KeyError::Io(IoError::new("write", target, source))),
    }
}

/// What is wrong with a key file, or with making one.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// `keygen` would overwrite a key.
    #[error("{} already exists: keygen never replaces a key (releases signed with it would stop being accepted); choose another directory, or remove the old key pair first", path.display())]
    Exists {
        /// The existing file.
        path: PathBuf,
    },

    /// Not a regular file of key size, or not text.
    #[error("{} is not a key file: give a PEM file as `cluster dist keygen` writes it", path.display())]
    NotAKeyFile {
        /// The path given.
        path: PathBuf,
    },

    /// The file is not a PKCS#8 PEM Ed25519 private key.
    #[error("{} is not an Ed25519 private key in PKCS#8 PEM ({problem}): sign with the release.key that `cluster dist keygen` wrote", path.display())]
    BadPrivateKey {
        /// The path given.
        path: PathBuf,
        /// What the decoder found wrong.
        problem: String,
    },

    /// The file is not an SPKI PEM Ed25519 public key.
    #[error("{} is not an Ed25519 public key in PEM ({problem}): give the release.pub that `cluster dist keygen` wrote", path.display())]
    BadPublicKey {
        /// The path given.
        path: PathBuf,
        /// What the decoder found wrong.
        problem: String,
    },

    /// Reading or writing a key file failed.
    #[error(transparent)]
    Io(#[from] IoError),
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn keygen_writes_a_pair_that_reads_back() {
        let holder = tempfile::tempdir().unwrap();
        let dir = holder.path().join("keys");
        let generated = keygen(&dir).unwrap();
        assert_eq!(generated.private_key, dir.join("release.key"));
        assert_eq!(generated.public_key, dir.join("release.pub"));
        assert_eq!(mode(&generated.private_key), 0o600);
        assert_eq!(mode(&dir), 0o700);
        let private_text = fs::read_to_string(&generated.private_key).unwrap();
        let public_text = fs::read_to_string(&generated.public_key).unwrap();
        assert!(private_text.starts_with("-----BEGIN PRIVATE KEY-----\n"));
        assert!(public_text.starts_with("-----BEGIN PUBLIC KEY-----\n"));

        let signing = read_signing_key(&generated.private_key).unwrap();
        let public = read_public_key(&generated.public_key).unwrap();
        assert_eq!(signing.verifying_key(), public);
        assert_eq!(key_id(&public), generated.key_id);
        let trusted = read_trusted_keys(std::slice::from_ref(&generated.public_key)).unwrap();
        assert_eq!(trusted.ids(), [generated.key_id.as_str()]);
        let leftovers: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|entry| entry.unwrap().file_name())
            .collect();
        assert_eq!(leftovers.len(), 2, "{leftovers:?}");

        // Two runs make two different keys.
        let other = keygen(&holder.path().join("other")).unwrap();
        assert_ne!(other.key_id, generated.key_id);
    }

    #[test]
    fn keygen_never_overwrites_and_changes_nothing_when_it_refuses() {
        let dir = tempfile::tempdir().unwrap();
        for existing in [PRIVATE_KEY_FILE, PUBLIC_KEY_FILE] {
            let _ = fs::remove_file(dir.path().join(PRIVATE_KEY_FILE));
            let _ = fs::remove_file(dir.path().join(PUBLIC_KEY_FILE));
            fs::write(dir.path().join(existing), "keep me").unwrap();
            let error = keygen(dir.path()).unwrap_err();
            assert!(
                matches!(&error, KeyError::Exists { path } if path.ends_with(existing)),
                "{error}"
            );
            assert!(error.to_string().contains("already exists"), "{error}");
            let names: Vec<_> = fs::read_dir(dir.path())
                .unwrap()
                .map(|entry| entry.unwrap().file_name().into_string().unwrap())
                .collect();
            assert_eq!(names, [existing], "nothing else was written");
            assert_eq!(
                fs::read_to_string(dir.path().join(existing)).unwrap(),
                "keep me"
            );
        }
    }

    #[test]
    fn bad_key_files_are_refused_naming_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let pair = keygen(&dir.path().join("k")).unwrap();
        let garbage = dir.path().join("garbage.pub");
        fs::write(&garbage, "not a key").unwrap();
        let missing = dir.path().join("missing.pub");

        let cases: Vec<(&Path, &str)> = vec![
            (&garbage, "is not an Ed25519 public key"),
            (&missing, "check that it exists"),
            (&pair.private_key, "it is a private key"),
            (dir.path(), "is not a key file"),
        ];
        for (path, expected) in cases {
            let error = read_trusted_keys(&[pair.public_key.clone(), path.to_path_buf()])
                .unwrap_err()
                .to_string();
            assert!(
                error.contains(&path.display().to_string()) && error.contains(expected),
                "{}: {error}",
                path.display()
            );
        }
        let error = read_signing_key(&pair.public_key).unwrap_err().to_string();
        assert!(error.contains("it is a public key"), "{error}");
        let error = read_signing_key(&garbage).unwrap_err().to_string();
        assert!(error.contains("garbage.pub"), "{error}");
    }
}
