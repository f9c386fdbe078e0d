//! What a guest's `Store` holds: the per-entry meter behind `lockstep:machine/host`, the memory
//! cap, and a WASI context whose clocks and randomness come from the entry being applied.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use wasmtime::component::{Linker, ResourceTable};
use wasmtime::{ResourceLimiter, StoreContextMut};
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamError, StreamResult};
use wasmtime_wasi::{HostMonotonicClock, HostWallClock, WasiCtx, WasiCtxBuilder, WasiCtxView};

use super::Limits;

const HOST_INTERFACE: &str = "lockstep:machine/host@0.1.0";
/// The `wasi:io/poll` wasmtime-wasi 48 provides (guests importing any 0.2.x match it).
const WASI_POLL: &str = "wasi:io/poll@0.2.12";
/// The monotonic clock's timers, whose readiness would follow the host's real time.
const WASI_MONOTONIC_CLOCK: &str = "wasi:clocks/monotonic-clock@0.2.12";
/// The guest's stderr keeps this much of the call's latest output: enough for a panic message.
const STDERR_CAPACITY: usize = 16 << 10;
/// Most bytes one write to stdout or stderr may carry (what `check-write` grants; std writes
/// 4 KiB at a time). Fuel counts the guest's instructions, not the host's work in a call, so
/// every host call must cost the host about as little as the instructions that make it: a
/// loop of 60 MiB writes for a few fuel each would hold every replica for hours.
const WRITE_PERMIT: usize = 4096;
/// Most bytes one `get-random-bytes` call may ask for, for the same reason (wasmtime-wasi
/// allows 64 MiB).
const MAX_RANDOM_BYTES: u64 = 4096;
/// Linear memories, tables and instances a machine may create. Its components need a handful;
/// each memory reserves address space, so thousands would exhaust the node.
const MAX_MEMORIES: usize = 16;
const MAX_TABLES: usize = 64;
const MAX_INSTANCES: usize = 256;
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
    /// The first refused memory growth of this call that the guest lived through (it ran on):
    /// in the entry at this position, or outside any entry (`Some(None)`). What it answered
    /// then may depend on its neighbours' memory.
    pub refused: Option<Option<usize>>,
}

/// Caps the machine's linear memory (all its memories together) and tables, and remembers a
/// refused growth so that the failure it causes (a trap, usually an abort in the guest's
/// allocator) is reported as `memory_limit`.
pub(crate) struct MemoryCap {
    pub memory_bytes: usize,
    pub table_elements: usize,
    pub denied: bool,
    /// Bytes of every memory of the store so far (memories never shrink or go away).
    pub used: usize,
}

impl ResourceLimiter for MemoryCap {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        max: Option<usize>,
    ) -> wasmtime::Result<bool> {
        // Past the memory's own maximum the growth fails anyway: not ours to count or report.
        if max.is_some_and(|max| desired > max) {
            return Ok(false);
        }
        let total = (self.used - current.min(self.used)).saturating_add(desired);
        if total > self.memory_bytes {
            self.denied = true;
            return Ok(false);
        }
        self.used = total;
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

    fn memories(&self) -> usize {
        MAX_MEMORIES
    }

    fn tables(&self) -> usize {
        MAX_TABLES
    }

    fn instances(&self) -> usize {
        MAX_INSTANCES
    }
}

/// A guest's output stream: its stderr, and (a second one that nothing reads) its stdout. Every
/// permitted write succeeds, so whether a guest's print fails can never depend on how much it
/// printed since its store was built (which differs between replicas: rebuilds, restarts).
/// Only the latest `STDERR_CAPACITY` bytes of the current call are kept, for the panic message.
#[derive(Clone, Default)]
pub(crate) struct OutputTail(Arc<Mutex<VecDeque<u8>>>);

impl OutputTail {
    fn append(&self, bytes: &[u8]) {
        let bytes = &bytes[bytes.len().saturating_sub(STDERR_CAPACITY)..];
        let mut tail = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        tail.extend(bytes);
        let excess = tail.len().saturating_sub(STDERR_CAPACITY);
        tail.drain(..excess);
    }

    pub fn clear(&self) {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }

    fn contents(&self) -> Vec<u8> {
        let tail = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        tail.iter().copied().collect()
    }
}

#[wasmtime_wasi::async_trait]
impl OutputStream for OutputTail {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        permitted(&bytes)?;
        self.append(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(WRITE_PERMIT)
    }
}

/// A write beyond what `check-write` granted traps, as WASI says it must (wasmtime-wasi leaves
/// the check to the stream). Deterministic: it depends on that write alone.
fn permitted(bytes: &[u8]) -> StreamResult<()> {
    if bytes.len() > WRITE_PERMIT {
        return Err(StreamError::trap(&format!(
            "a write of {} bytes to stdout or stderr (`check-write` grants {WRITE_PERMIT})",
            bytes.len()
        )));
    }
    Ok(())
}

#[wasmtime_wasi::async_trait]
impl Pollable for OutputTail {
    async fn ready(&mut self) {}
}

