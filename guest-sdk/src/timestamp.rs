//! UTC timestamps with millisecond precision, parsed from RFC 3339 text or Unix epochs and
//! written as RFC 3339 (`2026-11-23T10:00:00.123Z`), without a date-time dependency.
//!
//! Years 0000–9999 only (what RFC 3339 can spell). Fractions finer than a millisecond are
//! truncated, never rounded, so a value never moves to the next second or day. Leap seconds
//! (`:60`) are refused: epoch time cannot represent them.

use std::fmt;
use std::str::FromStr;

const MS_PER_DAY: i64 = 86_400_000;
/// 0000-01-01T00:00:00.000Z
const MIN_MS: i64 = -62_167_219_200_000;
/// 9999-12-31T23:59:59.999Z
const MAX_MS: i64 = 253_402_300_799_999;

/// A point in time, milliseconds since the Unix epoch, within years 0000–9999.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp {
    millis: i64,
}

/// The unit of an integer epoch value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EpochUnit {
    Seconds,
    Millis,
}

/// Why a timestamp was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TimestampError(String);

impl fmt::Display for TimestampError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for TimestampError {}

fn err<T>(msg: impl Into<String>) -> Result<T, TimestampError> {
    Err(TimestampError(msg.into()))
}

impl Timestamp {
    pub fn from_epoch_millis(millis: i64) -> Result<Self, TimestampError> {
        if (MIN_MS..=MAX_MS).contains(&millis) {
            Ok(Timestamp { millis })
        } else {
            err(format!("epoch {millis} ms is outside years 0000-9999"))
        }
    }

    pub fn from_epoch_seconds(seconds: i64) -> Result<Self, TimestampError> {
        match seconds.checked_mul(1000) {
            Some(millis) => Self::from_epoch_millis(millis),
            None => err(format!("epoch {seconds} s is outside years 0000-9999")),
        }
    }

    pub fn from_epoch(value: i64, unit: EpochUnit) -> Result<Self, TimestampError> {
        match unit {
            EpochUnit::Seconds => Self::from_epoch_seconds(value),
            EpochUnit::Millis => Self::from_epoch_millis(value),
        }
    }

    /// Parses `YYYY-MM-DDTHH:MM:SS[.fraction](Z|+HH:MM|-HH:MM)`. `t`, `z` and a space
    /// instead of `T` are accepted, as RFC 3339 allows.
    pub fn parse_rfc3339(text: &str) -> Result<Self, TimestampError> {
        parse_rfc3339(text.as_bytes())
            .map_err(|why| TimestampError(format!("{text:?} is not an RFC 3339 timestamp: {why}")))
    }

    pub fn epoch_millis(self) -> i64 {
        self.millis
    }

    /// `YYYY-MM-DDTHH:MM:SS.mmmZ`, always in UTC with exactly three fraction digits.
    pub fn to_rfc3339(self) -> String {
        self.to_string()
    }

    /// The UTC calendar date, `YYYY-MM-DD`.
    pub fn date(self) -> String {
        self.date_display().to_string()
    }

    /// The UTC calendar date as `Display` (`YYYY-MM-DD`), to write it without a `String`
    /// (e.g. with [`crate::RowWriter::display`]).
    pub fn date_display(self) -> impl fmt::Display {
        DateText(self.millis)
    }
}

struct DateText(i64);

/// Writes `v` as exactly `out.len()` decimal digits, zero-padded (the caller keeps it in range).
fn put_digits(out: &mut [u8], v: i64) {
    // Non-negative and below 10^4 here; 32-bit unsigned arithmetic is the cheapest in wasm32.
    let mut v = u32::try_from(v).unwrap_or(0);
    for b in out.iter_mut().rev() {
        *b = b'0' + (v % 10) as u8;
        v /= 10;
    }
}

/// `YYYY-MM-DD` of a day count; years stay within 0000-9999 (the `Timestamp` range).
fn date_bytes(days: i64) -> [u8; 10] {
    let (y, m, d) = civil_from_days(days);
    let mut out = *b"0000-00-00";
    put_digits(&mut out[0..4], y);
    put_digits(&mut out[5..7], m);
    put_digits(&mut out[8..10], d);
    out
}

/// The ASCII text built above, as `str` (cannot fail: only digits and separators).
fn ascii(bytes: &[u8]) -> &str {
    std::str::from_utf8(bytes).unwrap_or_default()
}

