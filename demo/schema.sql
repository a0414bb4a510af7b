-- Reference workload table: enriched transactions.
-- non_replicated_deduplication_window makes ClickHouse remember the last 1000 insert tokens,
-- which is what lets sluice re-send a batch after a crash without duplicating it.
CREATE TABLE IF NOT EXISTS transactions
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
    ingested_at DateTime DEFAULT now()
)
ENGINE = MergeTree
ORDER BY (event_date, user_id, id)
SETTINGS non_replicated_deduplication_window = 1000;
