//! The node's state machine: the set of deployed Wasm machines.
//!
//! Every committed entry is a [`Command`]: deploy or upgrade a machine, delete one, or run a task
//! on one. Deploys are log entries, so every replica switches modules at the same index. Runs of
//! consecutive tasks for the same machine go to its `on-apply` as one batch.

pub mod command;
mod read_budget;
mod snapshot;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes};
use sha2::{Digest, Sha256};

use crate::state_machine::{Entry, StateMachine};
use crate::wasm::{GuestError, Machine, MachineError, ModuleError, ModuleRegistry};
pub use command::{Command, CommandError, validate_name};
use read_budget::ReadBudget;
pub use read_budget::{READ_RECOVERY_BURST, READ_RECOVERY_SHARE};

/// What applying one entry did, when it succeeded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// The task's output from the guest.
    Output(Bytes),
    Deployed {
        digest: String,
        version: u64,
        created: bool,
    },
    Deleted,
}

/// Why an entry failed. Failures are deterministic: every replica records the same one.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Failure {
    #[error(transparent)]
    Guest(#[from] GuestError),
    #[error("no machine named {0:?}")]
    NotFound(String),
    #[error("invalid module: {0}")]
    InvalidModule(String),
    #[error("undecodable entry: {0}")]
    BadEntry(#[from] CommandError),
}

pub type Outcome = Result<Effect, Failure>;

/// Why a read (a query, a machine's description) was not answered. Unlike a [`Failure`], a
/// refusal is this node's alone: it depends on when the reads came.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ReadFailure {
    #[error(transparent)]
    Failed(#[from] Failure),
    /// Reads of this machine have cost more recoveries than their share of the state-machine
    /// thread (`read_budget`); none runs for `retry_after`.
    #[error(
        "reads of machine {machine:?} keep failing and each costs a rebuild of its state: \
         refused for the next {} ms",
        retry_after.as_millis().max(1)
    )]
    Throttled {
        machine: String,
        retry_after: Duration,
    },
}

/// What the HTTP layer may read without going through the state-machine thread.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct MachineInfo {
    pub name: String,
    pub digest: String,
    pub version: u64,
}

/// Applied machines by name, as of the last applied entry.
pub type Catalog = Arc<RwLock<BTreeMap<String, MachineInfo>>>;

/// Guest failures by kind, for `/metrics`.
#[derive(Debug, Default)]
pub struct GuestErrorCounts {
    pub guest_error: AtomicU64,
    pub guest_trap: AtomicU64,
    pub out_of_fuel: AtomicU64,
    pub memory_limit: AtomicU64,
}

impl GuestErrorCounts {
    fn count(&self, e: &GuestError) {
        let c = match e {
            GuestError::Guest(_) => &self.guest_error,
            GuestError::Trap(_) => &self.guest_trap,
            GuestError::OutOfFuel { .. } => &self.out_of_fuel,
            GuestError::MemoryLimit { .. } => &self.memory_limit,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }
}

/// A machine's state as `GET /v1/machines/{name}` reports it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MachineStatus {
    pub name: String,
    pub digest: String,
    pub version: u64,
    pub applied_index: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state_digest: Option<String>,
}

struct Deployed {
    machine: Machine,
    digest: String,
    version: u64,
    reads: ReadBudget,
}

impl Deployed {
    fn new(machine: Machine, digest: String, version: u64) -> Deployed {
        Deployed {
            machine,
            digest,
            version,
            reads: ReadBudget::new(Instant::now()),
        }
    }

    /// Runs a read of this machine `name`, unless its reads are in debt, and charges the read's
    /// time to them when it cost a recovery.
    fn read<T>(
        &mut self,
        name: &str,
        read: impl FnOnce(&mut Machine) -> Result<T, GuestError>,
    ) -> Result<T, ReadFailure> {
        let started = Instant::now();
        if let Some(retry_after) = self.reads.wait(started) {
            return Err(ReadFailure::Throttled {
                machine: name.to_owned(),
                retry_after,
            });
        }
        let recoveries = self.machine.recoveries();
        let result = read(&mut self.machine);
        if self.machine.recoveries() != recoveries {
            let now = Instant::now();
            self.reads.spend(now - started, now);
        }
        result.map_err(|e| Failure::from(e).into())
    }
}

