//! What the stateful built-in stages (dedup, joins) share: JSON pointers and keys, event time,
//! durations, order-preserving encodings of times, and bounded sweeps of time-ordered indexes.
//!
//! Nothing here keeps anything per key in memory: keys live in RocksDB (through
//! [`StageState`]), so state size is bounded by disk, not RAM. (The dedup stage adds an
//! in-memory index of its keys on top, see `dedup::index`.)

use std::borrow::Cow;
use std::fmt;
use std::time::Duration;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize, Serializer};
use serde_json::Value;

use crate::record::{DeadLetter, Record};
use crate::state::{StageState, StateError, StateTxn};

use super::{BatchContext, StageError, StageOutput};

// ---------------------------------------------------------------------------------------------
// Config types
// ---------------------------------------------------------------------------------------------

/// A JSON pointer (RFC 6901) into a record, e.g. `/user/id`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct Pointer(String);

impl Pointer {
    pub fn parse(s: &str) -> Result<Self, String> {
        if s.is_empty() || !s.starts_with('/') {
            return Err(format!(
                "{s:?} is not a JSON pointer (it must start with '/', e.g. \"/user_id\")"
            ));
        }
        Ok(Self(s.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Pointer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Pointer {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Pointer::parse(&s).map_err(de::Error::custom)
    }
}

/// One or more JSON pointers whose values together form a key: `/id` or `[/id, /source]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct KeyPointers(Vec<Pointer>);

impl KeyPointers {
    pub fn new(pointers: Vec<Pointer>) -> Result<Self, String> {
        if pointers.is_empty() {
            return Err("a key needs at least one JSON pointer".into());
        }
        Ok(Self(pointers))
    }

    pub fn pointers(&self) -> &[Pointer] {
        &self.0
    }
}

impl<'de> Deserialize<'de> for KeyPointers {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = KeyPointers;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON pointer such as \"/id\" or a list of them")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<KeyPointers, E> {
                let p = Pointer::parse(s).map_err(E::custom)?;
                KeyPointers::new(vec![p]).map_err(E::custom)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<KeyPointers, A::Error> {
                let mut v = Vec::new();
                while let Some(p) = seq.next_element::<Pointer>()? {
                    v.push(p);
                }
                KeyPointers::new(v).map_err(de::Error::custom)
            }
        }
        d.deserialize_any(V)
    }
}

/// A duration written as `24h`, `30m`, `10s`, `500ms`, `7d` or combinations such as `1h30m`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct HumanDuration(pub Duration);

impl HumanDuration {
    pub fn as_millis_i64(self) -> i64 {
        i64::try_from(self.0.as_millis()).unwrap_or(i64::MAX)
    }
}

/// Parses `1h30m`-style durations. Units: `ms`, `s`, `m`, `h`, `d`; `0` alone is zero.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let s = text.trim();
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    let bad = || {
        format!("{text:?} is not a duration (write e.g. \"24h\", \"30m\", \"10s\", \"500ms\", \"1h30m\")")
    };
    if s.is_empty() {
        return Err(bad());
    }
    let mut total: u128 = 0;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(bad());
        }
        let n: u128 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let unit_len = rest.bytes().take_while(u8::is_ascii_alphabetic).count();
        let unit_ms: u128 = match &rest[..unit_len] {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            _ => return Err(bad()),
        };
        rest = &rest[unit_len..];
        total = n
            .checked_mul(unit_ms)
            .and_then(|x| total.checked_add(x))
            .ok_or_else(bad)?;
    }
    let ms = u64::try_from(total).map_err(|_| bad())?;
    Ok(Duration::from_millis(ms))
}

/// The shortest `1h30m`-style spelling of a whole number of milliseconds.
pub fn format_duration(d: Duration) -> String {
    let mut ms = d.as_millis();
    if ms == 0 {
        return "0".into();
    }
    let mut out = String::new();
    for (unit, len) in [
        ("d", 86_400_000u128),
        ("h", 3_600_000),
        ("m", 60_000),
        ("s", 1_000),
        ("ms", 1),
    ] {
        if ms >= len {
            out.push_str(&format!("{}{unit}", ms / len));
            ms %= len;
        }
    }
    out
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        parse_duration(&s)
            .map(HumanDuration)
            .map_err(de::Error::custom)
    }
}

impl Serialize for HumanDuration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format_duration(self.0))
    }
}

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&format_duration(self.0))
    }
}

/// How an event-time field is written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimeFormat {
    /// Numbers are epoch milliseconds, strings RFC 3339 (or digits: epoch milliseconds).
    #[default]
    Auto,
    /// RFC 3339 text, e.g. `2026-11-23T10:00:00.123Z`.
    Rfc3339,
    /// Milliseconds since the epoch (a number or a numeric string).
    EpochMs,
    /// Seconds since the epoch (a number, fractions allowed, or a numeric string).
    EpochS,
}

