//! `sluice plugin new|build|test`, through the real `sluice` binary (build it first:
//! `cargo build --release -p sluice`; `scripts/test.sh` does).
//!
//! - `embedded_templates_match_the_folders`: the templates compiled into the binary are the
//!   files of `plugins/templates/<lang>/`, `wit/plugin.wit` and `plugins/toolchains.sh`;
//! - `new_every_language`, `new_finds_the_sdk`, `new_refuses_bad_input`: project creation;
//! - `build_and_test_<lang>`: a new project builds as it is (its toolchain comes from
//!   `toolchains.sh`, cached under `${SLUICE_HOME:-~/.cache/sluice}/toolchains`), its own
//!   fixtures pass, and edited fixtures fail with a diff and a non-zero exit. Projects live in
//!   a stable folder whose `target/` is kept between runs, so unchanged sources do not rebuild;
//! - `test_runs_the_conformance_fixtures`, `test_isolates_traps`: `sluice plugin test` on the
//!   conformance fixtures and on a plugin that traps.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use anyhow::{ensure, Context, Result};

use sluice::devtools::templates::{PLUGIN_WIT, TOOLCHAINS_SH};
use sluice::devtools::Lang;
use sluice_tests::plugins::{ENRICH_WASM, HOSTILE_WASM};

fn repo_root() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

/// Runs `sluice <args>`; returns (success, stdout, stderr).
fn sluice(args: &[&str]) -> Result<(bool, String, String)> {
    let out: Output = Command::new(sluice_tests::sluice::binary()?)
        .args(args)
        .env("SLUICE_LOG", "warn")
        .output()
        .context("running sluice")?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

fn path_str(p: &Path) -> Result<&str> {
    p.to_str().context("a UTF-8 path")
}

/// Files of a folder, relative to it, skipping what building in place leaves.
fn files_under(root: &Path) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let path = entry?.path();
            let name = path.file_name().unwrap_or_default();
            if name == "target" || name == "__pycache__" {
                continue;
            } else if path.is_dir() {
                stack.push(path);
            } else {
                files.push(path.strip_prefix(root)?.to_path_buf());
            }
        }
    }
    files.sort();
    Ok(files)
}

#[test]
fn embedded_templates_match_the_folders() -> Result<()> {
    let root = repo_root();
    for lang in Lang::ALL {
        let folder = root.join("plugins/templates").join(lang.as_str());
        let on_disk = files_under(&folder)?;
        let mut embedded: Vec<PathBuf> = lang.template().iter().map(|f| f.path.into()).collect();
        embedded.sort();
        ensure!(
            on_disk == embedded,
            "{lang}: {} has {on_disk:?}, the binary embeds {embedded:?}: update host/src/devtools/templates.rs",
            folder.display()
        );
        for f in lang.template() {
            ensure!(
                std::fs::read_to_string(folder.join(f.path))? == f.text,
                "{lang}/{}: embedded text differs",
                f.path
            );
        }
    }
    ensure!(std::fs::read_to_string(root.join("wit/plugin.wit"))? == PLUGIN_WIT);
    ensure!(std::fs::read_to_string(root.join("plugins/toolchains.sh"))? == TOOLCHAINS_SH);
    Ok(())
}

/// Checks a project made by `sluice plugin new`: every template file with the placeholders
/// filled in, the contract, the toolchain script (not for Rust), an executable `build.sh`.
fn check_project(lang: Lang, name: &str, dir: &Path) -> Result<()> {
    for f in lang.template() {
        let text = std::fs::read_to_string(dir.join(f.path))
            .with_context(|| format!("{lang}: {} missing", f.path))?;
        ensure!(
            !text.contains("{{"),
            "{lang}/{}: a placeholder is left",
            f.path
        );
        if f.text.contains("{{name}}") {
            ensure!(
                text.contains(name),
                "{lang}/{}: the name is missing",
                f.path
            );
        }
    }
    ensure!(std::fs::read_to_string(dir.join("wit/plugin.wit"))? == PLUGIN_WIT);
    ensure!(
        dir.join("toolchains.sh").is_file() == lang.uses_toolchains_sh(),
        "{lang}: toolchains.sh"
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.join("build.sh"))?
            .permissions()
            .mode();
        ensure!(mode & 0o111 != 0, "{lang}: build.sh is not executable");
    }
    Ok(())
}

