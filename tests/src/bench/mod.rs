//! The benchmark harness behind `sluice-bench` (`scripts/bench.sh`, results in
//! `docs/benchmarks.md`): real broker, real ClickHouse, the real `sluice` binary, measured from
//! the outside through `/proc` and ClickHouse. Nothing here asserts on timings.

pub mod events;
pub mod full;
pub mod kafka;
pub mod pipeline;
pub mod procfs;
pub mod services;
pub mod state;
pub mod stats;
pub mod swap;
pub mod wasm_cost;
