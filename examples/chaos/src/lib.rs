//! `chaos`: a deliberately hostile machine for the host's isolation tests.
//!
//! `{"trap": true}` panics, `{"spin": true}` loops forever, `{"alloc_mb": n}` allocates and
//! touches n MiB, `{"try_alloc_mb": n}` tries to (and reports whether it could, as a guest that
//! survives a refused allocation; a refusal is counted in the state), `{"trap_if_refused": true}`
//! traps if one ever was, `{"recurse": n}` recurses n deep, `{"clock": true}` / `{"random": true}`
//! report what std's clock and random source return, `{"sleep_ms": n}` tries to sleep,
//! `{"add": n}` counts, `{"ignore_begin_batch": true}` makes it call `begin-entry` for every
//! entry from then on (as modules built before `begin-batch` did), `{"log": n}` prints n lines
//! to stderr, `{"refuel": n}` calls the host's `end-batch` n times, working in between (a guest
//! trying to refill its fuel), `{"poison": true}` makes every later snapshot unrestorable,
//! `{"hash_order": true}` reports the iteration order of a fresh std `HashMap` (which follows
//! how many the instance created before), `{"write_kb": n}` writes n KiB to stdout in one raw `output-stream.write` (ignoring
//! `check-write`), `{"print_kb": n}` prints n KiB with one `print!`, `{"random_bytes": n}` asks `get-random-bytes` for n bytes.
//! Queries return the counter, except the query `trap`, which panics.

use std::hint::black_box;
use std::time::{SystemTime, UNIX_EPOCH};

use lockstep_guest::{Context, StateMachine};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

#[derive(Default, Serialize, Deserialize)]
#[serde(try_from = "State")]
pub struct Chaos {
    value: i64,
    /// Set by `{"poison": true}`: a snapshot taken from then on cannot be restored.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    poisoned: bool,
    /// `try_alloc_mb` commands that were refused.
    #[serde(default, skip_serializing_if = "is_zero")]
    refusals: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// What a snapshot holds; restoring a poisoned one fails.
#[derive(Deserialize)]
struct State {
    value: i64,
    #[serde(default)]
    poisoned: bool,
    #[serde(default)]
    refusals: u64,
}

impl TryFrom<State> for Chaos {
    type Error = &'static str;