impl tokio::io::AsyncWrite for OutputTail {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.append(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl IsTerminal for OutputTail {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for OutputTail {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
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
    pub stderr: OutputTail,
}

impl HostState {
    /// Called where the guest is known to run on (the next entry begins, the batch ends, the
    /// call returns): a growth refused since was lived through. Noted where it happened.
    pub(crate) fn note_refusal(&mut self) {
        if std::mem::take(&mut self.cap.denied) {
            self.meter.refused.get_or_insert(self.meter.current);
        }
    }

    pub fn new(limits: &Limits) -> Self {
        let inputs = Arc::new(EntryInputs::default());
        inputs.set_neutral();
        let stderr = OutputTail::default();
        // No preopened directories, no environment, no arguments, no network, no stdin:
        // only what std needs to run, with every source of nondeterminism replaced.
        let wasi = WasiCtxBuilder::new()
            // stdout: a tail of its own that nothing reads, with stderr's permit.
            .stdout(OutputTail::default())
            .stderr(stderr.clone())
            .max_random_size(MAX_RANDOM_BYTES)
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
                used: 0,
            },
            meter: EntryMeter {
                fuel_per_entry: limits.fuel_per_entry,
                // Outside `on-apply` there is no batch to end.
                ended: true,
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
    // Nor may they set a timer: its readiness would follow the host's real time.
    for (interface, names) in [
        (WASI_POLL, &["poll", "[method]pollable.block"][..]),
        (
            WASI_MONOTONIC_CLOCK,
            &["subscribe-duration", "subscribe-instant"][..],
        ),
    ] {
        let mut instance = linker.instance(interface)?;
        for &name in names {
            instance.func_new(name, move |_, _, _, _| {
                wasmtime::bail!("guests may not block, sleep or set timers (`{interface}#{name}`)")
            })?;
        }
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
            state.note_refusal();
            let meter = &mut state.meter;
            meter.begun += 1;
            meter.current = Some(position);
            let fuel = meter.fuel_per_entry;
            state.stderr.clear();
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
            // Once per `on-apply` call: it refills fuel, so a guest calling it in a loop (or
            // outside `on-apply`) would never run out.
            if meter.ended {
                wasmtime::bail!("end-batch called twice in one on-apply call, or outside one");
            }
            if meter.metered && meter.begun != meter.batch.len() {
                wasmtime::bail!(
                    "end-batch after {} of {} entries",
                    meter.begun,
                    meter.batch.len()
                );
            }
            state.note_refusal();
            let meter = &mut state.meter;
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

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: usize = 1 << 20;

    fn cap(memory_bytes: usize) -> MemoryCap {
        MemoryCap {
            memory_bytes,
            table_elements: 0,
            denied: false,
            used: 0,
        }
    }

    #[test]
    fn the_memory_cap_counts_every_memory_of_the_machine() -> wasmtime::Result<()> {
        let mut c = cap(64 * MIB);
        assert!(c.memory_growing(0, 40 * MIB, None)?, "first memory");
        assert!(
            !c.memory_growing(0, 40 * MIB, None)?,
            "a second 40 MiB memory"
        );
        assert!(c.denied);
        c.denied = false;
        assert!(
            c.memory_growing(0, 20 * MIB, None)?,
            "a second memory that fits"
        );
        assert!(
            c.memory_growing(40 * MIB, 44 * MIB, None)?,
            "the first grows into the rest"
        );
        assert_eq!(c.used, 64 * MIB);
        assert!(!c.memory_growing(20 * MIB, 21 * MIB, None)?, "nothing left");
        // A memory's own maximum refuses, without counting or blaming the cap.
        let mut c = cap(64 * MIB);
        assert!(!c.memory_growing(0, 2 * MIB, Some(MIB))?);
        assert!(!c.denied);
        assert_eq!(c.used, 0);
        Ok(())
    }

    #[test]
    fn a_machine_with_two_memories_over_the_cap_is_refused_at_instantiation() {
        let limits = Limits {
            memory_bytes: 64 * MIB,
            ..Limits::default()
        };
        let mut config = wasmtime::Config::new();
        config.consume_fuel(true);
        let engine = wasmtime::Engine::new(&config).expect("engine");
        // 600 pages = 37.5 MiB each: either fits alone, both together do not.
        for (memories, fits) in [(1, true), (2, false)] {
            let wat = format!("(module {})", "(memory 600) ".repeat(memories));
            let wasm = wat::parse_str(&wat).expect("wat");
            let module = wasmtime::Module::new(&engine, &wasm).expect("module");
            let mut store = wasmtime::Store::new(&engine, HostState::new(&limits));
            super::super::machine::prime_store(&mut store, &limits);
            let made = wasmtime::Instance::new(&mut store, &module, &[]);
            assert_eq!(made.is_ok(), fits, "{memories} memories: {made:?}");
            assert_eq!(store.data().cap.denied, !fits);
        }
    }

    #[test]
    fn stderr_keeps_the_latest_output_and_never_refuses_a_permitted_write() {
        let mut tail = OutputTail::default();
        for _ in 0..100 {
            OutputStream::write(&mut tail, Bytes::from(vec![b'x'; 1000])).expect("a write");
            assert_eq!(tail.check_write().ok(), Some(WRITE_PERMIT));
        }
        tail.append(b"panicked at the end");
        let kept = tail.contents();
        assert_eq!(kept.len(), STDERR_CAPACITY);
        assert!(kept.ends_with(b"panicked at the end"));
        // Beyond the permit a write traps; the tail of a long append is all it keeps.
        let over = Bytes::from(vec![b'y'; WRITE_PERMIT + 1]);
        assert!(OutputStream::write(&mut tail, over).is_err());
        tail.append(&vec![b'z'; 10 * STDERR_CAPACITY]);
        assert_eq!(tail.contents(), vec![b'z'; STDERR_CAPACITY]);
        tail.clear();
        assert!(tail.contents().is_empty());
    }
}
