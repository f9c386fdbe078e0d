//! Builds the example guests to wasm32-wasip2 so that `cargo test` needs no manual step (the
//! way wasmtime's test-programs artifacts crate does it). The guests get their own target
//! directory, `<target>/guests/<checkout>`, so this nested cargo never waits on the outer one's
//! lock, keeps its incremental state across test runs, and two checkouts sharing one target
//! dir never overwrite each other's `.wasm`.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

const GUESTS: [&str; 3] = ["counter", "kv", "chaos"];

fn main() {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let workspace = manifest_dir
        .parent()
        .expect("tests/ sits in the workspace")
        .to_path_buf();
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("set by cargo"));
    let checkout: String = workspace
        .to_string_lossy()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    // OUT_DIR is <target>/<profile>/build/<pkg>-<hash>/out.
    let target_dir = out_dir
        .ancestors()
        .nth(4)
        .expect("OUT_DIR layout")
        .join("guests")
        .join(checkout);

    // Every source file, one by one: the guests are rebuilt whenever one of them changes.
    println!(
        "cargo:rerun-if-changed={}",
        workspace.join("Cargo.lock").display()
    );
    for dir in ["wit", "guest-sdk", "examples"] {
        watch(&workspace.join(dir));
    }

    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut build = Command::new(cargo);
    build
        .current_dir(&workspace)
        .args(["build", "--release", "--target", "wasm32-wasip2"])
        .arg("--target-dir")
        .arg(&target_dir);
    for guest in GUESTS {
        build.args(["-p", guest]);
    }
    // Don't let the outer build's settings leak into the guests' (flags for the host target,
    // its target dir, the debug info the workspace's release profile asks for).
    for var in [
        "CARGO_ENCODED_RUSTFLAGS",
        "RUSTFLAGS",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
    ] {
        build.env_remove(var);
    }
    build.env("CARGO_PROFILE_RELEASE_DEBUG", "false");
    // What the SDK docs tell module authors to put in their release profile: whole-program
    // optimization through serde and the SDK makes `on-apply` about a quarter faster.
    build.env("CARGO_PROFILE_RELEASE_LTO", "true");
    build.env("CARGO_PROFILE_RELEASE_CODEGEN_UNITS", "1");
    let status = build
        .status()
        .expect("cannot run cargo to build the guests");
    assert!(
        status.success(),
        "building the guests failed (is the target installed? `rustup target add wasm32-wasip2`)"
    );

    let release = target_dir.join("wasm32-wasip2").join("release");
    let mut consts = String::new();
    for guest in GUESTS {
        let wasm = release.join(format!("{guest}.wasm"));
        assert!(wasm.exists(), "{} was not built", wasm.display());
        consts.push_str(&format!(
            "/// Path of the `{guest}` example built to wasm32-wasip2.\npub const {}: &str = {:?};\n",
            guest.to_uppercase(),
            path_str(&wasm)
        ));
    }
    std::fs::write(out_dir.join("guests.rs"), consts).expect("write guests.rs");
}

fn watch(dir: &Path) {
    println!("cargo:rerun-if-changed={}", dir.display());
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            if path.file_name().is_some_and(|n| n != "target") {
                watch(&path);
            }
        } else {
            println!("cargo:rerun-if-changed={}", path.display());
        }
    }
}

fn path_str(path: &Path) -> String {
    path.to_str().expect("UTF-8 target path").to_string()
}