/// An event-time field of a record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventTimeConfig {
    /// JSON pointer to the field, e.g. `/ts`.
    pub field: Pointer,
    /// `auto` (default), `rfc3339`, `epoch_ms` or `epoch_s`.
    #[serde(default)]
    pub format: TimeFormat,
}

/// Output shape of a join: how the right record's fields are added to the left record.
/// Exactly one of `nest` and `prefix` is set (checked by [`OutputShape::from_parts`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutputShape {
    /// The right record (a JSON value) under this field; `null` when unmatched.
    Nest(String),
    /// The right record's fields copied with this prefix. With `fields`, only those, and set to
    /// `null` when unmatched; without, all of them (and none when unmatched).
    Prefix {
        prefix: String,
        fields: Option<Vec<String>>,
    },
}

impl OutputShape {
    pub fn from_parts(
        nest: Option<&str>,
        prefix: Option<&str>,
        fields: Option<&[String]>,
    ) -> Result<Self, String> {
        match (nest, prefix) {
            (Some(_), Some(_)) => Err("set either `nest` or `prefix`, not both".into()),
            (None, None) => Err(
                "set `nest: <field>` (right record under a field) or `prefix: <text>` (right fields copied with a prefix)"
                    .into(),
            ),
            (Some(n), None) => {
                if n.is_empty() {
                    return Err("`nest` must not be empty".into());
                }
                if fields.is_some() {
                    return Err("`fields` goes with `prefix`, not `nest`".into());
                }
                Ok(Self::Nest(n.to_string()))
            }
            (None, Some(p)) => Ok(Self::Prefix {
                prefix: p.to_string(),
                fields: fields.map(<[String]>::to_vec),
            }),
        }
    }

    /// Adds `right` (or its absence) to the left JSON object.
    pub fn merge(
        &self,
        left: &mut serde_json::Map<String, Value>,
        right: Option<&Value>,
    ) -> Result<(), String> {
        match self {
            Self::Nest(field) => {
                left.insert(field.clone(), right.cloned().unwrap_or(Value::Null));
            }
            Self::Prefix { prefix, fields } => match (right, fields) {
                (Some(Value::Object(r)), None) => {
                    for (k, v) in r {
                        left.insert(format!("{prefix}{k}"), v.clone());
                    }
                }
                (Some(Value::Object(r)), Some(fields)) => {
                    for f in fields {
                        left.insert(
                            format!("{prefix}{f}"),
                            r.get(f).cloned().unwrap_or(Value::Null),
                        );
                    }
                }
                (Some(_), _) => {
                    return Err("the right record is not a JSON object (needed by `prefix`)".into())
                }
                (None, Some(fields)) => {
                    for f in fields {
                        left.insert(format!("{prefix}{f}"), Value::Null);
                    }
                }
                (None, None) => {}
            },
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Reading records
// ---------------------------------------------------------------------------------------------

/// A record-level problem: the record goes to the dead-letter topic with this kind and message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reject {
    pub kind: &'static str,
    pub message: String,
}

impl Reject {
    pub fn schema(message: impl Into<String>) -> Self {
        Self {
            kind: "schema",
            message: message.into(),
        }
    }

    pub fn into_dead_letter(self, stage: &str, record: &Record) -> DeadLetter {
        DeadLetter {
            origin: record.origin.clone(),
            stage: stage.to_string(),
            plugin: None,
            kind: self.kind.to_string(),
            message: self.message,
        }
    }
}

/// `Ok` values pass; a [`Reject`] becomes a dead letter of `record` (from `stage`) in `out`.
pub fn or_dead_letter<T>(
    res: Result<T, Reject>,
    out: &mut StageOutput,
    stage: &str,
    record: &Record,
) -> Option<T> {
    match res {
        Ok(v) => Some(v),
        Err(reject) => {
            out.dead_letters
                .push(reject.into_dead_letter(stage, record));
            None
        }
    }
}

/// Runs `f` on `stage`'s state for the batch's partition; a state failure fails the batch.
pub fn with_state<T>(
    state: &mut StateTxn<'_>,
    stage: &str,
    ctx: &BatchContext,
    f: impl FnOnce(&mut StageState<'_, '_>) -> Result<T, StateError>,
) -> Result<T, StageError> {
    let mut st = state.stage(stage, ctx.partition.partition);
    f(&mut st).map_err(|e| state_error(stage, e))
}

/// A record whose value does not parse as JSON.
pub fn not_json(e: impl fmt::Display) -> Reject {
    Reject {
        kind: "parse",
        message: format!("value is not JSON: {e}"),
    }
}

/// The record's value as JSON.
pub fn parse_json(record: &Record) -> Result<Value, Reject> {
    serde_json::from_slice(&record.value).map_err(not_json)
}

/// Where a keyed stage finds a record's event time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TimeSource {
    /// A field of the record.
    Field(EventTimeConfig),
    /// The Kafka message timestamp.
    Kafka,
}

/// Where a keyed stage finds a record's key (and event time): compiled once per stage, so each
/// record costs one pass over its bytes that builds only the values at the pointers.
#[derive(Debug, Clone)]
pub struct KeySpec {
    key: KeyPointers,
    time: Option<TimeSource>,
    paths: PathTree,
    /// No pointer is a prefix of another: the pointed-at values can be read without the tree.
    sparse: bool,
    /// Per slot: the pointer's first token (unescaped) and the pointer below it (`""` for none).
    tops: Vec<(String, String)>,
}

impl KeySpec {
    pub fn new(key: &KeyPointers, time: Option<TimeSource>) -> Self {
        let mut pointers: Vec<&Pointer> = key.pointers().iter().collect();
        if let Some(TimeSource::Field(t)) = &time {
            pointers.push(&t.field);
        }
        let mut paths = PathTree::default();
        let mut sparse = true;
        for (slot, p) in pointers.iter().enumerate() {
            sparse &= paths.insert(p, slot);
        }
        let tops = pointers
            .iter()
            .map(|p| {
                // Pointers start with '/' (checked when parsed).
                let below_root = p.as_str().get(1..).unwrap_or_default();
                let (first, rest) =
                    below_root.split_at(below_root.find('/').unwrap_or(below_root.len()));
                (unescape_token(first), rest.to_string())
            })
            .collect();
        Self {
            key: key.clone(),
            time,
            paths,
            sparse,
            tops,
        }
    }