/// The `path` of the `sluice-guest` dependency in a Rust project's Cargo.toml.
fn sdk_path(dir: &Path) -> Result<String> {
    let manifest = std::fs::read_to_string(dir.join("Cargo.toml"))?;
    let line = manifest
        .lines()
        .find(|l| l.starts_with("sluice-guest"))
        .context("no sluice-guest dependency")?;
    let start = line.find("path = \"").context("not a path dependency")? + 8;
    let end = line[start..].find('"').context("unterminated path")? + start;
    Ok(line[start..end].to_string())
}

#[test]
fn new_every_language() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    for lang in Lang::ALL {
        let name = format!("hello-{lang}");
        let dir = tmp.path().join(&name);
        let (ok, stdout, stderr) = sluice(&[
            "plugin",
            "new",
            "--lang",
            lang.as_str(),
            &name,
            "--dir",
            path_str(&dir)?,
        ])?;
        ensure!(ok, "{lang}: {stdout}{stderr}");
        ensure!(
            stdout.contains("sluice plugin build") && stdout.contains("fixtures/input.jsonl"),
            "{lang}: no next steps in\n{stdout}"
        );
        check_project(lang, &name, &dir)?;
        if lang == Lang::Rust {
            // The temp dir is outside any checkout: the SDK of the checkout the binary was
            // built from, by absolute path.
            let sdk = PathBuf::from(sdk_path(&dir)?);
            ensure!(
                sdk.is_absolute() && sdk.join("Cargo.toml").is_file(),
                "{sdk:?}"
            );
        }
    }
    Ok(())
}

#[test]
fn new_finds_the_sdk() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    // A project inside a checkout depends on its SDK by a relative path.
    let checkout = tmp.path().join("checkout");
    std::fs::create_dir_all(checkout.join("guest-sdk"))?;
    std::fs::create_dir_all(checkout.join("wit"))?;
    std::fs::write(
        checkout.join("guest-sdk/Cargo.toml"),
        "[package]\nname = \"sluice-guest\"\n",
    )?;
    std::fs::write(checkout.join("wit/plugin.wit"), PLUGIN_WIT)?;
    let inside = checkout.join("plugins/mine");
    let (ok, out, err) = sluice(&[
        "plugin",
        "new",
        "--lang",
        "rust",
        "mine",
        "--dir",
        path_str(&inside)?,
    ])?;
    ensure!(ok, "{out}{err}");
    ensure!(
        sdk_path(&inside)? == "../../guest-sdk",
        "{}",
        sdk_path(&inside)?
    );

    // --sdk wins, by absolute path.
    let elsewhere = tmp.path().join("elsewhere");
    let sdk = checkout.join("guest-sdk");
    let (ok, out, err) = sluice(&[
        "plugin",
        "new",
        "--lang",
        "rust",
        "other",
        "--dir",
        path_str(&elsewhere)?,
        "--sdk",
        path_str(&sdk)?,
    ])?;
    ensure!(ok, "{out}{err}");
    ensure!(PathBuf::from(sdk_path(&elsewhere)?) == sdk.canonicalize()?);
    Ok(())
}

