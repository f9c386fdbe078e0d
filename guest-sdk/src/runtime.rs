//! The glue `export!` expands to: the batch loop and the per-entry metering protocol.

use std::alloc::{Layout, dealloc};
use std::cell::RefCell;
use std::marker::PhantomData;

use crate::bindings::lockstep::machine::host;
use crate::{Context, Snapshot, StateMachine};

/// The machine's state, created on first use.
pub struct Slot<M>(RefCell<Option<M>>);

impl<M: StateMachine> Slot<M> {
    #[allow(clippy::new_without_default)]
    pub const fn new() -> Self {
        Slot(RefCell::new(None))
    }

    fn with<R>(&self, f: impl FnOnce(&mut M) -> R) -> R {
        let mut slot = self.0.borrow_mut();
        f(slot.get_or_insert_with(M::default))
    }
}

/// One entry of the `list<entry>` argument, in the canonical ABI's layout (wasm32): three
/// `u64`s, then the payload's pointer and length. Size 32, alignment 8.
#[repr(C)]
struct RawEntry {
    index: u64,
    term: u64,
    timestamp_ms: u64,
    payload: *mut u8,
    payload_len: usize,
}

/// One `result<list<u8>, string>` of the returned list, in the canonical ABI's layout (wasm32):
/// a one-byte case (0 = ok, 1 = err), then the bytes' pointer and length at offset 4. Size 12.
#[repr(C)]
#[derive(Clone, Copy)]
struct RawResult {
    case: u8,
    ptr: *const u8,
    len: usize,
}

#[cfg(target_pointer_width = "32")]
const _: () = {
    assert!(std::mem::size_of::<RawEntry>() == 32 && std::mem::align_of::<RawEntry>() == 8);
    assert!(std::mem::size_of::<RawResult>() == 12 && std::mem::align_of::<RawResult>() == 4);
};

/// Outputs are encoded straight into chunks of about this size; a chunk is closed once it
/// holds this much, so it grows past it (and reallocates) only for the output that fills it.
const CHUNK: usize = 16 << 10;
/// Chunks kept for the next batch; the rest are freed after each batch.
const CHUNKS_KEPT: usize = 2;
/// Per-batch buffers larger than this are freed after the batch rather than kept.
const KEEP_BYTES: usize = 64 << 10;

/// What one `on-apply` call returns, kept alive until the host has copied it out (the
/// canonical ABI's post-return), and reused by the next call. Allocating one buffer per output
/// and freeing each in post-return cost more than applying a small command.
struct BatchOutput {
    /// During the batch, `ptr` holds the output's offset in its chunk; pointers are resolved
    /// once the batch is done (a chunk may still reallocate while it is being filled).
    results: Vec<RawResult>,
    /// Output bytes, written in order; `chunks[c]` holds the outputs of results
    /// `firsts[c]..firsts[c + 1]`.
    chunks: Vec<Vec<u8>>,
    firsts: Vec<usize>,
    /// The return area: pointer and length of `results`.
    ret: [usize; 2],
}

impl BatchOutput {
    const fn new() -> Self {
        BatchOutput {
            results: Vec::new(),
            chunks: Vec::new(),
            firsts: Vec::new(),
            ret: [0; 2],
        }
    }

    /// The buffer the next output is appended to.
    fn chunk(&mut self) -> &mut Vec<u8> {
        let current = self.firsts.len();
        if current == 0 || self.chunks[current - 1].len() >= CHUNK {
            if current == self.chunks.len() {
                self.chunks.push(Vec::with_capacity(CHUNK));
            }
            self.firsts.push(self.results.len());
        }
        let current = self.firsts.len() - 1;
        &mut self.chunks[current]
    }

    /// Encodes one entry's outcome: `apply` appends the output to the buffer it is given.
    fn push(&mut self, apply: impl FnOnce(&mut OutputBuffer<'_>) -> Result<(), String>) {
        let chunk = self.chunk();
        let start = chunk.len();
        let case = match apply(&mut OutputBuffer { buf: chunk }) {
            Ok(()) => 0,
            Err(message) => {
                chunk.truncate(start);
                chunk.extend_from_slice(message.as_bytes());
                1
            }
        };
        let len = chunk.len() - start;
        self.results.push(RawResult {
            case,
            ptr: start as *const u8,
            len,
        });
    }

    /// Turns offsets into addresses: the chunks no longer move.
    fn resolve(&mut self) {
        let ends = self
            .firsts
            .iter()
            .skip(1)
            .copied()
            .chain([self.results.len()]);
        for ((chunk, &first), end) in self.chunks.iter().zip(&self.firsts).zip(ends) {
            let base = chunk.as_ptr();
            for result in &mut self.results[first..end] {
                // SAFETY: `ptr` is an offset within `chunk` (at most its length).
                result.ptr = unsafe { base.add(result.ptr as usize) };
            }
        }
    }

    /// After the host has copied the results: forget them, and give back memory beyond what a
    /// typical batch needs.
    fn release(&mut self) {
        self.results.clear();
        if self.results.capacity() * std::mem::size_of::<RawResult>() > KEEP_BYTES {
            self.results = Vec::new();
        }
        self.chunks.truncate(CHUNKS_KEPT);
        self.chunks.retain(|chunk| chunk.capacity() <= 2 * CHUNK);
        for chunk in &mut self.chunks {
            chunk.clear();
        }
        self.firsts.clear();
        self.ret = [0; 2];
    }
}

/// Where [`StateMachine::encode_output`] writes an output: it can only append (the buffer may
/// already hold the outputs of earlier entries of the batch).
pub struct OutputBuffer<'a> {
    buf: &'a mut Vec<u8>,
}

