//! The fast way through a record: read the top-level fields of a JSON object without building
//! a tree ([`JsonObject`]), and write the output row's JSON directly ([`RowWriter`]).
//!
//! `record.json_value()` builds a `serde_json::Value` (a map, a `String` per key and string
//! value), and `Output::row(value)` serialises it again: for a ~200-byte event that is most of
//! a plugin's cost. [`JsonObject`] keeps each field's value as its raw JSON text borrowed from
//! the record and converts only the fields asked for; [`RowWriter`] copies fields through as
//! text and appends new ones.
//!
//! ```
//! use sluice_guest::prelude::*;
//!
//! struct Tag;
//!
//! impl Transform for Tag {
//!     fn init(_config: Config) -> Result<Self, String> {
//!         Ok(Tag)
//!     }
//!
//!     fn transform(&self, record: &Record) -> Result<Output, RecordError> {
//!         let event = record.json_fields()?; // not JSON -> `parse`, not an object -> `schema`
//!         let name = event.str("name")?; // missing, null or not a string -> `schema`
//!         let mut row = RowWriter::for_input(record);
//!         row.copy_fields(&event, &["name_upper"]); // every input field but this one
//!         row.str("name_upper", &name.to_uppercase());
//!         Ok(Output::from(row.finish()))
//!     }
//! }
//! # let out = sluice_guest::testing::run_batch::<Tag>("{}", &[Record::new(r#"{"name":"a"}"#)]);
//! # assert_eq!(out.unwrap().outputs[0].value, serde_json::json!({"name": "a", "name_upper": "A"}));
//! ```
//!
//! Getters take a top-level field name (not a JSON pointer) and fail with the same `schema`
//! errors as the [`crate::json`] getters (`field /name: expected a string, found number`).
//! Nested values are reached with [`JsonObject::value`] (a `Value`) or [`JsonObject::parse`]
//! (any `Deserialize` type).
//!
//! A key that appears twice in the input: getters see the last occurrence, as a parsed
//! `Value` would; [`RowWriter::copy_fields`] copies both, and readers of the row (the host's
//! ClickHouse encoder, `serde_json`) take the last one.

use std::borrow::Cow;
use std::fmt::{self, Write as _};

use serde::de::{self, DeserializeOwned};
use serde_json::value::RawValue;
use serde_json::Value;

use crate::json::parse_fixed_point;
use crate::timestamp::{EpochUnit, Timestamp};
use crate::{Record, RecordError, Row};

/// The top-level fields of a JSON object, each value kept as its raw JSON text.
#[derive(Debug, Clone)]
pub struct JsonObject<'a> {
    /// Key and raw JSON text of each field, in input order.
    fields: Vec<(Cow<'a, str>, &'a str)>,
    /// The text the fields borrow from (lets [`RowWriter::copy_fields`] copy runs of fields).
    src: &'a str,
}

/// The JSON type of a raw value, from its first byte (the parser has validated it).
fn raw_type(raw: &str) -> &'static str {
    match raw.as_bytes().first() {
        Some(b'"') => "string",
        Some(b'{') => "object",
        Some(b'[') => "array",
        Some(b't' | b'f') => "boolean",
        Some(b'n') => "null",
        _ => "number",
    }
}

fn wrong_type(name: &str, expected: &str, found: &str) -> RecordError {
    RecordError::schema(format!(
        "field /{name}: expected {expected}, found {}",
        raw_type(found)
    ))
}

impl<'a> JsonObject<'a> {
    /// Reads `json` as an object: a `parse` error if it is not JSON, a `schema` error if it is
    /// JSON of another kind.
    pub fn from_slice(json: &'a [u8]) -> Result<Self, RecordError> {
        // One UTF-8 check of the whole payload, then a parser that does not check each string
        // again (per-string checks cost more, notably inside WebAssembly).
        let src = std::str::from_utf8(json)
            .map_err(|e| RecordError::parse(format!("payload is not valid JSON: {e}")))?;
        if let Some(fields) = scan_flat_object(src) {
            return Ok(JsonObject { fields, src });
        }
        // Everything else (nested values, `\u` escapes, exponents, and every error) goes
        // through serde_json's parser, which stays the reference for what is accepted and for
        // the error messages.
        Self::from_str_with_serde(src)
    }

