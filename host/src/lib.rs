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

/// Every binary of the crate allocates with mimalloc: the node, and the ceiling it is measured
/// against. glibc's malloc made threads that free what others allocated (a task's bytes are
/// allocated by the HTTP side and freed by the disk queue or the state-machine thread) pay in
/// locked frees and `malloc_consolidate`, ~6% of a follower's CPU (BENCHMARKS.md, session 7).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