    fn try_from(s: State) -> Result<Self, Self::Error> {
        if s.poisoned {
            return Err("chaos: this snapshot was poisoned");
        }
        Ok(Chaos {
            value: s.value,
            poisoned: false,
            refusals: s.refusals,
        })
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Command {
    Trap(bool),
    Spin(bool),
    AllocMb(u64),
    TryAllocMb(u64),
    TrapIfRefused(bool),
    Recurse(u64),
    Clock(bool),
    Random(bool),
    Add(i64),
    SleepMs(u64),
    /// Behave like a module built before `begin-batch`: meter every entry, always.
    IgnoreBeginBatch(bool),
    Log(u64),
    Refuel(u64),
    Poison(bool),
    HashOrder(bool),
    WriteKb(u32),
    PrintKb(u32),
    RandomBytes(u64),
}

/// WASI as the component sees it, without bindings: std imports these very functions.
mod raw {
    #[link(wasm_import_module = "wasi:cli/stdout@0.2.0")]
    unsafe extern "C" {
        #[link_name = "get-stdout"]
        pub fn get_stdout() -> i32;
    }

    #[link(wasm_import_module = "wasi:io/streams@0.2.0")]
    unsafe extern "C" {
        /// `write: func(contents: list<u8>) -> result<_, stream-error>`, the result through
        /// a return area.
        #[link_name = "[method]output-stream.write"]
        pub fn write(stream: i32, ptr: *const u8, len: usize, ret: *mut u8);
    }

    #[link(wasm_import_module = "wasi:random/random@0.2.0")]
    unsafe extern "C" {
        /// `get-random-bytes: func(len: u64) -> list<u8>`, the list through a return area.
        #[link_name = "get-random-bytes"]
        pub fn get_random_bytes(len: u64, ret: *mut usize);
    }
}

/// Not a loop in disguise: the work after the call keeps it from becoming a tail call.
#[inline(never)]
fn recurse(depth: u64) -> u64 {
    if depth == 0 {
        return 0;
    }
    let below = recurse(black_box(depth - 1));
    black_box(below + 1)
}

impl StateMachine for Chaos {
    type Command = Command;
    type Output = Value;
    /// Whether to trap: the query `trap` does, any other answers the value.
    type Query = bool;
    type Answer = Value;

    fn apply(&mut self, _ctx: &mut Context, command: Command) -> Result<Value, String> {
        Ok(match command {
            Command::Trap(_) => panic!("chaos: trap requested"),
            Command::Spin(_) => {
                let mut n = 0u64;
                loop {
                    n = black_box(n.wrapping_add(1));
                }
            }
            Command::AllocMb(mb) => {
                let len = usize::try_from(mb << 20).map_err(|_| "too large")?;
                let mut block = vec![0u8; len];
                // Touch every page so the memory is really used.
                for i in (0..block.len()).step_by(4096) {
                    block[i] = 1;
                }
                let sum: u64 = black_box(&block)
                    .iter()
                    .step_by(4096)
                    .map(|&b| b as u64)
                    .sum();
                json!({ "allocated_mb": mb, "pages": sum })
            }
            Command::TryAllocMb(mb) => {
                let len = usize::try_from(mb << 20).map_err(|_| "too large")?;
                let mut block: Vec<u8> = Vec::new();
                let ok = block.try_reserve_exact(len).is_ok();
                if ok {
                    block.resize(len, 1);
                } else {
                    self.refusals += 1;
                }
                json!({ "try_alloc_mb": mb, "ok": black_box(&block).len() == len })
            }
            Command::TrapIfRefused(_) if self.refusals > 0 => {
                panic!("chaos: {} allocations were refused", self.refusals)
            }
            Command::TrapIfRefused(_) => json!({ "refusals": 0 }),
            Command::Recurse(depth) => json!({ "depth": recurse(depth) }),
            Command::Clock(_) => {
                let since_epoch = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .unwrap_or_default();
                json!({ "unix_ms": since_epoch.as_millis() as u64 })
            }
            Command::Random(_) => {
                let mut bytes = [0u8; 16];
                getrandom::fill(&mut bytes).map_err(|e| e.to_string())?;
                json!({ "random": hex(&bytes) })
            }
            Command::SleepMs(ms) => {
                std::thread::sleep(std::time::Duration::from_millis(ms));
                json!({ "slept_ms": ms })
            }
            Command::Add(n) => {
                self.value = self.value.wrapping_add(n);
                json!({ "value": self.value })
            }
            Command::IgnoreBeginBatch(_) => {
                lockstep_guest::runtime::emulate_sdk_without_begin_batch();
                json!({ "metering": "every entry" })
            }
            Command::Log(lines) => {
                for i in 0..lines {
                    eprintln!("chaos: log line {i:>6} {}", "-".repeat(80));
                }
                json!({ "logged": lines })
            }
            Command::Poison(_) => {
                self.poisoned = true;
                json!({ "poisoned": true })
            }
            Command::HashOrder(_) => {
                let map: std::collections::HashMap<u32, ()> = (0..16).map(|k| (k, ())).collect();
                json!({ "order": map.keys().copied().collect::<Vec<_>>() })
            }
            Command::WriteKb(kb) => {
                let bytes = vec![b'x'; kb as usize * 1024];
                let mut ret = [0u8; 12];
                // SAFETY: the canonical ABI of the import: a list as pointer and length, and
                // a 12-byte return area for `result<_, stream-error>`.
                let failed = unsafe {
                    raw::write(
                        raw::get_stdout(),
                        bytes.as_ptr(),
                        bytes.len(),
                        ret.as_mut_ptr(),
                    );
                    ret[0] != 0
                };
                json!({ "written_kb": kb, "failed": failed })
            }
            Command::PrintKb(kb) => {
                print!("{}", "x".repeat(kb as usize * 1024));
                json!({ "printed_kb": kb })
            }
            Command::RandomBytes(len) => {
                let mut ret = [0usize; 2];
                // SAFETY: the canonical ABI of the import: the list comes back as pointer and
                // length in the return area, allocated through our `cabi_realloc`.
                let got = unsafe {
                    raw::get_random_bytes(len, ret.as_mut_ptr());
                    Vec::from_raw_parts(ret[0] as *mut u8, ret[1], ret[1])
                };
                json!({ "random_bytes": got.len() })
            }
            Command::Refuel(calls) => {
                let mut n = 0u64;
                for _ in 0..calls {
                    for _ in 0..1_000 {
                        n = black_box(n.wrapping_add(1));
                    }
                    lockstep_guest::bindings::lockstep::machine::host::end_batch();
                }
                json!({ "refueled": calls, "work": n })
            }
        })
    }

    fn query(&self, trap: bool) -> Result<Value, String> {
        if trap {
            panic!("chaos: query trap requested");
        }
        Ok(json!({ "value": self.value }))
    }

    fn decode_query(request: &[u8]) -> Result<bool, String> {
        Ok(request == b"trap")
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

lockstep_guest::export!(Chaos);