#[test]
fn new_refuses_bad_input() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("p");
    let d = path_str(&dir)?;
    for (args, says) in [
        (
            vec!["plugin", "new", "--lang", "cobol", "x", "--dir", d],
            "cobol",
        ),
        (
            vec!["plugin", "new", "--lang", "c", "Bad Name", "--dir", d],
            "plugin name",
        ),
    ] {
        let (ok, out, err) = sluice(&args)?;
        ensure!(!ok && err.contains(says), "{args:?}: {out}{err}");
    }
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("keep.txt"), "mine")?;
    let (ok, out, err) = sluice(&["plugin", "new", "--lang", "c", "x", "--dir", d])?;
    ensure!(
        !ok && err.contains("not empty"),
        "non-empty dir: {out}{err}"
    );
    ensure!(std::fs::read_to_string(dir.join("keep.txt"))? == "mine");
    let (ok, out, err) = sluice(&["plugin", "build", path_str(tmp.path())?])?;
    ensure!(!ok && err.contains("no build.sh"), "build: {out}{err}");
    Ok(())
}

/// `sluice plugin new` into a stable folder, keeping the previous run's `target/` (moved out
/// of the way while `new` writes the empty folder, then back).
fn new_project(lang: Lang, name: &str) -> Result<PathBuf> {
    let base = Path::new(env!("CARGO_TARGET_TMPDIR")).join("plugin_cli");
    let dir = base.join(lang.as_str());
    let kept = base.join(format!("{lang}.target"));
    std::fs::create_dir_all(&base)?;
    if dir.join("target").exists() {
        let _ = std::fs::remove_dir_all(&kept);
        std::fs::rename(dir.join("target"), &kept)?;
    }
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    let (ok, out, err) = sluice(&[
        "plugin",
        "new",
        "--lang",
        lang.as_str(),
        name,
        "--dir",
        path_str(&dir)?,
    ])?;
    ensure!(ok, "{lang}: new: {out}{err}");
    if kept.exists() {
        std::fs::rename(&kept, dir.join("target"))?;
    }
    Ok(dir)
}

/// new → build → test with the project's own fixtures → test with edited fixtures.
fn build_and_test(lang: Lang) -> Result<()> {
    let name = format!("hello_{lang}");
    let dir = new_project(lang, &name)?;
    let (ok, stdout, stderr) = sluice(&["plugin", "build", path_str(&dir)?])?;
    ensure!(ok, "{lang}: build failed:\n{stdout}{stderr}");
    let wasm = PathBuf::from(stdout.trim());
    ensure!(
        wasm == dir.join(format!("target/{name}.wasm")) && wasm.is_file(),
        "{lang}: build printed {stdout:?}"
    );
    ensure!(
        stderr.contains("ok: ") && stderr.contains("sluice:plugin/plugin"),
        "{lang}: {stderr}"
    );

    let input = dir.join("fixtures/input.jsonl");
    let expected = dir.join("fixtures/expected.jsonl");
    let test = |expect: &Path, extra: &[&str]| -> Result<(bool, String, String)> {
        let mut args = vec![
            "plugin",
            "test",
            path_str(&wasm)?,
            "--input",
            path_str(&input)?,
            "--expect",
            path_str(expect)?,
        ];
        args.extend_from_slice(extra);
        sluice(&args)
    };
    let (ok, out, err) = test(&expected, &[])?;
    ensure!(
        ok && out.contains("all as expected"),
        "{lang}: the template's own fixtures fail:\n{out}{err}"
    );

    // Edited expectations: another greeting in the row, another error kind.
    let text = std::fs::read_to_string(&expected)?;
    let wrong = text
        .replacen(&format!("hello from {name}"), "bonjour", 1)
        .replacen("\"parse\"", "\"invalid\"", 1);
    ensure!(wrong != text, "{lang}: nothing to edit in {text}");
    let wrong_path = dir.join("fixtures/wrong.jsonl");
    std::fs::write(&wrong_path, wrong)?;
    let (ok, out, err) = test(&wrong_path, &[])?;
    ensure!(!ok, "{lang}: a mismatch passed:\n{out}{err}");
    for part in [
        "--- expected",
        "+++ actual",
        "@@ partition 0 offset 0",
        "-     /greeting: \"bonjour\"",
        &format!("+     /greeting: \"hello from {name}\""),
        "-   error invalid",
        "+   error parse: ",
        "FAILED: ",
        "2 input(s) differ",
    ] {
        ensure!(
            out.contains(part),
            "{lang}: {part:?} missing in the diff:\n{out}{err}"
        );
    }

    // --update records what the plugin does; the recorded file then passes.
    let recorded = dir.join("fixtures/recorded.jsonl");
    let (ok, out, err) = test(&recorded, &["--update"])?;
    ensure!(ok && out.contains("wrote"), "{lang}: --update:\n{out}{err}");
    let (ok, out, err) = test(&recorded, &[])?;
    ensure!(ok, "{lang}: the recorded fixtures fail:\n{out}{err}");
    Ok(())
}

