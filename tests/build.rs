//! Builds the example plugins as wasm32-wasip2 components, so tests never depend on a
//! manual build step, and writes their paths to `$OUT_DIR/plugins.rs` (included by
//! `src/plugins.rs`).
//!
//! The plugins are built by a nested `cargo build` with its own target directory: reusing
//! the outer one would wait forever on the lock the outer build holds. That directory is
//! `$SLUICE_WASM_TARGET_DIR` if set, else `$CARGO_TARGET_DIR/../wasm-target` (shared with
//! manual `CARGO_TARGET_DIR=.../wasm-target cargo build --target wasm32-wasip2` runs) when
//! that is an absolute path, else `wasm-target` inside the outer profile directory
//! (`target/release/wasm-target`).

use std::env;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

const WASM_TARGET: &str = "wasm32-wasip2";

/// (constant name, package, crate directory) of every plugin to build.
const PLUGINS: &[(&str, &str, &str)] = &[
    ("ENRICH_WASM", "sluice-plugin-enrich", "plugins/rust-enrich"),
    (
        "HOSTILE_WASM",
        "sluice-plugin-test-hostile",
        "plugins/test-hostile",
    ),
];

fn main() {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let workspace = manifest_dir
        .parent()
        .expect("tests/ sits inside the workspace")
        .to_path_buf();
    let out_dir = PathBuf::from(env::var("OUT_DIR").expect("set by cargo"));

    for (_, _, dir) in PLUGINS {
        rerun_if_changed(&workspace.join(dir).join("src"));
        rerun_if_changed(&workspace.join(dir).join("Cargo.toml"));
    }
    for path in [
        "guest-sdk/src",
        "guest-sdk/Cargo.toml",
        "wit",
        "Cargo.toml",
        "Cargo.lock",
    ] {
        rerun_if_changed(&workspace.join(path));
    }
    println!("cargo:rerun-if-env-changed=SLUICE_WASM_TARGET_DIR");
    println!("cargo:rerun-if-env-changed=CARGO_TARGET_DIR");

    let rustc = env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    check_wasm_target(&rustc);

    let target_dir = wasm_target_dir(&out_dir);
    let packages: Vec<&str> = PLUGINS.iter().map(|(_, p, _)| *p).collect();
    cargo_build_wasm(&workspace, &rustc, &target_dir, &packages, None);
    // The enrich plugin's second version (`v2` feature: one more column), for hot-swap tests.
    // Its own target directory: the same file name must not overwrite the first version.
    let v2_dir = target_dir.join("enrich-v2");
    cargo_build_wasm(
        &workspace,
        &rustc,
        &v2_dir,
        &["sluice-plugin-enrich"],
        Some("sluice-plugin-enrich/v2"),
    );

    // Copy each component next to the generated code: tests then read a file that a later
    // build of the shared target directory cannot change under them.
    let mut consts = String::new();
    for (name, package, dir) in PLUGINS {
        let file = format!("{}.wasm", package.replace('-', "_"));
        let built = target_dir.join(WASM_TARGET).join("release").join(&file);
        let copy = out_dir.join(&file);
        fs::copy(&built, &copy).unwrap_or_else(|e| {
            panic!("cannot copy {} to {}: {e}", built.display(), copy.display())
        });
        let _ = writeln!(
            consts,
            "/// The `{package}` component ({dir}), built for {WASM_TARGET}.\n\
             pub const {name}: &str = {:?};",
            copy.display().to_string()
        );
    }
    let built = v2_dir
        .join(WASM_TARGET)
        .join("release")
        .join("sluice_plugin_enrich.wasm");
    let copy = out_dir.join("sluice_plugin_enrich_v2.wasm");
    fs::copy(&built, &copy)
        .unwrap_or_else(|e| panic!("cannot copy {} to {}: {e}", built.display(), copy.display()));
    let _ = writeln!(
        consts,
        "/// The enrich plugin built with its `v2` feature (adds `risk_level`; default\n\
         /// `plugin_version` \"v2\"): the second version in hot-swap tests.\n\
         pub const ENRICH_V2_WASM: &str = {:?};",
        copy.display().to_string()
    );
    fs::write(out_dir.join("plugins.rs"), consts).expect("OUT_DIR is writable");
}

/// `cargo build --release --target wasm32-wasip2` of `packages` into `target_dir`.
fn cargo_build_wasm(
    workspace: &Path,
    rustc: &str,
    target_dir: &Path,
    packages: &[&str],
    features: Option<&str>,
) {
    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.arg("build")
        .arg("--release")
        .args(["--target", WASM_TARGET])
        .arg("--manifest-path")
        .arg(workspace.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(target_dir);
    for package in packages {
        cmd.args(["-p", package]);
    }
    if let Some(f) = features {
        cmd.args(["--features", f]);
    }
    // Host-only settings of the outer build must not leak into the wasm build: clippy's
    // wrapper (`cargo clippy` sets it), host rustflags, a forced target.
    for var in [
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_ENCODED_RUSTFLAGS",
        "RUSTFLAGS",
        "CARGO_BUILD_TARGET",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET_DIR",
    ] {
        cmd.env_remove(var);
    }
    cmd.env("RUSTC", rustc);

    let output = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run cargo to build the test plugins: {e}"));
    if !output.status.success() {
        panic!(
            "building the test plugins for {WASM_TARGET} failed ({}):\n{}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr),
        );
    }
}

fn rerun_if_changed(path: &Path) {
    println!("cargo:rerun-if-changed={}", path.display());
}

/// Fails the build with the install command when the target's standard library is missing.
fn check_wasm_target(rustc: &str) {
    let libdir = Command::new(rustc)
        .args(["--print", "target-libdir", "--target", WASM_TARGET])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
    let installed = libdir
        .and_then(|dir| fs::read_dir(dir).ok())
        .is_some_and(|mut entries| {
            entries.any(|e| e.is_ok_and(|e| e.file_name().to_string_lossy().starts_with("libstd-")))
        });
    if !installed {
        panic!(
            "the {WASM_TARGET} Rust target is not installed, so the test plugins cannot be \
             built. Install it with:\n\n    rustup target add {WASM_TARGET}\n"
        );
    }
}

fn wasm_target_dir(out_dir: &Path) -> PathBuf {
    if let Some(dir) = env::var_os("SLUICE_WASM_TARGET_DIR") {
        return PathBuf::from(dir);
    }
    // Only an absolute CARGO_TARGET_DIR: a relative one is relative to a directory we
    // don't know.
    if let Some(parent) = env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .filter(|dir| dir.is_absolute())
        .and_then(|dir| dir.parent().map(Path::to_path_buf))
    {
        return parent.join("wasm-target");
    }
    // OUT_DIR is <target>/[<triple>/]<profile>/build/<pkg>-<hash>/out. Cargo locks each
    // <profile> directory, not the tree, so a target dir nested in it is independent.
    let build = out_dir
        .ancestors()
        .find(|p| p.file_name().is_some_and(|n| n == "build"))
        .expect("OUT_DIR lies under a `build` directory");
    build
        .parent()
        .expect("`build` sits in a profile directory")
        .join("wasm-target")
}