    /// Key and event time (0 without a time source) of a record, read from its bytes. The whole
    /// value must be JSON; only the pointed-at values are built.
    pub fn read(&self, record: &Record) -> Result<(Vec<u8>, i64), Reject> {
        if !self.sparse {
            return self.read_value(record, &parse_json(record)?);
        }
        // Validated up front so that strings the pass skips are UTF-8 too, as in a full parse.
        let text = std::str::from_utf8(&record.value).map_err(not_json)?;
        // Most records: a flat object, read in one pass that only marks where the wanted
        // fields are (the last of a repeated name wins, as below).
        let mut raws: Vec<Option<&str>> = vec![None; self.tops.len()];
        let flat = sluice_flat_json::for_each_field(text, |name, raw| {
            for ((first, _), slot) in self.tops.iter().zip(raws.iter_mut()) {
                if first == name {
                    *slot = Some(raw);
                }
            }
        });
        if flat {
            return self.read_raw(record, |slot| raws.get(slot).copied().flatten());
        }
        let mut found = vec![None; self.paths.slots.len()];
        let mut de = serde_json::Deserializer::from_str(text);
        Seek {
            node: &self.paths,
            found: &mut found,
        }
        .deserialize(&mut de)
        .and_then(|()| de.end())
        .map_err(not_json)?;
        self.finish(record, |slot| found[slot].as_ref())
    }

    /// The same from an already parsed value.
    pub fn read_value(&self, record: &Record, value: &Value) -> Result<(Vec<u8>, i64), Reject> {
        let pointers = self.key.pointers();
        self.finish(record, |slot| match pointers.get(slot) {
            Some(p) => value.pointer(p.as_str()),
            None => match &self.time {
                Some(TimeSource::Field(t)) => value.pointer(t.field.as_str()),
                _ => None,
            },
        })
    }

    /// The same from a JSON object's top-level fields: `field(name)` is the raw JSON text of
    /// field `name`. Only the values at the pointers' first tokens are parsed.
    pub fn read_fields<'t>(
        &self,
        record: &Record,
        field: impl Fn(&str) -> Option<&'t str>,
    ) -> Result<(Vec<u8>, i64), Reject> {
        self.read_raw(record, |slot| {
            self.tops.get(slot).and_then(|(first, _)| field(first))
        })
    }

    /// The same from the raw JSON text of each pointer's first token (`raw(slot)`).
    fn read_raw<'t>(
        &self,
        record: &Record,
        raw: impl Fn(usize) -> Option<&'t str>,
    ) -> Result<(Vec<u8>, i64), Reject> {
        let mut found: Vec<Option<Value>> = Vec::with_capacity(self.tops.len());
        for (slot, (_, rest)) in self.tops.iter().enumerate() {
            let value = match raw(slot) {
                None => None,
                Some(raw) => {
                    let mut v: Value = serde_json::from_str(raw).map_err(not_json)?;
                    if rest.is_empty() {
                        Some(v)
                    } else {
                        v.pointer_mut(rest).map(Value::take)
                    }
                }
            };
            found.push(value);
        }
        self.finish(record, |slot| found.get(slot).and_then(Option::as_ref))
    }

    /// Key from slots `0..n`, time from slot `n` (`n` key pointers).
    fn finish<'v>(
        &self,
        record: &Record,
        at: impl Fn(usize) -> Option<&'v Value>,
    ) -> Result<(Vec<u8>, i64), Reject> {
        let pointers = self.key.pointers();
        let key = key_from_parts(pointers.iter().enumerate().map(|(i, p)| (p, at(i))))?;
        let ts = match &self.time {
            None => 0,
            Some(TimeSource::Field(t)) => time_at(at(pointers.len()), t)?,
            Some(TimeSource::Kafka) => record.origin.timestamp_ms.ok_or_else(|| {
                Reject::schema(
                    "the Kafka message has no timestamp (set `time.field` to use an event-time field)",
                )
            })?,
        };
        Ok((key, ts))
    }
}

