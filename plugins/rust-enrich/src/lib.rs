//! The reference sluice plugin: validates transaction events and adds derived fields.
//!
//! Input (the Kafka value), one JSON object per record:
//!
//! ```json
//! {"id":"tx-000123","user_id":42,"amount":"19.99","currency":"EUR",
//!  "ts":"2026-11-23T10:00:00.123Z","kind":"purchase"}
//! ```
//!
//! `amount` may be a number or a numeric string, `ts` RFC 3339 text or epoch milliseconds.
//! The output row keeps every input field, rewrites `ts` as RFC 3339 UTC with milliseconds
//! and adds `amount_cents`, `amount_bucket` (`small` < 10, `medium` < 100, else `large`),
//! `event_date` (`YYYY-MM-DD`, UTC), `source_partition`, `source_offset` and
//! `plugin_version`.
//!
//! Config (the stage's `config` in the pipeline file), every field optional:
//!
//! ```json
//! {"version": "v1", "table": null, "currency_allowlist": ["EUR", "USD"],
//!  "route_by_kind": {"refund": "refunds"}}
//! ```
//!
//! - `version`: written to `plugin_version` (default `"v1"`), so rows show which plugin
//!   version produced them across hot swaps;
//! - `table`: destination table, `null` for the pipeline's default;
//! - `currency_allowlist`: if not empty, other currencies are rejected as `invalid`;
//! - `route_by_kind`: events whose `kind` is a key go to that table instead (one topic feeding
//!   several tables).

// Tests may unwrap: a panic there is a test failure with a backtrace.
#![cfg_attr(test, allow(clippy::unwrap_used))]

use serde::Deserialize;
use sluice_guest::prelude::*;
use sluice_guest::timestamp::EpochUnit;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    #[serde(default = "default_version")]
    version: String,
    #[serde(default)]
    table: Option<String>,
    #[serde(default)]
    currency_allowlist: Vec<String>,
    #[serde(default)]
    route_by_kind: std::collections::BTreeMap<String, String>,
}

fn default_version() -> String {
    if cfg!(feature = "v2") { "v2" } else { "v1" }.to_owned()
}

/// `v2` only: a coarse risk level from the amount.
#[cfg(feature = "v2")]
fn risk_level(cents: i64) -> &'static str {
    if cents >= 50_000 {
        "high"
    } else {
        "low"
    }
}

/// The enrichment transform, holding its validated config.
#[derive(Debug)]
pub struct Enrich {
    version: String,
    table: Option<String>,
    currency_allowlist: Vec<String>,
    route_by_kind: std::collections::BTreeMap<String, String>,
}

fn is_currency_code(s: &str) -> bool {
    s.len() == 3 && s.bytes().all(|b| b.is_ascii_uppercase())
}

fn amount_bucket(cents: i64) -> &'static str {
    if cents < 1_000 {
        "small"
    } else if cents < 10_000 {
        "medium"
    } else {
        "large"
    }
}

impl Transform for Enrich {
    fn init(config: Config) -> Result<Self, String> {
        let settings: Settings = config.parse()?;
        if settings.version.trim().is_empty() {
            return Err("config: `version` must not be empty".into());
        }
        if settings
            .table
            .as_deref()
            .is_some_and(|t| t.trim().is_empty())
        {
            return Err(
                "config: `table` must not be empty (use null for the default table)".into(),
            );
        }
        if let Some(bad) = settings
            .currency_allowlist
            .iter()
            .find(|c| !is_currency_code(c))
        {
            return Err(format!(
                "config: `currency_allowlist` entry {bad:?} is not a 3-letter uppercase code"
            ));
        }
        Ok(Enrich {
            version: settings.version,
            table: settings.table,
            currency_allowlist: settings.currency_allowlist,
            route_by_kind: settings.route_by_kind,
        })
    }

    fn transform(&self, record: &Record) -> Result<Output, RecordError> {
        // Borrowed field access and a row written as text: no `Value` tree (most of the cost
        // of this plugin when it built one, see docs/benchmarks.md).
        let event = record.json_fields()?;

        event.non_empty_str("id")?;
        event.u64("user_id")?;
        let amount_cents = event.fixed_point("amount", 2)?;
        let currency = event.str("currency")?;
        if !is_currency_code(&currency) {
            return Err(RecordError::schema(format!(
                "field /currency: expected a 3-letter uppercase code, found {currency:?}"
            )));
        }
        if !self.currency_allowlist.is_empty()
            && !self.currency_allowlist.iter().any(|c| *c == *currency)
        {
            return Err(RecordError::invalid(format!(
                "currency {currency} is not in the allowlist"
            )));
        }
        let ts = event.timestamp("ts", EpochUnit::Millis)?;

        let mut row = RowWriter::for_input(record);
        row.copy_fields(&event, SET_FIELDS)
            .display("ts", &ts)
            .i64("amount_cents", amount_cents)
            .str("amount_bucket", amount_bucket(amount_cents))
            .display("event_date", &ts.date_display())
            .i64("source_partition", record.source.partition.into())
            .i64("source_offset", record.source.offset)
            .str("plugin_version", &self.version);
        // The `v2` build adds a column: the second version used by the hot-swap tests and
        // benchmarks (rows show which version produced them).
        #[cfg(feature = "v2")]
        row.str("risk_level", risk_level(amount_cents));
        let row = row.finish();

        let routed = if self.route_by_kind.is_empty() {
            None
        } else {
            event
                .str_opt("kind")
                .and_then(|k| self.route_by_kind.get(k.as_ref()))
        };
        Ok(Output::from(match routed.or(self.table.as_ref()) {
            Some(table) => row.for_table(table),
            None => row,
        }))
    }
}

