//! The client side of an upload: read a local dist's chunks and push only those a node
//! lacks (what `cluster dist push` and `cluster update` do before a rollout).

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures::StreamExt;

use crate::api::{ApiError, ErrorKind, PrepareOutcome};
use crate::release::{chunk_offsets, scan_signed, DistError, EntryKind, Limits, Manifest};
use crate::rpc::AgentClient;

/// A dist directory on this machine, scanned, with where each chunk's bytes live.
pub struct LocalDist {
    pub dir: PathBuf,
    pub manifest: Manifest,
    /// chunk sha256 -> (file, offset, size); a chunk present in several files maps to one.
    index: HashMap<String, (PathBuf, u64, u64)>,
}

impl LocalDist {
    /// Scans the dist at `dir`; its manifest carries the signature its version.json
    /// records for this content, if any.
    pub fn scan(dir: &Path, limits: &Limits) -> Result<Self, DistError> {
        let manifest = scan_signed(dir, limits)?;
        let mut index = HashMap::new();
        for entry in &manifest.entries {
            if let EntryKind::File { chunks, .. } = &entry.kind {
                for (offset, chunk) in chunk_offsets(chunks) {
                    index
                        .entry(chunk.sha256.clone())
                        .or_insert_with(|| (dir.join(&entry.path), offset, chunk.size));
                }
            }
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            manifest,
            index,
        })
    }

    /// The bytes of one chunk, read from its file (the server verifies them).
    pub fn read_chunk(&self, sha256: &str) -> std::io::Result<Vec<u8>> {
        let (path, offset, size) = self.index.get(sha256).ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("chunk {sha256} is not part of this dist"),
            )
        })?;
        let mut file = std::fs::File::open(path)?;
        file.seek(SeekFrom::Start(*offset))?;
        let mut bytes = vec![0; *size as usize];
        file.read_exact(&mut bytes)?;
        Ok(bytes)
    }
}

/// Uploads `dist` to the node behind `client`, sending only the chunks it lacks. Chunks
/// are read (on a blocking thread) as the upload streams them, so memory stays at one
/// chunk in flight.
pub async fn push(
    client: &mut AgentClient,
    dist: &Arc<LocalDist>,
) -> Result<PrepareOutcome, ApiError> {
    let (missing, _) = client.missing(&dist.manifest).await?;
    let reader = dist.clone();
    let chunks = futures::stream::iter(missing).then(move |sha256| {
        let reader = reader.clone();
        async move {
            tokio::task::spawn_blocking(move || {
                let bytes = reader.read_chunk(&sha256).map_err(|e| {
                    ApiError::new(
                        ErrorKind::InvalidArgument,
                        format!(
                            "dist {} changed while uploading ({e}): re-run the command",
                            reader.dir.display()
                        ),
                    )
                })?;
                Ok((sha256, bytes))
            })
            .await
            .map_err(|e| ApiError::internal(format!("reading a chunk of the dist failed: {e}")))?
        }
    });
    client.upload(&dist.manifest, chunks).await
}
