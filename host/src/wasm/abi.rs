//! The canonical ABI of `on-apply`, lowered and lifted by hand.
//!
//! wasmtime's generic lowering of `list<entry>` looks the instance's memory up again for every
//! field it stores (five lookups per entry), and its generic lifting of
//! `list<result<list<u8>, string>>` re-dispatches on the interface type for every element.
//! These two types do the same work in one pass over memory, with the same checks (bounds,
//! alignment, discriminants, UTF-8) and the same hostcall-fuel accounting, and lift straight
//! into the host's result type. Both type-check exactly as the generic types they replace.

use std::mem::MaybeUninit;

use bytes::{Bytes, BytesMut};
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
/// [`GuestError::Guest`]. The outputs of one call share one buffer: a slice each costs a
/// reference count, where a `Vec` each cost an allocation and a free per entry.
pub(crate) type Outputs = Vec<Result<Bytes, GuestError>>;

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
/// then each payload), then writes everything with one look-up of memory.
fn lower_batch<T>(
    cx: &mut LowerContext<'_, T>,
    entries: &[Entry],
) -> wasmtime::Result<(usize, usize)> {
    let size = entries
        .len()
        .checked_mul(ENTRY_SIZE)
        .ok_or_else(|| wasmtime::format_err!("size overflow copying a list"))?;
    // `realloc` checks alignment and that the block lies within memory; memory never shrinks,
    // so every block stays in bounds while later `realloc` calls grow it.
    let list = cx.realloc(0, 0, ENTRY_ALIGN, size)?;
    let payloads = entries
        .iter()
        .map(|entry| cx.realloc(0, 0, 1, entry.payload.len()))
        .collect::<wasmtime::Result<Vec<usize>>>()?;
    let memory = cx.as_slice_mut();
    let records = memory[list..][..size].as_chunks_mut::<ENTRY_SIZE>().0;
    for ((entry, record), &payload) in entries.iter().zip(records).zip(&payloads) {
        record[0..8].copy_from_slice(&entry.index.to_le_bytes());
        record[8..16].copy_from_slice(&entry.term.to_le_bytes());
        record[16..24].copy_from_slice(&entry.timestamp_ms.to_le_bytes());
        // `realloc` took both as `u32`: they fit.
        record[24..28].copy_from_slice(&(payload as u32).to_le_bytes());
        record[28..32].copy_from_slice(&(entry.payload.len() as u32).to_le_bytes());
    }
    for (entry, &payload) in entries.iter().zip(&payloads) {
        memory[payload..][..entry.payload.len()].copy_from_slice(&entry.payload);
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
    let records = memory[ptr..][..len * RESULT_SIZE]
        .as_chunks::<RESULT_SIZE>()
        .0;
    // First pass: every check and all the fuel, and the size of the shared buffer.
    let mut ok_bytes = 0usize;
    for record in records {
        let (case, data, data_len) = parse_result(record);
        match data.checked_add(data_len) {
            Some(end) if end <= memory.len() => {}
            _ if case == 0 => wasmtime::bail!("list pointer/length out of bounds of memory"),
            _ => wasmtime::bail!("string pointer/length out of bounds of memory"),
        }
        // Charged as wasmtime charges a `list<u8>` or a UTF-8 `string`: one unit per byte.
        cx.consume_fuel(data_len)?;
        match case {
            0 => ok_bytes += data_len,
            // Checked here, so that errors come in the order wasmtime's record-by-record lift
            // gives them.
            1 => {
                std::str::from_utf8(&memory[data..data + data_len])?;
            }
            _ => wasmtime::bail!("invalid expected discriminant"),
        }
    }
    let mut data = BytesMut::with_capacity(ok_bytes);
    let mut outputs = Vec::with_capacity(len);
    for record in records {
        let (case, start, data_len) = parse_result(record);
        let bytes = &memory[start..start + data_len];
        outputs.push(if case == 0 {
            data.extend_from_slice(bytes);
            Ok(data.split().freeze())
        } else {
            Err(GuestError::Guest(std::str::from_utf8(bytes)?.to_owned()))
        });
    }
    Ok(outputs)
}

/// A `result<list<u8>, string>` record: case, data pointer, data length.
fn parse_result(record: &[u8; RESULT_SIZE]) -> (u8, usize, usize) {
    let word = |at: usize| {
        u32::from_le_bytes([record[at], record[at + 1], record[at + 2], record[at + 3]])
    };
    (record[0], word(4) as usize, word(8) as usize)
}
