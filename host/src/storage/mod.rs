//! The Raft log in redb: one database per node holding the entries and the metadata (`meta`:
//! term, vote, commit lower bound, compaction point), updated in the same durable transaction;
//! beside it, the snapshots the log is compacted behind (`snapshot.rs`).
//!
//! Entries are stored in rows of consecutive entries (`log`: index of the first entry → the
//! entries encoded back to back), one row per append: a group commit inserts a few B-tree rows
//! instead of one per entry, which is most of the CPU of a commit. Rows never overlap;
//! truncation rewrites the row it cuts and deletes the later ones. Each row ends with a CRC-32
//! of its entries, checked whenever it is read (restart, catch-up): redb checks its own
//! checksums only when it repairs a file after a crash, and a damaged entry must stop the node,
//! not be applied as another.
//!
//! One writer (the log manager's disk thread) group-commits many [`LogWrite`]s per transaction
//! with `Durability::Immediate`; readers (replicators reaching below the in-memory tail, restart)
//! never block it. A failed commit is fatal for the node: redb answers `PreviousIo` until
//! reopened, and retrying could acknowledge what never reached the disk.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use redb::{
    Database, Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition,
};

mod file;
mod snapshot;

use file::LogFile;
pub use snapshot::{DamagedSnapshot, SnapshotStore};

use crate::raft::{EntryKind, HardState, LogEntry, LogRead, LogWrite, Membership};

const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// Memberships by the index they are in effect from: each membership entry's, and an installed
/// snapshot's. Few (one per change), so never compacted; truncated with the log.
const MEMBERSHIPS: TableDefinition<u64, &[u8]> = TableDefinition::new("memberships");
/// Which cluster this log belongs to (`cluster` → id) and the limits its entries are applied
/// under (`limits`), written at the first start.
const IDENTITY: TableDefinition<&str, &str> = TableDefinition::new("identity");
const IDENTITY_CLUSTER: &str = "cluster";
const IDENTITY_LIMITS: &str = "limits";
const IDENTITY_MEMBERS: &str = "members";

const META_TERM: &str = "term";
const META_VOTE: &str = "vote";
const META_COMMIT: &str = "commit";
/// Entries below this index were compacted away behind a snapshot; the last of them had
/// `META_COMPACTED_TERM`.
const META_FIRST_INDEX: &str = "first_index";
const META_COMPACTED_TERM: &str = "compacted_term";
/// Set (1) in logs whose rows end with a CRC-32 of their entries: every log begun by this
/// release. A log begun before keeps its rows as they are, unchecked.
const META_ROW_CHECKSUMS: &str = "row_checksums";
const CHECKSUM_LEN: usize = 4;

/// A log row whose checksum does not match: the disk corrupted it.
#[derive(Debug, thiserror::Error)]
#[error(
    "log row {0} is damaged: its checksum does not match (the disk corrupted it); this node's \
     log cannot be trusted: restore the data directory or start the node afresh with an empty \
     one, to be replicated again"
)]
pub struct DamagedRow(pub u64);

/// The durable state a node restarts from.
#[derive(Debug, Clone, Default)]
pub struct Recovered {
    pub hard_state: HardState,
    /// Terms of the log past `compacted` as runs `(first index, term)`.
    pub term_runs: Vec<(u64, u64)>,
    pub last_index: u64,
    /// The last entry compacted away and its term (`(0, 0)`: none).
    pub compacted: (u64, u64),
    /// Memberships by the index they are in effect from, in index order.
    pub memberships: Vec<(u64, Membership)>,
}

/// redb's own page cache (read cache and write buffer) for the log: small, enough for the pages
/// every commit touches (the B-tree paths to the newest row and to the metadata, the allocator
/// state). Without one, each commit re-read about 38 pages with `pread` and wrote 19 with
/// `pwrite`; with it, no reads and about 9 writes (`strace -c`, pipeline-bench at 256
/// submitters), and the pipeline runs about 15 % faster. 1, 4 and 16 MiB measured alike; the
/// cache is bounded (redb's default is 1 GiB), and recent entries are served from the in-memory
/// tail anyway, older ones (restart, catch-up) read sequentially through the OS page cache.
const LOG_CACHE_BYTES: usize = 4 << 20;