    /// [`Self::from_slice`] without the fast path.
    fn from_str_with_serde(src: &'a str) -> Result<Self, RecordError> {
        let mut de = serde_json::Deserializer::from_str(src);
        let fields = de::Deserializer::deserialize_any(&mut de, ObjectVisitor)
            .and_then(|fields| de.end().map(|()| fields))
            .map_err(|e| RecordError::parse(format!("payload is not valid JSON: {e}")))?;
        match fields {
            Ok(fields) => Ok(JsonObject {
                fields: fields.into_iter().map(|(k, v)| (k, v.get())).collect(),
                src,
            }),
            Err(kind) => Err(RecordError::schema(format!(
                "payload is a JSON {kind}, expected an object"
            ))),
        }
    }

    /// Where field `(k, v)` lies in the source text, from its key's opening quote to the end
    /// of its value: only for keys borrowed from it (no escapes) and values inside it.
    fn borrowed_span(&self, k: &str, value: &str) -> Option<(usize, usize)> {
        let base = self.src.as_ptr() as usize;
        let key_start = (k.as_ptr() as usize).checked_sub(base)?.checked_sub(1)?;
        let value_start = (value.as_ptr() as usize).checked_sub(base)?;
        let value_end = value_start + value.len();
        let bytes = self.src.as_bytes();
        // Between the key's text and the value: its closing quote, whitespace and a colon.
        let between = bytes.get(key_start + 1 + k.len()..value_start)?;
        let well_formed = bytes.get(key_start) == Some(&b'"')
            && value_end <= bytes.len()
            && between.first() == Some(&b'"')
            && between[1..]
                .iter()
                .all(|&b| matches!(b, b':' | b' ' | b'\t' | b'\n' | b'\r'));
        well_formed.then_some((key_start, value_end))
    }

    /// Number of fields (a repeated key counts each time).
    pub fn len(&self) -> usize {
        self.fields.len()
    }

    pub fn is_empty(&self) -> bool {
        self.fields.is_empty()
    }

