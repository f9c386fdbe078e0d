//! What a guest's `Store` holds: the per-entry meter behind `lockstep:machine/host`, the memory
//! cap, and a WASI context whose clocks and randomness come from the entry being applied.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use wasmtime::component::{Linker, ResourceTable};
use wasmtime::{ResourceLimiter, StoreContextMut};
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::{HostMonotonicClock, HostWallClock, WasiCtx, WasiCtxBuilder, WasiCtxView};

use super::Limits;

const HOST_INTERFACE: &str = "lockstep:machine/host@0.1.0";
/// The `wasi:io/poll` wasmtime-wasi 48 provides (guests importing any 0.2.x match it).
const WASI_POLL: &str = "wasi:io/poll@0.2.12";
/// Enough for a panic message; a guest that logs more only loses the older text.
const STDERR_CAPACITY: usize = 16 << 10;
/// Fuel the SDK's batch bookkeeping may use per entry outside any entry's own window
/// (lifting the list, building the result list).
pub(crate) const BATCH_FUEL_PER_ENTRY: u64 = 20_000;

/// One entry of the batch being applied, as the meter needs it.
#[derive(Clone, Copy)]
pub(crate) struct EntryMark {
    pub index: u64,
    pub term: u64,
    pub timestamp_ms: u64,
}

/// Tracks which entry of the current `on-apply` call the guest is working on.
#[derive(Default)]
pub(crate) struct EntryMeter {
    pub batch: Vec<EntryMark>,
    /// Entries begun so far in this call.
    pub begun: usize,
    /// Position of the entry in progress, if the guest is inside one.
    pub current: Option<usize>,
    pub fuel_per_entry: u64,
    /// Whether this call wants `begin-entry` per entry (see `begin-batch` in the WIT).
    pub metered: bool,
    /// Whether the guest called `end-batch` in this call.
    pub ended: bool,
    /// Whether the guest called `begin-entry` although this call is not metered: a module
    /// built before `begin-batch` existed meters every entry, so it is always metered.
    pub begun_unmetered: bool,
}

/// Caps linear memory and tables, and remembers a refused growth so that the failure it
/// causes (a trap, usually an abort in the guest's allocator) is reported as `memory_limit`.
pub(crate) struct MemoryCap {
    pub memory_bytes: usize,
    pub table_elements: usize,
    pub denied: bool,
}

impl ResourceLimiter for MemoryCap {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _max: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.memory_bytes {
            self.denied = true;
            return Ok(false);
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _max: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= self.table_elements)
    }
}

/// The entry-derived inputs WASI's clocks and random sources read. Shared with the clock and
/// RNG objects inside the `WasiCtx`, which cannot borrow the store.
#[derive(Default)]
pub(crate) struct EntryInputs {
    timestamp_ms: AtomicU64,
    seed: AtomicU64,
    /// Bumped whenever the seed changes, so RNGs know to restart their stream.
    epoch: AtomicU64,
    /// Set when the guest reads the clock or the random source: an unmetered batch that did
    /// so saw the wrong entry's values and must be applied again with metering.
    pub touched: AtomicBool,
}

impl EntryInputs {
    /// Outside entries (queries, snapshots, restores, instantiation) the guest sees the epoch
    /// and a fixed seed: deterministic, and obviously not a real time.
    pub fn set_neutral(&self) {
        self.set(0, 0x6e65_7574_7261_6c00);
    }

    pub fn set_entry(&self, mark: &EntryMark) {
        self.set(mark.timestamp_ms, mark.index ^ mark.term.rotate_left(32));
    }

    fn set(&self, timestamp_ms: u64, seed: u64) {
        self.timestamp_ms.store(timestamp_ms, Ordering::Relaxed);
        self.seed.store(seed, Ordering::Relaxed);
        self.epoch.fetch_add(1, Ordering::Relaxed);
    }
}

struct EntryWallClock(Arc<EntryInputs>);

impl HostWallClock for EntryWallClock {
    fn resolution(&self) -> Duration {
        Duration::from_millis(1)
    }

    fn now(&self) -> Duration {
        self.0.touched.store(true, Ordering::Relaxed);
        Duration::from_millis(self.0.timestamp_ms.load(Ordering::Relaxed))
    }
}

/// The monotonic clock also reads the entry's timestamp: leader timestamps do not go back.
struct EntryMonotonicClock(Arc<EntryInputs>);

impl HostMonotonicClock for EntryMonotonicClock {
    fn resolution(&self) -> u64 {
        1_000_000
    }

    fn now(&self) -> u64 {
        self.0.touched.store(true, Ordering::Relaxed);
        self.0
            .timestamp_ms
            .load(Ordering::Relaxed)
            .saturating_mul(1_000_000)
    }
}

/// SplitMix64 restarted from the entry's seed at every entry: what the guest draws depends on
/// the entry and on what it drew before within that entry, nothing else.
struct EntryRandom {
    inputs: Arc<EntryInputs>,
    salt: u64,
    epoch: u64,
    state: u64,
}

impl EntryRandom {
    fn new(inputs: Arc<EntryInputs>, salt: u64) -> Self {
        EntryRandom {
            inputs,
            salt,
            epoch: u64::MAX,
            state: 0,
        }
    }

