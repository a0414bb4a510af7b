//! Smoke tests of the test harness itself against the real services: if these fail, every other
//! integration test would fail for reasons that have nothing to do with sluice.
//!
//! Run against the second broker with `SLUICE_TEST_KAFKA_BROKER=tansu cargo test --release -p
//! sluice-tests --test services_smoke`.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::Message;
use sluice_tests::services::{
    self, committed_offsets, consume_all, consumer_config, create_topic, end_offsets, produce,
    query_rows_json, unique_name, BrokerKind, TestRecord,
};

const MESSAGES: usize = 100;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_produce_group_consume_commit() -> anyhow::Result<()> {
    let kafka = services::kafka().await?;
    let topic = unique_name("smoke");
    create_topic(&kafka.brokers, &topic, 3).await?;

    let records = (0..MESSAGES).map(|i| {
        TestRecord::new(format!("message-{i}"))
            .key(format!("key-{i}"))
            .header("seq", i.to_string())
    });
    let positions = produce(&kafka.brokers, &topic, records).await?;
    assert_eq!(positions.len(), MESSAGES);
    // Next offset to read per partition, from the producer's acknowledgements.
    let mut expected_end: BTreeMap<i32, i64> = BTreeMap::new();
    for (p, o) in &positions {
        let e = expected_end.entry(*p).or_default();
        *e = (*e).max(o + 1);
    }
    assert!(
        expected_end.len() > 1,
        "keys should spread over partitions: {expected_end:?}"
    );

    // Read back without a group, headers included.
    let all = consume_all(&kafka.brokers, &topic, Duration::from_secs(30)).await?;
    assert_eq!(all.len(), MESSAGES);
    for r in &all {
        let payload = r.payload_str().expect("payloads are UTF-8");
        let seq = std::str::from_utf8(r.header("seq").expect("every record has a seq header"))?;
        assert_eq!(payload, format!("message-{seq}"));
        assert_eq!(r.key.as_deref(), Some(format!("key-{seq}").as_bytes()));
    }

    // Consume with a consumer group, commit, and read the committed offsets back.
    let group = unique_name("smoke_group");
    let consumer: StreamConsumer = consumer_config(&kafka.brokers, &group).create()?;
    consumer.subscribe(&[&topic])?;
    let mut seen = BTreeSet::new();
    while seen.len() < MESSAGES {
        let msg = tokio::time::timeout(Duration::from_secs(60), consumer.recv())
            .await
            .map_err(|_| {
                anyhow::anyhow!("group consumer got {} of {MESSAGES} in 60 s", seen.len())
            })??;
        seen.insert(msg.payload().map(<[u8]>::to_vec));
        consumer.store_offset_from_message(&msg)?;
    }
    consumer.commit_consumer_state(CommitMode::Sync)?;
    drop(consumer);

    let committed = committed_offsets(&kafka.brokers, &group, &topic).await?;
    let committed: BTreeMap<i32, i64> = committed
        .into_iter()
        .filter_map(|(p, o)| o.map(|o| (p, o)))
        .collect();
    assert_eq!(
        committed, expected_end,
        "committed offsets == end of each partition"
    );

    let end = end_offsets(&kafka.brokers, &topic).await?;
    let end: BTreeMap<i32, i64> = end.into_iter().filter(|(_, o)| *o > 0).collect();
    if kafka.kind == BrokerKind::Tansu {
        // Known tansu quirk (shared/notes/kafka.md): high watermarks are wrong; say so loudly
        // rather than pass or fail on it.
        if end != expected_end {
            eprintln!("tansu high watermarks {end:?} != produced ends {expected_end:?} (known)");
        }
    } else {
        assert_eq!(
            end, expected_end,
            "high watermarks == end of each partition"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clickhouse_insert_deduplication_token() -> anyhow::Result<()> {
    let ch = services::clickhouse().await?;
    let table = unique_name("smoke_dedup");
    services::ch_execute(
        &ch.url,
        &format!(
            "CREATE TABLE {table} (id UInt64, s String) ENGINE = MergeTree ORDER BY id \
             SETTINGS non_replicated_deduplication_window = 1000"
        ),
    )
    .await?;

    let rows: String = (0..10)
        .map(|i| {
            format!(
                "{}\n",
                serde_json::json!({"id": i, "s": format!("row-{i}")})
            )
        })
        .collect();

    insert_json_rows(&ch.client(), &table, &rows, "batch-1").await?;
    // A retried batch: the server drops it.
    insert_json_rows(&ch.client(), &table, &rows, "batch-1").await?;
    assert_eq!(
        count_and_sum(&ch.url, &table).await?,
        (Some(10), Some(45)),
        "one copy after a retry"
    );

    // Control: a different token is a different batch.
    insert_json_rows(&ch.client(), &table, &rows, "batch-2").await?;
    assert_eq!(
        count_and_sum(&ch.url, &table).await?,
        (Some(20), Some(90)),
        "two copies with two tokens"
    );

    services::ch_execute(&ch.url, &format!("DROP TABLE {table} SYNC")).await?;
    Ok(())
}

async fn insert_json_rows(
    client: &clickhouse::Client,
    table: &str,
    rows: &str,
    token: &str,
) -> anyhow::Result<()> {
    let mut insert = client
        .insert_formatted_with(format!("INSERT INTO {table} FORMAT JSONEachRow"))
        .with_setting("insert_deduplication_token", token)
        .buffered();
    insert.write_buffered(rows.as_bytes());
    insert.end().await?;
    Ok(())
}

async fn count_and_sum(url: &str, table: &str) -> anyhow::Result<(Option<u64>, Option<u64>)> {
    let rows = query_rows_json(
        url,
        &format!(
            "SELECT count() AS n, sum(id) AS s FROM {table} \
             SETTINGS output_format_json_quote_64bit_integers = 0"
        ),
    )
    .await?;
    anyhow::ensure!(rows.len() == 1, "expected one row, got {rows:?}");
    Ok((rows[0]["n"].as_u64(), rows[0]["s"].as_u64()))
}