    /// The fields in input order: name and raw JSON text.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &'a RawValue)> + '_ {
        self.fields
            .iter()
            .filter_map(|(k, v)| Some((k.as_ref(), as_raw_value(v)?)))
    }

    /// The raw JSON text of field `name` (its last occurrence), `null` included.
    pub fn raw(&self, name: &str) -> Option<&'a RawValue> {
        self.text(name).and_then(as_raw_value)
    }

    /// Field `name`; missing and `null` are `schema` errors.
    pub fn get(&self, name: &str) -> Result<&'a RawValue, RecordError> {
        let v = self.get_text(name)?;
        as_raw_value(v).ok_or_else(|| RecordError::schema(format!("field /{name}: not JSON")))
    }

    /// Field `name`, or `None` when missing or `null`.
    pub fn get_opt(&self, name: &str) -> Option<&'a RawValue> {
        self.get_opt_text(name).and_then(as_raw_value)
    }

    /// The raw JSON text of field `name` (its last occurrence), `null` included.
    fn text(&self, name: &str) -> Option<&'a str> {
        self.fields
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| *v)
    }

    /// The raw text of field `name`; missing and `null` are `schema` errors.
    fn get_text(&self, name: &str) -> Result<&'a str, RecordError> {
        match self.text(name) {
            None => Err(RecordError::schema(format!("missing field /{name}"))),
            Some("null") => Err(RecordError::schema(format!("field /{name} is null"))),
            Some(v) => Ok(v),
        }
    }

    fn get_opt_text(&self, name: &str) -> Option<&'a str> {
        self.text(name).filter(|v| *v != "null")
    }

    /// A string field, borrowed from the record unless it contains escapes.
    pub fn str(&self, name: &str) -> Result<Cow<'a, str>, RecordError> {
        let v = self.get_text(name)?;
        raw_str(v).ok_or_else(|| wrong_type(name, "a string", v))
    }

    /// A string field, or `None` when missing, `null` or not a string.
    pub fn str_opt(&self, name: &str) -> Option<Cow<'a, str>> {
        self.get_opt_text(name).and_then(raw_str)
    }

    /// A string that is not empty (nor only whitespace).
    pub fn non_empty_str(&self, name: &str) -> Result<Cow<'a, str>, RecordError> {
        let s = self.str(name)?;
        if s.trim().is_empty() {
            return Err(RecordError::schema(format!("field /{name} is empty")));
        }
        Ok(s)
    }

    /// An integer that fits `i64`; `1.5` and `1.0` are refused.
    pub fn i64(&self, name: &str) -> Result<i64, RecordError> {
        let v = self.get_text(name)?;
        v.parse().map_err(|_| wrong_type(name, "an integer", v))
    }

    /// A non-negative integer that fits `u64`.
    pub fn u64(&self, name: &str) -> Result<u64, RecordError> {
        let v = self.get_text(name)?;
        v.parse()
            .map_err(|_| wrong_type(name, "a non-negative integer", v))
    }

    pub fn f64(&self, name: &str) -> Result<f64, RecordError> {
        let v = self.get_text(name)?;
        if raw_type(v) != "number" {
            return Err(wrong_type(name, "a number", v));
        }
        v.parse().map_err(|_| wrong_type(name, "a number", v))
    }

    pub fn bool(&self, name: &str) -> Result<bool, RecordError> {
        let v = self.get_text(name)?;
        match v {
            "true" => Ok(true),
            "false" => Ok(false),
            _ => Err(wrong_type(name, "a boolean", v)),
        }
    }

    /// A decimal amount as an integer count of `10^-scale` units, as
    /// [`crate::json::get_fixed_point`]; a JSON number is converted from its text as written.
    pub fn fixed_point(&self, name: &str, scale: u32) -> Result<i64, RecordError> {
        let v = self.get_text(name)?;
        let text = match raw_type(v) {
            "number" => Cow::Borrowed(v),
            "string" => match raw_str(v) {
                Some(Cow::Borrowed(s)) => Cow::Borrowed(s.trim()),
                Some(Cow::Owned(s)) => Cow::Owned(s.trim().to_owned()),
                None => return Err(wrong_type(name, "a number or a numeric string", v)),
            },
            _ => return Err(wrong_type(name, "a number or a numeric string", v)),
        };
        parse_fixed_point(&text, scale).ok_or_else(|| {
            RecordError::schema(format!(
                "field /{name}: {text:?} is not a decimal number that fits in 64 bits at scale {scale}"
            ))
        })
    }

    /// A timestamp given as RFC 3339 text or as an integer epoch in `unit`, as
    /// [`crate::json::get_timestamp`].
    pub fn timestamp(&self, name: &str, unit: EpochUnit) -> Result<Timestamp, RecordError> {
        let v = self.get_text(name)?;
        let parsed = match raw_type(v) {
            "string" => match raw_str(v) {
                Some(s) => Timestamp::parse_rfc3339(&s),
                None => return Err(wrong_type(name, "RFC 3339 text or an integer epoch", v)),
            },
            "number" => match v.parse::<i64>() {
                Ok(epoch) => Timestamp::from_epoch(epoch, unit),
                Err(_) => {
                    return Err(wrong_type(name, "RFC 3339 text or an integer epoch", v));
                }
            },
            _ => return Err(wrong_type(name, "RFC 3339 text or an integer epoch", v)),
        };
        parsed.map_err(|e| RecordError::schema(format!("field /{name}: {e}")))
    }

    /// Field `name` as a `Value` (for nested objects and arrays); missing and `null` are errors.
    pub fn value(&self, name: &str) -> Result<Value, RecordError> {
        self.parse(name)
    }

    /// Field `name` deserialised as `T`; a value that does not fit `T` is a `schema` error.
    pub fn parse<T: DeserializeOwned>(&self, name: &str) -> Result<T, RecordError> {
        let v = self.get_text(name)?;
        serde_json::from_str(v).map_err(|e| RecordError::schema(format!("field /{name}: {e}")))
    }
}

/// `raw` (text the parser validated) as serde_json's raw value type, for the public API.
fn as_raw_value(raw: &str) -> Option<&RawValue> {
    serde_json::from_str(raw).ok()
}

/// The text of a raw JSON string, borrowed when it holds no escapes.
fn raw_str(raw: &str) -> Option<Cow<'_, str>> {
    let inner = raw.strip_prefix('"')?.strip_suffix('"')?;
    if !inner.contains('\\') {
        return Some(Cow::Borrowed(inner));
    }
    serde_json::from_str::<String>(raw).ok().map(Cow::Owned)
}

/// Collects an object's fields; any other JSON value is drained (so syntax errors after it
/// still count) and reported by its type.
struct ObjectVisitor;

type Fields<'a> = Vec<(Cow<'a, str>, &'a RawValue)>;

impl<'de> de::Visitor<'de> for ObjectVisitor {
    type Value = Result<Fields<'de>, &'static str>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut fields = Vec::with_capacity(map.size_hint().unwrap_or(16));
        while let Some(key) = map.next_key_seed(KeySeed)? {
            let value = map.next_value::<&'de RawValue>()?;
            if let Err(why) = value_limits(value.get()) {
                return Err(de::Error::custom(format_args!("{why} in field {key:?}")));
            }
            fields.push((key, value));
        }
        Ok(Ok(fields))
    }

    fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<de::IgnoredAny>()?.is_some() {}
        Ok(Err("array"))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(Err("null"))
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
        Ok(Err("boolean"))
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
        Ok(Err("number"))
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
        Ok(Err("number"))
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
        Ok(Err("number"))
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
        Ok(Err("string"))
    }
}