/// The fields the output row sets itself (an input field of the same name is replaced).
const SET_FIELDS: &[&str] = &[
    "ts",
    "amount_cents",
    "amount_bucket",
    "event_date",
    "source_partition",
    "source_offset",
    "plugin_version",
];

sluice_guest::export!(Enrich);

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};
    use sluice_guest::testing::{self, BatchOutcome};

    fn event() -> Value {
        json!({
            "id": "tx-000123",
            "user_id": 42,
            "amount": "19.99",
            "currency": "EUR",
            "ts": "2026-11-23T10:00:00.123Z",
            "kind": "purchase",
        })
    }

    fn with(field: &str, value: Value) -> Value {
        let mut e = event();
        e[field] = value;
        e
    }

    fn without(field: &str) -> Value {
        let mut e = event();
        e.as_object_mut().unwrap().remove(field);
        e
    }

    fn run(config: &str, events: &[Value]) -> BatchOutcome {
        let records: Vec<Record> = (0_i64..)
            .zip(events)
            .map(|(offset, e)| Record::from_json(e).with_source("transactions", 3, 100 + offset))
            .collect();
        testing::run_batch::<Enrich>(config, &records).unwrap()
    }

    fn enrich_one(e: Value) -> Value {
        let out = run("{}", &[e]);
        assert!(out.errors.is_empty(), "{:?}", out.errors);
        assert_eq!(out.outputs.len(), 1);
        out.outputs[0].value.clone()
    }

    fn reject_one(config: &str, e: Value) -> (ErrorKind, String) {
        let out = run(config, &[e]);
        assert!(out.outputs.is_empty(), "{:?}", out.outputs);
        assert_eq!(out.errors.len(), 1);
        assert_eq!(out.errors[0].input, 0);
        (out.errors[0].kind, out.errors[0].message.clone())
    }

    #[test]
    fn enriches_a_valid_event() {
        let out = run("{}", &[event()]);
        assert_eq!(out.outputs[0].input, 0);
        assert_eq!(out.outputs[0].table, None);
        assert_eq!(
            out.outputs[0].value,
            json!({
                "id": "tx-000123",
                "user_id": 42,
                "amount": "19.99",
                "currency": "EUR",
                "ts": "2026-11-23T10:00:00.123Z",
                "kind": "purchase",
                "amount_cents": 1999,
                "amount_bucket": "medium",
                "event_date": "2026-11-23",
                "source_partition": 3,
                "source_offset": 100,
                "plugin_version": "v1",
            })
        );
    }

    #[test]
    fn accepts_numeric_amounts_epoch_millis_and_offsets() {
        let e = json!({
            "id": "tx-1",
            "user_id": 0,
            "amount": 19.99,
            "currency": "USD",
            "ts": 1_795_428_000_123_i64,
            "extra": {"nested": [1, 2]},
        });
        let row = enrich_one(e);
        assert_eq!(row["ts"], "2026-11-23T10:00:00.123Z");
        assert_eq!(row["amount_cents"], 1999);
        assert_eq!(row["amount"], 19.99, "amount passes through unchanged");
        assert_eq!(row["extra"], json!({"nested": [1, 2]}));
        assert_eq!(row["event_date"], "2026-11-23");

        let row = enrich_one(with("ts", json!("2026-11-24T00:30:00.5+01:00")));
        assert_eq!(row["ts"], "2026-11-23T23:30:00.500Z");
        assert_eq!(row["event_date"], "2026-11-23");
    }

    #[test]
    fn buckets_amounts() {
        for (amount, bucket) in [
            ("0", "small"),
            ("9.99", "small"),
            ("10", "medium"),
            ("99.99", "medium"),
            ("100", "large"),
            ("250000.5", "large"),
        ] {
            let row = enrich_one(with("amount", json!(amount)));
            assert_eq!(row["amount_bucket"], bucket, "{amount}");
        }
    }

    #[test]
    fn config_sets_version_and_table() {
        let out = run(r#"{"version": "v2", "table": "tx_enriched"}"#, &[event()]);
        assert_eq!(out.outputs[0].table.as_deref(), Some("tx_enriched"));
        assert_eq!(out.outputs[0].value["plugin_version"], "v2");
    }

    #[test]
    fn route_by_kind_picks_the_table() {
        let config = r#"{"table": "main", "route_by_kind": {"refund": "refunds"}}"#;
        let out = run(
            config,
            &[event(), with("kind", json!("refund")), without("kind")],
        );
        let tables: Vec<_> = out.outputs.iter().map(|o| o.table.as_deref()).collect();
        assert_eq!(tables, [Some("main"), Some("refunds"), Some("main")]);
    }

    #[test]
    fn malformed_json_is_a_parse_error() {
        let out = testing::run_batch::<Enrich>("{}", &[Record::new(r#"{"id": "tx-1","#)]).unwrap();
        assert_eq!(out.errors[0].kind, ErrorKind::Parse);
        let out = testing::run_batch::<Enrich>("{}", &[Record::new(vec![0xff, b'{'])]).unwrap();
        assert_eq!(out.errors[0].kind, ErrorKind::Parse);
    }

    #[test]
    fn missing_or_wrong_fields_are_schema_errors_naming_the_field() {
        let cases = [
            (without("id"), "/id"),
            (with("id", json!("")), "/id"),
            (with("id", json!(123)), "/id"),
            (without("user_id"), "/user_id"),
            (with("user_id", json!(-1)), "/user_id"),
            (with("user_id", json!("42")), "/user_id"),
            (with("user_id", json!(4.2)), "/user_id"),
            (without("amount"), "/amount"),
            (with("amount", json!("19,99")), "/amount"),
            (with("amount", json!(true)), "/amount"),
            (with("amount", Value::Null), "/amount"),
            (without("currency"), "/currency"),
            (with("currency", json!("eur")), "/currency"),
            (with("currency", json!("EURO")), "/currency"),
            (without("ts"), "/ts"),
            (with("ts", json!("23/11/2026")), "/ts"),
            (with("ts", json!(1.5)), "/ts"),
        ];
        for (e, field) in cases {
            let (kind, message) = reject_one("{}", e.clone());
            assert_eq!(kind, ErrorKind::Schema, "{e}: {message}");
            assert!(message.contains(field), "{e}: {message}");
        }
        let (kind, message) = reject_one("{}", json!([1, 2]));
        assert_eq!(kind, ErrorKind::Schema);
        assert_eq!(message, "payload is a JSON array, expected an object");
    }

    #[test]
    fn currency_allowlist_rejects_as_invalid() {
        let config = r#"{"currency_allowlist": ["EUR", "USD"]}"#;
        let (kind, message) = reject_one(config, with("currency", json!("GBP")));
        assert_eq!(kind, ErrorKind::Invalid);
        assert!(message.contains("GBP"), "{message}");
        assert_eq!(run(config, &[event()]).outputs.len(), 1);
    }

    #[test]
    fn one_bad_record_does_not_stop_the_batch() {
        let out = run(
            "{}",
            &[event(), without("user_id"), with("id", json!("tx-2"))],
        );
        let inputs: Vec<u32> = out.outputs.iter().map(|o| o.input).collect();
        assert_eq!(inputs, [0, 2]);
        assert_eq!(out.outputs[1].value["id"], "tx-2");
        assert_eq!(out.outputs[1].value["source_offset"], 102);
        assert_eq!(out.errors.len(), 1);
        assert_eq!(out.errors[0].input, 1);
        assert_eq!(out.errors[0].kind, ErrorKind::Schema);
    }

    #[test]
    fn refuses_bad_config() {
        for (config, needle) in [
            (r#"{"versoin": "v2"}"#, "unknown field"),
            (r#"{"version": ""}"#, "version"),
            (r#"{"table": " "}"#, "table"),
            (r#"{"currency_allowlist": ["eur"]}"#, "\"eur\""),
            (r#"{"currency_allowlist": "EUR"}"#, "invalid config"),
            ("[1]", "invalid config"),
        ] {
            let err = testing::init::<Enrich>(config).unwrap_err();
            assert!(err.contains(needle), "{config}: {err}");
        }
    }

    #[test]
    fn fields_it_sets_replace_input_fields() {
        let mut e = with("amount_cents", json!(1));
        e["source_offset"] = json!("x");
        e["ts"] = json!(1_795_428_000_123_i64);
        let row = enrich_one(e);
        assert_eq!(row["amount_cents"], 1999);
        assert_eq!(row["source_offset"], 100);
        assert_eq!(row["ts"], "2026-11-23T10:00:00.123Z");
        // Escaped text passes through unchanged (as JSON text, so it reads back the same).
        let raw = r#"{"id":"tx-\u0031","user_id":1,"amount":"1","currency":"EUR",
            "ts":"2026-11-23T10:00:00.123Z","note":"a \"q\" \u00e9\n"}"#;
        let out = testing::run_batch::<Enrich>("{}", &[Record::new(raw)]).unwrap();
        assert!(out.errors.is_empty(), "{:?}", out.errors);
        assert_eq!(out.outputs[0].value["note"], "a \"q\" \u{e9}\n");
        assert_eq!(out.outputs[0].value["id"], "tx-1");
    }

    #[test]
    fn is_deterministic() {
        let events = [event(), with("amount", json!(5)), without("ts")];
        assert_eq!(run("{}", &events), run("{}", &events));
    }
}
