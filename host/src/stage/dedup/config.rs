//! The `dedup:` stage kind in the pipeline file.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::stage::keyed::{EventTimeConfig, HumanDuration, KeyPointers};

/// The longest dedup window: state is kept for the whole window, on disk.
pub const MAX_WINDOW: Duration = Duration::from_secs(30 * 86_400);

/// Drops records whose key was already seen within the window; the first occurrence passes.
///
/// ```yaml
/// - name: dedup
///   dedup:
///     key: [/id, /source]        # one pointer or a list (composite key)
///     window: 24h                # ms, s, m, h, d; at most 30d
///     time: {field: /ts, format: rfc3339}   # omit: the Kafka message timestamp
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DedupConfig {
    /// JSON pointer(s) whose values together identify a record: `/id` or `[/id, /source]`.
    /// Values compare by text (`42` and `"42"` are the same key).
    pub key: KeyPointers,
    /// How long a key is remembered, in event time: a record whose key was first seen more than
    /// `window` before the latest event time of its partition is a new first occurrence.
    pub window: HumanDuration,
    /// The record's event time. Omitted: the Kafka message timestamp ("processing time" that is
    /// still deterministic when a partition is re-read, unlike the wall clock).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<EventTimeConfig>,
}

impl DedupConfig {
    /// Checks what serde cannot: `Err((key under the stage, message))`.
    pub fn check(&self) -> Result<(), (String, String)> {
        if self.window.0.is_zero() {
            return Err(("dedup.window".into(), "must be greater than 0".into()));
        }
        if self.window.0 > MAX_WINDOW {
            return Err((
                "dedup.window".into(),
                format!(
                    "{} is longer than the maximum of 30d (state is kept for the whole window)",
                    self.window
                ),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_checks() {
        let c: DedupConfig = serde_yaml_ng::from_str(
            "key: [/id, /src]\nwindow: 24h\ntime: {field: /ts, format: epoch_ms}\n",
        )
        .unwrap();
        assert_eq!(c.key.pointers().len(), 2);
        assert_eq!(c.window.0, Duration::from_secs(86_400));
        c.check().unwrap();
        let c: DedupConfig = serde_yaml_ng::from_str("key: /id\nwindow: 31d\n").unwrap();
        let (k, m) = c.check().unwrap_err();
        assert_eq!(k, "dedup.window");
        assert!(m.contains("30d"), "{m}");
        let e =
            serde_yaml_ng::from_str::<DedupConfig>("key: /id\nwindow: 1h\nttl: 2h\n").unwrap_err();
        assert!(e.to_string().contains("unknown field `ttl`"), "{e}");
        let e = serde_yaml_ng::from_str::<DedupConfig>("key: /id\nwindow: 1 hour\n").unwrap_err();
        assert!(e.to_string().contains("not a duration"), "{e}");
    }
}
