//! The JSON → RowBinaryWithDefaults encoder against a real ClickHouse: for each group of column
//! types, create a table, read its schema back from `system.columns`, encode JSON rows (edge
//! values included), insert them with `FORMAT RowBinaryWithDefaults`, and compare what
//! ClickHouse returns as JSONEachRow with the values the rows should have produced.
//!
//! The server is `SLUICE_TEST_CLICKHOUSE_URL`, or a local one started by the harness
//! (`sluice_tests::services`); if neither is available the tests fail, they never skip.

use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};
use sluice::sink::clickhouse::encode::{RowEncoder, UnknownFields};
use sluice::sink::clickhouse::types::{SchemaError, TableSchema};
use sluice_tests::services::{self, unique_name};

const DATABASE: &str = "default";

/// One table: its columns (besides `id UInt32`), rows to insert, rows expected back (ordered by
/// `id`), and rows the encoder must refuse, each with a fragment of the expected error.
struct Case {
    name: &'static str,
    columns: &'static str,
    rows: Vec<Value>,
    expected: Vec<Value>,
    bad_rows: Vec<(Value, &'static str)>,
    /// Extra SELECT expressions (e.g. MATERIALIZED columns, which `*` leaves out).
    extra_select: &'static str,
    create_settings: &'static [(&'static str, &'static str)],
}

impl Case {
    fn new(name: &'static str, columns: &'static str) -> Self {
        Self {
            name,
            columns,
            rows: Vec::new(),
            expected: Vec::new(),
            bad_rows: Vec::new(),
            extra_select: "",
            create_settings: &[],
        }
    }

    /// A row to insert and the row ClickHouse should return for it.
    fn row(mut self, input: Value, expected: Value) -> Self {
        self.rows.push(input);
        self.expected.push(expected);
        self
    }

