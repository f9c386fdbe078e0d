//! Lockstep: a replicated state-machine platform.
//!
//! The folders follow the path of a task: `api` (HTTP) → `raft` (apply queue, log manager,
//! replicators, ballot box, FSM caller) → `storage` (redb log) → `state_machine` → `wasm`.

pub mod api;
pub mod cli;
pub mod fd_limit;
pub mod machines;
pub mod node;
pub mod raft;
pub mod state_machine;
pub mod storage;
pub mod transport;
pub mod wasm;
