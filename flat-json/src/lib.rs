//! Reads a flat JSON object's fields in one pass (see README.md): the fast path in front of
//! serde_json for the shape most events have.

/// Calls `field(key, raw_value)` for every field of `src`, in order, when `src` is a flat
/// object this reader accepts, and returns `true`. Returns `false` for anything else, valid
/// JSON or not, possibly after calling `field` for a prefix of the fields: the caller then
/// discards what it collected and asks serde_json.
///
/// Accepted: JSON whitespace around a `{...}` whose keys hold no escapes and whose values are
/// strings without `\u` escapes (other escapes are kept as written), numbers without an
/// exponent of at most 300 characters (so they fit an `f64` without a range check), `true`,
/// `false` or `null`. A repeated key is reported each time.
pub fn for_each_field<'a>(src: &'a str, mut field: impl FnMut(&'a str, &'a str)) -> bool {
    scan(src, &mut field).is_some()
}

fn scan<'a>(src: &'a str, field: &mut impl FnMut(&'a str, &'a str)) -> Option<()> {
    let b = src.as_bytes();
    let mut i = skip_ws(b, 0);
    if b.get(i) != Some(&b'{') {
        return None;
    }
    i = skip_ws(b, i + 1);
    if b.get(i) == Some(&b'}') {
        i += 1;
    } else {
        loop {
            // Key: a string without escapes (an escaped key is decoded by serde_json).
            if b.get(i) != Some(&b'"') {
                return None;
            }
            let key_end = first_special(b, i + 1);
            if b.get(key_end) != Some(&b'"') {
                return None;
            }
            let key = src.get(i + 1..key_end)?;
            i = skip_ws(b, key_end + 1);
            if b.get(i) != Some(&b':') {
                return None;
            }
            i = skip_ws(b, i + 1);
            let start = i;
            i = match b.get(i)? {
                b'"' => string_end(b, i + 1)?,
                b'-' | b'0'..=b'9' => number_end(b, i)?,
                b't' if b[i..].starts_with(b"true") => i + 4,
                b'f' if b[i..].starts_with(b"false") => i + 5,
                b'n' if b[i..].starts_with(b"null") => i + 4,
                _ => return None,
            };
            field(key, src.get(start..i)?);
            i = skip_ws(b, i);
            match b.get(i)? {
                b',' => i = skip_ws(b, i + 1),
                b'}' => {
                    i += 1;
                    break;
                }
                _ => return None,
            }
        }
    }
    (skip_ws(b, i) == b.len()).then_some(())
}

/// The first index at or after `i` that is not JSON whitespace.
#[inline]
fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while matches!(b.get(i), Some(b' ' | b'\n' | b'\t' | b'\r')) {
        i += 1;
    }
    i
}

const ONES: u64 = 0x0101_0101_0101_0101;
const HIGHS: u64 = 0x8080_8080_8080_8080;

/// The index of the first byte at or after `i` that a JSON string cannot hold unescaped: `"`,
/// `\` or a control character (`b.len()` if there is none). Eight bytes per step: WebAssembly
/// without SIMD runs a byte loop slowly.
#[inline]
pub fn first_special(b: &[u8], mut i: usize) -> usize {
    while let Some(w) = b.get(i..i + 8) {
        let mut word = [0u8; 8];
        word.copy_from_slice(w);
        let x = u64::from_le_bytes(word);
        // Per byte, the high bit marks a special byte; above the first one, borrows may mark
        // others too, so only the lowest counts (bytes of 0x80 and above are excluded by `!x`).
        let control = x.wrapping_sub(0x20 * ONES) & !x & HIGHS;
        let hits =
            control | zero_bytes(x ^ (b'"' as u64 * ONES)) | zero_bytes(x ^ (b'\\' as u64 * ONES));
        if hits != 0 {
            return i + (hits.trailing_zeros() / 8) as usize;
        }
        i += 8;
    }
    while let Some(&c) = b.get(i) {
        if c < 0x20 || c == b'"' || c == b'\\' {
            return i;
        }
        i += 1;
    }
    i
}

