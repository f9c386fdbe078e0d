//! The example machines through the host runtime: semantics, snapshots, upgrades.

use bytes::Bytes;
use lockstep::wasm::{GuestError, Limits, Machine};
use lockstep_tests::{Fixture, entries, guests, show};
use serde_json::{Value, json};

fn json_of(result: &Result<Bytes, GuestError>) -> Value {
    let bytes = result
        .as_ref()
        .unwrap_or_else(|e| panic!("entry failed: {e}"));
    serde_json::from_slice(bytes).expect("JSON output")
}

#[test]
fn counter_adds_and_answers_queries() {
    let fx = Fixture::new(Limits::default());
    let mut m = fx.machine(guests::COUNTER);
    let out = m.apply(entries([r#"{"add": 5}"#, r#"{"add": -2}"#, "nonsense"]));
    assert_eq!(json_of(&out[0]), json!({"value": 5}));
    assert_eq!(json_of(&out[1]), json!({"value": 3}));
    let err = out[2].as_ref().unwrap_err();
    assert_eq!(err.code(), "guest_error");
    assert!(err.to_string().contains("invalid command"), "{err}");
    for body in [&b""[..], b"anything", b"{\"x\":1}"] {
        assert_eq!(
            serde_json::from_slice::<Value>(&m.query(body).unwrap()).unwrap(),
            json!({"value": 3})
        );
    }
}

#[test]
fn kv_commands_and_queries() {
    let fx = Fixture::new(Limits::default());
    let mut m = fx.machine(guests::KV);
    let out = m.apply(entries([
        r#"{"put": {"key": "b", "value": "1"}}"#,
        r#"{"put": {"key": "b", "value": "2"}}"#,
        r#"{"put": {"key": "a/x", "value": "3"}}"#,
        r#"{"put": {"key": "a/y", "value": "4"}}"#,
        r#"{"delete": {"key": "b"}}"#,
        r#"{"delete": {"key": "b"}}"#,
        r#"{"cas": {"key": "c", "from": null, "to": "5"}}"#,
        r#"{"cas": {"key": "c", "from": "4", "to": "6"}}"#,
        r#"{"cas": {"key": "c", "from": "5", "to": "6"}}"#,
    ]));
    let got: Vec<Value> = out.iter().map(json_of).collect();
    assert_eq!(
        got,
        vec![
            json!({"prev": null}),
            json!({"prev": "1"}),
            json!({"prev": null}),
            json!({"prev": null}),
            json!({"prev": "2"}),
            json!({"prev": null}),
            json!({"ok": true, "value": "5"}),
            json!({"ok": false, "value": "5"}),
            json!({"ok": true, "value": "6"}),
        ]
    );
    let q = |m: &mut Machine, body: &str| -> Value {
        serde_json::from_slice(&m.query(body.as_bytes()).unwrap()).unwrap()
    };
    assert_eq!(q(&mut m, r#"{"get": {"key": "c"}}"#), json!({"value": "6"}));
    assert_eq!(
        q(&mut m, r#"{"get": {"key": "b"}}"#),
        json!({"value": null})
    );
    assert_eq!(
        q(&mut m, r#"{"scan": {"prefix": "a/"}}"#),
        json!({"items": [["a/x", "3"], ["a/y", "4"]]})
    );
    let err = m.query(b"{\"nope\": 1}").unwrap_err();
    assert_eq!(err.code(), "guest_error");
}

#[test]
fn snapshot_restores_into_a_new_machine() {
    let fx = Fixture::new(Limits::default());
    let mut a = fx.machine(guests::KV);
    a.apply(entries([r#"{"put": {"key": "k", "value": "v"}}"#]));
    let snap = a.snapshot().unwrap();
    let mut b = fx.machine(guests::KV);
    b.restore(&snap).unwrap();
    assert_eq!(b.snapshot().unwrap(), snap);
    assert_eq!(
        b.query(br#"{"get": {"key": "k"}}"#).unwrap(),
        br#"{"value":"v"}"#
    );
    // A bad snapshot is refused and the machine keeps its state.
    let err = b.restore(b"not a snapshot").unwrap_err();
    assert_eq!(err.code(), "guest_error");
    assert_eq!(b.snapshot().unwrap(), snap);
}

#[test]
fn upgrade_moves_state_and_a_failed_upgrade_keeps_the_old_module() {
    let fx = Fixture::new(Limits::default());
    let counter = fx.deploy(guests::COUNTER);
    let chaos = fx.deploy(guests::CHAOS);
    let kv = fx.deploy(guests::KV);
    let mut m = Machine::new(&fx.registry, &counter).unwrap();
    m.apply(entries([r#"{"add": 40}"#]));
    // chaos reads counter's snapshot (same shape): the value carries over.
    m.upgrade(&fx.registry, &chaos).unwrap();
    assert_eq!(m.digest(), chaos);
    let out = m.apply(entries([r#"{"add": 2}"#]));
    assert_eq!(show(&out[0]), r#"{"value":42}"#);
    // kv cannot read it: the upgrade fails, chaos keeps running with its state.
    let err = m.upgrade(&fx.registry, &kv).unwrap_err();
    assert!(err.to_string().contains("invalid snapshot"), "{err}");
    assert_eq!(m.digest(), chaos);
    assert_eq!(m.query(b"").unwrap(), br#"{"value":42}"#);
    // An unknown digest is refused too.
    assert!(m.upgrade(&fx.registry, &"0".repeat(64)).is_err());
}

#[test]
fn an_empty_batch_applies_nothing() {
    let fx = Fixture::new(Limits::default());
    let mut m = fx.machine(guests::COUNTER);
    m.apply(entries([r#"{"add": 3}"#]));
    let before = m.snapshot().unwrap();
    assert!(m.apply(Vec::new()).is_empty());
    assert_eq!(m.recoveries(), 0);
    assert_eq!(m.snapshot().unwrap(), before);
}
