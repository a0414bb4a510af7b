//! Side topics first: when partitions are assigned, each side topic's partition (the table of
//! a lookup join, the right side of an interval join) is read up to the end it had at the
//! assignment before the pipeline's own partitions of the same number are fetched.
//!
//! Why: with both consumed from a backlog (a first start, a restart after downtime), the
//! consumer otherwise delivers whichever partition's fetch answers first. A lookup join then
//! looks records up in a table that is not loaded yet (they come out unmatched), and an
//! interval join buffers the whole pipeline backlog in state until the side catches up, then
//! reads it all back (the benchmark's full path took twice the CPU and four times the state
//! when the transactions came first). Loading the side first is what a table join needs and
//! keeps an interval join's buffers small; afterwards both are consumed as they come.
//!
//! The pipeline's partitions of a number wait (paused) until every side partition of that
//! number has reached its end, or has delivered nothing for [`STALL`] (a side whose end is
//! transaction markers never shows a record there).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rdkafka::consumer::{Consumer, ConsumerContext};
use rdkafka::{Offset, TopicPartitionList};

use crate::config::StartOffset;
use crate::stage::PartitionKey;

/// A loading side partition that delivered nothing for this long counts as loaded.
pub const STALL: Duration = Duration::from_secs(5);
/// How long the broker may take to answer the offset and watermark requests at assignment.
const QUERY_TIMEOUT: Duration = Duration::from_secs(10);

/// The side partitions of one partition number still loading, and the pipeline partitions
/// waiting for them.
#[derive(Debug)]
struct Loading {
    /// Side partition and the end it must reach.
    sides: Vec<(PartitionKey, i64)>,
    waiting: Vec<PartitionKey>,
    /// The assignment, or the last record a side partition of this number delivered.
    progress: Instant,
}

#[derive(Debug)]
pub struct SideFirst {
    side_topics: HashSet<String>,
    start: StartOffset,
    /// Partition number → what loads. Non-empty only right after an assignment.
    loading: Mutex<HashMap<i32, Loading>>,
    /// `loading` is not empty: the per-record bookkeeping is skipped otherwise.
    active: AtomicBool,
}

impl SideFirst {
    pub fn new(side_topics: &[String], start: StartOffset) -> Self {
        Self {
            side_topics: side_topics.iter().cloned().collect(),
            start,
            loading: Mutex::new(HashMap::new()),
            active: AtomicBool::new(false),
        }
    }

    pub fn is_side(&self, topic: &str) -> bool {
        self.side_topics.contains(topic)
    }

    /// Called in the rebalance callback once `parts` are assigned: finds the side partitions
    /// with records to read and pauses the pipeline partitions of their numbers.
    pub fn assigned<C: ConsumerContext, K: Consumer<C>>(&self, c: &K, parts: &[PartitionKey]) {
        if self.side_topics.is_empty() {
            return;
        }
        let sides: Vec<&PartitionKey> = parts.iter().filter(|p| self.is_side(&p.topic)).collect();
        if sides.is_empty() {
            return;
        }
        let mut tpl = TopicPartitionList::new();
        for p in &sides {
            tpl.add_partition(&p.topic, p.partition);
        }
        let committed = c.committed_offsets(tpl, QUERY_TIMEOUT).ok();
        let mut loading: HashMap<i32, Loading> = HashMap::new();
        for p in sides {
            let Ok((low, high)) = c.fetch_watermarks(&p.topic, p.partition, QUERY_TIMEOUT) else {
                continue;
            };
            let from = committed
                .as_ref()
                .and_then(|t| t.find_partition(&p.topic, p.partition))
                .and_then(|e| match e.offset() {
                    Offset::Offset(o) => Some(o),
                    _ => None,
                })
                .unwrap_or(match self.start {
                    StartOffset::Earliest => low,
                    StartOffset::Latest => high,
                });
            if from < high {
                loading
                    .entry(p.partition)
                    .or_insert_with(|| Loading {
                        sides: Vec::new(),
                        waiting: Vec::new(),
                        progress: Instant::now(),
                    })
                    .sides
                    .push((p.clone(), high));
            }
        }
        let mut pause = TopicPartitionList::new();
        for p in parts.iter().filter(|p| !self.is_side(&p.topic)) {
            if let Some(l) = loading.get_mut(&p.partition) {
                pause.add_partition(&p.topic, p.partition);
                l.waiting.push(p.clone());
            }
        }
        loading.retain(|_, l| !l.waiting.is_empty());
        if loading.is_empty() {
            return;
        }
        if let Err(e) = c.pause(&pause) {
            tracing::warn!("pausing the pipeline's partitions while side topics load: {e}");
            return;
        }
        for (n, l) in &loading {
            let sides: Vec<String> = l
                .sides
                .iter()
                .map(|(p, end)| format!("{p} to {end}"))
                .collect();
            tracing::info!(
                partition = n,
                "side topics first: reading {} before the pipeline's partition",
                sides.join(", ")
            );
        }
        if let Ok(mut m) = self.loading.lock() {
            m.extend(loading);
            self.active.store(true, Ordering::Relaxed);
        }
    }

