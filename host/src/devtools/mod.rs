//! Plugin developer tools behind `sluice plugin new|build|test` (docs/plugins.md):
//!
//! - [`new_project`]: a ready-to-build project from a template embedded in the binary
//!   ([`templates`]), so an installed `sluice` needs no checkout;
//! - [`build_project`]: runs the project's `build.sh` (which installs its toolchain) and
//!   type-checks the component against the plugin world, as the host loads it;
//! - [`run_test`]: fixture records ([`fixtures`]) through the real WASM stage and sandbox, with
//!   a readable diff against the expected rows and per-record errors.

mod diff;
pub mod fixtures;
mod project;
mod runner;
pub mod templates;

use std::path::{Path, PathBuf};

pub use project::{
    build_project, new_project, validate_name, Built, NewOptions, NewProject, SdkSource,
};
pub use runner::{run_test, Actual, TestOptions, TestReport};
pub use templates::Lang;

use crate::stage::wasm::PluginError;
use crate::stage::StageError;
use crate::state::StateError;

#[derive(Debug, thiserror::Error)]
pub enum DevtoolsError {
    #[error("{0}")]
    Usage(String),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}:{line}: {message}", path.display())]
    Fixture {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("{}: {message}", script.display())]
    Build { script: PathBuf, message: String },
    #[error(transparent)]
    Plugin(#[from] PluginError),
    #[error("{config}: {source}")]
    Config { config: String, source: PluginError },
    #[error(transparent)]
    Stage(#[from] StageError),
    #[error("scratch state store: {0}")]
    State(#[from] StateError),
}

impl DevtoolsError {
    fn io(path: &Path, source: std::io::Error) -> Self {
        DevtoolsError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}
