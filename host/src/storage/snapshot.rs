//! Snapshot files: the state machine's applied state at an index, beside the log.
//!
//! One file per snapshot, `snapshot-<index>`, written whole to a temporary name, fsynced,
//! renamed into place and the directory fsynced, so a crash leaves either the old snapshot or
//! the new one, never half of one. Older snapshots are deleted once a newer one is in place.
//! A file is a header (magic, index, term, timestamp, length), the state machine's bytes, the
//! membership at the index (`Membership::encode`, to the end) and a CRC-32 of all that: a
//! damaged snapshot is refused, never restored as another state. Files of the first format
//! (`LKSNAP01`, from before membership changes) have no membership.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use anyhow::Context;
use bytes::Bytes;

use crate::raft::{Membership, Snapshot};

const MAGIC: &[u8; 8] = b"LKSNAP02";
const MAGIC_V1: &[u8; 8] = b"LKSNAP01";
const HEADER_LEN: usize = 8 + 4 * 8;
const PREFIX: &str = "snapshot-";
const TEMP_PREFIX: &str = ".tmp-snapshot-";

/// A snapshot file that does not read back as written.
#[derive(Debug, thiserror::Error)]
#[error(
    "snapshot {0} is damaged (its checksum or length does not match); this node's data cannot \
     be trusted: restore the data directory or start the node afresh with an empty one, to be \
     sent a snapshot again"
)]
pub struct DamagedSnapshot(pub PathBuf);

/// The directory of a node's snapshots.
#[derive(Clone, Debug)]
pub struct SnapshotStore {
    dir: PathBuf,
}

impl SnapshotStore {
    pub fn new(dir: PathBuf) -> SnapshotStore {
        SnapshotStore { dir }
    }

    /// Makes `snapshot` durable, then deletes the older ones.
    pub fn save(&self, snapshot: &Snapshot) -> anyhow::Result<()> {
        std::fs::create_dir_all(&self.dir)
            .with_context(|| format!("creating {}", self.dir.display()))?;
        let name = format!("{PREFIX}{:020}", snapshot.index);
        let temp = self
            .dir
            .join(format!("{TEMP_PREFIX}{:020}", snapshot.index));
        let path = self.dir.join(&name);
        let mut bytes = Vec::with_capacity(HEADER_LEN + snapshot.data.len() + 4);
        bytes.extend_from_slice(MAGIC);
        for v in [
            snapshot.index,
            snapshot.term,
            snapshot.timestamp_ms,
            snapshot.data.len() as u64,
        ] {
            bytes.extend_from_slice(&v.to_le_bytes());
        }
        bytes.extend_from_slice(&snapshot.data);
        bytes.extend_from_slice(&snapshot.membership.encode());
        let crc = crc32fast::hash(&bytes);
        bytes.extend_from_slice(&crc.to_le_bytes());
        let mut f = File::create(&temp).with_context(|| format!("creating {}", temp.display()))?;
        f.write_all(&bytes)
            .and_then(|()| f.sync_all())
            .with_context(|| format!("writing {}", temp.display()))?;
        drop(f);
        std::fs::rename(&temp, &path).with_context(|| format!("renaming to {}", path.display()))?;
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .with_context(|| format!("syncing {}", self.dir.display()))?;
        for (index, old) in self.list(false)? {
            if index < snapshot.index {
                let _ = std::fs::remove_file(old);
            }
        }
        Ok(())
    }

    /// The latest snapshot, if any. Called at start, it also removes the temporary files a
    /// crash left behind (never while running: another save may be writing one).
    pub fn load_latest(&self) -> anyhow::Result<Option<Snapshot>> {
        let Some((_, path)) = self.list(true)?.into_iter().max_by_key(|(i, _)| *i) else {
            return Ok(None);
        };
        let mut bytes = Vec::new();
        File::open(&path)
            .and_then(|mut f| f.read_to_end(&mut bytes))
            .with_context(|| format!("reading {}", path.display()))?;
        decode(&bytes)
            .map(Some)
            .ok_or_else(|| DamagedSnapshot(path).into())
    }

