//! Write sluice transform plugins in Rust.
//!
//! A plugin is a type implementing [`Transform`], exported with [`export!`]:
//!
//! ```
//! use sluice_guest::prelude::*;
//!
//! struct Upper;
//!
//! impl Transform for Upper {
//!     fn init(_config: Config) -> Result<Self, String> {
//!         Ok(Upper)
//!     }
//!
//!     fn transform(&self, record: &Record) -> Result<Output, RecordError> {
//!         let mut event = record.json_value()?;
//!         let name = json::get_str(&event, "/name")?.to_uppercase();
//!         event["name"] = name.into();
//!         Ok(Output::row(event))
//!     }
//! }
//!
//! sluice_guest::export!(Upper);
//! ```
//!
//! Build it as a component with `cargo build --release --target wasm32-wasip2` (crate type
//! `cdylib`). The SDK writes the batch loop the host calls (`process` in `wit/plugin.wit`):
//! every input goes through [`Transform::transform`] in order; its rows become output
//! records tagged with the input's index; an `Err(RecordError)` becomes a per-record error
//! for that input and the loop goes on with the next one.
//!
//! **Panics are not errors.** A panic inside `transform` is not caught: it aborts the
//! instance (a wasm trap), which tells the host the plugin is broken rather than the
//! record bad. The host then retries on a fresh instance and isolates the record. Return a
//! [`RecordError`] for anything that is the data's fault.
//!
//! The same code runs natively, so plugin logic is unit-tested with plain `cargo test`:
//! see [`testing::run_batch`], which drives the very batch loop the host sees.

// Tests may unwrap: a panic there is a test failure with a backtrace.
#![cfg_attr(test, allow(clippy::unwrap_used))]

// The generated bindings and the `export!` macro name the wit-bindgen runtime through
// `::sluice_guest`, so that plugin crates need no direct wit-bindgen dependency.
extern crate self as sluice_guest;

mod config;
mod error;
pub mod json;
pub mod log;
mod object;
mod output;
mod record;
mod runtime;
pub mod testing;
pub mod timestamp;

pub use config::Config;
pub use error::{ErrorKind, RecordError};
pub use object::{JsonObject, RowWriter};
pub use output::{Output, Row};
pub use record::{Header, Record, Source};

/// A sluice transform: built once per instance from its config, then called for every record.
///
/// Implementations must be deterministic: for the same config and the same input they must
/// return the same output (no clocks, no randomness, no state carried between records that
/// depends on batch boundaries). After a crash the host replays batches and relies on
/// getting the same rows, which is what makes its ClickHouse writes exactly-once.
pub trait Transform: Sized + 'static {
    /// Builds the plugin from the stage's `config` (an empty object when the pipeline gives
    /// none). An error refuses the plugin; the host reports the message. A plugin without
    /// settings simply returns `Ok(Self)`; use [`Config::parse`] to read a typed config.
    fn init(config: Config) -> Result<Self, String>;

    /// Transforms one record into zero, one or many rows, or rejects it.
    ///
    /// `Ok(Output::none())` drops the record on purpose; `Err` sends it to the dead-letter
    /// topic with the error's kind and message. Panicking traps the whole instance: keep it
    /// for bugs, not for bad data.
    fn transform(&self, record: &Record) -> Result<Output, RecordError>;
}

/// What a plugin file usually needs: `use sluice_guest::prelude::*;`.
pub mod prelude {
    pub use crate::{
        json, log, Config, ErrorKind, JsonObject, Output, Record, RecordError, Row, RowWriter,
        Transform,
    };
}

/// Exports a [`Transform`] implementation as the plugin's `sluice:plugin/transform`
/// interface. Call it once, at the top level of the plugin crate.
#[macro_export]
macro_rules! export {
    ($plugin:ty) => {
        // The generated C-ABI entry points are `unsafe extern "C"` functions.
        #[allow(unsafe_code)]
        const _: () = {
            struct SluiceExport;

            impl $crate::__private::Guest for SluiceExport {
                fn init(
                    config: ::std::string::String,
                ) -> ::std::result::Result<(), ::std::string::String> {
                    $crate::__private::init::<$plugin>(config)
                }

                fn process(
                    batch: ::std::vec::Vec<$crate::__private::InputRecord>,
                ) -> $crate::__private::BatchResult {
                    $crate::__private::process::<$plugin>(batch)
                }
            }

            // Only wasm gets the raw exports: their names (`pkg:name/iface#func`) are not
            // valid native symbols, and a native `cdylib` would fail to link.
            #[cfg(target_arch = "wasm32")]
            $crate::__private::bindings::export!(
                SluiceExport with_types_in $crate::__private::bindings
            );
        };
    };
}

/// Used by [`export!`]; not a stable API.
#[doc(hidden)]
pub mod __private {
    pub use crate::runtime::{init, process};
    pub use bindings::exports::sluice::plugin::transform::Guest;
    pub use bindings::sluice::plugin::types::{BatchResult, InputRecord};
    pub use wit_bindgen::rt;

    /// Bindings for `wit/plugin.wit`, generated once here so plugin crates don't run
    /// wit-bindgen themselves.
    #[allow(unsafe_code, missing_docs)]
    pub mod bindings {
        wit_bindgen::generate!({
            world: "plugin",
            path: "../wit",
            pub_export_macro: true,
            default_bindings_module: "::sluice_guest::__private::bindings",
            runtime_path: "::sluice_guest::__private::rt",
        });
    }
}