    fn next(&mut self) -> u64 {
        self.inputs.touched.store(true, Ordering::Relaxed);
        let epoch = self.inputs.epoch.load(Ordering::Relaxed);
        if epoch != self.epoch {
            self.epoch = epoch;
            self.state = self.inputs.seed.load(Ordering::Relaxed) ^ self.salt;
        }
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

impl rand_core::TryRng for EntryRandom {
    type Error = std::convert::Infallible;

    fn try_next_u32(&mut self) -> Result<u32, Self::Error> {
        Ok(self.next() as u32)
    }

    fn try_next_u64(&mut self) -> Result<u64, Self::Error> {
        Ok(self.next())
    }

    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), Self::Error> {
        rand_core::utils::fill_bytes_via_next_word(dest, || self.try_next_u64())
    }
}

/// The data of one guest's `Store`.
pub(crate) struct HostState {
    wasi: WasiCtx,
    table: ResourceTable,
    pub cap: MemoryCap,
    pub meter: EntryMeter,
    pub inputs: Arc<EntryInputs>,
    stderr: MemoryOutputPipe,
}

impl HostState {
    pub fn new(limits: &Limits) -> Self {
        let inputs = Arc::new(EntryInputs::default());
        inputs.set_neutral();
        let stderr = MemoryOutputPipe::new(STDERR_CAPACITY);
        // No preopened directories, no environment, no arguments, no network, no stdin:
        // only what std needs to run, with every source of nondeterminism replaced.
        let wasi = WasiCtxBuilder::new()
            .stderr(stderr.clone())
            .wall_clock(EntryWallClock(inputs.clone()))
            .monotonic_clock(EntryMonotonicClock(inputs.clone()))
            .secure_random(EntryRandom::new(inputs.clone(), 0x7365_6375_7265))
            .insecure_random(EntryRandom::new(inputs.clone(), 0x696e_7365_6375_7265))
            .insecure_random_seed(0x6c6f_636b_7374_6570_6d61_6368_696e_6531)
            .build();
        HostState {
            wasi,
            table: ResourceTable::new(),
            cap: MemoryCap {
                memory_bytes: limits.memory_bytes,
                table_elements: limits.table_elements,
                denied: false,
            },
            meter: EntryMeter {
                fuel_per_entry: limits.fuel_per_entry,
                ..Default::default()
            },
            inputs,
            stderr,
        }
    }

    /// The last panic message the guest printed, if any.
    pub fn panic_message(&self) -> Option<String> {
        let text = self.stderr.contents();
        let text = String::from_utf8_lossy(&text);
        let start = text.rfind("panicked at")?;
        let message = text[start..].trim();
        Some(message.replace('\n', " "))
    }
}

impl wasmtime_wasi::WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

/// The linker every machine is instantiated with: sandboxed WASI p2 plus `lockstep:machine/host`.
pub(crate) fn linker(engine: &wasmtime::Engine) -> wasmtime::Result<Linker<HostState>> {
    let mut linker = Linker::new(engine);
    wasmtime_wasi::p2::add_to_linker_sync(&mut linker)?;
    // Waiting (`std::thread::sleep`, polling a timer) would block the apply thread in real
    // time, which fuel does not meter and which no two replicas share: it traps instead.
    linker.allow_shadowing(true);
    let mut poll = linker.instance(WASI_POLL)?;
    for name in ["poll", "[method]pollable.block"] {
        poll.func_new(name, move |_, _, _, _| {
            wasmtime::bail!("guests may not block or sleep (`{WASI_POLL}#{name}`)")
        })?;
    }
    linker.allow_shadowing(false);
    let mut host = linker.instance(HOST_INTERFACE)?;
    host.func_wrap(
        "begin-batch",
        |store: StoreContextMut<'_, HostState>, (): ()| Ok((store.data().meter.metered,)),
    )?;
    host.func_wrap(
        "begin-entry",
        |mut store: StoreContextMut<'_, HostState>, (index,): (u64,)| {
            let state = store.data_mut();
            let meter = &mut state.meter;
            if !meter.metered {
                meter.begun_unmetered = true;
                wasmtime::bail!("begin-entry({index}) in a batch the host meters as a whole");
            }
            let position = meter.begun;
            let Some(mark) = meter.batch.get(position).copied() else {
                wasmtime::bail!(
                    "begin-entry({index}) called for more entries than the batch holds"
                );
            };
            if mark.index != index {
                wasmtime::bail!(
                    "begin-entry({index}) out of order: expected entry {}",
                    mark.index
                );
            }
            meter.begun += 1;
            meter.current = Some(position);
            let fuel = meter.fuel_per_entry;
            state.cap.denied = false;
            state.inputs.set_entry(&mark);
            store.set_fuel(fuel)?;
            Ok(())
        },
    )?;
    host.func_wrap(
        "end-batch",
        |mut store: StoreContextMut<'_, HostState>, (): ()| {
            let state = store.data_mut();
            let meter = &mut state.meter;
            if meter.metered && meter.begun != meter.batch.len() {
                wasmtime::bail!(
                    "end-batch after {} of {} entries",
                    meter.begun,
                    meter.batch.len()
                );
            }
            meter.current = None;
            meter.ended = true;
            let fuel = BATCH_FUEL_PER_ENTRY.saturating_mul(meter.batch.len() as u64 + 1);
            state.inputs.set_neutral();
            store.set_fuel(fuel)?;
            Ok(())
        },
    )?;
    Ok(linker)
}