/// Nesting allowed inside a top-level field: serde_json refuses a document nested 128 deep
/// (the object itself is one level).
const MAX_FIELD_DEPTH: usize = 126;

/// Checks what capturing a raw value does not, but parsing into a `Value` does, so that the
/// same input is a `parse` error either way: every number fits an `f64` (no `1e400`), and
/// nesting stays within serde_json's recursion limit, and `\u` escapes are valid UTF-16 (no
/// lone surrogates).
fn value_limits(raw: &str) -> Result<(), &'static str> {
    let b = raw.as_bytes();
    // Rare: decode the value fully to have its escapes checked.
    if has_unicode_escape(b) {
        let decoded = match b.first() {
            Some(b'"') => serde_json::from_str::<String>(raw).map(drop),
            _ => serde_json::from_str::<Value>(raw).map(drop),
        };
        if decoded.is_err() {
            return Err("invalid escape");
        }
    }
    match b.first() {
        Some(b'"' | b't' | b'f' | b'n') | None => return Ok(()),
        _ => {}
    }
    let mut depth = 0usize;
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'[' | b'{' => {
                depth += 1;
                if depth > MAX_FIELD_DEPTH {
                    return Err("recursion limit exceeded");
                }
                i += 1;
            }
            b']' | b'}' => {
                depth = depth.saturating_sub(1);
                i += 1;
            }
            b'"' => {
                i += 1;
                while i < b.len() {
                    match b[i] {
                        b'\\' => i += 2,
                        b'"' => {
                            i += 1;
                            break;
                        }
                        _ => i += 1,
                    }
                }
            }
            b'-' | b'0'..=b'9' => {
                let start = i;
                while i < b.len() && matches!(b[i], b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9')
                {
                    i += 1;
                }
                let number = &raw[start..i];
                // Only an exponent or more than 300 digits can go beyond f64's range.
                if (number.len() > 300 || number.contains(['e', 'E']))
                    && !number.parse::<f64>().is_ok_and(f64::is_finite)
                {
                    return Err("number out of range");
                }
            }
            _ => i += 1,
        }
    }
    Ok(())
}

/// The fields of `src` when it is a flat object [`sluice_flat_json`] reads in one pass: the
/// shape of most events. Such values never need [`value_limits`]' checks (no `\u` escapes,
/// exponents or nesting). `None`: ask serde_json.
fn scan_flat_object(src: &str) -> Option<Vec<(Cow<'_, str>, &str)>> {
    let mut fields = Vec::with_capacity(16);
    sluice_flat_json::for_each_field(src, |k, v| fields.push((Cow::Borrowed(k), v)))
        .then_some(fields)
}

/// An object key, borrowed unless it contains escapes.
struct KeySeed;

impl<'de> de::DeserializeSeed<'de> for KeySeed {
    type Value = Cow<'de, str>;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_str(KeyVisitor)
    }
}

struct KeyVisitor;

impl<'de> de::Visitor<'de> for KeyVisitor {
    type Value = Cow<'de, str>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string")
    }

    fn visit_borrowed_str<E: de::Error>(self, s: &'de str) -> Result<Self::Value, E> {
        Ok(Cow::Borrowed(s))
    }

    fn visit_str<E: de::Error>(self, s: &str) -> Result<Self::Value, E> {
        Ok(Cow::Owned(s.to_owned()))
    }

    fn visit_string<E: de::Error>(self, s: String) -> Result<Self::Value, E> {
        Ok(Cow::Owned(s))
    }
}

/// Writes one output row's JSON object field by field, straight into its bytes.
///
/// Keys and string values are escaped as JSON requires; the writer does not check for
/// repeated keys (readers take the last one).
#[derive(Debug, Clone)]
pub struct RowWriter {
    buf: Vec<u8>,
}

impl Default for RowWriter {
    fn default() -> Self {
        Self::new()
    }
}

impl RowWriter {
    pub fn new() -> Self {
        Self::with_capacity(256)
    }

    /// A writer with room for `bytes` of JSON.
    pub fn with_capacity(bytes: usize) -> Self {
        let mut buf = Vec::with_capacity(bytes.max(2));
        buf.push(b'{');
        RowWriter { buf }
    }

    /// A writer sized for a row derived from `record` (its payload plus room for new fields).
    pub fn for_input(record: &Record) -> Self {
        Self::with_capacity(record.value.len() + 192)
    }

