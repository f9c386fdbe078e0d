//! The state-machine queue (braft's FSMCaller): one thread owns the machine.
//!
//! Commit notices coalesce: everything queued is applied in one `StateMachine::apply` call (no-op
//! entries are skipped; user machines see only user payloads) and each waiting caller gets its
//! own entry's output. Reads queued behind an apply run after it, so a read shipped once its
//! read index was committed sees at least that index applied.
//!
//! Snapshots are taken here too, between applies, every `snapshot_every` entries: the machine's
//! state is made durable beside the log, and the core told, to send it to followers behind and
//! compact the log behind it. A snapshot received from the leader is installed here, in order
//! with the applies: made durable, restored into the machine, then the core told.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::Duration;

use tokio::sync::mpsc::UnboundedSender;

use super::core::Snapshot;
use super::membership::Membership;
use super::message::{EntryKind, LogEntry};
use super::metrics::Metrics;
use super::{Applied, Completion, Event, ProposeError, ReadError, ReadJob};
use crate::state_machine::{Entry, StateMachine};
use crate::storage::SnapshotStore;

/// How often a snapshot that fell due during the previous one's write checks whether that write
/// is done.
const WRITER_POLL: Duration = Duration::from_millis(20);

pub(crate) enum FsmTask<SM: StateMachine> {
    /// Committed entries in order, and the completions of those this node proposed (by index).
    Apply {
        entries: Vec<LogEntry>,
        done: Vec<(u64, Completion<SM::Output>)>,
    },
    /// Runs once everything up to the index is applied (0: at once, on local state).
    Read(u64, ReadJob<SM>),
    /// The leader's snapshot, to replace the state with.
    Install(Snapshot),
    Stop,
}

pub(crate) struct FsmCaller<SM: StateMachine> {
    pub sm: SM,
    pub rx: Receiver<FsmTask<SM>>,
    pub applied: Arc<std::sync::atomic::AtomicU64>,
    pub metrics: Arc<Metrics>,
    pub events: UnboundedSender<Event<SM>>,
    pub snapshots: SnapshotStore,
    /// Entries applied between snapshots (0: none).
    pub snapshot_every: u64,
    /// The latest snapshot's index.
    pub snapshot_index: u64,
    /// Term and timestamp of the last entry applied, and the membership in effect there (what
    /// a snapshot there records).
    pub last_entry: (u64, u64),
    pub membership: Membership,
    /// Set while a snapshot is being written, by this thread (joined before the caller stops,
    /// so that a stopped node writes nothing more).
    pub writing: Arc<AtomicBool>,
    pub writer: Option<std::thread::JoinHandle<()>>,
}

