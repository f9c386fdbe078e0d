//! Write a [Lockstep](https://example.invalid/lockstep) state machine in plain Rust.
//!
//! A module author implements [`StateMachine`] for their state type and calls [`export!`] once.
//! Built with `cargo build --target wasm32-wasip2 --release`, the crate becomes a WebAssembly
//! component of the world `lockstep:machine/state-machine` that a Lockstep cluster can deploy.
//! The SDK hides the WIT: batches, the per-entry metering protocol, encoding and snapshots.
//!
//! # A complete machine
//!
//! `Cargo.toml`:
//!
//! ```toml
//! [package]
//! name = "counter"
//! edition = "2024"
//!
//! [lib]
//! crate-type = ["cdylib"]
//!
//! [dependencies]
//! # Not on crates.io: a path into a checkout of Lockstep (or `git = "<its repository>"`).
//! lockstep-guest = { path = "../lockstep/guest-sdk" }
//! serde = { version = "1", features = ["derive"] }
//!
//! # One optimization unit for the whole module: serde, the SDK and the machine inline into
//! # each other. `on-apply` of the counter runs about a quarter faster than with the defaults.
//! [profile.release]
//! lto = true
//! codegen-units = 1
//! ```
//!
//! `src/lib.rs`:
//!
//! ```
//! use lockstep_guest::{Context, StateMachine};
//! use serde::{Deserialize, Serialize};
//!
//! /// The whole state. `Serialize + Deserialize` gives snapshot and restore for free.
//! #[derive(Default, Serialize, Deserialize)]
//! pub struct Counter {
//!     value: i64,
//!     last_change_ms: u64,
//! }
//!
//! /// Commands arrive as JSON: `{"add": 5}`.
//! #[derive(Deserialize)]
//! #[serde(rename_all = "snake_case")]
//! pub enum Command {
//!     Add(i64),
//! }
//!
//! /// Results and answers leave as JSON: `{"value": 5}`.
//! #[derive(Serialize)]
//! pub struct Value {
//!     value: i64,
//! }
//!
//! impl StateMachine for Counter {
//!     type Command = Command;
//!     type Output = Value;
//!     type Query = ();
//!     type Answer = Value;
//!
//!     fn apply(&mut self, ctx: &mut Context, command: Command) -> Result<Value, String> {
//!         let Command::Add(n) = command;
//!         // An `Err` fails this entry only and is reported to the client as `guest_error`.
//!         self.value = self.value.checked_add(n).ok_or("counter overflow")?;
//!         // Time comes from the entry (the leader's clock), never from the replica's own.
//!         self.last_change_ms = ctx.timestamp_ms();
//!         Ok(Value { value: self.value })
//!     }
//!
//!     fn query(&self, _query: ()) -> Result<Value, String> {
//!         Ok(Value { value: self.value })
//!     }
//!
//!     // Any request body is a query for the value: skip JSON decoding.
//!     fn decode_query(_request: &[u8]) -> Result<(), String> {
//!         Ok(())
//!     }
//! }
//!
//! lockstep_guest::export!(Counter);
//! # fn main() {}
//! ```
//!
//! Build and deploy:
//!
//! ```text
//! cargo build --target wasm32-wasip2 --release
//! lockstep deploy counter target/wasm32-wasip2/release/counter.wasm
//! curl -d '{"add": 5}' http://127.0.0.1:7070/v1/machines/counter/tasks    # {"value":5}
//! ```
//!
//! # Rules that keep replicas identical
//!
//! Every replica applies the same log, but not in the same batches, not after the same restarts,
//! and not at the same wall-clock time. So an `apply` must depend only on the state, the
//! command and the [`Context`]:
//!
//! - Take time from [`Context::timestamp_ms`] and randomness from [`Context::rng`]. (std's clock
//!   and random work too, and the host makes them return entry-derived values, but the
//!   context says so explicitly.)
//! - Prefer `BTreeMap` to `HashMap` for anything whose iteration order reaches an output or a
//!   snapshot. A std `HashMap`'s order follows how many the instance created before it, and
//!   that count is not part of your state: it restarts when one replica rebuilds its instance
//!   after a failure (from your snapshot and a replay) while the others do not, and when a
//!   replica starts from the node's snapshot (after a restart, or one sent by the leader).
//! - [`restore`](Snapshot::restore) must accept whatever `snapshot` returned: the node's
//!   snapshots (every `--snapshot-every` entries) go through it on restarts and on followers
//!   that fell behind.
//! - A panic, an endless loop (out of fuel) or an allocation past the memory cap fails that
//!   entry alone; the host rolls the state back to just before it. Don't rely on it for
//!   control flow: it costs a snapshot restore and a replay.
//! - [`snapshot`](Snapshot::snapshot) must be a pure function of the state; replicas compare
//!   snapshots byte for byte.
//!
//! # Custom encodings and snapshots
//!
//! Commands, outputs, queries and answers are JSON by default (so `curl` works); override
//! [`StateMachine::decode_command`] and friends for another encoding. Snapshots default to the
//! JSON of the state; implement [`Snapshot`] and write `export!(MyMachine, snapshot = custom)`
//! for your own format.

extern crate self as lockstep_guest;

pub use serde;
pub use serde_json;
pub use wit_bindgen;

mod context;
#[doc(hidden)]
pub mod runtime;

pub use context::{Context, EntryRng};
pub use runtime::OutputBuffer;