    fn key(&mut self, key: &str) {
        if self.buf.len() > 1 {
            self.buf.push(b',');
        }
        write_json_str(&mut self.buf, key);
        self.buf.push(b':');
    }

    /// A field whose value is already JSON text (e.g. from [`JsonObject::raw`]).
    pub fn raw(&mut self, key: &str, value: &RawValue) -> &mut Self {
        self.key(key);
        self.buf.extend_from_slice(value.get().as_bytes());
        self
    }

    /// Copies every field of `object`, in order, except those named in `except` (typically
    /// the fields this row sets itself).
    pub fn copy_fields(&mut self, object: &JsonObject<'_>, except: &[&str]) -> &mut Self {
        // Consecutive copied fields are one span of the input text (`"a":1,"b":2`): copied
        // with one `memcpy` per run rather than two per field.
        let mut run: Option<(usize, usize)> = None;
        for (k, v) in &object.fields {
            if except.contains(&k.as_ref()) {
                self.flush_run(object.src, run.take());
                continue;
            }
            let span = match k {
                Cow::Borrowed(b) => object.borrowed_span(b, v),
                Cow::Owned(_) => None,
            };
            match (span, run) {
                (Some((_, end)), Some((run_start, _))) => run = Some((run_start, end)),
                (Some(span), None) => run = Some(span),
                (None, _) => {
                    self.flush_run(object.src, run.take());
                    self.key(k);
                    self.buf.extend_from_slice(v.as_bytes());
                }
            }
        }
        self.flush_run(object.src, run);
        self
    }

    /// Appends `src[start..end]`, a run of whole fields, after a comma if needed.
    fn flush_run(&mut self, src: &str, run: Option<(usize, usize)>) {
        if let Some(text) = run.and_then(|(start, end)| src.get(start..end)) {
            if self.buf.len() > 1 {
                self.buf.push(b',');
            }
            self.buf.extend_from_slice(text.as_bytes());
        }
    }

    pub fn str(&mut self, key: &str, value: &str) -> &mut Self {
        self.key(key);
        write_json_str(&mut self.buf, value);
        self
    }

    /// A string field holding `value`'s `Display` text (e.g. a [`Timestamp`]), written
    /// without an intermediate `String`.
    pub fn display(&mut self, key: &str, value: &impl fmt::Display) -> &mut Self {
        self.key(key);
        self.buf.push(b'"');
        let start = self.buf.len();
        let mut w = Utf8Sink(&mut self.buf);
        // Writing into a Vec cannot fail.
        let _ = write!(w, "{value}");
        // Rare: the text needs escaping; redo it through the escaper.
        if needs_escape(&self.buf[start..]) {
            let text = String::from_utf8_lossy(&self.buf[start..]).into_owned();
            self.buf.truncate(start - 1);
            write_json_str(&mut self.buf, &text);
        } else {
            self.buf.push(b'"');
        }
        self
    }

    pub fn i64(&mut self, key: &str, value: i64) -> &mut Self {
        self.key(key);
        if value < 0 {
            self.buf.push(b'-');
        }
        write_u64(&mut self.buf, value.unsigned_abs());
        self
    }

    pub fn u64(&mut self, key: &str, value: u64) -> &mut Self {
        self.key(key);
        write_u64(&mut self.buf, value);
        self
    }

    /// A number; NaN and infinities (which JSON cannot hold) are written as `null`.
    pub fn f64(&mut self, key: &str, value: f64) -> &mut Self {
        self.key(key);
        if value.is_finite() {
            // `Debug` of f64 is the shortest text that reads back as the same number, and
            // always has a `.` or an exponent, as serde_json writes floats.
            let _ = write!(Utf8Sink(&mut self.buf), "{value:?}");
        } else {
            self.buf.extend_from_slice(b"null");
        }
        self
    }

    pub fn bool(&mut self, key: &str, value: bool) -> &mut Self {
        self.key(key);
        self.buf
            .extend_from_slice(if value { b"true" } else { b"false" });
        self
    }

    pub fn null(&mut self, key: &str) -> &mut Self {
        self.key(key);
        self.buf.extend_from_slice(b"null");
        self
    }

    /// Any serialisable value (objects, arrays, ...). Values that cannot be JSON (maps with
    /// non-string keys) are an `other` error.
    pub fn value(
        &mut self,
        key: &str,
        value: &impl serde::Serialize,
    ) -> Result<&mut Self, RecordError> {
        let start = self.buf.len();
        self.key(key);
        if let Err(e) = serde_json::to_writer(&mut self.buf, value) {
            self.buf.truncate(start);
            return Err(RecordError::other(format!(
                "cannot serialise field {key:?}: {e}"
            )));
        }
        Ok(self)
    }

