//! One running instance of a deployed module, and how it survives its guest's failures.
//!
//! # Trap isolation without batch dependence
//!
//! A trap poisons a wasmtime `Store`, and the batch's earlier results die with the call. So the
//! machine keeps a *base* snapshot plus the *replay log* of entries applied since. When entry
//! `k` of a batch fails (trap, fuel, memory), the machine builds a fresh store, restores the
//! base, replays the log, re-applies the batch's entries before `k` (their results are
//! recomputed: the guest is deterministic), fails `k` alone, and goes on after it. Entries that
//! fail never enter the log, so the state is that of the log without them. A failure outside
//! any entry (lowering a large batch into a nearly full memory, say) is retried by halves down
//! to single entries, so an entry fails only if it fails on its own. So is an entry that ran
//! out of memory or fuel beside others, or was refused memory and answered anyway: their
//! payloads and outputs share its memory until the call returns, so it is applied again in a
//! call of its own, and that is its result. Replay after a recovery does the same: it applies
//! such an entry alone, and halves a call that fails outside any entry (replay groups the log
//! by size, not as it was applied).
//!
//! The common, failure-free path moves the batch's entries into the log (the metered path
//! clones them, a cheap `Bytes` clone per entry); the base is refreshed once the log weighs
//! about twice the snapshot (at least 1 MiB), so recovery replays a bounded amount. It moves
//! after the entry that makes the log that heavy, wherever the batch ends: what a snapshot does
//! not carry (a hash seed's counter, say) then restarts from the same entry on every replica.
//!
//! # The unmetered fast path
//!
//! Per-entry metering costs a host call per entry. So a batch is first applied *unmetered*,
//! with one entry's fuel budget for the whole call (`begin-batch` returns false). If it
//! completes, no entry can have used more than its own budget, and an entry's output does not
//! depend on fuel: the results are those metering would give. If it fails in any way, or reads
//! the WASI clock or random source (whose values are per entry), the machine recovers and
//! applies it again, metered. A machine whose unmetered batches run out of fuel or read the
//! clock, or that calls `begin-entry` anyway (built before `begin-batch` existed), is metered
//! from then on.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use wasmtime::component::{Func, Instance, TypedFunc};
use wasmtime::{Store, Trap};

use super::abi::{BatchParam, Outputs, OutputsResult};
use super::host::{BATCH_FUEL_PER_ENTRY, EntryMark, HostState};
use super::registry::LoadedModule;
use super::{GuestError, Limits, MachineError, ModuleRegistry};
use crate::state_machine::Entry;

/// The replay log is compacted into a new base when it weighs more than this or twice the
/// snapshot, whichever is larger.
const REBASE_MIN_BYTES: usize = 1 << 20;
/// What an entry weighs in the replay log beyond its payload.
const LOG_ENTRY_OVERHEAD: usize = 64;

/// What an entry adds to the replay log's weight.
fn log_weight(entry: &Entry) -> usize {
    entry.payload.len() + LOG_ENTRY_OVERHEAD
}

/// The world's four exports of one instance, type-checked once.
pub(crate) struct Exports {
    on_apply: Func,
    query: Func,
    snapshot: Func,
    restore: Func,
}

