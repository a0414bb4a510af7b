//! Saying so when a consumer's group join does not complete.
//!
//! A consumer that has subscribed but was never assigned anything (not even an empty
//! assignment) is stuck in the group protocol: the coordinator has not completed the join or
//! sync. Nothing is consumed and nothing fails, so without this the only symptom is a
//! pipeline that reports `consumed=0`. librdkafka's statistics carry the group's state; this
//! reads them while no assignment has come and logs a warning naming that state.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Deserialize;

/// How long after the consumer was created a missing assignment is worth a warning (a group
/// with a member that went away can legitimately take a session timeout to rebalance), and
/// the interval between warnings.
pub const STALL_AFTER: Duration = Duration::from_secs(30);

/// The part of librdkafka's statistics this reads: the consumer group's state.
#[derive(Deserialize)]
struct Stats {
    cgrp: Option<GroupStats>,
}

#[derive(Deserialize)]
struct GroupStats {
    #[serde(default)]
    state: String,
    #[serde(default)]
    join_state: String,
    #[serde(default)]
    rebalance_reason: String,
    #[serde(default)]
    rebalance_cnt: i64,
}

/// Watches one consumer from its creation until its first assignment.
#[derive(Debug)]
pub struct JoinWatch {
    created: Instant,
    last_warning: Mutex<Option<Instant>>,
}

impl JoinWatch {
    pub fn starting_at(created: Instant) -> Self {
        Self {
            created,
            last_warning: Mutex::new(None),
        }
    }

    /// Feeds one statistics document while nothing has been assigned; returns the warning to
    /// log, at most once per [`STALL_AFTER`] and only from [`STALL_AFTER`] after creation.
    pub fn observe(&self, json: &[u8], now: Instant) -> Option<String> {
        let waited = now.checked_duration_since(self.created)?;
        if waited < STALL_AFTER {
            return None;
        }
        let mut last = self.last_warning.lock().unwrap_or_else(|p| p.into_inner());
        if last.is_some_and(|t| now.duration_since(t) < STALL_AFTER) {
            return None;
        }
        *last = Some(now);
        let group = serde_json::from_slice::<Stats>(json)
            .ok()
            .and_then(|s| s.cgrp);
        let state = match group {
            Some(g) => format!(
                "librdkafka's group state: {}, join state: {}, {} rebalance(s), last reason: {}",
                or_none(&g.state),
                or_none(&g.join_state),
                g.rebalance_cnt,
                or_none(&g.rebalance_reason)
            ),
            None => "librdkafka's statistics carry no group state".to_string(),
        };
        Some(format!(
            "no partitions assigned {} s after joining the group: the group coordinator has not \
             completed the join ({state})",
            waited.as_secs()
        ))
    }
}

fn or_none(s: &str) -> &str {
    if s.is_empty() {
        "none"
    } else {
        s
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const STATS: &[u8] = br#"{"name":"c","brokers":{},"cgrp":{"state":"up","stateage":40000,
        "join_state":"wait-join","rebalance_age":35000,"rebalance_cnt":1,
        "rebalance_reason":"group join","assignment_size":0}}"#;

    #[test]
    fn warns_after_the_stall_time_once_per_interval_naming_the_group_state() {
        let t0 = Instant::now();
        let w = JoinWatch::starting_at(t0);
        assert_eq!(w.observe(STATS, t0 + Duration::from_secs(29)), None);
        let m = w.observe(STATS, t0 + Duration::from_secs(31)).unwrap();
        assert!(m.contains("31 s after joining"), "{m}");
        assert!(
            m.contains(
                "group state: up, join state: wait-join, 1 rebalance(s), last reason: group join"
            ),
            "{m}"
        );
        assert_eq!(w.observe(STATS, t0 + Duration::from_secs(45)), None);
        let m = w.observe(b"{}", t0 + Duration::from_secs(62)).unwrap();
        assert!(m.contains("carry no group state"), "{m}");
    }
}
