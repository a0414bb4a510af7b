//! Joined records from texts: a record's top-level fields are read once as ranges of its JSON
//! text ([`Fields`]), and the right record's fields are appended to the left record's text as
//! they were written. No `serde_json::Value` tree is built, cloned or serialised per record or
//! pair unless a merged field replaces one of the left record's (then the trees are merged with
//! [`OutputShape::merge`], as before).

use std::borrow::Cow;
use std::fmt;
use std::ops::Range;

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;
use serde_json::Value;

use crate::stage::keyed::{FieldName, OutputShape};

/// A field name: a range of the text, or the unescaped name when the text escapes it.
#[derive(Debug, Clone, PartialEq)]
enum Name {
    Text(Range<usize>),
    Unescaped(String),
}

/// The top-level fields of a JSON object, in text order (a repeated name appears each time).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Fields {
    list: Vec<(Name, Range<usize>)>,
    /// Index of the closing `}`.
    close: usize,
}

impl Fields {
    /// Reads `text`, which must be one JSON value (validated as serde_json does).
    /// `Ok(None)`: valid JSON that is not an object.
    pub fn read(text: &[u8]) -> Result<Option<Fields>, serde_json::Error> {
        match Self::read_flat(text) {
            Some(fields) => Ok(Some(fields)),
            None => Self::read_any(text),
        }
    }

    /// Any JSON value, by serde_json.
    fn read_any(text: &[u8]) -> Result<Option<Fields>, serde_json::Error> {
        let mut de = serde_json::Deserializer::from_slice(text);
        let list = TopLevel {
            base: text.as_ptr() as usize,
        }
        .deserialize(&mut de)?;
        de.end()?;
        let Some(list) = list else {
            return Ok(None);
        };
        // `de.end()` accepted only whitespace after the object's closing brace.
        let close = text
            .iter()
            .rposition(|b| !b.is_ascii_whitespace())
            .unwrap_or_default();
        Ok(Some(Fields { list, close }))
    }

    /// Most records: a flat object read by [`sluice_flat_json`] (one vectorised UTF-8 check,
    /// then one pass); `None` for anything it does not accept, which serde_json then reads.
    fn read_flat(text: &[u8]) -> Option<Fields> {
        let src = std::str::from_utf8(text).ok()?;
        let base = src.as_ptr() as usize;
        let at = |s: &str| {
            let start = s.as_ptr() as usize - base;
            start..start + s.len()
        };
        let mut list = Vec::with_capacity(16);
        let flat = sluice_flat_json::for_each_field(src, |name, raw| {
            list.push((Name::Text(at(name)), at(raw)));
        });
        if !flat {
            return None;
        }
        let close = text.iter().rposition(|b| !b.is_ascii_whitespace())?;
        Some(Fields { list, close })
    }

    /// The raw JSON text of field `name` (the last one, as a parsed object keeps it).
    pub fn get<'t>(&self, text: &'t [u8], name: &str) -> Option<&'t str> {
        self.list
            .iter()
            .rev()
            .find(|(n, _)| name_bytes(text, n) == name.as_bytes())
            .and_then(|(_, v)| str_at(text, v))
    }

    fn has(&self, text: &[u8], name: &str) -> bool {
        self.list
            .iter()
            .any(|(n, _)| name_bytes(text, n) == name.as_bytes())
    }
}

/// A name's bytes, for comparisons: no UTF-8 check (the read validated the whole text).
fn name_bytes<'a>(text: &'a [u8], name: &'a Name) -> &'a [u8] {
    match name {
        Name::Text(r) => text.get(r.clone()).unwrap_or_default(),
        Name::Unescaped(s) => s.as_bytes(),
    }
}

fn name_of<'a>(text: &'a [u8], name: &'a Name) -> Option<&'a str> {
    match name {
        Name::Text(r) => str_at(text, r),
        Name::Unescaped(s) => Some(s),
    }
}

/// The ranges come from a parse of `text` that validated UTF-8.
fn str_at<'t>(text: &'t [u8], r: &Range<usize>) -> Option<&'t str> {
    text.get(r.clone())
        .and_then(|b| std::str::from_utf8(b).ok())
}

/// A JSON text read with [`Fields::read`], kept together with its fields.
pub struct Parsed {
    text: Vec<u8>,
    fields: Option<Fields>,
}

impl Parsed {
    pub fn read(text: Vec<u8>) -> Result<Self, serde_json::Error> {
        let fields = Fields::read(&text)?;
        Ok(Self { text, fields })
    }

    pub fn side(&self) -> Side<'_> {
        Side {
            text: &self.text,
            fields: self.fields.as_ref(),
        }
    }
}

