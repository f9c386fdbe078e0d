//! The Raft log in redb: one database per node holding the entries (`log`: index → encoded
//! entry) and the metadata (`meta`: term, vote, commit lower bound, compaction point), updated in
//! the same durable transaction.
//!
//! One writer (the log manager's disk thread) group-commits many [`LogWrite`]s per transaction
//! with `Durability::Immediate`; readers (replicators reaching below the in-memory tail, restart)
//! never block it. A failed commit is fatal for the node: redb answers `PreviousIo` until
//! reopened, and retrying could acknowledge what never reached the disk.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};

use crate::raft::{HardState, LogEntry, LogRead, LogWrite};

const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

const META_TERM: &str = "term";
const META_VOTE: &str = "vote";
const META_COMMIT: &str = "commit";
/// Entries below this index were compacted into a snapshot (always 0 until snapshots exist).
const META_FIRST_INDEX: &str = "first_index";

/// The durable state a node restarts from.
#[derive(Debug, Clone, Default)]
pub struct Recovered {
    pub hard_state: HardState,
    /// Terms of the whole log as runs `(first index, term)`.
    pub term_runs: Vec<(u64, u64)>,
    pub last_index: u64,
}

/// A node's redb log. Cheap to clone (one shared database).
#[derive(Clone)]
pub struct LogStore {
    db: Arc<Database>,
}

impl LogStore {
    /// Opens (or creates) the log database at `path` (a file; parent directories are created).
    pub fn open(path: &Path) -> anyhow::Result<LogStore> {
        if let Some(parent) = path.parent()
            && !parent.as_os_str().is_empty()
        {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        let db = Database::create(path)
            .with_context(|| format!("opening redb log {}", path.display()))?;
        let txn = db.begin_write()?;
        {
            txn.open_table(LOG)?;
            txn.open_table(META)?;
        }
        txn.commit()?;
        Ok(LogStore { db: Arc::new(db) })
    }

    /// Reads term, vote, commit and the terms of every entry.
    pub fn recover(&self) -> anyhow::Result<Recovered> {
        let txn = self.db.begin_read()?;
        let meta = txn.open_table(META)?;
        let get =
            |k: &str| -> anyhow::Result<u64> { Ok(meta.get(k)?.map(|v| v.value()).unwrap_or(0)) };
        let mut r = Recovered {
            hard_state: HardState {
                term: get(META_TERM)?,
                vote: get(META_VOTE)?,
                commit: get(META_COMMIT)?,
            },
            ..Recovered::default()
        };
        let log = txn.open_table(LOG)?;
        let mut expected = get(META_FIRST_INDEX)?.max(1);
        for item in log.iter()? {
            let (k, v) = item?;
            let (index, term) = decode_index_term(v.value()).context("corrupt log entry header")?;
            anyhow::ensure!(
                index == k.value() && index == expected,
                "log hole or mislabeled entry at {index}"
            );
            if r.term_runs.last().map(|&(_, t)| t) != Some(term) {
                r.term_runs.push((index, term));
            }
            r.last_index = index;
            expected += 1;
        }
        r.hard_state.commit = r.hard_state.commit.min(r.last_index);
        Ok(r)
    }

    /// Entries `lo..hi`, stopping after `max_bytes` (at least one entry).
    pub fn read(&self, lo: u64, hi: u64, max_bytes: usize) -> anyhow::Result<Vec<LogEntry>> {
        let txn = self.db.begin_read()?;
        let log = txn.open_table(LOG)?;
        let mut out = Vec::new();
        let mut bytes = 0usize;
        for item in log.range(lo..hi)? {
            let (_, v) = item?;
            let e = LogEntry::decode(v.value()).context("corrupt log entry")?;
            if !out.is_empty() && bytes + e.size() > max_bytes {
                break;
            }
            bytes += e.size();
            out.push(e);
        }
        Ok(out)
    }

    /// Applies `writes` in order in ONE durable transaction (the group commit).
    pub fn write(&self, writes: &[LogWrite], scratch: &mut Vec<u8>) -> anyhow::Result<()> {
        let mut txn = self.db.begin_write()?;
        txn.set_durability(Durability::Immediate)?;
        {
            let mut log = txn.open_table(LOG)?;
            let mut meta = txn.open_table(META)?;
            let mut commit = meta.get(META_COMMIT)?.map(|v| v.value()).unwrap_or(0);
            let mut hard = None;
            for w in writes {
                if let Some(from) = w.truncate_from {
                    log.retain_in(from.., |_, _| false)?;
                }
                for e in &w.entries {
                    scratch.clear();
                    e.encode(scratch);
                    log.insert(e.index, scratch.as_slice())?;
                }
                if let Some(hs) = w.hard_state {
                    hard = Some(hs);
                }
                commit = commit.max(w.commit);
            }
            if let Some(hs) = hard {
                meta.insert(META_TERM, hs.term)?;
                meta.insert(META_VOTE, hs.vote)?;
            }
            meta.insert(META_COMMIT, commit)?;
        }
        txn.commit()?;
        Ok(())
    }
}

impl LogRead for LogStore {
    fn entries(&self, lo: u64, hi: u64, max_bytes: usize) -> Option<Vec<LogEntry>> {
        match self.read(lo, hi, max_bytes) {
            Ok(v) => Some(v),
            Err(e) => {
                tracing::error!(error = %e, lo, hi, "reading the log failed");
                None
            }
        }
    }
}

/// The index and term at the front of an encoded entry (no payload copy).
fn decode_index_term(b: &[u8]) -> Option<(u64, u64)> {
    let mut pos = 0;
    let mut next = || -> Option<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = *b.get(pos)?;
            pos += 1;
            v |= ((byte & 0x7f) as u64).checked_shl(shift)?;
            if byte & 0x80 == 0 {
                return Some(v);
            }
        }
        None
    };
    Some((next()?, next()?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft::EntryKind;
    use bytes::Bytes;

    fn entry(index: u64, term: u64) -> LogEntry {
        LogEntry {
            index,
            term,
            timestamp_ms: 5,
            kind: EntryKind::Normal,
            payload: Bytes::from(vec![index as u8; 10]),
        }
    }

    #[test]
    fn write_truncate_recover() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("n1/log.redb");
        let mut scratch = Vec::new();
        {
            let s = LogStore::open(&path)?;
            let w1 = LogWrite {
                entries: (1..=5).map(|i| entry(i, 1)).collect(),
                hard_state: Some(HardState {
                    term: 2,
                    vote: 3,
                    commit: 0,
                }),
                commit: 2,
                ..Default::default()
            };
            let w2 = LogWrite {
                truncate_from: Some(4),
                entries: vec![entry(4, 2)],
                commit: 3,
                ..Default::default()
            };
            s.write(&[w1, w2], &mut scratch)?;
            assert_eq!(s.read(1, 100, usize::MAX)?.len(), 4);
            assert_eq!(
                s.read(2, 4, 1)?.len(),
                1,
                "byte bound still returns one entry"
            );
        }
        let s = LogStore::open(&path)?;
        let r = s.recover()?;
        assert_eq!(
            r.hard_state,
            HardState {
                term: 2,
                vote: 3,
                commit: 3
            }
        );
        assert_eq!(r.last_index, 4);
        assert_eq!(r.term_runs, vec![(1, 1), (4, 2)]);
        assert_eq!(s.read(4, 5, usize::MAX)?, vec![entry(4, 2)]);
        Ok(())
    }
}
