//! Produces the reference workload to Kafka (used by the demo and the benchmarks).
//!
//! `sluice-workload --brokers 127.0.0.1:19092 --topic transactions --count 10000 --malformed-every 100`

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::types::RDKafkaErrorCode;

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

async fn produce(p: &FutureProducer, topic: &str, events: &[Event]) -> Result<()> {
    let mut pending = Vec::with_capacity(events.len());
    for e in events {
        let rec = FutureRecord::to(topic).key(&e.key).payload(&e.value);
        let mut rec = Some(rec);
        loop {
            let Some(r) = rec.take() else { break };
            match p.send_result(r) {
                Ok(f) => {
                    pending.push(f);
                    break;
                }
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

#[tokio::main]
async fn main() -> Result<()> {
    let a = Args::parse();
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &a.brokers)
        .set("linger.ms", "5")
        .set("queue.buffering.max.messages", "1000000")
        .create()
        .context("create producer")?;
    let started = Instant::now();
    if let Some(n) = a.create_partitions {
        create_topic(&a.brokers, &a.topic, n).await?;
        if let Some(t) = &a.users_topic {
            create_topic(&a.brokers, t, n).await?;
        }
    }
    if let Some(t) = &a.users_topic {
        let us = users(a.users);
        produce(&producer, t, &us).await?;
        println!("produced {} users to {t}", us.len());
    }
    let spec = TransactionSpec {
        count: a.count,
        users: a.users,
        malformed_every: a.malformed_every,
        duplicate_percent: a.duplicate_percent,
        seed: a.seed,
    };
    let events = transactions(&spec);
    produce(&producer, &a.topic, &events).await?;
    producer.flush(Duration::from_secs(30))?;
    println!(
        "produced {} transactions to {} ({} malformed, {} duplicates) in {:.2?}",
        events.len(),
        a.topic,
        events.iter().filter(|e| e.malformed).count(),
        events.iter().filter(|e| e.duplicate).count(),
        started.elapsed()
    );
    Ok(())
}