/// One record of a pair: its JSON text and, for an object, its fields.
#[derive(Clone, Copy)]
pub struct Side<'a> {
    pub text: &'a [u8],
    pub fields: Option<&'a Fields>,
}

/// How a join adds the right record to the left one, prepared once per stage: for `nest` and
/// for `prefix` with `fields` the added names are known up front, so they are built and
/// JSON-encoded here rather than for every pair.
#[derive(Debug, Clone)]
pub struct Merge {
    shape: OutputShape,
    plan: Plan,
}

#[derive(Debug, Clone)]
enum Plan {
    /// `nest`: the right record under this field.
    Nest(Added),
    /// `prefix` with `fields`: each one's prefixed name and the right field it comes from.
    /// `repeated`: `fields` lists a name twice, merged as trees (where the last one wins).
    Fields {
        added: Vec<(Added, String)>,
        repeated: bool,
    },
    /// `prefix` without `fields`: every field of the right record, its name prefixed.
    All { prefix: String },
}

/// The name of a field `merged` adds: encoded once per stage, or built per right record.
enum AddedName<'a> {
    Encoded(&'a [u8]),
    Plain(String),
}

#[derive(Debug, Clone)]
struct Added {
    name: String,
    /// `name` as a JSON string.
    json: Vec<u8>,
}

impl Added {
    fn new(name: String) -> Self {
        // Serialising a string cannot fail.
        let json = serde_json::to_vec(&name).unwrap_or_default();
        Self { name, json }
    }
}

impl Merge {
    pub fn new(shape: &OutputShape) -> Self {
        let plan = match shape {
            OutputShape::Nest(field) => Plan::Nest(Added::new(field.clone())),
            OutputShape::Prefix {
                prefix,
                fields: Some(only),
            } => {
                let added: Vec<(Added, String)> = only
                    .iter()
                    .map(|f| (Added::new(format!("{prefix}{f}")), f.clone()))
                    .collect();
                let repeated = added
                    .iter()
                    .enumerate()
                    .any(|(i, (a, _))| added[..i].iter().any(|(b, _)| b.name == a.name));
                Plan::Fields { added, repeated }
            }
            OutputShape::Prefix {
                prefix,
                fields: None,
            } => Plan::All {
                prefix: prefix.clone(),
            },
        };
        Self {
            shape: shape.clone(),
            plan,
        }
    }

    pub fn shape(&self) -> &OutputShape {
        &self.shape
    }

