//! How a node's threads are scheduled by the OS.
//!
//! A node's threads hand work to each other all the time: HTTP workers to the core loop, the
//! core loop to the disk thread, the disk thread back, the state-machine thread to the HTTP
//! workers. Under Linux's default policy each of those wake-ups may preempt whatever runs on
//! that CPU, often a thread that was about to hand off work itself. `SCHED_BATCH` keeps the
//! time-sharing and the nice levels but drops wake-up preemption: a woken thread waits for the
//! running one to block or use up its slice. Measured on a 3-node cluster sharing 2 cores
//! (BENCHMARKS.md): the leader's HTTP workers were preempted ~20k times a second, and with
//! this policy the cluster served about a quarter more tasks (median of five alternated runs),
//! with a lower p99.

/// The policy `lockstep serve` runs its threads under.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Scheduling {
    /// Linux `SCHED_BATCH`: no wake-up preemption (elsewhere the same as `normal`).
    #[default]
    Batch,
    /// The OS default (`SCHED_OTHER`).
    Normal,
}

/// Puts the calling thread, and so every thread it starts afterwards, under `policy`.
pub fn apply(policy: Scheduling) -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        let policy = match policy {
            Scheduling::Batch => libc::SCHED_BATCH,
            Scheduling::Normal => libc::SCHED_OTHER,
        };
        let param = libc::sched_param { sched_priority: 0 };
        // SAFETY: `param` is valid for the call; pid 0 is the calling thread.
        if unsafe { libc::sched_setscheduler(0, policy, &param) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = policy;
    Ok(())
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    #[test]
    fn threads_started_afterwards_inherit_the_policy() {
        // On a thread of its own, so the test harness keeps its policy.
        let seen = std::thread::spawn(|| {
            apply(Scheduling::Batch).expect("SCHED_BATCH needs no privilege");
            let child = std::thread::spawn(|| unsafe { libc::sched_getscheduler(0) });
            let back = {
                apply(Scheduling::Normal).expect("back to SCHED_OTHER");
                unsafe { libc::sched_getscheduler(0) }
            };
            (child.join().expect("child thread"), back)
        })
        .join()
        .expect("test thread");
        assert_eq!(seen, (libc::SCHED_BATCH, libc::SCHED_OTHER));
    }
}