/// JSON pointers as a tree of their tokens; `slots` are the outputs at or below a node.
#[derive(Debug, Clone, Default)]
struct PathTree {
    /// Outputs that take this node's value.
    here: Vec<usize>,
    /// Every output at or below this node.
    slots: Vec<usize>,
    /// (unescaped token, its array index if it is one, subtree).
    children: Vec<(String, Option<usize>, PathTree)>,
}

impl PathTree {
    /// Adds `pointer` as output `slot`. `false` when a pointer lies inside another's value.
    fn insert(&mut self, pointer: &Pointer, slot: usize) -> bool {
        let mut node = self;
        node.slots.push(slot);
        let mut nested = false;
        // The same tokens as `serde_json::Value::pointer`.
        for token in pointer.as_str().split('/').skip(1) {
            nested |= !node.here.is_empty();
            let token = unescape_token(token);
            let i = match node.children.iter().position(|(t, _, _)| *t == token) {
                Some(i) => i,
                None => {
                    let index = array_index(&token);
                    node.children.push((token, index, PathTree::default()));
                    node.children.len() - 1
                }
            };
            node = &mut node.children[i].2;
            node.slots.push(slot);
        }
        node.here.push(slot);
        !nested && node.children.is_empty()
    }

    fn field(&self, name: &str) -> Option<&PathTree> {
        self.children
            .iter()
            .find(|(t, _, _)| t == name)
            .map(|(_, _, n)| n)
    }

    fn element(&self, index: usize) -> Option<&PathTree> {
        self.children
            .iter()
            .find(|(_, i, _)| *i == Some(index))
            .map(|(_, _, n)| n)
    }
}

/// A JSON pointer token as `serde_json::Value::pointer` unescapes it.
fn unescape_token(token: &str) -> String {
    token.replace("~1", "/").replace("~0", "~")
}

/// An array index token as `serde_json::Value::pointer` reads it (no sign, no leading zero).
fn array_index(token: &str) -> Option<usize> {
    if token.starts_with('+') || (token.starts_with('0') && token.len() != 1) {
        return None;
    }
    token.parse().ok()
}

/// One pass over a JSON value: builds the values at the tree's leaves and skips everything
/// else (still checking its syntax).
struct Seek<'a> {
    node: &'a PathTree,
    found: &'a mut [Option<Value>],
}

impl Seek<'_> {
    /// Enters `child`: a repeated object key replaces what an earlier one gave, as in a
    /// `serde_json::Value`.
    fn enter<'b>(child: &'b PathTree, found: &'b mut [Option<Value>]) -> Seek<'b> {
        for &s in &child.slots {
            found[s] = None;
        }
        Seek { node: child, found }
    }
}

impl<'de> DeserializeSeed<'de> for Seek<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        match self.node.here.split_first() {
            Some((&first, rest)) => {
                let v = Value::deserialize(d)?;
                for &s in rest {
                    self.found[s] = Some(v.clone());
                }
                self.found[first] = Some(v);
                Ok(())
            }
            None => d.deserialize_any(self),
        }
    }
}

impl<'de> Visitor<'de> for Seek<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    // A scalar where the path goes on: the pointed-at values are missing.
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let Seek { node, found } = self;
        for i in 0.. {
            let more = match node.element(i) {
                Some(child) => seq.next_element_seed(Seek::enter(child, found))?.is_some(),
                None => seq.next_element::<de::IgnoredAny>()?.is_some(),
            };
            if !more {
                break;
            }
        }
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let Seek { node, found } = self;
        while let Some(name) = map.next_key_seed(FieldName)? {
            match node.field(&name) {
                Some(child) => map.next_value_seed(Seek::enter(child, found))?,
                None => {
                    map.next_value::<de::IgnoredAny>()?;
                }
            }
        }
        Ok(())
    }
}

/// An object key, borrowed from the input unless it has escapes.
pub(crate) struct FieldName;

impl<'de> DeserializeSeed<'de> for FieldName {
    type Value = Cow<'de, str>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for FieldName {
    type Value = Cow<'de, str>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object key")
    }
    fn visit_borrowed_str<E: de::Error>(self, s: &'de str) -> Result<Self::Value, E> {
        Ok(Cow::Borrowed(s))
    }
    fn visit_str<E: de::Error>(self, s: &str) -> Result<Self::Value, E> {
        Ok(Cow::Owned(s.to_string()))
    }
}

