//! A hostile guest fails the entry it is applying, and nothing else.

use lockstep::machines::{Failure, READ_RECOVERY_BURST, READ_RECOVERY_SHARE, ReadFailure};
use lockstep::state_machine::StateMachine;
use lockstep::wasm::{GuestError, Limits, Machine};
use lockstep_tests::{
    Fixture, deploy_entry, entries, entry, guests, machine_set, show, task_entry, test_limits,
};

#[test]
fn a_trap_fails_only_its_entry_and_is_rolled_back() {
    let fx = Fixture::new(test_limits());
    let mut m = fx.machine(guests::CHAOS);
    let mut log: Vec<String> = (1..=10).map(|n| format!(r#"{{"add": {n}}}"#)).collect();
    let k = 4;
    log[k] = r#"{"trap": true}"#.to_string();
    let results = m.apply(entries(log.clone()));
    assert_eq!(results.len(), 10);
    let mut value = 0;
    for (i, r) in results.iter().enumerate() {
        if i == k {
            let err = r.as_ref().unwrap_err();
            assert_eq!(err.code(), "guest_trap");
            let msg = err.to_string();
            assert!(
                msg.contains("chaos: trap requested") && msg.contains("unreachable"),
                "{msg}"
            );
        } else {
            value += i as i64 + 1;
            assert_eq!(show(r), format!(r#"{{"value":{value}}}"#), "entry {i}");
        }
    }
    // One rebuild after the unmetered attempt failed, one after the metered run found k.
    assert_eq!(m.recoveries(), 2);

    // The state equals that of the log without k.
    let mut without = fx.machine(guests::CHAOS);
    let mut log_without = entries(log);
    log_without.remove(k);
    without.apply(log_without);
    assert_eq!(m.snapshot().unwrap(), without.snapshot().unwrap());
}

#[test]
fn a_spin_runs_out_of_fuel_and_the_next_entry_succeeds() {
    let limits = Limits {
        fuel_per_entry: 5_000_000,
        ..Limits::default()
    };
    let fx = Fixture::new(limits);
    let mut m = fx.machine(guests::CHAOS);
    let out = m.apply(entries([
        r#"{"add": 1}"#,
        r#"{"spin": true}"#,
        r#"{"add": 1}"#,
    ]));
    assert_eq!(show(&out[0]), r#"{"value":1}"#);
    assert_eq!(out[1], Err(GuestError::OutOfFuel { budget: 5_000_000 }));
    assert_eq!(out[1].as_ref().unwrap_err().code(), "out_of_fuel");
    assert_eq!(show(&out[2]), r#"{"value":2}"#);
}

#[test]
fn fuel_is_per_entry_not_per_batch() {
    let work = r#"{"recurse": 5000}"#;
    // One such entry needs more than a 64th of the budget...
    let starved = Fixture::new(Limits {
        fuel_per_entry: 1_000_000 / 64,
        ..Limits::default()
    });
    let out = starved.machine(guests::CHAOS).apply(entries([work]));
    assert_eq!(out[0].as_ref().unwrap_err().code(), "out_of_fuel");
    // ...yet 64 of them fit in one batch: each entry gets the whole budget afresh.
    let fx = Fixture::new(Limits {
        fuel_per_entry: 1_000_000,
        ..Limits::default()
    });
    let out = fx.machine(guests::CHAOS).apply(entries(vec![work; 64]));
    assert!(
        out.iter().all(|r| r.is_ok()),
        "{:?}",
        out.iter().map(show).collect::<Vec<_>>()
    );
}

fn resident_bytes() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<usize>().ok())
        .map_or(0, |kb| kb * 1024)
}

#[test]
fn an_oversized_allocation_hits_the_memory_limit() {
    let fx = Fixture::new(test_limits());
    let mut m = fx.machine(guests::CHAOS);
    let before = resident_bytes();
    let out = m.apply(entries([
        r#"{"add": 1}"#,
        r#"{"alloc_mb": 512}"#,
        r#"{"alloc_mb": 512}"#,
        r#"{"alloc_mb": 8}"#,
        r#"{"add": 1}"#,
    ]));
    assert_eq!(show(&out[0]), r#"{"value":1}"#);
    for r in &out[1..3] {
        assert_eq!(*r, Err(GuestError::MemoryLimit { limit: 64 << 20 }));
        assert_eq!(r.as_ref().unwrap_err().code(), "memory_limit");
    }
    assert!(out[3].is_ok(), "{}", show(&out[3]));
    assert_eq!(show(&out[4]), r#"{"value":2}"#);
    let grown = resident_bytes().saturating_sub(before);
    assert!(
        grown < 200 << 20,
        "resident memory grew by {} MiB",
        grown >> 20
    );
}

#[test]
fn the_memory_cap_is_configurable() {
    let fx = Fixture::new(Limits {
        memory_bytes: 16 << 20,
        ..test_limits()
    });
    let mut m = fx.machine(guests::CHAOS);
    let out = m.apply(entries([r#"{"alloc_mb": 32}"#, r#"{"alloc_mb": 4}"#]));
    assert_eq!(out[0], Err(GuestError::MemoryLimit { limit: 16 << 20 }));
    assert!(out[1].is_ok());
}

#[test]
fn deep_recursion_fails_with_a_stack_error() {
    let fx = Fixture::new(test_limits());
    let mut m = fx.machine(guests::CHAOS);
    let out = m.apply(entries([
        r#"{"recurse": 100}"#,
        r#"{"recurse": 10000000}"#,
        r#"{"add": 1}"#,
    ]));
    assert_eq!(show(&out[0]), r#"{"depth":100}"#);
    let err = out[1].as_ref().unwrap_err();
    assert_eq!(err.code(), "guest_trap");
    assert!(err.to_string().contains("stack overflow"), "{err}");
    assert_eq!(show(&out[2]), r#"{"value":1}"#);
}

#[test]
fn clock_and_random_are_derived_from_the_entry() {
    let log: Vec<_> = (1..=20)
        .map(|i| {
            entry(
                i,
                if i % 2 == 0 {
                    r#"{"clock": true}"#
                } else {
                    r#"{"random": true}"#
                },
            )
        })
        .collect();
    // Two independent nodes: separate engines, registries and instances.
    let (a, b) = (Fixture::new(test_limits()), Fixture::new(test_limits()));
    let (mut ma, mut mb) = (a.machine(guests::CHAOS), b.machine(guests::CHAOS));
    let ra = ma.apply(log.clone());
    std::thread::sleep(std::time::Duration::from_millis(20));
    let rb: Vec<_> = log.iter().flat_map(|e| mb.apply(vec![e.clone()])).collect();
    assert_eq!(ra, rb);
    for (e, r) in log.iter().zip(&ra) {
        let out: serde_json::Value = serde_json::from_slice(r.as_ref().unwrap()).unwrap();
        if e.index % 2 == 0 {
            // The leader's timestamp, not this machine's wall clock.
            assert_eq!(out["unix_ms"], e.timestamp_ms, "entry {}", e.index);
        } else {
            assert_eq!(out["random"].as_str().unwrap().len(), 32);
        }
    }
    // Different entries draw different random values.
    let randoms: std::collections::BTreeSet<_> = ra.iter().step_by(2).map(show).collect();
    assert_eq!(randoms.len(), 10);
}

#[test]
fn a_failing_query_does_not_disturb_the_state() {
    let fx = Fixture::new(test_limits());
    let mut m: Machine = fx.machine(guests::KV);
    m.apply(entries([r#"{"put": {"key": "k", "value": "v"}}"#]));
    assert_eq!(m.query(b"not json").unwrap_err().code(), "guest_error");
    assert_eq!(
        m.query(br#"{"get": {"key": "k"}}"#).unwrap(),
        br#"{"value":"v"}"#
    );
}

/// A client asking a failing question over and over makes the node rebuild the machine each
/// time, on the thread every write waits behind. Past their share of that thread, reads of the
/// machine are refused without running, whatever they ask, while its writes and other
/// machines' reads go on; the share earned back, it answers again.
#[test]
fn reads_that_keep_costing_recoveries_are_refused_for_a_while() {
    use std::time::{Duration, Instant};
    let dir = tempfile::tempdir().expect("tempdir");
    let mut set = machine_set(&dir.path().join("modules"));
    set.apply(vec![
        deploy_entry(1, "chaos", guests::CHAOS),
        deploy_entry(2, "counter", guests::COUNTER),
        task_entry(3, "chaos", r#"{"add": 5}"#),
    ]);
    let started = Instant::now();
    let (mut failed, mut refused, mut refused_fine) = (0, 0, 0);
    let (mut in_failures, mut longest) = (Duration::ZERO, Duration::ZERO);
    for i in 0u64.. {
        let wall = started.elapsed();
        if wall > Duration::from_millis(1500) {
            break;
        }
        // Mostly the failing question; now and then a fine one.
        let fine = i % 10 == 9;
        let asked = Instant::now();
        match set.query("chaos", if fine { b"" } else { b"trap" }) {
            Err(ReadFailure::Failed(Failure::Guest(GuestError::Trap(_)))) if !fine => {
                failed += 1;
                in_failures += asked.elapsed();
                longest = longest.max(asked.elapsed());
            }
            Err(ReadFailure::Throttled { .. }) => {
                refused += 1;
                refused_fine += u32::from(fine);
            }
            Ok(_) if fine => {}
            other => panic!("after {failed} failed queries: {other:?}"),
        }
    }
    let wall = started.elapsed();
    println!(
        "{failed} failed queries ({in_failures:?} of {wall:?} in them), {refused} refused \
         ({refused_fine} of them fine questions)"
    );
    // Without the budget the failures would fill the whole time. With it: the burst and the
    // share of the time, plus the failure that went into debt (any of them, at most the
    // longest), and the few µs per call the budget does not time.
    let allowed = READ_RECOVERY_BURST
        + wall.mul_f64(READ_RECOVERY_SHARE)
        + longest
        + Duration::from_millis(20);
    assert!(
        in_failures <= allowed,
        "{in_failures:?} in failures, {allowed:?} allowed"
    );
    assert!(
        failed > 0 && refused_fine > 0,
        "{failed} failed, {refused_fine} fine refused"
    );
    // Writes to it go on (a task's failure is a log position, never refused), as do reads of
    // the other machine.
    let out = set.apply(vec![task_entry(4, "chaos", r#"{"add": 1}"#)]);
    assert!(out[0].is_ok(), "{:?}", out[0]);
    assert!(set.query("counter", b"").is_ok());
    // Once the share has paid the debt back, the machine answers, with every write applied.
    let answer = loop {
        match set.query("chaos", b"") {
            Ok(answer) => break answer,
            Err(ReadFailure::Throttled { retry_after, .. }) => {
                assert!(retry_after < Duration::from_secs(10), "{retry_after:?}");
                std::thread::sleep(retry_after + Duration::from_millis(5));
            }
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(answer, br#"{"value":6}"#);
}

#[test]
fn sleeping_traps_instead_of_blocking_the_host() {
    let fx = Fixture::new(test_limits());
    let mut m = fx.machine(guests::CHAOS);
    let start = std::time::Instant::now();
    let out = m.apply(entries([r#"{"sleep_ms": 60000}"#, r#"{"add": 1}"#]));
    assert!(start.elapsed() < std::time::Duration::from_secs(10));
    let err = out[0].as_ref().unwrap_err();
    assert_eq!(err.code(), "guest_trap");
    // Refused at the timer itself: a timer's readiness (`pollable.ready`, which never blocks)
    // would follow the host's real time.
    assert!(
        err.to_string()
            .contains("may not block, sleep or set timers (`wasi:clocks/monotonic-clock"),
        "{err}"
    );
    assert_eq!(show(&out[1]), r#"{"value":1}"#);
}

#[test]
fn a_guest_cannot_refill_its_fuel_by_ending_the_batch_again() {
    let fx = Fixture::new(test_limits());
    let mut m = fx.machine(guests::CHAOS);
    // 100,000 rounds of ~1,000 steps: far beyond one entry's 20 M fuel, unless each
    // `end-batch` refilled it.
    // Alone in its batch, its first call closes the batch and the second is refused.
    let out = m.apply(entries([r#"{"refuel": 100000}"#]));
    let err = out[0]
        .as_ref()
        .expect_err("refuelled its way past the budget");
    assert_eq!(err.code(), "guest_trap");
    assert!(err.to_string().contains("end-batch called twice"), "{err}");
    // With entries after it, the first call is already refused.
    let out = m.apply(entries([r#"{"refuel": 100000}"#, r#"{"add": 1}"#]));
    let err = out[0]
        .as_ref()
        .expect_err("refuelled its way past the budget");
    assert!(err.to_string().contains("end-batch after 1 of 2"), "{err}");
    assert_eq!(show(&out[1]), r#"{"value":1}"#);
}

#[test]
fn a_guest_may_print_as_much_as_it_likes() {
    let fx = Fixture::new(test_limits());
    let mut m = fx.machine(guests::CHAOS);
    // 500 entries of 20 lines (~2 KiB) each: 1 MB of stderr over the store's life.
    let out = m.apply(entries(vec![r#"{"log": 20}"#; 500]));
    assert!(
        out.iter().all(|r| r.is_ok()),
        "{:?}",
        out.iter().find(|r| r.is_err())
    );
    // And a panic after all that is still reported with its message.
    let out = m.apply(entries([r#"{"log": 200}"#, r#"{"trap": true}"#]));
    assert!(out[0].is_ok());
    let err = out[1].as_ref().expect_err("trap");
    assert!(err.to_string().contains("chaos: trap requested"), "{err}");
}

#[test]
fn machines_and_registries_cross_threads() {
    fn send<T: Send>() {}
    fn share<T: Send + Sync>() {}
    send::<Machine>();
    share::<lockstep::wasm::ModuleRegistry>();
    share::<lockstep::wasm::WasmEngine>();
}

#[test]
fn a_module_that_meters_every_entry_is_metered_from_then_on() {
    // Modules built before `begin-batch` call `begin-entry` even in a batch the host meters as
    // a whole. Each such batch fails unmetered, rebuilds the machine and is applied again,
    // metered: once is enough to learn it.
    let fx = Fixture::new(test_limits());
    let mut m = fx.machine(guests::CHAOS);
    let out = m.apply(vec![entry(1, r#"{"ignore_begin_batch": true}"#)]);
    assert_eq!(show(&out[0]), r#"{"metering":"every entry"}"#);
    let before = m.recoveries();
    for batch in 0..10u64 {
        let out = m.apply(vec![
            entry(2 + 2 * batch, r#"{"add": 1}"#),
            entry(3 + 2 * batch, r#"{"add": 1}"#),
        ]);
        assert_eq!(show(&out[1]), format!(r#"{{"value":{}}}"#, 2 * batch + 2));
    }
    assert!(
        m.recoveries() - before <= 1,
        "{} rebuilds for 10 batches",
        m.recoveries() - before
    );
}

#[test]
fn a_state_too_large_to_snapshot_does_not_cost_a_rebuild_per_batch() {
    // 1 MiB values under a 24 MiB cap: applies fit long after a snapshot (state + its
    // serialization) no longer does.
    let fx = Fixture::new(Limits {
        memory_bytes: 24 << 20,
        ..test_limits()
    });
    let mut m = fx.machine(guests::KV);
    let value = "v".repeat(1 << 20);
    let put = |i: u64| {
        entry(
            i,
            format!(r#"{{"put": {{"key": "k{i}", "value": "{value}"}}}}"#),
        )
    };
    let mut index = 0;
    while m.recoveries() == 0 {
        index += 1;
        assert!(index < 20, "no snapshot failed below the cap");
        let out = m.apply(vec![put(index)]);
        assert!(out[0].is_ok(), "put {index}: {}", show(&out[0]));
    }
    // Small writes from here on: each batch grows the replay log a little.
    let before = m.recoveries();
    for i in 0..50 {
        index += 1;
        let out = m.apply(vec![entry(
            index,
            format!(r#"{{"put": {{"key": "s{i}", "value": "x"}}}}"#),
        )]);
        assert!(out[0].is_ok(), "{}", show(&out[0]));
    }
    assert!(
        m.recoveries() - before <= 1,
        "{} rebuilds for 50 small batches",
        m.recoveries() - before
    );
}

#[test]
fn a_machine_that_cannot_recover_fails_its_tasks_and_still_takes_an_upgrade() {
    let fx = Fixture::new(test_limits());
    let mut m = fx.machine(guests::CHAOS);
    m.apply(entries([r#"{"add": 1}"#, r#"{"poison": true}"#]));
    // The snapshot becomes the recovery base; restoring it fails.
    m.snapshot().expect("a poisoned state still snapshots");
    let out = m.apply(entries([r#"{"trap": true}"#, r#"{"add": 1}"#]));
    assert_eq!(out[0].as_ref().unwrap_err().code(), "guest_trap");
    let broken = out[1].as_ref().expect_err("no state to apply to");
    assert!(
        broken.to_string().contains("cannot recover on this node"),
        "{broken}"
    );
    // Another replica, healthy, upgrades this machine: the deploy must not fail here alone.
    let counter = fx.registry.add(&guests::read(guests::COUNTER)).unwrap();
    m.upgrade(&fx.registry, &counter.digest)
        .expect("the upgrade takes effect on a broken machine too");
    assert_eq!(m.digest(), counter.digest);
    assert!(
        m.apply(entries([r#"{"add": 1}"#]))[0].is_err(),
        "still broken"
    );
}

/// Fuel counts the guest's instructions, not the host's work inside a call: a host call must
/// cost the host about as little as the instructions that make it. A guest asking the host to
/// copy 64 MiB in one call, in a loop, would otherwise hold every replica for hours.
#[test]
fn a_host_call_cannot_make_the_host_work_far_beyond_the_fuel_paid() {
    let fx = Fixture::new(test_limits());
    let mut m = fx.machine(guests::CHAOS);
    let out = m.apply(entries([
        r#"{"write_kb": 4}"#,
        r#"{"write_kb": 1024}"#,
        r#"{"random_bytes": 4096}"#,
        r#"{"random_bytes": 67108864}"#,
        r#"{"print_kb": 256}"#,
        r#"{"add": 1}"#,
    ]));
    assert_eq!(show(&out[0]), r#"{"failed":false,"written_kb":4}"#);
    let err = out[1].as_ref().unwrap_err();
    assert_eq!(err.code(), "guest_trap");
    assert!(err.to_string().contains("check-write"), "{err}");
    assert_eq!(show(&out[2]), r#"{"random_bytes":4096}"#);
    let err = out[3].as_ref().unwrap_err();
    assert_eq!(err.code(), "guest_trap");
    assert!(err.to_string().contains("exceeds limit"), "{err}");
    // std writes what `check-write` grants, so an honest print of any size goes through.
    assert_eq!(show(&out[4]), r#"{"printed_kb":256}"#);
    assert_eq!(show(&out[5]), r#"{"value":1}"#);
}

/// A machine allowed more memory than wasmtime's default per-call copy (128 MiB) can still be
/// snapshotted (for recovery and upgrades): what one call may copy out is its memory's worth.
#[test]
fn a_state_larger_than_128_mib_still_snapshots() {
    let fx = Fixture::new(Limits {
        memory_bytes: 640 << 20,
        ..test_limits()
    });
    let mut m = fx.machine(guests::KV);
    let value = "x".repeat(1_000_000);
    let puts: Vec<String> = (0..140)
        .map(|i| format!(r#"{{"put": {{"key": "k{i}", "value": "{value}"}}}}"#))
        .collect();
    let out = m.apply(entries(puts));
    assert!(
        out.iter().all(|r| r.is_ok()),
        "{:?}",
        out.iter().find(|r| r.is_err())
    );
    let snapshot = m.snapshot().expect("a snapshot of 140 MB");
    assert!(snapshot.len() > 140_000_000, "{}", snapshot.len());
}

/// A reader asking for the state's digest must not move the base a later recovery restores:
/// here that base would be a snapshot that cannot be restored, and this replica alone would
/// break at the next trap while the others apply on.
#[test]
fn reading_the_state_does_not_move_the_recovery_base() {
    let fx = Fixture::new(test_limits());
    let mut m = fx.machine(guests::CHAOS);
    m.apply(entries([r#"{"add": 1}"#, r#"{"poison": true}"#]));
    m.read_snapshot().expect("a poisoned state still snapshots");
    let out = m.apply(entries([r#"{"trap": true}"#, r#"{"add": 5}"#]));
    assert_eq!(out[0].as_ref().map_err(|e| e.code()), Err("guest_trap"));
    assert_eq!(show(&out[1]), r#"{"value":6}"#);
}
