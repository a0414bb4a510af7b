//! Hostile plugins against the real host stage (wasmtime, the real sandbox): each misbehaviour
//! is contained, exactly the offending records are dead-lettered with the right reason, and the
//! stage keeps working afterwards.

use std::sync::Arc;

use anyhow::{ensure, Context, Result};
use bytes::Bytes;
use serde_json::json;

use sluice::config::{PluginLimits, WasiGrants};
use sluice::record::{Origin, Record};
use sluice::stage::wasm::{PluginRuntime, WasmOptions, WasmStage};
use sluice::stage::{BatchContext, PartitionKey, Stage, StageOutput};
use sluice::state::StateStore;
use sluice_tests::plugins::HOSTILE_WASM;

fn record(offset: i64, value: serde_json::Value) -> Record {
    Record::from_origin(Arc::new(Origin {
        topic: Arc::from("hostile"),
        partition: 0,
        offset,
        timestamp_ms: Some(0),
        key: None,
        value: Bytes::from(value.to_string()),
        headers: vec![],
    }))
}

fn batch(actions: &[&str]) -> Vec<Record> {
    actions
        .iter()
        .enumerate()
        .map(|(i, a)| record(i as i64, json!({"n": i, "action": a})))
        .collect()
}

struct Harness {
    stage: WasmStage,
    store: StateStore,
    _dir: tempfile::TempDir,
}

impl Harness {
    fn new(limits: PluginLimits, breaker_failures: u32) -> Result<Self> {
        let runtime = PluginRuntime::new(None)?;
        let plugin = runtime.load_file(std::path::Path::new(HOSTILE_WASM))?;
        let stage = WasmStage::with_options(
            "sandbox-test",
            "hostile",
            plugin,
            &json!({}),
            WasmOptions {
                limits,
                grants: WasiGrants::default(),
                breaker_failures,
            },
        )?;
        let dir = tempfile::tempdir()?;
        let store = StateStore::open(dir.path())?;
        Ok(Self {
            stage,
            store,
            _dir: dir,
        })
    }

    fn run(&mut self, records: Vec<Record>) -> Result<StageOutput, sluice::stage::StageError> {
        let ctx = BatchContext {
            pipeline: "sandbox-test".into(),
            partition: PartitionKey {
                topic: "hostile".into(),
                partition: 0,
            },
            first_offset: 0,
            last_offset: records.len() as i64 - 1,
        };
        let mut txn = self.store.txn();
        self.stage.process(records, &ctx, &mut txn)
    }
}

fn limits(timeout_ms: u64, memory_mb: u64, max_output_mb: u64) -> PluginLimits {
    PluginLimits {
        memory_mb,
        timeout_ms,
        max_output_mb,
        ..PluginLimits::default()
    }
}

/// (offset, kind) of every dead letter.
fn dead(out: &StageOutput) -> Vec<(i64, String)> {
    out.dead_letters
        .iter()
        .map(|d| (d.origin.offset, d.kind.clone()))
        .collect()
}

fn vm_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|n| n.parse().ok()))
        })
        .unwrap_or(0)
}

#[test]
fn infinite_loop_is_stopped_by_the_time_limit() -> Result<()> {
    let mut h = Harness::new(limits(300, 64, 64), 0)?;
    let out = h.run(batch(&["ok", "ok", "loop", "ok"]))?;
    ensure!(
        dead(&out) == vec![(2, "timeout".to_string())],
        "{:?}",
        dead(&out)
    );
    ensure!(out.records.len() == 3, "{} rows", out.records.len());
    let msg = &out.dead_letters[0].message;
    ensure!(msg.contains("time limit of 300 ms"), "{msg}");
    // The stage still works on a fresh instance.
    let out = h.run(batch(&["ok", "ok"]))?;
    ensure!(out.records.len() == 2 && out.dead_letters.is_empty());
    Ok(())
}

