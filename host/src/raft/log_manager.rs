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
        while !stopping {
            let first = match self.rx.recv_timeout(Duration::from_secs(1)) {
                Ok(DiskTask::Write(w)) => w,
                Ok(DiskTask::Stop) => break,
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => break,
            };
            let (mut entries, mut bytes) = (first.entries.len(), size(&first));
            batch.push(first);
            while entries < self.max_entries && bytes < self.max_bytes {
                match self.rx.try_recv() {
                    Ok(DiskTask::Write(w)) => {
                        entries += w.entries.len();
                        bytes += size(&w);
                        batch.push(w);
                    }
                    Ok(DiskTask::Stop) => {
                        stopping = true;
                        break;
                    }
                    Err(_) => break,
                }
            }
            let started = Instant::now();
            if let Err(e) = self.store.write(&batch, &mut scratch) {
                // redb refuses everything after an I/O error; acking anything now could lie.
                tracing::error!(error = %e, "log commit failed; stopping the node");
                let _ = self.events.send(Event::DiskFailed);
                return;
            }
            self.metrics.fsync_latency.observe(started.elapsed());
            self.metrics
                .fsync_entries
                .fetch_add(entries as u64, std::sync::atomic::Ordering::Relaxed);
            let (mut index, mut term) = (0, 0);
            for w in batch.drain(..) {
                for (to, msg) in w.after {
                    self.transport.send(to, msg);
                }
                (index, term) = (w.last_index, w.last_term);
            }
            // The last write's (index, term) covers the whole group: writes are applied in order.
            if self.events.send(Event::Persisted { index, term }).is_err() {
                return;
            }
        }
    }
}

fn size(w: &LogWrite) -> usize {
    w.entries.iter().map(|e| e.size()).sum::<usize>() + 16
}
