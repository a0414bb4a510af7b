//! Run a plugin natively, through the same batch loop the host calls, for unit tests:
//!
//! ```
//! # use sluice_guest::prelude::*;
//! # struct Echo;
//! # impl Transform for Echo {
//! #     fn init(_: Config) -> Result<Self, String> { Ok(Echo) }
//! #     fn transform(&self, r: &Record) -> Result<Output, RecordError> {
//! #         Ok(Output::row(r.json_object()?))
//! #     }
//! # }
//! use serde_json::json;
//! use sluice_guest::{testing, ErrorKind, Record};
//!
//! let batch = [
//!     Record::from_json(&json!({"id": 1})),
//!     Record::new("not json"),
//! ];
//! let result = testing::run_batch::<Echo>("{}", &batch).unwrap();
//! assert_eq!(result.outputs[0].input, 0);
//! assert_eq!(result.outputs[0].value, json!({"id": 1}));
//! assert_eq!(result.errors[0].input, 1);
//! assert_eq!(result.errors[0].kind, ErrorKind::Parse);
//! ```

use serde_json::Value;

use crate::__private::bindings::sluice::plugin::types as wire;
use crate::runtime::{from_wire_kind, process_batch};
use crate::{Config, ErrorKind, Header, Record, Transform};

/// What `process` returned for a batch, in the host's order.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchOutcome {
    pub outputs: Vec<OutputRow>,
    pub errors: Vec<FailedRecord>,
}

/// One output record, its value parsed back into JSON.
#[derive(Debug, Clone, PartialEq)]
pub struct OutputRow {
    /// Index of the input this row came from.
    pub input: u32,
    pub table: Option<String>,
    pub key: Option<Vec<u8>>,
    pub value: Value,
    pub headers: Vec<Header>,
}

/// One per-record error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailedRecord {
    /// Index of the failing input.
    pub input: u32,
    pub kind: ErrorKind,
    pub message: String,
}

impl BatchOutcome {
    /// The rows produced from input `input`.
    pub fn outputs_for(&self, input: u32) -> Vec<&OutputRow> {
        self.outputs.iter().filter(|o| o.input == input).collect()
    }

    /// The error reported for input `input`, if any.
    pub fn error_for(&self, input: u32) -> Option<&FailedRecord> {
        self.errors.iter().find(|e| e.input == input)
    }
}

/// Builds the plugin from `config_json` as the exported `init` does.
pub fn init<T: Transform>(config_json: &str) -> Result<T, String> {
    T::init(Config::from_json_str(config_json)?)
}

/// Initialises the plugin with `config_json`, then runs `records` as one batch through
/// the batch loop the host calls. `Err` is the message `init` would return to the host.
/// Panics in `transform` propagate, as they would trap in the host.
pub fn run_batch<T: Transform>(
    config_json: &str,
    records: &[Record],
) -> Result<BatchOutcome, String> {
    let plugin = init::<T>(config_json)?;
    Ok(run_batch_with(&plugin, records))
}

