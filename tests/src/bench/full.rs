//! The full path's workload (issue 9): the reference pipeline of `docs/stages.md` on a backlog.
//!
//! - `transactions`: the bench events (`events::event_of_users`, ~200 bytes) with ~10 % of the
//!   records repeating a recent event byte for byte (an at-least-once producer's retries), each
//!   in partition `user_id % partitions`;
//! - `users`: profile updates, co-partitioned the same way. User `u` gets a new profile every
//!   20 minutes of event time (phase-shifted per user) over the whole span of the transactions,
//!   so with the join's ±5 min window a transaction pairs with exactly one profile or none
//!   (about half each); sorted by time, so no right record is late;
//! - one flush record per partition on both topics, two hours after the last transaction (as in
//!   `tests/tests/e2e_dedup_join.rs`): both watermarks move on, every window closes and the
//!   unmatched transactions are emitted (left outer). The flush records themselves stay
//!   buffered and never become rows.
//!
//! Pipeline: dedup (key `/id`, 24 h window, event time `/ts`) → the Rust enrich plugin (WASM) →
//! interval join with `users` (`/user_id`, ±5 min, 1 min lateness, left outer, `user_name` and
//! `user_country` added). Expected rows: one per distinct transaction id, or one per matching
//! profile when there are several (never here).

use std::collections::HashMap;
use std::path::Path;

use serde_json::json;

use super::events::{table_ddl, BenchEvent};
use crate::workload::{transaction, Rng, BASE_TS_MS};

/// Distinct users of the full-path transactions (`user_id` below this).
pub const USERS: u64 = 2_000;
/// Share of records that repeat an earlier event, in percent.
pub const DUPLICATE_PERCENT: u64 = 10;
/// Event-time distance between two profiles of one user.
pub const PROFILE_EVERY_MS: i64 = 20 * 60_000;
/// The join's `before` and `after`.
pub const WINDOW_MS: i64 = 5 * 60_000;
/// The dedup window.
pub const DEDUP_WINDOW: &str = "24h";
const FLUSH_USER: u64 = 1_000_000;

/// The full path's two topics and the rows a correct pipeline writes.
#[derive(Debug)]
pub struct FullWorkload {
    /// In produce order (partition set), duplicates and the flush records included.
    pub transactions: Vec<BenchEvent>,
    pub users: Vec<BenchEvent>,
    /// Transaction records that are a first occurrence of their id (flush records excluded).
    pub distinct: usize,
    /// Transaction records repeating an earlier id (dropped by dedup).
    pub duplicates: usize,
    /// Rows the table must hold in the end.
    pub expected_rows: u64,
    /// Of those, rows with a matched profile (`user_name` not null).
    pub expected_matched: u64,
}

const COUNTRIES: [&str; 6] = ["DE", "FR", "US", "GB", "CH", "JP"];

fn user_event(user_id: u64, name: String, ts_ms: i64, partitions: i32) -> BenchEvent {
    let v = json!({
        "user_id": user_id,
        "name": name,
        "country": COUNTRIES[(user_id % COUNTRIES.len() as u64) as usize],
        "ts": ts_ms,
    });
    BenchEvent {
        key: user_id.to_string(),
        value: serde_json::to_vec(&v).unwrap_or_default(),
        ts_ms,
        partition: Some((user_id % partitions as u64) as i32),
    }
}

