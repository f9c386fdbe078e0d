//! Counters and histograms of the pipeline (plain atomics; the HTTP layer renders them).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Upper bounds (µs) of the latency buckets; a last implicit bucket is +Inf.
pub const LATENCY_BOUNDS_US: [u64; 12] = [
    50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 1_000_000,
];
/// Upper bounds of the batch-size buckets.
pub const BATCH_BOUNDS: [u64; 10] = [1, 2, 4, 8, 16, 32, 64, 256, 1024, 4096];

/// A fixed-bucket histogram (cumulative rendering is the reader's job).
pub struct Histogram<const N: usize> {
    bounds: [u64; N],
    counts: [AtomicU64; N],
    overflow: AtomicU64,
    sum: AtomicU64,
    count: AtomicU64,
}

impl<const N: usize> Histogram<N> {
    pub fn new(bounds: [u64; N]) -> Self {
        Histogram {
            bounds,
            counts: std::array::from_fn(|_| AtomicU64::new(0)),
            overflow: AtomicU64::new(0),
            sum: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    pub fn record(&self, v: u64) {
        match self.bounds.iter().position(|&b| v <= b) {
            Some(i) => self.counts[i].fetch_add(1, Relaxed),
            None => self.overflow.fetch_add(1, Relaxed),
        };
        self.sum.fetch_add(v, Relaxed);
        self.count.fetch_add(1, Relaxed);
    }

    pub fn observe(&self, d: Duration) {
        self.record(d.as_micros() as u64);
    }

    pub fn snapshot(&self) -> HistogramSnapshot {
        HistogramSnapshot {
            buckets: self
                .bounds
                .iter()
                .zip(&self.counts)
                .map(|(&b, c)| (b, c.load(Relaxed)))
                .collect(),
            overflow: self.overflow.load(Relaxed),
            sum: self.sum.load(Relaxed),
            count: self.count.load(Relaxed),
        }
    }
}

/// A histogram's values: `(upper bound, count in this bucket)` (not cumulative), plus +Inf.
#[derive(Clone, Debug, Default)]
pub struct HistogramSnapshot {
    pub buckets: Vec<(u64, u64)>,
    pub overflow: u64,
    pub sum: u64,
    pub count: u64,
}

pub struct Metrics {
    pub proposals: AtomicU64,
    pub proposals_refused: AtomicU64,
    pub reads: AtomicU64,
    pub entries_applied: AtomicU64,
    pub apply_batch_size: Histogram<10>,
    pub fsync_latency: Histogram<12>,
    pub fsync_entries: AtomicU64,
    pub stepdowns: AtomicU64,
    pub snapshots_taken: AtomicU64,
    pub snapshots_failed: AtomicU64,
    pub snapshots_installed: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            proposals: AtomicU64::new(0),
            proposals_refused: AtomicU64::new(0),
            reads: AtomicU64::new(0),
            entries_applied: AtomicU64::new(0),
            apply_batch_size: Histogram::new(BATCH_BOUNDS),
            fsync_latency: Histogram::new(LATENCY_BOUNDS_US),
            fsync_entries: AtomicU64::new(0),
            stepdowns: AtomicU64::new(0),
            snapshots_taken: AtomicU64::new(0),
            snapshots_failed: AtomicU64::new(0),
            snapshots_installed: AtomicU64::new(0),
        }
    }
}

/// What `Node::metrics` returns.
#[derive(Clone, Debug, Default)]
pub struct MetricsSnapshot {
    /// Entries accepted into the log by this node as leader.
    pub proposals: u64,
    /// Submissions refused (not leader, term mismatch, overloaded).
    pub proposals_refused: u64,
    pub reads: u64,
    pub commit_index: u64,
    pub applied_index: u64,
    pub entries_applied: u64,
    /// Entries per `StateMachine::apply` call.
    pub apply_batch_size: HistogramSnapshot,
    /// Duration of one durable group commit, µs.
    pub fsync_latency_us: HistogramSnapshot,
    /// Entries made durable (divide by `fsync_latency_us.count` for entries per fsync).
    pub fsync_entries: u64,
    pub stepdowns: u64,
    /// Snapshots of the state machine this node took, those it could not take or store (its
    /// log then stays longer), and leader's snapshots it installed.
    pub snapshots_taken: u64,
    pub snapshots_failed: u64,
    pub snapshots_installed: u64,
    /// Leader only: per follower, `last_index - match_index`.
    pub replication_lag: Vec<(super::NodeId, u64)>,
}
