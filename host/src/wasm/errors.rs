//! What can go wrong with a module (refused at deploy) and with an entry (fails that entry).

use thiserror::Error;

/// A module the registry refuses or cannot find. Deploy-time errors: never a panic.
#[derive(Debug, Error)]
pub enum ModuleError {
    #[error("not a WebAssembly binary (no `\\0asm` header)")]
    NotWasm,
    #[error(
        "a core WebAssembly module, not a component: build the guest with \
         `cargo build --target wasm32-wasip2` (or wrap it with `wasm-tools component new`)"
    )]
    NotAComponent,
    #[error("the component does not implement world lockstep:machine/state-machine@0.1.0: {0}")]
    WrongWorld(String),
    #[error("invalid or truncated component: {0}")]
    Invalid(String),
    #[error("no module with digest {0}")]
    NotFound(String),
    #[error("module store: {0}")]
    Storage(String),
}

impl ModuleError {
    /// The HTTP API's stable error code for this error.
    pub fn code(&self) -> &'static str {
        match self {
            ModuleError::NotFound(_) => "not_found",
            ModuleError::Storage(_) => "internal",
            _ => "invalid_module",
        }
    }
}

/// Why one entry (or query, snapshot, restore) failed. The variants are deterministic: every
/// replica fails the same entry with the same variant.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum GuestError {
    /// The machine refused the entry and said why.
    #[error("{0}")]
    Guest(String),
    /// The guest trapped: a panic, `unreachable`, a stack overflow, a bad memory access...
    #[error("guest trapped: {0}")]
    Trap(String),
    /// The entry used up its fuel budget (an endless or too long computation).
    #[error("out of fuel: the guest used its whole budget of {budget} fuel units")]
    OutOfFuel { budget: u64 },
    /// The guest tried to grow its memory past the cap.
    #[error("memory limit: the guest tried to grow its memory past the cap of {limit} bytes")]
    MemoryLimit { limit: usize },
}

impl GuestError {
    /// Whether the failure may depend on what else the call held: memory is shared with the
    /// other entries' payloads and outputs, and a guest copying its outputs around pays fuel
    /// for theirs. Such an entry is tried again alone before it fails.
    pub fn depends_on_neighbours(&self) -> bool {
        matches!(
            self,
            GuestError::MemoryLimit { .. } | GuestError::OutOfFuel { .. }
        )
    }

    /// The HTTP API's stable error code.
    pub fn code(&self) -> &'static str {
        match self {
            GuestError::Guest(_) => "guest_error",
            GuestError::Trap(_) => "guest_trap",
            GuestError::OutOfFuel { .. } => "out_of_fuel",
            GuestError::MemoryLimit { .. } => "memory_limit",
        }
    }
}

/// Creating, restoring or upgrading a [`Machine`](super::Machine).
#[derive(Debug, Error)]
pub enum MachineError {
    #[error(transparent)]
    Module(#[from] ModuleError),
    #[error(transparent)]
    Guest(#[from] GuestError),
}
