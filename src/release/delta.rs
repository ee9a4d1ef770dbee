//! A manifest sent as its difference from one the receiver already holds.
//!
//! A release's manifest lists every chunk of every file: about half a megabyte for a 230 MB
//! release, which is more than the chunks of a small change. A node that holds an earlier
//! release (it always does after its first) names the releases it holds; the sender picks
//! one it holds too and sends only the entries that differ ([`Manifest::delta_from`]). The
//! receiver rebuilds the manifest ([`ManifestDelta::apply`]) and trusts nothing about the
//! result: the caller checks that its build hash is the one asked for, the signature check
//! and [`Manifest::validate`] run on it as on any manifest, and every chunk is hashed as it
//! arrives. A wrong chunk list can therefore only make a fetch fail, never install content
//! the build hash does not name.
//!
//! Pure: no I/O.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::manifest::{Entry, Manifest};
use super::signature::Signature;

/// What turns one manifest (the base) into another (the target).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestDelta {
    /// Paths of the base's entries the target lacks.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub removed: Vec<String>,
    /// The target's entries the base lacks or holds differently (chunk lists included).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub entries: Vec<Entry>,
    /// The target's signature, which never comes from the base.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<Box<Signature>>,
}

/// A release's manifest as a node sends it to one that asked for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ManifestAnswer {
    /// The whole manifest.
    Whole(Manifest),
    /// Its difference from release `base`, one the asker named as held.
    Delta { base: String, delta: ManifestDelta },
}

/// Why a delta does not apply to the base it names.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeltaError {
    /// The delta removes a path the base does not hold: it was made against another base.
    #[error("the delta removes {path:?}, which the base release does not hold")]
    RemovesAbsent { path: String },
    /// The delta names a path twice.
    #[error("the delta names {path:?} twice")]
    Repeated { path: String },
}

impl Manifest {
    /// The delta that turns `base` into `self`. Both must be sorted by path, as every
    /// manifest is (see [`Manifest::validate`]).
    pub fn delta_from(&self, base: &Manifest) -> ManifestDelta {
        let mut delta = ManifestDelta {
            signature: self.signature.clone(),
            ..ManifestDelta::default()
        };
        let (mut old, mut new) = (
            base.entries.iter().peekable(),
            self.entries.iter().peekable(),
        );
        loop {
            match (old.peek(), new.peek()) {
                (None, None) => break,
                (Some(o), Some(n)) if o.path == n.path => {
                    if o != n {
                        delta.entries.push((*n).clone());
                    }
                    old.next();
                    new.next();
                }
                (Some(o), Some(n)) if o.path < n.path => {
                    delta.removed.push(o.path.clone());
                    old.next();
                }
                (Some(o), None) => {
                    delta.removed.push(o.path.clone());
                    old.next();
                }
                (_, Some(n)) => {
                    delta.entries.push((*n).clone());
                    new.next();
                }
            }
        }
        delta
    }
}

