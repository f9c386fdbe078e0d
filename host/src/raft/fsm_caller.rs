//! The state-machine queue (braft's FSMCaller): one thread owns the machine.
//!
//! Commit notices coalesce: everything queued is applied in one `StateMachine::apply` call (no-op
//! entries are skipped; user machines see only user payloads) and each waiting caller gets its
//! own entry's output. Reads queued behind an apply run after it, so a read shipped once its
//! read index was committed sees at least that index applied.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::Receiver;

use super::message::LogEntry;
use super::metrics::Metrics;
use super::{Applied, Completion, ProposeError, ReadError, ReadJob};
use crate::state_machine::{Entry, StateMachine};

pub(crate) enum FsmTask<SM: StateMachine> {
    /// Committed entries in order, and the completions of those this node proposed (by index).
    Apply {
        entries: Vec<LogEntry>,
        done: Vec<(u64, Completion<SM::Output>)>,
    },
    /// Runs once everything up to the index is applied (0: at once, on local state).
    Read(u64, ReadJob<SM>),
    Stop,
}

pub(crate) struct FsmCaller<SM: StateMachine> {
    pub sm: SM,
    pub rx: Receiver<FsmTask<SM>>,
    pub applied: Arc<std::sync::atomic::AtomicU64>,
    pub metrics: Arc<Metrics>,
}

impl<SM: StateMachine> FsmCaller<SM> {
    pub fn run(mut self) {
        let mut tasks: Vec<FsmTask<SM>> = Vec::new();
        let mut batch: Vec<Entry> = Vec::new();
        let mut done: Vec<(u64, Completion<SM::Output>)> = Vec::new();
        // Reads whose index is not applied yet, in arrival order.
        let mut waiting: Vec<(u64, ReadJob<SM>)> = Vec::new();
        loop {
            match self.rx.recv() {
                Ok(t) => tasks.push(t),
                Err(_) => return,
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
                        if let Some(e) = entries.last() {
                            last = e.index;
                        }
                        batch.extend(entries.into_iter().filter_map(LogEntry::into_user_entry));
                        done.extend(d);
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
                return;
            }
        }
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