/// A node's redb log. Cheap to clone (one shared database).
#[derive(Clone)]
pub struct LogStore {
    db: Arc<Database>,
    /// Whether rows carry a checksum (`META_ROW_CHECKSUMS`).
    checksummed: bool,
    snapshots: SnapshotStore,
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
        let db = Database::builder()
            .set_cache_size(LOG_CACHE_BYTES)
            .create_with_backend(LogFile::open(path)?)
            .with_context(|| format!("opening redb log {}", path.display()))?;
        let txn = db.begin_write()?;
        let checksummed = {
            let log = txn.open_table(LOG)?;
            let mut meta = txn.open_table(META)?;
            let flag = meta.get(META_ROW_CHECKSUMS)?.map(|v| v.value());
            match flag {
                Some(flag) => flag == 1,
                None if log.is_empty()? => {
                    meta.insert(META_ROW_CHECKSUMS, 1)?;
                    true
                }
                None => false,
            }
        };
        txn.commit()?;
        let snapshots = path.with_file_name("snapshots");
        Ok(LogStore {
            db: Arc::new(db),
            checksummed,
            snapshots: SnapshotStore::new(snapshots),
        })
    }

    /// The snapshots beside this log (the `snapshots` directory next to its file).
    pub fn snapshots(&self) -> &SnapshotStore {
        &self.snapshots
    }

    /// Stores `row` (entries encoded back to back) as the row at `index`, ended with the
    /// checksum of its entries when this log's rows carry one: every row goes in through here.
    fn put_row(
        &self,
        log: &mut redb::Table<u64, &[u8]>,
        index: u64,
        row: &mut Vec<u8>,
    ) -> anyhow::Result<()> {
        if self.checksummed {
            let crc = crc32fast::hash(row);
            row.extend_from_slice(&crc.to_le_bytes());
        }
        log.insert(index, row.as_slice())?;
        Ok(())
    }

    /// The entries of the row at `index`, its checksum checked: a row damaged on disk (a bit
    /// flip, a torn sector) is refused, never applied as if it were another entry.
    fn entries_of<'a>(&self, index: u64, row: &'a [u8]) -> anyhow::Result<&'a [u8]> {
        if !self.checksummed {
            return Ok(row);
        }
        let split = row
            .len()
            .checked_sub(CHECKSUM_LEN)
            .with_context(|| format!("log row {index} is too short for its checksum"))?;
        let (entries, crc) = row.split_at(split);
        let stored = u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]);
        if crc32fast::hash(entries) != stored {
            return Err(DamagedRow(index).into());
        }
        Ok(entries)
    }

    /// Ties this log to `cluster_id` at the first start; afterwards refuses any other id, so a
    /// node started on another cluster's data directory (or with other --peers) fails instead
    /// of joining with a foreign log and state.
    pub fn bind_cluster(&self, cluster_id: &str) -> anyhow::Result<()> {
        self.bind(IDENTITY_CLUSTER, cluster_id, |bound| {
            format!(
                "this data directory belongs to cluster {bound:?}, and this node was started for \
                 cluster {cluster_id:?} (the --cluster-id, or a digest of --peers). If the \
                 members only moved to new addresses, start every node with --cluster-id \
                 {bound}; if the directory is another cluster's, give this node its own"
            )
        })
    }

    /// Ties this log to the limits its entries are applied under. The state is rebuilt by
    /// applying the log again at every start, so other limits would change the outcome of
    /// tasks already committed and answered: an acknowledged write could vanish, a failed one
    /// take effect.
    pub fn bind_limits(&self, limits: &str) -> anyhow::Result<()> {
        self.bind(IDENTITY_LIMITS, limits, |bound| {
            format!(
                "this data directory's log was applied under `{bound}`, and this node was \
                 started with `{limits}`. Applying it again under other limits would change the \
                 outcome of tasks already committed (an acknowledged write could vanish, a \
                 failed task take effect): start it with `{bound}`"
            )
        })
    }

    /// Ties this log to the members it started with (none: it joins a running cluster), until
    /// its log records a membership (see `has_memberships`). `--cluster-id` lets members move
    /// to new addresses; it must not let a node restart into another membership: a member
    /// started alone as a cluster of one elects itself, commits entries the real cluster never
    /// saw, and its log can no longer be reconciled with theirs.
    pub fn bind_members(&self, members: &[u64]) -> anyhow::Result<()> {
        let mut ids = members.to_vec();
        ids.sort_unstable();
        let ids = ids.iter().map(u64::to_string).collect::<Vec<_>>().join(",");
        let named = |ids: &str| {
            if ids.is_empty() {
                "none (it joins a running cluster: --join)".to_string()
            } else {
                ids.to_string()
            }
        };
        self.bind(IDENTITY_MEMBERS, &ids, |bound| {
            format!(
                "this data directory's log was started with members {}, and this node is started \
                 with members {}: start it as it was first started (--peers naming the same ids, \
                 at any addresses, or --join). Members change with `lockstep add-member` and \
                 `remove-member`, not with --peers",
                named(bound),
                named(&ids)
            )
        })
    }

    /// Whether the log records a membership: then it, not `--peers`, says who the members are.
    pub fn has_memberships(&self) -> anyhow::Result<bool> {
        let txn = self.db.begin_read()?;
        Ok(match open_if_exists(txn.open_table(MEMBERSHIPS))? {
            Some(table) => !table.is_empty()?,
            None => false,
        })
    }

    /// Records `value` under `key` at the first start; afterwards refuses any other value.
    fn bind(
        &self,
        key: &str,
        value: &str,
        refusal: impl FnOnce(&str) -> String,
    ) -> anyhow::Result<()> {
        let txn = self.db.begin_write()?;
        {
            let mut table = txn.open_table(IDENTITY)?;
            let bound = table.get(key)?.map(|v| v.value().to_owned());
            match bound {
                Some(bound) if bound != value => anyhow::bail!(refusal(&bound)),
                // Every start but the first: dropping the transaction aborts it, so no
                // durable commit is spent on nothing.
                Some(_) => return Ok(()),
                None => {
                    table.insert(key, value)?;
                }
            }
        }
        txn.commit()?;
        Ok(())
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
        r.compacted = (expected - 1, get(META_COMPACTED_TERM)?);
        r.last_index = expected - 1;
        for item in log.iter()? {
            let (k, v) = item?;
            anyhow::ensure!(
                k.value() == expected,
                "log hole: row at {} where {expected} was expected",
                k.value()
            );
            let mut bad = None;
            LogEntry::decode_all(self.entries_of(k.value(), v.value())?, |e| {
                if e.index != expected {
                    bad.get_or_insert(e.index);
                }
                if r.term_runs.last().map(|&(_, t)| t) != Some(e.term) {
                    r.term_runs.push((e.index, e.term));
                }
                r.last_index = e.index;
                expected += 1;
            })
            .context("corrupt log row")?;
            if let Some(i) = bad {
                anyhow::bail!("mislabeled log entry {i}");
            }
        }
        r.hard_state.commit = r.hard_state.commit.min(r.last_index);
        if let Some(table) = open_if_exists(txn.open_table(MEMBERSHIPS))? {
            for item in table.iter()? {
                let (k, v) = item?;
                let m = Membership::decode(v.value())
                    .with_context(|| format!("corrupt membership record at {}", k.value()))?;
                r.memberships.push((k.value(), m));
            }
        }
        Ok(r)
    }

    /// Brings the log in line with the latest snapshot `(index, term)` after a crash between
    /// storing a snapshot installed from the leader and cutting the log: the log is emptied
    /// behind the snapshot unless it holds the snapshot's last entry (what follows it is kept,
    /// as Raft requires: those entries may be committed with this node's acknowledgement).
    pub fn align_to_snapshot(
        &self,
        rec: Recovered,
        index: u64,
        term: u64,
    ) -> anyhow::Result<Recovered> {
        // Emptying a log compacted past the snapshot would drop durable entries the node may
        // have acknowledged: the caller refuses to start instead.
        anyhow::ensure!(
            index >= rec.compacted.0,
            "the snapshot at {index} is older than the log's compaction point {}",
            rec.compacted.0
        );
        let pos = rec.term_runs.partition_point(|&(start, _)| start <= index);
        let term_at = match pos.checked_sub(1) {
            _ if index == rec.compacted.0 => Some(rec.compacted.1),
            Some(p) if index > rec.compacted.0 => Some(rec.term_runs[p].1),
            _ => None,
        };
        if index <= rec.last_index && term_at == Some(term) {
            return Ok(rec);
        }
        tracing::warn!(
            index,
            "the log does not hold the snapshot's last entry: emptying it behind the snapshot"
        );
        let reset = LogWrite {
            compact_through: Some((index, term)),
            truncate_from: Some(index + 1),
            commit: index,
            ..LogWrite::default()
        };
        self.write(&[reset], &mut Vec::new())?;
        self.recover()
    }

    /// Entries `lo..hi`, stopping after `max_bytes` (at least one entry).
    pub fn read(&self, lo: u64, hi: u64, max_bytes: usize) -> anyhow::Result<Vec<LogEntry>> {
        let txn = self.db.begin_read()?;
        let log = txn.open_table(LOG)?;
        let mut out = Vec::new();
        let mut bytes = 0usize;
        // The row holding `lo` starts at or before it.
        let start = match log.range(..=lo)?.next_back() {
            Some(row) => row?.0.value(),
            None => lo,
        };
        let mut full = false;
        for item in log.range(start..hi)? {
            let (k, v) = item?;
            LogEntry::decode_all(self.entries_of(k.value(), v.value())?, |e| {
                if full || e.index < lo || e.index >= hi {
                    return;
                }
                if !out.is_empty() && bytes + e.size() > max_bytes {
                    full = true;
                    return;
                }
                bytes += e.size();
                out.push(e);
            })
            .context("corrupt log row")?;
            if full {
                break;
            }
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
            // Membership records to delete from (a truncation) or to add, in order.
            let mut memberships: Vec<(u64, Option<Vec<u8>>)> = Vec::new();
            // Consecutive appends of the group become one row.
            scratch.clear();
            let mut row_start = None;
            for w in writes {
                if let Some((through, term)) = w.compact_through {
                    if let Some(start) = row_start.take() {
                        self.put_row(&mut log, start, scratch)?;
                        scratch.clear();
                    }
                    self.compact(&mut log, through)?;
                    meta.insert(META_FIRST_INDEX, through + 1)?;
                    meta.insert(META_COMPACTED_TERM, term)?;
                }
                if let Some(from) = w.truncate_from {
                    if let Some(start) = row_start.take() {
                        self.put_row(&mut log, start, scratch)?;
                        scratch.clear();
                    }
                    self.truncate(&mut log, from)?;
                    memberships.push((from, None));
                }
                for e in &w.entries {
                    row_start.get_or_insert(e.index);
                    e.encode(scratch);
                    if e.kind == EntryKind::Config {
                        memberships.push((e.index, Some(e.payload.to_vec())));
                    }
                }
                if let Some((index, m)) = &w.membership {
                    memberships.push((*index, Some(m.encode().to_vec())));
                }
                if let Some(hs) = w.hard_state {
                    hard = Some(hs);
                }
                commit = commit.max(w.commit);
            }
            if let Some(start) = row_start {
                self.put_row(&mut log, start, scratch)?;
            }
            if let Some(hs) = hard {
                meta.insert(META_TERM, hs.term)?;
                meta.insert(META_VOTE, hs.vote)?;
            }
            meta.insert(META_COMMIT, commit)?;
            if !memberships.is_empty() {
                let mut table = txn.open_table(MEMBERSHIPS)?;
                for (index, record) in memberships {
                    match record {
                        Some(bytes) => {
                            table.insert(index, bytes.as_slice())?;
                        }
                        None => table.retain_in(index.., |_, _| false)?,
                    }
                }
            }
        }
        txn.commit()?;
        Ok(())
    }
}

