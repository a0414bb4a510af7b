//! `sluice plugin new` (a project from an embedded template) and `sluice plugin build` (run the
//! project's `build.sh`, then type-check the component against the world).

use std::fmt;
use std::path::{Component, Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;

use super::templates::{Lang, PLUGIN_WIT, TOOLCHAINS_SH};
use super::DevtoolsError;
use crate::stage::wasm::{LoadedPlugin, PluginRuntime};

/// What `sluice plugin new` is asked for.
#[derive(Debug, Clone)]
pub struct NewOptions {
    pub lang: Lang,
    /// `[a-z][a-z0-9_-]*`: names the component (`target/<name>.wasm`) and, for Rust, the crate.
    pub name: String,
    /// The project directory (default `./<name>`); must not exist or be empty.
    pub dir: Option<PathBuf>,
    /// Rust: the `guest-sdk/` directory to depend on, instead of looking for one.
    pub sdk: Option<PathBuf>,
}

/// Where a new Rust project takes the `sluice-guest` SDK from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SdkSource {
    /// A path dependency (relative when the project lies inside the sluice checkout).
    Path(String),
    /// No checkout found: the repository this binary was built from, at its version's tag.
    Git { url: String, tag: String },
}

/// A project written by [`new_project`].
#[derive(Debug)]
pub struct NewProject {
    pub lang: Lang,
    pub name: String,
    pub dir: PathBuf,
    /// Files written, relative to `dir`.
    pub files: Vec<PathBuf>,
    /// Rust only.
    pub sdk: Option<SdkSource>,
}

pub fn validate_name(name: &str) -> Result<(), DevtoolsError> {
    let mut chars = name.chars();
    let ok = chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
        && name.len() <= 64;
    if ok {
        Ok(())
    } else {
        Err(DevtoolsError::Usage(format!(
            "plugin name {name:?}: use a lowercase letter, then lowercase letters, digits, `_` or `-` (at most 64)"
        )))
    }
}

/// Creates a ready-to-build project: the template with `{{name}}` (and for Rust `{{sdk_path}}`)
/// filled in, `wit/plugin.wit`, `toolchains.sh` (all but Rust), a `.gitignore`.
pub fn new_project(opts: &NewOptions) -> Result<NewProject, DevtoolsError> {
    validate_name(&opts.name)?;
    let dir = opts
        .dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(&opts.name));
    if dir.exists() {
        let mut entries = std::fs::read_dir(&dir).map_err(|e| DevtoolsError::io(&dir, e))?;
        if entries.next().is_some() {
            return Err(DevtoolsError::Usage(format!(
                "{} already exists and is not empty: choose another --dir",
                dir.display()
            )));
        }
    }
    std::fs::create_dir_all(&dir).map_err(|e| DevtoolsError::io(&dir, e))?;
    let sdk = match opts.lang {
        Lang::Rust => Some(find_sdk(&dir, opts.sdk.as_deref())?),
        _ => None,
    };

    let mut files: Vec<(PathBuf, String)> = Vec::new();
    for f in opts.lang.template() {
        let mut text = f.text.replace("{{name}}", &opts.name);
        if let Some(sdk) = &sdk {
            text = match sdk {
                SdkSource::Path(p) => text.replace("{{sdk_path}}", &toml_escape(p)),
                SdkSource::Git { url, tag } => text.replace(
                    r#"path = "{{sdk_path}}""#,
                    &format!(
                        r#"git = "{}", tag = "{}""#,
                        toml_escape(url),
                        toml_escape(tag)
                    ),
                ),
            };
        }
        files.push((PathBuf::from(f.path), text));
    }
    files.push(("wit/plugin.wit".into(), PLUGIN_WIT.to_string()));
    if opts.lang.uses_toolchains_sh() {
        files.push(("toolchains.sh".into(), TOOLCHAINS_SH.to_string()));
    }
    files.push((".gitignore".into(), "target/\n__pycache__/\n".to_string()));

    for (rel, text) in &files {
        if text.contains("{{sdk_path}}") {
            // Only reachable if the Rust template stops spelling the SDK dependency as
            // `path = "{{sdk_path}}"`.
            return Err(DevtoolsError::Usage(format!(
                "template {}/{}: cannot fill in {{{{sdk_path}}}}",
                opts.lang,
                rel.display()
            )));
        }
        let path = dir.join(rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| DevtoolsError::io(parent, e))?;
        }
        std::fs::write(&path, text).map_err(|e| DevtoolsError::io(&path, e))?;
        if rel.extension().is_some_and(|e| e == "sh") {
            make_executable(&path)?;
        }
    }
    Ok(NewProject {
        lang: opts.lang,
        name: opts.name.clone(),
        dir,
        files: files.into_iter().map(|(rel, _)| rel).collect(),
        sdk,
    })
}

/// What `sluice plugin new` prints: the files, where the SDK comes from, the next commands.
impl fmt::Display for NewProject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let dir = self.dir.display();
        writeln!(f, "created {} plugin {:?} in {dir}/:", self.lang, self.name)?;
        for file in &self.files {
            writeln!(f, "  {}", file.display())?;
        }
        match &self.sdk {
            Some(SdkSource::Path(p)) => writeln!(f, "Rust SDK (sluice-guest): path {p}")?,
            Some(SdkSource::Git { url, tag }) => writeln!(
                f,
                "warning: no sluice checkout found for the Rust SDK (sluice-guest): Cargo.toml \
                 uses git {url} at tag {tag}; to use a local checkout, edit it or re-create \
                 the project with --sdk <checkout>/guest-sdk"
            )?,
            None => {}
        }
        writeln!(f, "next:")?;
        writeln!(f, "  sluice plugin build {dir}")?;
        write!(
            f,
            "  sluice plugin test {dir}/target/{name}.wasm --input {dir}/fixtures/input.jsonl --expect {dir}/fixtures/expected.jsonl",
            name = self.name
        )
    }
}