#[test]
fn build_and_test_rust() -> Result<()> {
    build_and_test(Lang::Rust)
}

#[test]
fn build_and_test_c() -> Result<()> {
    build_and_test(Lang::C)
}

#[test]
fn build_and_test_python() -> Result<()> {
    build_and_test(Lang::Python)
}

/// The conformance fixtures (named configs, partitions, hex payloads, accepted and refused
/// configs) run as they are.
#[test]
fn test_runs_the_conformance_fixtures() -> Result<()> {
    let fixtures = repo_root().join("tests/fixtures/conformance");
    let (ok, out, err) = sluice(&[
        "plugin",
        "test",
        ENRICH_WASM,
        "--input",
        path_str(&fixtures.join("input.jsonl"))?,
        "--expect",
        path_str(&fixtures.join("expected.jsonl"))?,
        "--configs",
        path_str(&fixtures.join("configs.json"))?,
    ])?;
    ensure!(
        ok && out.contains("130 input(s)") && out.contains("all as expected"),
        "{out}{err}"
    );
    Ok(())
}

/// A record that makes the plugin trap is isolated as in the engine (the batch is re-run in
/// parts): it gets a `trap` error, its neighbours their rows.
#[test]
fn test_isolates_traps() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let input = tmp.path().join("input.jsonl");
    let expected = tmp.path().join("expected.jsonl");
    std::fs::write(
        &input,
        r#"{"json": {"id": 1}}
{"json": {"id": 2, "action": "trap"}, "note": "poison"}
{"json": {"id": 3}}
"#,
    )?;
    std::fs::write(
        &expected,
        r#"{"offset": 0, "row": {"id": 1}}
{"offset": 1, "error": "trap", "message": "trapped"}
{"offset": 2, "row": {"id": 3}}
"#,
    )?;
    let args = |expect: &Path| -> Result<Vec<String>> {
        Ok(["plugin", "test", HOSTILE_WASM, "--input"]
            .iter()
            .map(|s| s.to_string())
            .chain([
                path_str(&input)?.to_string(),
                "--expect".into(),
                path_str(expect)?.to_string(),
            ])
            .collect())
    };
    let a = args(&expected)?;
    let (ok, out, err) = sluice(&a.iter().map(String::as_str).collect::<Vec<_>>())?;
    ensure!(ok && out.contains("all as expected"), "{out}{err}");

    // Expecting a row where the plugin traps shows the trap's message.
    let wrong = tmp.path().join("wrong.jsonl");
    std::fs::write(
        &wrong,
        r#"{"offset": 0, "row": {"id": 1}}
{"offset": 1, "row": {"id": 2, "action": "trap"}}
{"offset": 2, "row": {"id": 3}}
"#,
    )?;
    let a = args(&wrong)?;
    let (ok, out, err) = sluice(&a.iter().map(String::as_str).collect::<Vec<_>>())?;
    ensure!(
        !ok && out.contains("@@ partition 0 offset 1 (input line 2): poison")
            && out.contains("+   error trap: "),
        "{out}{err}"
    );
    Ok(())
}