impl ManifestDelta {
    /// The manifest `base` plus this delta, sorted by path. The caller checks its build
    /// hash against the one it asked for: that, not this function, is what trusts it.
    pub fn apply(self, base: &Manifest) -> Result<Manifest, DeltaError> {
        let mut entries: BTreeMap<String, Entry> = base
            .entries
            .iter()
            .map(|e| (e.path.clone(), e.clone()))
            .collect();
        let mut named = std::collections::HashSet::new();
        for path in self.removed {
            if entries.remove(&path).is_none() {
                return Err(DeltaError::RemovesAbsent { path });
            }
            named.insert(path);
        }
        for entry in self.entries {
            if !named.insert(entry.path.clone()) {
                return Err(DeltaError::Repeated { path: entry.path });
            }
            entries.insert(entry.path.clone(), entry);
        }
        // BTreeMap<String> orders by bytes, the manifest's order.
        Ok(Manifest {
            entries: entries.into_values().collect(),
            signature: self.signature,
        })
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::release::{Chunk, EntryKind};

    fn file(path: &str, content: u8, chunks: usize) -> Entry {
        Entry {
            path: path.to_owned(),
            kind: EntryKind::File {
                mode: 0o644,
                size: chunks as u64 * 10,
                sha256: hex::encode([content; 32]),
                chunks: (0..chunks)
                    .map(|i| Chunk {
                        sha256: hex::encode([content.wrapping_add(i as u8); 32]),
                        size: 10,
                    })
                    .collect(),
            },
        }
    }

    fn dir(path: &str) -> Entry {
        Entry {
            path: path.to_owned(),
            kind: EntryKind::Dir { mode: 0o755 },
        }
    }

    #[test]
    fn a_delta_carries_only_what_changed_and_rebuilds_the_target() {
        let base = Manifest::from_unsorted(vec![
            dir("bin"),
            file("bin/cluster", 1, 300),
            file("lib/a", 2, 3),
            file("lib/gone", 3, 1),
        ]);
        let target = Manifest::from_unsorted(vec![
            dir("bin"),
            file("bin/cluster", 9, 300),
            file("lib/a", 2, 3),
            file("lib/new", 4, 1),
        ]);
        let delta = target.delta_from(&base);
        assert_eq!(delta.removed, vec!["lib/gone".to_string()]);
        let paths: Vec<_> = delta.entries.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, ["bin/cluster", "lib/new"]);
        assert!(
            serde_json::to_vec(&delta).unwrap().len() < serde_json::to_vec(&target).unwrap().len()
        );
        let rebuilt = delta.apply(&base).unwrap();
        assert_eq!(rebuilt, target);
        assert_eq!(rebuilt.build_hash(), target.build_hash());
    }

    #[test]
    fn a_delta_against_an_equal_manifest_is_empty() {
        let base = Manifest::from_unsorted(vec![dir("bin"), file("bin/cluster", 1, 2)]);
        assert_eq!(base.delta_from(&base), ManifestDelta::default());
    }

    #[test]
    fn a_delta_made_against_another_base_is_refused_or_rebuilds_another_hash() {
        let target = Manifest::from_unsorted(vec![dir("bin"), file("bin/cluster", 7, 2)]);
        let made_against = Manifest::from_unsorted(vec![
            dir("bin"),
            file("bin/cluster", 1, 2),
            file("lib/x", 5, 1),
        ]);
        let held = Manifest::from_unsorted(vec![dir("bin"), file("bin/cluster", 1, 2)]);
        // It removes lib/x, which the held base lacks.
        assert_eq!(
            target.delta_from(&made_against).apply(&held),
            Err(DeltaError::RemovesAbsent {
                path: "lib/x".into()
            })
        );
        // The other way round it applies, but keeps lib/x: the build hash tells.
        let rebuilt = target.delta_from(&held).apply(&made_against).unwrap();
        assert_ne!(rebuilt.build_hash(), target.build_hash());
    }

    #[test]
    fn a_delta_naming_a_path_twice_is_refused() {
        let base = Manifest::from_unsorted(vec![dir("bin"), file("bin/cluster", 1, 2)]);
        let delta = ManifestDelta {
            removed: vec!["bin/cluster".into()],
            entries: vec![file("bin/cluster", 3, 1)],
            signature: None,
        };
        assert_eq!(
            delta.apply(&base),
            Err(DeltaError::Repeated {
                path: "bin/cluster".into()
            })
        );
    }

    fn entries() -> impl Strategy<Value = Vec<Entry>> {
        proptest::collection::btree_map("[a-d]{1,2}(/[a-d]{1,2})?", (0u8..4, 1usize..4), 0..12)
            .prop_map(|m| {
                m.into_iter()
                    .map(|(path, (content, chunks))| file(&path, content, chunks))
                    .collect()
            })
    }

    proptest! {
        #[test]
        fn any_target_is_rebuilt_exactly_from_any_base(base in entries(), target in entries()) {
            let (base, target) = (Manifest::from_unsorted(base), Manifest::from_unsorted(target));
            let rebuilt = target.delta_from(&base).apply(&base).unwrap();
            prop_assert_eq!(rebuilt, target);
        }
    }
}
