//! Typed getters on JSON values, addressed by JSON pointer (`"/user/id"`, RFC 6901).
//!
//! Every getter returns a `schema` [`RecordError`] naming the pointer when the field is
//! missing, `null`, or of the wrong type or format, so `?` turns a bad field into a
//! dead-letter entry that says which field was wrong.

use serde_json::{Map, Value};

use crate::timestamp::{EpochUnit, Timestamp};
use crate::RecordError;

/// The JSON type of a value, as used in error messages.
pub fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn wrong_type(pointer: &str, expected: &str, found: &Value) -> RecordError {
    RecordError::schema(format!(
        "field {pointer}: expected {expected}, found {}",
        type_name(found)
    ))
}

/// The value at `pointer`; missing and `null` are errors.
pub fn get<'a>(value: &'a Value, pointer: &str) -> Result<&'a Value, RecordError> {
    match value.pointer(pointer) {
        None => Err(RecordError::schema(format!("missing field {pointer}"))),
        Some(Value::Null) => Err(RecordError::schema(format!("field {pointer} is null"))),
        Some(v) => Ok(v),
    }
}

/// The value at `pointer`, or `None` when missing or `null`.
pub fn get_opt<'a>(value: &'a Value, pointer: &str) -> Option<&'a Value> {
    value.pointer(pointer).filter(|v| !v.is_null())
}

pub fn get_str<'a>(value: &'a Value, pointer: &str) -> Result<&'a str, RecordError> {
    let v = get(value, pointer)?;
    v.as_str().ok_or_else(|| wrong_type(pointer, "a string", v))
}

/// A string that is not empty (nor only whitespace).
pub fn get_non_empty_str<'a>(value: &'a Value, pointer: &str) -> Result<&'a str, RecordError> {
    let s = get_str(value, pointer)?;
    if s.trim().is_empty() {
        return Err(RecordError::schema(format!("field {pointer} is empty")));
    }
    Ok(s)
}

/// An integer that fits `i64`; `1.5` and `1.0` are refused.
pub fn get_i64(value: &Value, pointer: &str) -> Result<i64, RecordError> {
    let v = get(value, pointer)?;
    v.as_i64()
        .ok_or_else(|| wrong_type(pointer, "an integer", v))
}

/// A non-negative integer that fits `u64`.
pub fn get_u64(value: &Value, pointer: &str) -> Result<u64, RecordError> {
    let v = get(value, pointer)?;
    v.as_u64()
        .ok_or_else(|| wrong_type(pointer, "a non-negative integer", v))
}

pub fn get_f64(value: &Value, pointer: &str) -> Result<f64, RecordError> {
    let v = get(value, pointer)?;
    v.as_f64().ok_or_else(|| wrong_type(pointer, "a number", v))
}

pub fn get_bool(value: &Value, pointer: &str) -> Result<bool, RecordError> {
    let v = get(value, pointer)?;
    v.as_bool()
        .ok_or_else(|| wrong_type(pointer, "a boolean", v))
}

pub fn get_object<'a>(
    value: &'a Value,
    pointer: &str,
) -> Result<&'a Map<String, Value>, RecordError> {
    let v = get(value, pointer)?;
    v.as_object()
        .ok_or_else(|| wrong_type(pointer, "an object", v))
}

pub fn get_array<'a>(value: &'a Value, pointer: &str) -> Result<&'a [Value], RecordError> {
    let v = get(value, pointer)?;
    v.as_array()
        .map(Vec::as_slice)
        .ok_or_else(|| wrong_type(pointer, "an array", v))
}

/// A decimal amount, given as a JSON number or a numeric string (`19.99`, `"19.99"`,
/// `"1e3"`), as an integer count of `10^-scale` units: with `scale` 2, `19.99` is `1999`.
///
/// Decimal text is converted exactly, without going through binary floating point. Digits
/// beyond `scale` are rounded half away from zero (`0.125` → `13` at scale 2).
pub fn get_fixed_point(value: &Value, pointer: &str, scale: u32) -> Result<i64, RecordError> {
    let v = get(value, pointer)?;
    let text = match v {
        // serde_json prints the shortest text that reads back as the same number, so
        // `19.99` stays "19.99" rather than 19.989999999999998.
        Value::Number(n) => n.to_string(),
        Value::String(s) => s.trim().to_owned(),
        other => return Err(wrong_type(pointer, "a number or a numeric string", other)),
    };
    parse_fixed_point(&text, scale).ok_or_else(|| {
        RecordError::schema(format!(
            "field {pointer}: {text:?} is not a decimal number that fits in 64 bits at scale {scale}"
        ))
    })
}