impl<SM: StateMachine> FsmCaller<SM> {
    pub fn run(mut self) {
        let mut tasks: Vec<FsmTask<SM>> = Vec::new();
        let mut batch: Vec<Entry> = Vec::new();
        let mut done: Vec<(u64, Completion<SM::Output>)> = Vec::new();
        // Reads whose index is not applied yet, in arrival order.
        let mut waiting: Vec<(u64, ReadJob<SM>)> = Vec::new();
        loop {
            // A snapshot falls due while the previous one is still being written: it is taken
            // once that one is done, whether or not more entries come.
            let next = if self.snapshot_due() {
                match self.rx.recv_timeout(WRITER_POLL) {
                    Err(RecvTimeoutError::Timeout) => {
                        self.maybe_snapshot();
                        continue;
                    }
                    next => next.map_err(|_| ()),
                }
            } else {
                self.rx.recv().map_err(|_| ())
            };
            match next {
                Ok(t) => tasks.push(t),
                Err(()) => return,
            }
            while tasks.len() < 1024 {
                match self.rx.try_recv() {
                    Ok(t) => tasks.push(t),
                    Err(_) => break,
                }
            }
            let mut stop = false;
            let mut last = 0;
            for task in tasks.drain(..) {
                match task {
                    FsmTask::Apply { entries, done: d } => {
                        // Entries an installed snapshot covers were shipped before it.
                        let applied = self.applied.load(Ordering::Relaxed).max(last);
                        if let Some(e) = entries.last().filter(|e| e.index > applied) {
                            last = e.index;
                            self.last_entry = (e.term, e.timestamp_ms);
                        }
                        let changes = entries
                            .iter()
                            .filter(|e| e.index > applied && e.kind == EntryKind::Config);
                        if let Some(m) = changes
                            .filter_map(|e| Membership::decode(&e.payload).ok())
                            .last()
                        {
                            self.membership = m;
                        }
                        batch.extend(
                            entries
                                .into_iter()
                                .filter(|e| e.index > applied)
                                .filter_map(LogEntry::into_user_entry),
                        );
                        done.extend(d);
                    }
                    FsmTask::Install(snapshot) => {
                        self.flush(&mut batch, &mut done, last);
                        self.install(snapshot);
                        last = 0;
                    }
                    FsmTask::Read(index, job) => {
                        self.flush(&mut batch, &mut done, last);
                        if index <= self.applied.load(Ordering::Relaxed) && waiting.is_empty() {
                            job(Ok(&mut self.sm));
                        } else {
                            waiting.push((index, job));
                        }
                    }
                    FsmTask::Stop => stop = true,
                }
            }
            self.flush(&mut batch, &mut done, last);
            self.maybe_snapshot();
            if !waiting.is_empty() {
                let applied = self.applied.load(Ordering::Relaxed);
                let ready = waiting.iter().take_while(|(i, _)| *i <= applied).count();
                for (_, job) in waiting.drain(..ready) {
                    job(Ok(&mut self.sm));
                }
            }
            if stop {
                for (_, job) in waiting.drain(..) {
                    job(Err(ReadError::ShuttingDown));
                }
                if let Some(writer) = self.writer.take() {
                    let _ = writer.join();
                }
                return;
            }
        }
    }

    fn snapshot_due(&self) -> bool {
        // Saturating: `--snapshot-every` may be as large as u64 (an operator's "never").
        self.snapshot_every != 0
            && self.applied.load(Ordering::Relaxed)
                >= self.snapshot_index.saturating_add(self.snapshot_every)
    }

