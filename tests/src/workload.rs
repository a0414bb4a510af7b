//! The reference workload: transaction events (with duplicates and malformed records mixed in)
//! and a users stream. Deterministic for a given seed so tests can compute the expected rows.

use serde_json::json;

/// Base event time: 2026-11-23T10:00:00Z in milliseconds.
pub const BASE_TS_MS: i64 = 1_795_428_000_000;

const CURRENCIES: [&str; 4] = ["EUR", "USD", "GBP", "CHF"];
const KINDS: [&str; 3] = ["purchase", "refund", "transfer"];

/// A tiny deterministic generator (SplitMix64): the workload must not depend on a crate's
/// algorithm changing between versions.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}

/// One produced record: key, value and whether a correct pipeline must dead-letter it.
#[derive(Debug, Clone)]
pub struct Event {
    pub key: String,
    pub value: Vec<u8>,
    pub id: String,
    pub malformed: bool,
    /// A repeat of an earlier event (same id) produced by an at-least-once producer.
    pub duplicate: bool,
}

/// Knobs of the transaction stream.
#[derive(Debug, Clone)]
pub struct TransactionSpec {
    pub count: usize,
    pub users: u64,
    /// One record in `malformed_every` is broken (0: none).
    pub malformed_every: usize,
    /// Fraction (in percent) of records that repeat an earlier id.
    pub duplicate_percent: u64,
    pub seed: u64,
}

impl Default for TransactionSpec {
    fn default() -> Self {
        Self {
            count: 10_000,
            users: 500,
            malformed_every: 0,
            duplicate_percent: 0,
            seed: 42,
        }
    }
}

/// A valid transaction event.
pub fn transaction(i: usize, rng: &mut Rng, users: u64) -> serde_json::Value {
    let cents = 100 + rng.below(50_000) as i64;
    let ts = BASE_TS_MS + i as i64 * 37;
    let amount = format!("{}.{:02}", cents / 100, cents % 100);
    let mut v = json!({
        "id": format!("tx-{i:07}"),
        "user_id": rng.below(users),
        "currency": CURRENCIES[rng.below(CURRENCIES.len() as u64) as usize],
        "kind": KINDS[rng.below(KINDS.len() as u64) as usize],
    });
    // Both encodings occur in the wild: numbers and strings for amounts, RFC 3339 strings and
    // epoch milliseconds for times.
    if i.is_multiple_of(2) {
        v["amount"] = json!(amount);
        v["ts"] = json!(ts);
    } else {
        v["amount"] = json!(amount.parse::<f64>().unwrap_or_default());
        v["ts"] = json!(rfc3339_ms(ts));
    }
    v
}

/// `2026-11-23T10:00:00.123Z` from epoch milliseconds.
pub fn rfc3339_ms(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let milli = ms.rem_euclid(1000);
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{milli:03}Z",
        sod / 3600,
        (sod % 3600) / 60,
        sod % 60
    )
}

/// Days since 1970-01-01 → (year, month, day) (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// Broken records of several kinds, so every error path is exercised: the `n`th broken record
/// of the stream (not its index, which for every-Nth records would pick one kind only).
fn malformed(i: usize, n: usize) -> Vec<u8> {
    match n % 4 {
        0 => format!("{{\"id\":\"tx-{i:07}\",\"user_id\":").into_bytes(), // truncated JSON
        1 => format!("{{\"id\":\"tx-{i:07}\",\"amount\":\"1.00\",\"currency\":\"EUR\",\"ts\":1}}")
            .into_bytes(), // user_id missing
        2 => format!(
            "{{\"id\":\"tx-{i:07}\",\"user_id\":\"not-a-number\",\"amount\":\"1.00\",\"currency\":\"EUR\",\"ts\":1}}"
        )
        .into_bytes(),
        _ => b"\xff\xfe not even utf-8".to_vec(),
    }
}

/// The transaction stream, in produce order.
pub fn transactions(spec: &TransactionSpec) -> Vec<Event> {
    let mut rng = Rng::new(spec.seed);
    let mut out: Vec<Event> = Vec::with_capacity(spec.count);
    for i in 0..spec.count {
        if spec.malformed_every > 0 && i % spec.malformed_every == spec.malformed_every - 1 {
            out.push(Event {
                key: format!("tx-{i:07}"),
                value: malformed(i, i / spec.malformed_every),
                id: format!("tx-{i:07}"),
                malformed: true,
                duplicate: false,
            });
            continue;
        }
        if spec.duplicate_percent > 0 && i > 10 && rng.below(100) < spec.duplicate_percent {
            // Repeat a recent valid event byte for byte.
            let back = 1 + rng.below(10) as usize;
            if let Some(prev) = out
                .iter()
                .rev()
                .skip(back - 1)
                .find(|e| !e.malformed && !e.duplicate)
                .cloned()
            {
                out.push(Event {
                    duplicate: true,
                    ..prev
                });
                continue;
            }
        }
        let v = transaction(i, &mut rng, spec.users);
        let id = format!("tx-{i:07}");
        out.push(Event {
            key: id.clone(),
            value: serde_json::to_vec(&v).unwrap_or_default(),
            id,
            malformed: false,
            duplicate: false,
        });
    }
    out
}

