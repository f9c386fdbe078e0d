//! Modules by digest: validated once, stored once, compiled once per engine configuration.
//!
//! Layout under the registry's directory:
//!
//! ```text
//! modules/<sha256>.wasm                  the component as deployed
//! artifacts/<engine-key>/<sha256>.cwasm  wasmtime's precompiled form + a sha256 trailer
//! ```
//!
//! `engine-key` hashes `Engine::precompile_compatibility_hash()`: a wasmtime upgrade or a
//! changed engine setting gets a fresh directory instead of artifacts it would reject.

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use sha2::{Digest, Sha256};
use wasmtime::Store;
use wasmtime::component::{Component, InstancePre, Linker};

use super::host::{HostState, linker};
use super::machine::Exports;
use super::{ModuleError, WasmEngine};

/// What the registry knows about a stored module.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModuleInfo {
    /// Lowercase hex sha256 of the component's bytes: the module's name everywhere.
    pub digest: String,
    /// Size of the component in bytes.
    pub size: usize,
}

/// A module ready to instantiate.
pub(crate) struct LoadedModule {
    pub digest: String,
    pub pre: InstancePre<HostState>,
}

/// Validated components stored by digest, with their compiled artifacts. Share it with `Arc`:
/// every method takes `&self`.
pub struct ModuleRegistry {
    engine: WasmEngine,
    linker: Linker<HostState>,
    modules_dir: PathBuf,
    artifacts_dir: PathBuf,
    loaded: Mutex<HashMap<String, Arc<LoadedModule>>>,
    compilations: AtomicU64,
    artifact_hits: AtomicU64,
}

impl ModuleRegistry {
    /// Opens (creating if needed) a registry rooted at `dir`.
    pub fn open(engine: &WasmEngine, dir: &Path) -> Result<Self, ModuleError> {
        let modules_dir = dir.join("modules");
        let artifacts_dir = dir.join("artifacts").join(engine.compatibility_key());
        for d in [&modules_dir, &artifacts_dir] {
            fs::create_dir_all(d).map_err(|e| storage(d, e))?;
        }
        let linker = linker(engine.engine())
            .map_err(|e| ModuleError::Storage(format!("cannot build the linker: {e:#}")))?;
        Ok(ModuleRegistry {
            engine: engine.clone(),
            linker,
            modules_dir,
            artifacts_dir,
            loaded: Mutex::new(HashMap::new()),
            compilations: AtomicU64::new(0),
            artifact_hits: AtomicU64::new(0),
        })
    }

    /// The engine this registry compiles for.
    pub fn engine(&self) -> &WasmEngine {
        &self.engine
    }

    /// Validates `bytes` as a component of world `lockstep:machine/state-machine` and stores it
    /// (once: adding the same bytes again is a cheap no-op returning the same digest).
    pub fn add(&self, bytes: &[u8]) -> Result<ModuleInfo, ModuleError> {
        let digest = hex::encode(Sha256::digest(bytes));
        let info = ModuleInfo {
            digest: digest.clone(),
            size: bytes.len(),
        };
        // Already stored (validated then): at most a load from the artifact.
        if self.module_path(&digest).exists() && self.loaded(&digest).is_ok() {
            return Ok(info);
        }
        check_header(bytes)?;
        let component = Component::new(self.engine.engine(), bytes)
            .map_err(|e| ModuleError::Invalid(format!("{e:#}")))?;
        let module = self.prepare(&digest, component.clone())?;
        self.check_world(&module)?;
        write_atomically(&self.module_path(&digest), bytes)?;
        self.compilations.fetch_add(1, Ordering::Relaxed);
        self.cache_artifact(&digest, &component);
        self.remember(module);
        Ok(info)
    }

    /// Whether a module with this digest is stored.
    pub fn contains(&self, digest: &str) -> bool {
        valid_digest(digest) && self.module_path(digest).exists()
    }

    /// The stored component bytes (to ship a module to a peer, for instance).
    pub fn bytes(&self, digest: &str) -> Result<Vec<u8>, ModuleError> {
        if !valid_digest(digest) {
            return Err(ModuleError::NotFound(digest.to_string()));
        }
        read_module(&self.module_path(digest), digest)
    }

