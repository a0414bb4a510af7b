//! JSON rows → `RowBinaryWithDefaults`, the body of
//! `INSERT INTO db.t (c1, c2, ...) FORMAT RowBinaryWithDefaults` (see
//! [`TableSchema::insert_sql`]).
//!
//! Every column of the schema is written for every row, in table order: one flag byte (1 = let
//! ClickHouse fill in the column's `DEFAULT`, 0 = a RowBinary value follows) and the value. A row
//! that cannot be encoded leaves the output buffer untouched and returns an [`EncodeError`] naming
//! the column, the path inside it, the ClickHouse type, the offending JSON (shortened) and why,
//! so the caller can send that one row to the dead-letter queue and keep going.
//!
//! # How JSON values map to ClickHouse types
//!
//! - **Absent key** → the column's default (its `DEFAULT` expression, else the type's zero value).
//!   **`null`** → NULL for a `Nullable` column, and the column's default for any other column.
//!   Inside arrays, maps and tuples there are no defaults: `null` is only accepted where the
//!   element type is `Nullable`.
//! - **Int8…Int256, UInt8…UInt256**: JSON integers, or strings holding a decimal integer (`"42"`,
//!   since producers often quote big integers), within the type's range. A number written with a
//!   fraction or exponent is accepted if its value is integral (`3.0`, `1e3`) and at most 2^53 in
//!   magnitude (beyond that a JSON number has already lost digits: send such values as strings).
//! - **Bool**: `true`/`false`, the numbers `0`/`1`, the strings `"true"`/`"false"`/`"0"`/`"1"`.
//! - **Float32/Float64/BFloat16**: numbers, numeric strings, and `"nan"`, `"inf"`, `"-inf"`
//!   (any case). A finite value too large for Float32 is an error. BFloat16 keeps the upper 16
//!   bits of the Float32 value (truncation, as ClickHouse's own conversion does).
//! - **Decimal(P, S)** (and Decimal32/64/128/256): numbers or strings (`"-12.345"`, `"1e-3"`),
//!   converted exactly from their decimal text, never through binary floating point. Digits
//!   beyond the scale are **rounded half away from zero** (`1.005` → `1.01` at scale 2; note that
//!   ClickHouse's own text parsers truncate instead). More than P significant digits after
//!   rounding is an error. JSON numbers with more than ~15 significant digits have lost precision
//!   in the JSON parser already: send exact decimals as strings.
//! - **String**: a JSON string is stored as its UTF-8 bytes; any other value (number, boolean,
//!   array, object) is stored as its compact JSON text, so a nested object can be kept in a String
//!   column and taken apart later with `JSONExtract*`. **FixedString(N)**: a string of at most N
//!   bytes, zero-padded; longer is an error.
//! - **UUID**: the canonical text form, with or without hyphens, any case.
//! - **Enum8/Enum16**: the name as a string, or the numeric value as a number; either must be
//!   declared in the enum.
//! - **Date, Date32**: `"YYYY-MM-DD"`, a datetime string as below (its date in UTC), or an integer
//!   number of days since 1970-01-01. Ranges: Date 1970-01-01…2149-06-06, Date32
//!   1900-01-01…2299-12-31.
//! - **DateTime, DateTime64(P)**: RFC 3339 strings with any offset (`2024-05-01T12:00:00+02:00`,
//!   `…Z`), `"YYYY-MM-DD HH:MM:SS[.fraction]"` or `"YYYY-MM-DDTHH:MM:SS[.fraction]"` without an
//!   offset, which is taken as **UTC** (whatever the column's time zone: the sink carries no
//!   time-zone database), a bare date (midnight UTC), or a number of seconds since the epoch
//!   (`1700000000`, `1700000000.123`, also quoted: `"1700000000.123"`), converted from the
//!   number's decimal text, so without float error.
//!   Digits beyond the precision are dropped toward the past (floor). Ranges: DateTime
//!   1970-01-01 00:00:00…2106-02-07 06:28:15; DateTime64 1900-01-01…2299-12-31 (for precision 9
//!   the Int64 limit, 2262-04-11 23:47:16, comes first). Out of range is an error.
//! - **IPv4**: dotted text. **IPv6**: any IPv6 text; IPv4 text becomes `::ffff:a.b.c.d`.
//! - **Nullable(T)**: `null` or a T value. **LowCardinality(T)**, **SimpleAggregateFunction(f, T)**:
//!   as T.
//! - **Array(T)**: a JSON array. **Map(K, V)**: a JSON object, whose keys (strings) are converted
//!   to K with the string rules above (`"42"` for UInt32 keys), or an array of `[key, value]`
//!   pairs. **Tuple(T1, T2, …)**: an array with one value per element; a named tuple also from an
//!   object by element name, where a missing element is NULL if it is Nullable and an error
//!   otherwise (tuple elements have no defaults).
//! - JSON fields that are not columns of the table are ignored, or rejected with
//!   [`UnknownFields::Reject`] (the same rule applies to the fields of named-tuple objects).
//!
//! Unsupported column types never get here: [`TableSchema::from_columns`] refuses them.
//!
//! # Cost
//! This is the per-row hot path: encoding appends to the caller's buffer and allocates nothing
//! unless the row fails (numbers are formatted into a stack buffer when their text is needed).

use std::borrow::Cow;
use std::cmp::Ordering;
use std::fmt::{self, Write as _};
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr};

use serde::de;
use serde_json::{Map, Number, Value};

use super::types::{Column, ColumnType, TableSchema, TupleElement};

/// What to do with JSON fields that match no column.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum UnknownFields {
    /// Drop them silently (the usual choice: events often carry more than a table keeps).
    #[default]
    Ignore,
    /// Fail the row, so that schema drift is noticed (the row goes to the dead-letter queue).
    Reject,
}

/// Why a row could not be encoded. The row is skipped; nothing was written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// A value does not fit its column. `path` is empty for the column itself, else e.g.
    /// `[3]`, `["key"]`, `.key "k"`, `.field`.
    #[error("column {column:?}{path} ({column_type}): {reason}: {value}")]
    InvalidValue {
        column: String,
        path: String,
        column_type: String,
        /// The offending JSON, shortened to about 100 bytes.
        value: String,
        reason: String,
    },
    #[error("fields not in table {table}: {}", quoted_list(.fields))]
    UnknownFields { table: String, fields: Vec<String> },
    #[error("row is not a JSON object: {value}")]
    NotAnObject { value: String },
}

