//! Deploy-time validation and the on-disk artifact cache.

use lockstep::machines::{Effect, Failure, ReadFailure};
use lockstep::state_machine::StateMachine;
use lockstep::wasm::{Limits, Machine, ModuleError, ModuleRegistry, WasmEngine};
use lockstep_tests::{Fixture, deploy_entry, guests, machine_set, task_entry};

fn refuse(fx: &Fixture, bytes: &[u8]) -> ModuleError {
    match fx.registry.add(bytes) {
        Ok(info) => panic!("accepted {} bytes as {}", bytes.len(), info.digest),
        Err(e) => {
            assert_eq!(e.code(), "invalid_module");
            e
        }
    }
}

#[test]
fn random_bytes_are_not_wasm() {
    let fx = Fixture::new(Limits::default());
    let mut state = 0x1234_5678_u64;
    let bytes: Vec<u8> = (0..4096)
        .map(|_| {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1);
            (state >> 56) as u8
        })
        .collect();
    let err = refuse(&fx, &bytes);
    assert!(matches!(err, ModuleError::NotWasm), "{err}");
    assert!(matches!(refuse(&fx, b""), ModuleError::NotWasm));
}

#[test]
fn a_core_module_is_not_a_component() {
    let fx = Fixture::new(Limits::default());
    let core = wat::parse_str(r#"(module (func (export "on-apply")))"#).unwrap();
    let err = refuse(&fx, &core);
    assert!(matches!(err, ModuleError::NotAComponent), "{err}");
    assert!(err.to_string().contains("core WebAssembly module"), "{err}");
}

#[test]
fn a_component_of_another_world_is_refused_with_what_is_wrong() {
    let fx = Fixture::new(Limits::default());
    // Exports nothing of ours.
    let other = wat::parse_str(
        r#"(component
             (core module $m (func (export "hello")))
             (core instance $i (instantiate $m))
             (func (export "hello") (canon lift (core func $i "hello"))))"#,
    )
    .unwrap();
    let err = refuse(&fx, &other);
    assert!(matches!(err, ModuleError::WrongWorld(_)), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("missing exports `on-apply`, `query`, `snapshot`, `restore`"),
        "{msg}"
    );
    assert!(msg.contains("it exports: hello"), "{msg}");

    // The right names with the wrong types.
    let mistyped = wat::parse_str(
        r#"(component
             (core module $m (func (export "f")))
             (core instance $i (instantiate $m))
             (func (export "on-apply") (canon lift (core func $i "f")))
             (func (export "query") (canon lift (core func $i "f")))
             (func (export "snapshot") (canon lift (core func $i "f")))
             (func (export "restore") (canon lift (core func $i "f"))))"#,
    )
    .unwrap();
    let err = refuse(&fx, &mistyped);
    assert!(matches!(err, ModuleError::WrongWorld(_)), "{err}");
    assert!(
        err.to_string()
            .contains("export `on-apply` has the wrong type"),
        "{err}"
    );

    // Imports the host does not provide.
    let importer = wat::parse_str(
        r#"(component
             (import "acme:db/query" (instance (export "get" (func))))
           )"#,
    )
    .unwrap();
    let err = refuse(&fx, &importer);
    assert!(matches!(err, ModuleError::WrongWorld(_)), "{err}");
    assert!(err.to_string().contains("acme:db/query"), "{err}");
}

#[test]
fn a_truncated_component_is_invalid() {
    let fx = Fixture::new(Limits::default());
    let bytes = guests::read(guests::COUNTER);
    for len in [9, 100, bytes.len() / 2, bytes.len() - 1] {
        let err = refuse(&fx, &bytes[..len]);
        assert!(matches!(err, ModuleError::Invalid(_)), "{len} bytes: {err}");
    }
}

#[test]
fn modules_no_machine_runs_are_let_go() {
    let dir = tempfile::tempdir().unwrap();
    let engine = WasmEngine::new(Limits::default()).unwrap();
    let registry = ModuleRegistry::open(&engine, dir.path()).unwrap();
    let counter = registry.add(&guests::read(guests::COUNTER)).unwrap();
    let m = Machine::new(&registry, &counter.digest).unwrap();
    assert_eq!(registry.artifact_hits(), 0, "kept in memory from add");
    let kv = registry.add(&guests::read(guests::KV)).unwrap();
    // counter runs in `m`: kept. kv runs nowhere, but nothing newer has come since.
    Machine::new(&registry, &counter.digest).unwrap();
    Machine::new(&registry, &kv.digest).unwrap();
    assert_eq!(registry.artifact_hits(), 0);
    // counter's last machine goes; the next module loaded lets it go (kv too: unused).
    drop(m);
    let chaos = registry.add(&guests::read(guests::CHAOS)).unwrap();
    Machine::new(&registry, &chaos.digest).unwrap();
    assert_eq!(registry.artifact_hits(), 0);
    Machine::new(&registry, &counter.digest).unwrap();
    assert_eq!(
        registry.artifact_hits(),
        1,
        "counter reloaded from its artifact"
    );
    assert_eq!(registry.compilations(), 3, "and not compiled again");
}

