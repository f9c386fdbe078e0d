//! `/metrics` in the Prometheus text format: HTTP outcomes, guest failures by kind, and the
//! pipeline's own counters.

use std::fmt::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use hyper::StatusCode;

use super::ApiState;
use crate::machines::GuestErrorCounts;

#[derive(Default)]
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
        gauge(&mut out, "lockstep_commit_index", "Highest committed log index.", s.commit_index);
        gauge(&mut out, "lockstep_applied_index", "Highest applied log index.", s.applied_index);
        gauge(
            &mut out,
            "lockstep_is_leader",
            "1 when this node is the leader.",
            u64::from(s.role == crate::raft::Role::Leader),
        );
        header(&mut out, "lockstep_http_responses_total", "HTTP responses by status class.", "counter");
        for (i, c) in self.responses.iter().enumerate() {
            let _ = writeln!(
                out,
                "lockstep_http_responses_total{{class=\"{}xx\"}} {}",
                i + 1,
                c.load(Ordering::Relaxed)
            );
        }
        header(&mut out, "lockstep_guest_errors_total", "Failed tasks by kind.", "counter");
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
        state.node.metrics().render_prometheus(&mut out);
        out
    }
}

pub fn header(out: &mut String, name: &str, help: &str, kind: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

pub fn gauge(out: &mut String, name: &str, help: &str, v: u64) {
    header(out, name, help, "gauge");
    let _ = writeln!(out, "{name} {v}");
}
