//! The log manager's disk queue: one thread, one redb writer, group commit.
//!
//! Writes arrive in log order from the core loop. The thread takes everything queued (up to a
//! bound), commits it in one durable transaction, then sends the messages that promised
//! durability (votes, follower acks) and tells the core how far the log is durable — for a
//! leader, that is its own vote in the ballot box. A failed commit stops the node.

use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use tokio::sync::mpsc::UnboundedSender;

use super::core::LogWrite;
use super::metrics::Metrics;
use super::{Event, Transport};
use crate::state_machine::StateMachine;
use crate::storage::LogStore;

pub(crate) enum DiskTask {
    Write(LogWrite),
    Stop,
}

pub(crate) struct DiskQueue<SM: StateMachine> {
    pub store: LogStore,
    pub rx: Receiver<DiskTask>,
    pub events: UnboundedSender<Event<SM>>,
    pub transport: Arc<dyn Transport>,
    pub metrics: Arc<Metrics>,
    pub max_entries: usize,
    pub max_bytes: usize,
}

impl<SM: StateMachine> DiskQueue<SM> {
    pub fn run(self) {
        let mut batch: Vec<LogWrite> = Vec::new();
        let mut scratch = Vec::with_capacity(64 * 1024);
        let mut stopping = false;
        // For the linger: a moving average of entries per commit, a decaying maximum of it (the
        // size a whole cohort of writers reaches), and a moving average of commit time.
        let mut avg_batch = 1.0f64;
        let mut cohort = 1.0f64;
        let mut avg_commit = Duration::from_micros(500);
        while !stopping {
            let first = match self.rx.recv_timeout(Duration::from_secs(1)) {
                Ok(DiskTask::Write(w)) => w,
                Ok(DiskTask::Stop) => break,
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => break,
            };
            let (mut entries, mut bytes) = (first.entries.len(), size(&first));
            batch.push(first);
            let add = |task: DiskTask, batch: &mut Vec<LogWrite>, stopping: &mut bool| match task {
                DiskTask::Write(w) => {
                    let grew = (w.entries.len(), size(&w));
                    batch.push(w);
                    grew
                }
                DiskTask::Stop => {
                    *stopping = true;
                    (0, 0)
                }
            };
            while !stopping && entries < self.max_entries && bytes < self.max_bytes {
                match self.rx.try_recv() {
                    Ok(t) => {
                        let (n, b) = add(t, &mut batch, &mut stopping);
                        (entries, bytes) = (entries + n, bytes + b);
                    }
                    Err(_) => break,
                }
            }
            // Linger: under steady load, a commit that would start with only part of a cohort
            // (the writers released together by the last commits) waits a little for the rest,
            // so one fsync covers the cohort instead of splitting it over two. The target is the
            // recent maximum, not the average: a cohort split over two commits would otherwise
            // lower the average to half the cohort and the split would perpetuate itself.
            let target = cohort * LINGER_FILL;
            if !stopping && avg_batch >= 8.0 && (entries as f64) < target {
                let deadline = Instant::now()
                    + avg_commit
                        .mul_f64(LINGER_WAIT)
                        .min(Duration::from_micros(LINGER_MAX_US));
                while !stopping
                    && (entries as f64) < target
                    && entries < self.max_entries
                    && bytes < self.max_bytes
                {
                    let now = Instant::now();
                    if now >= deadline {
                        break;
                    }
                    match self.rx.recv_timeout(deadline - now) {
                        Ok(t) => {
                            let (n, b) = add(t, &mut batch, &mut stopping);
                            (entries, bytes) = (entries + n, bytes + b);
                        }
                        Err(_) => break,
                    }
                }
            }
            let started = Instant::now();
            if let Err(e) = self.store.write(&batch, &mut scratch) {
                // redb refuses everything after an I/O error; acking anything now could lie.
                tracing::error!(error = %e, "log commit failed; stopping the node");
                let _ = self.events.send(Event::Failed);
                return;
            }
            let took = started.elapsed();
            self.metrics.fsync_latency.observe(took);
            // A one-off burst (a follower catching up, a large submission) is not a cohort:
            // at most twice the average counts, enough to reunite a cohort split in two.
            cohort = (cohort * COHORT_DECAY).max((entries as f64).min(2.0 * avg_batch));
            avg_batch = 0.8 * avg_batch + 0.2 * entries as f64;
            avg_commit = avg_commit.mul_f64(0.8) + took.mul_f64(0.2);
            self.metrics
                .fsync_entries
                .fetch_add(entries as u64, std::sync::atomic::Ordering::Relaxed);
            let (mut id, mut index, mut term) = (0, 0, 0);
            for w in batch.drain(..) {
                for (to, msg) in w.after {
                    self.transport.send(to, msg);
                }
                (id, index, term) = (w.id, w.last_index, w.last_term);
            }
            // The last write covers the whole group: writes are applied in order.
            if self
                .events
                .send(Event::Persisted { id, index, term })
                .is_err()
            {
                return;
            }
        }
    }
}

fn size(w: &LogWrite) -> usize {
    w.entries.iter().map(|e| e.size()).sum::<usize>() + 16
}

/// Linger while a batch holds less than this fraction of the cohort (the recent largest batch)...
const LINGER_FILL: f64 = 0.9;
/// ...for at most this fraction of the average commit time, and at most `LINGER_MAX_US`.
const LINGER_WAIT: f64 = 0.5;
const LINGER_MAX_US: u64 = 600;
/// The cohort estimate forgets a large batch by this factor per commit (about 14 commits to
/// halve), so a load that shrinks stops lingering for writers that no longer come.
const COHORT_DECAY: f64 = 0.95;
