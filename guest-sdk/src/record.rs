use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use crate::__private::bindings::sluice::plugin::types as wire;
use crate::{JsonObject, RecordError};

/// A Kafka record header. Values are raw bytes, as in Kafka.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub key: String,
    pub value: Vec<u8>,
}

/// Where a record came from.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Source {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    /// Kafka timestamp (create or log-append time), milliseconds since the Unix epoch.
    pub timestamp_ms: Option<i64>,
}

/// One input record: the Kafka record for the first stage, the previous stage's output
/// row for later ones.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub key: Option<Vec<u8>>,
    /// The payload bytes (for later stages, a UTF-8 JSON object).
    pub value: Vec<u8>,
    pub headers: Vec<Header>,
    pub source: Source,
}

impl Record {
    /// A record with this payload, no key, no headers and a zeroed source; mostly for tests.
    pub fn new(value: impl Into<Vec<u8>>) -> Self {
        Record {
            key: None,
            value: value.into(),
            headers: Vec::new(),
            source: Source::default(),
        }
    }

    /// A record whose payload is this JSON value; mostly for tests.
    pub fn from_json(value: &Value) -> Self {
        Record::new(value.to_string())
    }

    pub fn with_key(mut self, key: impl Into<Vec<u8>>) -> Self {
        self.key = Some(key.into());
        self
    }

    pub fn with_header(mut self, key: impl Into<String>, value: impl Into<Vec<u8>>) -> Self {
        self.headers.push(Header {
            key: key.into(),
            value: value.into(),
        });
        self
    }

    pub fn with_source(mut self, topic: impl Into<String>, partition: i32, offset: i64) -> Self {
        self.source.topic = topic.into();
        self.source.partition = partition;
        self.source.offset = offset;
        self
    }

    pub fn with_timestamp_ms(mut self, timestamp_ms: i64) -> Self {
        self.source.timestamp_ms = Some(timestamp_ms);
        self
    }

    /// The value of the first header with this key.
    pub fn header(&self, key: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|h| h.key == key)
            .map(|h| h.value.as_slice())
    }

    /// The payload as UTF-8 text; a `parse` error otherwise.
    pub fn value_str(&self) -> Result<&str, RecordError> {
        std::str::from_utf8(&self.value)
            .map_err(|e| RecordError::parse(format!("payload is not UTF-8: {e}")))
    }

    /// Deserialises the JSON payload: bad JSON is a `parse` error, JSON that does not fit
    /// `T` (missing field, wrong type) a `schema` error.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, RecordError> {
        Ok(serde_json::from_slice(&self.value)?)
    }

    /// The payload's top-level fields, each value kept as raw JSON text borrowed from the
    /// payload: a `parse` error if it is not JSON, a `schema` error if it is not an object.
    /// Much cheaper than [`Self::json_value`]; see [`JsonObject`].
    pub fn json_fields(&self) -> Result<JsonObject<'_>, RecordError> {
        JsonObject::from_slice(&self.value)
    }

    /// The payload as a JSON value; a `parse` error if it is not JSON.
    pub fn json_value(&self) -> Result<Value, RecordError> {
        serde_json::from_slice(&self.value)
            .map_err(|e| RecordError::parse(format!("payload is not valid JSON: {e}")))
    }

    /// The payload as a JSON object: a `parse` error if it is not JSON, a `schema` error if
    /// it is JSON but not an object.
    pub fn json_object(&self) -> Result<Map<String, Value>, RecordError> {
        match self.json_value()? {
            Value::Object(map) => Ok(map),
            other => Err(RecordError::schema(format!(
                "payload is a JSON {}, expected an object",
                crate::json::type_name(&other)
            ))),
        }
    }
}

impl From<wire::InputRecord> for Record {
    fn from(input: wire::InputRecord) -> Self {
        Record {
            key: input.key,
            value: input.value,
            headers: input.headers.into_iter().map(Header::from).collect(),
            source: Source {
                topic: input.source.topic,
                partition: input.source.partition,
                offset: input.source.offset,
                timestamp_ms: input.source.timestamp_ms,
            },
        }
    }
}

impl From<Record> for wire::InputRecord {
    fn from(record: Record) -> Self {
        wire::InputRecord {
            key: record.key,
            value: record.value,
            headers: record.headers.into_iter().map(wire::Header::from).collect(),
            source: wire::Source {
                topic: record.source.topic,
                partition: record.source.partition,
                offset: record.source.offset,
                timestamp_ms: record.source.timestamp_ms,
            },
        }
    }
}

impl From<wire::Header> for Header {
    fn from(h: wire::Header) -> Self {
        Header {
            key: h.key,
            value: h.value,
        }
    }
}

impl From<Header> for wire::Header {
    fn from(h: Header) -> Self {
        wire::Header {
            key: h.key,
            value: h.value,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;
    use serde_json::json;

    #[test]
    fn json_helpers_classify_failures() {
        let bad = Record::new("{not json");
        assert_eq!(bad.json_value().unwrap_err().kind, ErrorKind::Parse);
        assert_eq!(bad.json_object().unwrap_err().kind, ErrorKind::Parse);

        let array = Record::from_json(&json!([1, 2]));
        let err = array.json_object().unwrap_err();
        assert_eq!(err.kind, ErrorKind::Schema);
        assert!(err.message.contains("array"), "{err}");

        let ok = Record::from_json(&json!({"a": 1}));
        assert_eq!(ok.json_object().unwrap()["a"], json!(1));
    }

    #[test]
    fn headers_and_source() {
        let r = Record::new("x")
            .with_key("k")
            .with_header("trace", "abc")
            .with_header("trace", "second")
            .with_source("events", 3, 42)
            .with_timestamp_ms(1_000);
        assert_eq!(r.header("trace"), Some(&b"abc"[..]));
        assert_eq!(r.header("missing"), None);
        assert_eq!(r.key.as_deref(), Some(&b"k"[..]));
        assert_eq!(r.source.partition, 3);
        assert_eq!(r.source.offset, 42);
        assert_eq!(r.source.timestamp_ms, Some(1_000));

        let back = Record::from(wire::InputRecord::from(r.clone()));
        assert_eq!(back, r);
    }

    #[test]
    fn non_utf8_payload_is_a_parse_error() {
        let r = Record::new(vec![0xff, 0xfe]);
        assert_eq!(r.value_str().unwrap_err().kind, ErrorKind::Parse);
    }
}