/// Appends one key component, length-prefixed so composite keys cannot collide.
fn push_component(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
    out.extend_from_slice(bytes);
}

/// Key bytes from the values found at each pointer. Components compare by text: the string
/// `"42"` and the number `42` are the same key (Kafka keys are text, JSON ids are often
/// numbers); objects and arrays compare by their JSON text. A missing or `null` field is an
/// error naming the pointer.
fn key_from_parts<'v>(
    parts: impl Iterator<Item = (&'v Pointer, Option<&'v Value>)>,
) -> Result<Vec<u8>, Reject> {
    let mut out = Vec::with_capacity(32);
    for (p, v) in parts {
        match v {
            None => return Err(Reject::schema(format!("key field {p} is missing"))),
            Some(Value::Null) => return Err(Reject::schema(format!("key field {p} is null"))),
            Some(Value::String(s)) => push_component(&mut out, s.as_bytes()),
            Some(v) => push_component(&mut out, v.to_string().as_bytes()),
        }
    }
    Ok(out)
}

/// The key bytes of `value` at `pointers` (see [`key_from_parts`]).
pub fn key_of(value: &Value, pointers: &KeyPointers) -> Result<Vec<u8>, Reject> {
    key_from_parts(
        pointers
            .pointers()
            .iter()
            .map(|p| (p, value.pointer(p.as_str()))),
    )
}

/// A single-component key from raw bytes (a Kafka message key).
pub fn key_from_bytes(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len() + 4);
    push_component(&mut out, bytes);
    out
}

/// Event time in epoch milliseconds.
pub fn event_time(value: &Value, cfg: &EventTimeConfig) -> Result<i64, Reject> {
    time_at(value.pointer(cfg.field.as_str()), cfg)
}

/// Event time in epoch milliseconds from the value found at the time field.
fn time_at(found: Option<&Value>, cfg: &EventTimeConfig) -> Result<i64, Reject> {
    let p = &cfg.field;
    let v = match found {
        None => return Err(Reject::schema(format!("time field {p} is missing"))),
        Some(v) => v,
    };
    let bad = |why: &str| Reject::schema(format!("time field {p}: {why}, found {v}"));
    match (cfg.format, v) {
        (TimeFormat::Auto | TimeFormat::EpochMs, Value::Number(n)) => {
            number_ms(n, 1.0).ok_or_else(|| bad("expected epoch milliseconds"))
        }
        (TimeFormat::EpochS, Value::Number(n)) => {
            number_ms(n, 1000.0).ok_or_else(|| bad("expected epoch seconds"))
        }
        (TimeFormat::Auto, Value::String(s)) => rfc3339_ms(s)
            .or_else(|| numeric_text_ms(s, 1.0))
            .ok_or_else(|| bad("expected RFC 3339 text or epoch milliseconds")),
        (TimeFormat::Rfc3339, Value::String(s)) => {
            rfc3339_ms(s).ok_or_else(|| bad("expected RFC 3339 text"))
        }
        (TimeFormat::EpochMs, Value::String(s)) => {
            numeric_text_ms(s, 1.0).ok_or_else(|| bad("expected epoch milliseconds"))
        }
        (TimeFormat::EpochS, Value::String(s)) => {
            numeric_text_ms(s, 1000.0).ok_or_else(|| bad("expected epoch seconds"))
        }
        (TimeFormat::Rfc3339, _) => Err(bad("expected RFC 3339 text")),
        (_, _) => Err(bad("expected a number or a string")),
    }
}

/// ±10 000 years in milliseconds: beyond this a "time" is garbage, and the bound keeps all
/// window arithmetic far from overflow.
const MAX_ABS_MS: i64 = 315_569_520_000_000;

fn number_ms(n: &serde_json::Number, scale: f64) -> Option<i64> {
    let ms = if let Some(i) = n.as_i64() {
        i.checked_mul(scale as i64)?
    } else {
        let f = n.as_f64()? * scale;
        if !f.is_finite() {
            return None;
        }
        f.round() as i64
    };
    (ms.abs() <= MAX_ABS_MS).then_some(ms)
}

fn numeric_text_ms(s: &str, scale: f64) -> Option<i64> {
    let t = s.trim();
    if let Ok(i) = t.parse::<i64>() {
        let ms = i.checked_mul(scale as i64)?;
        return (ms.abs() <= MAX_ABS_MS).then_some(ms);
    }
    let f: f64 = t.parse().ok()?;
    let ms = f * scale;
    (ms.is_finite() && ms.abs() <= MAX_ABS_MS as f64).then_some(ms.round() as i64)
}

fn rfc3339_ms(s: &str) -> Option<i64> {
    let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok()?;
    i64::try_from(t.unix_timestamp_nanos().div_euclid(1_000_000)).ok()
}

