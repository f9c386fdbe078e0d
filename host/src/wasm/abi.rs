//! The canonical ABI of `on-apply`, lowered and lifted by hand.
//!
//! wasmtime's generic lowering of `list<entry>` looks the instance's memory up again for every
//! field it stores (five lookups per entry), and its generic lifting of
//! `list<result<list<u8>, string>>` re-dispatches on the interface type for every element.
//! These two types do the same work in one pass over memory, with the same checks (bounds,
//! alignment, discriminants, UTF-8) and the same hostcall-fuel accounting, and lift straight
//! into the host's result type. Both type-check exactly as the generic types they replace.

use std::mem::MaybeUninit;

use wasmtime::ValRaw;
use wasmtime::component::__internal::{
    CanonicalAbiInfo, InstanceType, InterfaceType, LiftContext, LowerContext, wasmtime_environ,
};
use wasmtime::component::{ComponentType, Lift, Lower};

use super::GuestError;
use crate::state_machine::Entry;

/// Canonical-ABI size and alignment of the WIT `entry` record: three `u64`, one pointer pair.
const ENTRY_SIZE: usize = 32;
const ENTRY_ALIGN: u32 = 8;
/// Canonical-ABI size of `result<list<u8>, string>`: a one-byte case, a pointer pair at 4.
const RESULT_SIZE: usize = 12;
const RESULT_ALIGN: usize = 4;

/// What `on-apply` returns, lifted: one result per entry, a guest `err` already a
/// [`GuestError::Guest`].
pub(crate) type Outputs = Vec<Result<Vec<u8>, GuestError>>;

/// The `batch: list<entry>` argument of `on-apply`.
pub(crate) struct BatchParam<'a>(pub &'a [Entry]);

/// The generic equivalent of [`BatchParam`], used for its type check.
#[derive(wasmtime::component::ComponentType, wasmtime::component::Lower)]
#[component(record)]
struct EntryRecord<'a> {
    index: u64,
    term: u64,
    #[component(name = "timestamp-ms")]
    timestamp_ms: u64,
    payload: &'a [u8],
}

// SAFETY: `Lower` is a pointer pair and the ABI is a list's, as for `[EntryRecord]`, whose
// type check this delegates to.
unsafe impl ComponentType for BatchParam<'_> {
    type Lower = [ValRaw; 2];

    const ABI: CanonicalAbiInfo = CanonicalAbiInfo::POINTER_PAIR;

    fn typecheck(ty: &InterfaceType, types: &InstanceType<'_>) -> wasmtime::Result<()> {
        <[EntryRecord<'static>] as ComponentType>::typecheck(ty, types)
    }
}

// SAFETY: writes exactly the canonical ABI's layout of `list<entry>`, within ranges `realloc`
// returned and wasmtime bounds-checked.
unsafe impl Lower for BatchParam<'_> {
    fn linear_lower_to_flat<T>(
        &self,
        cx: &mut LowerContext<'_, T>,
        _ty: InterfaceType,
        dst: &mut MaybeUninit<[ValRaw; 2]>,
    ) -> wasmtime::Result<()> {
        let (ptr, len) = lower_batch(cx, self.0)?;
        // Pointers are always written as 64-bit values (as wasmtime does).
        dst.write([ValRaw::i64(ptr as i64), ValRaw::i64(len as i64)]);
        Ok(())
    }

    fn linear_lower_to_memory<T>(
        &self,
        cx: &mut LowerContext<'_, T>,
        _ty: InterfaceType,
        offset: usize,
    ) -> wasmtime::Result<()> {
        let (ptr, len) = lower_batch(cx, self.0)?;
        let memory = cx.as_slice_mut();
        memory[offset..][..4].copy_from_slice(&(ptr as u32).to_le_bytes());
        memory[offset + 4..][..4].copy_from_slice(&(len as u32).to_le_bytes());
        Ok(())
    }
}

