//! `on-apply` throughput of the `counter` example through `lockstep::wasm::Machine`, with every
//! safety knob on: fuel metered per entry, the memory cap, NaN canonicalization, deterministic
//! relaxed SIMD, the replay log kept for trap recovery.
//!
//! Run: `cargo bench -p lockstep-tests --bench on_apply` (figures in BENCHMARKS.md).

use std::time::Instant;

use lockstep::state_machine::Entry;
use lockstep::wasm::{Limits, Machine};
use lockstep_tests::{Fixture, entry, guests};

const RUNS: usize = 15;
const ENTRIES_PER_RUN: usize = 256 * 400;

fn main() {
    let limits = Limits::default();
    let fx = Fixture::new(limits.clone());
    println!("Limits: {limits:?}");
    println!();
    println!(
        "| batch | median entries/s (wall) | median µs per call (wall) | median entries/s (CPU time) | min..max entries/s (wall) |"
    );
    println!("|---:|---:|---:|---:|---:|");
    // `ON_APPLY_BATCHES=256` runs only that batch size (for profiling).
    let sizes: Vec<usize> = std::env::var("ON_APPLY_BATCHES")
        .ok()
        .map(|s| s.split(',').filter_map(|n| n.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![1, 16, 256]);
    // `ON_APPLY_RUNS=200` runs longer (so that compiling the guest is a small share of a profile).
    let runs: usize = std::env::var("ON_APPLY_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(RUNS)
        .max(1);
    for batch_size in sizes {
        // `ON_APPLY_GUEST=path.wasm` measures another build of the guest (A/B comparisons).
        let guest = std::env::var("ON_APPLY_GUEST").unwrap_or_else(|_| guests::COUNTER.into());
        let mut machine = fx.machine(&guest);
        let batch: Vec<Entry> = (1..=batch_size as u64)
            .map(|i| entry(i, r#"{"add":1}"#))
            .collect();
        let calls = ENTRIES_PER_RUN / batch_size;
        // Warm-up: page in the code, grow the guest's heap, fill the replay log once.
        for _ in 0..calls / 4 {
            run(&mut machine, batch.clone());
        }
        let (mut wall, mut cpu): (Vec<f64>, Vec<f64>) = (0..runs)
            .map(|_| {
                // The machine takes its entries, as from the pipeline: copies made untimed.
                let batches = vec![batch.clone(); calls];
                let (start, cpu_start) = (Instant::now(), thread_cpu_ns());
                for batch in batches {
                    run(&mut machine, batch);
                }
                let entries = (calls * batch_size) as f64;
                let cpu_s = (thread_cpu_ns().saturating_sub(cpu_start)) as f64 / 1e9;
                (entries / start.elapsed().as_secs_f64(), entries / cpu_s)
            })
            .unzip();
        wall.sort_by(f64::total_cmp);
        cpu.sort_by(f64::total_cmp);
        let median = wall[runs / 2];
        println!(
            "| {batch_size} | {:.2} M | {:.2} | {:.2} M | {:.2} M .. {:.2} M |",
            median / 1e6,
            batch_size as f64 / median * 1e6,
            cpu[runs / 2] / 1e6,
            wall[0] / 1e6,
            wall[runs - 1] / 1e6,
        );
    }
}

/// Nanoseconds this thread has spent on a CPU: unlike wall time, not inflated when other
/// processes compete for the cores.
fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return 0;
    }
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn run(machine: &mut Machine, batch: Vec<Entry>) {
    let results = machine.apply(batch);
    debug_assert!(results.iter().all(|r| r.is_ok()));
    std::hint::black_box(results);
}