pub struct MachineSet {
    registry: Arc<ModuleRegistry>,
    machines: BTreeMap<String, Deployed>,
    applied_index: u64,
    catalog: Catalog,
    errors: Arc<GuestErrorCounts>,
}

impl MachineSet {
    pub fn new(registry: Arc<ModuleRegistry>) -> Self {
        MachineSet {
            registry,
            machines: BTreeMap::new(),
            applied_index: 0,
            catalog: Catalog::default(),
            errors: Arc::default(),
        }
    }

    pub fn catalog(&self) -> Catalog {
        self.catalog.clone()
    }

    pub fn error_counts(&self) -> Arc<GuestErrorCounts> {
        self.errors.clone()
    }

    /// Runs a read-only query on `machine`'s applied state.
    pub fn query(&mut self, machine: &str, request: &[u8]) -> Result<Vec<u8>, ReadFailure> {
        let d = self
            .machines
            .get_mut(machine)
            .ok_or_else(|| Failure::NotFound(machine.to_owned()))?;
        d.read(machine, |m| m.query(request))
    }

    /// Describes `machine`; with `state_digest`, hashes its snapshot at the applied index.
    pub fn status(
        &mut self,
        machine: &str,
        state_digest: bool,
    ) -> Result<MachineStatus, ReadFailure> {
        let applied_index = self.applied_index;
        let d = self
            .machines
            .get_mut(machine)
            .ok_or_else(|| Failure::NotFound(machine.to_owned()))?;
        let state_digest = if state_digest {
            let snap = d.read(machine, Machine::read_snapshot)?;
            Some(hex::encode(Sha256::digest(&snap)))
        } else {
            None
        };
        Ok(MachineStatus {
            name: machine.to_owned(),
            digest: d.digest.clone(),
            version: d.version,
            applied_index,
            state_digest,
        })
    }

    fn deploy(&mut self, name: String, module: &[u8]) -> Outcome {
        let info = self.registry.add(module).map_err(refused)?;
        let digest = info.digest;
        let (version, created) = match self.machines.get_mut(&name) {
            Some(d) => {
                d.machine
                    .upgrade(&self.registry, &digest)
                    .map_err(|e| match e {
                        // The module is valid; the machine did not move to it (the old
                        // module's snapshot, the new one's start or its restore failed).
                        MachineError::Guest(g) => Failure::InvalidModule(format!(
                            "the upgrade could not carry the machine's state over to the new \
                             module (kept the old one): {g}"
                        )),
                        other => refused_machine(other),
                    })?;
                d.digest = digest.clone();
                d.version += 1;
                (d.version, false)
            }
            None => {
                let machine = Machine::new(&self.registry, &digest).map_err(refused_machine)?;
                self.machines
                    .insert(name.clone(), Deployed::new(machine, digest.clone(), 1));
                (1, true)
            }
        };
        if let Ok(mut c) = self.catalog.write() {
            c.insert(
                name.clone(),
                MachineInfo {
                    name,
                    digest: digest.clone(),
                    version,
                },
            );
        }
        Ok(Effect::Deployed {
            digest,
            version,
            created,
        })
    }

    fn delete(&mut self, name: &str) -> Outcome {
        self.machines
            .remove(name)
            .ok_or_else(|| Failure::NotFound(name.to_owned()))?;
        if let Ok(mut c) = self.catalog.write() {
            c.remove(name);
        }
        Ok(Effect::Deleted)
    }

    /// Applies a run of tasks for the same machine through a single `on-apply` call.
    fn flush_run(&mut self, machine: &str, run: &mut Vec<Entry>, out: &mut Vec<Outcome>) {
        if run.is_empty() {
            return;
        }
        let Some(d) = self.machines.get_mut(machine) else {
            out.extend(
                run.drain(..)
                    .map(|_| Err(Failure::NotFound(machine.to_owned()))),
            );
            return;
        };
        for r in d.machine.apply(std::mem::take(run)) {
            out.push(match r {
                Ok(bytes) => Ok(Effect::Output(bytes)),
                Err(e) => {
                    self.errors.count(&e);
                    Err(Failure::Guest(e))
                }
            });
        }
    }
}