    /// Makes a stored module ready to instantiate: from memory, else from its precompiled
    /// artifact, else by compiling it (and writing the artifact for next time).
    pub(crate) fn loaded(&self, digest: &str) -> Result<Arc<LoadedModule>, ModuleError> {
        if !valid_digest(digest) {
            return Err(ModuleError::NotFound(digest.to_string()));
        }
        if let Some(module) = self.cached(digest) {
            return Ok(module);
        }
        let component = match self.read_artifact(digest) {
            Some(component) => {
                self.artifact_hits.fetch_add(1, Ordering::Relaxed);
                component
            }
            None => {
                let bytes = read_module(&self.module_path(digest), digest)?;
                let component = Component::new(self.engine.engine(), &bytes)
                    .map_err(|e| ModuleError::Invalid(format!("{e:#}")))?;
                self.compilations.fetch_add(1, Ordering::Relaxed);
                self.cache_artifact(digest, &component);
                component
            }
        };
        let module = self.prepare(digest, component)?;
        Ok(self.remember(module))
    }

    /// Makes a stored module ready to instantiate (memory, else artifact, else compile), so
    /// that the next `Machine::new` is fast.
    pub fn load(&self, digest: &str) -> Result<ModuleInfo, ModuleError> {
        self.loaded(digest)?;
        let size = fs::metadata(self.module_path(digest)).map_or(0, |m| m.len() as usize);
        Ok(ModuleInfo {
            digest: digest.to_string(),
            size,
        })
    }

    /// How many times a component was compiled by Cranelift.
    pub fn compilations(&self) -> u64 {
        self.compilations.load(Ordering::Relaxed)
    }

    /// How many loads were served from a precompiled artifact on disk.
    pub fn artifact_hits(&self) -> u64 {
        self.artifact_hits.load(Ordering::Relaxed)
    }

    fn cached(&self, digest: &str) -> Option<Arc<LoadedModule>> {
        self.loaded
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(digest)
            .cloned()
    }

    /// Keeps `module` in memory, first letting go of those nobody holds any more (no machine
    /// runs them: deleted, upgraded away, or refused after `add`). A cluster upgraded daily
    /// would otherwise keep every version's machine code for good; a module let go reloads from
    /// its artifact if it is wanted again.
    fn remember(&self, module: LoadedModule) -> Arc<LoadedModule> {
        let mut loaded = self.loaded.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(known) = loaded.get(&module.digest) {
            return known.clone();
        }
        loaded.retain(|_, m| Arc::strong_count(m) > 1);
        let module = Arc::new(module);
        loaded.insert(module.digest.clone(), module.clone());
        module
    }

    fn prepare(&self, digest: &str, component: Component) -> Result<LoadedModule, ModuleError> {
        let pre = self.linker.instantiate_pre(&component).map_err(|e| {
            ModuleError::WrongWorld(format!(
                "it imports something the host does not provide: {e:#}"
            ))
        })?;
        Ok(LoadedModule {
            digest: digest.to_string(),
            pre,
        })
    }

    /// Checks the exports: names first (the clearest message), then types, on a trial instance.
    fn check_world(&self, module: &LoadedModule) -> Result<(), ModuleError> {
        let engine = self.engine.engine();
        let ty = module.pre.component().component_type();
        let exported: Vec<&str> = ty.exports(engine).map(|(name, _)| name).collect();
        let missing: Vec<&str> = Exports::NAMES
            .iter()
            .copied()
            .filter(|n| !exported.contains(n))
            .collect();
        if !missing.is_empty() {
            return Err(ModuleError::WrongWorld(format!(
                "missing export{} {} (it exports: {})",
                if missing.len() > 1 { "s" } else { "" },
                missing
                    .iter()
                    .map(|n| format!("`{n}`"))
                    .collect::<Vec<_>>()
                    .join(", "),
                if exported.is_empty() {
                    "nothing".to_string()
                } else {
                    exported.join(", ")
                },
            )));
        }
        let mut store = Store::new(engine, HostState::new(self.engine.limits()));
        super::machine::prime_store(&mut store, self.engine.limits());
        let instance = module.pre.instantiate(&mut store).map_err(|e| {
            ModuleError::Invalid(format!("the component fails to instantiate: {e:#}"))
        })?;
        Exports::typecheck(&mut store, &instance).map_err(ModuleError::WrongWorld)?;
        Ok(())
    }

