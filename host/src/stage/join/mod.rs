//! Join stages: the pipeline's records (the left side) joined with a side topic (the right side).
//!
//! - [`interval`]: stream–stream, pairs with equal keys and close event times;
//! - [`lookup`]: stream–table, enrichment with the latest value per key of a changelog topic.
//!
//! State is kept per partition *number*, shared by both topics: the topics must be
//! co-partitioned (see [`check_copartitioned`]).

mod codec;
pub mod config;
pub mod interval;
pub mod lookup;
mod merge;

use std::collections::BTreeMap;

pub use config::{IntervalJoinConfig, JoinConfig, JoinMode, LookupJoinConfig, Unmatched};
pub use interval::IntervalJoinStage;
pub use lookup::LookupJoinStage;

use crate::config::{PipelineConfig, StageKind};

use super::Stage;

/// The stage for a checked config.
pub fn build(name: &str, cfg: &JoinConfig) -> Result<Box<dyn Stage>, String> {
    Ok(match cfg {
        JoinConfig::Interval(c) => Box::new(IntervalJoinStage::new(name, c)?),
        JoinConfig::Lookup(c) => Box::new(LookupJoinStage::new(name, c)?),
    })
}

/// Checks that every join's side topic has as many partitions as each of the pipeline's topics.
///
/// `partitions` maps topic names to partition counts (from broker metadata); a topic missing
/// from it is reported as not found. `Err` holds one line per problem. Equal counts are
/// necessary, not sufficient: both topics must also put equal keys in equal partition numbers
/// (same key bytes, same partitioner), which no metadata can show.
pub fn check_copartitioned(
    pipeline: &PipelineConfig,
    partitions: &BTreeMap<String, usize>,
) -> Result<(), String> {
    let mut problems = Vec::new();
    for s in &pipeline.stages {
        let Some(StageKind::Join(j)) = s.kind() else {
            continue;
        };
        let side = j.side_topic();
        let Some(&side_n) = partitions.get(side) else {
            problems.push(format!(
                "stage {:?}: topic {side:?} (joined) not found on the brokers",
                s.name
            ));
            continue;
        };
        for t in &pipeline.kafka.topics {
            let Some(&n) = partitions.get(t) else {
                continue; // the pipeline's own topics are reported by the caller
            };
            if n != side_n {
                problems.push(format!(
                    "stage {:?}: topics {t:?} ({n} partitions) and {side:?} ({side_n} partitions) are not \
                     co-partitioned. A join keeps state per partition number, so records with equal keys \
                     must land in equal partition numbers of both topics: give both the same partition \
                     count and produce both keyed by the join key with the same partitioner \
                     (or repartition one of them into a new topic).",
                    s.name
                ));
            }
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("\n"))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::LoadedConfig;

    fn pipeline() -> PipelineConfig {
        let yaml = r#"
name: p
kafka: {brokers: "localhost:9092", topics: [tx], group_id: g}
stages:
  - name: with-user
    join:
      kind: lookup
      table_topic: users
      key: /user_id
      nest: user
sink: {clickhouse: {url: "http://localhost:8123", table: t}}
dead_letter: {topic: dlq}
"#;
        LoadedConfig::from_str(Path::new("p.yaml"), yaml)
            .unwrap()
            .pipeline
    }

    #[test]
    fn pipeline_errors_name_the_key() {
        let base = |stage: &str| {
            format!(
                "name: p\nkafka: {{brokers: b, topics: [tx], group_id: g}}\nstages:\n{stage}\n\
                 sink: {{clickhouse: {{url: u, table: t}}}}\ndead_letter: {{topic: dlq}}\n"
            )
        };
        let err = |stage: &str| {
            LoadedConfig::from_str(Path::new("p.yaml"), &base(stage))
                .unwrap_err()
                .to_string()
        };
        let e = err("  - name: d\n    dedup: {key: /id, window: 45d}");
        assert!(e.contains("stages[0].dedup.window"), "{e}");
        let e = err("  - name: j\n    join: {kind: lookup, table_topic: tx, key: /id, nest: u}");
        assert!(e.contains("stages[0].join.table_topic"), "{e}");
        let e = err(
            "  - name: j\n    join: {kind: lookup, table_topic: u, key: /id, nest: u, bogus: 1}",
        );
        assert!(e.contains("bogus"), "{e}");
        let e = err("  - name: j\n    dedup: {key: /id, window: 1h}\n    join: {kind: lookup, table_topic: u, key: /id, nest: u}");
        assert!(
            e.contains("exactly one kind key (wasm, dedup or join)"),
            "{e}"
        );
        let ok = LoadedConfig::from_str(
            Path::new("p.yaml"),
            &base("  - name: d\n    dedup: {key: [/id, /src], window: 10s, time: {field: /ts, format: epoch_s}}"),
        )
        .unwrap();
        assert!(matches!(
            ok.pipeline.stages[0].kind(),
            Some(StageKind::Dedup(_))
        ));
        let (m, d) = (
            ok.pipeline.state.memory(),
            crate::state::StateMemory::default(),
        );
        assert_eq!(
            (m.block_cache_mb, m.write_buffer_mb),
            (d.block_cache_mb, d.write_buffer_mb)
        );
        let with_memory = format!(
            "{}state: {{block_cache_mb: 256, write_buffer_mb: 8}}\n",
            base("  - name: d\n    dedup: {key: /id, window: 1h}")
        );
        let c = LoadedConfig::from_str(Path::new("p.yaml"), &with_memory).unwrap();
        let m = c.pipeline.state.memory();
        assert_eq!((m.block_cache_mb, m.write_buffer_mb), (256, 8));
    }

    #[test]
    fn copartitioning() {
        let p = pipeline();
        let counts = |tx: usize, users: Option<usize>| {
            let mut m = BTreeMap::from([("tx".to_string(), tx)]);
            if let Some(u) = users {
                m.insert("users".to_string(), u);
            }
            m
        };
        check_copartitioned(&p, &counts(4, Some(4))).unwrap();
        let e = check_copartitioned(&p, &counts(4, Some(3))).unwrap_err();
        assert!(
            e.contains("\"tx\" (4 partitions) and \"users\" (3 partitions) are not co-partitioned"),
            "{e}"
        );
        let e = check_copartitioned(&p, &counts(4, None)).unwrap_err();
        assert!(e.contains("not found"), "{e}");
    }
}
