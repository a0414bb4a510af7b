//! The fixture files of `sluice plugin test` (documented in docs/plugins.md, "Testing a plugin
//! locally"). They are a superset of the conformance fixtures in `tests/fixtures/conformance`.
//!
//! `input.jsonl`, one record per line: the payload as exactly one of `json` (any JSON value,
//! written compactly), `text` (the string's UTF-8 bytes) or `hex` (raw bytes); optional `key`,
//! `headers` (`{"name": "value"}`), `timestamp_ms`, `topic`, `partition` (default 0), `offset`
//! (default: the record's 0-based line among the records), `config` (the name of a config in
//! the `--configs` file, or an inline config) and `note`.
//!
//! `expected.jsonl`, one line per expected output, naming its input by `partition` (default 0)
//! and `offset`: a row (`row`, optional `table`, and, checked only when given, `key` and
//! `headers`) or an error (`error`: the kind, optional `message`: a part of the message).
//! Several rows for one input: a fan-out, in order. No line for an input: it is filtered out.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use serde::{Deserialize, Deserializer};
use serde_json::Value;

use super::DevtoolsError;

/// A record's position: what expected lines refer to, unique among the inputs.
pub type Position = (i32, i64);

/// The default topic of fixture records.
pub const DEFAULT_TOPIC: &str = "fixtures";

/// Which config an input runs with.
#[derive(Debug, Clone, PartialEq)]
pub enum ConfigRef {
    /// `--config` (or `{}`).
    Default,
    /// A name in the `--configs` file.
    Named(String),
    /// A config written in the input line itself.
    Inline(Value),
}

#[derive(Debug, Clone)]
pub struct Input {
    /// 1-based line in the file.
    pub line: usize,
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub timestamp_ms: Option<i64>,
    pub key: Option<Vec<u8>>,
    pub headers: Vec<(String, Vec<u8>)>,
    pub value: Vec<u8>,
    pub config: ConfigRef,
    pub note: Option<String>,
}

impl Input {
    pub fn position(&self) -> Position {
        (self.partition, self.offset)
    }
}

/// One expected output of an input.
#[derive(Debug, Clone, PartialEq)]
pub enum Expected {
    Row {
        table: Option<String>,
        row: Value,
        /// Checked only when given.
        key: Option<String>,
        headers: Option<BTreeMap<String, String>>,
    },
    Error {
        kind: String,
        /// A part of the message, checked only when given.
        message: Option<String>,
    },
}

/// The expected outputs per input position, each with its line in the file.
pub type ExpectedOutputs = BTreeMap<Position, Vec<(usize, Expected)>>;

/// `--configs`: named configs, and configs `init` must accept or refuse (the conformance
/// fixtures' `configs.json`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigsFile {
    #[serde(default)]
    pub configs: BTreeMap<String, Value>,
    #[serde(default)]
    pub accepted: Vec<Value>,
    #[serde(default)]
    pub refused: Vec<Value>,
}