    /// The finished row for the pipeline's default table (see [`Row::for_table`]).
    pub fn finish(mut self) -> Row {
        self.buf.push(b'}');
        Row::from_object_bytes(self.buf)
    }
}

/// `fmt::Write` into a byte vector (what is written is UTF-8 text).
struct Utf8Sink<'a>(&'a mut Vec<u8>);

impl fmt::Write for Utf8Sink<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}

/// Appends `v` in decimal (without `core::fmt`, which is slow inside WebAssembly).
fn write_u64(buf: &mut Vec<u8>, mut v: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    buf.extend_from_slice(&digits[i..]);
}

/// Whether `b` holds a byte that a JSON string literal must escape: a control character, `"`
/// or `\` (flat-json's scan, eight bytes per step).
fn needs_escape(b: &[u8]) -> bool {
    sluice_flat_json::first_special(b, 0) < b.len()
}

/// Whether raw JSON text holds a `\u` escape (possibly preceded by another backslash: a
/// false hit only costs a full check).
fn has_unicode_escape(b: &[u8]) -> bool {
    // Only values the one-pass reader declined get here (see `value_limits`): a byte loop.
    let mut rest = b;
    while let Some(p) = rest.iter().position(|&c| c == b'\\') {
        if rest.get(p + 1) == Some(&b'u') {
            return true;
        }
        rest = rest.get(p + 2..).unwrap_or_default();
    }
    false
}