// Both texts are written digit by digit into a fixed buffer: `write!` with padded integers
// costs several times more, notably inside WebAssembly (docs/benchmarks.md).
impl fmt::Display for DateText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(ascii(&date_bytes(self.0.div_euclid(MS_PER_DAY))))
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let days = self.millis.div_euclid(MS_PER_DAY);
        let ms_of_day = self.millis.rem_euclid(MS_PER_DAY);
        let mut out = *b"0000-00-00T00:00:00.000Z";
        out[..10].copy_from_slice(&date_bytes(days));
        put_digits(&mut out[11..13], ms_of_day / 3_600_000);
        put_digits(&mut out[14..16], ms_of_day / 60_000 % 60);
        put_digits(&mut out[17..19], ms_of_day / 1000 % 60);
        put_digits(&mut out[20..23], ms_of_day % 1000);
        f.write_str(ascii(&out))
    }
}

impl FromStr for Timestamp {
    type Err = TimestampError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Timestamp::parse_rfc3339(s)
    }
}

/// Reads exactly `n` ASCII digits at `*pos`.
fn digits(b: &[u8], pos: &mut usize, n: usize, what: &str) -> Result<i64, String> {
    let chunk = b
        .get(*pos..*pos + n)
        .filter(|c| c.iter().all(u8::is_ascii_digit))
        .ok_or_else(|| format!("expected {n} digits for the {what}"))?;
    *pos += n;
    Ok(chunk
        .iter()
        .fold(0, |acc, &c| acc * 10 + i64::from(c - b'0')))
}

fn expect(b: &[u8], pos: &mut usize, allowed: &[u8], what: &str) -> Result<u8, String> {
    match b.get(*pos) {
        Some(c) if allowed.contains(c) => {
            *pos += 1;
            Ok(*c)
        }
        _ => Err(format!("expected {what}")),
    }
}

fn parse_rfc3339(b: &[u8]) -> Result<Timestamp, String> {
    let mut pos = 0;
    let year = digits(b, &mut pos, 4, "year")?;
    expect(b, &mut pos, b"-", "'-' after the year")?;
    let month = digits(b, &mut pos, 2, "month")?;
    expect(b, &mut pos, b"-", "'-' after the month")?;
    let day = digits(b, &mut pos, 2, "day")?;
    expect(b, &mut pos, b"Tt ", "'T' between date and time")?;
    let hour = digits(b, &mut pos, 2, "hour")?;
    expect(b, &mut pos, b":", "':' after the hour")?;
    let minute = digits(b, &mut pos, 2, "minute")?;
    expect(b, &mut pos, b":", "':' after the minute")?;
    let second = digits(b, &mut pos, 2, "second")?;

    let mut millis = 0;
    if b.get(pos) == Some(&b'.') {
        pos += 1;
        let start = pos;
        while b.get(pos).is_some_and(u8::is_ascii_digit) {
            pos += 1;
        }
        if pos == start {
            return Err("expected digits after '.'".into());
        }
        // Truncate to milliseconds, padding short fractions: ".5" is 500 ms.
        for i in 0..3 {
            let digit = if start + i < pos {
                b[start + i] - b'0'
            } else {
                0
            };
            millis = millis * 10 + i64::from(digit);
        }
    }

    let offset_minutes = match expect(b, &mut pos, b"Zz+-", "'Z' or a UTC offset")? {
        b'Z' | b'z' => 0,
        sign => {
            let oh = digits(b, &mut pos, 2, "offset hour")?;
            expect(b, &mut pos, b":", "':' in the UTC offset")?;
            let om = digits(b, &mut pos, 2, "offset minute")?;
            if oh > 23 || om > 59 {
                return Err("UTC offset out of range".into());
            }
            let total = oh * 60 + om;
            if sign == b'-' {
                -total
            } else {
                total
            }
        }
    };
    if pos != b.len() {
        return Err("unexpected text after the timestamp".into());
    }

    if !(1..=12).contains(&month) {
        return Err(format!("month {month} out of range"));
    }
    if day < 1 || day > days_in_month(year, month) {
        return Err(format!("day {day} out of range for {year:04}-{month:02}"));
    }
    if hour > 23 || minute > 59 {
        return Err("time of day out of range".into());
    }
    if second == 60 {
        return Err("leap seconds are not supported".into());
    }
    if second > 59 {
        return Err(format!("second {second} out of range"));
    }

    let local = days_from_civil(year, month, day) * MS_PER_DAY
        + ((hour * 60 + minute) * 60 + second) * 1000
        + millis;
    Timestamp::from_epoch_millis(local - offset_minutes * 60_000).map_err(|e| e.0)
}

fn is_leap(year: i64) -> bool {
    year % 4 == 0 && (year % 100 != 0 || year % 400 == 0)
}

fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        2 if is_leap(year) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The inverse of [`days_from_civil`].
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> String {
        Timestamp::parse_rfc3339(s).unwrap().to_rfc3339()
    }

    #[test]
    fn formats_epoch_millis() {
        let t = Timestamp::from_epoch_millis(1_795_428_000_123).unwrap();
        assert_eq!(t.to_rfc3339(), "2026-11-23T10:00:00.123Z");
        assert_eq!(t.date(), "2026-11-23");
        assert_eq!(
            Timestamp::from_epoch_millis(0).unwrap().to_rfc3339(),
            "1970-01-01T00:00:00.000Z"
        );
        assert_eq!(
            Timestamp::from_epoch_millis(-1).unwrap().to_rfc3339(),
            "1969-12-31T23:59:59.999Z"
        );
        assert_eq!(
            Timestamp::from_epoch_seconds(1_795_428_000)
                .unwrap()
                .to_rfc3339(),
            "2026-11-23T10:00:00.000Z"
        );
        assert_eq!(
            Timestamp::from_epoch(951_782_400, EpochUnit::Seconds)
                .unwrap()
                .date(),
            "2000-02-29"
        );
    }

    #[test]
    fn range_is_years_0000_to_9999() {
        assert_eq!(
            Timestamp::from_epoch_millis(MIN_MS).unwrap().to_rfc3339(),
            "0000-01-01T00:00:00.000Z"
        );
        assert_eq!(
            Timestamp::from_epoch_millis(MAX_MS).unwrap().to_rfc3339(),
            "9999-12-31T23:59:59.999Z"
        );
        assert!(Timestamp::from_epoch_millis(MIN_MS - 1).is_err());
        assert!(Timestamp::from_epoch_millis(MAX_MS + 1).is_err());
        assert!(Timestamp::from_epoch_seconds(i64::MAX).is_err());
        assert_eq!(days_from_civil(0, 1, 1) * MS_PER_DAY, MIN_MS);
        assert_eq!(days_from_civil(10_000, 1, 1) * MS_PER_DAY - 1, MAX_MS);
    }

    #[test]
    fn parses_rfc3339() {
        assert_eq!(
            parse("2026-11-23T10:00:00.123Z"),
            "2026-11-23T10:00:00.123Z"
        );
        assert_eq!(parse("2026-11-23T10:00:00Z"), "2026-11-23T10:00:00.000Z");
        assert_eq!(parse("2026-11-23t10:00:00.5z"), "2026-11-23T10:00:00.500Z");
        assert_eq!(
            parse("2026-11-23 10:00:00.123456789Z"),
            "2026-11-23T10:00:00.123Z"
        );
        // Offsets move the instant, across day and year boundaries.
        assert_eq!(
            parse("2026-11-23T01:30:00+02:00"),
            "2026-11-22T23:30:00.000Z"
        );
        assert_eq!(
            parse("2026-12-31T23:00:00-01:30"),
            "2027-01-01T00:30:00.000Z"
        );
        assert_eq!(parse("2024-02-29T00:00:00Z"), "2024-02-29T00:00:00.000Z");
        assert_eq!(parse("2000-02-29T00:00:00Z"), "2000-02-29T00:00:00.000Z");
        assert_eq!(
            parse("1969-12-31T23:59:59.999Z"),
            "1969-12-31T23:59:59.999Z"
        );
        assert_eq!(
            Timestamp::parse_rfc3339("2026-11-23T10:00:00.123Z")
                .unwrap()
                .epoch_millis(),
            1_795_428_000_123
        );
        let t: Timestamp = "1970-01-01T00:00:01Z".parse().unwrap();
        assert_eq!(t.epoch_millis(), 1000);
    }

    #[test]
    fn refuses_malformed_text() {
        for bad in [
            "",
            "2026-11-23",
            "2026-11-23T10:00:00",
            "2026-11-23T10:00Z",
            "2026-11-23T10:00:00.Z",
            "2026-11-23T10:00:00.123",
            "2026-11-23T10:00:00+0200",
            "2026-11-23T10:00:00+24:00",
            "2026-11-23T10:00:00Z trailing",
            "2026-13-01T00:00:00Z",
            "2026-00-01T00:00:00Z",
            "2023-02-29T00:00:00Z",
            "1900-02-29T00:00:00Z",
            "2026-04-31T00:00:00Z",
            "2026-11-23T24:00:00Z",
            "2026-11-23T10:60:00Z",
            "2026-12-31T23:59:60Z",
            "0000-01-01T00:00:00+00:01",
            "+2026-11-23T10:00:00Z",
            "２０２６-11-23T10:00:00Z",
        ] {
            let e = Timestamp::parse_rfc3339(bad);
            assert!(e.is_err(), "{bad:?} parsed as {e:?}");
        }
        let e = Timestamp::parse_rfc3339("2026-02-30T00:00:00Z").unwrap_err();
        assert!(e.to_string().contains("day 30 out of range"), "{e}");
    }

    #[test]
    fn civil_round_trip() {
        for days in (-800_000..3_000_000).step_by(997) {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
    }
}