/// A module refused for what it is fails the deploy on every replica alike. A storage error is
/// this node's alone: recording it as the entry's outcome would let this replica diverge, so
/// the node stops, as for a failed log commit, and re-applies the log when restarted. The panic
/// does it: the state-machine thread's guard then stops the pipeline (`/healthz` 503, `serve`
/// exits with an error), and at start the replay's failure is start's error.
fn refused(e: ModuleError) -> Failure {
    if let ModuleError::Storage(what) = &e {
        tracing::error!(error = %what, "module storage failed while applying a deploy: stopping");
        panic!("module storage failed while applying a deploy: {what}");
    }
    Failure::InvalidModule(e.to_string())
}

fn refused_machine(e: MachineError) -> Failure {
    match e {
        MachineError::Module(m) => refused(m),
        MachineError::Guest(g) => {
            Failure::InvalidModule(format!("the module failed to start: {g}"))
        }
    }
}

impl StateMachine for MachineSet {
    type Output = Outcome;

    fn apply(&mut self, batch: Vec<Entry>) -> Vec<Outcome> {
        let mut out = Vec::with_capacity(batch.len());
        let last_index = batch.last().map(|e| e.index);
        let mut run: Vec<Entry> = Vec::with_capacity(batch.len());
        let mut run_machine = String::new();
        for mut entry in batch {
            if let Some(header) = Command::task_header_for(&entry.payload, &run_machine) {
                entry.payload.advance(header);
                run.push(entry);
                continue;
            }
            // A task for another machine (`task_header_for` took this run's own) starts a run.
            if let Some((machine, header)) = Command::task_header(&entry.payload) {
                self.flush_run(&run_machine, &mut run, &mut out);
                machine.clone_into(&mut run_machine);
                // The task's payload is the rest of the entry: moved, not copied.
                entry.payload.advance(header);
                run.push(entry);
                continue;
            }
            self.flush_run(&run_machine, &mut run, &mut out);
            match Command::decode(&entry.payload) {
                Ok(Command::Deploy { machine, module }) => out.push(self.deploy(machine, &module)),
                Ok(Command::Delete { machine }) => out.push(self.delete(&machine)),
                // `task_header` takes every task; this is the general path all the same.
                Ok(Command::Task { machine, payload }) => {
                    run.push(Entry { payload, ..entry });
                    self.flush_run(&machine, &mut run, &mut out);
                }
                Err(e) => out.push(Err(Failure::BadEntry(e))),
            }
        }
        self.flush_run(&run_machine, &mut run, &mut out);
        if let Some(last) = last_index {
            self.applied_index = last;
        }
        out
    }

    /// Every machine's module and state (`snapshot.rs`). A machine whose state cannot be
    /// read (broken on this node, or a snapshot export that fails) fails the whole snapshot:
    /// this node keeps its log instead.
    fn snapshot(&mut self) -> anyhow::Result<Vec<u8>> {
        let mut out = snapshot::Writer::new(self.applied_index, self.machines.len());
        for (name, d) in &mut self.machines {
            let state = d
                .machine
                .read_snapshot()
                .map_err(|e| anyhow::anyhow!("machine {name:?}: {e}"))?;
            let module = self.registry.bytes(&d.digest)?;
            out.machine(&snapshot::Saved {
                name,
                version: d.version,
                module: &module,
                state: &state,
            });
        }
        Ok(out.finish())
    }

    /// Replaces every machine with a snapshot's. Nothing changes unless every module stores
    /// and loads; a state its module refuses leaves that machine broken here.
    fn restore(&mut self, bytes: &[u8]) -> anyhow::Result<()> {
        let (applied_index, saved) =
            snapshot::decode(bytes).map_err(|e| anyhow::anyhow!("bad snapshot: {e}"))?;
        let mut machines = BTreeMap::new();
        for m in saved {
            let digest = self.registry.add(m.module)?.digest;
            let machine = Machine::from_snapshot(&self.registry, &digest, m.state)
                .map_err(|e| anyhow::anyhow!("machine {:?}: {e}", m.name))?;
            machines.insert(m.name.to_owned(), Deployed::new(machine, digest, m.version));
        }
        if let Ok(mut c) = self.catalog.write() {
            *c = machines
                .iter()
                .map(|(name, d)| {
                    let info = MachineInfo {
                        name: name.clone(),
                        digest: d.digest.clone(),
                        version: d.version,
                    };
                    (name.clone(), info)
                })
                .collect();
        }
        self.machines = machines;
        self.applied_index = applied_index;
        Ok(())
    }
}