/// Parses `[+-]digits[.digits][(e|E)[+-]digits]` into `10^-scale` units.
pub(crate) fn parse_fixed_point(text: &str, scale: u32) -> Option<i64> {
    let (negative, rest) = match text.as_bytes().first()? {
        b'-' => (true, &text[1..]),
        b'+' => (false, &text[1..]),
        _ => (false, text),
    };
    let (mantissa, exponent) = match rest.find(['e', 'E']) {
        Some(i) => (&rest[..i], rest[i + 1..].parse::<i32>().ok()?),
        None => (rest, 0),
    };
    let (int_part, frac_part) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    if int_part.is_empty() && frac_part.is_empty()
        || !int_part
            .bytes()
            .chain(frac_part.bytes())
            .all(|c| c.is_ascii_digit())
    {
        return None;
    }
    // The value is D * 10^shift units, D being all the digits read as one integer.
    let frac_len = i64::try_from(frac_part.len()).ok()?;
    let shift = i64::from(scale) + i64::from(exponent) - frac_len;
    let digit_count = i64::try_from(int_part.len() + frac_part.len()).ok()?;
    // With shift < 0 only the leading digits count; the one after them decides rounding.
    let keep = digit_count + shift.min(0);
    let limit = i128::from(i64::MAX) + 1;

    let mut units: i128 = 0;
    let mut round_up = false;
    for (i, c) in (0_i64..).zip(int_part.bytes().chain(frac_part.bytes())) {
        if i < keep {
            units = units * 10 + i128::from(c - b'0');
            if units > limit {
                return None;
            }
        } else {
            round_up = i == keep && c >= b'5';
            break;
        }
    }
    if units != 0 {
        for _ in 0..shift.max(0) {
            units *= 10;
            if units > limit {
                return None;
            }
        }
    }
    if round_up {
        units += 1;
    }
    let signed = if negative { -units } else { units };
    i64::try_from(signed).ok()
}