#[test]
fn modules_are_stored_once_and_the_artifact_is_reused() {
    let dir = tempfile::tempdir().unwrap();
    let engine = WasmEngine::new(Limits::default()).unwrap();
    let bytes = guests::read(guests::COUNTER);

    let first = ModuleRegistry::open(&engine, dir.path()).unwrap();
    let info = first.add(&bytes).unwrap();
    assert_eq!(info.digest.len(), 64);
    assert_eq!(first.add(&bytes).unwrap(), info, "adding twice is a no-op");
    assert_eq!(first.compilations(), 1);
    assert!(first.contains(&info.digest));
    assert_eq!(first.bytes(&info.digest).unwrap(), bytes);
    drop(first);

    // A restarted node: the module loads from the precompiled artifact, no compilation.
    let second = ModuleRegistry::open(&engine, dir.path()).unwrap();
    // Deploying the same bytes again (a replayed deploy entry) neither revalidates nor compiles.
    assert_eq!(second.add(&bytes).unwrap(), info);
    assert_eq!(second.load(&info.digest).unwrap(), info);
    let mut m = Machine::new(&second, &info.digest).unwrap();
    assert_eq!(second.artifact_hits(), 1);
    assert_eq!(second.compilations(), 0);
    assert!(m.apply(lockstep_tests::entries([r#"{"add": 1}"#]))[0].is_ok());
    // Loaded once, then served from memory.
    Machine::new(&second, &info.digest).unwrap();
    assert_eq!((second.artifact_hits(), second.compilations()), (1, 0));

    // A damaged artifact is ignored: the module is compiled again, not trusted.
    drop(second);
    for artifact in walk(dir.path())
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "cwasm"))
    {
        let mut data = std::fs::read(&artifact).unwrap();
        let mid = data.len() / 2;
        data[mid] ^= 0xff;
        std::fs::write(&artifact, data).unwrap();
    }
    let third = ModuleRegistry::open(&engine, dir.path()).unwrap();
    Machine::new(&third, &info.digest).unwrap();
    assert_eq!((third.artifact_hits(), third.compilations()), (0, 1));

    // An intact artifact under another module's name is not that module's: a kv artifact
    // copied over counter's is refused, and counter is compiled again.
    let kv = third.add(&guests::read(guests::KV)).unwrap();
    Machine::new(&third, &kv.digest).unwrap();
    drop(third);
    let artifact_of = |digest: &str| {
        walk(dir.path())
            .into_iter()
            .find(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy() == format!("{digest}.cwasm"))
            })
            .expect("artifact")
    };
    std::fs::copy(artifact_of(&kv.digest), artifact_of(&info.digest)).unwrap();
    let fourth = ModuleRegistry::open(&engine, dir.path()).unwrap();
    let mut m = Machine::new(&fourth, &info.digest).unwrap();
    assert_eq!((fourth.artifact_hits(), fourth.compilations()), (0, 1));
    let out = m.apply(lockstep_tests::entries([r#"{"add": 2}"#]));
    assert_eq!(
        lockstep_tests::show(&out[0]),
        r#"{"value":2}"#,
        "counter, not kv"
    );
}

#[test]
fn unknown_and_malformed_digests_are_not_found() {
    let fx = Fixture::new(Limits::default());
    for digest in [
        "0".repeat(64),
        "../../etc/passwd".to_string(),
        String::new(),
    ] {
        match Machine::new(&fx.registry, &digest) {
            Err(lockstep::wasm::MachineError::Module(ModuleError::NotFound(_))) => {}
            Err(e) => panic!("{digest}: {e}"),
            Ok(_) => panic!("{digest}: loaded"),
        }
    }
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}

#[test]
fn one_registry_serves_several_threads() {
    let fx = std::sync::Arc::new(Fixture::new(Limits::default()));
    let bytes = std::sync::Arc::new(guests::read(guests::KV));
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let (fx, bytes) = (fx.clone(), bytes.clone());
            std::thread::spawn(move || {
                let digest = fx.registry.add(&bytes).unwrap().digest;
                let mut m = Machine::new(&fx.registry, &digest).unwrap();
                let put = format!(r#"{{"put": {{"key": "t", "value": "{t}"}}}}"#);
                assert!(m.apply(lockstep_tests::entries([put]))[0].is_ok());
                digest
            })
        })
        .collect();
    let digests: Vec<String> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    assert!(digests.windows(2).all(|w| w[0] == w[1]));
    assert_eq!(
        walk(fx.dir.path())
            .iter()
            .filter(|p| p.extension().is_some_and(|e| e == "wasm"))
            .count(),
        1
    );
}

#[test]
fn a_module_is_stored_even_when_its_artifact_cannot_be() {
    let dir = tempfile::tempdir().unwrap();
    let engine = WasmEngine::new(Limits::default()).unwrap();
    let registry = ModuleRegistry::open(&engine, dir.path()).unwrap();
    // The artifacts' folder replaced by a file: every artifact write fails.
    let artifacts = dir.path().join("artifacts");
    std::fs::remove_dir_all(&artifacts).unwrap();
    std::fs::write(&artifacts, b"not a folder").unwrap();
    let info = registry
        .add(&guests::read(guests::COUNTER))
        .expect("stored without its artifact");
    let mut m = Machine::new(&registry, &info.digest).unwrap();
    assert!(m.apply(lockstep_tests::entries([r#"{"add": 1}"#]))[0].is_ok());
}

/// A deploy this node cannot store (its disk, not the module) must not become the entry's
/// outcome here alone: the node stops instead, through the state-machine thread's panic guard,
/// rather than aborting the process with a core dump.
#[test]
fn a_deploy_the_node_cannot_store_stops_it_instead_of_recording_a_refusal() {
    let dir = tempfile::tempdir().expect("tempdir");
    let modules = dir.path().join("modules");
    let mut set = machine_set(&modules);
    // The modules directory becomes a file: storing the module fails.
    std::fs::remove_dir_all(&modules).expect("remove");
    std::fs::write(&modules, b"not a directory").expect("write");
    let deploy = deploy_entry(1, "c", guests::COUNTER);
    let stopped =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| set.apply(vec![deploy])));
    let panic = stopped.expect_err("the node stops");
    let message = panic
        .downcast_ref::<String>()
        .map(String::as_str)
        .unwrap_or_default();
    assert!(message.contains("module storage failed"), "{message}");
}

/// An upgrade whose new module cannot take the old state says so, not that the module failed
/// to start (the module is valid), and the machine keeps running the old one.
#[test]
fn an_upgrade_that_cannot_carry_the_state_says_so() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut set = machine_set(dir.path());
    let out = set.apply(vec![
        deploy_entry(1, "m", guests::COUNTER),
        deploy_entry(2, "m", guests::KV),
    ]);
    assert!(matches!(out[0], Ok(Effect::Deployed { version: 1, .. })));
    match &out[1] {
        Err(Failure::InvalidModule(message)) => assert!(
            message.contains("could not carry the machine's state over"),
            "{message}"
        ),
        other => panic!("{other:?}"),
    }
    let status = set.status("m", false).expect("still there");
    assert_eq!(status.version, 1);
}

/// The node's snapshot carries every machine with its module: another node (a follower that
/// never saw the deploys, in a fresh data directory) restores the same states. A state its
/// module refuses to restore breaks that machine there, not the node or the other machines.
#[test]
fn a_node_snapshot_restores_every_machine_and_a_refused_state_breaks_only_its_own() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut set = machine_set(&dir.path().join("a"));
    let out = set.apply(vec![
        deploy_entry(1, "counter", guests::COUNTER),
        deploy_entry(2, "chaos", guests::CHAOS),
        task_entry(3, "counter", r#"{"add": 5}"#),
        task_entry(4, "chaos", r#"{"add": 2}"#),
        task_entry(5, "chaos", r#"{"poison": true}"#),
    ]);
    assert!(out.iter().all(Result::is_ok), "{out:?}");
    let snapshot = set.snapshot().expect("snapshot");

    let mut other = machine_set(&dir.path().join("b"));
    other.restore(&snapshot).expect("restore");
    let counter = other.query("counter", b"").expect("counter restored");
    assert_eq!(String::from_utf8_lossy(&counter), r#"{"value":5}"#);
    let names: Vec<String> = other
        .catalog()
        .read()
        .expect("catalog")
        .keys()
        .cloned()
        .collect();
    assert_eq!(names, ["chaos", "counter"]);
    assert_eq!(
        other
            .status("counter", false)
            .expect("status")
            .applied_index,
        5
    );
    match other.query("chaos", b"{}") {
        Err(ReadFailure::Failed(Failure::Guest(e))) => {
            assert!(e.to_string().contains("cannot recover"), "{e}")
        }
        other => panic!("a refused state must break the machine: {other:?}"),
    }
    // The other machines go on.
    let out = other.apply(vec![task_entry(6, "counter", r#"{"add": 1}"#)]);
    assert!(out[0].is_ok(), "{out:?}");

    // Garbage is refused as a whole, and nothing changes.
    assert!(other.restore(b"not a snapshot").is_err());
    assert!(other.query("counter", b"").is_ok());
}
