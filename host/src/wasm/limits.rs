//! The knobs that bound what one guest can cost a node.

/// Per-machine resource limits. Every replica must run with the same limits: an entry that
/// runs out of fuel on one replica must run out on all of them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Fuel for one entry, reset before each entry. Fuel counts roughly one unit per wasm
    /// instruction; a trivial JSON entry costs ~1-2k. The default, 100M, is a few hundred
    /// milliseconds of honest work and stops a spinning guest in well under a second.
    pub fuel_per_entry: u64,
    /// Fuel for one `snapshot` or `restore` call, which walk the whole state. Default 20G.
    pub fuel_per_snapshot: u64,
    /// Cap on the instance's linear memory (and so on its share of the host's RAM).
    /// Default 64 MiB.
    pub memory_bytes: usize,
    /// Cap on table growth, in elements. Default 100k.
    pub table_elements: usize,
    /// Payload bytes lowered into the guest per `on-apply` call: a larger batch is split. This
    /// bounds how much of the guest's memory the batch itself occupies, so that an entry's
    /// memory headroom depends little on its neighbours. Default 1 MiB.
    pub max_batch_bytes: usize,
    /// Wasm stack per call, in bytes: deep recursion fails with a stack-overflow trap.
    /// Engine-wide (see [`WasmEngine::new`](super::WasmEngine::new)). Default 512 KiB.
    pub max_wasm_stack: usize,
}

/// Bumped whenever the host changes what a guest may do or how a limit is counted (2: the
/// memory cap covers all of a machine's memories, `end-batch` once per call, no timers; 3:
/// writes to stdout and stderr within `check-write`, `get-random-bytes` up to 4 KiB, a lift
/// bounded by the memory cap; 4: an entry refused memory beside others that answers anyway is
/// applied again alone, a recovery's replay halves a call failing outside any entry): members
/// applying under other rules could reach different results from the same log.
const APPLY_RULES: u32 = 4;

impl Limits {
    /// Every limit, in one canonical line: peers compare it at the hello. With the rules they
    /// are applied under, and the architecture, since the stack limit counts native bytes.
    pub fn describe(&self) -> String {
        format!(
            "apply rules {APPLY_RULES} on {}, fuel per entry {}, fuel per snapshot {}, memory {} \
             bytes, table {} elements, batch {} bytes, stack {} bytes",
            std::env::consts::ARCH,
            self.fuel_per_entry,
            self.fuel_per_snapshot,
            self.memory_bytes,
            self.table_elements,
            self.max_batch_bytes,
            self.max_wasm_stack
        )
    }

    /// The limits an operator sets, as the flags that set them: what a node's log records at
    /// its first start (the others change only with a release, whose notes say so).
    pub fn flags(&self) -> String {
        format!(
            "--fuel-per-task {} --memory-mib {}",
            self.fuel_per_entry,
            self.memory_bytes >> 20
        )
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            fuel_per_entry: 100_000_000,
            fuel_per_snapshot: 20_000_000_000,
            memory_bytes: 64 << 20,
            table_elements: 100_000,
            max_batch_bytes: 1 << 20,
            max_wasm_stack: 512 << 10,
        }
    }
}
