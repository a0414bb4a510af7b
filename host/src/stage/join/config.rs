//! The `join:` stage kind in the pipeline file.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::stage::keyed::{EventTimeConfig, HumanDuration, KeyPointers, OutputShape};

/// Longest `before`, `after` or `allowed_lateness`: both sides are buffered for that long.
pub const MAX_INTERVAL: Duration = Duration::from_secs(30 * 86_400);

/// A join of the pipeline's records (the left side) with another topic (the right side).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum JoinConfig {
    /// Stream–stream: pairs of records with equal keys whose event times are close.
    Interval(IntervalJoinConfig),
    /// Stream–table: each record enriched with the latest value of its key in a changelog topic.
    Lookup(LookupJoinConfig),
}

/// Inner or left-outer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JoinMode {
    /// Only pairs are emitted.
    #[default]
    Inner,
    /// Also each left record that found no pair by the time its window closed, with the right
    /// side null.
    LeftOuter,
}

/// ```yaml
/// - name: with-user
///   join:
///     kind: interval
///     right_topic: users
///     left_key: /user_id
///     right_key: /user_id
///     left_time: {field: /ts}
///     right_time: {field: /ts, format: epoch_ms}
///     before: 5m                # right.ts >= left.ts - before
///     after: 5m                 # right.ts <= left.ts + after
///     allowed_lateness: 1m
///     mode: left_outer          # inner (default) | left_outer
///     prefix: user_             # or `nest: user`
///     fields: [name, country]   # with prefix: copy only these (null when unmatched)
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IntervalJoinConfig {
    /// The other stream. Must be co-partitioned with the pipeline's topics (same partition
    /// count, records with equal join keys in equal partition numbers).
    pub right_topic: String,
    /// JSON pointer(s) of the join key in the pipeline's records.
    pub left_key: KeyPointers,
    /// JSON pointer(s) of the join key in the right topic's records (same number as `left_key`).
    pub right_key: KeyPointers,
    pub left_time: EventTimeConfig,
    pub right_time: EventTimeConfig,
    /// How far the right record's time may be before the left record's.
    pub before: HumanDuration,
    /// How far the right record's time may be after the left record's.
    pub after: HumanDuration,
    /// How far behind the watermark (the smaller of both sides' largest event time) a record
    /// may arrive; later ones go to the dead-letter topic with kind `late`.
    #[serde(default)]
    pub allowed_lateness: HumanDuration,
    #[serde(default)]
    pub mode: JoinMode,
    /// Put the right record under this field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nest: Option<String>,
    /// Copy the right record's fields with this prefix.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    /// With `prefix`: the right fields to copy (set to null when unmatched). Default: all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fields: Option<Vec<String>>,
}

/// What happens to a record whose key is not in the table.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Unmatched {
    /// Continue with the right side null (`nest`) or absent/null fields (`prefix`).
    #[default]
    Pass,
    /// Drop it (counted as `join_unmatched`).
    Drop,
    /// Send it to the dead-letter topic with kind `unmatched`.
    DeadLetter,
}

/// ```yaml
/// - name: with-user
///   join:
///     kind: lookup
///     table_topic: users        # a changelog: latest value per key, null value = delete
///     key: /user_id             # in the pipeline's records
///     # table_key: /user_id     # default: the Kafka message key of the table topic
///     nest: user
///     unmatched: pass           # pass (default) | drop | dead_letter
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LookupJoinConfig {
    /// The changelog topic. Must be co-partitioned with the pipeline's topics.
    pub table_topic: String,
    /// JSON pointer(s) of the key in the pipeline's records.
    pub key: KeyPointers,
    /// JSON pointer(s) of the key in the table's records. Default: the Kafka message key (the
    /// compacted-topic convention). Tombstones (null or empty values) always find their row by
    /// Kafka message key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub table_key: Option<KeyPointers>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nest: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fields: Option<Vec<String>>,
    #[serde(default)]
    pub unmatched: Unmatched,
}

impl IntervalJoinConfig {
    pub fn shape(&self) -> Result<OutputShape, String> {
        OutputShape::from_parts(
            self.nest.as_deref(),
            self.prefix.as_deref(),
            self.fields.as_deref(),
        )
    }
}

impl LookupJoinConfig {
    pub fn shape(&self) -> Result<OutputShape, String> {
        OutputShape::from_parts(
            self.nest.as_deref(),
            self.prefix.as_deref(),
            self.fields.as_deref(),
        )
    }
}

impl JoinConfig {
    /// The topic this join consumes besides the pipeline's.
    pub fn side_topic(&self) -> &str {
        match self {
            Self::Interval(c) => &c.right_topic,
            Self::Lookup(c) => &c.table_topic,
        }
    }

