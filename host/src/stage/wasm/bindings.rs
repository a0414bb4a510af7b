//! Host bindings generated from the one WIT package in `wit/`.

wasmtime::component::bindgen!({
    world: "plugin",
    path: "../wit",
});

pub use self::sluice::plugin::log::{Field, Level};
pub use self::sluice::plugin::types::{
    BatchResult, ErrorKind, Header, InputRecord, OutputRecord, RecordError, Source,
};

impl ErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Parse => "parse",
            ErrorKind::Schema => "schema",
            ErrorKind::Invalid => "invalid",
            ErrorKind::Other => "other",
        }
    }
}