    /// The left record's text with the right record merged in as the shape says (see
    /// [`OutputShape::merge`]). The added values are the right record's text as written.
    pub fn merged(&self, left: Side<'_>, right: Option<Side<'_>>) -> Result<Vec<u8>, String> {
        let Some(lf) = left.fields else {
            return Err("value is not a JSON object".into());
        };
        let not_object =
            || "the right record is not a JSON object (needed by `prefix`)".to_string();
        // Each added field: its name and its value's text (`None`: null).
        let mut adds: Vec<(AddedName<'_>, Option<&str>)> = Vec::new();
        // A merged field that replaces a left field (or a repeated right field, of which a
        // parsed object keeps the last) is merged as trees.
        let clash = match &self.plan {
            Plan::Nest(a) => {
                let text = right.map(|r| trim(r.text)).transpose()?;
                adds.push((AddedName::Encoded(&a.json), text));
                lf.has(left.text, &a.name)
            }
            Plan::Fields { added, repeated } => {
                let rf = match right {
                    Some(r) => Some((r.text, r.fields.ok_or_else(not_object)?)),
                    None => None,
                };
                for (a, from) in added {
                    let raw = rf.and_then(|(text, rf)| rf.get(text, from));
                    adds.push((AddedName::Encoded(&a.json), raw));
                }
                *repeated || added.iter().any(|(a, _)| lf.has(left.text, &a.name))
            }
            Plan::All { prefix } => {
                let mut named: Vec<(String, &str)> = Vec::new();
                if let Some(r) = right {
                    let rf = r.fields.ok_or_else(not_object)?;
                    for (n, v) in &rf.list {
                        let (Some(name), Some(raw)) = (name_of(r.text, n), str_at(r.text, v))
                        else {
                            return Err("the right record's text is not UTF-8".into());
                        };
                        named.push((format!("{prefix}{name}"), raw));
                    }
                }
                let clash = named.iter().enumerate().any(|(i, (name, _))| {
                    lf.has(left.text, name) || named[..i].iter().any(|(n, _)| n == name)
                });
                adds.extend(
                    named
                        .into_iter()
                        .map(|(name, raw)| (AddedName::Plain(name), Some(raw))),
                );
                clash
            }
        };
        if clash {
            return merged_trees(&self.shape, left.text, right.map(|r| r.text));
        }
        let mut out = Vec::with_capacity(
            left.text.len() + adds.len() * 32 + right.map_or(0, |r| r.text.len()),
        );
        let open = left
            .text
            .get(..lf.close)
            .ok_or("the left record's fields do not match its text")?;
        out.extend_from_slice(open);
        let mut first = lf.list.is_empty();
        for (name, raw) in adds {
            if !first {
                out.push(b',');
            }
            first = false;
            match name {
                AddedName::Encoded(json) => out.extend_from_slice(json),
                AddedName::Plain(name) => {
                    serde_json::to_writer(&mut out, &name).map_err(|e| e.to_string())?
                }
            }
            out.push(b':');
            out.extend_from_slice(raw.unwrap_or("null").as_bytes());
        }
        out.push(b'}');
        Ok(out)
    }
}

fn trim(text: &[u8]) -> Result<&str, String> {
    let start = text
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(text.len());
    let end = text
        .iter()
        .rposition(|b| !b.is_ascii_whitespace())
        .map_or(start, |i| i + 1);
    std::str::from_utf8(&text[start..end.max(start)]).map_err(|e| e.to_string())
}

fn merged_trees(shape: &OutputShape, left: &[u8], right: Option<&[u8]>) -> Result<Vec<u8>, String> {
    let parse = |t: &[u8]| serde_json::from_slice::<Value>(t).map_err(|e| e.to_string());
    let Value::Object(mut obj) = parse(left)? else {
        return Err("value is not a JSON object".into());
    };
    let right = right.map(parse).transpose()?;
    shape.merge(&mut obj, right.as_ref())?;
    serde_json::to_vec(&Value::Object(obj))
        .map_err(|e| format!("cannot encode the joined record: {e}"))
}

/// Reads one JSON value: an object's fields as ranges (`base` is the text's address), anything
/// else validated and skipped.
struct TopLevel {
    base: usize,
}

impl<'de> DeserializeSeed<'de> for TopLevel {
    type Value = Option<Vec<(Name, Range<usize>)>>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for TopLevel {
    type Value = Option<Vec<(Name, Range<usize>)>>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(None)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut list = Vec::with_capacity(16);
        let at = |s: &str| {
            let start = s.as_ptr() as usize - self.base;
            start..start + s.len()
        };
        while let Some(name) = map.next_key_seed(FieldName)? {
            let raw: &RawValue = map.next_value()?;
            let name = match name {
                Cow::Borrowed(s) => Name::Text(at(s)),
                Cow::Owned(s) => Name::Unescaped(s),
            };
            list.push((name, at(raw.get())));
        }
        Ok(Some(list))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use serde_json::json;

    use super::*;

    fn fields(text: &str) -> Option<Fields> {
        Fields::read(text.as_bytes()).unwrap()
    }

    fn merge(shape: &OutputShape, left: &str, right: Option<&str>) -> Result<Value, String> {
        let (lf, rf) = (fields(left), right.and_then(fields));
        let left = Side {
            text: left.as_bytes(),
            fields: lf.as_ref(),
        };
        let right = right.map(|t| Side {
            text: t.as_bytes(),
            fields: rf.as_ref(),
        });
        let text = Merge::new(shape).merged(left, right)?;
        Ok(serde_json::from_slice(&text).unwrap())
    }

    /// What merging parsed trees gives (the reference).
    fn tree_merge(shape: &OutputShape, left: &str, right: Option<&str>) -> Value {
        let Value::Object(mut obj) = serde_json::from_str(left).unwrap() else {
            panic!()
        };
        let right: Option<Value> = right.map(|r| serde_json::from_str(r).unwrap());
        shape.merge(&mut obj, right.as_ref()).unwrap();
        Value::Object(obj)
    }

    #[test]
    fn reads_top_level_fields_as_ranges_of_the_text() {
        let text = r#" {"a": 1, "b\u0041" : {"x": [1, "}"]}, "c":"s\"t", "a": null } "#;
        let f = fields(text).unwrap();
        assert_eq!(
            f.get(text.as_bytes(), "a"),
            Some("null"),
            "the last repeat wins"
        );
        assert_eq!(f.get(text.as_bytes(), "bA"), Some(r#"{"x": [1, "}"]}"#));
        assert_eq!(f.get(text.as_bytes(), "c"), Some(r#""s\"t""#));
        assert_eq!(f.get(text.as_bytes(), "d"), None);
        assert_eq!(&text[f.close..f.close + 1], "}");
        assert!(fields("[1, 2]").is_none() && fields("\"x\"").is_none() && fields("3").is_none());
        for bad in ["{", r#"{"a":}"#, "{} x", "", r#"{"a":1,}"#] {
            assert!(Fields::read(bad.as_bytes()).is_err(), "{bad}");
        }
        assert!(Fields::read(b"{\"a\":\"\xff\"}").is_err(), "invalid UTF-8");
    }

    #[test]
    fn the_flat_reader_and_serde_json_read_flat_objects_alike() {
        for text in [
            r#"{"id":"t1","amount":1.50,"ok":true,"none":null,"n":-3}"#,
            " {  \"a\" : \"x\\\"y\" , \"a\":2 }\n",
            "{}",
            "{ }",
        ] {
            let flat = Fields::read_flat(text.as_bytes());
            assert!(flat.is_some(), "{text}");
            assert_eq!(flat, Fields::read_any(text.as_bytes()).unwrap(), "{text}");
        }
        // Not flat: serde_json reads them.
        for text in [
            r#"{"a":{"b":1}}"#,
            r#"{"a":"\u00e9"}"#,
            r#"{"a":1e3}"#,
            "[1]",
        ] {
            assert!(Fields::read_flat(text.as_bytes()).is_none(), "{text}");
            assert_eq!(
                Fields::read(text.as_bytes()).unwrap(),
                Fields::read_any(text.as_bytes()).unwrap()
            );
        }
    }

    #[test]
    fn merges_as_trees_do_for_every_shape() {
        let shapes = [
            OutputShape::Nest("user".into()),
            OutputShape::Prefix {
                prefix: "user_".into(),
                fields: Some(vec!["name".into(), "country".into()]),
            },
            OutputShape::Prefix {
                prefix: "u_".into(),
                fields: None,
            },
            OutputShape::Prefix {
                prefix: "u_".into(),
                fields: Some(vec!["name".into(), "x".into()]),
            },
            // A field listed twice: added once.
            OutputShape::Prefix {
                prefix: "u_".into(),
                fields: Some(vec!["name".into(), "name".into()]),
            },
            // Collides with the left record's `id`: the tree merge replaces it.
            OutputShape::Prefix {
                prefix: "".into(),
                fields: None,
            },
        ];
        let lefts = [
            r#"{"id":"a\"b","n":1.50,"ts":3}"#,
            r#"{"id":"t1","amount":1.50,"user_id":7}"#,
            "{}",
            " { \"id\" : \"t\\u00e9\" } \n",
            // Clashes with a merged field: the right one replaces it.
            r#"{"id":"t2","user":"x","user_name":"old","u_name":"old"}"#,
        ];
        let rights = [
            None,
            Some(r#"{"name":"ann","country":"FR","n":[1,{"a":2}]}"#),
            Some(r#"{"id":7,"name":"Ann \ud83d\ude00 😀","deep":{"a":[1,2]}}"#),
            Some(r#"{"name":"b\"o","name":"last"}"#),
            Some("{}"),
        ];
        for shape in &shapes {
            for left in lefts {
                for right in rights {
                    assert_eq!(
                        merge(shape, left, right).unwrap(),
                        tree_merge(shape, left, right),
                        "{shape:?} {left} {right:?}"
                    );
                }
            }
        }
        // The text holds the field listed twice once.
        let (left, right) = (r#"{"id":"t"}"#, r#"{"name":"ann"}"#);
        let (lf, rf) = (fields(left), fields(right));
        let text = Merge::new(&shapes[4])
            .merged(
                Side {
                    text: left.as_bytes(),
                    fields: lf.as_ref(),
                },
                Some(Side {
                    text: right.as_bytes(),
                    fields: rf.as_ref(),
                }),
            )
            .unwrap();
        assert_eq!(text, br#"{"id":"t","u_name":"ann"}"#);
        let nest = &shapes[0];
        assert_eq!(
            merge(nest, r#"{"a":1}"#, Some(" [1,2] ")).unwrap(),
            json!({"a": 1, "user": [1, 2]})
        );
        assert!(merge(&shapes[1], r#"{"a":1}"#, Some("[1]")).is_err());
        assert!(merge(&shapes[2], r#"{"a":1}"#, Some("3")).is_err());
        assert!(merge(nest, "[1]", None).is_err());
    }

    #[test]
    fn keeps_the_left_text_and_appends_the_right_values_as_written() {
        let shape = OutputShape::Prefix {
            prefix: "user_".into(),
            fields: Some(vec!["name".into(), "country".into()]),
        };
        let left = r#"{"id":"t1","amount":1.50}"#;
        let right = r#"{"country":"FR","name":"Ann"}"#;
        let (lf, rf) = (fields(left).unwrap(), fields(right).unwrap());
        let out = Merge::new(&shape)
            .merged(
                Side {
                    text: left.as_bytes(),
                    fields: Some(&lf),
                },
                Some(Side {
                    text: right.as_bytes(),
                    fields: Some(&rf),
                }),
            )
            .unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            r#"{"id":"t1","amount":1.50,"user_name":"Ann","user_country":"FR"}"#
        );
    }
}
