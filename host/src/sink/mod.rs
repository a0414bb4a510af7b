//! Sinks: where processed records land.

pub mod clickhouse;
