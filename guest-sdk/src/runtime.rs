//! The glue `export!` expands to: the batch loop and the per-entry metering protocol.

use std::cell::RefCell;
use std::marker::PhantomData;

use crate::bindings::Entry;
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

pub fn on_apply<M: StateMachine>(
    slot: &Slot<M>,
    batch: Vec<Entry>,
) -> Vec<Result<Vec<u8>, String>> {
    // Allocated before the first entry so that no entry pays for growing the result list.
    let mut results = Vec::with_capacity(batch.len());
    let metered = host::begin_batch();
    slot.with(|machine| {
        for entry in batch {
            // From here until the next call the host meters and blames this entry.
            if metered {
                host::begin_entry(entry.index);
            }
            let mut ctx = Context::new(entry.index, entry.term, entry.timestamp_ms);
            let result = M::decode_command(&entry.payload)
                .and_then(|command| machine.apply(&mut ctx, command))
                .and_then(|output| M::encode_output(&output));
            // Free the payload now: an entry's memory headroom should not depend on how many
            // entries follow it in the same batch.
            drop(entry);
            results.push(result);
        }
    });
    host::end_batch();
    results
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