/// Runs `records` as one batch through an already built plugin.
pub fn run_batch_with<T: Transform>(plugin: &T, records: &[Record]) -> BatchOutcome {
    let batch = records
        .iter()
        .cloned()
        .map(wire::InputRecord::from)
        .collect();
    let result = process_batch(plugin, batch);
    BatchOutcome {
        outputs: result
            .outputs
            .into_iter()
            .map(|o| OutputRow {
                input: o.input,
                table: o.table,
                key: o.key,
                value: serde_json::from_slice(&o.value)
                    .expect("the batch loop only emits serialised JSON objects"),
                headers: o.headers.into_iter().map(Header::from).collect(),
            })
            .collect(),
        errors: result
            .errors
            .into_iter()
            .map(|e| FailedRecord {
                input: e.input,
                kind: from_wire_kind(e.kind),
                message: e.message,
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Output, RecordError, Row};
    use serde_json::json;

    /// Splits `{"n": k}` into k rows, rejects negative `n`, drops zero, refuses odd configs.
    struct Split {
        table: Option<String>,
    }

    impl Transform for Split {
        fn init(config: Config) -> Result<Self, String> {
            if config.value().get("refuse").is_some() {
                return Err("refused".into());
            }
            Ok(Split {
                table: config
                    .value()
                    .get("table")
                    .and_then(Value::as_str)
                    .map(str::to_owned),
            })
        }

        fn transform(&self, record: &Record) -> Result<Output, RecordError> {
            let v = record.json_value()?;
            let n = crate::json::get_i64(&v, "/n")?;
            if n < 0 {
                return Err(RecordError::invalid("n must not be negative"));
            }
            if n == 1000 {
                // An output that cannot be encoded: the input must get only an error.
                return Ok(Output::many([
                    Row::new(json!({"ok": true})),
                    Row::new(json!(1)),
                ]));
            }
            let rows = (0..n).map(|i| {
                let row = Row::new(json!({ "i": i }));
                match &self.table {
                    Some(t) => row.for_table(t),
                    None => row,
                }
            });
            Ok(Output::many(rows).with_header("from", record.source.offset.to_string()))
        }
    }

    fn rec(value: Value, offset: i64) -> Record {
        Record::from_json(&value).with_source("events", 0, offset)
    }

    #[test]
    fn batch_loop_indexes_outputs_and_continues_after_errors() {
        let batch = [
            rec(json!({"n": 2}), 10),
            Record::new("{broken"),
            rec(json!({"n": -1}), 12),
            rec(json!({"n": 0}), 13),
            rec(json!({"m": 1}), 14),
            rec(json!({"n": 1000}), 15),
            rec(json!({"n": 1}), 16),
        ];
        let out = run_batch::<Split>(r#"{"table": "t"}"#, &batch).unwrap();

        let inputs: Vec<u32> = out.outputs.iter().map(|o| o.input).collect();
        assert_eq!(inputs, [0, 0, 6]);
        assert_eq!(out.outputs[1].value, json!({"i": 1}));
        assert_eq!(out.outputs[1].table.as_deref(), Some("t"));
        assert_eq!(out.outputs[2].headers[0].value, b"16");
        assert!(
            out.outputs_for(3).is_empty(),
            "n = 0 is filtered, not an error"
        );
        assert!(out.error_for(3).is_none());

        let errors: Vec<(u32, ErrorKind)> = out.errors.iter().map(|e| (e.input, e.kind)).collect();
        assert_eq!(
            errors,
            [
                (1, ErrorKind::Parse),
                (2, ErrorKind::Invalid),
                (4, ErrorKind::Schema),
                (5, ErrorKind::Other),
            ]
        );
        assert_eq!(out.error_for(4).unwrap().message, "missing field /n");
        assert_eq!(
            out.error_for(5).unwrap().message,
            "output row is not a JSON object"
        );
        assert!(
            out.outputs_for(5).is_empty(),
            "no partial output for a failed input"
        );
    }

    #[test]
    fn init_errors_are_returned() {
        assert_eq!(
            run_batch::<Split>(r#"{"refuse": 1}"#, &[]).unwrap_err(),
            "refused"
        );
        let err = run_batch::<Split>("{nope", &[]).unwrap_err();
        assert!(err.starts_with("config is not valid JSON"), "{err}");
    }

    #[test]
    #[should_panic(expected = "before a successful `init`")]
    fn process_before_init_traps() {
        crate::runtime::process::<Split>(Vec::new());
    }

    #[test]
    fn exported_entry_points_keep_state_between_calls() {
        crate::runtime::init::<Split>(r#"{"table": "x"}"#.to_owned()).unwrap();
        let batch = vec![wire::InputRecord::from(rec(json!({"n": 1}), 0))];
        let result = crate::runtime::process::<Split>(batch);
        assert_eq!(result.outputs.len(), 1);
        assert_eq!(result.outputs[0].table.as_deref(), Some("x"));

        // A refused re-init must not leave the previous plugin running.
        assert_eq!(
            crate::runtime::init::<Split>(r#"{"refuse": 1}"#.to_owned()),
            Err("refused".to_owned())
        );
        let panicked = std::panic::catch_unwind(|| crate::runtime::process::<Split>(Vec::new()));
        assert!(panicked.is_err());
    }
}