/// High bit of each zero byte of `x` (exact for the lowest one).
#[inline]
fn zero_bytes(x: u64) -> u64 {
    x.wrapping_sub(ONES) & !x & HIGHS
}

/// The index after the closing quote of the string whose text starts at `i`; `None` for a
/// control character, a `\u` escape, an unknown escape or no closing quote.
#[inline]
fn string_end(b: &[u8], mut i: usize) -> Option<usize> {
    loop {
        i = first_special(b, i);
        match b.get(i)? {
            b'"' => return Some(i + 1),
            b'\\' => match b.get(i + 1)? {
                b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => i += 2,
                _ => return None,
            },
            _ => return None,
        }
    }
}

/// The index after the number starting at `start` (JSON grammar); `None` with an exponent or
/// more than 300 characters.
#[inline]
fn number_end(b: &[u8], start: usize) -> Option<usize> {
    let digits = |mut i: usize| {
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        i
    };
    let mut i = start;
    if b.get(i) == Some(&b'-') {
        i += 1;
    }
    i = match b.get(i)? {
        b'0' => i + 1,
        b'1'..=b'9' => digits(i + 1),
        _ => return None,
    };
    if b.get(i) == Some(&b'.') {
        let after = digits(i + 1);
        if after == i + 1 {
            return None;
        }
        i = after;
    }
    if matches!(b.get(i), Some(b'e' | b'E')) || i - start > 300 {
        return None;
    }
    Some(i)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a panic in a test is a failure with a backtrace
mod tests {
    use super::*;
    use serde::de::{self, Deserializer as _};
    use serde_json::value::RawValue;

    fn fields(src: &str) -> Option<Vec<(&str, &str)>> {
        let mut out = Vec::new();
        for_each_field(src, |k, v| out.push((k, v))).then_some(out)
    }

    /// serde_json's reading of an object: keys and raw values in order.
    fn reference(src: &str) -> Result<Vec<(String, String)>, serde_json::Error> {
        struct Fields;
        impl<'de> de::Visitor<'de> for Fields {
            type Value = Vec<(String, String)>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: de::MapAccess<'de>>(self, mut m: A) -> Result<Self::Value, A::Error> {
                let mut out = Vec::new();
                while let Some(k) = m.next_key::<String>()? {
                    let v: &RawValue = m.next_value()?;
                    // What serde_json accepts only as text, not as a parsed value (lone
                    // surrogates, numbers out of f64's range): not flat-reader territory.
                    serde_json::from_str::<serde_json::Value>(v.get())
                        .map_err(de::Error::custom)?;
                    out.push((k, v.get().to_owned()));
                }
                Ok(out)
            }
        }
        let mut de = serde_json::Deserializer::from_str(src);
        let out = (&mut de).deserialize_map(Fields)?;
        de.end()?;
        Ok(out)
    }

    #[test]
    fn reads_the_usual_event() {
        let event = r#" {"id":"tx-000123","user_id":42,"amount":"19.99","currency":"EUR",
            "ts":"2026-11-23T10:00:00.123Z","q":"a\"b\\c\n","n":-1.5,"ok":true,"z":null} "#;
        let f = fields(event).unwrap();
        assert_eq!(f.len(), 9);
        assert_eq!(f[0], ("id", r#""tx-000123""#));
        assert_eq!(f[5], ("q", r#""a\"b\\c\n""#));
        assert_eq!(f[6], ("n", "-1.5"));
        assert_eq!(fields("{}"), Some(vec![]));
        for not_flat in [
            r#"{"a":{"b":1}}"#,
            r#"{"a":[1]}"#,
            r#"{"a":1e3}"#,
            r#"{"a":"\u00e9"}"#,
            r#"{"k\"":1}"#,
            "[1]",
            r#"{"a":1} x"#,
            r#"{"a":1,}"#,
            r#"{"a":01}"#,
            "{\"a\":\"\u{1}\"}",
        ] {
            assert_eq!(fields(not_flat), None, "{not_flat}");
        }
    }

    #[test]
    fn special_byte_scan_matches_the_byte_rule() {
        let naive = |b: &[u8]| {
            b.iter()
                .position(|&c| c < 0x20 || c == b'"' || c == b'\\')
                .unwrap_or(b.len())
        };
        for len in 1..=17 {
            for pos in 0..len {
                for byte in 0..=255u8 {
                    let mut b = vec![b'a'; len];
                    b[pos] = byte;
                    assert_eq!(first_special(&b, 0), naive(&b), "{b:?}");
                }
            }
        }
    }

    /// Whenever the reader accepts a text, serde_json accepts it too and reads the same
    /// fields; and the reader accepts a good share of what is generated.
    #[test]
    fn agrees_with_serde_json() {
        const VALUES: &[&str] = &[
            r#""""#,
            r#""plain text, longer than eight""#,
            r#""q\"uote""#,
            r#""back\\slash""#,
            r#""esc \n\t\r\b\f\/""#,
            r#""\u00e9""#,
            r#""\ud800""#,
            r#""\x""#,
            "\"ctl\u{1}\"",
            r#""é ü 字""#,
            r#""unterminated"#,
            "0",
            "-0",
            "01",
            "1.",
            "1.5",
            "-",
            "-1.25",
            "1e5",
            "1E+2",
            "2.5e-3",
            "12345678901234567890",
            "-0.0",
            ".5",
            "+1",
            "true",
            "false",
            "null",
            "tru",
            "nul",
            "{}",
            "[1]",
            r#"{"a":[1,{"b":2}]}"#,
            "[",
        ];
        const KEYS: &[&str] = &[
            "id",
            "a_long_key_name_x",
            "k\\\"q",
            "k\\u0041",
            "",
            "é",
            "d\u{7}",
        ];
        const JUNK: &[char] = &[
            '"', '{', '}', '[', ']', ',', ':', '\\', ' ', '\t', '\n', '0', '9', '-', '.', 'e', 't',
            'n', 'u', '\u{1}', 'é', 'x',
        ];
        let mut state = 0x9E37_79B9_7F4A_7C15_u64;
        let mut next = move |n: usize| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % n as u64) as usize
        };
        let ws = [" ", "", "", "\n\t", "\r "];
        let (mut accepted, mut cases) = (0, 0);
        for _ in 0..200_000 {
            let mut text = String::from(ws[next(ws.len())]);
            text.push('{');
            for f in 0..next(7) {
                if f > 0 {
                    text.push(',');
                }
                text += ws[next(ws.len())];
                text += &format!("\"{}\"", KEYS[next(KEYS.len())]);
                text += ws[next(ws.len())];
                text.push(':');
                text += ws[next(ws.len())];
                text += VALUES[next(VALUES.len())];
                text += ws[next(ws.len())];
            }
            text.push('}');
            text += ws[next(ws.len())];
            let mut chars: Vec<char> = text.chars().collect();
            for _ in 0..[0, 0, 0, 1, 2][next(5)] {
                let at = next(chars.len() + 1);
                match next(3) {
                    0 => chars.insert(at, JUNK[next(JUNK.len())]),
                    1 if at < chars.len() => {
                        chars.remove(at);
                    }
                    _ if at < chars.len() => chars[at] = JUNK[next(JUNK.len())],
                    _ => {}
                }
            }
            let text: String = chars.into_iter().collect();
            cases += 1;
            if let Some(fast) = fields(&text) {
                accepted += 1;
                let slow = reference(&text)
                    .unwrap_or_else(|e| panic!("accepted {text:?}, serde_json: {e}"));
                let fast: Vec<(String, String)> = fast
                    .into_iter()
                    .map(|(k, v)| (k.to_owned(), v.to_owned()))
                    .collect();
                assert_eq!(fast, slow, "{text:?}");
            }
        }
        assert!(accepted > cases / 10, "{accepted} of {cases} accepted");
    }
}
