//! The wasmtime `Engine`, configured so that the same module and input compute the same thing
//! on every replica.

use wasmtime::{Config, Engine, OptLevel, Strategy};

use super::Limits;

/// A wasmtime engine configured for deterministic replicated execution. Cheap to clone.
#[derive(Clone)]
pub struct WasmEngine {
    engine: Engine,
    limits: Limits,
}

impl WasmEngine {
    /// Builds the engine. `limits` become the default for every machine of this engine.
    pub fn new(limits: Limits) -> anyhow::Result<Self> {
        let mut config = Config::new();
        // Cranelift, never Winch (RUSTSEC-2026-0095 was a Winch sandbox escape).
        config.strategy(Strategy::Cranelift);
        config.cranelift_opt_level(OptLevel::Speed);
        config.wasm_component_model(true);
        // Deterministic metering: runaway guests stop after the same instruction everywhere.
        config.consume_fuel(true);
        // Floating point and SIMD that give the same bits on every CPU.
        config.cranelift_nan_canonicalization(true);
        config.relaxed_simd_deterministic(true);
        // No shared memory, no threads: this build of wasmtime leaves out the `threads`
        // feature altogether, so `wasm_threads` is off and cannot be turned on.
        config.max_wasm_stack(limits.max_wasm_stack);
        config.parallel_compilation(true);
        // `perf` can name guest functions when asked (writes /tmp/perf-<pid>.map).
        if std::env::var_os("LOCKSTEP_WASM_PERFMAP").is_some() {
            config.profiler(wasmtime::ProfilingStrategy::PerfMap);
        }
        let engine = Engine::new(&config).map_err(|e| anyhow::anyhow!("{e:#}"))?;
        Ok(WasmEngine { engine, limits })
    }

    /// The underlying wasmtime engine.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The limits machines of this engine run with.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// What members compare at the hello before applying one log: every limit, and the
    /// engine's key (the wasmtime release and the code it compiles for this CPU: a stack
    /// overflow counts native bytes, and a release may price fuel anew).
    pub fn apply_identity(&self) -> String {
        format!(
            "{}, engine {}",
            self.limits.describe(),
            self.compatibility_key()
        )
    }

    /// A stable hex name for this engine's artifact compatibility (wasmtime version, target,
    /// and every setting that changes compiled code).
    pub(crate) fn compatibility_key(&self) -> String {
        use sha2::Digest;
        use std::hash::Hash;
        let mut hasher = Sha256Hasher(sha2::Sha256::new());
        self.engine
            .precompile_compatibility_hash()
            .hash(&mut hasher);
        hex::encode(&hasher.0.finalize()[..16])
    }
}

/// Feeds `Hash` output into sha256, so the key does not depend on std's unstable `SipHash`.
struct Sha256Hasher(sha2::Sha256);

impl std::hash::Hasher for Sha256Hasher {
    fn finish(&self) -> u64 {
        0 // Unused: the digest is read from the inner state.
    }

    fn write(&mut self, bytes: &[u8]) {
        sha2::Digest::update(&mut self.0, bytes);
    }
}
