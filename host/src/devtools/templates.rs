//! The plugin templates (`plugins/templates/<lang>/`), the contract (`wit/plugin.wit`) and the
//! toolchain script (`plugins/toolchains.sh`), compiled into the binary so that an installed
//! `sluice` creates projects without the repository. `tests/tests/plugin_cli.rs` checks that
//! the lists below name every file of the template folders.

use std::fmt;
use std::str::FromStr;

/// One file of a template: its path inside the project and its text (with placeholders).
#[derive(Debug, Clone, Copy)]
pub struct TemplateFile {
    pub path: &'static str,
    pub text: &'static str,
}

macro_rules! template {
    ($lang:literal: $($path:literal),+ $(,)?) => {
        &[$(TemplateFile {
            path: $path,
            text: include_str!(concat!(
                env!("CARGO_MANIFEST_DIR"), "/../plugins/templates/", $lang, "/", $path
            )),
        }),+]
    };
}

const RUST: &[TemplateFile] = template!("rust":
    "Cargo.toml", "build.sh", "src/lib.rs", "fixtures/input.jsonl", "fixtures/expected.jsonl");
const C: &[TemplateFile] = template!("c":
    "plugin.c", "build.sh", "fixtures/input.jsonl", "fixtures/expected.jsonl");
const PYTHON: &[TemplateFile] = template!("python":
    "app.py", "build.sh", "fixtures/input.jsonl", "fixtures/expected.jsonl");
const JS: &[TemplateFile] = template!("js":
    "plugin.js", "build.sh", "fixtures/input.jsonl", "fixtures/expected.jsonl");
const GO: &[TemplateFile] = template!("go":
    "transform.go", "build.sh", "fixtures/input.jsonl", "fixtures/expected.jsonl");

/// `wit/plugin.wit`, copied into every project (the non-Rust builds read it; for Rust it is
/// the reference, the SDK carries its own copy).
pub const PLUGIN_WIT: &str =
    include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../wit/plugin.wit"));

/// `plugins/toolchains.sh`, sourced by the non-Rust `build.sh` scripts.
pub const TOOLCHAINS_SH: &str = include_str!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../plugins/toolchains.sh"
));

/// A language with a template.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Lang {
    Rust,
    C,
    Python,
    Js,
    Go,
}

impl Lang {
    pub const ALL: [Lang; 5] = [Lang::Rust, Lang::C, Lang::Python, Lang::Js, Lang::Go];
    /// The names `--lang` accepts, in the order of [`Lang::ALL`].
    pub const NAMES: [&'static str; 5] = ["rust", "c", "python", "js", "go"];

    pub fn as_str(self) -> &'static str {
        match self {
            Lang::Rust => "rust",
            Lang::C => "c",
            Lang::Python => "python",
            Lang::Js => "js",
            Lang::Go => "go",
        }
    }

    /// The files of `plugins/templates/<lang>/`.
    pub fn template(self) -> &'static [TemplateFile] {
        match self {
            Lang::Rust => RUST,
            Lang::C => C,
            Lang::Python => PYTHON,
            Lang::Js => JS,
            Lang::Go => GO,
        }
    }

    /// Whether the project's `build.sh` sources `toolchains.sh` (Rust needs only rustup and
    /// cargo).
    pub fn uses_toolchains_sh(self) -> bool {
        self != Lang::Rust
    }
}

impl fmt::Display for Lang {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Lang {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Lang::ALL
            .into_iter()
            .find(|l| l.as_str() == s)
            .ok_or_else(|| format!("unknown language {s:?}: one of {}", Lang::NAMES.join(", ")))
    }
}
