//! Black-box tests for Lockstep, and the helpers they share.
//!
//! The example guests are built by `build.rs`; their paths are the constants below.

pub mod cluster;
pub mod http;
pub mod partition;

/// Paths of the example guests built by `build.rs`.
pub mod guests {
    include!(concat!(env!("OUT_DIR"), "/guests.rs"));

    /// Reads a built guest.
    pub fn read(path: &str) -> Vec<u8> {
        std::fs::read(path).unwrap_or_else(|e| panic!("cannot read {path}: {e}"))
    }
}

use bytes::Bytes;
use lockstep::machines::{Command, MachineSet};
use lockstep::state_machine::Entry;

/// An entry at `index` (term 1, a timestamp derived from the index) carrying `payload`.
pub fn entry(index: u64, payload: impl Into<Vec<u8>>) -> Entry {
    Entry {
        index,
        term: 1,
        timestamp_ms: 1_700_000_000_000 + index * 7,
        payload: Bytes::from(payload.into()),
    }
}

/// A sequence of entries numbered from 1.
pub fn entries<P: Into<Vec<u8>>>(payloads: impl IntoIterator<Item = P>) -> Vec<Entry> {
    payloads
        .into_iter()
        .zip(1..)
        .map(|(p, i)| entry(i, p))
        .collect()
}

use lockstep::wasm::{GuestError, Limits, Machine, ModuleRegistry, WasmEngine};

/// A registry in a temporary directory (kept alive as long as the fixture).
pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub registry: ModuleRegistry,
}

impl Fixture {
    pub fn new(limits: Limits) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let engine = WasmEngine::new(limits).expect("engine");
        let registry = ModuleRegistry::open(&engine, dir.path()).expect("registry");
        Fixture { dir, registry }
    }

    /// Deploys a built guest and returns its digest.
    pub fn deploy(&self, path: &str) -> String {
        self.registry
            .add(&guests::read(path))
            .expect("deploy")
            .digest
    }

    /// A fresh machine running the guest at `path`.
    pub fn machine(&self, path: &str) -> Machine {
        let digest = self.deploy(path);
        Machine::new(&self.registry, &digest).expect("machine")
    }
}

/// Limits for tests: the defaults, with a smaller fuel budget so spinning guests stop fast.
pub fn test_limits() -> Limits {
    Limits {
        fuel_per_entry: 20_000_000,
        ..Limits::default()
    }
}

/// A result as text, for readable assertions.
pub fn show(result: &Result<Bytes, GuestError>) -> String {
    match result {
        Ok(bytes) => String::from_utf8_lossy(bytes).into_owned(),
        Err(e) => format!("{}: {e}", e.code()),
    }
}

/// Splits `0..len` into consecutive batch sizes drawn from `1..=max` by a seeded generator.
pub fn random_sizes(len: usize, max: usize, seed: u64) -> Vec<usize> {
    let mut rng = Lcg(seed);
    let mut sizes = Vec::new();
    let mut left = len;
    while left > 0 {
        let size = (rng.below(max as u64) as usize + 1).min(left);
        sizes.push(size);
        left -= size;
    }
    sizes
}

/// A small seeded generator (a 64-bit LCG), so that test inputs are the same on every run.
pub struct Lcg(pub u64);

impl Lcg {
    /// The next value, below `n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

/// Applies `log` in batches of the given sizes and returns every result, in order.
pub fn apply_in(
    machine: &mut Machine,
    log: &[Entry],
    sizes: &[usize],
) -> Vec<Result<Bytes, GuestError>> {
    let mut results = Vec::with_capacity(log.len());
    let mut start = 0;
    for &size in sizes {
        let batch = &log[start..start + size];
        let out = machine.apply(batch.to_vec());
        assert_eq!(out.len(), batch.len(), "one result per entry");
        results.extend(out);
        start += size;
    }
    assert_eq!(start, log.len());
    results
}

/// The node's state machine over a registry in `modules`.
pub fn machine_set(modules: &std::path::Path) -> MachineSet {
    let engine = WasmEngine::new(Limits::default()).expect("engine");
    let registry = ModuleRegistry::open(&engine, modules).expect("registry");
    MachineSet::new(std::sync::Arc::new(registry))
}

/// The log entry deploying the guest at `path` as `machine`.
pub fn deploy_entry(index: u64, machine: &str, path: &str) -> Entry {
    Entry {
        index,
        term: 1,
        timestamp_ms: 0,
        payload: Command::Deploy {
            machine: machine.into(),
            module: Bytes::from(guests::read(path)),
        }
        .encode(),
    }
}

/// The log entry running `payload` as a task of `machine`.
pub fn task_entry(index: u64, machine: &str, payload: &str) -> Entry {
    Entry {
        index,
        term: 1,
        timestamp_ms: 0,
        payload: Command::Task {
            machine: machine.into(),
            payload: Bytes::from(payload.to_owned()),
        }
        .encode(),
    }
}
