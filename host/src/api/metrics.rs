//! `/metrics` in the Prometheus text format: HTTP outcomes, guest failures by kind, and the
//! pipeline's own counters.

use std::fmt::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use hyper::StatusCode;

use super::ApiState;
use crate::machines::GuestErrorCounts;
use crate::raft::{HistogramSnapshot, MetricsSnapshot};

pub struct Metrics {
    /// Responses by status class: 1xx..5xx.
    responses: [AtomicU64; 5],
    pub guest_errors: Arc<GuestErrorCounts>,
}

impl Metrics {
    pub fn new(guest_errors: Arc<GuestErrorCounts>) -> Self {
        Metrics {
            responses: Default::default(),
            guest_errors,
        }
    }

    pub fn count_response(&self, status: StatusCode) {
        let class = (status.as_u16() / 100).clamp(1, 5) as usize - 1;
        self.responses[class].fetch_add(1, Ordering::Relaxed);
    }

    pub fn render(&self, state: &ApiState) -> String {
        let mut out = String::with_capacity(4096);
        let s = state.node.status();
        gauge(&mut out, "lockstep_term", "Current Raft term.", s.term);
        gauge(
            &mut out,
            "lockstep_commit_index",
            "Highest committed log index.",
            s.commit_index,
        );
        gauge(
            &mut out,
            "lockstep_applied_index",
            "Highest applied log index.",
            s.applied_index,
        );
        gauge(
            &mut out,
            "lockstep_is_leader",
            "1 when this node is the leader.",
            u64::from(s.role == crate::raft::Role::Leader),
        );
        header(
            &mut out,
            "lockstep_http_responses_total",
            "HTTP responses by status class.",
            "counter",
        );
        for (i, c) in self.responses.iter().enumerate() {
            let _ = writeln!(
                out,
                "lockstep_http_responses_total{{class=\"{}xx\"}} {}",
                i + 1,
                c.load(Ordering::Relaxed)
            );
        }
        header(
            &mut out,
            "lockstep_guest_errors_total",
            "Failed tasks by kind.",
            "counter",
        );
        let g = &self.guest_errors;
        for (kind, c) in [
            ("guest_error", &g.guest_error),
            ("guest_trap", &g.guest_trap),
            ("out_of_fuel", &g.out_of_fuel),
            ("memory_limit", &g.memory_limit),
        ] {
            let _ = writeln!(
                out,
                "lockstep_guest_errors_total{{kind=\"{kind}\"}} {}",
                c.load(Ordering::Relaxed)
            );
        }
        render_pipeline(&mut out, &state.node.metrics());
        out
    }
}

fn render_pipeline(out: &mut String, m: &MetricsSnapshot) {
    for (name, help, v) in [
        (
            "lockstep_proposals_total",
            "Entries this node accepted into the log as leader.",
            m.proposals,
        ),
        (
            "lockstep_proposals_refused_total",
            "Submissions refused (not leader, term mismatch, overloaded).",
            m.proposals_refused,
        ),
        ("lockstep_reads_total", "Reads served.", m.reads),
        (
            "lockstep_entries_applied_total",
            "Entries applied to the state machine.",
            m.entries_applied,
        ),
        (
            "lockstep_fsync_entries_total",
            "Entries made durable by group commits.",
            m.fsync_entries,
        ),
        (
            "lockstep_stepdowns_total",
            "Times this node stopped leading.",
            m.stepdowns,
        ),
        (
            "lockstep_snapshots_taken_total",
            "Snapshots of the machines this node took (the log compacts behind them).",
            m.snapshots_taken,
        ),
        (
            "lockstep_snapshots_failed_total",
            "Snapshots this node could not take or store (its log is compacted later); see its log.",
            m.snapshots_failed,
        ),
        (
            "lockstep_snapshots_installed_total",
            "Leader's snapshots this node installed, having fallen behind its compacted log.",
            m.snapshots_installed,
        ),
    ] {
        header(out, name, help, "counter");
        let _ = writeln!(out, "{name} {v}");
    }
    histogram(
        out,
        "lockstep_apply_batch_entries",
        "Entries per state-machine apply call.",
        &m.apply_batch_size,
    );
    histogram(
        out,
        "lockstep_fsync_latency_us",
        "Duration of one durable group commit, microseconds.",
        &m.fsync_latency_us,
    );
    header(
        out,
        "lockstep_replication_lag_entries",
        "Leader only: entries a follower is behind.",
        "gauge",
    );
    for (id, lag) in &m.replication_lag {
        let _ = writeln!(
            out,
            "lockstep_replication_lag_entries{{follower=\"{id}\"}} {lag}"
        );
    }
}

/// Prometheus buckets are cumulative; the snapshot's are per bucket.
fn histogram(out: &mut String, name: &str, help: &str, h: &HistogramSnapshot) {
    header(out, name, help, "histogram");
    let mut cumulative = 0;
    for (le, n) in &h.buckets {
        cumulative += n;
        let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {cumulative}");
    }
    let _ = writeln!(
        out,
        "{name}_bucket{{le=\"+Inf\"}} {}",
        cumulative + h.overflow
    );
    let _ = writeln!(out, "{name}_sum {}\n{name}_count {}", h.sum, h.count);
}

pub fn header(out: &mut String, name: &str, help: &str, kind: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

pub fn gauge(out: &mut String, name: &str, help: &str, v: u64) {
    header(out, name, help, "gauge");
    let _ = writeln!(out, "{name} {v}");
}