#[test]
fn memory_bomb_is_stopped_by_the_memory_limit_and_host_memory_stays_bounded() -> Result<()> {
    let mut h = Harness::new(limits(5_000, 32, 64), 0)?;
    let before = vm_rss_kib();
    for _ in 0..5 {
        let out = h.run(batch(&["ok", "alloc", "ok"]))?;
        ensure!(
            dead(&out) == vec![(1, "memory".to_string())],
            "{:?}",
            dead(&out)
        );
        ensure!(out.records.len() == 2);
        ensure!(
            out.dead_letters[0]
                .message
                .contains("memory limit of 32 MiB"),
            "{}",
            out.dead_letters[0].message
        );
    }
    let grown_mib = vm_rss_kib().saturating_sub(before) / 1024;
    // Five 32 MiB bombs, each instance discarded: the host must not keep their memory.
    ensure!(grown_mib < 256, "host RSS grew by {grown_mib} MiB");
    Ok(())
}

#[test]
fn one_trap_in_a_thousand_dead_letters_exactly_that_record() -> Result<()> {
    let mut h = Harness::new(PluginLimits::default(), 5)?;
    for round in 0..6 {
        // Six consecutive batches with a poison record must not trip the breaker: the plugin
        // works, only the record is bad.
        let poison = 137 + round * 100;
        let actions: Vec<&str> = (0..1000)
            .map(|i| if i == poison { "trap" } else { "ok" })
            .collect();
        let out = h.run(batch(&actions))?;
        ensure!(
            dead(&out) == vec![(poison as i64, "trap".to_string())],
            "{:?}",
            dead(&out)
        );
        ensure!(out.records.len() == 999);
        let offsets: Vec<i64> = out.records.iter().map(|r| r.origin.offset).collect();
        ensure!(!offsets.contains(&(poison as i64)));
    }
    Ok(())
}

#[test]
fn output_explosion_is_stopped_by_the_output_limit() -> Result<()> {
    let mut h = Harness::new(limits(5_000, 128, 1), 0)?;
    let pad = "x".repeat(20_000);
    let records: Vec<Record> = ["ok", "explode", "ok"]
        .iter()
        .enumerate()
        .map(|(i, a)| record(i as i64, json!({"action": a, "pad": pad})))
        .collect();
    let out = h.run(records)?;
    ensure!(
        dead(&out) == vec![(1, "output_limit".to_string())],
        "{:?}",
        dead(&out)
    );
    ensure!(out.records.len() == 2);
    Ok(())
}

#[test]
fn sandbox_escapes_are_denied() -> Result<()> {
    let mut h = Harness::new(PluginLimits::default(), 0)?;
    let out = h.run(batch(&["read_file", "env", "socket"]))?;
    ensure!(out.dead_letters.is_empty(), "{:?}", dead(&out));
    for r in &out.records {
        let v: serde_json::Value = serde_json::from_slice(&r.value)?;
        let escape = v["escape"].as_str().context("escape field")?;
        ensure!(escape.starts_with("denied"), "sandbox escape: {v}");
    }
    Ok(())
}

#[test]
fn breaker_trips_after_consecutive_broken_batches() -> Result<()> {
    let mut h = Harness::new(limits(200, 64, 64), 3)?;
    for i in 0..2 {
        // Every record fails: the plugin is broken. The records are dead-lettered (nothing is
        // lost) until the breaker trips.
        let out = h.run(batch(&["trap", "trap", "trap", "trap"]))?;
        ensure!(out.dead_letters.len() == 4, "round {i}: {:?}", dead(&out));
    }
    let err = match h.run(batch(&["trap", "trap"])) {
        Ok(out) => anyhow::bail!("breaker did not trip: {:?}", dead(&out)),
        Err(e) => e,
    };
    ensure!(err.breaker_open, "{err}");
    ensure!(err.message.contains("circuit breaker open"), "{err}");
    Ok(())
}