impl Built {
    /// One line for humans: the component checked, its id and size.
    pub fn summary(&self) -> String {
        format!(
            "ok: {} is a component of the sluice:plugin/plugin world ({}, {:.2} MiB)",
            self.wasm.display(),
            self.plugin.id(),
            self.bytes as f64 / (1024.0 * 1024.0)
        )
    }
}

#[cfg(unix)]
fn make_executable(path: &Path) -> Result<(), DevtoolsError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))
        .map_err(|e| DevtoolsError::io(path, e))
}

#[cfg(not(unix))]
fn make_executable(_path: &Path) -> Result<(), DevtoolsError> {
    Ok(())
}

/// The inside of a TOML basic string.
fn toml_escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"")
}

/// A sluice checkout: the SDK and the contract side by side.
fn is_checkout(dir: &Path) -> bool {
    dir.join("guest-sdk/Cargo.toml").is_file() && dir.join("wit/plugin.wit").is_file()
}

/// The SDK for a new Rust project in `project` (which exists), in order: `--sdk`; the checkout
/// the project lies in (relative path, so the checkout can move); the checkout this binary was
/// built from, if it is still there (absolute path); else a git dependency on this binary's
/// repository and version (the SDK is not on crates.io).
fn find_sdk(project: &Path, explicit: Option<&Path>) -> Result<SdkSource, DevtoolsError> {
    if let Some(sdk) = explicit {
        let sdk = sdk.canonicalize().map_err(|e| DevtoolsError::io(sdk, e))?;
        let manifest = std::fs::read_to_string(sdk.join("Cargo.toml")).unwrap_or_default();
        if !manifest.contains("name = \"sluice-guest\"") {
            return Err(DevtoolsError::Usage(format!(
                "--sdk {}: not the sluice-guest crate (guest-sdk/ of a sluice checkout)",
                sdk.display()
            )));
        }
        return Ok(SdkSource::Path(sdk.display().to_string()));
    }
    let project = project
        .canonicalize()
        .map_err(|e| DevtoolsError::io(project, e))?;
    if let Some((up, repo)) = project
        .ancestors()
        .enumerate()
        .skip(1)
        .find(|(_, d)| is_checkout(d))
    {
        // Plain `..` steps: `project` is canonical, so no step crosses a symlink.
        let mut rel = PathBuf::new();
        for _ in 0..up {
            rel.push(Component::ParentDir);
        }
        debug_assert!(project.starts_with(repo));
        return Ok(SdkSource::Path(rel.join("guest-sdk").display().to_string()));
    }
    let built_from = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    if is_checkout(&built_from) {
        if let Ok(repo) = built_from.canonicalize() {
            return Ok(SdkSource::Path(
                repo.join("guest-sdk").display().to_string(),
            ));
        }
    }
    Ok(SdkSource::Git {
        url: env!("CARGO_PKG_REPOSITORY").to_string(),
        tag: format!("v{}", env!("CARGO_PKG_VERSION")),
    })
}

/// A component built by [`build_project`], type-checked against the world.
pub struct Built {
    pub wasm: PathBuf,
    pub plugin: Arc<LoadedPlugin>,
    pub bytes: u64,
}

/// Runs `<dir>/build.sh` (its output goes to stderr, so stdout stays free for the result),
/// then loads the newest `<dir>/target/*.wasm` as the host does: compiled and checked
/// against the `sluice:plugin/plugin` world.
pub fn build_project(dir: &Path) -> Result<Built, DevtoolsError> {
    let script = dir.join("build.sh");
    if !script.is_file() {
        return Err(DevtoolsError::Usage(format!(
            "{}: no build.sh here; create a project with `sluice plugin new`",
            dir.display()
        )));
    }
    let status = Command::new("bash")
        .arg("build.sh")
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::from(std::io::stderr()))
        .status()
        .map_err(|e| DevtoolsError::io(&script, e))?;
    if !status.success() {
        return Err(DevtoolsError::Build {
            script,
            message: format!("exited with {status} (its output is above)"),
        });
    }
    let wasm = newest_wasm(&dir.join("target"))?.ok_or_else(|| DevtoolsError::Build {
        script: script.clone(),
        message: format!(
            "succeeded but left no component in {}",
            dir.join("target").display()
        ),
    })?;
    let bytes = std::fs::metadata(&wasm)
        .map_err(|e| DevtoolsError::io(&wasm, e))?
        .len();
    let plugin = PluginRuntime::new(None)?.load_file(&wasm)?;
    Ok(Built {
        wasm,
        plugin,
        bytes,
    })
}

/// The most recently written `*.wasm` directly in `target/` (intermediate files live in its
/// subfolders).
fn newest_wasm(target: &Path) -> Result<Option<PathBuf>, DevtoolsError> {
    let entries = match std::fs::read_dir(target) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(DevtoolsError::io(target, e)),
    };
    let mut best: Option<(std::time::SystemTime, PathBuf)> = None;
    for entry in entries {
        let entry = entry.map_err(|e| DevtoolsError::io(target, e))?;
        let path = entry.path();
        if path.extension().is_none_or(|e| e != "wasm") || !path.is_file() {
            continue;
        }
        let modified = entry
            .metadata()
            .and_then(|m| m.modified())
            .map_err(|e| DevtoolsError::io(&path, e))?;
        if best.as_ref().is_none_or(|(t, _)| modified > *t) {
            best = Some((modified, path));
        }
    }
    Ok(best.map(|(_, p)| p))
}
