//! What readers may cost the state-machine thread in recoveries.
//!
//! A query that fails (a trap, its fuel) or a `?digest=1` whose snapshot fails leaves the
//! machine's instance unusable: it is rebuilt from its recovery base and replay log on the
//! state-machine thread, and every write of the node waits behind that. A client can ask the
//! same failing question again and again, so such reads of a machine (the failed read and the
//! rebuild it caused) get a share of the thread's time, as a token bucket. Once the bucket is
//! empty, reads of that machine, by any client, are refused without running until the share has
//! paid the debt back. Writes are never refused: their failures are log positions, recovered
//! from on every replica alike.
//!
//! Only failed reads are charged. A read that succeeds is bounded like a task, by its fuel (a
//! `?digest=1` by the snapshot's), and reads are ordinary load; nor is the read that runs the
//! bucket into debt stopped short: what it costs is bounded by its fuel.

use std::time::{Duration, Instant};

/// The share of the state-machine thread's time that failed reads of one machine, with the
/// rebuilds they cause, may take over a long run...
pub const READ_RECOVERY_SHARE: f64 = 0.1;
/// ...and how much of it may be spent at once, after a quiet spell: an occasional failing read
/// is never refused.
pub const READ_RECOVERY_BURST: Duration = Duration::from_millis(250);

/// One machine's bucket.
#[derive(Debug)]
pub(super) struct ReadBudget {
    /// Seconds of recovery that may be spent now; negative while in debt.
    left: f64,
    /// When `left` was last brought up to date.
    at: Instant,
}

impl ReadBudget {
    pub fn new(now: Instant) -> ReadBudget {
        ReadBudget {
            left: READ_RECOVERY_BURST.as_secs_f64(),
            at: now,
        }
    }

    /// `None` if a read may run now; otherwise how long until one may.
    pub fn wait(&mut self, now: Instant) -> Option<Duration> {
        self.refill(now);
        (self.left <= 0.0).then(|| Duration::from_secs_f64(-self.left / READ_RECOVERY_SHARE))
    }

    /// A read that cost a recovery took `took`, which it ended at `now`.
    pub fn spend(&mut self, took: Duration, now: Instant) {
        self.refill(now);
        self.left -= took.as_secs_f64();
    }

    fn refill(&mut self, now: Instant) {
        let earned = now.saturating_duration_since(self.at).as_secs_f64() * READ_RECOVERY_SHARE;
        self.left = (self.left + earned).min(READ_RECOVERY_BURST.as_secs_f64());
        self.at = self.at.max(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_are_refused_once_their_recoveries_outrun_the_share() {
        let t0 = Instant::now();
        let mut b = ReadBudget::new(t0);
        assert_eq!(b.wait(t0), None);
        // Within the burst: still allowed.
        b.spend(Duration::from_millis(200), t0);
        assert_eq!(b.wait(t0), None);
        // 100 ms beyond it: refused for the 1 s the share takes to earn 100 ms back.
        b.spend(Duration::from_millis(150), t0);
        let wait = b.wait(t0).expect("in debt");
        assert!(
            wait > Duration::from_millis(990) && wait <= Duration::from_millis(1000),
            "{wait:?}"
        );
        assert!(b.wait(t0 + Duration::from_millis(900)).is_some());
        assert_eq!(b.wait(t0 + Duration::from_millis(1001)), None);
    }

    #[test]
    fn a_quiet_spell_saves_no_more_than_the_burst() {
        let t0 = Instant::now();
        let mut b = ReadBudget::new(t0);
        let later = t0 + Duration::from_secs(3600);
        b.spend(READ_RECOVERY_BURST, later);
        assert!(b.wait(later).is_some(), "an hour of quiet saved more");
        // A clock read out of order earns nothing and takes nothing back.
        assert!(b.wait(t0).is_some());
    }
}
