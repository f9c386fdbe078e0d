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

/// mimalloc's `purge_delay` option: `mi_option_t` 15 in mimalloc 2's `mimalloc.h` (the one after
/// `eager_commit_delay`, 14); the sys crate names no constant for it.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// How long memory a node freed stays mapped before mimalloc hands it back to the OS.
/// mimalloc's default, 10 ms, is shorter than a group commit's cycle under load: pages the HTTP
/// side emptied were returned and faulted in again, zeroed, at ~1,000 faults a second per node,
/// 2.5 % of the machine's CPU at 256 connections (BENCHMARKS.md, session 19). A second keeps
/// them across cycles and still gives a burst's memory back soon after it.
pub const ALLOCATOR_PURGE_DELAY_MS: i64 = 1_000;

/// Sets the allocator's options; every binary calls it first thing in `main`.
pub fn tune_allocator() {
    // SAFETY: sets one integer option; mimalloc reads it whenever it schedules a purge.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, ALLOCATOR_PURGE_DELAY_MS) }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_purge_delay_option_is_the_one_set() {
        use libmimalloc_sys::mi_option_get;
        // 15 is `purge_delay` if it holds its documented default (10 ms) until set: its
        // neighbours default to 1 (`eager_commit_delay`) and 0 (`use_numa_nodes`).
        if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
            assert_eq!(unsafe { mi_option_get(super::MI_OPTION_PURGE_DELAY) }, 10);
        }
        super::tune_allocator();
        assert_eq!(
            unsafe { mi_option_get(super::MI_OPTION_PURGE_DELAY) },
            super::ALLOCATOR_PURGE_DELAY_MS
        );
    }
}
