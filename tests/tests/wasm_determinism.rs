//! Results and state must not depend on how committed entries are grouped into batches.
//!
//! One log of 1,000 entries, applied as batches of 1, as random batch sizes, and as a single
//! batch, on fresh machines: identical per-entry results and identical final snapshots.
//!
//! About memory: the cap bounds linear memory, which also holds the batch being applied and
//! whatever the allocator's history left fragmented, so an allocation that lands within a batch's
//! size of the cap could succeed in one grouping and fail in another. The host keeps that margin
//! small (batches are lowered at most `max_batch_bytes` at a time, the SDK frees each payload
//! once applied, and a failure outside any entry is retried by halves), but it cannot be zero.
//! So this log allocates either far below the cap (4 and 16 MiB of 64) or far above it (512),
//! which is where the promise holds, and that is what is asserted.

use bytes::Bytes;
use lockstep::state_machine::Entry;
use lockstep::wasm::{GuestError, Limits};
use lockstep_tests::{Fixture, Lcg, apply_in, entry, guests, random_sizes, test_limits};

type Results = Vec<Result<Bytes, GuestError>>;

/// Batch sizes, and how many bytes of a batch the machine lowers per `on-apply` call.
fn groupings(len: usize) -> Vec<(&'static str, Vec<usize>, usize)> {
    let whole = test_limits().max_batch_bytes;
    vec![
        ("batches of 1", vec![1; len], whole),
        ("random sizes", random_sizes(len, 64, 7), whole),
        ("random sizes up to 300", random_sizes(len, 300, 11), whole),
        ("one batch", vec![len], whole),
        // Each batch split into many calls: the multi-call path, not the one-call fast path.
        ("one batch, 256 bytes per call", vec![len], 256),
    ]
}

fn check_invariance(guest: &str, log: &[Entry]) -> Results {
    let mut reference: Option<(Results, Vec<u8>)> = None;
    for (name, sizes, max_batch_bytes) in groupings(log.len()) {
        let fx = Fixture::new(Limits {
            max_batch_bytes,
            ..test_limits()
        });
        let mut machine = fx.machine(guest);
        let results = apply_in(&mut machine, log, &sizes);
        let snapshot = machine.snapshot().unwrap();
        match &reference {
            None => reference = Some((results, snapshot)),
            Some((ref_results, ref_snapshot)) => {
                for (i, (a, b)) in ref_results.iter().zip(&results).enumerate() {
                    assert_eq!(a, b, "{name}: entry {} differs", log[i].index);
                }
                assert!(ref_snapshot == &snapshot, "{name}: final snapshot differs");
            }
        }
    }
    reference.expect("at least one grouping").0
}

/// 1,000 entries whose payloads `payload` draws from a generator seeded with `seed`: the same
/// log on every run.
fn seeded_log(seed: u64, mut payload: impl FnMut(&mut Lcg) -> String) -> Vec<Entry> {
    let mut rng = Lcg(seed);
    (1..=1000).map(|i| entry(i, payload(&mut rng))).collect()
}