// ---------------------------------------------------------------------------------------------
// State encodings
// ---------------------------------------------------------------------------------------------

/// Big-endian with the sign bit flipped: byte order equals numeric order, so time indexes
/// iterate oldest first.
pub fn ts_bytes(ts: i64) -> [u8; 8] {
    ((ts as u64) ^ (1 << 63)).to_be_bytes()
}

pub fn ts_from_bytes(b: &[u8]) -> Option<i64> {
    let a: [u8; 8] = b.get(..8)?.try_into().ok()?;
    Some((u64::from_be_bytes(a) ^ (1 << 63)) as i64)
}

pub fn get_i64(st: &StageState<'_, '_>, key: &[u8]) -> Result<Option<i64>, StateError> {
    Ok(st.get(key)?.as_deref().and_then(ts_from_bytes))
}

pub fn put_i64(st: &mut StageState<'_, '_>, key: &[u8], v: i64) {
    st.put(key, &ts_bytes(v));
}

/// `StageError` for a state failure (the batch is retried).
fn state_error(stage: &str, e: impl fmt::Display) -> StageError {
    StageError::new(stage, format!("state: {e}"))
}

// ---------------------------------------------------------------------------------------------
// Sweeping time indexes
// ---------------------------------------------------------------------------------------------

/// One entry of a time index (`tag`, time, rest of the key → value).
#[derive(Debug)]
pub struct IndexEntry {
    pub ts: i64,
    /// The index key after the tag and the time.
    pub rest: Vec<u8>,
    pub value: Vec<u8>,
}

/// Reads expired entries of a time index (`tag` + [`ts_bytes`] + rest) oldest first, a few
/// thousand at a time, so a large expiry never loads the whole index into memory.
///
/// The caller keeps a cursor per index: a lower bound of every entry's time (lowered on insert,
/// raised by sweeps), so sweeps never walk over the deletion tombstones of earlier sweeps.
/// The time slice read per step adapts to the density of the index; its width is only a hint
/// kept in memory (it changes how much is read per step, never which entries expire).
#[derive(Debug, Clone)]
pub struct Sweeper {
    width_ms: i64,
}

impl Default for Sweeper {
    fn default() -> Self {
        Self { width_ms: 1_000 }
    }
}