/// A timestamp given as RFC 3339 text or as an integer epoch in `unit`.
pub fn get_timestamp(
    value: &Value,
    pointer: &str,
    unit: EpochUnit,
) -> Result<Timestamp, RecordError> {
    let v = get(value, pointer)?;
    let parsed = match v {
        Value::String(s) => Timestamp::parse_rfc3339(s),
        Value::Number(n) => match n.as_i64() {
            Some(epoch) => Timestamp::from_epoch(epoch, unit),
            None => {
                return Err(wrong_type(pointer, "RFC 3339 text or an integer epoch", v));
            }
        },
        other => {
            return Err(wrong_type(
                pointer,
                "RFC 3339 text or an integer epoch",
                other,
            ))
        }
    };
    parsed.map_err(|e| RecordError::schema(format!("field {pointer}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;
    use serde_json::json;

    fn event() -> Value {
        json!({
            "id": "tx-1",
            "blank": "  ",
            "user": {"id": 42, "tags": ["a"], "vip": true},
            "neg": -3,
            "ratio": 0.5,
            "nothing": null,
        })
    }

    #[test]
    fn getters_read_nested_fields() {
        let v = event();
        assert_eq!(get_str(&v, "/id").unwrap(), "tx-1");
        assert_eq!(get_i64(&v, "/user/id").unwrap(), 42);
        assert_eq!(get_u64(&v, "/user/id").unwrap(), 42);
        assert_eq!(get_f64(&v, "/ratio").unwrap(), 0.5);
        assert!(get_bool(&v, "/user/vip").unwrap());
        assert_eq!(get_array(&v, "/user/tags").unwrap().len(), 1);
        assert_eq!(get_object(&v, "/user").unwrap().len(), 3);
        assert_eq!(get_opt(&v, "/nothing"), None);
        assert_eq!(get_opt(&v, "/missing"), None);
        assert_eq!(get_opt(&v, "/neg"), Some(&json!(-3)));
    }

    #[test]
    fn errors_are_schema_errors_naming_the_pointer() {
        let v = event();
        let cases = [
            (
                get_str(&v, "/user/name").map(|_| ()),
                "missing field /user/name",
            ),
            (
                get_str(&v, "/nothing").map(|_| ()),
                "field /nothing is null",
            ),
            (
                get_str(&v, "/user/id").map(|_| ()),
                "field /user/id: expected a string, found number",
            ),
            (
                get_non_empty_str(&v, "/blank").map(|_| ()),
                "field /blank is empty",
            ),
            (
                get_u64(&v, "/neg").map(|_| ()),
                "field /neg: expected a non-negative integer, found number",
            ),
            (
                get_i64(&v, "/ratio").map(|_| ()),
                "field /ratio: expected an integer, found number",
            ),
            (
                get_object(&v, "/id").map(|_| ()),
                "field /id: expected an object, found string",
            ),
        ];
        for (result, message) in cases {
            let err = result.unwrap_err();
            assert_eq!(err.kind, ErrorKind::Schema);
            assert_eq!(err.message, message);
        }
    }

    #[test]
    fn fixed_point_is_exact() {
        let amount = |v: Value| get_fixed_point(&json!({ "a": v }), "/a", 2);
        assert_eq!(amount(json!(19.99)).unwrap(), 1999);
        assert_eq!(amount(json!("19.99")).unwrap(), 1999);
        assert_eq!(amount(json!(" 19.9 ")).unwrap(), 1990);
        assert_eq!(amount(json!(20)).unwrap(), 2000);
        assert_eq!(amount(json!("0.1")).unwrap(), 10);
        assert_eq!(amount(json!(".5")).unwrap(), 50);
        assert_eq!(amount(json!("7.")).unwrap(), 700);
        assert_eq!(amount(json!("-0.125")).unwrap(), -13);
        assert_eq!(amount(json!("0.124")).unwrap(), 12);
        assert_eq!(amount(json!("+1e3")).unwrap(), 100_000);
        assert_eq!(amount(json!("1234E-3")).unwrap(), 123);
        assert_eq!(amount(json!(1e-7)).unwrap(), 0);
        assert_eq!(amount(json!("5e-3")).unwrap(), 1);
        assert_eq!(amount(json!("5e-4")).unwrap(), 0);
        assert_eq!(amount(json!("0e999999999")).unwrap(), 0);
        assert_eq!(amount(json!("92233720368547758.07")).unwrap(), i64::MAX);
        assert_eq!(amount(json!("-92233720368547758.08")).unwrap(), i64::MIN);
        assert_eq!(
            amount(json!("000000000000000000000000000001.5")).unwrap(),
            150
        );
        for bad in [
            json!("92233720368547758.08"),
            json!("1e30"),
            json!("1e999999999"),
            json!(""),
            json!("."),
            json!("-"),
            json!("1.2.3"),
            json!("12abc"),
            json!("1e"),
            json!("NaN"),
            json!(true),
            json!([1]),
        ] {
            let err = amount(bad.clone()).unwrap_err();
            assert_eq!(err.kind, ErrorKind::Schema, "{bad}");
            assert!(err.message.starts_with("field /a"), "{err}");
        }
    }

    #[test]
    fn timestamps_from_text_or_epoch() {
        let v = json!({
            "iso": "2026-11-23T10:00:00.123+01:00",
            "ms": 1_795_428_000_123_i64,
            "s": 1_795_428_000,
            "float": 1.5,
            "bad": "yesterday",
        });
        let ts = |p, unit| get_timestamp(&v, p, unit).map(|t| t.to_rfc3339());
        assert_eq!(
            ts("/iso", EpochUnit::Millis).unwrap(),
            "2026-11-23T09:00:00.123Z"
        );
        assert_eq!(
            ts("/ms", EpochUnit::Millis).unwrap(),
            "2026-11-23T10:00:00.123Z"
        );
        assert_eq!(
            ts("/s", EpochUnit::Seconds).unwrap(),
            "2026-11-23T10:00:00.000Z"
        );
        let err = ts("/float", EpochUnit::Millis).unwrap_err();
        assert_eq!(err.kind, ErrorKind::Schema);
        let err = ts("/bad", EpochUnit::Millis).unwrap_err();
        assert!(
            err.message.starts_with("field /bad: \"yesterday\""),
            "{err}"
        );
    }
}
