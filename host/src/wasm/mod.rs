//! The WebAssembly runtime: every user state machine is a component of the world
//! `lockstep:machine/state-machine` (see `wit/machine.wit`).
//!
//! - [`WasmEngine`]: one wasmtime `Engine` configured for determinism (fuel, NaN
//!   canonicalization, deterministic relaxed SIMD, no threads, Cranelift only).
//! - [`ModuleRegistry`]: validates components against the world, stores them once by sha256
//!   digest, keeps precompiled artifacts on disk.
//! - [`Machine`]: one running instance of a module; applies committed batches with per-entry
//!   fuel, memory cap and trap isolation, answers queries, snapshots, restores, upgrades.
//!
//! The promise: an entry's result and the resulting state do not depend on how entries were
//! grouped into batches. See [`Machine`] for how traps are isolated without giving that up.

mod abi;
mod engine;
mod errors;
mod host;
mod limits;
mod machine;
mod registry;

pub use engine::WasmEngine;
pub use errors::{GuestError, MachineError, ModuleError};
pub use limits::Limits;
pub use machine::Machine;
pub use registry::{ModuleInfo, ModuleRegistry};