impl Exports {
    pub const NAMES: [&'static str; 4] = ["on-apply", "query", "snapshot", "restore"];

    /// Finds and type-checks the exports; the error says which one is wrong and how.
    pub fn typecheck(store: &mut Store<HostState>, instance: &Instance) -> Result<Self, String> {
        let mut get = |name: &str| {
            instance
                .get_func(&mut *store, name)
                .ok_or_else(|| format!("missing export `{name}`"))
        };
        let (on_apply, query, snapshot, restore) = (
            get("on-apply")?,
            get("query")?,
            get("snapshot")?,
            get("restore")?,
        );
        let wrong =
            |name: &str, e: wasmtime::Error| format!("export `{name}` has the wrong type: {e:#}");
        on_apply
            .typed::<(BatchParam<'static>,), (OutputsResult,)>(&*store)
            .map_err(|e| wrong("on-apply", e))?;
        query
            .typed::<(&[u8],), (Result<Vec<u8>, String>,)>(&*store)
            .map_err(|e| wrong("query", e))?;
        snapshot
            .typed::<(), (Vec<u8>,)>(&*store)
            .map_err(|e| wrong("snapshot", e))?;
        restore
            .typed::<(&[u8],), (Result<(), String>,)>(&*store)
            .map_err(|e| wrong("restore", e))?;
        Ok(Exports {
            on_apply,
            query,
            snapshot,
            restore,
        })
    }
}

/// Sets up a new store: memory cap, and fuel for instantiation (a new store has none).
pub(crate) fn prime_store(store: &mut Store<HostState>, limits: &Limits) {
    store.limiter(|state| &mut state.cap);
    // What one lift may copy out of the guest (a host call's arguments, an export's results):
    // at most its memory's worth. wasmtime's default, 128 MiB, would refuse the snapshot of a
    // machine allowed more memory than that, and lets one call of a 64 MiB machine copy the
    // same bytes many times over.
    store.set_hostcall_fuel(limits.memory_bytes);
    // Cannot fail: fuel is enabled on every engine this crate builds.
    let _ = store.set_fuel(limits.fuel_per_snapshot);
}

/// A call that failed: which entry of the batch was running, if any, and why.
struct Failure {
    position: Option<usize>,
    error: GuestError,
    /// An unmetered batch that ran out of fuel or read the clock or random source: this
    /// machine's batches should be metered per entry from now on.
    needs_metering: bool,
}

/// Why a rebuild stopped before the end of the replay log.
enum Stopped {
    /// The replay log's entry at this position failed.
    Entry(usize, GuestError),
    /// A call of several entries failed outside any of them: it is halved, replay again.
    Halved,
    /// The machine is now marked broken.
    Broken,
}

/// A store and its instance. Any failed call leaves it poisoned: it is then dropped.
struct Live {
    store: Store<HostState>,
    exports: Exports,
    limits: Limits,
}

impl Live {
    fn new(module: &LoadedModule, limits: &Limits) -> Result<Self, GuestError> {
        let mut store = Store::new(module.pre.engine(), HostState::new(limits));
        prime_store(&mut store, limits);
        let instance = module
            .pre
            .instantiate(&mut store)
            .map_err(|e| classify(e, store.data(), limits, limits.fuel_per_snapshot))?;
        let exports = Exports::typecheck(&mut store, &instance).map_err(GuestError::Trap)?;
        Ok(Live {
            store,
            exports,
            limits: limits.clone(),
        })
    }

    /// Applies `chunk` in one call: `metered`, with fuel and failures per entry; otherwise with
    /// one entry's budget for the whole call (see `begin-batch` in the WIT), any failure then
    /// meaning "apply it again, metered".
    fn on_apply(&mut self, chunk: &[Entry], metered: bool) -> Result<Outputs, Failure> {
        let state = self.store.data_mut();
        state.meter.batch.clear();
        state.meter.batch.extend(chunk.iter().map(|e| EntryMark {
            index: e.index,
            term: e.term,
            timestamp_ms: e.timestamp_ms,
        }));
        state.meter.begun = 0;
        state.meter.current = None;
        state.meter.metered = metered;
        state.meter.ended = false;
        state.meter.begun_unmetered = false;
        state.meter.refused = None;
        state.cap.denied = false;
        state.stderr.clear();
        state.inputs.touched.store(false, Ordering::Relaxed);
        // Metered: until the first `begin-entry` the guest lifts the batch, on its own budget
        // scaled by the batch's size so that no entry pays for its neighbours. Unmetered: one
        // entry's budget for everything.
        let preamble = if metered {
            self.limits
                .fuel_per_entry
                .saturating_add(BATCH_FUEL_PER_ENTRY.saturating_mul(chunk.len() as u64))
        } else {
            self.limits.fuel_per_entry
        };
        let _ = self.store.set_fuel(preamble);
        // SAFETY: `Exports::typecheck` checked this export against exactly these types.
        let func = unsafe {
            TypedFunc::<(BatchParam<'_>,), (OutputsResult,)>::new_unchecked(self.exports.on_apply)
        };
        let outcome = func.call(&mut self.store, (BatchParam(chunk),));
        if outcome.is_ok() {
            self.store.data_mut().note_refusal();
        }
        let state = self.store.data();
        let touched = state.inputs.touched.load(Ordering::Relaxed);
        match outcome {
            Ok((OutputsResult(outputs),)) => {
                let meter = &state.meter;
                let problem = if outputs.len() != chunk.len() {
                    format!(
                        "on-apply returned {} results for {} entries",
                        outputs.len(),
                        chunk.len()
                    )
                } else if !meter.ended || (metered && meter.begun != chunk.len()) {
                    // Every entry must have been metered and the batch closed: otherwise fuel
                    // and failures were not per entry, and results could depend on batching.
                    format!(
                        "on-apply skipped the lockstep:machine/host protocol (began {} of {} \
                         entries, end-batch {}called); build the module with lockstep-guest",
                        meter.begun,
                        chunk.len(),
                        if meter.ended { "" } else { "not " }
                    )
                } else if !metered && touched {
                    return Err(Failure {
                        position: None,
                        error: GuestError::Trap("read the clock or random source".into()),
                        needs_metering: true,
                    });
                } else if let Some(failure) = self.refusal(chunk, false) {
                    return Err(failure);
                } else {
                    return Ok(outputs);
                };
                Err(Failure {
                    position: None,
                    error: GuestError::Trap(problem),
                    needs_metering: false,
                })
            }
            Err(e) => {
                let position = state.meter.current;
                let budget = if position.is_some() {
                    self.limits.fuel_per_entry
                } else {
                    preamble
                };
                let error = classify(e, state, &self.limits, budget);
                let needs_metering = !metered
                    && (touched
                        || state.meter.begun_unmetered
                        || matches!(error, GuestError::OutOfFuel { .. }));
                // After a refusal an earlier entry lived through, what followed it may depend
                // on its neighbours too: that entry goes alone first.
                if let Some(failure) = self.refusal(chunk, needs_metering) {
                    return Err(failure);
                }
                Err(Failure {
                    position,
                    error,
                    needs_metering,
                })
            }
        }
    }

    /// A call of several entries in which one was refused memory and ran on fails at that
    /// entry (outside any entry: `None`), as an entry that trapped for want of memory does:
    /// what it does alone is its answer.
    fn refusal(&self, chunk: &[Entry], needs_metering: bool) -> Option<Failure> {
        let position = self
            .store
            .data()
            .meter
            .refused
            .filter(|_| chunk.len() > 1)?;
        Some(Failure {
            position,
            error: GuestError::MemoryLimit {
                limit: self.limits.memory_bytes,
            },
            needs_metering,
        })
    }

    fn query(&mut self, request: &[u8]) -> Result<Result<Vec<u8>, String>, GuestError> {
        let budget = self.limits.fuel_per_entry;
        self.prepare_call(budget);
        // SAFETY: type-checked in `Exports::typecheck`.
        let func = unsafe {
            TypedFunc::<(&[u8],), (Result<Vec<u8>, String>,)>::new_unchecked(self.exports.query)
        };
        func.call(&mut self.store, (request,))
            .map(|(r,)| r)
            .map_err(|e| classify(e, self.store.data(), &self.limits, budget))
    }

    fn snapshot(&mut self) -> Result<Vec<u8>, GuestError> {
        let budget = self.limits.fuel_per_snapshot;
        self.prepare_call(budget);
        // SAFETY: type-checked in `Exports::typecheck`.
        let func = unsafe { TypedFunc::<(), (Vec<u8>,)>::new_unchecked(self.exports.snapshot) };
        func.call(&mut self.store, ())
            .map(|(r,)| r)
            .map_err(|e| classify(e, self.store.data(), &self.limits, budget))
    }

    fn restore(&mut self, snapshot: &[u8]) -> Result<(), GuestError> {
        let budget = self.limits.fuel_per_snapshot;
        self.prepare_call(budget);
        // SAFETY: type-checked in `Exports::typecheck`.
        let func = unsafe {
            TypedFunc::<(&[u8],), (Result<(), String>,)>::new_unchecked(self.exports.restore)
        };
        match func.call(&mut self.store, (snapshot,)) {
            Ok((Ok(()),)) => Ok(()),
            Ok((Err(message),)) => Err(GuestError::Guest(message)),
            Err(e) => Err(classify(e, self.store.data(), &self.limits, budget)),
        }
    }

    /// Outside `on-apply`, no entry is current: neutral clock and seed, a whole budget.
    fn prepare_call(&mut self, fuel: u64) {
        let state = self.store.data_mut();
        state.meter.batch.clear();
        state.meter.current = None;
        state.meter.ended = true;
        state.cap.denied = false;
        state.stderr.clear();
        state.inputs.set_neutral();
        let _ = self.store.set_fuel(fuel);
    }
}

/// Names a failed call's cause. Deterministic: the same failure gives the same error.
fn classify(error: wasmtime::Error, state: &HostState, limits: &Limits, budget: u64) -> GuestError {
    if state.cap.denied {
        return GuestError::MemoryLimit {
            limit: limits.memory_bytes,
        };
    }
    if let Some(trap) = error.downcast_ref::<Trap>() {
        return match trap {
            Trap::OutOfFuel => GuestError::OutOfFuel { budget },
            Trap::StackOverflow => GuestError::Trap(format!(
                "stack overflow: the guest exceeded its {} KiB wasm stack (runaway recursion?)",
                limits.max_wasm_stack >> 10
            )),
            trap => match state.panic_message() {
                Some(panic) => GuestError::Trap(format!("{panic} ({trap})")),
                None => GuestError::Trap(trap.to_string()),
            },
        };
    }
    if let Some(exit) = error.downcast_ref::<wasmtime_wasi::I32Exit>() {
        return GuestError::Trap(format!("the guest called exit({})", exit.0));
    }
    GuestError::Trap(error.root_cause().to_string())
}

/// Most entries in one `on-apply` call: the list itself (32 bytes an entry, and 12 for its
/// result) takes guest memory too, so a run of empty payloads is bounded by count.
const MAX_CALL_ENTRIES: usize = 4096;

/// Where the next `on-apply` call starting at `start` ends: at most `max_bytes` of payload and
/// `MAX_CALL_ENTRIES` entries, at least one entry, and no further than the entry whose replay
/// log weight uses up `weight_left`.
fn chunk_end(entries: &[Entry], start: usize, max_bytes: usize, weight_left: usize) -> usize {
    let mut bytes = 0usize;
    let mut weight = 0usize;
    let mut end = start;
    while end < entries.len() && end - start < MAX_CALL_ENTRIES {
        bytes = bytes.saturating_add(entries[end].payload.len());
        if bytes > max_bytes && end > start {
            break;
        }
        weight = weight.saturating_add(log_weight(&entries[end]));
        end += 1;
        if weight >= weight_left {
            break;
        }
    }
    end
}

/// One running instance of a deployed module. See the module docs for how failures are
/// isolated per entry.
pub struct Machine {
    module: Arc<LoadedModule>,
    limits: Limits,
    live: Live,
    /// Set when a failure could not be recovered from (the base snapshot does not restore):
    /// every call fails until a `restore` or `upgrade` succeeds.
    broken: Option<GuestError>,
    base: Bytes,
    replay: Vec<Entry>,
    replay_weight: usize,
    /// Positions in the replay log where a replay call must begin (ascending, no repeats;
    /// cleared with the log): before and after an entry that failed beside others (or was
    /// refused memory there) and succeeded alone, and where a call that failed outside any
    /// entry was halved, live or on replay.
    replay_cuts: Vec<usize>,
    /// After a rebase snapshot failed (a state too large to serialize within the memory cap),
    /// the next attempt waits until the replay log weighs this much: every attempt that fails
    /// costs a rebuild, and retrying after every batch made each batch pay one.
    rebase_backoff: usize,
    recoveries: u64,
    /// Set once an unmetered batch ran out of fuel or read the clock or random source: from
    /// then on every batch is metered per entry (unmetered attempts would keep failing).
    always_meter: bool,
}

impl Machine {
    /// Instantiates the module `digest` from `registry` with a fresh (default) state.
    pub fn new(registry: &ModuleRegistry, digest: &str) -> Result<Self, MachineError> {
        let module = registry.loaded(digest)?;
        let limits = registry.engine().limits().clone();
        let mut live = Live::new(&module, &limits)?;
        let base = Bytes::from(live.snapshot()?);
        Ok(Machine {
            module,
            limits,
            live,
            broken: None,
            base,
            replay: Vec::new(),
            replay_weight: 0,
            replay_cuts: Vec::new(),
            rebase_backoff: 0,
            recoveries: 0,
            always_meter: false,
        })
    }

    /// Instantiates the module `digest` with the state `snapshot` (a replica's snapshot of the
    /// node's machines). A state the module refuses to restore leaves the machine broken on this
    /// node, as an unrecoverable failure does, rather than stopping every other machine.
    pub fn from_snapshot(
        registry: &ModuleRegistry,
        digest: &str,
        snapshot: &[u8],
    ) -> Result<Self, MachineError> {
        let mut machine = Machine::new(registry, digest)?;
        if let Err(error) = machine.restore(snapshot) {
            machine.mark_broken(error);
        }
        Ok(machine)
    }

    /// The digest of the module this machine runs.
    pub fn digest(&self) -> &str {
        &self.module.digest
    }

    /// How many times a failure forced a rebuild from the base snapshot.
    pub fn recoveries(&self) -> u64 {
        self.recoveries
    }

    /// Applies committed entries in log order. Exactly one result per entry, in order; a failed
    /// entry leaves the state as it was before it.
    pub fn apply(&mut self, batch: Vec<Entry>) -> Vec<Result<Bytes, GuestError>> {
        let mut results = Vec::with_capacity(batch.len());
        // One call's worth at a time; what succeeds unmetered is moved into the replay log.
        let mut rest = batch.into_iter();
        while !rest.as_slice().is_empty() {
            // The call ends where the base is due to move, so the base moves after the same
            // entry on every replica, however the entries were batched. (An entry that fails
            // weighs nothing; the next call's end is then counted again from what was logged.)
            let weight_left = self.rebase_due().saturating_sub(self.replay_weight);
            let end = chunk_end(rest.as_slice(), 0, self.limits.max_batch_bytes, weight_left);
            match self.try_unmetered(&rest.as_slice()[..end]) {
                Some(mut outputs) => {
                    results.append(&mut outputs);
                    self.log(rest.by_ref().take(end));
                }
                None => {
                    self.apply_chunk_metered(&rest.as_slice()[..end], &mut results);
                    rest.nth(end - 1);
                }
            }
            self.maybe_rebase();
        }
        results
    }

    /// The replay log's weight at which the base moves.
    fn rebase_due(&self) -> usize {
        REBASE_MIN_BYTES
            .max(self.base.len().saturating_mul(2))
            .max(self.rebase_backoff)
    }

    /// Answers a read-only query.
    pub fn query(&mut self, request: &[u8]) -> Result<Vec<u8>, GuestError> {
        self.check_broken()?;
        match self.live.query(request) {
            Ok(answer) => answer.map_err(GuestError::Guest),
            Err(error) => {
                self.recover();
                Err(error)
            }
        }
    }

    /// The whole state, as the module serializes it. Also becomes the base for recovery.
    pub fn snapshot(&mut self) -> Result<Vec<u8>, GuestError> {
        let bytes = self.read_snapshot()?;
        self.rebase(Bytes::from(bytes.clone()));
        Ok(bytes)
    }

    /// The whole state, for a reader (`?digest=1`): unlike [`Machine::snapshot`] it leaves the
    /// base for recovery where it was. Where the base sits decides what a later recovery
    /// replays, so it must move only with the log, never because one node was asked a
    /// question (a snapshot that cannot be restored would then break this replica alone).
    pub fn read_snapshot(&mut self) -> Result<Vec<u8>, GuestError> {
        self.check_broken()?;
        self.live.snapshot().inspect_err(|_| self.recover())
    }

    /// Replaces the state with `snapshot`. On failure the machine keeps its previous state.
    pub fn restore(&mut self, snapshot: &[u8]) -> Result<(), GuestError> {
        let mut live = Live::new(&self.module, &self.limits)?;
        live.restore(snapshot)?;
        self.live = live;
        self.broken = None;
        self.rebase(Bytes::copy_from_slice(snapshot));
        Ok(())
    }

    /// Moves the state to the module `digest`: the current module's snapshot is restored into
    /// a new instance of it. On any failure the machine keeps running the current module.
    pub fn upgrade(&mut self, registry: &ModuleRegistry, digest: &str) -> Result<(), MachineError> {
        let module = registry.loaded(digest)?;
        // A machine broken on this node has no state to carry over. The upgrade takes effect
        // anyway (the machine stays broken), so that every replica's catalog moves to the new
        // module alike instead of this one alone refusing the deploy.
        if self.broken.is_some() {
            self.module = module;
            return Ok(());
        }
        let snapshot = self.snapshot()?;
        let mut live = Live::new(&module, &self.limits)?;
        live.restore(&snapshot)?;
        self.module = module;
        self.live = live;
        self.rebase(Bytes::from(snapshot));
        Ok(())
    }

    fn check_broken(&self) -> Result<(), GuestError> {
        match &self.broken {
            Some(error) => Err(error.clone()),
            None => Ok(()),
        }
    }

    /// Applies one call's worth of entries unmetered (the fast path), unless failures made
    /// this machine meter everything. `None`: not applied (any failure has been recovered
    /// from), apply it metered.
    fn try_unmetered(&mut self, chunk: &[Entry]) -> Option<Outputs> {
        if self.always_meter || self.broken.is_some() {
            return None;
        }
        match self.live.on_apply(chunk, false) {
            Ok(outputs) => Some(outputs),
            Err(failure) => {
                self.always_meter |= failure.needs_metering;
                self.recover();
                None
            }
        }
    }

    /// Applies one call's worth of entries, isolating failures per entry (module docs).
    fn apply_chunk_metered(
        &mut self,
        mut chunk: &[Entry],
        results: &mut Vec<Result<Bytes, GuestError>>,
    ) {
        while !chunk.is_empty() {
            if let Some(error) = &self.broken {
                results.extend(chunk.iter().map(|_| Err(error.clone())));
                return;
            }
            match self.live.on_apply(chunk, true) {
                Ok(mut outputs) => {
                    results.append(&mut outputs);
                    self.log(chunk.iter().cloned());
                    return;
                }
                Err(failure) => {
                    self.recover();
                    match failure.position {
                        Some(k) => {
                            self.apply_chunk_metered(&chunk[..k], results);
                            if chunk.len() > 1 && failure.error.depends_on_neighbours() {
                                // Its neighbours' payloads and outputs shared its memory (and
                                // their bytes its fuel, where the guest copied them): what it
                                // does alone is its result, on every replica whatever the
                                // grouping.
                                let position = self.replay.len();
                                self.apply_chunk_metered(&chunk[k..=k], results);
                                if self.replay.len() > position {
                                    self.replay_alone(position);
                                }
                            } else {
                                results.push(Err(failure.error));
                            }
                            chunk = &chunk[k + 1..];
                        }
                        None if chunk.len() > 1 => {
                            let mid = chunk.len() / 2;
                            self.apply_chunk_metered(&chunk[..mid], results);
                            // Replay ends a call here too, rather than find out again.
                            self.cut_replay(self.replay.len());
                            chunk = &chunk[mid..];
                        }
                        None => {
                            results.push(Err(failure.error));
                            return;
                        }
                    }
                }
            }
        }
    }

    fn log(&mut self, applied: impl IntoIterator<Item = Entry>) {
        let weight = &mut self.replay_weight;
        self.replay
            .extend(applied.into_iter().inspect(|e| *weight += log_weight(e)));
    }

    fn maybe_rebase(&mut self) {
        if self.broken.is_some() {
            return;
        }
        if self.replay_weight < self.rebase_due() {
            return;
        }
        match self.live.snapshot() {
            Ok(bytes) => self.rebase(Bytes::from(bytes)),
            Err(error) => {
                tracing::warn!(%error, digest = %self.module.digest, "snapshot for rebase failed");
                self.rebase_backoff = self.replay_weight.saturating_mul(2);
                self.recover();
            }
        }
    }

    fn rebase(&mut self, base: Bytes) {
        self.base = base;
        self.replay.clear();
        self.replay_cuts.clear();
        self.replay_weight = 0;
        self.rebase_backoff = 0;
    }

    /// Replaces the poisoned store: fresh instance, base snapshot, replay log.
    fn recover(&mut self) {
        self.recoveries += 1;
        loop {
            match self.rebuild() {
                Ok(live) => {
                    self.live = live;
                    return;
                }
                Err(Stopped::Halved) => {}
                // Kept for later recoveries too, which would otherwise find it again at the
                // cost of a rebuild each.
                Err(Stopped::Entry(position, error))
                    if error.depends_on_neighbours() && !self.replayed_alone(position) =>
                {
                    self.replay_alone(position);
                }
                // An entry that succeeded before fails on replay, even alone: only possible
                // near a limit, where a fresh allocator or hash table differs from the original
                // one. Drop it (its effect is lost, as if it had failed) rather than lose the
                // machine.
                Err(Stopped::Entry(position, error)) => {
                    tracing::error!(
                        digest = %self.module.digest,
                        index = self.replay[position].index,
                        %error,
                        "an entry failed on replay after succeeding; dropping its effect"
                    );
                    let dropped = self.replay.remove(position);
                    self.replay_weight -= log_weight(&dropped);
                    // Later positions move down by one.
                    for cut in self.replay_cuts.iter_mut().filter(|c| **c > position) {
                        *cut -= 1;
                    }
                    self.replay_cuts.dedup();
                }
                Err(Stopped::Broken) => return,
            }
        }
    }

    /// Replays the entry at `position` in a call of its own from now on.
    fn replay_alone(&mut self, position: usize) {
        self.cut_replay(position);
        self.cut_replay(position + 1);
    }

    fn replayed_alone(&self, position: usize) -> bool {
        let cut = |p| self.replay_cuts.binary_search(&p).is_ok();
        cut(position) && cut(position + 1)
    }

    fn cut_replay(&mut self, position: usize) {
        if let Err(at) = self.replay_cuts.binary_search(&position) {
            self.replay_cuts.insert(at, position);
        }
    }

    fn rebuild(&mut self) -> Result<Live, Stopped> {
        let mut live = match Live::new(&self.module, &self.limits) {
            Ok(live) => live,
            Err(error) => return Err(self.mark_broken(error)),
        };
        if let Err(error) = live.restore(&self.base) {
            return Err(self.mark_broken(error));
        }
        let mut start = 0;
        while start < self.replay.len() {
            let mut end = chunk_end(&self.replay, start, self.limits.max_batch_bytes, usize::MAX);
            // A call begins at every cut.
            if let Some(&cut) = self.replay_cuts.iter().find(|&&c| c > start && c < end) {
                end = cut;
            }
            match live.on_apply(&self.replay[start..end], true) {
                Ok(_) => start = end,
                // Lowering the call's payloads into a nearly full memory, say, where the live
                // path may have applied them in smaller calls: halve it, as the live path does.
                Err(Failure { position: None, .. }) if end - start > 1 => {
                    self.cut_replay(start + (end - start) / 2);
                    return Err(Stopped::Halved);
                }
                // An entry failed; in a call of its own, whatever failed was that entry, and it
                // has now been tried alone.
                Err(Failure {
                    position, error, ..
                }) => {
                    if end - start == 1 {
                        self.replay_alone(start);
                    }
                    return Err(Stopped::Entry(start + position.unwrap_or(0), error));
                }
            }
        }
        Ok(live)
    }

    fn mark_broken(&mut self, error: GuestError) -> Stopped {
        tracing::error!(digest = %self.module.digest, %error, "machine cannot recover");
        self.broken = Some(GuestError::Trap(format!(
            "the machine cannot recover on this node from an earlier failure ({error}); its \
             tasks fail here until it is deleted and deployed again"
        )));
        Stopped::Broken
    }
}

/// The replication pipeline drives a `Machine` like any other state machine.
impl crate::state_machine::StateMachine for Machine {
    type Output = Result<Bytes, GuestError>;

    fn apply(&mut self, batch: Vec<Entry>) -> Vec<Self::Output> {
        Machine::apply(self, batch)
    }
}
