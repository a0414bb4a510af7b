//! Produces the reference workload to Kafka (used by the demo and the benchmarks).
//!
//! `sluice-workload --brokers 127.0.0.1:19092 --topic transactions --count 10000 --malformed-every 100`
//!
//! With `--reference-users-topic users`: the reference workload of the full path instead
//! (`sluice_tests::bench::full`): transactions with ~10 % repeated ids and timestamped user
//! profiles, co-partitioned by user, plus one flush record per partition that closes every
//! join window; prints the rows a correct pipeline writes. `--reference-ddl TABLE` prints the
//! table it lands in and exits.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::types::RDKafkaErrorCode;

use sluice_tests::bench::events::BenchEvent;
use sluice_tests::bench::full;
use sluice_tests::workload::{transactions, users, Event, TransactionSpec};

#[derive(Parser)]
#[command(about = "Produce the sluice reference workload (transactions, users) to Kafka")]
struct Args {
    #[arg(long, env = "SLUICE_KAFKA_BROKERS", default_value = "127.0.0.1:19092")]
    brokers: String,
    /// Topic for transaction events.
    #[arg(long, default_value = "transactions")]
    topic: String,
    #[arg(long, default_value_t = 10_000)]
    count: usize,
    /// Every Nth record is malformed (0: none).
    #[arg(long, default_value_t = 0)]
    malformed_every: usize,
    /// Percent of records that repeat an earlier event.
    #[arg(long, default_value_t = 0)]
    duplicate_percent: u64,
    #[arg(long, default_value_t = 500)]
    users: u64,
    /// Also produce one profile per user to this topic.
    #[arg(long)]
    users_topic: Option<String>,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Produce the full path's reference workload (dedup + interval join): transactions to
    /// `--topic`, user profiles to this topic (both created with `--create-partitions`).
    #[arg(long)]
    reference_users_topic: Option<String>,
    /// Print the ClickHouse table of the reference workload under this name, and exit.
    #[arg(long)]
    reference_ddl: Option<String>,
    /// Create the topic(s) with this many partitions first (existing topics are kept).
    #[arg(long)]
    create_partitions: Option<i32>,
}

async fn create_topic(brokers: &str, topic: &str, partitions: i32) -> Result<()> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .context("create admin client")?;
    let new = NewTopic::new(topic, partitions, TopicReplication::Fixed(1));
    for r in admin.create_topics([&new], &AdminOptions::new()).await? {
        match r {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((t, e)) => anyhow::bail!("cannot create topic {t}: {e}"),
        }
    }
    Ok(())
}

/// Produces `(key, value, partition)` records (`None`: the partitioner picks, by key), retrying
/// while the producer's queue is full, and waits for every delivery.
async fn produce<'e>(
    p: &FutureProducer,
    topic: &str,
    records: impl IntoIterator<Item = (&'e str, &'e [u8], Option<i32>)>,
) -> Result<()> {
    let mut pending = Vec::new();
    for (key, value, partition) in records {
        let mut rec = FutureRecord::to(topic).key(key).payload(value);
        if let Some(n) = partition {
            rec = rec.partition(n);
        }
        let mut rec = Some(rec);
        while let Some(r) = rec.take() {
            match p.send_result(r) {
                Ok(f) => pending.push(f),
                Err((_, r)) => {
                    rec = Some(r);
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        }
    }
    for f in pending {
        f.await
            .context("producer dropped")?
            .map_err(|(e, _)| anyhow::anyhow!("delivery failed: {e}"))?;
    }
    Ok(())
}

fn events(events: &[Event]) -> impl Iterator<Item = (&str, &[u8], Option<i32>)> {
    events.iter().map(|e| (e.key.as_str(), &e.value[..], None))
}

fn bench_events(events: &[BenchEvent]) -> impl Iterator<Item = (&str, &[u8], Option<i32>)> {
    events
        .iter()
        .map(|e| (e.key.as_str(), &e.value[..], e.partition))
}

#[tokio::main]
async fn main() -> Result<()> {
    let a = Args::parse();
    if let Some(table) = &a.reference_ddl {
        println!("{}", full::table_ddl_full(table));
        return Ok(());
    }
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &a.brokers)
        .set("linger.ms", "5")
        .set("queue.buffering.max.messages", "1000000")
        .create()
        .context("create producer")?;
    let started = Instant::now();
    // The reference workload names its partitions, so its topics are always created (one
    // partition unless told otherwise).
    let partitions = a
        .create_partitions
        .or(a.reference_users_topic.as_ref().map(|_| 1));
    if let Some(n) = partitions {
        create_topic(&a.brokers, &a.topic, n).await?;
        for t in [&a.users_topic, &a.reference_users_topic]
            .into_iter()
            .flatten()
        {
            create_topic(&a.brokers, t, n).await?;
        }
    }
    if let Some(users_topic) = &a.reference_users_topic {
        let w = full::workload(a.count, partitions.unwrap_or(1));
        produce(&producer, users_topic, bench_events(&w.users)).await?;
        produce(&producer, &a.topic, bench_events(&w.transactions)).await?;
        producer.flush(Duration::from_secs(30))?;
        println!(
            "produced {} transactions ({} repeating an earlier id) to {} and {} user profiles to {users_topic} in {:.2?}",
            w.transactions.len(),
            w.duplicates,
            a.topic,
            w.users.len(),
            started.elapsed()
        );
        println!(
            "expected rows: {} ({} with a user)",
            w.expected_rows, w.expected_matched
        );
        return Ok(());
    }
    if let Some(t) = &a.users_topic {
        let us = users(a.users);
        produce(&producer, t, events(&us)).await?;
        println!("produced {} users to {t}", us.len());
    }
    let spec = TransactionSpec {
        count: a.count,
        users: a.users,
        malformed_every: a.malformed_every,
        duplicate_percent: a.duplicate_percent,
        seed: a.seed,
    };
    let txs = transactions(&spec);
    produce(&producer, &a.topic, events(&txs)).await?;
    producer.flush(Duration::from_secs(30))?;
    println!(
        "produced {} transactions to {} ({} malformed, {} duplicates) in {:.2?}",
        txs.len(),
        a.topic,
        txs.iter().filter(|e| e.malformed).count(),
        txs.iter().filter(|e| e.duplicate).count(),
        started.elapsed()
    );
    Ok(())
}
