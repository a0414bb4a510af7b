//! ClickHouse sink: table schema discovery, JSON → RowBinaryWithDefaults encoding, idempotent inserts.

pub mod encode;
pub mod types;
pub mod writer;