fn quoted_list(items: &[String]) -> String {
    items
        .iter()
        .map(|f| format!("{f:?}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Why a row given as JSON bytes ([`RowEncoder::encode_json`]) was not encoded. The row is
/// skipped; nothing was written.
#[derive(Debug, thiserror::Error)]
pub enum JsonRowError {
    /// The bytes are not one JSON value (the parser's message says where).
    #[error("not valid JSON: {0}")]
    Syntax(serde_json::Error),
    /// Valid JSON of another kind (`"array"`, `"string"`, ...).
    #[error("a JSON {0}, not an object")]
    NotAnObject(&'static str),
    #[error(transparent)]
    Encode(#[from] EncodeError),
}

/// Encodes JSON objects as RowBinaryWithDefaults rows for one table.
#[derive(Debug, Clone)]
pub struct RowEncoder {
    columns: Vec<EncColumn>,
    table: String,
    insert_sql: String,
    unknown_fields: UnknownFields,
}

#[derive(Debug, Clone)]
struct EncColumn {
    name: String,
    ty: ColumnType,
    type_name: String,
    /// `null` means NULL (else it means "use the default").
    nullable: bool,
}

impl RowEncoder {
    pub fn new(schema: &TableSchema, unknown_fields: UnknownFields) -> Self {
        let columns = schema
            .columns
            .iter()
            .map(|c: &Column| EncColumn {
                name: c.name.clone(),
                nullable: c.ty.is_nullable(),
                ty: c.ty.clone(),
                type_name: c.type_name.clone(),
            })
            .collect();
        Self {
            columns,
            table: format!("{}.{}", schema.database, schema.table),
            insert_sql: schema.insert_sql(),
            unknown_fields,
        }
    }

    /// The `INSERT ... FORMAT RowBinaryWithDefaults` statement the encoded rows belong to.
    pub fn insert_sql(&self) -> &str {
        &self.insert_sql
    }

    /// The column names, in the order they are encoded.
    pub fn columns(&self) -> impl Iterator<Item = &str> {
        self.columns.iter().map(|c| c.name.as_str())
    }

    /// Appends one row, given as the bytes of a JSON object, to `out`. On error `out` is left
    /// exactly as it was.
    ///
    /// This is the sink's hot path: the object is read in one pass with serde_json's parser,
    /// each top-level field lands in its column's slot (strings borrowed from `json` unless
    /// they contain escapes), and only array/object values of a field that is a column are
    /// built as `Value`s. Fields that are not columns are skipped without being built. The
    /// result is the same as parsing `json` into a `Value` and calling [`Self::encode_row`]
    /// (duplicate keys: the last one wins), for a fraction of the cost.
    pub fn encode_json(&self, json: &[u8], out: &mut Vec<u8>) -> Result<(), JsonRowError> {
        // One (vectorised) UTF-8 check of the whole row, then a parser that does not check
        // every key and string again. A row that is not UTF-8 goes through the byte parser,
        // whose error says where, exactly as before.
        match std::str::from_utf8(json) {
            Ok(text) => match self.encode_flat(text, out) {
                Some(done) => done,
                None => self.encode_from(serde_json::Deserializer::from_str(text), out),
            },
            Err(_) => self.encode_from(serde_json::Deserializer::from_slice(json), out),
        }
    }

    /// The path for flat objects (most rows), read in one pass by [`sluice_flat_json`]; `None`
    /// when `text` is anything else (nesting, `\u` escapes, exponents, any error), which
    /// serde_json then reads. Both fill the same slots, so the rows are the same.
    fn encode_flat(&self, text: &str, out: &mut Vec<u8>) -> Option<Result<(), JsonRowError>> {
        let mut slots: Vec<Option<Field<'_>>> = Vec::new();
        slots.resize_with(self.columns.len(), || None);
        let mut unknown = Vec::new();
        let reject = self.unknown_fields == UnknownFields::Reject;
        let mut hint = 0;
        let mut fields_ok = true;
        let flat = sluice_flat_json::for_each_field(text, |key, raw| {
            match self.column_index(key, &mut hint) {
                // A repeated key: the last one wins, as in a parsed `Map`.
                Some(i) => match flat_field(raw) {
                    Some(f) => slots[i] = Some(f),
                    None => fields_ok = false,
                },
                None if reject => unknown.push(key.to_owned()),
                None => {}
            }
        });
        (flat && fields_ok).then(|| self.finish_row(&slots, unknown, out))
    }

    fn encode_from<'de, R: serde_json::de::Read<'de>>(
        &self,
        mut de: serde_json::Deserializer<R>,
        out: &mut Vec<u8>,
    ) -> Result<(), JsonRowError> {
        let mut slots: Vec<Option<Field<'de>>> = Vec::new();
        slots.resize_with(self.columns.len(), || None);
        let mut unknown = Vec::new();
        let shape = de::Deserializer::deserialize_any(
            &mut de,
            RowVisitor {
                encoder: self,
                slots: &mut slots,
                unknown: &mut unknown,
            },
        )
        .map_err(JsonRowError::Syntax)?;
        de.end().map_err(JsonRowError::Syntax)?;
        if let Shape::Other(kind) = shape {
            return Err(JsonRowError::NotAnObject(kind));
        }
        self.finish_row(&slots, unknown, out)
    }

    /// Writes a row from its columns' values (`unknown`: fields to reject it for).
    fn finish_row(
        &self,
        slots: &[Option<Field<'_>>],
        mut unknown: Vec<String>,
        out: &mut Vec<u8>,
    ) -> Result<(), JsonRowError> {
        let start = out.len();
        self.encode_columns(|i| slots[i].as_ref().map(Field::as_json), out)?;
        // Only filled with `UnknownFields::Reject`.
        if !unknown.is_empty() {
            out.truncate(start);
            // Sorted and deduplicated, as the keys of a parsed `Map` would be.
            unknown.sort_unstable();
            unknown.dedup();
            return Err(JsonRowError::Encode(EncodeError::UnknownFields {
                table: self.table.clone(),
                fields: unknown,
            }));
        }
        Ok(())
    }

    /// Appends one row, given as a parsed JSON object, to `out`. On error `out` is left
    /// exactly as it was. [`Self::encode_json`] does the same from the JSON bytes, faster.
    pub fn encode_row(
        &self,
        row: &Map<String, Value>,
        out: &mut Vec<u8>,
    ) -> Result<(), EncodeError> {
        let start = out.len();
        self.encode_columns(
            |i| row.get(self.columns[i].name.as_str()).map(Json::from),
            out,
        )?;
        let present = self
            .columns
            .iter()
            .filter(|c| row.contains_key(c.name.as_str()))
            .count();
        if present < row.len() && self.unknown_fields == UnknownFields::Reject {
            out.truncate(start);
            let fields = row
                .keys()
                .filter(|k| !self.columns.iter().any(|c| &c.name == *k))
                .cloned()
                .collect();
            return Err(EncodeError::UnknownFields {
                table: self.table.clone(),
                fields,
            });
        }
        Ok(())
    }

    /// Writes every column in table order; `value(i)` is column `i`'s JSON value, `None` when
    /// the row does not have it. On error `out` is left exactly as it was.
    fn encode_columns<'v>(
        &self,
        value: impl Fn(usize) -> Option<Json<'v>>,
        out: &mut Vec<u8>,
    ) -> Result<(), EncodeError> {
        let start = out.len();
        for (i, col) in self.columns.iter().enumerate() {
            let Some(v) = value(i) else {
                out.push(1);
                continue;
            };
            if matches!(v, Json::Null) && !col.nullable {
                out.push(1);
                continue;
            }
            out.push(0);
            if let Err(fail) = self.enc(&col.ty, v, out) {
                out.truncate(start);
                return Err(fail.into_error(col));
            }
        }
        Ok(())
    }

    /// [`Self::encode_row`] for a `Value`, which must be an object. It goes through the JSON
    /// text and [`Self::encode_json`], so that tests of this method cover the sink's path.
    pub fn encode_value(&self, row: &Value, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        let Value::Object(map) = row else {
            return Err(EncodeError::NotAnObject {
                value: Json::from(row).render(),
            });
        };
        match serde_json::to_vec(row).map(|text| self.encode_json(&text, out)) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(JsonRowError::Encode(e))) => Err(e),
            // A serialised object always reads back as one; should it not, the tree path
            // still gives the answer.
            Ok(Err(_)) | Err(_) => self.encode_row(map, out),
        }
    }

    /// The index of the column named `key`. Rows of one table usually list their fields in
    /// the same order, so the search starts after the column found last (`hint`): one string
    /// comparison per field in the common case instead of a hash or a scan.
    fn column_index(&self, key: &str, hint: &mut usize) -> Option<usize> {
        let n = self.columns.len();
        let from = (*hint).min(n);
        let found = (from..n)
            .chain(0..from)
            .find(|&i| self.columns[i].name == key)?;
        *hint = found + 1;
        Some(found)
    }

    fn enc(&self, ty: &ColumnType, v: Json<'_>, out: &mut Vec<u8>) -> Step {
        use ColumnType as T;
        if matches!(v, Json::Null)
            && !matches!(
                ty,
                T::Nullable(_) | T::LowCardinality(_) | T::SimpleAggregateFunction { .. }
            )
        {
            return Err(fail(
                v,
                format!("null is not allowed for {ty} (not Nullable)"),
            ));
        }
        match ty {
            T::Bool => out.push(json_bool(v)?.into()),
            T::Int8 => out.extend_from_slice(&int_in::<i8>(v, ty)?.to_le_bytes()),
            T::Int16 => out.extend_from_slice(&int_in::<i16>(v, ty)?.to_le_bytes()),
            T::Int32 => out.extend_from_slice(&int_in::<i32>(v, ty)?.to_le_bytes()),
            T::Int64 => out.extend_from_slice(&int_in::<i64>(v, ty)?.to_le_bytes()),
            T::Int128 => out.extend_from_slice(&int_in::<i128>(v, ty)?.to_le_bytes()),
            T::UInt8 => out.extend_from_slice(&uint_in::<u8>(v, ty)?.to_le_bytes()),
            T::UInt16 => out.extend_from_slice(&uint_in::<u16>(v, ty)?.to_le_bytes()),
            T::UInt32 => out.extend_from_slice(&uint_in::<u32>(v, ty)?.to_le_bytes()),
            T::UInt64 => out.extend_from_slice(&uint_in::<u64>(v, ty)?.to_le_bytes()),
            T::UInt128 => out.extend_from_slice(&uint_in::<u128>(v, ty)?.to_le_bytes()),
            T::Int256 => {
                let n = json_int(v, ty)?;
                let limit = if n.neg { INT256_NEG_LIMIT } else { INT256_MAX };
                if n.mag > limit {
                    return Err(out_of_range(v, ty));
                }
                out.extend_from_slice(&n.twos_complement().to_le_bytes());
            }
            T::UInt256 => {
                let n = json_int(v, ty)?;
                if n.neg && !n.mag.is_zero() {
                    return Err(out_of_range(v, ty));
                }
                out.extend_from_slice(&n.mag.to_le_bytes());
            }
            T::Float32 => out.extend_from_slice(&json_f32(v, ty)?.to_le_bytes()),
            T::Float64 => out.extend_from_slice(&json_f64(v)?.to_le_bytes()),
            // Truncation to the upper half, as ClickHouse converts Float32 → BFloat16.
            T::BFloat16 => {
                let bits = (json_f32(v, ty)?.to_bits() >> 16) as u16;
                out.extend_from_slice(&bits.to_le_bytes());
            }
            T::Decimal { precision, scale } => put_decimal(v, ty, *precision, *scale, out)?,
            T::String => match v {
                Json::Str(s) => put_bytes(s.as_bytes(), out),
                other => put_json_text(other, out)?,
            },
            T::FixedString(n) => {
                let Json::Str(s) = v else {
                    return Err(expected(v, "a string"));
                };
                if s.len() > *n {
                    return Err(fail(
                        v,
                        format!("string of {} bytes is longer than {ty}", s.len()),
                    ));
                }
                out.extend_from_slice(s.as_bytes());
                out.resize(out.len() + (n - s.len()), 0);
            }
            T::Uuid => {
                let Json::Str(s) = v else {
                    return Err(expected(v, "a UUID string"));
                };
                let bytes = parse_uuid(s).ok_or_else(|| fail(v, "not a valid UUID"))?;
                // Two UInt64 halves, each little-endian, high half first.
                out.extend(bytes[..8].iter().rev());
                out.extend(bytes[8..].iter().rev());
            }
            T::Date => {
                let days = json_days(v, ty, 0, DATE_MAX_DAYS)?;
                out.extend_from_slice(&(days as u16).to_le_bytes());
            }
            T::Date32 => {
                let days = json_days(v, ty, DATE32_MIN_DAYS, DATE32_MAX_DAYS)?;
                out.extend_from_slice(&(days as i32).to_le_bytes());
            }
            T::DateTime { .. } => {
                let secs = json_ticks(v, ty, 0)?;
                let secs = u32::try_from(secs).map_err(|_| out_of_range(v, ty))?;
                out.extend_from_slice(&secs.to_le_bytes());
            }
            T::DateTime64 { precision, .. } => {
                let ticks = json_ticks(v, ty, *precision)?;
                let p = POW10_I128[usize::from(*precision)];
                let min = DT64_MIN_SECS * p;
                let max = ((DT64_MAX_SECS + 1) * p - 1).min(i64::MAX.into());
                if ticks < min || ticks > max {
                    return Err(out_of_range(v, ty));
                }
                out.extend_from_slice(&(ticks as i64).to_le_bytes());
            }
            T::Ipv4 => {
                let Json::Str(s) = v else {
                    return Err(expected(v, "an IPv4 address string"));
                };
                let ip: Ipv4Addr = s.parse().map_err(|_| fail(v, "not a valid IPv4 address"))?;
                out.extend_from_slice(&u32::from(ip).to_le_bytes());
            }
            T::Ipv6 => {
                let Json::Str(s) = v else {
                    return Err(expected(v, "an IPv6 address string"));
                };
                let ip = s
                    .parse::<Ipv6Addr>()
                    .or_else(|_| s.parse::<Ipv4Addr>().map(|ip| ip.to_ipv6_mapped()))
                    .map_err(|_| fail(v, "not a valid IPv6 address"))?;
                out.extend_from_slice(&ip.octets());
            }
            T::Enum8(values) => {
                let x = enum_value(v, values.iter().map(|(n, x)| (n.as_str(), i16::from(*x))))?;
                out.push(x as i8 as u8);
            }
            T::Enum16(values) => {
                let x = enum_value(v, values.iter().map(|(n, x)| (n.as_str(), *x)))?;
                out.extend_from_slice(&x.to_le_bytes());
            }
            T::Nullable(inner) => {
                if matches!(v, Json::Null) {
                    out.push(1);
                } else {
                    out.push(0);
                    self.enc(inner, v, out)?;
                }
            }
            T::LowCardinality(inner) | T::SimpleAggregateFunction { inner, .. } => {
                self.enc(inner, v, out)?
            }
            T::Array(inner) => {
                let Json::Arr(items) = v else {
                    return Err(expected(v, "an array"));
                };
                put_len(items.len(), out);
                for (i, item) in items.iter().enumerate() {
                    self.enc(inner, item.into(), out).at(|| Seg::Index(i))?;
                }
            }
            T::Map(kt, vt) => match v {
                Json::Obj(map) => {
                    put_len(map.len(), out);
                    for (k, val) in map {
                        self.enc(kt, Json::Str(k), out)
                            .at(|| Seg::MapKey(k.clone()))?;
                        self.enc(vt, val.into(), out)
                            .at(|| Seg::MapValue(k.clone()))?;
                    }
                }
                Json::Arr(pairs) => {
                    put_len(pairs.len(), out);
                    for (i, pair) in pairs.iter().enumerate() {
                        let (k, val) = match pair {
                            Value::Array(kv) if kv.len() == 2 => (&kv[0], &kv[1]),
                            other => {
                                return Err(expected(other.into(), "a [key, value] pair"))
                                    .at(|| Seg::Index(i))
                            }
                        };
                        self.enc(kt, k.into(), out)
                            .at(|| Seg::Index(0))
                            .at(|| Seg::Index(i))?;
                        self.enc(vt, val.into(), out)
                            .at(|| Seg::Index(1))
                            .at(|| Seg::Index(i))?;
                    }
                }
                other => {
                    return Err(expected(
                        other,
                        "an object or an array of [key, value] pairs",
                    ))
                }
            },
            T::Tuple(elements) => self.enc_tuple(ty, elements, v, out)?,
        }
        Ok(())
    }

    fn enc_tuple(
        &self,
        ty: &ColumnType,
        elements: &[TupleElement],
        v: Json<'_>,
        out: &mut Vec<u8>,
    ) -> Step {
        match v {
            Json::Arr(items) => {
                if items.len() != elements.len() {
                    return Err(fail(
                        v,
                        format!(
                            "{ty} needs an array of {} values, got {}",
                            elements.len(),
                            items.len()
                        ),
                    ));
                }
                for (i, (e, item)) in elements.iter().zip(items).enumerate() {
                    self.enc(&e.ty, item.into(), out).at(|| Seg::Index(i))?;
                }
                Ok(())
            }
            Json::Obj(map) if elements.iter().all(|e| e.name.is_some()) => {
                let mut present = 0usize;
                for (i, e) in elements.iter().enumerate() {
                    let name = e.name.as_deref().unwrap_or_default();
                    let seg = || Seg::Field(name.to_owned());
                    match map.get(name) {
                        Some(item) => {
                            present += 1;
                            self.enc(&e.ty, item.into(), out).at(seg)?;
                        }
                        None if e.ty.is_nullable() => {
                            self.enc(&e.ty, Json::Null, out).at(seg)?;
                        }
                        None => {
                            return Err(fail(
                                v,
                                format!("missing tuple element {name:?} (element {i} of {ty})"),
                            ))
                        }
                    }
                }
                if present < map.len() && self.unknown_fields == UnknownFields::Reject {
                    let unknown: Vec<String> = map
                        .keys()
                        .filter(|k| !elements.iter().any(|e| e.name.as_ref() == Some(*k)))
                        .cloned()
                        .collect();
                    return Err(fail(
                        v,
                        format!("fields not in {ty}: {}", quoted_list(&unknown)),
                    ));
                }
                Ok(())
            }
            Json::Obj(_) => Err(fail(
                v,
                format!("{ty} has unnamed elements: expected an array"),
            )),
            other => Err(expected(other, "an array (or an object for named tuples)")),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Errors on the way up: built only when a row fails.

type Step = Result<(), Box<Fail>>;

#[derive(Debug)]
struct Fail {
    /// Innermost segment first (pushed while unwinding).
    path: Vec<Seg>,
    value: String,
    reason: String,
}

#[derive(Debug)]
enum Seg {
    Index(usize),
    Field(String),
    MapKey(String),
    MapValue(String),
}

impl Fail {
    fn into_error(self, col: &EncColumn) -> EncodeError {
        let mut path = String::new();
        for seg in self.path.iter().rev() {
            // Writing into a String cannot fail.
            let _ = match seg {
                Seg::Index(i) => write!(path, "[{i}]"),
                Seg::Field(name) if is_plain_name(name) => write!(path, ".{name}"),
                Seg::Field(name) => write!(path, ".{name:?}"),
                Seg::MapKey(k) => write!(path, ".key {k:?}"),
                Seg::MapValue(k) => write!(path, "[{k:?}]"),
            };
        }
        EncodeError::InvalidValue {
            column: col.name.clone(),
            path,
            column_type: col.type_name.clone(),
            value: self.value,
            reason: self.reason,
        }
    }
}

fn is_plain_name(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

trait AtPath {
    fn at(self, seg: impl FnOnce() -> Seg) -> Self;
}

impl<T> AtPath for Result<T, Box<Fail>> {
    fn at(self, seg: impl FnOnce() -> Seg) -> Self {
        self.map_err(|mut f| {
            f.path.push(seg());
            f
        })
    }
}

fn fail(v: Json<'_>, reason: impl Into<String>) -> Box<Fail> {
    Box::new(Fail {
        path: Vec::new(),
        value: v.render(),
        reason: reason.into(),
    })
}

fn expected(v: Json<'_>, what: &str) -> Box<Fail> {
    fail(v, format!("expected {what}, got {}", v.kind()))
}

fn out_of_range(v: Json<'_>, ty: &ColumnType) -> Box<Fail> {
    fail(v, format!("out of range for {ty}"))
}

/// A borrowed view of a JSON value; map keys (plain `&str`) are viewed as strings without
/// building a `Value`.
#[derive(Clone, Copy)]
enum Json<'a> {
    Null,
    Bool(bool),
    Num(&'a Number),
    Str(&'a str),
    Arr(&'a [Value]),
    Obj(&'a Map<String, Value>),
}

impl<'a> From<&'a Value> for Json<'a> {
    fn from(v: &'a Value) -> Self {
        match v {
            Value::Null => Json::Null,
            Value::Bool(b) => Json::Bool(*b),
            Value::Number(n) => Json::Num(n),
            Value::String(s) => Json::Str(s),
            Value::Array(a) => Json::Arr(a),
            Value::Object(o) => Json::Obj(o),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Reading a row's JSON bytes in one pass (`RowEncoder::encode_json`).

/// A top-level field's value: scalars without a tree, strings borrowed unless escaped.
enum Field<'de> {
    Null,
    Bool(bool),
    Num(Number),
    Str(Cow<'de, str>),
    /// Arrays and objects, for the columns that take them (Array, Map, Tuple, String).
    Tree(Value),
}

impl Field<'_> {
    fn as_json(&self) -> Json<'_> {
        match self {
            Field::Null => Json::Null,
            Field::Bool(b) => Json::Bool(*b),
            Field::Num(n) => Json::Num(n),
            Field::Str(s) => Json::Str(s),
            Field::Tree(v) => Json::from(v),
        }
    }
}

/// A value [`sluice_flat_json`] accepted (a string without `\u` escapes, a number without an
/// exponent, a literal) as the serde_json visitor below would have read it; `None` if it
/// cannot be (never expected: the reader checked it).
fn flat_field(raw: &str) -> Option<Field<'_>> {
    Some(match raw.as_bytes().first()? {
        b'"' => {
            let inner = raw.get(1..raw.len().checked_sub(1)?)?;
            if inner.contains('\\') {
                Field::Str(Cow::Owned(serde_json::from_str(raw).ok()?))
            } else {
                Field::Str(Cow::Borrowed(inner))
            }
        }
        b't' => Field::Bool(true),
        b'f' => Field::Bool(false),
        b'n' => Field::Null,
        // Integers as serde_json reads them (u64, else i64); `-0`, fractions and integers
        // beyond 64 bits through its own number parser, which makes them floats.
        _ => Field::Num(if raw.starts_with("-0") || raw.contains('.') {
            raw.parse::<Number>().ok()?
        } else if let Ok(u) = raw.parse::<u64>() {
            u.into()
        } else if let Ok(i) = raw.parse::<i64>() {
            i.into()
        } else {
            raw.parse::<Number>().ok()?
        }),
    })
}

/// What the top-level value turned out to be.
enum Shape {
    Object,
    Other(&'static str),
}

struct RowVisitor<'a, 'de> {
    encoder: &'a RowEncoder,
    slots: &'a mut [Option<Field<'de>>],
    /// Names of fields that are not columns, collected only to reject them.
    unknown: &'a mut Vec<String>,
}

impl<'de> de::Visitor<'de> for RowVisitor<'_, 'de> {
    type Value = Shape;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<Shape, A::Error> {
        let mut hint = 0;
        let reject = self.encoder.unknown_fields == UnknownFields::Reject;
        while let Some(key) = map.next_key_seed(KeySeed)? {
            match self.encoder.column_index(&key, &mut hint) {
                // A repeated key: the last one wins, as in a parsed `Map`.
                Some(i) => self.slots[i] = Some(map.next_value_seed(FieldSeed)?),
                None => {
                    map.next_value::<de::IgnoredAny>()?;
                    if reject {
                        self.unknown.push(key.into_owned());
                    }
                }
            }
        }
        Ok(Shape::Object)
    }

    fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Shape, A::Error> {
        // Read to the end so that a syntax error later in the text is still reported as one.
        while seq.next_element::<de::IgnoredAny>()?.is_some() {}
        Ok(Shape::Other("array"))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Shape, E> {
        Ok(Shape::Other("null"))
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Shape, E> {
        Ok(Shape::Other("boolean"))
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Shape, E> {
        Ok(Shape::Other("number"))
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Shape, E> {
        Ok(Shape::Other("number"))
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Shape, E> {
        Ok(Shape::Other("number"))
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<Shape, E> {
        Ok(Shape::Other("string"))
    }
}

/// An object key, borrowed from the input unless it contains escapes.
struct KeySeed;

impl<'de> de::DeserializeSeed<'de> for KeySeed {
    type Value = Cow<'de, str>;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_str(CowStr)
    }
}

struct CowStr;

impl<'de> de::Visitor<'de> for CowStr {
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

/// A field value, read the way `Value` reads it (same numbers) but without a tree for scalars.
struct FieldSeed;

impl<'de> de::DeserializeSeed<'de> for FieldSeed {
    type Value = Field<'de>;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(FieldVisitor)
    }
}

struct FieldVisitor;

impl<'de> de::Visitor<'de> for FieldVisitor {
    type Value = Field<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(Field::Null)
    }

    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(Field::Null)
    }

    fn visit_bool<E: de::Error>(self, b: bool) -> Result<Self::Value, E> {
        Ok(Field::Bool(b))
    }

    fn visit_i64<E: de::Error>(self, n: i64) -> Result<Self::Value, E> {
        Ok(Field::Num(n.into()))
    }

    fn visit_u64<E: de::Error>(self, n: u64) -> Result<Self::Value, E> {
        Ok(Field::Num(n.into()))
    }

    fn visit_f64<E: de::Error>(self, x: f64) -> Result<Self::Value, E> {
        // As `Value` does: a non-finite float (which serde_json never produces) is null.
        Ok(Number::from_f64(x).map_or(Field::Null, Field::Num))
    }

    fn visit_borrowed_str<E: de::Error>(self, s: &'de str) -> Result<Self::Value, E> {
        Ok(Field::Str(Cow::Borrowed(s)))
    }

    fn visit_str<E: de::Error>(self, s: &str) -> Result<Self::Value, E> {
        Ok(Field::Str(Cow::Owned(s.to_owned())))
    }

    fn visit_string<E: de::Error>(self, s: String) -> Result<Self::Value, E> {
        Ok(Field::Str(Cow::Owned(s)))
    }

    fn visit_seq<A: de::SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
        de::Deserialize::deserialize(de::value::SeqAccessDeserializer::new(seq)).map(Field::Tree)
    }

    fn visit_map<A: de::MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        de::Deserialize::deserialize(de::value::MapAccessDeserializer::new(map)).map(Field::Tree)
    }
}

const SHOWN_VALUE_BYTES: usize = 100;

impl Json<'_> {
    fn kind(self) -> &'static str {
        match self {
            Json::Null => "null",
            Json::Bool(_) => "a boolean",
            Json::Num(_) => "a number",
            Json::Str(_) => "a string",
            Json::Arr(_) => "an array",
            Json::Obj(_) => "an object",
        }
    }

    fn write_json<W: io::Write>(self, w: W) -> serde_json::Result<()> {
        match self {
            Json::Null => serde_json::to_writer(w, &()),
            Json::Bool(b) => serde_json::to_writer(w, &b),
            Json::Num(n) => serde_json::to_writer(w, n),
            Json::Str(s) => serde_json::to_writer(w, s),
            Json::Arr(a) => serde_json::to_writer(w, a),
            Json::Obj(o) => serde_json::to_writer(w, o),
        }
    }

    /// The JSON text, cut after about [`SHOWN_VALUE_BYTES`] bytes (serialisation stops there).
    fn render(self) -> String {
        let mut w = Capped {
            buf: Vec::new(),
            truncated: false,
        };
        // An error here only means "stopped at the cap".
        let _ = self.write_json(&mut w);
        let text = match std::str::from_utf8(&w.buf) {
            Ok(s) => s,
            Err(e) => std::str::from_utf8(&w.buf[..e.valid_up_to()]).unwrap_or_default(),
        };
        let mut s = text.to_owned();
        if w.truncated {
            s.push('…');
        }
        s
    }
}

struct Capped {
    buf: Vec<u8>,
    truncated: bool,
}

impl io::Write for Capped {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let room = SHOWN_VALUE_BYTES.saturating_sub(self.buf.len());
        if data.len() > room {
            self.buf.extend_from_slice(&data[..room]);
            self.truncated = true;
            return Err(io::Error::other("value shortened"));
        }
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Writers.

fn put_len(n: usize, out: &mut Vec<u8>) {
    let mut buf = [0u8; 10];
    let len = leb128(n as u64, &mut buf);
    out.extend_from_slice(&buf[..len]);
}

fn leb128(mut n: u64, buf: &mut [u8; 10]) -> usize {
    let mut i = 0;
    loop {
        let byte = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            buf[i] = byte;
            return i + 1;
        }
        buf[i] = byte | 0x80;
        i += 1;
    }
}

fn put_bytes(b: &[u8], out: &mut Vec<u8>) {
    put_len(b.len(), out);
    out.extend_from_slice(b);
}

/// Writes the compact JSON text of `v` as a String value: the text is serialised in place and
/// its length prefix rotated in front of it, avoiding a temporary buffer.
fn put_json_text(v: Json<'_>, out: &mut Vec<u8>) -> Step {
    let start = out.len();
    if let Err(e) = v.write_json(&mut *out) {
        out.truncate(start);
        return Err(fail(v, format!("cannot write as JSON text: {e}")));
    }
    let mut buf = [0u8; 10];
    let n = leb128((out.len() - start) as u64, &mut buf);
    out.extend_from_slice(&buf[..n]);
    out[start..].rotate_right(n);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Scalars.

fn json_bool(v: Json<'_>) -> Result<bool, Box<Fail>> {
    match v {
        Json::Bool(b) => Ok(b),
        Json::Num(n) if n.as_u64() == Some(0) => Ok(false),
        Json::Num(n) if n.as_u64() == Some(1) => Ok(true),
        Json::Str("true" | "1") => Ok(true),
        Json::Str("false" | "0") => Ok(false),
        _ => Err(fail(
            v,
            "expected true/false, 0/1 or \"true\"/\"false\" for Bool",
        )),
    }
}

fn json_f64(v: Json<'_>) -> Result<f64, Box<Fail>> {
    match v {
        Json::Num(n) => n.as_f64().ok_or_else(|| fail(v, "not a finite number")),
        Json::Str(s) => s.parse::<f64>().map_err(|_| {
            fail(
                v,
                "not a number (also accepted: \"nan\", \"inf\", \"-inf\")",
            )
        }),
        other => Err(expected(other, "a number or a numeric string")),
    }
}

fn json_f32(v: Json<'_>, ty: &ColumnType) -> Result<f32, Box<Fail>> {
    let x = match v {
        // Parsed directly as f32 so the text is rounded once.
        Json::Str(s) => s.parse::<f32>().map_err(|_| {
            fail(
                v,
                "not a number (also accepted: \"nan\", \"inf\", \"-inf\")",
            )
        })?,
        _ => json_f64(v)? as f32,
    };
    if x.is_infinite() && !is_infinity_literal(v) {
        return Err(out_of_range(v, ty));
    }
    Ok(x)
}

fn is_infinity_literal(v: Json<'_>) -> bool {
    match v {
        Json::Str(s) => {
            let s = s.strip_prefix(['+', '-']).unwrap_or(s);
            s.eq_ignore_ascii_case("inf") || s.eq_ignore_ascii_case("infinity")
        }
        Json::Num(n) => n.as_f64().is_some_and(f64::is_infinite),
        _ => false,
    }
}

fn enum_value<'e, I>(v: Json<'_>, values: I) -> Result<i16, Box<Fail>>
where
    I: Iterator<Item = (&'e str, i16)> + Clone,
{
    let found = match v {
        Json::Str(s) => values.clone().find(|(n, _)| *n == s).map(|(_, x)| x),
        Json::Num(n) => n
            .as_i64()
            .and_then(|x| values.clone().find(|(_, y)| i64::from(*y) == x))
            .map(|(_, x)| x),
        other => return Err(expected(other, "an enum name or value")),
    };
    found.ok_or_else(|| {
        const SHOWN: usize = 20;
        let count = values.clone().count();
        let mut list = String::new();
        for (i, (name, x)) in values.take(SHOWN).enumerate() {
            if i > 0 {
                list.push_str(", ");
            }
            let _ = match v {
                Json::Num(_) => write!(list, "{x} ({name})"),
                _ => write!(list, "{name}"),
            };
        }
        if count > SHOWN {
            list.push_str(", …");
        }
        let shown = match v {
            Json::Str(s) => format!("'{s}'"),
            _ => v.render(),
        };
        fail(
            v,
            format!("unknown enum value {shown} (expected one of: {list})"),
        )
    })
}

// ---------------------------------------------------------------------------------------------
// Integers: every input becomes sign + 256-bit magnitude, then is range-checked per type.

/// The largest magnitude a JSON float can carry without having rounded an integer text.
const EXACT_F64_INT: f64 = 9_007_199_254_740_992.0;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct BigInt {
    neg: bool,
    mag: U256,
}

impl BigInt {
    fn from_i64(x: i64) -> Self {
        Self {
            neg: x < 0,
            mag: U256::from_u128(x.unsigned_abs().into()),
        }
    }

    fn to_i128(self) -> Option<i128> {
        let m = self.mag.to_u128()?;
        if self.neg {
            0i128.checked_sub_unsigned(m)
        } else {
            i128::try_from(m).ok()
        }
    }

    fn to_u128(self) -> Option<u128> {
        match self.mag.to_u128()? {
            0 => Some(0),
            _ if self.neg => None,
            m => Some(m),
        }
    }

    fn twos_complement(self) -> U256 {
        if self.neg {
            self.mag.wrapping_neg()
        } else {
            self.mag
        }
    }
}

fn json_int(v: Json<'_>, ty: &ColumnType) -> Result<BigInt, Box<Fail>> {
    match v {
        Json::Num(n) => {
            if let Some(x) = n.as_i64() {
                return Ok(BigInt::from_i64(x));
            }
            if let Some(x) = n.as_u64() {
                return Ok(BigInt {
                    neg: false,
                    mag: U256::from_u128(x.into()),
                });
            }
            // A plain integer text beyond u64 is exact with serde_json's `arbitrary_precision`.
            if let Some(r) = with_number_text(n, parse_int_text) {
                return r.ok_or_else(|| out_of_range(v, ty));
            }
            let f = n.as_f64().unwrap_or(f64::NAN);
            if !f.is_finite() || f.fract() != 0.0 {
                return Err(fail(v, format!("not an integer ({ty})")));
            }
            if f.abs() > EXACT_F64_INT {
                return Err(fail(
                    v,
                    "integer too large to be exact as a JSON number; send it as a string",
                ));
            }
            Ok(BigInt::from_i64(f as i64))
        }
        Json::Str(s) => match parse_int_text(s) {
            Some(Some(n)) => Ok(n),
            Some(None) => Err(out_of_range(v, ty)),
            None => Err(fail(v, format!("not an integer ({ty})"))),
        },
        other => Err(expected(other, "an integer (number or string)")),
    }
}

/// `[+-]digits`: `None` if not that syntax, `Some(None)` if beyond 256 bits.
fn parse_int_text(s: &str) -> Option<Option<BigInt>> {
    let (neg, digits) = match s.as_bytes() {
        [b'-', rest @ ..] => (true, rest),
        [b'+', rest @ ..] => (false, rest),
        rest => (false, rest),
    };
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let mut mag = U256::ZERO;
    for d in digits {
        if mag.mul_add(10, u64::from(d - b'0')) {
            return Some(None);
        }
    }
    Some(Some(BigInt { neg, mag }))
}

trait FromI128: Sized {
    fn from_i128(x: i128) -> Option<Self>;
}
trait FromU128: Sized {
    fn from_u128(x: u128) -> Option<Self>;
}
macro_rules! int_conv {
    ($($t:ty),*) => {$(
        impl FromI128 for $t {
            fn from_i128(x: i128) -> Option<Self> { <$t>::try_from(x).ok() }
        }
        impl FromU128 for $t {
            fn from_u128(x: u128) -> Option<Self> { <$t>::try_from(x).ok() }
        }
    )*};
}
int_conv!(i8, i16, i32, i64, i128, u8, u16, u32, u64, u128);

fn int_in<T: FromI128>(v: Json<'_>, ty: &ColumnType) -> Result<T, Box<Fail>> {
    json_int(v, ty)?
        .to_i128()
        .and_then(T::from_i128)
        .ok_or_else(|| out_of_range(v, ty))
}

fn uint_in<T: FromU128>(v: Json<'_>, ty: &ColumnType) -> Result<T, Box<Fail>> {
    json_int(v, ty)?
        .to_u128()
        .and_then(T::from_u128)
        .ok_or_else(|| out_of_range(v, ty))
}

/// Unsigned 256-bit integer, little-endian 64-bit limbs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct U256([u64; 4]);

const INT256_MAX: U256 = U256([u64::MAX, u64::MAX, u64::MAX, u64::MAX >> 1]);
const INT256_NEG_LIMIT: U256 = U256([0, 0, 0, 1 << 63]);

impl U256 {
    const ZERO: U256 = U256([0; 4]);

    const fn from_u128(x: u128) -> Self {
        U256([x as u64, (x >> 64) as u64, 0, 0])
    }

    fn to_u128(self) -> Option<u128> {
        (self.0[2] == 0 && self.0[3] == 0)
            .then(|| u128::from(self.0[0]) | (u128::from(self.0[1]) << 64))
    }

    fn is_zero(self) -> bool {
        self == Self::ZERO
    }

    /// `self = self * m + a`; returns true on overflow.
    const fn mul_add(&mut self, m: u64, a: u64) -> bool {
        let mut carry = a as u128;
        let mut i = 0;
        while i < 4 {
            let t = self.0[i] as u128 * m as u128 + carry;
            self.0[i] = t as u64;
            carry = t >> 64;
            i += 1;
        }
        carry != 0
    }

    fn wrapping_neg(self) -> Self {
        let mut r = U256([!self.0[0], !self.0[1], !self.0[2], !self.0[3]]);
        r.mul_add(1, 1);
        r
    }

    fn to_le_bytes(self) -> [u8; 32] {
        let mut b = [0u8; 32];
        for (chunk, limb) in b.chunks_exact_mut(8).zip(self.0) {
            chunk.copy_from_slice(&limb.to_le_bytes());
        }
        b
    }
}

impl PartialOrd for U256 {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for U256 {
    fn cmp(&self, other: &Self) -> Ordering {
        self.0.iter().rev().cmp(other.0.iter().rev())
    }
}

const POW10: [U256; 77] = {
    let mut t = [U256::ZERO; 77];
    t[0] = U256::from_u128(1);
    let mut i = 1;
    while i < 77 {
        let mut x = t[i - 1];
        x.mul_add(10, 0);
        t[i] = x;
        i += 1;
    }
    t
};

const POW10_I128: [i128; 10] = {
    let mut t = [1i128; 10];
    let mut i = 1;
    while i < 10 {
        t[i] = t[i - 1] * 10;
        i += 1;
    }
    t
};

// ---------------------------------------------------------------------------------------------
// Decimal text, used for Decimal columns and for epoch seconds with fractions.

/// `[+-] digits [. digits] [e [+-] digits]`, borrowed from the input.
struct DecimalText<'a> {
    neg: bool,
    int: &'a [u8],
    frac: &'a [u8],
    exp: i64,
}

fn parse_decimal_text(s: &str) -> Option<DecimalText<'_>> {
    let b = s.as_bytes();
    let (neg, mut i) = match b.first() {
        Some(b'-') => (true, 1),
        Some(b'+') => (false, 1),
        _ => (false, 0),
    };
    let digits_from = |mut j: usize| {
        while j < b.len() && b[j].is_ascii_digit() {
            j += 1;
        }
        j
    };
    let int_end = digits_from(i);
    let int = &b[i..int_end];
    i = int_end;
    let mut frac: &[u8] = &[];
    if b.get(i) == Some(&b'.') {
        let end = digits_from(i + 1);
        frac = &b[i + 1..end];
        i = end;
    }
    if int.is_empty() && frac.is_empty() {
        return None;
    }
    let mut exp = 0i64;
    if matches!(b.get(i), Some(b'e' | b'E')) {
        i += 1;
        let exp_neg = match b.get(i) {
            Some(b'-') => {
                i += 1;
                true
            }
            Some(b'+') => {
                i += 1;
                false
            }
            _ => false,
        };
        let end = digits_from(i);
        if end == i {
            return None;
        }
        for d in &b[i..end] {
            // Saturate: anything this large overflows or rounds to zero anyway.
            exp = (exp * 10 + i64::from(d - b'0')).min(1_000_000);
        }
        if exp_neg {
            exp = -exp;
        }
        i = end;
    }
    (i == b.len()).then_some(DecimalText {
        neg,
        int,
        frac,
        exp,
    })
}

#[derive(Clone, Copy)]
enum Rounding {
    HalfAwayFromZero,
    /// Toward negative infinity.
    Floor,
}

/// `round(value * 10^scale)` as sign + magnitude; `None` if the magnitude exceeds 256 bits.
fn scale_decimal(d: &DecimalText<'_>, scale: u32, rounding: Rounding) -> Option<BigInt> {
    let len = (d.int.len() + d.frac.len()) as i64;
    let digit = |i: i64| -> u8 {
        let i = i as usize;
        if i < d.int.len() {
            d.int[i] - b'0'
        } else {
            d.frac[i - d.int.len()] - b'0'
        }
    };
    // Number of leading digits (of int ++ frac) that land left of the new decimal point.
    let keep = d.int.len() as i64 + d.exp + i64::from(scale);
    let mut mag = U256::ZERO;
    for i in 0..keep.clamp(0, len) {
        if mag.mul_add(10, u64::from(digit(i))) {
            return None;
        }
    }
    for _ in len..keep {
        if mag.is_zero() {
            break;
        }
        if mag.mul_add(10, 0) {
            return None;
        }
    }
    let round_up = match rounding {
        Rounding::HalfAwayFromZero => (0..len).contains(&keep) && digit(keep) >= 5,
        Rounding::Floor => d.neg && (keep.max(0)..len).any(|i| digit(i) != 0),
    };
    if round_up && mag.mul_add(1, 1) {
        return None;
    }
    Some(BigInt { neg: d.neg, mag })
}

/// Runs `f` on the decimal text of a JSON number, formatted on the stack.
fn with_number_text<R>(n: &Number, f: impl FnOnce(&str) -> R) -> R {
    let mut buf = StackBuf {
        buf: [0; 48],
        len: 0,
    };
    if write!(buf, "{n}").is_ok() {
        f(buf.as_str())
    } else {
        // Only numbers longer than any f64/i64 text: serde_json's `arbitrary_precision`.
        f(&n.to_string())
    }
}

struct StackBuf {
    buf: [u8; 48],
    len: usize,
}

impl StackBuf {
    fn as_str(&self) -> &str {
        // Only whole `&str`s are ever copied in.
        std::str::from_utf8(&self.buf[..self.len]).unwrap_or_default()
    }
}

impl fmt::Write for StackBuf {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let end = self.len + s.len();
        if end > self.buf.len() {
            return Err(fmt::Error);
        }
        self.buf[self.len..end].copy_from_slice(s.as_bytes());
        self.len = end;
        Ok(())
    }
}

/// A number or string as `round(value * 10^scale)`, sign + magnitude.
fn json_scaled(
    v: Json<'_>,
    ty: &ColumnType,
    scale: u32,
    rounding: Rounding,
) -> Result<BigInt, Box<Fail>> {
    let parsed = match v {
        Json::Num(n) => with_number_text(n, |t| {
            parse_decimal_text(t).map(|d| scale_decimal(&d, scale, rounding))
        }),
        Json::Str(s) => parse_decimal_text(s).map(|d| scale_decimal(&d, scale, rounding)),
        other => return Err(expected(other, "a number or a decimal string")),
    };
    match parsed {
        Some(Some(n)) => Ok(n),
        Some(None) => Err(out_of_range(v, ty)),
        None => Err(fail(v, "not a decimal number")),
    }
}

fn put_decimal(v: Json<'_>, ty: &ColumnType, precision: u8, scale: u8, out: &mut Vec<u8>) -> Step {
    let n = json_scaled(v, ty, scale.into(), Rounding::HalfAwayFromZero)?;
    if n.mag >= POW10[usize::from(precision)] {
        return Err(out_of_range(v, ty));
    }
    let width = match precision {
        0..=9 => 4,
        10..=18 => 8,
        19..=38 => 16,
        _ => 32,
    };
    // |value| < 10^P fits the signed width, so the low bytes of the two's complement are it.
    out.extend_from_slice(&n.twos_complement().to_le_bytes()[..width]);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Dates and times.

const DATE_MAX_DAYS: i64 = 65_535; // 2149-06-06
const DATE32_MIN_DAYS: i64 = -25_567; // 1900-01-01
const DATE32_MAX_DAYS: i64 = 120_529; // 2299-12-31
const DT64_MIN_SECS: i128 = -2_208_988_800; // 1900-01-01 00:00:00
const DT64_MAX_SECS: i128 = 10_413_791_999; // 2299-12-31 23:59:59

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's `days_from_civil`).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = i64::from((m + 9) % 12);
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn days_in_month(y: i64, m: u32) -> u32 {
    match m {
        2 if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Parses `YYYY-MM-DD[(T|t| )HH:MM[:SS[.fraction]][Z|z|±HH[:MM]]]`. Returns UTC seconds since the
/// epoch (of the whole second) and the fraction digits, which are always a non-negative
/// fraction of a second after it.
fn parse_datetime(s: &str) -> Option<(i64, &[u8])> {
    let b = s.as_bytes();
    let num = |from: usize, n: usize| -> Option<u32> {
        let digits = b.get(from..from + n)?;
        digits.iter().try_fold(0u32, |acc, &c| {
            c.is_ascii_digit().then(|| acc * 10 + u32::from(c - b'0'))
        })
    };
    let year = i64::from(num(0, 4)?);
    let month = num(5, 2)?;
    let day = num(8, 2)?;
    if b.get(4) != Some(&b'-') || b.get(7) != Some(&b'-') {
        return None;
    }
    if !(1..=12).contains(&month) || day == 0 || day > days_in_month(year, month) {
        return None;
    }
    let days = days_from_civil(year, month, day);
    if b.len() == 10 {
        return Some((days * 86_400, &[]));
    }
    if !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    let hour = num(11, 2)?;
    if b.get(13) != Some(&b':') {
        return None;
    }
    let minute = num(14, 2)?;
    let mut i = 16;
    let mut second = 0;
    if b.get(i) == Some(&b':') {
        second = num(i + 1, 2)?;
        i += 3;
    }
    let mut frac: &[u8] = &[];
    if b.get(i) == Some(&b'.') {
        let start = i + 1;
        i = start;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        if i == start {
            return None;
        }
        frac = &b[start..i];
    }
    let offset = match b.get(i) {
        None => 0,
        Some(b'Z' | b'z') if i + 1 == b.len() => 0,
        Some(&sign @ (b'+' | b'-')) => {
            let oh = num(i + 1, 2)?;
            // ±HH, ±HHMM or ±HH:MM, then the end.
            let om = match &b[i + 3..] {
                [] => 0,
                [b':', _, _] => num(i + 4, 2)?,
                [_, _] => num(i + 3, 2)?,
                _ => return None,
            };
            if oh > 23 || om > 59 {
                return None;
            }
            let secs = i64::from(oh * 3600 + om * 60);
            if sign == b'+' {
                secs
            } else {
                -secs
            }
        }
        Some(_) => return None,
    };
    if hour > 23 || minute > 59 || second > 59 {
        return None;
    }
    let secs = days * 86_400 + i64::from(hour * 3600 + minute * 60 + second) - offset;
    Some((secs, frac))
}

const DATETIME_FORMS: &str =
    "expected a date/time string (RFC 3339 or YYYY-MM-DD[ HH:MM:SS[.fff]], UTC if no offset)";

/// Days since the epoch from a date/datetime string or an integer number of days.
fn json_days(v: Json<'_>, ty: &ColumnType, min: i64, max: i64) -> Result<i64, Box<Fail>> {
    let days = match v {
        Json::Str(s) => {
            let (secs, _) = parse_datetime(s).ok_or_else(|| fail(v, DATETIME_FORMS))?;
            i128::from(secs.div_euclid(86_400))
        }
        Json::Num(_) => json_int(v, ty)?
            .to_i128()
            .ok_or_else(|| out_of_range(v, ty))?,
        other => return Err(expected(other, "a date string or a number of days")),
    };
    if days < i128::from(min) || days > i128::from(max) {
        return Err(out_of_range(v, ty));
    }
    Ok(days as i64)
}

/// Ticks of 10^-precision seconds since the epoch (floor), from a date/time string or a number
/// of seconds. Range checks are the caller's.
fn json_ticks(v: Json<'_>, ty: &ColumnType, precision: u8) -> Result<i128, Box<Fail>> {
    let p = usize::from(precision);
    match v {
        Json::Str(s) => {
            let Some((secs, frac)) = parse_datetime(s) else {
                // Epoch seconds quoted by the producer, like quoted integers elsewhere.
                if parse_decimal_text(s).is_some() {
                    let n = json_scaled(v, ty, precision.into(), Rounding::Floor)?;
                    return n.to_i128().ok_or_else(|| out_of_range(v, ty));
                }
                return Err(fail(v, DATETIME_FORMS));
            };
            let mut ticks = i128::from(secs) * POW10_I128[p];
            // The first `precision` fraction digits, zero-padded; later ones are dropped (floor).
            for i in 0..p {
                let d = frac.get(i).map_or(0, |c| c - b'0');
                ticks += i128::from(d) * POW10_I128[p - 1 - i];
            }
            Ok(ticks)
        }
        Json::Num(_) => {
            let n = json_scaled(v, ty, precision.into(), Rounding::Floor)?;
            n.to_i128().ok_or_else(|| out_of_range(v, ty))
        }
        other => Err(expected(other, "a date/time string or epoch seconds")),
    }
}

fn parse_uuid(s: &str) -> Option<[u8; 16]> {
    let b = s.as_bytes();
    let hyphens = match b.len() {
        32 => false,
        36 => true,
        _ => return None,
    };
    let mut out = [0u8; 16];
    let mut nibbles = 0usize;
    for (i, &c) in b.iter().enumerate() {
        if hyphens && matches!(i, 8 | 13 | 18 | 23) {
            if c != b'-' {
                return None;
            }
            continue;
        }
        let x = (c as char).to_digit(16)? as u8;
        out[nibbles / 2] |= if nibbles.is_multiple_of(2) { x << 4 } else { x };
        nibbles += 1;
    }
    Some(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a panic in a test is a failure with a backtrace
mod tests {
    use super::*;
    use serde_json::json;

    fn encoder(cols: &[(&str, &str, &str)]) -> RowEncoder {
        encoder_with(cols, UnknownFields::Ignore)
    }

    fn encoder_with(cols: &[(&str, &str, &str)], policy: UnknownFields) -> RowEncoder {
        let schema = TableSchema::from_columns("db", "t", cols.iter().copied()).unwrap();
        RowEncoder::new(&schema, policy)
    }

    /// `encode_value` (through the JSON text, the sink's path), after checking that the tree
    /// path (`encode_row`) gives the same bytes or the same error.
    fn encode_both(enc: &RowEncoder, row: &Value, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        let mut tree = out.clone();
        let by_tree = match row {
            Value::Object(map) => enc.encode_row(map, &mut tree),
            _ => Err(EncodeError::NotAnObject {
                value: String::new(),
            }),
        };
        let by_text = enc.encode_value(row, out);
        if let (Ok(()), Ok(())) = (&by_tree, &by_text) {
            assert_eq!(&tree, out, "{row}: the two paths wrote different bytes");
        } else if row.is_object() {
            assert_eq!(
                by_tree.as_ref().map_err(ToString::to_string),
                by_text.as_ref().map_err(ToString::to_string),
                "{row}: the two paths disagree"
            );
        }
        by_text
    }

    /// The value bytes of `v` in a single column of type `ty` (after the 0 flag byte).
    fn ok(ty: &str, v: Value) -> Vec<u8> {
        let enc = encoder(&[("c", ty, "")]);
        let mut out = Vec::new();
        encode_both(&enc, &json!({ "c": v }), &mut out).unwrap_or_else(|e| panic!("{ty} {v}: {e}"));
        assert_eq!(out[0], 0, "{ty} {v}: default flag set");
        out.remove(0);
        out
    }

    fn err(ty: &str, v: Value) -> String {
        let enc = encoder(&[("c", ty, "")]);
        let mut out = vec![0xAA];
        let e = encode_both(&enc, &json!({ "c": v }), &mut out)
            .expect_err(&format!("{ty} {v} should fail"));
        assert_eq!(out, [0xAA], "output not restored");
        e.to_string()
    }

    fn assert_err(ty: &str, v: Value, needle: &str) {
        let msg = err(ty, v);
        assert!(msg.contains(needle), "{msg:?} does not contain {needle:?}");
    }

    #[test]
    fn absent_and_null_use_defaults() {
        let enc = encoder(&[
            ("a", "UInt8", ""),
            ("b", "String", "DEFAULT"),
            ("n", "Nullable(UInt8)", ""),
            ("l", "LowCardinality(Nullable(String))", ""),
        ]);
        let mut out = Vec::new();
        enc.encode_value(&json!({}), &mut out).unwrap();
        assert_eq!(out, [1, 1, 1, 1]);
        out.clear();
        enc.encode_value(
            &json!({"a": null, "b": null, "n": null, "l": null}),
            &mut out,
        )
        .unwrap();
        // Non-Nullable null → default flag; Nullable null → value flag 0 + null flag 1.
        assert_eq!(out, [1, 1, 0, 1, 0, 1]);
        out.clear();
        enc.encode_value(&json!({"a": 7, "n": 8, "l": "x"}), &mut out)
            .unwrap();
        assert_eq!(out, [0, 7, 1, 0, 0, 8, 0, 0, 1, b'x']);
    }

    #[test]
    fn integers() {
        assert_eq!(ok("UInt8", json!(255)), [255]);
        assert_eq!(ok("UInt8", json!("42")), [42]);
        assert_eq!(ok("UInt8", json!(3.0)), [3]);
        assert_eq!(ok("Int8", json!(-128)), [0x80]);
        assert_eq!(ok("Int16", json!(-2)), [0xfe, 0xff]);
        assert_eq!(ok("UInt16", json!(0x1234)), [0x34, 0x12]);
        assert_eq!(ok("Int32", json!(i32::MIN)), i32::MIN.to_le_bytes());
        assert_eq!(ok("UInt32", json!(u32::MAX)), u32::MAX.to_le_bytes());
        assert_eq!(ok("Int64", json!(i64::MIN)), i64::MIN.to_le_bytes());
        assert_eq!(
            ok("Int64", json!("-9223372036854775808")),
            i64::MIN.to_le_bytes()
        );
        assert_eq!(ok("UInt64", json!(u64::MAX)), u64::MAX.to_le_bytes());
        assert_eq!(
            ok("UInt64", json!("18446744073709551615")),
            u64::MAX.to_le_bytes()
        );
        assert_eq!(
            ok("Int64", json!(1e15)),
            1_000_000_000_000_000i64.to_le_bytes()
        );
    }

    #[test]
    fn integer_errors() {
        assert_err("UInt8", json!(256), "out of range for UInt8: 256");
        assert_err("UInt8", json!(-1), "out of range for UInt8");
        assert_err("Int8", json!("128"), "out of range for Int8");
        assert_err(
            "UInt64",
            json!("18446744073709551616"),
            "out of range for UInt64",
        );
        assert_err("Int32", json!(3.5), "not an integer");
        assert_err("Int32", json!("3.0"), "not an integer");
        assert_err("Int32", json!("x"), "not an integer");
        assert_err("Int64", json!(1e300), "send it as a string");
        assert_err(
            "Int32",
            json!(true),
            "expected an integer (number or string), got a boolean",
        );
        assert_err("Int32", json!([1]), "got an array");
    }

    #[test]
    fn wide_integers() {
        assert_eq!(ok("Int128", json!(-1)), [0xff; 16]);
        assert_eq!(
            ok("Int128", json!("-170141183460469231731687303715884105728")),
            i128::MIN.to_le_bytes()
        );
        assert_eq!(
            ok("UInt128", json!("340282366920938463463374607431768211455")),
            u128::MAX.to_le_bytes()
        );
        assert_err(
            "Int128",
            json!("170141183460469231731687303715884105728"),
            "out of range for Int128",
        );
        assert_err("UInt128", json!("-1"), "out of range for UInt128");

        assert_eq!(ok("Int256", json!(-1)), [0xff; 32]);
        assert_eq!(ok("UInt256", json!(1)), {
            let mut b = [0u8; 32];
            b[0] = 1;
            b
        });
        let max = "57896044618658097711785492504343953926634992332820282019728792003956564819967";
        let mut expected = [0xff; 32];
        expected[31] = 0x7f;
        assert_eq!(ok("Int256", json!(max)), expected);
        let min = "-57896044618658097711785492504343953926634992332820282019728792003956564819968";
        let mut expected = [0; 32];
        expected[31] = 0x80;
        assert_eq!(ok("Int256", json!(min)), expected);
        assert_err(
            "Int256",
            json!("57896044618658097711785492504343953926634992332820282019728792003956564819968"),
            "out of range for Int256",
        );
        let umax = "115792089237316195423570985008687907853269984665640564039457584007913129639935";
        assert_eq!(ok("UInt256", json!(umax)), [0xff; 32]);
        assert_err(
            "UInt256",
            json!("115792089237316195423570985008687907853269984665640564039457584007913129639936"),
            "out of range for UInt256",
        );
        assert_err("UInt256", json!(-5), "out of range for UInt256");
        // 2^64 * 3 + 5 in limbs.
        let v = ok("UInt256", json!("55340232221128654853"));
        assert_eq!(&v[..16], &((3u128 << 64) | 5).to_le_bytes());
    }

    #[test]
    fn bools() {
        assert_eq!(ok("Bool", json!(true)), [1]);
        assert_eq!(ok("Bool", json!(false)), [0]);
        assert_eq!(ok("Bool", json!(1)), [1]);
        assert_eq!(ok("Bool", json!(0)), [0]);
        assert_eq!(ok("Bool", json!("true")), [1]);
        assert_eq!(ok("Bool", json!("false")), [0]);
        assert_err("Bool", json!(2), "expected true/false");
        assert_err("Bool", json!("yes"), "expected true/false");
    }

    #[test]
    fn floats() {
        assert_eq!(ok("Float64", json!(1.5)), 1.5f64.to_le_bytes());
        assert_eq!(ok("Float64", json!(-3)), (-3f64).to_le_bytes());
        assert_eq!(ok("Float64", json!("2.25")), 2.25f64.to_le_bytes());
        assert_eq!(
            ok("Float64", json!("-inf")),
            f64::NEG_INFINITY.to_le_bytes()
        );
        assert_eq!(ok("Float64", json!("inf")), f64::INFINITY.to_le_bytes());
        assert!(f64::from_le_bytes(ok("Float64", json!("nan")).try_into().unwrap()).is_nan());
        assert_eq!(ok("Float32", json!(0.1)), 0.1f32.to_le_bytes());
        assert_eq!(ok("Float32", json!("0.1")), 0.1f32.to_le_bytes());
        assert_eq!(ok("Float32", json!("NaN")), f32::NAN.to_le_bytes());
        assert_eq!(
            ok("Float32", json!("-Infinity")),
            f32::NEG_INFINITY.to_le_bytes()
        );
        assert_err("Float32", json!(1e39), "out of range for Float32");
        assert_err("Float32", json!("1e39"), "out of range for Float32");
        assert_err("Float64", json!("abc"), "not a number");
        assert_err("Float64", json!({}), "got an object");
    }

    #[test]
    fn bfloat16_truncates_like_clickhouse() {
        // Values checked against `toBFloat16(...)` on ClickHouse 26.9.
        assert_eq!(ok("BFloat16", json!(1.00390625)), [0x80, 0x3f]);
        assert_eq!(ok("BFloat16", json!(1.01171875)), [0x81, 0x3f]);
        assert_eq!(ok("BFloat16", json!(-1.3)), [0xa6, 0xbf]);
        assert_eq!(ok("BFloat16", json!(-2)), [0x00, 0xc0]);
    }

    #[test]
    fn decimals() {
        assert_eq!(ok("Decimal(9, 2)", json!(12.34)), 1234i32.to_le_bytes());
        assert_eq!(
            ok("Decimal(9, 2)", json!("-12.34")),
            (-1234i32).to_le_bytes()
        );
        assert_eq!(ok("Decimal(9, 2)", json!(5)), 500i32.to_le_bytes());
        assert_eq!(ok("Decimal(9, 2)", json!("1e-2")), 1i32.to_le_bytes());
        assert_eq!(ok("Decimal(9, 2)", json!("1.2E1")), 1200i32.to_le_bytes());
        assert_eq!(ok("Decimal(9, 2)", json!(".5")), 50i32.to_le_bytes());
        // Rounding half away from zero.
        assert_eq!(ok("Decimal(9, 2)", json!("1.005")), 101i32.to_le_bytes());
        assert_eq!(ok("Decimal(9, 2)", json!("1.00499")), 100i32.to_le_bytes());
        assert_eq!(
            ok("Decimal(9, 2)", json!("-1.005")),
            (-101i32).to_le_bytes()
        );
        assert_eq!(ok("Decimal(9, 2)", json!("0.001")), 0i32.to_le_bytes());
        assert_eq!(ok("Decimal(9, 2)", json!("-0.001")), 0i32.to_le_bytes());
        assert_eq!(ok("Decimal(9, 2)", json!("1e-100")), 0i32.to_le_bytes());
        // 0.1 + 0.2 as a float would be 0.30000000000000004: the text is exact.
        assert_eq!(ok("Decimal(9, 2)", json!(0.3)), 30i32.to_le_bytes());
        assert_eq!(
            ok("Decimal(18, 4)", json!("-99999999999999.9999")),
            (-999_999_999_999_999_999i64).to_le_bytes()
        );
        assert_eq!(
            ok(
                "Decimal(38, 10)",
                json!("-1234567890123456789012345678.0123456789")
            ),
            (-12_345_678_901_234_567_890_123_456_780_123_456_789i128).to_le_bytes()
        );
        let v = ok("Decimal(76, 0)", json!(format!("-{}", "9".repeat(76))));
        assert_eq!(v.len(), 32);
        assert_eq!(v[31], 0xe9); // -(10^76 - 1), high byte of the two's complement
        assert_eq!(ok("Decimal(50, 2)", json!(-1)), {
            let mut b = [0xff; 32];
            b[0] = 0x9c; // -100
            b
        });
    }

    #[test]
    fn decimal_errors() {
        assert_err(
            "Decimal(9, 2)",
            json!("10000000"),
            "out of range for Decimal(9, 2)",
        );
        assert_err("Decimal(9, 2)", json!("9999999.995"), "out of range");
        assert_err("Decimal(9, 2)", json!("1e400"), "out of range");
        assert_err("Decimal(9, 2)", json!("abc"), "not a decimal number");
        assert_err("Decimal(9, 2)", json!("1.2.3"), "not a decimal number");
        assert_err("Decimal(9, 2)", json!("1e"), "not a decimal number");
        assert_err("Decimal(9, 2)", json!(""), "not a decimal number");
        assert_err("Decimal(9, 2)", json!(false), "got a boolean");
        assert_err("Decimal(76, 0)", json!("1".repeat(80)), "out of range");
    }

    #[test]
    fn strings() {
        assert_eq!(ok("String", json!("héllo")), b"\x06h\xc3\xa9llo");
        assert_eq!(ok("String", json!("")), [0]);
        let long = "x".repeat(300);
        let v = ok("String", json!(long));
        assert_eq!(&v[..2], [0xac, 0x02]); // LEB128(300)
        assert_eq!(v.len(), 302);
        // Non-strings: compact JSON text.
        assert_eq!(ok("String", json!(12)), b"\x0212");
        assert_eq!(ok("String", json!(true)), b"\x04true");
        assert_eq!(ok("String", json!({"a": [1, 2]})), b"\x0b{\"a\":[1,2]}");
        let big = json!({ "k": "y".repeat(200) });
        let v = ok("String", big.clone());
        let text = serde_json::to_vec(&big).unwrap();
        assert_eq!(&v[..2], [0xd0, 0x01]); // LEB128(208)
        assert_eq!(&v[2..], text);
    }

    #[test]
    fn fixed_strings() {
        assert_eq!(ok("FixedString(4)", json!("ab")), b"ab\0\0");
        assert_eq!(ok("FixedString(2)", json!("ab")), b"ab");
        assert_err(
            "FixedString(2)",
            json!("abc"),
            "string of 3 bytes is longer than FixedString(2)",
        );
        assert_err("FixedString(2)", json!(1), "expected a string");
    }

    #[test]
    fn uuids() {
        let expected = [
            0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11, 0x00, // checked against ClickHouse 26.9
            0xff, 0xee, 0xdd, 0xcc, 0xbb, 0xaa, 0x99, 0x88,
        ];
        assert_eq!(
            ok("UUID", json!("00112233-4455-6677-8899-aabbccddeeff")),
            expected
        );
        assert_eq!(
            ok("UUID", json!("00112233445566778899AABBCCDDEEFF")),
            expected
        );
        assert_err(
            "UUID",
            json!("00112233-4455-6677-8899-aabbccddeef"),
            "not a valid UUID",
        );
        assert_err(
            "UUID",
            json!("0011223344-55-6677-8899-aabbccddeeff"),
            "not a valid UUID",
        );
        assert_err(
            "UUID",
            json!("g0112233445566778899aabbccddeeff"),
            "not a valid UUID",
        );
        assert_err("UUID", json!(5), "expected a UUID string");
    }

    #[test]
    fn enums() {
        let ty = "Enum8('a' = 1, 'b' = -2)";
        assert_eq!(ok(ty, json!("a")), [1]);
        assert_eq!(ok(ty, json!("b")), [0xfe]);
        assert_eq!(ok(ty, json!(-2)), [0xfe]);
        assert_err(
            ty,
            json!("x"),
            "unknown enum value 'x' (expected one of: a, b)",
        );
        assert_err(
            ty,
            json!(3),
            "unknown enum value 3 (expected one of: 1 (a), -2 (b))",
        );
        let ty16 = "Enum16('big' = 1000, 'neg' = -1000)";
        assert_eq!(ok(ty16, json!("big")), 1000i16.to_le_bytes());
        assert_eq!(ok(ty16, json!(-1000)), (-1000i16).to_le_bytes());
        assert_err(ty16, json!([]), "expected an enum name or value");
    }

    #[test]
    fn dates() {
        assert_eq!(ok("Date", json!("1970-01-01")), [0, 0]);
        assert_eq!(ok("Date", json!("2024-02-29")), 19_782u16.to_le_bytes());
        assert_eq!(ok("Date", json!("2149-06-06")), 65_535u16.to_le_bytes());
        assert_eq!(ok("Date", json!(19_782)), 19_782u16.to_le_bytes());
        // Date of an RFC 3339 timestamp in UTC.
        assert_eq!(
            ok("Date", json!("2024-03-01T01:00:00+02:00")),
            19_782u16.to_le_bytes()
        );
        assert_eq!(
            ok("Date32", json!("1900-01-01")),
            (-25_567i32).to_le_bytes()
        );
        assert_eq!(ok("Date32", json!("2299-12-31")), 120_529i32.to_le_bytes());
        assert_eq!(ok("Date32", json!(-1)), (-1i32).to_le_bytes());
        assert_err("Date", json!("2149-06-07"), "out of range for Date");
        assert_err("Date", json!("1969-12-31"), "out of range for Date");
        assert_err("Date", json!(-1), "out of range for Date");
        assert_err("Date32", json!("1899-12-31"), "out of range for Date32");
        assert_err("Date32", json!("2300-01-01"), "out of range for Date32");
        assert_err("Date", json!("2023-02-29"), "expected a date/time string");
        assert_err("Date", json!("2023-13-01"), "expected a date/time string");
        assert_err("Date", json!("01/02/2023"), "expected a date/time string");
        assert_err("Date", json!(1.5), "not an integer");
    }

    #[test]
    fn datetimes() {
        let ty = "DateTime('UTC')";
        let t = 1_700_000_000u32.to_le_bytes(); // 2023-11-14T22:13:20Z
        assert_eq!(ok(ty, json!("2023-11-14T22:13:20Z")), t);
        assert_eq!(ok(ty, json!("2023-11-14t22:13:20z")), t);
        assert_eq!(ok(ty, json!("2023-11-14 22:13:20")), t);
        assert_eq!(ok(ty, json!("2023-11-14T22:13:20.999")), t);
        assert_eq!(ok(ty, json!("2023-11-15T00:13:20+02:00")), t);
        assert_eq!(ok(ty, json!("2023-11-14T20:13:20-0200")), t);
        assert_eq!(ok(ty, json!("2023-11-15T01:13:20+03")), t);
        assert_eq!(ok(ty, json!(1_700_000_000)), t);
        assert_eq!(ok(ty, json!(1_700_000_000.9)), t);
        assert_eq!(
            ok("DateTime", json!("2023-11-14 22:13")),
            1_699_999_980u32.to_le_bytes()
        );
        assert_eq!(ok("DateTime", json!("1970-01-01")), [0; 4]);
        assert_eq!(
            ok("DateTime", json!("2106-02-07 06:28:15")),
            u32::MAX.to_le_bytes()
        );
        assert_err(
            "DateTime",
            json!("2106-02-07 06:28:16"),
            "out of range for DateTime",
        );
        assert_err("DateTime", json!("1969-12-31 23:59:59"), "out of range");
        assert_err("DateTime", json!(-1), "out of range");
        assert_err(
            "DateTime",
            json!("2023-11-14 24:00:00"),
            "expected a date/time string",
        );
        assert_err(
            "DateTime",
            json!("2023-11-14T22:13:20+02:00x"),
            "expected a date/time",
        );
        assert_err(
            "DateTime",
            json!("2023-11-14T22:13:20."),
            "expected a date/time",
        );
        assert_err(
            "DateTime",
            json!(true),
            "expected a date/time string or epoch seconds",
        );
    }

    #[test]
    fn datetime64() {
        let ms = |x: i64| x.to_le_bytes();
        let ty = "DateTime64(3, 'UTC')";
        assert_eq!(
            ok(ty, json!("2023-11-14T22:13:20.123Z")),
            ms(1_700_000_000_123)
        );
        assert_eq!(
            ok(ty, json!("2023-11-14 22:13:20.1239")),
            ms(1_700_000_000_123)
        );
        assert_eq!(
            ok(ty, json!("2023-11-14 22:13:20.1")),
            ms(1_700_000_000_100)
        );
        assert_eq!(ok(ty, json!(1_700_000_000.123)), ms(1_700_000_000_123));
        assert_eq!(ok(ty, json!(1_700_000_000)), ms(1_700_000_000_000));
        assert_eq!(ok(ty, json!("1700000000.5")), ms(1_700_000_000_500));
        // Before the epoch, extra digits go toward the past.
        assert_eq!(ok(ty, json!("1969-12-31T23:59:59.9999Z")), ms(-1));
        assert_eq!(ok(ty, json!(-0.0001)), ms(-1));
        assert_eq!(ok(ty, json!("1900-01-01 00:00:00")), ms(-2_208_988_800_000));
        assert_eq!(
            ok(ty, json!("2299-12-31 23:59:59.999")),
            ms(10_413_791_999_999)
        );
        assert_err(
            ty,
            json!("1899-12-31 23:59:59.999"),
            "out of range for DateTime64(3, 'UTC')",
        );
        assert_err(ty, json!("2300-01-01 00:00:00"), "out of range");
        assert_eq!(
            ok("DateTime64(9)", json!("2023-11-14T22:13:20.123456789Z")),
            ms(1_700_000_000_123_456_789)
        );
        assert_eq!(
            ok("DateTime64(9)", json!("2262-04-11 23:47:16.854775807")),
            ms(i64::MAX)
        );
        assert_err(
            "DateTime64(9)",
            json!("2262-04-11 23:47:16.854775808"),
            "out of range",
        );
        assert_eq!(
            ok("DateTime64(0)", json!("2023-11-14T22:13:20.9")),
            ms(1_700_000_000)
        );
        assert_err(ty, json!("yesterday"), "expected a date/time string");
        assert_err(ty, json!(1e300), "out of range");
    }

    #[test]
    fn ip_addresses() {
        assert_eq!(ok("IPv4", json!("1.2.3.4")), [4, 3, 2, 1]);
        assert_err("IPv4", json!("1.2.3.256"), "not a valid IPv4 address");
        assert_err("IPv4", json!(16909060), "expected an IPv4 address string");
        assert_eq!(
            ok("IPv6", json!("2001:db8::1")),
            [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]
        );
        assert_eq!(
            ok("IPv6", json!("1.2.3.4")),
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 1, 2, 3, 4]
        );
        assert_err("IPv6", json!("2001:db8::g"), "not a valid IPv6 address");
    }

    #[test]
    fn nullable_and_low_cardinality() {
        assert_eq!(ok("Nullable(UInt8)", json!(5)), [0, 5]);
        assert_eq!(ok("Nullable(UInt8)", json!(null)), [1]);
        assert_eq!(ok("LowCardinality(String)", json!("ab")), [2, b'a', b'b']);
        assert_eq!(
            ok("LowCardinality(Nullable(String))", json!("a")),
            [0, 1, b'a']
        );
        assert_eq!(
            ok("SimpleAggregateFunction(sum, UInt64)", json!(1)),
            1u64.to_le_bytes()
        );
        assert_err("Nullable(UInt8)", json!(300), "out of range for UInt8");
    }

    #[test]
    fn arrays() {
        assert_eq!(ok("Array(UInt8)", json!([1, 2, 3])), [3, 1, 2, 3]);
        assert_eq!(ok("Array(UInt8)", json!([])), [0]);
        assert_eq!(
            ok("Array(Nullable(Int8))", json!([null, -1])),
            [2, 1, 0, 0xff]
        );
        assert_eq!(
            ok("Array(Array(String))", json!([["a"], []])),
            [2, 1, 1, b'a', 0]
        );
        let msg = err("Array(UInt8)", json!([1, 2, 3, 300]));
        assert_eq!(
            msg,
            "column \"c\"[3] (Array(UInt8)): out of range for UInt8: 300"
        );
        assert_err(
            "Array(UInt8)",
            json!([1, null]),
            "null is not allowed for UInt8",
        );
        assert_err(
            "Array(UInt8)",
            json!("1,2"),
            "expected an array, got a string",
        );
    }

    #[test]
    fn maps() {
        // serde_json's Map is ordered by key.
        assert_eq!(
            ok("Map(String, UInt8)", json!({"a": 1, "b": 2})),
            [2, 1, b'a', 1, 1, b'b', 2]
        );
        assert_eq!(
            ok("Map(UInt16, String)", json!({"258": "x"})),
            [1, 2, 1, 1, b'x']
        );
        assert_eq!(
            ok("Map(UInt16, String)", json!([[258, "x"], ["1", "y"]])),
            [2, 2, 1, 1, b'x', 1, 0, 1, b'y']
        );
        assert_eq!(ok("Map(String, UInt8)", json!({})), [0]);
        assert_eq!(
            ok(
                "Map(LowCardinality(String), Array(UInt8))",
                json!({"k": [7]})
            ),
            [1, 1, b'k', 1, 7]
        );
        let msg = err("Map(String, UInt8)", json!({"x": 1, "y": "big"}));
        assert_eq!(
            msg,
            "column \"c\"[\"y\"] (Map(String, UInt8)): not an integer (UInt8): \"big\""
        );
        let msg = err("Map(UInt8, String)", json!({"x": "1"}));
        assert_eq!(
            msg,
            "column \"c\".key \"x\" (Map(UInt8, String)): not an integer (UInt8): \"x\""
        );
        assert_err("Map(UInt8, String)", json!([[1]]), "[0]");
        assert_err(
            "Map(UInt8, String)",
            json!([[1, 2, 3]]),
            "expected a [key, value] pair",
        );
        assert_err("Map(UInt8, UInt8)", json!([[1, 300]]), "c\"[0][1]");
        assert_err(
            "Map(String, String)",
            json!(3),
            "expected an object or an array of [key, value] pairs",
        );
    }

    #[test]
    fn tuples() {
        assert_eq!(ok("Tuple(UInt8, String)", json!([1, "a"])), [1, 1, b'a']);
        let ty = "Tuple(a UInt8, b Nullable(String), `c d` Int8)";
        assert_eq!(ok(ty, json!([1, null, -1])), [1, 1, 0xff]);
        assert_eq!(
            ok(ty, json!({"c d": -1, "a": 1, "b": "x"})),
            [1, 0, 1, b'x', 0xff]
        );
        // An absent Nullable element is NULL; extra fields are ignored by default.
        assert_eq!(ok(ty, json!({"a": 1, "c d": 2, "zzz": 0})), [1, 1, 2]);
        assert_err(
            ty,
            json!({"b": "x", "c d": 2}),
            "missing tuple element \"a\"",
        );
        assert_err(ty, json!([1, 2]), "needs an array of 3 values, got 2");
        assert_err(
            "Tuple(UInt8, String)",
            json!({"a": 1}),
            "has unnamed elements",
        );
        let msg = err(ty, json!({"a": 1, "c d": 200}));
        assert!(msg.starts_with("column \"c\".\"c d\" ("), "{msg}");
        let msg = err(
            "Array(Tuple(x UInt8, y Array(UInt8)))",
            json!([{"x": 1, "y": [1, "z"]}]),
        );
        assert!(msg.starts_with("column \"c\"[0].y[1] ("), "{msg}");
        // Nested with flatten_nested = 0.
        assert_eq!(
            ok("Nested(a UInt8, b String)", json!([{"a": 1, "b": "x"}])),
            [1, 1, 1, b'x']
        );
    }

    #[test]
    fn unknown_fields() {
        let schema = TableSchema::from_columns(
            "db",
            "t",
            [("a", "UInt8", ""), ("m", "UInt8", "MATERIALIZED")],
        )
        .unwrap();
        let row = json!({"a": 1, "x": 2, "m": 3});
        let mut out = Vec::new();
        RowEncoder::new(&schema, UnknownFields::Ignore)
            .encode_value(&row, &mut out)
            .unwrap();
        assert_eq!(out, [0, 1]);
        let strict = RowEncoder::new(&schema, UnknownFields::Reject);
        let e = strict.encode_value(&row, &mut out).unwrap_err();
        assert_eq!(e.to_string(), "fields not in table db.t: \"m\", \"x\"");
        assert_eq!(out, [0, 1], "output not restored");
        let tuple = encoder_with(&[("c", "Tuple(a UInt8)", "")], UnknownFields::Reject);
        let e = tuple
            .encode_value(&json!({"c": {"a": 1, "b": 2}}), &mut out)
            .unwrap_err();
        assert!(
            e.to_string()
                .contains("fields not in Tuple(a UInt8): \"b\""),
            "{e}"
        );
    }

    #[test]
    fn failed_row_leaves_buffer_untouched() {
        let enc = encoder(&[("a", "String", ""), ("b", "Array(UInt8)", "")]);
        let mut out = Vec::new();
        enc.encode_value(&json!({"a": "first", "b": [1]}), &mut out)
            .unwrap();
        let good = out.clone();
        let e = enc
            .encode_value(&json!({"a": "second", "b": [1, 2, -3]}), &mut out)
            .unwrap_err();
        assert_eq!(out, good);
        match e {
            EncodeError::InvalidValue {
                column,
                path,
                column_type,
                value,
                reason,
            } => {
                assert_eq!(column, "b");
                assert_eq!(path, "[2]");
                assert_eq!(column_type, "Array(UInt8)");
                assert_eq!(value, "-3");
                assert_eq!(reason, "out of range for UInt8");
            }
            other => panic!("{other:?}"),
        }
        let e = enc.encode_value(&json!([1]), &mut out).unwrap_err();
        assert_eq!(e.to_string(), "row is not a JSON object: [1]");
    }

    #[test]
    fn long_values_are_shortened_in_errors() {
        let long = "é".repeat(200);
        let msg = err("UUID", json!(long));
        assert!(msg.ends_with('…'), "{msg}");
        assert!(msg.len() < 200, "{msg}");
        let obj = json!({"k": vec![1; 500]});
        let msg = err("Array(UInt8)", obj);
        assert!(msg.ends_with('…') && msg.len() < 250, "{msg}");
    }

    #[test]
    fn decimal_text_scaling() {
        let s = |t: &str, scale: u32, r: Rounding| {
            let n = scale_decimal(&parse_decimal_text(t).unwrap(), scale, r).unwrap();
            n.to_i128().unwrap()
        };
        assert_eq!(s("123.456", 2, Rounding::HalfAwayFromZero), 12346);
        assert_eq!(s("123.456", 2, Rounding::Floor), 12345);
        assert_eq!(s("-123.451", 2, Rounding::Floor), -12346);
        assert_eq!(s("-123.450", 2, Rounding::Floor), -12345);
        assert_eq!(s("1.5e3", 0, Rounding::Floor), 1500);
        assert_eq!(s("15e-1", 0, Rounding::HalfAwayFromZero), 2);
        assert_eq!(s("0.0000", 3, Rounding::Floor), 0);
        assert_eq!(s("-0.0001", 0, Rounding::Floor), -1);
        assert_eq!(s("0e999999999", 2, Rounding::Floor), 0);
        assert!(parse_decimal_text("-").is_none());
        assert!(parse_decimal_text(".").is_none());
        assert!(parse_decimal_text("1e+").is_none());
        assert!(parse_decimal_text(" 1").is_none());
    }

    #[test]
    fn leb128_lengths() {
        let enc = |n: u64| {
            let mut b = [0u8; 10];
            let len = leb128(n, &mut b);
            b[..len].to_vec()
        };
        assert_eq!(enc(0), [0]);
        assert_eq!(enc(127), [127]);
        assert_eq!(enc(128), [0x80, 1]);
        assert_eq!(
            enc(u64::MAX),
            [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 1]
        );
    }

    /// The one-pass path for flat rows and serde_json's path write the same bytes and give the
    /// same errors, whichever types the fields land in.
    #[test]
    fn flat_path_matches_the_serde_path() {
        let cols = [
            ("a", "UInt8", ""),
            ("i", "Int64", ""),
            ("u", "UInt64", ""),
            ("f", "Float64", ""),
            ("d", "Decimal(18, 4)", ""),
            ("s", "String", ""),
            ("n", "Nullable(String)", ""),
            ("b", "Bool", ""),
            ("t", "DateTime64(3)", ""),
            ("day", "Date", ""),
        ];
        let values = [
            "0",
            "-0",
            "1",
            "-1",
            "1.5",
            "-0.5",
            "255",
            "256",
            "0.1",
            "19.9999",
            "1.00005",
            "18446744073709551615",
            "18446744073709551616",
            "-9223372036854775808",
            "-9223372036854775809",
            "123456789012345678901234567890.5",
            "true",
            "false",
            "null",
            r#""""#,
            r#""x\"y\\z\n""#,
            r#""19.99""#,
            r#""2026-11-23T10:00:00.123Z""#,
            r#""2026-11-23""#,
            r#""1700000000.5""#,
            r#""true""#,
            r#""é""#,
            "1e3",
            r#""\u0041""#,
            "[1]",
            r#"{"k":1}"#,
        ];
        let keys = [
            "a", "i", "u", "f", "d", "s", "n", "b", "t", "day", "other", "a",
        ];
        let mut state = 0x2545_F491_4F6C_DD1D_u64;
        let mut next = move |n: usize| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % n as u64) as usize
        };
        let mut flat_rows = 0;
        for policy in [UnknownFields::Ignore, UnknownFields::Reject] {
            let enc = encoder_with(&cols, policy);
            for _ in 0..20_000 {
                let fields: Vec<String> = (0..next(8))
                    .map(|_| {
                        format!(
                            "\"{}\":{}",
                            keys[next(keys.len())],
                            values[next(values.len())]
                        )
                    })
                    .collect();
                let text = format!("{{{}}}", fields.join(","));
                let mut fast = vec![7];
                let Some(r) = enc.encode_flat(&text, &mut fast) else {
                    continue;
                };
                flat_rows += 1;
                let fast_r = r.map_err(|e| e.to_string());
                let mut slow = vec![7];
                let slow_r = enc
                    .encode_from(serde_json::Deserializer::from_str(&text), &mut slow)
                    .map_err(|e| e.to_string());
                assert_eq!((fast_r, fast), (slow_r, slow), "{text}");
            }
        }
        assert!(flat_rows > 10_000, "{flat_rows}");
    }

    #[test]
    fn json_bytes_path() {
        let enc = encoder_with(
            &[
                ("a", "UInt8", ""),
                ("s", "String", ""),
                ("t", "Array(UInt8)", ""),
            ],
            UnknownFields::Reject,
        );
        let encode = |text: &str| {
            let mut out = vec![0xAA];
            let r = enc.encode_json(text.as_bytes(), &mut out);
            (r.map_err(|e| e.to_string()), out)
        };
        // Fields in any order, escapes in keys and strings, the last of repeated keys wins.
        let (r, out) = encode(r#"{"t":[1,2],"s":"x\"y","a":1,"a":2}"#);
        assert_eq!(r, Ok(()));
        assert_eq!(out, [0xAA, 0, 2, 0, 3, b'x', b'"', b'y', 0, 2, 1, 2]);
        let (r, out) = encode(r#" {"\u0061": 7} "#);
        assert_eq!(r, Ok(()));
        assert_eq!(out, [0xAA, 0, 7, 1, 1]);
        // Objects in a String column are kept as their compact text.
        let (r, out) = encode(r#"{"s": {"k": [1, null]}}"#);
        assert_eq!(r, Ok(()));
        assert_eq!(&out[..4], [0xAA, 1, 0, 14]);
        assert_eq!(&out[4..18], br#"{"k":[1,null]}"#);

        for (text, needle) in [
            (r#"{"a": 1"#, "not valid JSON: EOF while parsing an object"),
            (r#"{"a": 1} x"#, "not valid JSON: trailing characters"),
            (r#"{"x": [1, }"#, "not valid JSON"),
            ("[1, 2]", "a JSON array, not an object"),
            ("[1, 2", "not valid JSON"),
            ("\"x\"", "a JSON string, not an object"),
            ("null", "a JSON null, not an object"),
            (r#"{"a": 256}"#, "out of range for UInt8"),
            (
                r#"{"a": 1, "y": 1, "x": {"z": 2}, "y": 3}"#,
                r#"fields not in table db.t: "x", "y""#,
            ),
        ] {
            let (r, out) = encode(text);
            let e = r.expect_err(text);
            assert!(e.contains(needle), "{text}: {e}");
            assert_eq!(out, [0xAA], "{text}: output not restored");
        }
        let mut out = Vec::new();
        let bad_utf8 = enc.encode_json(b"{\"s\": \"\xff\"}", &mut out).unwrap_err();
        assert!(matches!(bad_utf8, JsonRowError::Syntax(_)), "{bad_utf8}");
    }
}