    /// Every `snapshot_every` entries the machine's state is taken here, between applies, and
    /// made durable beside the log on a thread of its own (the fsync would hold up applying),
    /// which then hands it to the core. A failure skips this one (the log stays longer) and is
    /// retried as many entries on. One due while the previous one is still being written waits
    /// for it (see `run`).
    fn maybe_snapshot(&mut self) {
        if !self.snapshot_due() || self.writing.swap(true, Ordering::AcqRel) {
            return;
        }
        let applied = self.applied.load(Ordering::Relaxed);
        self.snapshot_index = applied;
        let started = std::time::Instant::now();
        let data = match self.sm.snapshot() {
            Ok(data) => data,
            Err(error) => {
                self.writing.store(false, Ordering::Release);
                self.metrics
                    .snapshots_failed
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%error, index = applied, "snapshot skipped");
                return;
            }
        };
        let snapshot = Snapshot {
            index: applied,
            term: self.last_entry.0,
            timestamp_ms: self.last_entry.1,
            data: data.into(),
            membership: self.membership.clone(),
        };
        let taken = started.elapsed();
        let (store, events, metrics, writing) = (
            self.snapshots.clone(),
            self.events.clone(),
            self.metrics.clone(),
            self.writing.clone(),
        );
        let write = move || {
            match store.save(&snapshot) {
                Ok(()) => {
                    tracing::info!(
                        index = snapshot.index,
                        bytes = snapshot.data.len(),
                        taken_ms = taken.as_millis() as u64,
                        written_ms = started.elapsed().as_millis() as u64,
                        "snapshot taken"
                    );
                    metrics.snapshots_taken.fetch_add(1, Ordering::Relaxed);
                    let _ = events.send(Event::Snapshotted(snapshot));
                }
                Err(error) => {
                    metrics.snapshots_failed.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(%error, index = snapshot.index, "snapshot not stored")
                }
            }
            writing.store(false, Ordering::Release);
        };
        match std::thread::Builder::new()
            .name("snapshot-writer".into())
            .spawn(write)
        {
            Ok(writer) => self.writer = Some(writer),
            Err(error) => {
                tracing::warn!(%error, "no thread to write the snapshot: skipped");
                self.writing.store(false, Ordering::Release);
            }
        }
    }

    /// Replaces the state with the leader's snapshot, then stores it (a snapshot that does not
    /// restore is never stored, so a restart still starts from the state this node had). A
    /// node that cannot restore or store it cannot go on: the panic stops it (the thread's
    /// guard), as a failed log commit does.
    fn install(&mut self, snapshot: Snapshot) {
        let index = snapshot.index;
        if index > self.applied.load(Ordering::Relaxed) {
            if let Err(error) = self
                .sm
                .restore(&snapshot.data)
                .and_then(|()| self.snapshots.save(&snapshot))
            {
                tracing::error!(%error, index, "installing the leader's snapshot failed; stopping");
                panic!("installing the leader's snapshot at {index} failed: {error:#}");
            }
            tracing::info!(
                index,
                bytes = snapshot.data.len(),
                "installed the leader's snapshot"
            );
            self.metrics
                .snapshots_installed
                .fetch_add(1, Ordering::Relaxed);
            self.snapshot_index = index;
            self.last_entry = (snapshot.term, snapshot.timestamp_ms);
            if !snapshot.membership.is_empty() {
                self.membership = snapshot.membership.clone();
            }
            self.applied.store(index, Ordering::Release);
        }
        // Also when the machine had it all already: the core waits for this either way.
        let _ = self.events.send(Event::Installed(index));
    }

    fn flush(
        &mut self,
        batch: &mut Vec<Entry>,
        done: &mut Vec<(u64, Completion<SM::Output>)>,
        last: u64,
    ) {
        if !batch.is_empty() {
            // Pair each waiting caller with its entry's position before the machine takes the
            // entries (a follower has no callers: nothing to keep).
            let mut waiting = done.drain(..).peekable();
            let mut callers = Vec::with_capacity(waiting.len());
            for (pos, entry) in batch.iter().enumerate() {
                while waiting.peek().is_some_and(|(i, _)| *i < entry.index) {
                    waiting.next();
                }
                if waiting.peek().is_some_and(|(i, _)| *i == entry.index)
                    && let Some((_, tx)) = waiting.next()
                {
                    callers.push((pos, entry.index, entry.term, tx));
                }
            }
            // Callers whose index is not in the batch cannot be told an output.
            for (_, tx) in waiting {
                let _ = tx.send(Err(ProposeError::OutcomeUnknown));
            }
            let entries = batch.len();
            let outputs = self.sm.apply(std::mem::take(batch));
            self.metrics.apply_batch_size.record(entries as u64);
            self.metrics
                .entries_applied
                .fetch_add(entries as u64, Ordering::Relaxed);
            if outputs.len() != entries {
                tracing::error!(
                    entries,
                    outputs = outputs.len(),
                    "state machine broke its contract"
                );
            }
            let mut outputs = outputs.into_iter().enumerate();
            for (pos, index, term, tx) in callers {
                match outputs.find(|(p, _)| *p == pos) {
                    Some((_, output)) => {
                        let _ = tx.send(Ok(Applied {
                            index,
                            term,
                            output,
                        }));
                    }
                    // A short output list: an honest answer, not silence.
                    None => {
                        let _ = tx.send(Err(ProposeError::OutcomeUnknown));
                    }
                }
            }
        }
        if last > self.applied.load(Ordering::Relaxed) {
            self.applied.store(last, Ordering::Release);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    /// Counts the entries it applied; its snapshot is that count.
    struct Count(u64);

    impl StateMachine for Count {
        type Output = ();
        fn apply(&mut self, batch: Vec<Entry>) -> Vec<()> {
            self.0 += batch.len() as u64;
            vec![(); batch.len()]
        }
        fn snapshot(&mut self) -> anyhow::Result<Vec<u8>> {
            Ok(self.0.to_le_bytes().to_vec())
        }
    }

    fn entry(index: u64) -> LogEntry {
        LogEntry {
            index,
            term: 1,
            timestamp_ms: 0,
            kind: EntryKind::Normal,
            payload: Bytes::from_static(b"x"),
        }
    }

    /// A caller of `Count` snapshotting every `every` entries into `dir`, with the sender of
    /// its tasks and the receiver of its events.
    fn count_caller(
        dir: &std::path::Path,
        every: u64,
        writing: Arc<AtomicBool>,
    ) -> (
        FsmCaller<Count>,
        std::sync::mpsc::Sender<FsmTask<Count>>,
        tokio::sync::mpsc::UnboundedReceiver<Event<Count>>,
    ) {
        let (tasks, rx) = std::sync::mpsc::channel();
        let (events, events_rx) = tokio::sync::mpsc::unbounded_channel();
        let caller = FsmCaller {
            sm: Count(0),
            rx,
            applied: Default::default(),
            metrics: Default::default(),
            events,
            snapshots: SnapshotStore::new(dir.to_path_buf()),
            snapshot_every: every,
            snapshot_index: 0,
            last_entry: (0, 0),
            membership: Membership::of_ids([1]),
            writing,
            writer: None,
        };
        (caller, tasks, events_rx)
    }

    /// Regression: `snapshot_index + snapshot_every` overflowed for a `--snapshot-every` near
    /// u64::MAX, panicking the state-machine thread in a debug build and, wrapped in a release
    /// one, making a snapshot due after every apply once one had been taken.
    #[test]
    fn a_huge_snapshot_interval_means_no_snapshot() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut caller, _tasks, _events) =
            count_caller(dir.path(), u64::MAX, Arc::new(AtomicBool::new(false)));
        caller.snapshot_index = 1_000;
        caller.applied.store(2_000, Ordering::Relaxed);
        assert!(!caller.snapshot_due());
    }

    /// Regression (a CI run): a snapshot that fell due while the previous one was still being
    /// written waited for the next apply, so with no more writes it never came.
    #[test]
    fn a_snapshot_due_during_a_write_is_taken_once_the_write_is_done_without_more_entries() {
        let dir = tempfile::tempdir().expect("tempdir");
        let writing = Arc::new(AtomicBool::new(true)); // the previous snapshot's write
        let (caller, tx, mut events_rx) = count_caller(dir.path(), 5, writing.clone());
        let thread = std::thread::spawn(move || caller.run());
        let applied = |n| FsmTask::Apply {
            entries: (1..=n).map(entry).collect(),
            done: Vec::new(),
        };
        tx.send(applied(7)).expect("send");
        std::thread::sleep(Duration::from_millis(100));
        assert!(events_rx.try_recv().is_err(), "no snapshot while writing");

        writing.store(false, Ordering::Release);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let snapshot = loop {
            match events_rx.try_recv() {
                Ok(Event::Snapshotted(s)) => break s,
                Ok(_) => continue,
                Err(_) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                Err(_) => panic!("the due snapshot was never taken"),
            }
        };
        assert_eq!(snapshot.index, 7);
        assert_eq!(&snapshot.data[..], &7u64.to_le_bytes());
        assert_eq!(snapshot.membership, Membership::of_ids([1]));
        tx.send(FsmTask::Stop).expect("send");
        thread.join().expect("the caller stops");
    }
}
