//! The bench workload: the reference transaction events (`crate::workload`) with four more
//! fields (merchant, country, channel, device) so that an event is ~200 bytes of JSON, the
//! size the benchmark targets are stated for. The extra fields are columns of the bench table,
//! so the sink encodes them rather than skipping them.

use serde_json::json;

use crate::workload::{transaction, Rng, BASE_TS_MS};

const COUNTRIES: [&str; 6] = ["DE", "FR", "US", "GB", "CH", "JP"];
const CHANNELS: [&str; 4] = ["web", "mobile-app", "pos-terminal", "partner-api"];

/// One Kafka record of the bench workload.
#[derive(Debug, Clone)]
pub struct BenchEvent {
    pub key: String,
    pub value: Vec<u8>,
    /// The event's `ts` in epoch milliseconds.
    pub ts_ms: i64,
    /// Explicit partition (co-partitioned topics); `None`: the producer's partitioner on `key`.
    pub partition: Option<i32>,
}

/// Event `i` of a stream. `ts_ms`: the event time to write (epoch milliseconds, used by the
/// latency run to carry the produce time); `None` keeps the reference workload's time.
pub fn event(i: usize, rng: &mut Rng, ts_ms: Option<i64>) -> BenchEvent {
    event_of_users(i, rng, ts_ms, 10_000)
}

/// [`event`] with `user_id` drawn below `users`.
pub fn event_of_users(i: usize, rng: &mut Rng, ts_ms: Option<i64>, users: u64) -> BenchEvent {
    let mut v = transaction(i, rng, users);
    pad(&mut v, rng);
    let ts = match ts_ms {
        Some(ms) => {
            v["ts"] = json!(ms);
            ms
        }
        None => BASE_TS_MS + i as i64 * 37,
    };
    let key = format!("tx-{i:07}");
    BenchEvent {
        key,
        value: serde_json::to_vec(&v).unwrap_or_default(),
        ts_ms: ts,
        partition: None,
    }
}

/// Adds the four padding fields (all table columns) to a reference transaction.
pub fn pad(v: &mut serde_json::Value, rng: &mut Rng) {
    v["merchant"] = json!(format!("merchant-{:06}", rng.below(50_000)));
    v["country"] = json!(COUNTRIES[rng.below(COUNTRIES.len() as u64) as usize]);
    v["channel"] = json!(CHANNELS[rng.below(CHANNELS.len() as u64) as usize]);
    v["device"] = json!(format!("d-{:016x}", rng.next_u64()));
}

/// The backlog: `n` events, deterministic.
pub fn backlog(n: usize) -> Vec<BenchEvent> {
    let mut rng = Rng::new(42);
    (0..n).map(|i| event(i, &mut rng, None)).collect()
}

pub fn mean_size(events: &[BenchEvent]) -> f64 {
    if events.is_empty() {
        return 0.0;
    }
    events.iter().map(|e| e.value.len()).sum::<usize>() as f64 / events.len() as f64
}

/// The bench table: the demo table (`demo/schema.sql`) plus the four padding columns.
pub fn table_ddl(table: &str) -> String {
    format!(
        "CREATE TABLE {table}
        (
            id String,
            user_id UInt64,
            amount Decimal(18, 2),
            amount_cents Int64,
            amount_bucket LowCardinality(String),
            currency LowCardinality(String),
            kind LowCardinality(String),
            ts DateTime64(3, 'UTC'),
            event_date Date,
            source_partition Int32,
            source_offset Int64,
            plugin_version LowCardinality(String),
            merchant String,
            country LowCardinality(String),
            channel LowCardinality(String),
            device String,
            ingested_at DateTime DEFAULT now()
        )
        ENGINE = MergeTree
        ORDER BY (event_date, user_id, id)
        SETTINGS non_replicated_deduplication_window = 1000"
    )
}

/// The bench table plus the column the enrich plugin's `v2` build adds (`risk_level`), for the
/// hot-swap run: v1 rows leave it empty.
pub fn swap_table_ddl(table: &str) -> String {
    table_ddl(table).replacen(
        "plugin_version LowCardinality(String),",
        "plugin_version LowCardinality(String),\n            risk_level LowCardinality(String) DEFAULT '',",
        1,
    )
}

/// A row of the bench table as RowBinary wants it (the raw-insert baseline).
#[derive(Debug, Clone, clickhouse::Row, serde::Serialize)]
pub struct TxRow {
    pub id: String,
    pub user_id: u64,
    /// Decimal(18, 2): the unscaled value, i.e. cents.
    pub amount: i64,
    pub amount_cents: i64,
    pub amount_bucket: String,
    pub currency: String,
    pub kind: String,
    /// DateTime64(3): epoch milliseconds.
    pub ts: i64,
    /// Date: days since the epoch.
    pub event_date: u16,
    pub source_partition: i32,
    pub source_offset: i64,
    pub plugin_version: String,
    pub merchant: String,
    pub country: String,
    pub channel: String,
    pub device: String,
}

impl TxRow {
    /// From an enriched row (the plugin's output) and the event time.
    pub fn from_enriched(row: &serde_json::Value, ts_ms: i64) -> Option<Self> {
        let s = |k: &str| row.get(k).and_then(|v| v.as_str()).map(str::to_owned);
        let cents = row.get("amount_cents")?.as_i64()?;
        Some(Self {
            id: s("id")?,
            user_id: row.get("user_id")?.as_u64()?,
            amount: cents,
            amount_cents: cents,
            amount_bucket: s("amount_bucket")?,
            currency: s("currency")?,
            kind: s("kind")?,
            ts: ts_ms,
            event_date: u16::try_from(ts_ms.div_euclid(86_400_000)).ok()?,
            source_partition: i32::try_from(row.get("source_partition")?.as_i64()?).ok()?,
            source_offset: row.get("source_offset")?.as_i64()?,
            plugin_version: s("plugin_version")?,
            merchant: s("merchant")?,
            country: s("country")?,
            channel: s("channel")?,
            device: s("device")?,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn events_are_about_200_bytes_and_deterministic() {
        let a = backlog(1000);
        let b = backlog(1000);
        assert!(a.iter().zip(&b).all(|(x, y)| x.value == y.value));
        let mean = mean_size(&a);
        assert!((180.0..=230.0).contains(&mean), "mean size {mean}");
        let v: serde_json::Value = serde_json::from_slice(&a[3].value).unwrap();
        assert_eq!(v["id"], "tx-0000003");
        assert!(v["device"].as_str().unwrap().starts_with("d-"));
    }

    #[test]
    fn latency_events_carry_their_time() {
        let mut rng = Rng::new(1);
        let e = event(5, &mut rng, Some(1_800_000_000_123));
        let v: serde_json::Value = serde_json::from_slice(&e.value).unwrap();
        assert_eq!(v["ts"], 1_800_000_000_123_i64);
        assert_eq!(e.ts_ms, 1_800_000_000_123);
    }
}