    /// Checks what serde cannot: `Err((key under the stage, message))`.
    pub fn check(&self, main_topics: &[String], dead_letter: &str) -> Result<(), (String, String)> {
        let (topic_key, topic) = match self {
            Self::Interval(c) => ("join.right_topic", &c.right_topic),
            Self::Lookup(c) => ("join.table_topic", &c.table_topic),
        };
        if topic.is_empty() {
            return Err((topic_key.into(), "must not be empty".into()));
        }
        if main_topics.contains(topic) || topic == dead_letter {
            return Err((
                topic_key.into(),
                format!("{topic:?} is already a pipeline or dead-letter topic; the joined topic must be another one"),
            ));
        }
        let at = |k: &str| format!("join.{k}");
        match self {
            Self::Interval(c) => {
                c.shape().map_err(|m| (at("nest"), m))?;
                if c.left_key.pointers().len() != c.right_key.pointers().len() {
                    return Err((
                        at("right_key"),
                        format!(
                            "has {} pointer(s) but left_key has {}: keys are compared component by component",
                            c.right_key.pointers().len(),
                            c.left_key.pointers().len()
                        ),
                    ));
                }
                for (k, d) in [
                    ("before", c.before),
                    ("after", c.after),
                    ("allowed_lateness", c.allowed_lateness),
                ] {
                    if d.0 > MAX_INTERVAL {
                        return Err((at(k), format!("{d} is longer than the maximum of 30d")));
                    }
                }
            }
            Self::Lookup(c) => {
                c.shape().map_err(|m| (at("nest"), m))?;
                let n = c.key.pointers().len();
                match &c.table_key {
                    None if n != 1 => {
                        return Err((
                            at("key"),
                            format!("has {n} pointers, but the table is keyed by the Kafka message key (one value): set table_key"),
                        ))
                    }
                    Some(t) if t.pointers().len() != n => {
                        return Err((
                            at("table_key"),
                            format!("has {} pointer(s) but key has {n}", t.pointers().len()),
                        ))
                    }
                    _ => {}
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const INTERVAL: &str = "kind: interval\nright_topic: users\nleft_key: /user_id\nright_key: /user_id\n\
        left_time: {field: /ts}\nright_time: {field: /ts, format: epoch_ms}\nbefore: 5m\nafter: 5m\n";

    #[test]
    fn interval_parses_with_defaults() {
        let c: JoinConfig = serde_yaml_ng::from_str(&format!("{INTERVAL}nest: user\n")).unwrap();
        let JoinConfig::Interval(i) = &c else {
            panic!("{c:?}")
        };
        assert_eq!(i.mode, JoinMode::Inner);
        assert_eq!(i.allowed_lateness.0, Duration::ZERO);
        assert_eq!(c.side_topic(), "users");
        c.check(&["tx".into()], "dlq").unwrap();
    }

    #[test]
    fn unknown_fields_and_bad_shapes_are_refused() {
        let e = serde_yaml_ng::from_str::<JoinConfig>(&format!("{INTERVAL}nest: u\nwithin: 5m\n"))
            .unwrap_err();
        assert!(e.to_string().contains("unknown field `within`"), "{e}");
        let e = serde_yaml_ng::from_str::<JoinConfig>("kind: hash\n").unwrap_err();
        assert!(e.to_string().contains("unknown variant `hash`"), "{e}");
        let c: JoinConfig = serde_yaml_ng::from_str(INTERVAL).unwrap();
        let (k, m) = c.check(&["tx".into()], "dlq").unwrap_err();
        assert_eq!(k, "join.nest");
        assert!(m.contains("prefix"), "{m}");
        let c: JoinConfig = serde_yaml_ng::from_str(&format!("{INTERVAL}nest: u\n")).unwrap();
        let (k, _) = c.check(&["users".into()], "dlq").unwrap_err();
        assert_eq!(k, "join.right_topic");
    }

    #[test]
    fn lookup_key_arity() {
        let c: JoinConfig = serde_yaml_ng::from_str(
            "kind: lookup\ntable_topic: users\nkey: [/a, /b]\nprefix: u_\nunmatched: dead_letter\n",
        )
        .unwrap();
        let (k, m) = c.check(&[], "dlq").unwrap_err();
        assert_eq!(k, "join.key");
        assert!(m.contains("table_key"), "{m}");
        let c: JoinConfig = serde_yaml_ng::from_str(
            "kind: lookup\ntable_topic: users\nkey: [/a, /b]\ntable_key: [/x, /y]\nprefix: u_\n",
        )
        .unwrap();
        c.check(&[], "dlq").unwrap();
    }
}
