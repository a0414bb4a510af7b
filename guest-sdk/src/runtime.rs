//! The batch loop behind the exported `process`, and the instance's plugin state.

use std::any::Any;
use std::cell::RefCell;

use crate::__private::bindings::sluice::plugin::types as wire;
use crate::{Config, ErrorKind, Output, Record, RecordError, Transform};

thread_local! {
    // A component instance is single-threaded; `Any` lets one non-generic slot hold
    // whichever type the plugin crate exported.
    static PLUGIN: RefCell<Option<Box<dyn Any>>> = const { RefCell::new(None) };
}

/// The exported `init`: parse the config, build the plugin, keep it for `process`.
pub fn init<T: Transform>(config: String) -> Result<(), String> {
    install_panic_hook();
    let plugin = Config::from_json_str(&config).and_then(T::init);
    // A refused config leaves the instance unusable rather than running an older one.
    let (state, result): (Option<Box<dyn Any>>, _) = match plugin {
        Ok(plugin) => (Some(Box::new(plugin)), Ok(())),
        Err(message) => (None, Err(message)),
    };
    PLUGIN.with(|slot| *slot.borrow_mut() = state);
    result
}

/// The exported `process`.
pub fn process<T: Transform>(batch: Vec<wire::InputRecord>) -> wire::BatchResult {
    PLUGIN.with(|slot| {
        let slot = slot.borrow();
        match slot.as_ref().and_then(|p| p.downcast_ref::<T>()) {
            Some(plugin) => process_batch(plugin, batch),
            // The host broke the contract: trap rather than guess a config.
            None => panic!("sluice-guest: `process` called before a successful `init`"),
        }
    })
}

/// Runs `transform` on every input in order. Outputs and errors carry the input's index;
/// an error on one input never stops the batch. An input whose output cannot be encoded
/// yields only an error, never a partial set of rows.
pub(crate) fn process_batch<T: Transform>(
    plugin: &T,
    batch: Vec<wire::InputRecord>,
) -> wire::BatchResult {
    let mut outputs = Vec::with_capacity(batch.len());
    let mut errors = Vec::new();
    // A component-model list holds at most u32::MAX elements, so indices fit.
    for (input, record) in (0_u32..).zip(batch) {
        let record = Record::from(record);
        let result = plugin
            .transform(&record)
            .and_then(|output| encode(input, output, &mut outputs));
        if let Err(err) = result {
            errors.push(wire::RecordError {
                input,
                kind: wire_kind(err.kind),
                message: err.message,
            });
        }
    }
    wire::BatchResult { outputs, errors }
}

/// Appends all of an input's rows to `outputs`, or none of them and the first reason one
/// cannot be sent.
fn encode(
    input: u32,
    output: Output,
    outputs: &mut Vec<wire::OutputRecord>,
) -> Result<(), RecordError> {
    let start = outputs.len();
    for row in output.rows {
        let value = match row.value {
            Ok(value) => value,
            Err(message) => {
                outputs.truncate(start);
                return Err(RecordError::other(message));
            }
        };
        outputs.push(wire::OutputRecord {
            input,
            table: row.table,
            key: row.key,
            value,
            headers: row.headers.into_iter().map(wire::Header::from).collect(),
        });
    }
    Ok(())
}

fn wire_kind(kind: ErrorKind) -> wire::ErrorKind {
    match kind {
        ErrorKind::Parse => wire::ErrorKind::Parse,
        ErrorKind::Schema => wire::ErrorKind::Schema,
        ErrorKind::Invalid => wire::ErrorKind::Invalid,
        ErrorKind::Other => wire::ErrorKind::Other,
    }
}

pub(crate) fn from_wire_kind(kind: wire::ErrorKind) -> ErrorKind {
    match kind {
        wire::ErrorKind::Parse => ErrorKind::Parse,
        wire::ErrorKind::Schema => ErrorKind::Schema,
        wire::ErrorKind::Invalid => ErrorKind::Invalid,
        wire::ErrorKind::Other => ErrorKind::Other,
    }
}

/// Sends panic messages to the host log before the instance traps: without WASI stderr
/// the message would otherwise be lost.
fn install_panic_hook() {
    #[cfg(target_arch = "wasm32")]
    {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            std::panic::set_hook(Box::new(|info| {
                crate::log::error(&format!("plugin panicked: {info}"));
            }));
        });
    }
}