#[test]
fn chaos_results_and_state_do_not_depend_on_batching() {
    let log = seeded_log(42, |rng| match rng.below(100) {
        0..=1 => r#"{"trap": true}"#.to_string(),
        2 => r#"{"spin": true}"#.to_string(),
        3 => r#"{"alloc_mb": 512}"#.to_string(),
        4..=5 => format!(r#"{{"alloc_mb": {}}}"#, [4, 16][rng.below(2) as usize]),
        6 => r#"{"recurse": 10000000}"#.to_string(),
        7 => r#"{"recurse": 50}"#.to_string(),
        8..=9 => r#"{"clock": true}"#.to_string(),
        10..=11 => r#"{"random": true}"#.to_string(),
        12 => "not a command".to_string(),
        _ => format!(r#"{{"add": {}}}"#, rng.below(1000) as i64 - 500),
    });
    let results = check_invariance(guests::CHAOS, &log);

    // The log really exercised every outcome.
    let count = |code: &str| {
        results
            .iter()
            .filter(|r| r.as_ref().err().map(|e| e.code()) == Some(code))
            .count()
    };
    assert!(count("guest_trap") >= 10, "traps: {}", count("guest_trap"));
    assert!(count("out_of_fuel") >= 3, "spins: {}", count("out_of_fuel"));
    assert!(
        count("memory_limit") >= 3,
        "allocs: {}",
        count("memory_limit")
    );
    assert!(count("guest_error") >= 3);
    assert!(results.iter().filter(|r| r.is_ok()).count() > 800);
}

#[test]
fn kv_results_and_state_do_not_depend_on_batching() {
    let log = seeded_log(7, |rng| {
        let key = format!("k{:02}", rng.below(40));
        let value = format!("v{}", rng.below(5));
        match rng.below(10) {
            0..=4 => format!(r#"{{"put": {{"key": "{key}", "value": "{value}"}}}}"#),
            5..=6 => format!(r#"{{"delete": {{"key": "{key}"}}}}"#),
            7 => format!(r#"{{"cas": {{"key": "{key}", "from": null, "to": "{value}"}}}}"#),
            8 => format!(r#"{{"cas": {{"key": "{key}", "from": "v1", "to": "{value}"}}}}"#),
            _ => r#"{"frobnicate": {}}"#.to_string(),
        }
    });
    let results = check_invariance(guests::KV, &log);
    assert!(results.iter().filter(|r| r.is_err()).count() >= 50);
}

/// Without clock, random or spins, the machine stays on the unmetered fast path and falls back
/// to per-entry metering only for the batches that fail: the outcome must still not depend on
/// batching.
#[test]
fn the_unmetered_fast_path_gives_the_same_results() {
    let log = seeded_log(99, |rng| match rng.below(100) {
        0..=2 => r#"{"trap": true}"#.to_string(),
        3 => r#"{"alloc_mb": 512}"#.to_string(),
        4 => r#"{"alloc_mb": 4}"#.to_string(),
        5 => r#"{"recurse": 10000000}"#.to_string(),
        6 => "[]".to_string(),
        _ => format!(r#"{{"add": {}}}"#, rng.below(100)),
    });
    let results = check_invariance(guests::CHAOS, &log);
    assert!(results.iter().filter(|r| r.is_err()).count() >= 40);
}

/// Outputs stay in the guest's memory until its call returns, so in one call an entry has less
/// headroom the more its neighbours returned: here ten answers of 900 KB each. An entry that
/// fails for want of memory (or fuel) beside others is therefore applied again on its own, and
/// that outcome is its result: the `put` below must not fail in the one grouping and succeed in
/// the other (it did, before).
#[test]
fn an_entry_short_of_memory_beside_large_outputs_is_tried_alone() {
    let big = "b".repeat(900_000);
    let mut log = vec![entry(
        1,
        format!(r#"{{"put": {{"key": "big", "value": "{big}"}}}}"#),
    )];
    for i in 2..=11 {
        log.push(entry(
            i,
            r#"{"cas": {"key": "big", "from": "nope", "to": "x"}}"#.to_string(),
        ));
    }
    let put = "p".repeat(2_500_000);
    log.push(entry(
        12,
        format!(r#"{{"put": {{"key": "p", "value": "{put}"}}}}"#),
    ));
    let limits = Limits {
        memory_bytes: 16 << 20,
        max_batch_bytes: 8 << 20,
        fuel_per_entry: 200_000_000,
        ..test_limits()
    };
    let mut outcomes = Vec::new();
    for sizes in [vec![1; log.len()], vec![log.len()]] {
        let fx = Fixture::new(limits.clone());
        let mut machine = fx.machine(guests::KV);
        let results = apply_in(&mut machine, &log, &sizes);
        outcomes.push((results, machine.snapshot().expect("snapshot")));
    }
    // Each result as its size or error code: the values are too long to print.
    let brief = |results: &Results| -> Vec<String> {
        results
            .iter()
            .map(|r| match r {
                Ok(b) => format!("{} bytes", b.len()),
                Err(e) => e.code().to_string(),
            })
            .collect()
    };
    let (alone, together) = (&outcomes[0], &outcomes[1]);
    assert!(alone.0[11].is_ok(), "{:?}", brief(&alone.0));
    assert_eq!(
        brief(&alone.0),
        brief(&together.0),
        "results differ between groupings"
    );
    assert!(alone.0 == together.0, "results differ between groupings");
    assert!(alone.1 == together.1, "states differ between groupings");
}

/// A recovery restores the base snapshot and replays what was applied since, in a fresh
/// instance. Whatever the snapshot does not carry (here std's count of `HashMap`s created, which
/// seeds the next one's order) then follows where the base was taken, so the base must move at
/// the same entry on every replica, not at the end of whatever batch crossed the threshold.
#[test]
fn the_recovery_base_moves_at_the_same_entry_whatever_the_grouping() {
    let pad = format!(r#"{{"pad": "{}"}}"#, "x".repeat(8_000));
    let order = r#"{"hash_order": true}"#.to_string();
    let mut payloads = vec![order.clone()];
    payloads.extend(std::iter::repeat_n(pad.clone(), 100));
    payloads.push(order.clone());
    // The replay log passes 1 MiB in here: the base moves.
    payloads.extend(std::iter::repeat_n(pad, 100));
    payloads.push(order.clone());
    payloads.push(r#"{"trap": true}"#.to_string());
    payloads.push(order);
    let log = lockstep_tests::entries(payloads);
    let n = log.len();
    let mut reference: Option<Results> = None;
    for sizes in [vec![1; n], vec![n], random_sizes(n, 50, 3)] {
        let fx = Fixture::new(test_limits());
        let mut machine = fx.machine(guests::CHAOS);
        let results = apply_in(&mut machine, &log, &sizes);
        assert_eq!(
            results[n - 2].as_ref().map_err(|e| e.code()),
            Err("guest_trap")
        );
        match &reference {
            None => reference = Some(results),
            Some(r) => assert!(
                r[n - 1] == results[n - 1],
                "after the recovery: {:?} vs {:?}",
                r[n - 1],
                results[n - 1]
            ),
        }
    }
}

/// A recovery's replay groups the logged entries its own way (up to `max_batch_bytes` a call),
/// not as they were applied. Here six 3.3 MB payloads beside a 5 MB value in a 16 MiB memory:
/// whichever way they are batched, some call fails and the machine rebuilds, and its replay
/// lowered three or more of the logged payloads in one call, which fails outside any entry.
/// That marked the machine broken (every later task failed on this replica). Replay halves
/// such a call, as the live path does.
#[test]
fn a_replay_halves_a_call_that_fails_outside_any_entry() {
    let big = "b".repeat(5 << 20);
    let pad = format!(r#"{{"pad": "{}"}}"#, "x".repeat(3300 << 10));
    let mut payloads = vec![format!(r#"{{"put": {{"key": "big", "value": "{big}"}}}}"#)];
    payloads.extend(std::iter::repeat_n(pad, 6));
    payloads.push(r#"{"put": {"key": "k", "value": "v"}}"#.to_string());
    let log = lockstep_tests::entries(payloads);
    let limits = Limits {
        memory_bytes: 16 << 20,
        max_batch_bytes: 16 << 20,
        fuel_per_entry: 200_000_000,
        ..test_limits()
    };
    let mut outcomes = Vec::new();
    for sizes in [vec![1; log.len()], vec![1, 3, 3, 1]] {
        let fx = Fixture::new(limits.clone());
        let mut machine = fx.machine(guests::KV);
        let results = apply_in(&mut machine, &log, &sizes);
        assert!(machine.recoveries() >= 2, "batches {sizes:?}: no rebuild");
        assert_eq!(
            lockstep_tests::show(&results[7]),
            r#"{"prev":null}"#,
            "batches {sizes:?}"
        );
        let k = machine.query(br#"{"get": {"key": "k"}}"#);
        // The state is too large to serialize within the cap: both fail alike.
        outcomes.push((results, k, machine.snapshot()));
    }
    assert!(outcomes[0] == outcomes[1], "groupings differ");
    assert_eq!(
        outcomes[0].1.as_deref().ok(),
        Some(&br#"{"value":"v"}"#[..])
    );
}

/// A guest may survive a refused memory growth (`try_reserve`, a C `malloc` returning null) and
/// answer something else. Beside a neighbour whose payload fills its memory (payloads are all in
/// memory while a call runs), that answer depends on the grouping, so such an entry is applied
/// again alone, as one that trapped would be, live and on replay.
#[test]
fn an_entry_refused_memory_that_carries_on_is_tried_alone() {
    let pad = format!(r#"{{"pad": "{}"}}"#, "x".repeat(8 << 20));
    let log = lockstep_tests::entries([
        r#"{"add": 1}"#.to_string(),
        r#"{"try_alloc_mb": 8}"#.to_string(),
        // Traps if the refusal above took effect: that trap must not make it stick.
        r#"{"trap_if_refused": true}"#.to_string(),
        pad,
        r#"{"try_alloc_mb": 8}"#.to_string(),
        r#"{"add": 1}"#.to_string(),
        // The recovery replays the log above, grouped its own way.
        r#"{"trap": true}"#.to_string(),
        r#"{"add": 1}"#.to_string(),
    ]);
    let limits = Limits {
        memory_bytes: 16 << 20,
        max_batch_bytes: 16 << 20,
        ..test_limits()
    };
    let mut outcomes = Vec::new();
    for sizes in [
        vec![1; log.len()],
        vec![log.len()],
        vec![2, 2, 4],
        vec![3, 5],
    ] {
        let fx = Fixture::new(limits.clone());
        let mut machine = fx.machine(guests::CHAOS);
        let results = apply_in(&mut machine, &log, &sizes);
        let shown: Vec<String> = results.iter().map(lockstep_tests::show).collect();
        outcomes.push((sizes, shown, machine.snapshot().expect("snapshot")));
    }
    let (_, alone, state) = &outcomes[0];
    assert_eq!(alone[1], r#"{"ok":true,"try_alloc_mb":8}"#);
    assert_eq!(alone[2], r#"{"refusals":0}"#);
    assert_eq!(alone[7], r#"{"value":3}"#);
    for (sizes, results, s) in &outcomes[1..] {
        assert_eq!(results, alone, "batches {sizes:?}");
        assert!(s == state, "batches {sizes:?}: states differ");
    }
}