/// The raw bindings to `wit/machine.wit`. Authors normally never touch them.
#[doc(hidden)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "../wit",
        world: "state-machine",
        pub_export_macro: true,
        default_bindings_module: "::lockstep_guest::bindings",
        runtime_path: "::lockstep_guest::wit_bindgen::rt",
        // Exported by hand (`runtime::on_apply`): the batch is read in place and the outputs
        // written into reused buffers. The component type still declares it.
        skip: ["on-apply"],
    });
}

use serde::Serialize;
use serde::de::DeserializeOwned;

/// A deterministic state machine: the whole state of a deployed module.
///
/// The state starts as `Default::default()` and changes only through [`apply`](Self::apply)
/// and restores.
pub trait StateMachine: Default + 'static {
    /// A command carried by one log entry.
    type Command: DeserializeOwned;
    /// What applying a command returns to the client that proposed it.
    type Output: Serialize;
    /// A read-only request.
    type Query: DeserializeOwned;
    /// The answer to a query.
    type Answer: Serialize;

    /// Applies one committed command. `Err` fails this entry with the given message (reported
    /// as `guest_error`); by convention the state is then left unchanged.
    fn apply(&mut self, ctx: &mut Context, command: Self::Command) -> Result<Self::Output, String>;

    /// Answers a read-only query.
    fn query(&self, query: Self::Query) -> Result<Self::Answer, String>;

    /// Decodes an entry's payload. Default: JSON.
    fn decode_command(payload: &[u8]) -> Result<Self::Command, String> {
        serde_json::from_slice(payload).map_err(|e| format!("invalid command: {e}"))
    }

    /// Encodes an output by writing it to `out` (the SDK gathers a batch's outputs in shared
    /// buffers; `out` only appends). Default: JSON.
    fn encode_output(output: &Self::Output, out: &mut OutputBuffer<'_>) -> Result<(), String> {
        serde_json::to_writer(out, output).map_err(|e| format!("cannot encode output: {e}"))
    }

    /// Decodes a query request. Default: JSON, with an empty body read as `null`.
    fn decode_query(request: &[u8]) -> Result<Self::Query, String> {
        let request = if request.is_empty() {
            b"null" as &[u8]
        } else {
            request
        };
        serde_json::from_slice(request).map_err(|e| format!("invalid query: {e}"))
    }

    /// Encodes a query answer. Default: JSON.
    fn encode_answer(answer: &Self::Answer) -> Result<Vec<u8>, String> {
        serde_json::to_vec(answer).map_err(|e| format!("cannot encode answer: {e}"))
    }
}

/// A custom snapshot format, used by `export!(Machine, snapshot = custom)`.
///
/// Without it, `export!(Machine)` snapshots the state as JSON through serde.
pub trait Snapshot: Sized {
    /// Serializes the whole state. Must be a pure function of the state.
    fn snapshot(&self) -> Vec<u8>;
    /// Rebuilds the state from bytes produced by `snapshot`, possibly by an older version.
    fn restore(bytes: &[u8]) -> Result<Self, String>;
}

/// Exports a [`StateMachine`] as the component's `lockstep:machine/state-machine` world.
///
/// - `export!(Machine)`: snapshots are the JSON of the state (`Machine: Serialize +
///   Deserialize`).
/// - `export!(Machine, snapshot = custom)`: snapshots go through `Machine`'s [`Snapshot`] impl.
///
/// Call it once, at the crate root of a `cdylib`.
#[macro_export]
macro_rules! export {
    ($machine:ty) => {
        $crate::export!($machine, snapshot = serde);
    };
    ($machine:ty, snapshot = serde) => {
        $crate::__export_with!($machine, $crate::runtime::SerdeSnapshot<$machine>);
    };
    ($machine:ty, snapshot = custom) => {
        $crate::__export_with!($machine, $crate::runtime::CustomSnapshot<$machine>);
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __export_with {
    ($machine:ty, $codec:ty) => {
        const _: () = {
            ::std::thread_local! {
                static STATE: $crate::runtime::Slot<$machine> = $crate::runtime::Slot::new();
            }

            // wit-bindgen's `export!` wants an identifier, not a type path: a local shim.
            struct LockstepExport;

            impl $crate::bindings::Guest for LockstepExport {
                fn query(
                    request: ::std::vec::Vec<u8>,
                ) -> ::std::result::Result<::std::vec::Vec<u8>, ::std::string::String> {
                    STATE.with(|slot| $crate::runtime::query::<$machine>(slot, &request))
                }

                fn snapshot() -> ::std::vec::Vec<u8> {
                    STATE.with(|slot| $crate::runtime::snapshot::<$machine, $codec>(slot))
                }

                fn restore(
                    bytes: ::std::vec::Vec<u8>,
                ) -> ::std::result::Result<(), ::std::string::String> {
                    STATE.with(|slot| $crate::runtime::restore::<$machine, $codec>(slot, &bytes))
                }
            }

            $crate::bindings::export!(LockstepExport);

            // `on-apply` is exported by hand (see `runtime::on_apply`), with the core
            // signature the canonical ABI gives it: `(batch.ptr, batch.len) -> retptr`.
            #[cfg(target_arch = "wasm32")]
            #[unsafe(export_name = "on-apply")]
            unsafe extern "C" fn __lockstep_on_apply(entries: *mut u8, len: usize) -> *mut u8 {
                // SAFETY: called by the component's `on-apply` with a canonically lowered list.
                STATE.with(|slot| unsafe {
                    $crate::runtime::on_apply::<$machine>(slot, entries, len)
                })
            }

            #[cfg(target_arch = "wasm32")]
            #[unsafe(export_name = "cabi_post_on-apply")]
            extern "C" fn __lockstep_post_on_apply(_ret: *mut u8) {
                $crate::runtime::post_on_apply();
            }
        };
    };
}