    /// Forgets revoked partitions (librdkafka forgets their pause).
    pub fn revoked(&self, parts: &[PartitionKey]) {
        if let Ok(mut m) = self.loading.lock() {
            for p in parts {
                m.remove(&p.partition);
            }
            self.active.store(!m.is_empty(), Ordering::Relaxed);
        }
    }

    /// Whether this keeps pipeline partition `topic` [`partition`] paused.
    pub fn holds(&self, topic: &str, partition: i32) -> bool {
        if !self.active.load(Ordering::Relaxed) {
            return false;
        }
        self.loading.lock().is_ok_and(|m| {
            m.get(&partition)
                .is_some_and(|l| l.waiting.iter().any(|p| p.topic == topic))
        })
    }

    /// A record of `topic` partition `partition` was taken.
    pub fn saw(&self, topic: &str, partition: i32) {
        if !self.active.load(Ordering::Relaxed) || !self.is_side(topic) {
            return;
        }
        if let Ok(mut m) = self.loading.lock() {
            if let Some(l) = m.get_mut(&partition) {
                l.progress = Instant::now();
            }
        }
    }

    /// Resumes the pipeline partitions whose side partitions have loaded (or stalled).
    pub fn release<C: ConsumerContext, K: Consumer<C>>(&self, c: &K) {
        if !self.active.load(Ordering::Relaxed) {
            return;
        }
        let Ok(positions) = c.position() else {
            return;
        };
        let position = |p: &PartitionKey| match positions
            .find_partition(&p.topic, p.partition)
            .map(|e| e.offset())
        {
            Some(Offset::Offset(o)) => Some(o),
            _ => None,
        };
        let Ok(mut m) = self.loading.lock() else {
            return;
        };
        let now = Instant::now();
        let done: Vec<i32> = m
            .iter()
            .filter(|(_, l)| {
                loaded(
                    l.sides.iter().map(|(p, end)| (position(p), *end)),
                    now.duration_since(l.progress),
                )
            })
            .map(|(n, _)| *n)
            .collect();
        let mut resume = TopicPartitionList::new();
        for n in done {
            if let Some(l) = m.remove(&n) {
                for p in &l.waiting {
                    resume.add_partition(&p.topic, p.partition);
                }
                tracing::info!(
                    partition = n,
                    "side topics loaded; consuming the pipeline's partition"
                );
            }
        }
        self.active.store(!m.is_empty(), Ordering::Relaxed);
        drop(m);
        if resume.count() > 0 {
            if let Err(e) = c.resume(&resume) {
                tracing::warn!("resuming the pipeline's partitions after side topics loaded: {e}");
            }
        }
    }
}

/// Whether side partitions at these (position, end) have loaded: each position reached its
/// end, or none delivered a record for [`STALL`].
fn loaded(sides: impl Iterator<Item = (Option<i64>, i64)>, since_progress: Duration) -> bool {
    let mut all = true;
    for (position, end) in sides {
        all &= position.is_some_and(|p| p >= end);
    }
    all || since_progress >= STALL
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_waiting_pipeline_partitions_are_held() {
        let sf = SideFirst::new(&["users".to_string()], StartOffset::Earliest);
        assert!(!sf.holds("tx", 0));
        let pk = |t: &str| PartitionKey {
            topic: t.into(),
            partition: 0,
        };
        if let Ok(mut m) = sf.loading.lock() {
            m.insert(
                0,
                Loading {
                    sides: vec![(pk("users"), 10)],
                    waiting: vec![pk("tx")],
                    progress: Instant::now(),
                },
            );
        }
        sf.active.store(true, Ordering::Relaxed);
        assert!(sf.holds("tx", 0));
        assert!(!sf.holds("tx", 1));
        assert!(!sf.holds("users", 0));
        sf.revoked(&[pk("tx")]);
        assert!(!sf.holds("tx", 0));
    }

    #[test]
    fn a_number_loads_when_every_side_reached_its_end_or_the_sides_stall() {
        let fresh = Duration::from_millis(10);
        assert!(loaded([(Some(10), 10)].into_iter(), fresh));
        assert!(loaded([(Some(12), 10), (Some(5), 5)].into_iter(), fresh));
        assert!(!loaded([(Some(9), 10)].into_iter(), fresh));
        assert!(!loaded([(Some(10), 10), (None, 3)].into_iter(), fresh));
        // A side whose last offsets are transaction markers never shows a record there.
        assert!(loaded([(Some(9), 10)].into_iter(), STALL));
    }
}