impl OutputBuffer<'_> {
    /// Appends `bytes` to the output.
    #[inline]
    pub fn extend_from_slice(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }
}

impl std::io::Write for OutputBuffer<'_> {
    #[inline]
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(bytes);
        Ok(bytes.len())
    }

    #[inline]
    fn write_all(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.buf.extend_from_slice(bytes);
        Ok(())
    }

    #[inline]
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

thread_local! {
    static OUTPUT: RefCell<BatchOutput> = const { RefCell::new(BatchOutput::new()) };
    static IGNORE_BEGIN_BATCH: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// For the host's tests: from now on this instance calls `begin-entry` for every entry, as
/// modules built before `begin-batch` existed do, whatever `begin-batch` answers.
#[doc(hidden)]
pub fn emulate_sdk_without_begin_batch() {
    IGNORE_BEGIN_BATCH.set(true);
}

/// The core function behind the `on-apply` export: `(batch.ptr, batch.len) -> retptr`.
///
/// Hand-written rather than generated so that the batch is read in place (no `Vec<Entry>`),
/// and the outputs are written into reused buffers (no allocation per output, nothing to free
/// per output in post-return).
///
/// # Safety
///
/// Called only by the component's `on-apply` export, with a list lowered by the canonical ABI
/// (every payload allocated by `cabi_realloc` and owned by the callee).
pub unsafe fn on_apply<M: StateMachine>(slot: &Slot<M>, entries: *mut u8, len: usize) -> *mut u8 {
    let entries = entries.cast::<RawEntry>();
    OUTPUT.with(|output| {
        let mut output = output.borrow_mut();
        let output = &mut *output;
        output.release();
        // Reserved before the first entry so that no entry pays for growing the result list.
        output.results.reserve(len);
        let metered = host::begin_batch() || IGNORE_BEGIN_BATCH.get();
        slot.with(|machine| {
            for i in 0..len {
                // SAFETY: the canonical ABI lowered `len` records at `entries`.
                let entry = unsafe { &*entries.add(i) };
                // From here until the next call the host meters and blames this entry.
                if metered {
                    host::begin_entry(entry.index);
                }
                let payload: &[u8] = if entry.payload_len == 0 {
                    &[]
                } else {
                    // SAFETY: the host allocated and filled `payload_len` bytes for us.
                    unsafe { std::slice::from_raw_parts(entry.payload, entry.payload_len) }
                };
                let mut ctx = Context::new(entry.index, entry.term, entry.timestamp_ms);
                output.push(|out| {
                    M::decode_command(payload)
                        .and_then(|command| machine.apply(&mut ctx, command))
                        .and_then(|output| M::encode_output(&output, out))
                });
                // Free the payload now: an entry's memory headroom should not depend on how
                // many entries follow it in the same batch.
                if entry.payload_len != 0 {
                    // SAFETY: allocated by `cabi_realloc` with this size and alignment 1.
                    unsafe {
                        dealloc(
                            entry.payload,
                            Layout::from_size_align_unchecked(entry.payload_len, 1),
                        )
                    };
                }
            }
        });
        if len != 0 {
            // SAFETY: the list itself was allocated by `cabi_realloc` (32 bytes per entry,
            // alignment 8) and is ours to free.
            unsafe {
                dealloc(
                    entries.cast(),
                    Layout::from_size_align_unchecked(len * 32, 8),
                )
            };
        }
        host::end_batch();
        output.resolve();
        output.ret = [output.results.as_ptr() as usize, output.results.len()];
        output.ret.as_mut_ptr().cast()
    })
}

/// The post-return of `on-apply`: the host has copied the results out.
pub fn post_on_apply() {
    OUTPUT.with(|output| output.borrow_mut().release());
}

pub fn query<M: StateMachine>(slot: &Slot<M>, request: &[u8]) -> Result<Vec<u8>, String> {
    slot.with(|machine| {
        let query = M::decode_query(request)?;
        let answer = machine.query(query)?;
        M::encode_answer(&answer)
    })
}

/// How `export!` snapshots a machine.
pub trait SnapshotCodec<M> {
    fn snapshot(machine: &M) -> Vec<u8>;
    fn restore(bytes: &[u8]) -> Result<M, String>;
}

pub struct SerdeSnapshot<M>(PhantomData<M>);

impl<M> SnapshotCodec<M> for SerdeSnapshot<M>
where
    M: serde::Serialize + serde::de::DeserializeOwned,
{
    fn snapshot(machine: &M) -> Vec<u8> {
        // Serializing plain data to JSON cannot fail; a type that makes it fail is a bug in the
        // module, and a trap is the honest outcome.
        serde_json::to_vec(machine).expect("state serializes to JSON")
    }

    fn restore(bytes: &[u8]) -> Result<M, String> {
        serde_json::from_slice(bytes).map_err(|e| format!("invalid snapshot: {e}"))
    }
}

pub struct CustomSnapshot<M>(PhantomData<M>);

impl<M: Snapshot> SnapshotCodec<M> for CustomSnapshot<M> {
    fn snapshot(machine: &M) -> Vec<u8> {
        machine.snapshot()
    }

    fn restore(bytes: &[u8]) -> Result<M, String> {
        M::restore(bytes)
    }
}

pub fn snapshot<M: StateMachine, C: SnapshotCodec<M>>(slot: &Slot<M>) -> Vec<u8> {
    slot.with(|machine| C::snapshot(machine))
}

pub fn restore<M: StateMachine, C: SnapshotCodec<M>>(
    slot: &Slot<M>,
    bytes: &[u8],
) -> Result<(), String> {
    let restored = C::restore(bytes)?;
    *slot.0.borrow_mut() = Some(restored);
    Ok(())
}