/// A table that was never written reads as absent (a read transaction cannot create it).
fn open_if_exists<T>(opened: Result<T, redb::TableError>) -> anyhow::Result<Option<T>> {
    match opened {
        Ok(t) => Ok(Some(t)),
        Err(redb::TableError::TableDoesNotExist(_)) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

impl LogRead for LogStore {
    fn entries(&self, lo: u64, hi: u64, max_bytes: usize) -> Option<Vec<LogEntry>> {
        match self.read(lo, hi, max_bytes) {
            Ok(v) => Some(v),
            // Retrying cannot mend it, and the node must not serve from this log: the core
            // loop's panic stops the node (`MarkStopped`), as a failed commit does.
            Err(e) if e.downcast_ref::<DamagedRow>().is_some() => {
                tracing::error!(error = %e, "stopping the node");
                panic!("{e}");
            }
            Err(e) => {
                tracing::error!(error = %e, lo, hi, "reading the log failed");
                None
            }
        }
    }
}

impl LogStore {
    /// Deletes every entry up to `through`: earlier rows go, the row holding `through + 1`
    /// is stored again from there.
    fn compact(&self, log: &mut redb::Table<u64, &[u8]>, through: u64) -> anyhow::Result<()> {
        let straddling = match log.range(..=through)?.next_back() {
            Some(row) => {
                let (k, v) = row?;
                let mut kept = Vec::new();
                LogEntry::decode_all(self.entries_of(k.value(), v.value())?, |e| {
                    if e.index > through {
                        e.encode(&mut kept);
                    }
                })
                .context("corrupt log row")?;
                Some(kept)
            }
            None => None,
        };
        log.retain_in(..=through, |_, _| false)?;
        if let Some(mut kept) = straddling.filter(|k| !k.is_empty()) {
            self.put_row(log, through + 1, &mut kept)?;
        }
        Ok(())
    }

    /// Deletes every entry from index `from` on: the row holding `from` is cut, later rows go.
    fn truncate(&self, log: &mut redb::Table<u64, &[u8]>, from: u64) -> anyhow::Result<()> {
        let cut = match log.range(..from)?.next_back() {
            Some(row) => {
                let (k, v) = row?;
                let mut kept = Vec::new();
                let mut cut = false;
                LogEntry::decode_all(self.entries_of(k.value(), v.value())?, |e| {
                    if e.index < from {
                        e.encode(&mut kept);
                    } else {
                        cut = true;
                    }
                })
                .context("corrupt log row")?;
                cut.then_some((k.value(), kept))
            }
            None => None,
        };
        if let Some((k, mut kept)) = cut {
            self.put_row(log, k, &mut kept)?;
        }
        log.retain_in(from.., |_, _| false)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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

    /// Membership entries are recorded as they are written, truncated with the log, and an
    /// installed snapshot's membership is recorded at its index: a restart finds them all.
    #[test]
    fn memberships_are_recorded_truncated_and_recovered() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("log.redb");
        let config = |index: u64, ids: &[u64]| LogEntry {
            kind: EntryKind::Config,
            payload: Membership::of_ids(ids.iter().copied()).encode(),
            ..entry(index, 1)
        };
        let s = LogStore::open(&path)?;
        let mut scratch = Vec::new();
        let w = |id, entries| LogWrite {
            id,
            entries,
            ..LogWrite::default()
        };
        s.write(
            &[
                w(1, vec![config(1, &[1, 2, 3]), entry(2, 1)]),
                w(2, vec![config(3, &[1, 2, 3, 4]), entry(4, 1)]),
            ],
            &mut scratch,
        )?;
        // A new leader's log replaces the change at 3 with another at 4.
        s.write(
            &[LogWrite {
                truncate_from: Some(3),
                ..w(3, vec![entry(3, 2), config(4, &[1, 2])])
            }],
            &mut scratch,
        )?;
        s.write(
            &[LogWrite {
                membership: Some((9, Membership::of_ids([2, 5]))),
                ..w(4, Vec::new())
            }],
            &mut scratch,
        )?;
        drop(s);
        let recovered = LogStore::open(&path)?.recover()?;
        let ids: Vec<(u64, Vec<u64>)> = recovered
            .memberships
            .iter()
            .map(|(i, m)| (*i, m.ids().collect()))
            .collect();
        assert_eq!(
            ids,
            vec![(1, vec![1, 2, 3]), (4, vec![1, 2]), (9, vec![2, 5])]
        );
        Ok(())
    }

    #[test]
    fn a_log_belongs_to_the_cluster_it_was_first_opened_for() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("log.redb");
        LogStore::open(&path)?.bind_cluster("a")?;
        let s = LogStore::open(&path)?;
        s.bind_cluster("a")?;
        let refused = s.bind_cluster("b").expect_err("another cluster's log");
        assert!(
            refused.to_string().contains(r#"belongs to cluster "a""#),
            "{refused}"
        );
        // Likewise the limits its entries were applied under.
        s.bind_limits("fuel 1")?;
        s.bind_limits("fuel 1")?;
        let refused = s.bind_limits("fuel 2").expect_err("other limits");
        assert!(
            refused.to_string().contains("start it with `fuel 1`"),
            "{refused}"
        );
        s.bind_cluster("a")?;
        // And the member ids, in any order.
        s.bind_members(&[3, 1, 2])?;
        s.bind_members(&[1, 2, 3])?;
        let refused = s.bind_members(&[2]).expect_err("another membership");
        assert!(refused.to_string().contains("members 1,2,3"), "{refused}");
        Ok(())
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
            // Rows of several writes, then a cut in the middle of a row of an older commit.
            let w3 = LogWrite {
                entries: (5..=9).map(|i| entry(i, 2)).collect(),
                ..Default::default()
            };
            let w4 = LogWrite {
                entries: (10..=12).map(|i| entry(i, 2)).collect(),
                ..Default::default()
            };
            s.write(&[w3, w4], &mut scratch)?;
            assert_eq!(
                s.read(7, 11, usize::MAX)?,
                (7..=10).map(|i| entry(i, 2)).collect::<Vec<_>>()
            );
            let w5 = LogWrite {
                truncate_from: Some(7),
                entries: vec![entry(7, 3)],
                ..Default::default()
            };
            s.write(&[w5], &mut scratch)?;
            assert_eq!(s.read(6, 100, usize::MAX)?, vec![entry(6, 2), entry(7, 3)]);
            let w6 = LogWrite {
                truncate_from: Some(5),
                ..Default::default()
            };
            s.write(&[w6], &mut scratch)?;
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

    #[test]
    fn compaction_drops_the_entries_behind_a_snapshot_and_survives_a_restart() -> anyhow::Result<()>
    {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("log.redb");
        let mut scratch = Vec::new();
        let write = |s: &LogStore, w: LogWrite, scratch: &mut Vec<u8>| s.write(&[w], scratch);
        {
            let s = LogStore::open(&path)?;
            // Rows 1..=4, 5..=9, 10..=12: compacting through 7 cuts the middle one.
            for (lo, hi) in [(1, 4), (5, 9), (10, 12)] {
                let w = LogWrite {
                    entries: (lo..=hi).map(|i| entry(i, 1 + i / 6)).collect(),
                    commit: hi,
                    ..Default::default()
                };
                write(&s, w, &mut scratch)?;
            }
            let w = LogWrite {
                compact_through: Some((7, 2)),
                ..Default::default()
            };
            write(&s, w, &mut scratch)?;
            assert_eq!(s.read(8, 100, usize::MAX)?.len(), 5);
        }
        let s = LogStore::open(&path)?;
        let r = s.recover()?;
        assert_eq!((r.compacted, r.last_index), ((7, 2), 12));
        assert_eq!(r.term_runs, vec![(8, 2), (12, 3)]);
        // An installed snapshot past the log: emptied behind it, then appended to.
        let w = LogWrite {
            compact_through: Some((20, 4)),
            truncate_from: Some(21),
            commit: 20,
            ..Default::default()
        };
        write(&s, w, &mut scratch)?;
        let r = s.recover()?;
        assert_eq!(
            (r.compacted, r.last_index, r.hard_state.commit),
            ((20, 4), 20, 20)
        );
        assert!(r.term_runs.is_empty());
        let w = LogWrite {
            entries: vec![entry(21, 4)],
            ..Default::default()
        };
        write(&s, w, &mut scratch)?;
        let r = s.recover()?;
        assert_eq!((r.last_index, r.term_runs.clone()), (21, vec![(21, 4)]));
        assert_eq!(s.read(21, 22, usize::MAX)?, vec![entry(21, 4)]);
        // A snapshot whose last entry the log holds leaves it as it is; one it does not hold
        // (a crash before an installed snapshot cut the log) empties it behind the snapshot.
        let r = s.align_to_snapshot(r, 21, 4)?;
        assert_eq!((r.compacted, r.last_index), ((20, 4), 21));
        let r = s.align_to_snapshot(r, 21, 5)?;
        assert_eq!((r.compacted, r.last_index), ((21, 5), 21));
        let r = s.align_to_snapshot(r, 30, 5)?;
        assert_eq!(
            (r.compacted, r.last_index, r.hard_state.commit),
            ((30, 5), 30, 30)
        );
        // A snapshot older than the compaction point (a stale backup restored) is refused,
        // and the log left as it was.
        assert!(s.align_to_snapshot(r, 25, 5).is_err());
        assert_eq!(s.recover()?.compacted, (30, 5));
        Ok(())
    }

    /// A byte of an entry damaged on disk while the node was down (a clean stop: redb checks
    /// its own checksums only when repairing after a crash) is found at the next start, not
    /// applied as if it were another entry.
    #[test]
    fn a_row_damaged_on_disk_is_refused() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("log.redb");
        let marked = |index: u64| LogEntry {
            payload: Bytes::from(format!("payload-{index:08}-marker")),
            ..entry(index, 1)
        };
        {
            let s = LogStore::open(&path)?;
            let w = LogWrite {
                entries: (1..=3).map(marked).collect(),
                ..Default::default()
            };
            s.write(&[w], &mut Vec::new())?;
            assert_eq!(s.recover()?.last_index, 3);
        }
        let mut file = std::fs::read(&path)?;
        let needle = b"payload-00000002-marker";
        let mut flipped = 0;
        for at in 0..file.len().saturating_sub(needle.len()) {
            if &file[at..at + needle.len()] == needle {
                file[at + 10] ^= 0x01;
                flipped += 1;
            }
        }
        assert!(flipped > 0, "the entry is in the file");
        std::fs::write(&path, &file)?;
        let s = LogStore::open(&path)?;
        let refused = s.recover().expect_err("a damaged row");
        assert!(refused.to_string().contains("is damaged"), "{refused:#}");
        assert!(s.read(1, 4, usize::MAX).is_err());
        // Read while running (catch-up), it stops the node rather than being retried forever.
        let stopped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            LogRead::entries(&s, 1, 4, usize::MAX)
        }));
        assert!(
            stopped.is_err(),
            "a damaged row read by the core stops the node"
        );
        Ok(())
    }

    /// redb on the zero-filled file (`file.rs`) through several doublings of the file, commits
    /// racing the filler, then a reopen: every entry reads back as written.
    #[test]
    fn a_log_that_grows_the_file_reads_back_after_reopening() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("log.redb");
        let big = |index: u64| LogEntry {
            payload: Bytes::from(vec![(index * 7) as u8; 4000]),
            ..entry(index, 1)
        };
        let mut scratch = Vec::new();
        let mut last = 0;
        {
            let s = LogStore::open(&path)?;
            let start = std::fs::metadata(&path)?.len();
            for _ in 0..200 {
                let w = LogWrite {
                    entries: (last + 1..=last + 20).map(big).collect(),
                    ..Default::default()
                };
                last += 20;
                s.write(&[w], &mut scratch)?;
            }
            let grown = std::fs::metadata(&path)?.len();
            assert!(grown >= 8 * start, "the file grew from {start} to {grown}");
        }
        let s = LogStore::open(&path)?;
        assert_eq!(s.recover()?.last_index, last);
        let all = s.read(1, last + 1, usize::MAX)?;
        assert_eq!(all.len() as u64, last);
        assert!(all.iter().zip(1..).all(|(e, i)| *e == big(i)));
        Ok(())
    }
}