    fn bad(mut self, input: Value, error: &'static str) -> Self {
        self.bad_rows.push((input, error));
        self
    }
}

fn client(url: &str) -> clickhouse::Client {
    services::ch_client(url)
        // Output that JSON can carry exactly: big integers and decimals as strings, all decimal
        // digits, NaN/Inf as strings, DateTime without a time zone shown in UTC.
        .with_setting("output_format_json_quote_64bit_integers", "1")
        .with_setting("output_format_json_quote_decimals", "1")
        .with_setting("output_format_decimal_trailing_zeros", "1")
        .with_setting("output_format_json_quote_denormals", "1")
        .with_setting("session_timezone", "UTC")
}

async fn run(case: Case) -> Result<()> {
    let ch = services::clickhouse().await?;
    let client = client(&ch.url);
    let table = unique_name(&format!("sluice_types_{}", case.name));
    let mut create = client.query_raw(&format!(
        "CREATE TABLE {DATABASE}.{table} (id UInt32, {}) ENGINE = MergeTree ORDER BY tuple()",
        case.columns
    ));
    for (name, value) in case.create_settings {
        create = create.with_setting(*name, *value);
    }
    create
        .execute()
        .await
        .with_context(|| format!("creating {table}"))?;
    let result = check(&client, &table, &case).await;
    let dropped = client
        .query_raw(&format!("DROP TABLE {DATABASE}.{table}"))
        .execute()
        .await;
    result.with_context(|| format!("case {} (table {table})", case.name))?;
    dropped.with_context(|| format!("dropping {table}"))?;
    Ok(())
}

async fn check(client: &clickhouse::Client, table: &str, case: &Case) -> Result<()> {
    let schema = TableSchema::fetch(client, DATABASE, table).await?;
    let encoder = RowEncoder::new(&schema, UnknownFields::Reject);
    let mut body = Vec::new();
    for (i, row) in case.rows.iter().enumerate() {
        encoder
            .encode_value(row, &mut body)
            .with_context(|| format!("encoding row {i}: {row}"))?;
        // A refused row in between must leave the buffer intact.
        if let Some((bad, fragment)) = case.bad_rows.get(i) {
            let before = body.len();
            match encoder.encode_value(bad, &mut body) {
                Ok(()) => bail!("the encoder accepted a bad row: {bad}"),
                Err(e) => ensure!(
                    e.to_string().contains(fragment),
                    "error for {bad} is {e:?}, expected it to contain {fragment:?}"
                ),
            }
            ensure!(body.len() == before, "a refused row changed the buffer");
        }
    }
    ensure!(
        case.bad_rows.len() <= case.rows.len(),
        "case {} has more bad rows than good ones (each is tried after a good one)",
        case.name
    );

    let mut insert = client
        .insert_formatted_with(encoder.insert_sql())
        .with_setting("async_insert", "0");
    insert.send(body.into()).await.context("sending rows")?;
    insert.end().await.context("finishing the insert")?;

    let sql = format!(
        "SELECT *{} FROM {DATABASE}.{table} ORDER BY id",
        case.extra_select
    );
    let bytes = client
        .query_raw(&sql)
        .fetch_bytes("JSONEachRow")?
        .collect()
        .await
        .with_context(|| sql.clone())?;
    let got: Vec<Value> = bytes
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(serde_json::from_slice)
        .collect::<Result<_, _>>()?;
    ensure!(
        got.len() == case.expected.len(),
        "expected {} rows, got {}: {got:#?}",
        case.expected.len(),
        got.len()
    );
    for (got, want) in got.iter().zip(&case.expected) {
        ensure!(
            got == want,
            "row mismatch\n  got:      {got}\n  expected: {want}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn integers() -> Result<()> {
    let case = Case::new(
        "ints",
        "i8 Int8, i16 Int16, i32 Int32, i64 Int64, u8 UInt8, u16 UInt16, u32 UInt32, u64 UInt64",
    )
    .row(
        json!({"id": 1, "i8": -128, "i16": -32768, "i32": -2147483648i64,
               "i64": "-9223372036854775808", "u8": 0, "u16": 0, "u32": 0, "u64": 0}),
        json!({"id": 1, "i8": -128, "i16": -32768, "i32": -2147483648i64,
               "i64": "-9223372036854775808", "u8": 0, "u16": 0, "u32": 0, "u64": "0"}),
    )
    .row(
        json!({"id": 2, "i8": 127, "i16": 32767, "i32": 2147483647, "i64": 9223372036854775807i64,
               "u8": 255, "u16": 65535, "u32": 4294967295u32, "u64": 18446744073709551615u64}),
        json!({"id": 2, "i8": 127, "i16": 32767, "i32": 2147483647, "i64": "9223372036854775807",
               "u8": 255, "u16": 65535, "u32": 4294967295u32, "u64": "18446744073709551615"}),
    )
    .row(
        json!({"id": 3, "i8": "-5", "i16": 3.0, "i32": "42", "i64": 1e15,
               "u8": "7", "u16": 1e3, "u32": "4000000000", "u64": "18446744073709551615"}),
        json!({"id": 3, "i8": -5, "i16": 3, "i32": 42, "i64": "1000000000000000",
               "u8": 7, "u16": 1000, "u32": 4000000000u32, "u64": "18446744073709551615"}),
    )
    .row(
        json!({"id": 4}),
        json!({"id": 4, "i8": 0, "i16": 0, "i32": 0, "i64": "0", "u8": 0, "u16": 0, "u32": 0,
               "u64": "0"}),
    )
    .bad(json!({"id": 9, "u8": 256}), "out of range for UInt8")
    .bad(
        json!({"id": 9, "i64": "9223372036854775808"}),
        "out of range for Int64",
    )
    .bad(json!({"id": 9, "i32": 1.5}), "not an integer")
    .bad(json!({"id": 9, "nope": 1}), "fields not in table");
    run(case).await
}

#[tokio::test]
async fn wide_integers() -> Result<()> {
    const I128_MIN: &str = "-170141183460469231731687303715884105728";
    const U128_MAX: &str = "340282366920938463463374607431768211455";
    const I256_MIN: &str =
        "-57896044618658097711785492504343953926634992332820282019728792003956564819968";
    const I256_MAX: &str =
        "57896044618658097711785492504343953926634992332820282019728792003956564819967";
    const U256_MAX: &str =
        "115792089237316195423570985008687907853269984665640564039457584007913129639935";
    let case = Case::new("wide", "a Int128, b UInt128, c Int256, d UInt256")
        .row(
            json!({"id": 1, "a": I128_MIN, "b": U128_MAX, "c": I256_MIN, "d": U256_MAX}),
            json!({"id": 1, "a": I128_MIN, "b": U128_MAX, "c": I256_MIN, "d": U256_MAX}),
        )
        .row(
            json!({"id": 2, "a": -1, "b": 18446744073709551615u64, "c": I256_MAX, "d": "0"}),
            json!({"id": 2, "a": "-1", "b": "18446744073709551615", "c": I256_MAX, "d": "0"}),
        )
        .row(
            json!({"id": 3, "a": "12345678901234567890123", "c": -2, "d": 3}),
            json!({"id": 3, "a": "12345678901234567890123", "b": "0", "c": "-2", "d": "3"}),
        )
        .bad(json!({"id": 9, "d": "-1"}), "out of range for UInt256")
        .bad(
            json!({"id": 9, "a": "170141183460469231731687303715884105728"}),
            "out of range for Int128",
        );
    run(case).await
}

#[tokio::test]
async fn bools_and_floats() -> Result<()> {
    let case = Case::new("floats", "b Bool, f32 Float32, f64 Float64, bf BFloat16")
        .row(
            json!({"id": 1, "b": true, "f32": 0.1, "f64": -1.5e300, "bf": 1.5}),
            json!({"id": 1, "b": true, "f32": 0.1, "f64": -1.5e300, "bf": 1.5}),
        )
        .row(
            json!({"id": 2, "b": "false", "f32": "nan", "f64": "-inf", "bf": "inf"}),
            json!({"id": 2, "b": false, "f32": "nan", "f64": "-inf", "bf": "inf"}),
        )
        .row(
            json!({"id": 3, "b": 1, "f32": "3.25", "f64": 12345678.9, "bf": -2}),
            json!({"id": 3, "b": true, "f32": 3.25, "f64": 12345678.9, "bf": -2}),
        )
        .bad(json!({"id": 9, "f32": 1e39}), "out of range for Float32")
        .bad(json!({"id": 9, "b": "yes"}), "expected true/false");
    run(case).await
}

#[tokio::test]
async fn decimals() -> Result<()> {
    let d4_min = format!("-{}.{}", "9".repeat(56), "9".repeat(20));
    let case = Case::new(
        "decimals",
        "d1 Decimal(9, 2), d2 Decimal(18, 4), d3 Decimal(38, 10), d4 Decimal(76, 20)",
    )
    .row(
        json!({"id": 1, "d1": 12.34, "d2": "-99999999999999.9999",
               "d3": "-1234567890123456789012345678.0123456789", "d4": d4_min}),
        json!({"id": 1, "d1": "12.34", "d2": "-99999999999999.9999",
               "d3": "-1234567890123456789012345678.0123456789", "d4": d4_min}),
    )
    .row(
        // Rounded half away from zero; numbers converted from their decimal text.
        json!({"id": 2, "d1": "1.005", "d2": 0.3, "d3": -0.00000000005, "d4": "1e-20"}),
        json!({"id": 2, "d1": "1.01", "d2": "0.3000", "d3": "-0.0000000001",
               "d4": "0.00000000000000000001"}),
    )
    .row(
        json!({"id": 3, "d1": -5, "d2": "-1.00005", "d3": "1.5e20"}),
        json!({"id": 3, "d1": "-5.00", "d2": "-1.0001", "d3": "150000000000000000000.0000000000",
               "d4": format!("0.{}", "0".repeat(20))}),
    )
    .bad(
        json!({"id": 9, "d1": "10000000"}),
        "out of range for Decimal(9, 2)",
    )
    .bad(json!({"id": 9, "d2": "1,5"}), "not a decimal number");
    run(case).await
}

#[tokio::test]
async fn strings() -> Result<()> {
    let case = Case::new(
        "strings",
        "s String, fs FixedString(4), lc LowCardinality(String), js String",
    )
    .row(
        json!({"id": 1, "s": "héllo \"quoted\"\n", "fs": "ab", "lc": "x",
               "js": {"a": [1, 2], "b": null}}),
        json!({"id": 1, "s": "héllo \"quoted\"\n", "fs": "ab\u{0}\u{0}", "lc": "x",
               "js": "{\"a\":[1,2],\"b\":null}"}),
    )
    .row(
        json!({"id": 2, "s": "", "fs": "abcd", "lc": "", "js": 42}),
        json!({"id": 2, "s": "", "fs": "abcd", "lc": "", "js": "42"}),
    )
    .row(
        json!({"id": 3, "js": [true, "x"]}),
        json!({"id": 3, "s": "", "fs": "\u{0}\u{0}\u{0}\u{0}", "lc": "", "js": "[true,\"x\"]"}),
    )
    .bad(
        json!({"id": 9, "fs": "abcde"}),
        "longer than FixedString(4)",
    );
    run(case).await
}

#[tokio::test]
async fn uuids_and_ips() -> Result<()> {
    let case = Case::new("uuid_ip", "u UUID, v4 IPv4, v6 IPv6")
        .row(
            json!({"id": 1, "u": "00112233-4455-6677-8899-aabbccddeeff", "v4": "1.2.3.4",
                   "v6": "2001:db8::1"}),
            json!({"id": 1, "u": "00112233-4455-6677-8899-aabbccddeeff", "v4": "1.2.3.4",
                   "v6": "2001:db8::1"}),
        )
        .row(
            json!({"id": 2, "u": "F0112233445566778899AABBCCDDEEFF", "v4": "255.255.255.255",
                   "v6": "1.2.3.4"}),
            json!({"id": 2, "u": "f0112233-4455-6677-8899-aabbccddeeff", "v4": "255.255.255.255",
                   "v6": "::ffff:1.2.3.4"}),
        )
        .bad(json!({"id": 9, "u": "not-a-uuid"}), "not a valid UUID")
        .bad(json!({"id": 9, "v4": "1.2.3"}), "not a valid IPv4 address");
    run(case).await
}

#[tokio::test]
async fn enums() -> Result<()> {
    let case = Case::new(
        "enums",
        r"e8 Enum8('a' = 1, 'b' = -2, 'it\'s' = 3), e16 Enum16('big' = 1000, 'neg' = -1000)",
    )
    .row(
        json!({"id": 1, "e8": "a", "e16": "big"}),
        json!({"id": 1, "e8": "a", "e16": "big"}),
    )
    .row(
        json!({"id": 2, "e8": -2, "e16": -1000}),
        json!({"id": 2, "e8": "b", "e16": "neg"}),
    )
    .row(
        json!({"id": 3, "e8": "it's", "e16": 1000}),
        json!({"id": 3, "e8": "it's", "e16": "big"}),
    )
    .bad(
        json!({"id": 9, "e8": "c"}),
        // system.columns lists enum values sorted by value.
        "unknown enum value 'c' (expected one of: b, a, it's)",
    );
    run(case).await
}

#[tokio::test]
async fn dates_and_times() -> Result<()> {
    let case = Case::new(
        "dates",
        "d Date, d32 Date32, dt DateTime, dtu DateTime('UTC'), dt3 DateTime64(3, 'UTC'), \
         dt9 DateTime64(9, 'UTC')",
    )
    .row(
        json!({"id": 1, "d": "1970-01-01", "d32": "1900-01-01", "dt": "1970-01-01 00:00:00",
               "dtu": 0, "dt3": "1900-01-01 00:00:00", "dt9": "1900-01-01T00:00:00Z"}),
        json!({"id": 1, "d": "1970-01-01", "d32": "1900-01-01", "dt": "1970-01-01 00:00:00",
               "dtu": "1970-01-01 00:00:00", "dt3": "1900-01-01 00:00:00.000",
               "dt9": "1900-01-01 00:00:00.000000000"}),
    )
    .row(
        json!({"id": 2, "d": "2149-06-06", "d32": "2299-12-31", "dt": "2106-02-07T06:28:15Z",
               "dtu": 4294967295u32, "dt3": "2299-12-31 23:59:59.999",
               "dt9": "2262-04-11 23:47:16.854775807"}),
        json!({"id": 2, "d": "2149-06-06", "d32": "2299-12-31", "dt": "2106-02-07 06:28:15",
               "dtu": "2106-02-07 06:28:15", "dt3": "2299-12-31 23:59:59.999",
               "dt9": "2262-04-11 23:47:16.854775807"}),
    )
    .row(
        json!({"id": 3, "d": 19782, "d32": -1, "dt": "2023-11-15T00:13:20+02:00",
               "dtu": 1700000000.9, "dt3": 1700000000.123,
               "dt9": "2023-11-14T22:13:20.123456789123Z"}),
        json!({"id": 3, "d": "2024-02-29", "d32": "1969-12-31", "dt": "2023-11-14 22:13:20",
               "dtu": "2023-11-14 22:13:20", "dt3": "2023-11-14 22:13:20.123",
               "dt9": "2023-11-14 22:13:20.123456789"}),
    )
    .row(
        json!({"id": 4, "d": "2024-03-01T01:00:00+02:00", "d32": "2024-02-29 23:59:59",
               "dt": "1969-12-31T23:59:59-01:00", "dtu": "2023-11-14 22:13",
               "dt3": "1969-12-31T23:59:59.9999Z", "dt9": -1.5}),
        json!({"id": 4, "d": "2024-02-29", "d32": "2024-02-29", "dt": "1970-01-01 00:59:59",
               "dtu": "2023-11-14 22:13:00", "dt3": "1969-12-31 23:59:59.999",
               "dt9": "1969-12-31 23:59:58.500000000"}),
    )
    .row(
        json!({"id": 5, "dt3": "1700000000.5"}),
        json!({"id": 5, "d": "1970-01-01", "d32": "1970-01-01", "dt": "1970-01-01 00:00:00",
               "dtu": "1970-01-01 00:00:00", "dt3": "2023-11-14 22:13:20.500",
               "dt9": "1970-01-01 00:00:00.000000000"}),
    )
    .bad(json!({"id": 9, "d": "2149-06-07"}), "out of range for Date")
    .bad(
        json!({"id": 9, "d32": "1899-12-31"}),
        "out of range for Date32",
    )
    .bad(json!({"id": 9, "dt": -1}), "out of range for DateTime")
    .bad(
        json!({"id": 9, "dt3": "2300-01-01 00:00:00"}),
        "out of range for DateTime64(3, 'UTC')",
    )
    .bad(
        json!({"id": 9, "dt9": "14/11/2023"}),
        "expected a date/time string",
    );
    run(case).await
}

#[tokio::test]
async fn nullables() -> Result<()> {
    let case = Case::new(
        "nullable",
        "n1 Nullable(Int32), n2 Nullable(String), n3 LowCardinality(Nullable(String)), \
         n4 Nullable(Decimal(9, 2)), n5 Nullable(DateTime64(3, 'UTC')), n6 Nullable(UUID)",
    )
    .row(
        json!({"id": 1, "n1": null, "n2": null, "n3": null, "n4": null, "n5": null, "n6": null}),
        json!({"id": 1, "n1": null, "n2": null, "n3": null, "n4": null, "n5": null, "n6": null}),
    )
    .row(
        json!({"id": 2, "n1": -7, "n2": "s", "n3": "lc", "n4": "-0.5", "n5": "2024-01-02T03:04:05.678Z",
               "n6": "00000000-0000-0000-0000-000000000001"}),
        json!({"id": 2, "n1": -7, "n2": "s", "n3": "lc", "n4": "-0.50",
               "n5": "2024-01-02 03:04:05.678", "n6": "00000000-0000-0000-0000-000000000001"}),
    )
    .row(
        json!({"id": 3}),
        json!({"id": 3, "n1": null, "n2": null, "n3": null, "n4": null, "n5": null, "n6": null}),
    )
    .bad(json!({"id": 9, "n1": "x"}), "not an integer (Int32)");
    run(case).await
}

#[tokio::test]
async fn arrays() -> Result<()> {
    let case = Case::new(
        "arrays",
        "a1 Array(UInt8), a2 Array(Nullable(String)), a3 Array(Array(Int64)), \
         a4 Array(LowCardinality(String)), a5 Array(Decimal(9, 2))",
    )
    .row(
        json!({"id": 1, "a1": [1, 2, 255], "a2": ["a", null, ""],
               "a3": [[1, "-9223372036854775808"], []], "a4": ["x", "y"], "a5": ["1.5", -2]}),
        json!({"id": 1, "a1": [1, 2, 255], "a2": ["a", null, ""],
               "a3": [["1", "-9223372036854775808"], []], "a4": ["x", "y"],
               "a5": ["1.50", "-2.00"]}),
    )
    .row(
        json!({"id": 2, "a1": [], "a2": [], "a3": [], "a4": [], "a5": []}),
        json!({"id": 2, "a1": [], "a2": [], "a3": [], "a4": [], "a5": []}),
    )
    .row(
        json!({"id": 3}),
        json!({"id": 3, "a1": [], "a2": [], "a3": [], "a4": [], "a5": []}),
    )
    .bad(json!({"id": 9, "a1": [1, 2, 3, 300]}), "column \"a1\"[3]")
    .bad(json!({"id": 9, "a3": [[1], [null]]}), "column \"a3\"[1][0]");
    run(case).await
}

#[tokio::test]
async fn maps() -> Result<()> {
    let case = Case::new(
        "maps",
        "m1 Map(String, UInt64), m2 Map(UInt32, Array(String)), \
         m3 Map(LowCardinality(String), Nullable(Float64)), m4 Map(String, Map(String, Int8)), \
         m5 Map(Date, String)",
    )
    .row(
        json!({"id": 1, "m1": {"a": 1, "b": 18446744073709551615u64},
               "m2": {"1": ["x"], "42": []}, "m3": {"k": null, "j": 1.5},
               "m4": {"o": {"i": -1}}, "m5": {"2024-01-02": "x"}}),
        json!({"id": 1, "m1": {"a": "1", "b": "18446744073709551615"},
               "m2": {"1": ["x"], "42": []}, "m3": {"j": 1.5, "k": null},
               "m4": {"o": {"i": -1}}, "m5": {"2024-01-02": "x"}}),
    )
    .row(
        // The [key, value] pair form, with non-string keys.
        json!({"id": 2, "m1": [["z", 5]], "m2": [[7, ["p", "q"]]], "m3": [], "m4": {},
               "m5": [[19724, "d"]]}),
        json!({"id": 2, "m1": {"z": "5"}, "m2": {"7": ["p", "q"]}, "m3": {}, "m4": {},
               "m5": {"2024-01-02": "d"}}),
    )
    .row(
        json!({"id": 3}),
        json!({"id": 3, "m1": {}, "m2": {}, "m3": {}, "m4": {}, "m5": {}}),
    )
    .bad(json!({"id": 9, "m2": {"x": []}}), "column \"m2\".key \"x\"")
    .bad(
        json!({"id": 9, "m4": {"o": {"i": 500}}}),
        "column \"m4\"[\"o\"][\"i\"]",
    );
    run(case).await
}

#[tokio::test]
async fn tuples() -> Result<()> {
    let case = Case::new(
        "tuples",
        "t1 Tuple(UInt8, String), t2 Tuple(a Int32, b Nullable(String), c Array(Date)), \
         t3 Array(Tuple(k String, v Float64)), t4 Tuple(x Decimal(9, 2), y Tuple(z UInt8))",
    )
    .row(
        json!({"id": 1, "t1": [1, "a"], "t2": {"a": -1, "b": "x", "c": ["2024-01-02"]},
               "t3": [{"k": "p", "v": 1.5}, ["q", 2]], "t4": {"x": "1.25", "y": {"z": 3}}}),
        json!({"id": 1, "t1": [1, "a"], "t2": {"a": -1, "b": "x", "c": ["2024-01-02"]},
               "t3": [{"k": "p", "v": 1.5}, {"k": "q", "v": 2}],
               "t4": {"x": "1.25", "y": {"z": 3}}}),
    )
    .row(
        // An absent Nullable element of a named tuple is NULL.
        json!({"id": 2, "t1": [0, ""], "t2": {"a": 5, "c": []}, "t3": [], "t4": [0, [0]]}),
        json!({"id": 2, "t1": [0, ""], "t2": {"a": 5, "b": null, "c": []}, "t3": [],
               "t4": {"x": "0.00", "y": {"z": 0}}}),
    )
    .row(
        json!({"id": 3}),
        json!({"id": 3, "t1": [0, ""], "t2": {"a": 0, "b": null, "c": []}, "t3": [],
               "t4": {"x": "0.00", "y": {"z": 0}}}),
    )
    .bad(
        json!({"id": 9, "t2": {"b": "x", "c": []}}),
        "missing tuple element \"a\"",
    )
    .bad(
        json!({"id": 9, "t4": {"x": 1, "y": {"z": -1}}}),
        "column \"t4\".y.z",
    )
    .bad(json!({"id": 9, "t1": [1]}), "needs an array of 2 values");
    run(case).await
}

#[tokio::test]
async fn nested_and_simple_aggregates() -> Result<()> {
    let mut case = Case::new(
        "nested",
        "n Nested(p UInt8, q String), s SimpleAggregateFunction(sum, UInt64), \
         s2 SimpleAggregateFunction(anyLast, Nullable(String))",
    )
    .row(
        json!({"id": 1, "n": [{"p": 1, "q": "x"}, [2, "y"]], "s": 5, "s2": null}),
        json!({"id": 1, "n": [{"p": 1, "q": "x"}, {"p": 2, "q": "y"}], "s": "5", "s2": null}),
    )
    .row(
        json!({"id": 2, "s2": "v"}),
        json!({"id": 2, "n": [], "s": "0", "s2": "v"}),
    );
    // Keep `n` one column (an array of named tuples) instead of `n.p`, `n.q`.
    case.create_settings = &[("flatten_nested", "0")];
    run(case).await
}

#[tokio::test]
async fn defaults_ephemeral_and_materialized() -> Result<()> {
    let mut case = Case::new(
        "defaults",
        "d String DEFAULT concat('d-', toString(id)), n UInt32 DEFAULT id * 10, \
         raw String EPHEMERAL, up String DEFAULT upper(raw), m String MATERIALIZED lower(raw), \
         ts DateTime64(3, 'UTC') DEFAULT toDateTime64('2020-01-01 00:00:00', 3, 'UTC'), \
         nn Nullable(String) DEFAULT 'dflt'",
    )
    .row(
        json!({"id": 1}),
        json!({"id": 1, "d": "d-1", "n": 10, "up": "", "ts": "2020-01-01 00:00:00.000",
               "nn": "dflt", "m": ""}),
    )
    .row(
        // null in a non-Nullable column → its DEFAULT; in a Nullable one → NULL.
        json!({"id": 2, "d": null, "n": null, "raw": "abc", "ts": null, "nn": null}),
        json!({"id": 2, "d": "d-2", "n": 20, "up": "ABC", "ts": "2020-01-01 00:00:00.000",
               "nn": null, "m": "abc"}),
    )
    .row(
        json!({"id": 3, "d": "x", "n": 7, "raw": "Q", "ts": "2021-05-06T07:08:09.5Z", "nn": "v"}),
        json!({"id": 3, "d": "x", "n": 7, "up": "Q", "ts": "2021-05-06 07:08:09.500",
               "nn": "v", "m": "q"}),
    )
    .bad(json!({"id": 9, "m": "x"}), "fields not in table");
    case.extra_select = ", m";
    run(case).await
}

#[tokio::test]
async fn unsupported_columns_are_named_in_the_schema_error() -> Result<()> {
    let ch = services::clickhouse().await?;
    let client = client(&ch.url);
    let table = unique_name("sluice_types_unsupported");
    client
        .query_raw(&format!(
            "CREATE TABLE {DATABASE}.{table} (id UInt32, agg AggregateFunction(uniq, UInt64), \
             p Point) ENGINE = MergeTree ORDER BY tuple()"
        ))
        .execute()
        .await?;
    let result = TableSchema::fetch(&client, DATABASE, &table).await;
    let missing = TableSchema::fetch(&client, DATABASE, &format!("{table}_missing")).await;
    client
        .query_raw(&format!("DROP TABLE {DATABASE}.{table}"))
        .execute()
        .await?;
    match result {
        Err(e @ SchemaError::Columns { .. }) => {
            let msg = e.to_string();
            ensure!(
                msg.contains("column \"agg\"")
                    && msg.contains("AggregateFunction(uniq, UInt64)")
                    && msg.contains("column \"p\"")
                    && msg.contains("type Point"),
                "unexpected message: {msg}"
            );
        }
        other => bail!("expected SchemaError::Columns, got {other:?}"),
    }
    ensure!(
        matches!(missing, Err(SchemaError::TableNotFound { .. })),
        "expected TableNotFound, got {missing:?}"
    );
    Ok(())
}
