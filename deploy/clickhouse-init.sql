-- Demo table for docker-compose.yml, created by the official image on first start
-- (/docker-entrypoint-initdb.d). The deduplication window makes a retried batch with the same
-- insert_deduplication_token a no-op on a non-replicated MergeTree: sluice's exactly-once writes
-- rely on it.
CREATE TABLE IF NOT EXISTS default.events
(
    id          String,
    user_id     String,
    amount      Float64,
    currency    LowCardinality(String),
    ts          DateTime64(3, 'UTC'),
    amount_eur  Nullable(Float64),
    is_large    Bool,
    ingested_at DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = MergeTree
ORDER BY (user_id, ts, id)
SETTINGS non_replicated_deduplication_window = 1000;