/// Deserializes a present field, `null` included, as `Some`.
fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Value>, D::Error> {
    Value::deserialize(d).map(Some)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InputLine {
    #[serde(default, deserialize_with = "present")]
    json: Option<Value>,
    text: Option<String>,
    hex: Option<String>,
    key: Option<String>,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    timestamp_ms: Option<i64>,
    topic: Option<String>,
    #[serde(default)]
    partition: i32,
    offset: Option<i64>,
    config: Option<Value>,
    note: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExpectedLine {
    #[serde(default)]
    partition: i32,
    offset: i64,
    #[serde(default, deserialize_with = "present")]
    row: Option<Value>,
    table: Option<String>,
    key: Option<String>,
    headers: Option<BTreeMap<String, String>>,
    error: Option<String>,
    message: Option<String>,
    /// A comment for the reader.
    #[serde(rename = "note")]
    _note: Option<String>,
}

fn fixture_err(path: &Path, line: usize, message: impl Into<String>) -> DevtoolsError {
    DevtoolsError::Fixture {
        path: path.to_path_buf(),
        line,
        message: message.into(),
    }
}

/// The non-blank lines of a JSON-lines file, with their 1-based numbers.
fn json_lines(path: &Path) -> Result<Vec<(usize, String)>, DevtoolsError> {
    let text = std::fs::read_to_string(path).map_err(|e| DevtoolsError::io(path, e))?;
    Ok(text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| (i + 1, l.to_string()))
        .collect())
}

fn parse_hex(h: &str) -> Result<Vec<u8>, String> {
    if !h.is_ascii() || !h.len().is_multiple_of(2) {
        return Err("`hex` must be an even number of hex digits".into());
    }
    (0..h.len())
        .step_by(2)
        .map(|i| {
            let digits = &h[i..i + 2]; // ASCII: every index is a char boundary
            u8::from_str_radix(digits, 16).map_err(|_| format!("`hex`: {digits:?} is not a byte"))
        })
        .collect()
}

pub fn load_inputs(path: &Path) -> Result<Vec<Input>, DevtoolsError> {
    let mut inputs = Vec::new();
    let mut seen: HashMap<Position, usize> = HashMap::new();
    for (n, (line, text)) in json_lines(path)?.into_iter().enumerate() {
        let l: InputLine =
            serde_json::from_str(&text).map_err(|e| fixture_err(path, line, e.to_string()))?;
        let value = match (l.json, l.text, l.hex) {
            (Some(v), None, None) => v.to_string().into_bytes(),
            (None, Some(t), None) => t.into_bytes(),
            (None, None, Some(h)) => parse_hex(&h).map_err(|m| fixture_err(path, line, m))?,
            _ => {
                return Err(fixture_err(
                    path,
                    line,
                    "give the payload as exactly one of `json`, `text`, `hex`",
                ))
            }
        };
        let config = match l.config {
            None => ConfigRef::Default,
            Some(Value::String(name)) => ConfigRef::Named(name),
            Some(inline) => ConfigRef::Inline(inline),
        };
        let input = Input {
            line,
            topic: l.topic.unwrap_or_else(|| DEFAULT_TOPIC.to_string()),
            partition: l.partition,
            offset: l.offset.unwrap_or(n as i64),
            timestamp_ms: l.timestamp_ms,
            key: l.key.map(String::into_bytes),
            headers: l
                .headers
                .into_iter()
                .map(|(k, v)| (k, v.into_bytes()))
                .collect(),
            value,
            config,
            note: l.note,
        };
        if let Some(first) = seen.insert(input.position(), line) {
            return Err(fixture_err(
                path,
                line,
                format!(
                    "partition {} offset {} again (first on line {first}): positions identify inputs",
                    input.partition, input.offset
                ),
            ));
        }
        inputs.push(input);
    }
    Ok(inputs)
}

pub fn load_expected(path: &Path) -> Result<ExpectedOutputs, DevtoolsError> {
    let mut expected = ExpectedOutputs::new();
    for (line, text) in json_lines(path)? {
        let l: ExpectedLine =
            serde_json::from_str(&text).map_err(|e| fixture_err(path, line, e.to_string()))?;
        let outcome = match (l.row, l.error) {
            (Some(row), None) => {
                if l.message.is_some() {
                    return Err(fixture_err(path, line, "`message` goes with `error`"));
                }
                Expected::Row {
                    table: l.table,
                    row,
                    key: l.key,
                    headers: l.headers,
                }
            }
            (None, Some(kind)) => {
                if l.table.is_some() || l.key.is_some() || l.headers.is_some() {
                    return Err(fixture_err(
                        path,
                        line,
                        "`table`, `key` and `headers` go with `row`",
                    ));
                }
                Expected::Error {
                    kind,
                    message: l.message,
                }
            }
            _ => {
                return Err(fixture_err(
                    path,
                    line,
                    "give exactly one of `row` and `error`",
                ))
            }
        };
        expected
            .entry((l.partition, l.offset))
            .or_default()
            .push((line, outcome));
    }
    Ok(expected)
}

pub fn load_configs(path: &Path) -> Result<ConfigsFile, DevtoolsError> {
    let text = std::fs::read_to_string(path).map_err(|e| DevtoolsError::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| fixture_err(path, e.line(), e.to_string()))
}