/// Lowers the entries as the canonical ABI does, `realloc` calls in the same order (the list,
/// then each payload), but with one look-up of memory per entry.
fn lower_batch<T>(
    cx: &mut LowerContext<'_, T>,
    entries: &[Entry],
) -> wasmtime::Result<(usize, usize)> {
    let size = entries
        .len()
        .checked_mul(ENTRY_SIZE)
        .ok_or_else(|| wasmtime::format_err!("size overflow copying a list"))?;
    // `realloc` checks alignment and that the block lies within memory; memory never shrinks,
    // so the block stays in bounds while later `realloc` calls grow it.
    let list = cx.realloc(0, 0, ENTRY_ALIGN, size)?;
    for (i, entry) in entries.iter().enumerate() {
        let payload_len = entry.payload.len();
        let payload = cx.realloc(0, 0, 1, payload_len)?;
        let memory = cx.as_slice_mut();
        memory[payload..][..payload_len].copy_from_slice(&entry.payload);
        let record: &mut [u8; ENTRY_SIZE] = (&mut memory[list + i * ENTRY_SIZE..][..ENTRY_SIZE])
            .try_into()
            .expect("ENTRY_SIZE bytes");
        record[0..8].copy_from_slice(&entry.index.to_le_bytes());
        record[8..16].copy_from_slice(&entry.term.to_le_bytes());
        record[16..24].copy_from_slice(&entry.timestamp_ms.to_le_bytes());
        // `realloc` took both as `u32`: they fit.
        record[24..28].copy_from_slice(&(payload as u32).to_le_bytes());
        record[28..32].copy_from_slice(&(payload_len as u32).to_le_bytes());
    }
    Ok((list, entries.len()))
}

/// The `list<result<list<u8>, string>>` that `on-apply` returns.
pub(crate) struct OutputsResult(pub Outputs);

// SAFETY: a list (pointer pair), type-checked as `Vec<Result<Vec<u8>, String>>`.
unsafe impl ComponentType for OutputsResult {
    type Lower = [ValRaw; 2];

    const ABI: CanonicalAbiInfo = CanonicalAbiInfo::POINTER_PAIR;

    fn typecheck(ty: &InterfaceType, types: &InstanceType<'_>) -> wasmtime::Result<()> {
        <Vec<Result<Vec<u8>, String>> as ComponentType>::typecheck(ty, types)
    }
}

// SAFETY: reads only within memory, after the same checks wasmtime's generic lift makes.
unsafe impl Lift for OutputsResult {
    fn linear_lift_from_flat(
        cx: &mut LiftContext<'_>,
        _ty: InterfaceType,
        src: &[ValRaw; 2],
    ) -> wasmtime::Result<Self> {
        lift_outputs(cx, src[0].get_u32() as usize, src[1].get_u32() as usize).map(OutputsResult)
    }

    fn linear_lift_from_memory(
        cx: &mut LiftContext<'_>,
        _ty: InterfaceType,
        bytes: &[u8],
    ) -> wasmtime::Result<Self> {
        let ptr = u32::from_le_bytes(bytes[0..4].try_into()?) as usize;
        let len = u32::from_le_bytes(bytes[4..8].try_into()?) as usize;
        lift_outputs(cx, ptr, len).map(OutputsResult)
    }
}

fn lift_outputs(cx: &mut LiftContext<'_>, ptr: usize, len: usize) -> wasmtime::Result<Outputs> {
    if cx.options().string_encoding != wasmtime_environ::component::StringEncoding::Utf8 {
        wasmtime::bail!("on-apply: only UTF-8 strings are supported");
    }
    let memory = cx.memory();
    // As `WasmList::new`: bounds, hostcall fuel for the host-side list, alignment.
    match len
        .checked_mul(RESULT_SIZE)
        .and_then(|n| ptr.checked_add(n))
    {
        Some(end) if end <= memory.len() => {
            cx.consume_fuel_array(len, size_of::<Result<Vec<u8>, String>>())?
        }
        _ => wasmtime::bail!("list pointer/length out of bounds of memory"),
    }
    if !ptr.is_multiple_of(RESULT_ALIGN) {
        wasmtime::bail!("list pointer is not aligned");
    }
    let mut outputs = Vec::with_capacity(len);
    for record in memory[ptr..][..len * RESULT_SIZE].chunks_exact(RESULT_SIZE) {
        let data = u32::from_le_bytes(record[4..8].try_into()?) as usize;
        let data_len = u32::from_le_bytes(record[8..12].try_into()?) as usize;
        let bytes = match data.checked_add(data_len) {
            Some(end) if end <= memory.len() => &memory[data..end],
            _ if record[0] == 0 => wasmtime::bail!("list pointer/length out of bounds of memory"),
            _ => wasmtime::bail!("string pointer/length out of bounds of memory"),
        };
        // Charged as wasmtime charges a `list<u8>` or a UTF-8 `string`: one unit per byte.
        cx.consume_fuel(data_len)?;
        outputs.push(match record[0] {
            0 => Ok(bytes.to_vec()),
            1 => Err(GuestError::Guest(std::str::from_utf8(bytes)?.to_owned())),
            _ => wasmtime::bail!("invalid expected discriminant"),
        });
    }
    Ok(outputs)
}