impl Sweeper {
    /// Entries with time in `[cursor, cutoff)`, up to about `budget` of them (a time slice is read
    /// whole), and the new cursor: `cutoff` when all were returned.
    pub fn expired(
        &mut self,
        st: &StageState<'_, '_>,
        tag: u8,
        cursor: i64,
        cutoff: i64,
        budget: usize,
    ) -> Result<(Vec<IndexEntry>, i64), StateError> {
        let mut out = Vec::new();
        let mut at = cursor;
        let target = (budget / 4).max(64);
        while at < cutoff && out.len() < budget {
            let end = at.saturating_add(self.width_ms).min(cutoff);
            let mut lo = vec![tag];
            lo.extend_from_slice(&ts_bytes(at));
            let mut hi = vec![tag];
            hi.extend_from_slice(&ts_bytes(end));
            let found = st.range(&lo, &hi)?;
            let n = found.len();
            for (k, value) in found {
                if let Some(ts) = ts_from_bytes(&k[1..]) {
                    out.push(IndexEntry {
                        ts,
                        rest: k[9..].to_vec(),
                        value,
                    });
                }
            }
            at = end;
            if n > target {
                self.width_ms = (self.width_ms / 2).max(1);
            } else if n < target / 4 {
                self.width_ms = self.width_ms.saturating_mul(2).min(i64::MAX / 4);
            }
        }
        Ok((out, at))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("24h").unwrap(), Duration::from_secs(86_400));
        assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5_400));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(
            parse_duration("30d").unwrap(),
            Duration::from_secs(30 * 86_400)
        );
        assert_eq!(parse_duration("0").unwrap(), Duration::ZERO);
        for bad in [
            "",
            "h",
            "10",
            "10x",
            "1.5h",
            "-1s",
            "99999999999999999999999d",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
        assert_eq!(format_duration(Duration::from_secs(5_400)), "1h30m");
        assert_eq!(format_duration(Duration::from_millis(1_500)), "1s500ms");
        let d: HumanDuration = serde_json::from_value(json!("10s")).unwrap();
        assert_eq!(serde_json::to_value(d).unwrap(), json!("10s"));
    }

    #[test]
    fn key_pointers_accept_one_or_many() {
        let one: KeyPointers = serde_json::from_value(json!("/id")).unwrap();
        assert_eq!(one.pointers().len(), 1);
        let two: KeyPointers = serde_json::from_value(json!(["/id", "/src"])).unwrap();
        assert_eq!(two.pointers().len(), 2);
        assert!(serde_json::from_value::<KeyPointers>(json!([])).is_err());
        let e = serde_json::from_value::<KeyPointers>(json!("id")).unwrap_err();
        assert!(e.to_string().contains("must start with '/'"), "{e}");
    }

    #[test]
    fn keys_compare_by_text_and_composites_do_not_collide() {
        let p1 = KeyPointers::new(vec![Pointer::parse("/a").unwrap()]).unwrap();
        assert_eq!(
            key_of(&json!({"a": 42}), &p1).unwrap(),
            key_of(&json!({"a": "42"}), &p1).unwrap()
        );
        assert_eq!(
            key_of(&json!({"a": "42"}), &p1).unwrap(),
            key_from_bytes(b"42")
        );
        let p2 = KeyPointers::new(vec![
            Pointer::parse("/a").unwrap(),
            Pointer::parse("/b").unwrap(),
        ])
        .unwrap();
        assert_ne!(
            key_of(&json!({"a": "x", "b": "yz"}), &p2).unwrap(),
            key_of(&json!({"a": "xy", "b": "z"}), &p2).unwrap()
        );
        let e = key_of(&json!({"a": 1}), &p2).unwrap_err();
        assert_eq!(e, Reject::schema("key field /b is missing"));
        let e = key_of(&json!({"a": null, "b": 1}), &p2).unwrap_err();
        assert_eq!(e.message, "key field /a is null");
    }

    #[test]
    fn key_spec_reads_bytes_like_a_full_parse() {
        let ptrs = |ps: &[&str]| {
            KeyPointers::new(ps.iter().map(|p| Pointer::parse(p).unwrap()).collect()).unwrap()
        };
        let time = |p: &str| {
            Some(TimeSource::Field(EventTimeConfig {
                field: Pointer::parse(p).unwrap(),
                format: TimeFormat::Auto,
            }))
        };
        let specs = [
            KeySpec::new(&ptrs(&["/id"]), time("/ts")),
            KeySpec::new(
                &ptrs(&["/a/b", "/list/1", "/x~1y", "/t~0"]),
                time("/meta/ts"),
            ),
            KeySpec::new(&ptrs(&["/id", "/id"]), Some(TimeSource::Kafka)),
            // `/a` holds `/a/b`: read from the whole tree.
            KeySpec::new(&ptrs(&["/a", "/a/b"]), None),
            KeySpec::new(&ptrs(&["/list/01", "/list/+1"]), None),
        ];
        assert!(specs[0].sparse && specs[1].sparse && !specs[3].sparse);
        let inputs: &[&[u8]] = &[
            br#"{"id":"k1","ts":5}"#,
            br#"{"id":42,"ts":"2026-11-23T10:00:00Z","other":{"deep":[1,2,{"id":0}]}}"#,
            br#"{"id":"first","id":"second","ts":1}"#,
            br#"{"a":{"b":"x"},"a":7,"ts":1}"#,
            br#"{"a":{"b":{"c":[1,"two"]}},"list":["z",true,null],"x/y":1.5,"t~":"\u00e9","meta":{"ts":9}}"#,
            br#"{"a":{"b":null},"list":[0,{"k":1}],"x/y":"s","t~":false,"meta":{"ts":"bad"}}"#,
            br#"{"id":"esc\"aped\n","ts":1,"skip":"\ud83d\ude00 and \\ more"}"#,
            br#"{"list":{"1":"object, not array"},"id":[1,{"b":2}],"ts":3}"#,
            br#"["not","an","object"]"#,
            br#"{"id":"k","ts":1} trailing"#,
            br#"{"id":"k","ts":1"#,
            b"{\"id\":\"k\",\"skip\":\"\xff\",\"ts\":1}",
            b"\xff\xfe not even utf-8",
        ];
        let rec = |input: &[u8]| Record {
            value: bytes::Bytes::copy_from_slice(input),
            ..crate::stage::dedup::tests::record("t", 0, 0, Value::Null)
        };
        for spec in &specs {
            for input in inputs {
                let r = rec(input);
                let full = parse_json(&r).and_then(|v| spec.read_value(&r, &v));
                let sparse = spec.read(&r);
                match (&full, &sparse) {
                    // The same kind; serde_json's wording for bad UTF-8 differs from std's.
                    (Err(a), Err(b)) if a.kind == "parse" => {
                        assert_eq!(b.kind, "parse", "{}", String::from_utf8_lossy(input))
                    }
                    _ => assert_eq!(
                        full,
                        sparse,
                        "{spec:?} on {}",
                        String::from_utf8_lossy(input)
                    ),
                }
            }
        }
        // A number beyond f64 is refused where it is read; where it is skipped it is not
        // looked at (the sink still checks the row).
        let big = rec(br#"{"id":1e400,"ts":1}"#);
        assert_eq!(specs[0].read(&big).unwrap_err().kind, "parse");
        assert_eq!(
            specs[1].read(&big).unwrap_err().message,
            "key field /a/b is missing"
        );
    }

    #[test]
    fn event_times() {
        let cfg = |f: TimeFormat| EventTimeConfig {
            field: Pointer::parse("/ts").unwrap(),
            format: f,
        };
        let base = 1_795_428_000_000i64;
        let v = json!({"ts": "2026-11-23T10:00:00.123Z"});
        assert_eq!(event_time(&v, &cfg(TimeFormat::Auto)).unwrap(), base + 123);
        assert_eq!(
            event_time(&v, &cfg(TimeFormat::Rfc3339)).unwrap(),
            base + 123
        );
        assert!(event_time(&v, &cfg(TimeFormat::EpochMs)).is_err());
        let v = json!({"ts": "2026-11-23T11:00:00+01:00"});
        assert_eq!(event_time(&v, &cfg(TimeFormat::Auto)).unwrap(), base);
        let v = json!({"ts": base});
        assert_eq!(event_time(&v, &cfg(TimeFormat::Auto)).unwrap(), base);
        assert_eq!(event_time(&v, &cfg(TimeFormat::EpochMs)).unwrap(), base);
        assert!(event_time(&v, &cfg(TimeFormat::Rfc3339)).is_err());
        let v = json!({"ts": 1_795_428_000.5});
        assert_eq!(
            event_time(&v, &cfg(TimeFormat::EpochS)).unwrap(),
            base + 500
        );
        let v = json!({"ts": "1795428000"});
        assert_eq!(event_time(&v, &cfg(TimeFormat::EpochS)).unwrap(), base);
        let e = event_time(&json!({"ts": "yesterday"}), &cfg(TimeFormat::Auto)).unwrap_err();
        assert!(e.message.starts_with("time field /ts:"), "{}", e.message);
        let e = event_time(&json!({}), &cfg(TimeFormat::Auto)).unwrap_err();
        assert_eq!(e.message, "time field /ts is missing");
        assert!(event_time(&json!({"ts": 1e300}), &cfg(TimeFormat::EpochS)).is_err());
    }

    #[test]
    fn ts_bytes_sort_like_numbers() {
        let ts = [i64::MIN, -5, -1, 0, 1, 1_795_428_000_000, i64::MAX];
        for w in ts.windows(2) {
            assert!(ts_bytes(w[0]) < ts_bytes(w[1]));
        }
        for t in ts {
            assert_eq!(ts_from_bytes(&ts_bytes(t)), Some(t));
        }
    }

    #[test]
    fn output_shapes() {
        let right = json!({"name": "ann", "country": "DE"});
        let mut left = json!({"id": 1}).as_object().cloned().unwrap();
        OutputShape::from_parts(Some("user"), None, None)
            .unwrap()
            .merge(&mut left, Some(&right))
            .unwrap();
        assert_eq!(Value::Object(left), json!({"id": 1, "user": right}));

        let mut left = json!({"id": 1}).as_object().cloned().unwrap();
        let shape = OutputShape::from_parts(None, Some("user_"), None).unwrap();
        shape.merge(&mut left, Some(&right)).unwrap();
        assert_eq!(
            Value::Object(left),
            json!({"id": 1, "user_name": "ann", "user_country": "DE"})
        );

        let fields = vec!["name".to_string()];
        let shape = OutputShape::from_parts(None, Some("u_"), Some(&fields)).unwrap();
        let mut left = json!({"id": 1}).as_object().cloned().unwrap();
        shape.merge(&mut left, None).unwrap();
        assert_eq!(Value::Object(left), json!({"id": 1, "u_name": null}));

        assert!(OutputShape::from_parts(None, None, None).is_err());
        assert!(OutputShape::from_parts(Some("a"), Some("b"), None).is_err());
    }

    #[test]
    fn sweeper_returns_expired_entries_in_time_order_within_budget() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::state::StateStore::open(dir.path()).unwrap();
        let mut txn = store.txn();
        let mut st = txn.stage("s", 0);
        // 5000 entries at 1 ms spacing, then a sparse tail far in the future.
        for i in 0..5_000i64 {
            let mut k = vec![b'T'];
            k.extend_from_slice(&ts_bytes(i));
            k.extend_from_slice(b"k");
            st.put(&k, b"");
        }
        let mut k = vec![b'T'];
        k.extend_from_slice(&ts_bytes(10_000_000));
        st.put(&k, b"");
        let mut sw = Sweeper::default();
        let mut cursor = 0;
        let mut seen = Vec::new();
        let mut calls = 0;
        while cursor < 9_000_000 {
            let (got, c) = sw.expired(&st, b'T', cursor, 9_000_000, 1_000).unwrap();
            assert!(got.len() <= 2_000, "{} entries in one call", got.len());
            seen.extend(got.into_iter().map(|e| e.ts));
            cursor = c;
            calls += 1;
            assert!(calls < 100);
        }
        assert_eq!(seen, (0..5_000).collect::<Vec<_>>());
    }
}