    fn module_path(&self, digest: &str) -> PathBuf {
        self.modules_dir.join(format!("{digest}.wasm"))
    }

    fn artifact_path(&self, digest: &str) -> PathBuf {
        self.artifacts_dir.join(format!("{digest}.cwasm"))
    }

    /// The artifact, if present and intact. A damaged one is ignored (and later rewritten).
    fn read_artifact(&self, digest: &str) -> Option<Component> {
        let path = self.artifact_path(digest);
        let file = fs::read(&path).ok()?;
        let split = file.len().checked_sub(32)?;
        let (artifact, trailer) = file.split_at(split);
        if artifact_checksum(digest, artifact).as_slice() != trailer {
            tracing::warn!(path = %path.display(), "ignoring a damaged precompiled artifact");
            return None;
        }
        // SAFETY: `deserialize` trusts its input to be wasmtime's own output. The file is in
        // the node's private directory, was written by `write_artifact` atomically, and its
        // checksum (over this digest and the bytes) just matched, so these are exactly the bytes
        // `serialize` produced for this module.
        match unsafe { Component::deserialize(self.engine.engine(), artifact) } {
            Ok(component) => Some(component),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "ignoring an unusable artifact");
                None
            }
        }
    }

    /// The artifact only saves a compilation at the next start: failing to write it (a full
    /// disk) costs that, not the deploy, and must not stop the node.
    fn cache_artifact(&self, digest: &str, component: &Component) {
        if let Err(e) = self.write_artifact(digest, component) {
            tracing::warn!(digest, error = %e, "could not store the precompiled artifact");
        }
    }

    fn write_artifact(&self, digest: &str, component: &Component) -> Result<(), ModuleError> {
        let mut artifact = component
            .serialize()
            .map_err(|e| ModuleError::Storage(format!("cannot serialize the artifact: {e:#}")))?;
        let checksum = artifact_checksum(digest, &artifact);
        artifact.extend_from_slice(&checksum);
        write_atomically(&self.artifact_path(digest), &artifact)
    }
}

/// An artifact's trailer: covers the module's digest too, so an artifact stored (or copied)
/// under another module's name is refused rather than run as that module.
fn artifact_checksum(digest: &str, artifact: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(digest.as_bytes());
    h.update(artifact);
    h.finalize().into()
}

/// Tells random bytes and core modules from components before asking Cranelift anything.
fn check_header(bytes: &[u8]) -> Result<(), ModuleError> {
    if bytes.len() < 8 || &bytes[..4] != b"\0asm" {
        return Err(ModuleError::NotWasm);
    }
    // Bytes 4..8: a 16-bit version then a 16-bit layer; layer 0 is a core module, 1 a component.
    match u16::from_le_bytes([bytes[6], bytes[7]]) {
        0 => Err(ModuleError::NotAComponent),
        1 => Ok(()),
        layer => Err(ModuleError::Invalid(format!(
            "unknown WebAssembly layer {layer}"
        ))),
    }
}

fn valid_digest(digest: &str) -> bool {
    digest.len() == 64
        && digest
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn read_module(path: &Path, digest: &str) -> Result<Vec<u8>, ModuleError> {
    let bytes = fs::read(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => ModuleError::NotFound(digest.to_string()),
        _ => storage(path, e),
    })?;
    if hex::encode(Sha256::digest(&bytes)) != digest {
        return Err(ModuleError::Storage(format!(
            "{} is damaged (digest mismatch)",
            path.display()
        )));
    }
    Ok(bytes)
}

/// Temp file, fsync, rename, fsync the directory: a crash leaves the old file or the new one.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), ModuleError> {
    let dir = path
        .parent()
        .ok_or_else(|| ModuleError::Storage(format!("{}: no parent", path.display())))?;
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let unique = NEXT.fetch_add(1, Ordering::Relaxed);
    let tmp = path.with_extension(format!("tmp.{}.{unique}", std::process::id()));
    let write = || -> std::io::Result<()> {
        let mut file = fs::File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        fs::rename(&tmp, path)?;
        fs::File::open(dir)?.sync_all()
    };
    write().map_err(|e| {
        let _ = fs::remove_file(&tmp);
        storage(path, e)
    })
}

fn storage(path: &Path, e: std::io::Error) -> ModuleError {
    ModuleError::Storage(format!("{}: {e}", path.display()))
}