    /// Snapshot files by index; with `clean`, removes temporary files a crash left behind.
    fn list(&self, clean: bool) -> anyhow::Result<Vec<(u64, PathBuf)>> {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => {
                return Err(e).with_context(|| format!("listing {}", self.dir.display()));
            }
        };
        let mut out = Vec::new();
        for entry in entries {
            let entry = entry.with_context(|| format!("listing {}", self.dir.display()))?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with(TEMP_PREFIX) {
                if clean {
                    let _ = std::fs::remove_file(entry.path());
                }
            } else if let Some(index) = name.strip_prefix(PREFIX).and_then(|i| i.parse().ok()) {
                out.push((index, entry.path()));
            }
        }
        Ok(out)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

fn decode(bytes: &[u8]) -> Option<Snapshot> {
    let (body, crc) = bytes.split_at_checked(bytes.len().checked_sub(4)?)?;
    let magic = body.get(..8)?;
    if crc32fast::hash(body).to_le_bytes() != crc || (magic != MAGIC && magic != MAGIC_V1) {
        return None;
    }
    let word = |k: usize| -> Option<u64> {
        let at = 8 + 8 * k;
        Some(u64::from_le_bytes(body.get(at..at + 8)?.try_into().ok()?))
    };
    let (index, term, timestamp_ms, len) = (word(0)?, word(1)?, word(2)?, word(3)?);
    let rest = body.get(HEADER_LEN..)?;
    let (data, membership) = rest.split_at_checked(usize::try_from(len).ok()?)?;
    let membership = if magic == MAGIC {
        Membership::decode(membership).ok()?
    } else if membership.is_empty() {
        Membership::default()
    } else {
        return None;
    };
    Some(Snapshot {
        index,
        term,
        timestamp_ms,
        data: Bytes::copy_from_slice(data),
        membership,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(index: u64) -> Snapshot {
        Snapshot {
            index,
            term: 3,
            timestamp_ms: 1_700_000_000_000,
            data: Bytes::from(vec![index as u8; 100]),
            membership: Membership::of_ids([1, 2, 3]),
        }
    }

    #[test]
    fn the_latest_snapshot_comes_back_and_older_ones_go() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let store = SnapshotStore::new(dir.path().join("snapshots"));
        assert_eq!(store.load_latest()?, None);
        store.save(&snap(10))?;
        store.save(&snap(20))?;
        // A save leaves another save's temporary file alone (it may be being written)...
        let temp = store.dir().join(format!("{TEMP_PREFIX}30"));
        std::fs::write(&temp, b"half")?;
        store.save(&snap(25))?;
        assert!(temp.exists());
        // ...and a start takes it for what a crash left: ignored and removed.
        assert_eq!(store.load_latest()?, Some(snap(25)));
        assert!(!temp.exists());
        let files = std::fs::read_dir(store.dir())?.count();
        assert_eq!(files, 1, "only the latest snapshot is kept");
        Ok(())
    }

    #[test]
    fn a_damaged_snapshot_is_refused() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let store = SnapshotStore::new(dir.path().to_path_buf());
        store.save(&snap(7))?;
        let path = dir.path().join(format!("{PREFIX}{:020}", 7));
        let mut bytes = std::fs::read(&path)?;
        bytes[HEADER_LEN + 5] ^= 0x10;
        std::fs::write(&path, &bytes)?;
        let err = store.load_latest().expect_err("damaged");
        assert!(err.downcast_ref::<DamagedSnapshot>().is_some(), "{err}");
        // Cut short, likewise.
        std::fs::write(&path, &bytes[..10])?;
        assert!(store.load_latest().is_err());
        Ok(())
    }

    /// A snapshot written before membership changes (format 1) still loads, with no
    /// membership: the members never changed in such a cluster.
    #[test]
    fn a_first_format_snapshot_loads_without_a_membership() -> anyhow::Result<()> {
        let mut bytes = MAGIC_V1.to_vec();
        for v in [9u64, 2, 1_700_000_000_000, 3] {
            bytes.extend_from_slice(&v.to_le_bytes());
        }
        bytes.extend_from_slice(b"abc");
        let crc = crc32fast::hash(&bytes);
        bytes.extend_from_slice(&crc.to_le_bytes());
        let snapshot = decode(&bytes).expect("format 1 decodes");
        assert_eq!((snapshot.index, &snapshot.data[..]), (9, &b"abc"[..]));
        assert!(snapshot.membership.is_empty());
        Ok(())
    }
}
