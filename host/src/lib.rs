//! sluice: Kafka → pipeline of stages (dedup, joins, WASM plugins) → ClickHouse, exactly once.
//!
//! The engine ([`pipeline`]) knows batches and the [`stage::Stage`] trait, nothing stage-specific.

pub mod api;
pub mod config;
pub mod devtools;
pub mod dlq;
pub mod fault;
pub mod memory;
pub mod metrics;
pub mod pipeline;
pub mod plugin_store;
pub mod record;
pub mod sink;
pub mod source;
pub mod stage;
pub mod state;
pub mod validate;