/// The users stream: one profile per user id.
pub fn users(count: u64) -> Vec<Event> {
    let countries = ["DE", "FR", "US", "GB", "CH", "JP"];
    (0..count)
        .map(|u| {
            let v = json!({
                "user_id": u,
                "name": format!("user-{u}"),
                "country": countries[(u % countries.len() as u64) as usize],
                "ts": BASE_TS_MS,
            });
            Event {
                key: u.to_string(),
                value: serde_json::to_vec(&v).unwrap_or_default(),
                id: u.to_string(),
                malformed: false,
                duplicate: false,
            }
        })
        .collect()
}

/// A timestamped user profile, the right side of the interval-join workload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Profile {
    pub user_id: u64,
    pub name: String,
    pub country: String,
    /// Event time, epoch milliseconds (written as a number).
    pub ts_ms: i64,
}

impl Profile {
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(&json!({
            "user_id": self.user_id,
            "name": self.name,
            "country": self.country,
            "ts": self.ts_ms,
        }))
        .unwrap_or_default()
    }
}

/// Profiles spread around the transaction stream: user `u` at
/// `BASE_TS_MS + (u - users / 2) * spacing_ms`, and every 7th user again 2 minutes later under a
/// new name (`user-<u>-v2`), so some transactions pair with two profiles, some with one and some
/// (users far from the transactions' times) with none. Sorted by time.
pub fn user_profiles(users: u64, spacing_ms: i64) -> Vec<Profile> {
    let countries = ["DE", "FR", "US", "GB", "CH", "JP"];
    let mut out = Vec::new();
    for u in 0..users {
        let ts_ms = BASE_TS_MS + (u as i64 - (users / 2) as i64) * spacing_ms;
        let country = countries[(u % countries.len() as u64) as usize].to_string();
        out.push(Profile {
            user_id: u,
            name: format!("user-{u}"),
            country: country.clone(),
            ts_ms,
        });
        if u % 7 == 0 {
            out.push(Profile {
                user_id: u,
                name: format!("user-{u}-v2"),
                country,
                ts_ms: ts_ms + 120_000,
            });
        }
    }
    out.sort_by_key(|p| (p.ts_ms, p.user_id));
    out
}

/// Event time of a transaction as [`transaction`] writes it (epoch milliseconds, or the RFC 3339
/// text of [`rfc3339_ms`]).
pub fn event_time_ms(v: &serde_json::Value) -> Option<i64> {
    if let Some(n) = v.as_i64() {
        return Some(n);
    }
    let s = v.as_str()?;
    // YYYY-MM-DDTHH:MM:SS.mmmZ
    let num = |a: usize, b: usize| s.get(a..b)?.parse::<i64>().ok();
    if s.len() != 24 || !s.ends_with('Z') {
        return None;
    }
    let days = days_from_civil(num(0, 4)?, num(5, 7)?, num(8, 10)?);
    let secs = days * 86_400 + num(11, 13)? * 3600 + num(14, 16)? * 60 + num(17, 19)?;
    Some(secs * 1000 + num(20, 23)?)
}

/// (year, month, day) → days since 1970-01-01 (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_and_counts_match_spec() {
        let spec = TransactionSpec {
            count: 1000,
            malformed_every: 100,
            ..Default::default()
        };
        let a = transactions(&spec);
        let b = transactions(&spec);
        assert_eq!(a.len(), 1000);
        assert_eq!(a.iter().filter(|e| e.malformed).count(), 10);
        assert!(a.iter().zip(&b).all(|(x, y)| x.value == y.value));
        // Every kind of broken record occurs, not just the one `index % 4` would pick.
        let kinds: std::collections::BTreeSet<u8> = a
            .iter()
            .filter(|e| e.malformed)
            .map(|e| match std::str::from_utf8(&e.value) {
                Err(_) => 0,
                Ok(v) if !v.ends_with('}') => 1,
                Ok(v) if !v.contains("user_id") => 2,
                Ok(_) => 3,
            })
            .collect();
        assert_eq!(kinds.len(), 4, "{kinds:?}");
    }

    #[test]
    fn event_times_round_trip() {
        for ms in [0, BASE_TS_MS, BASE_TS_MS + 123, BASE_TS_MS + 86_399_999] {
            assert_eq!(event_time_ms(&json!(rfc3339_ms(ms))), Some(ms));
            assert_eq!(event_time_ms(&json!(ms)), Some(ms));
        }
        assert_eq!(event_time_ms(&json!("yesterday")), None);
    }

    #[test]
    fn profiles_are_sorted_and_some_users_have_two() {
        let p = user_profiles(40, 30_000);
        assert_eq!(p.len(), 40 + 6);
        assert!(p.windows(2).all(|w| w[0].ts_ms <= w[1].ts_ms));
        assert_eq!(p.iter().filter(|x| x.user_id == 7).count(), 2);
    }

    #[test]
    fn rfc3339_formatting() {
        assert_eq!(rfc3339_ms(BASE_TS_MS + 123), "2026-11-23T10:00:00.123Z");
        assert_eq!(rfc3339_ms(0), "1970-01-01T00:00:00.000Z");
    }
}
