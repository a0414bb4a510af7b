//! Host bindings generated from the one WIT package in `wit/`.
//!
//! Inputs are lowered from borrowed data (`ownership: Borrowing`): a batch handed to the plugin
//! is a list of views into the host's records ([`InputRecordRef`]), copied once, straight into
//! the guest's memory, instead of being copied into owned vectors first. Types the host both
//! passes and receives (`header`) exist twice: [`HeaderParam`] (borrowed) and [`HeaderResult`].

wasmtime::component::bindgen!({
    world: "plugin",
    path: "../wit",
    ownership: Borrowing { duplicate_if_necessary: true },
});

pub use self::sluice::plugin::log::{Field, Level};
pub use self::sluice::plugin::types::{
    BatchResult, ErrorKind, HeaderParam, HeaderResult, InputRecord as InputRecordRef, OutputRecord,
    RecordError, Source as SourceRef,
};

/// A header as the plugin returns it (owned).
pub type Header = HeaderResult;

/// An input record that owns its data, for callers that build batches by hand (tests, tools);
/// [`InputRecord::with_refs`] lends it to the plugin.
#[derive(Debug, Clone)]
pub struct InputRecord {
    pub key: Option<Vec<u8>>,
    pub value: Vec<u8>,
    pub headers: Vec<Header>,
    pub source: Source,
}

/// Where an owned [`InputRecord`] came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub timestamp_ms: Option<i64>,
}

impl InputRecord {
    /// Calls `f` with borrowed views of `batch`.
    pub fn with_refs<T>(batch: &[InputRecord], f: impl FnOnce(&[InputRecordRef<'_>]) -> T) -> T {
        let headers: Vec<Vec<HeaderParam<'_>>> = batch
            .iter()
            .map(|r| {
                r.headers
                    .iter()
                    .map(|h| HeaderParam {
                        key: &h.key,
                        value: &h.value,
                    })
                    .collect()
            })
            .collect();
        let refs: Vec<InputRecordRef<'_>> = batch
            .iter()
            .zip(&headers)
            .map(|(r, h)| InputRecordRef {
                key: r.key.as_deref(),
                value: &r.value,
                headers: h,
                source: SourceRef {
                    topic: &r.source.topic,
                    partition: r.source.partition,
                    offset: r.source.offset,
                    timestamp_ms: r.source.timestamp_ms,
                },
            })
            .collect();
        f(&refs)
    }
}

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