/// Appends `s` as a JSON string literal.
fn write_json_str(buf: &mut Vec<u8>, s: &str) {
    if !needs_escape(s.as_bytes()) {
        buf.push(b'"');
        buf.extend_from_slice(s.as_bytes());
        buf.push(b'"');
    } else {
        // Serialising a `str` into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut *buf, s);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;
    use serde_json::json;

    #[test]
    fn integers_and_unicode_escapes() {
        for v in [0u64, 7, 10, 99, 100, 12345, u64::MAX] {
            let mut buf = Vec::new();
            write_u64(&mut buf, v);
            assert_eq!(buf, v.to_string().into_bytes());
        }
        let mut w = RowWriter::new();
        w.i64("a", i64::MIN).i64("b", -5).i64("c", 0).u64("d", 42);
        let row = w.finish();
        assert_eq!(
            row.value().unwrap(),
            br#"{"a":-9223372036854775808,"b":-5,"c":0,"d":42}"#
        );
        assert!(has_unicode_escape(br#""a\u00e9""#));
        assert!(has_unicode_escape(br#""\u""#));
        assert!(!has_unicode_escape(br#""a\nb\\""#));
        assert!(!has_unicode_escape(br#""\""#));
        assert!(!has_unicode_escape(b"plain"));
    }

    #[test]
    fn copy_fields_copies_runs_verbatim_and_escapes_the_rest() {
        let text = "{ \"a\" : 1 ,\"b\":\"x\",\n\"skip\":[1, 2],\"c\\u0041\":{\"n\":null}, \"d\":true,\"e\":-2.5e3 }";
        let o = obj(text);
        let mut w = RowWriter::new();
        w.str("first", "v")
            .copy_fields(&o, &["skip", "e"])
            .i64("last", 7);
        let row = w.finish();
        let out = std::str::from_utf8(row.value().unwrap()).unwrap();
        assert_eq!(
            out,
            "{\"first\":\"v\",\"a\" : 1 ,\"b\":\"x\",\"cA\":{\"n\":null},\"d\":true,\"last\":7}"
        );
        let v: Value = serde_json::from_str(out).unwrap();
        assert_eq!(
            v,
            json!({"first": "v", "a": 1, "b": "x", "cA": {"n": null}, "d": true, "last": 7})
        );
        // Nothing copied: the writer stays an empty object.
        let mut w = RowWriter::new();
        w.copy_fields(&obj("{\"a\":1}"), &["a"]);
        assert_eq!(w.finish().value().unwrap(), b"{}");
        // Every field of the input, the same bytes.
        let mut w = RowWriter::new();
        w.copy_fields(&obj(r#"{"x":[1,{"y":"z"}],"w":"\n"}"#), &[]);
        assert_eq!(
            w.finish().value().unwrap(),
            br#"{"x":[1,{"y":"z"}],"w":"\n"}"#
        );
    }

    fn obj(text: &str) -> JsonObject<'_> {
        JsonObject::from_slice(text.as_bytes()).unwrap()
    }

    #[test]
    fn reads_fields_without_a_tree() {
        let text = r#"{"id":"tx-1","n":-3,"u":42,"r":0.5,"b":true,"z":null,
            "e":"a\"b","o":{"k":[1,2]},"id":"tx-2","amount":"19.99","cents":19.99}"#;
        let o = obj(text);
        assert_eq!(o.len(), 11);
        assert_eq!(
            o.str("id").unwrap(),
            "tx-2",
            "the last of repeated keys wins"
        );
        assert!(matches!(o.str("id").unwrap(), Cow::Borrowed(_)));
        assert_eq!(o.str("e").unwrap(), "a\"b");
        assert_eq!(o.i64("n").unwrap(), -3);
        assert_eq!(o.u64("u").unwrap(), 42);
        assert_eq!(o.f64("r").unwrap(), 0.5);
        assert_eq!(o.f64("u").unwrap(), 42.0);
        assert!(o.bool("b").unwrap());
        assert_eq!(o.value("o").unwrap(), json!({"k": [1, 2]}));
        assert_eq!(o.parse::<Vec<u8>>("o").unwrap_err().kind, ErrorKind::Schema);
        assert_eq!(o.fixed_point("amount", 2).unwrap(), 1999);
        assert_eq!(o.fixed_point("cents", 2).unwrap(), 1999);
        assert_eq!(o.get_opt("z").map(RawValue::get), None);
        assert_eq!(o.raw("z").map(RawValue::get), Some("null"));
        assert_eq!(o.str_opt("n"), None);
    }

    #[test]
    fn errors_match_the_pointer_getters() {
        let text = r#"{"id":"tx-1","blank":" ","user":{"id":42},"neg":-3,"ratio":0.5,"nothing":null,"ts":1.5}"#;
        let o = obj(text);
        let v: Value = serde_json::from_str(text).unwrap();
        let pairs: [(Result<(), RecordError>, Result<(), RecordError>); 9] = [
            (
                o.str("missing").map(drop),
                crate::json::get_str(&v, "/missing").map(drop),
            ),
            (
                o.str("nothing").map(drop),
                crate::json::get_str(&v, "/nothing").map(drop),
            ),
            (
                o.str("neg").map(drop),
                crate::json::get_str(&v, "/neg").map(drop),
            ),
            (
                o.non_empty_str("blank").map(drop),
                crate::json::get_non_empty_str(&v, "/blank").map(drop),
            ),
            (
                o.u64("neg").map(drop),
                crate::json::get_u64(&v, "/neg").map(drop),
            ),
            (
                o.i64("ratio").map(drop),
                crate::json::get_i64(&v, "/ratio").map(drop),
            ),
            (
                o.bool("id").map(drop),
                crate::json::get_bool(&v, "/id").map(drop),
            ),
            (
                o.fixed_point("user", 2).map(drop),
                crate::json::get_fixed_point(&v, "/user", 2).map(drop),
            ),
            (
                o.timestamp("ts", EpochUnit::Millis).map(drop),
                crate::json::get_timestamp(&v, "/ts", EpochUnit::Millis).map(drop),
            ),
        ];
        for (fast, tree) in pairs {
            let (fast, tree) = (fast.unwrap_err(), tree.unwrap_err());
            assert_eq!(fast, tree);
            assert_eq!(fast.kind, ErrorKind::Schema);
        }
    }

    #[test]
    fn classifies_bad_payloads() {
        for (text, kind, needle) in [
            ("{\"a\":", ErrorKind::Parse, "not valid JSON"),
            ("{\"a\":1} x", ErrorKind::Parse, "trailing characters"),
            ("[1, 2", ErrorKind::Parse, "not valid JSON"),
            (
                "[1, 2]",
                ErrorKind::Schema,
                "a JSON array, expected an object",
            ),
            ("\"s\"", ErrorKind::Schema, "a JSON string"),
            ("7", ErrorKind::Schema, "a JSON number"),
        ] {
            let e = JsonObject::from_slice(text.as_bytes()).unwrap_err();
            assert_eq!(e.kind, kind, "{text}");
            assert!(e.message.contains(needle), "{text}: {e}");
        }
        let e = JsonObject::from_slice(b"{\"a\":\"\xff\"}").unwrap_err();
        assert_eq!(e.kind, ErrorKind::Parse);
        // Numbers beyond f64, at the top level or nested, are refused as `Value` refuses them.
        for text in [r#"{"x":1e400}"#, r#"{"x":[1,{"y":-2E+309}]}"#] {
            assert!(serde_json::from_str::<Value>(text).is_err());
            let e = JsonObject::from_slice(text.as_bytes()).unwrap_err();
            assert_eq!(e.kind, ErrorKind::Parse, "{text}");
            assert!(e.message.contains("number out of range"), "{e}");
        }
        // Lone surrogates: refused as a `Value` refuses them; valid pairs are fine.
        for (text, valid) in [
            (r#"{"a":"x\ud800"}"#, false),
            (r#"{"a":[{"b":"\udc00y"}]}"#, false),
            (r#"{"a":"\ud83d\ude00","b":["\u00e9"]}"#, true),
        ] {
            assert_eq!(serde_json::from_str::<Value>(text).is_ok(), valid, "{text}");
            match JsonObject::from_slice(text.as_bytes()) {
                Ok(o) => {
                    assert!(valid, "{text}");
                    assert_eq!(o.str("a").unwrap(), "\u{1f600}");
                }
                Err(e) => {
                    assert!(!valid, "{text}");
                    assert_eq!(e.kind, ErrorKind::Parse, "{text}");
                }
            }
        }
        // Nesting: refused exactly where serde_json's recursion limit refuses a `Value`.
        for depth in 120..135 {
            let text = format!(
                r#"{{"a":{}{},"b":1}}"#,
                "[".repeat(depth),
                "]".repeat(depth)
            );
            let tree = serde_json::from_str::<Value>(&text).is_ok();
            let fast = JsonObject::from_slice(text.as_bytes());
            assert_eq!(fast.is_ok(), tree, "depth {depth}");
            if let Err(e) = fast {
                assert_eq!(e.kind, ErrorKind::Parse);
            }
        }
        let ok = r#"{"x":[1e300,"1e400",{"1e400":-1e-400}],"y":123456789012345678901234567890}"#;
        assert!(serde_json::from_str::<Value>(ok).is_ok());
        assert_eq!(obj(ok).len(), 2);
    }

    #[test]
    fn writes_rows() {
        let o = obj(r#"{"a":1,"b":{"x":[true]},"drop":"me","s":"q\"uote"}"#);
        let mut w = RowWriter::new();
        w.copy_fields(&o, &["drop"])
            .str("k\"ey", "tab\t")
            .i64("i", -5)
            .u64("u", 7)
            .f64("f", 2.0)
            .f64("nan", f64::NAN)
            .bool("t", true)
            .null("n")
            .display("ts", &Timestamp::from_epoch_millis(1_000).unwrap());
        w.value("v", &json!([1, "x"])).unwrap();
        let row = w.finish();
        let text = std::str::from_utf8(row.value().unwrap()).unwrap();
        let parsed: Value = serde_json::from_str(text).unwrap();
        assert_eq!(
            parsed,
            json!({"a": 1, "b": {"x": [true]}, "s": "q\"uote", "k\"ey": "tab\t", "i": -5,
                   "u": 7, "f": 2.0, "nan": null, "t": true, "n": null,
                   "ts": "1970-01-01T00:00:01.000Z", "v": [1, "x"]})
        );
        assert!(
            text.starts_with(r#"{"a":1,"b":{"x":[true]},"s":"q\"uote","#),
            "{text}"
        );
        assert_eq!(RowWriter::new().finish().value(), Ok(&b"{}"[..]));
    }

    /// The one-pass reader (tested against serde_json in its own crate) and the serde_json path
    /// read the same fields, so which one ran never shows.
    #[test]
    fn flat_reader_and_serde_path_agree() {
        let event = r#"{"id":"tx-000123","user_id":42,"amount":"19.99","currency":"EUR","ts":"2026-11-23T10:00:00.123Z","kind":"pur\"chase","n":-1.5,"ok":true,"z":null}"#;
        for text in [
            event,
            "{}",
            r#" { "a" : 1 , "a" : "x" } "#,
            r#"{"big":12345678901234567890}"#,
        ] {
            let fast = scan_flat_object(text).unwrap();
            assert_eq!(
                fast,
                JsonObject::from_str_with_serde(text).unwrap().fields,
                "{text}"
            );
        }
        assert_eq!(obj(event).len(), 9);
        for not_flat in [
            r#"{"a":{"b":1}}"#,
            r#"{"a":1e3}"#,
            r#"{"a":"\u00e9"}"#,
            r#"{"k\"":1}"#,
        ] {
            assert!(scan_flat_object(not_flat).is_none(), "{not_flat}");
            assert_eq!(obj(not_flat).len(), 1, "{not_flat}");
        }
    }
}