/// The workload for `n` transaction records on topics of `partitions` partitions.
pub fn workload(n: usize, partitions: i32) -> FullWorkload {
    let partitions = partitions.max(1);
    let mut rng = Rng::new(42);
    let mut transactions: Vec<BenchEvent> = Vec::with_capacity(n + partitions as usize);
    // (user, ts) of each first occurrence; `None` for a repeat.
    let mut firsts: Vec<Option<(u64, i64)>> = Vec::with_capacity(n);
    let mut duplicates = 0;
    for i in 0..n {
        if i > 10 && rng.below(100) < DUPLICATE_PERCENT {
            // Repeat one of the last ten first occurrences byte for byte (same key, same
            // partition: what a producer's retry does).
            let back = 1 + rng.below(10) as usize;
            if let Some(j) = (0..i).rev().filter(|&j| firsts[j].is_some()).nth(back - 1) {
                let e = transactions[j].clone();
                transactions.push(e);
                firsts.push(None);
                duplicates += 1;
                continue;
            }
        }
        let mut v = transaction(i, &mut rng, USERS);
        super::events::pad(&mut v, &mut rng);
        let user = v["user_id"].as_u64().unwrap_or_default();
        let ts = BASE_TS_MS + i as i64 * 37;
        transactions.push(BenchEvent {
            key: format!("tx-{i:07}"),
            value: serde_json::to_vec(&v).unwrap_or_default(),
            ts_ms: ts,
            partition: Some((user % partitions as u64) as i32),
        });
        firsts.push(Some((user, ts)));
    }
    let end = BASE_TS_MS + n as i64 * 37;

    // Profiles: user u at BASE - PROFILE_EVERY + phase(u) + k * PROFILE_EVERY, up to one period
    // past the last transaction.
    let mut profiles: HashMap<u64, Vec<i64>> = HashMap::new();
    let mut users = Vec::new();
    for u in 0..USERS {
        let phase = (u as i64 * PROFILE_EVERY_MS) / USERS as i64;
        let mut ts = BASE_TS_MS - PROFILE_EVERY_MS + phase;
        let mut k = 0;
        while ts <= end + PROFILE_EVERY_MS {
            users.push(user_event(u, format!("user-{u}-{k}"), ts, partitions));
            profiles.entry(u).or_default().push(ts);
            ts += PROFILE_EVERY_MS;
            k += 1;
        }
    }
    users.sort_by_key(|e| (e.ts_ms, e.key.clone()));

    let (mut expected_rows, mut expected_matched) = (0u64, 0u64);
    let mut distinct = 0;
    for &(user, ts) in firsts.iter().flatten() {
        distinct += 1;
        let times = profiles.get(&user).map_or(&[][..], Vec::as_slice);
        let lo = times.partition_point(|&p| p < ts - WINDOW_MS);
        let hi = times.partition_point(|&p| p <= ts + WINDOW_MS);
        let matches = (hi - lo) as u64;
        expected_matched += matches;
        expected_rows += matches.max(1);
    }

    // Flush records, two hours later, on keys of their own (they pair with nothing and stay
    // buffered).
    let later = end + 120 * 60_000;
    for p in 0..partitions {
        let tx = json!({"id": format!("tx-flush-{p}"), "user_id": FLUSH_USER + p as u64,
            "amount": "1.00", "currency": "EUR", "kind": "purchase", "ts": later});
        transactions.push(BenchEvent {
            key: format!("tx-flush-{p}"),
            value: serde_json::to_vec(&tx).unwrap_or_default(),
            ts_ms: later,
            partition: Some(p),
        });
        users.push(user_event(
            2 * FLUSH_USER + p as u64,
            "flush".into(),
            later,
            partitions,
        ));
    }
    FullWorkload {
        transactions,
        users,
        distinct,
        duplicates,
        expected_rows,
        expected_matched,
    }
}

/// The pipeline's `stages` (the reference pipeline of `docs/stages.md`).
pub fn stages(plugin: &Path, users_topic: &str) -> serde_json::Value {
    json!([
        {"name": "dedup", "dedup": {
            "key": "/id",
            "window": DEDUP_WINDOW,
            "time": {"field": "/ts"},
        }},
        {"name": "enrich", "wasm": {"plugin": plugin, "config": {"version": "v1"}}},
        {"name": "with-user", "join": {
            "kind": "interval",
            "right_topic": users_topic,
            "left_key": "/user_id",
            "right_key": "/user_id",
            "left_time": {"field": "/ts", "format": "rfc3339"},
            "right_time": {"field": "/ts", "format": "epoch_ms"},
            "before": "5m",
            "after": "5m",
            "allowed_lateness": "1m",
            "mode": "left_outer",
            "prefix": "user_",
            "fields": ["name", "country"],
        }},
    ])
}

/// The bench table plus the join's two columns.
pub fn table_ddl_full(table: &str) -> String {
    table_ddl(table).replacen(
        "device String,",
        "device String,\n            user_name Nullable(String),\n            user_country Nullable(String),",
        1,
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn workload_is_co_partitioned_and_exercises_dedup_and_join() {
        let w = workload(20_000, 2);
        assert_eq!(w.transactions.len(), 20_002);
        assert_eq!(w.distinct + w.duplicates, 20_000);
        let dup_share = w.duplicates as f64 / 20_000.0;
        assert!((0.08..0.12).contains(&dup_share), "{dup_share}");
        // Every record sits in the partition of its user.
        for e in w.transactions.iter().chain(&w.users) {
            let v: serde_json::Value = serde_json::from_slice(&e.value).unwrap();
            let u = v["user_id"].as_u64().unwrap();
            assert_eq!(e.partition, Some((u % 2) as i32));
        }
        // At most one profile per transaction; roughly half matched.
        assert_eq!(w.expected_rows, w.distinct as u64);
        let share = w.expected_matched as f64 / w.distinct as f64;
        assert!((0.4..0.6).contains(&share), "{share}");
        // Users sorted by time (the flush records last).
        assert!(w.users.windows(2).all(|p| p[0].ts_ms <= p[1].ts_ms));
    }
}
