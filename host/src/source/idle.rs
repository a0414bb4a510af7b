//! Spotting a broker that answers fetches at the log end at once.
//!
//! Apache Kafka holds a fetch that finds no new data for up to `fetch.wait.max.ms` (long
//! polling), so a caught-up consumer sends a couple of fetches per second. Some
//! Kafka-protocol brokers (noida-db, which the tests use, is one) answer it at once, empty,
//! and librdkafka — which never backs off at the end of a partition — fetches again at once:
//! thousands of requests per second, over half a core on each side while nothing happens.
//! The consumer sees it in librdkafka's statistics (Fetch requests per second per broker);
//! once seen, a governor thread pauses fetching of caught-up partitions between short checks
//! ([`spawn_governor`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use rdkafka::consumer::Consumer;
use rdkafka::{Offset, TopicPartitionList};
use serde::Deserialize;

use super::kafka::SluiceConsumer;
use super::side_first::SideFirst;

/// Fetch requests per second to one broker above which it is taken not to hold fetches.
/// A long-polling broker sees ~2 per second from an idle consumer; a busy one sees one per
/// response carrying data, which rarely reaches this from one consumer.
pub const SPIN_FETCHES_PER_S: f64 = 1000.0;

/// The part of librdkafka's statistics this reads: Fetch requests sent per broker.
#[derive(Deserialize)]
struct Stats {
    #[serde(default)]
    brokers: HashMap<String, BrokerStats>,
}

#[derive(Deserialize)]
struct BrokerStats {
    #[serde(default)]
    req: HashMap<String, i64>,
}

/// Watches the statistics for a fetch spin. Sticky: the broker does not change its mind.
#[derive(Debug, Default)]
pub struct FetchSpin {
    detected: AtomicBool,
    /// When the previous statistics came, with each broker's Fetch request count then.
    last: Mutex<Option<(Instant, HashMap<String, i64>)>>,
}

impl FetchSpin {
    /// For a client created at `created`: its first statistics already count from there (a
    /// spin shows within the first interval, not the second).
    pub fn starting_at(created: Instant) -> Self {
        Self {
            detected: AtomicBool::new(false),
            last: Mutex::new(Some((created, HashMap::new()))),
        }
    }

    pub fn detected(&self) -> bool {
        self.detected.load(Ordering::Relaxed)
    }

    /// Feeds one statistics document (librdkafka's JSON); returns the rate that triggered
    /// detection, the first time it does.
    pub fn observe(&self, json: &[u8], now: Instant) -> Option<f64> {
        if self.detected() {
            return None;
        }
        let stats: Stats = serde_json::from_slice(json).ok()?;
        let counts: HashMap<String, i64> = stats
            .brokers
            .into_iter()
            .filter_map(|(name, b)| b.req.get("Fetch").map(|n| (name, *n)))
            .collect();
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        let previous = last.replace((now, counts.clone()));
        let (then, before) = previous?;
        let secs = now.duration_since(then).as_secs_f64();
        if secs <= 0.0 {
            return None;
        }
        let rate = counts
            .iter()
            // A broker not seen before counts from zero (a new client, or a new connection).
            .map(|(name, n)| (n - before.get(name).copied().unwrap_or(0)) as f64 / secs)
            .fold(0.0, f64::max);
        if rate >= SPIN_FETCHES_PER_S {
            self.detected.store(true, Ordering::Relaxed);
            return Some(rate);
        }
        None
    }
}

/// Whether a partition has nothing left to fetch: the application's position (`None`: nothing
/// consumed yet in this session) has reached the high watermark librdkafka last saw. Unknown
/// watermarks (`None`) count as "maybe more", so a doubt never pauses a partition.
pub fn caught_up(position: Option<i64>, low: Option<i64>, high: Option<i64>) -> bool {
    match (position, low, high) {
        (Some(p), _, Some(h)) => p >= h,
        // Nothing consumed yet: only an empty partition is known to be at its end.
        (None, Some(l), Some(h)) => h == l,
        _ => false,
    }
}

/// How often the governor looks for caught-up partitions while records flow.
const CHECK_EVERY: Duration = Duration::from_millis(5);

/// How long the governor waits for end offsets (it holds the consumer meanwhile). A broker
/// slower than that to answer leaves the partitions fetching until the next look.
const END_OFFSETS_TIMEOUT: Duration = Duration::from_millis(250);

/// Starts the thread that, once `spin` is detected, keeps caught-up partitions paused except
/// for one look every `pause`: resume, ask the leaders for the end offsets, pause again if
/// nothing came. Records then wait at most `pause` (plus a round trip) before fetching starts.
///
/// A thread of its own rather than part of the engine's loop: every call here blocks on
/// librdkafka, and a resume must always be followed by the request, which the loop's
/// cancelled futures could not promise. The request matters beyond its answer: a resume
/// alone does not wake librdkafka's broker thread, which would then fetch only at its next
/// 1-second tick; a request to the partition's leader does. Pausing is safe at any moment:
/// librdkafka drops what it fetched but did not hand out and fetches again from the
/// application's position on resume. The thread ends with the consumer.
///
/// Partitions that `held` keeps paused (side topics loading first) are left alone: resuming
/// them here would let the pipeline's records go before the side's.
pub fn spawn_governor(
    consumer: Weak<SluiceConsumer>,
    spin: Arc<FetchSpin>,
    pause: Duration,
    held: Arc<SideFirst>,
) {
    // The consumer is borrowed for one step at a time, never across a sleep: when the engine
    // drops its source (a stop, or a restart after the group moved on), the consumer must
    // close then, not when this thread lets go (a static member still open would hold up
    // its successor's join).
    let with = move |f: &mut dyn FnMut(&SluiceConsumer)| match consumer.upgrade() {
        Some(c) => {
            f(&c);
            true
        }
        None => false,
    };
    let run = move || {
        loop {
            let detected = spin.detected();
            std::thread::sleep(if detected {
                CHECK_EVERY
            } else {
                Duration::from_millis(200)
            });
            let mut idle = TopicPartitionList::new();
            if !with(&mut |c| {
                if detected {
                    idle = without_held(caught_up_partitions(c, None), &held);
                }
            }) {
                return;
            }
            while idle.count() > 0 {
                let paused = with(&mut |c| {
                    if let Err(e) = c.pause(&idle) {
                        tracing::debug!("pausing caught-up partitions: {e}");
                    }
                });
                if !paused {
                    return;
                }
                std::thread::sleep(pause);
                let mut still_idle = TopicPartitionList::new();
                let alive = with(&mut |c| {
                    // Fails only for partitions no longer assigned, which need no resume.
                    if let Err(e) = c.resume(&idle) {
                        tracing::debug!("resuming caught-up partitions: {e}");
                    }
                    let mut query = idle.clone();
                    if query.set_all_offsets(Offset::End).is_ok() {
                        // New records in some (they fetch now), or no answer: look again
                        // later; still nothing new: pause again at once.
                        if let Ok(ends) = c.offsets_for_times(query, END_OFFSETS_TIMEOUT) {
                            still_idle = without_held(caught_up_partitions(c, Some(&ends)), &held);
                        }
                    }
                });
                if !alive {
                    return;
                }
                idle = still_idle;
            }
        }
    };
    if let Err(e) = std::thread::Builder::new()
        .name("sluice-fetch-idle".into())
        .spawn(run)
    {
        tracing::warn!(
            "cannot start the idle fetch governor ({e}): caught-up partitions keep fetching"
        );
    }
}

/// `parts` without those side-first holds paused.
fn without_held(parts: TopicPartitionList, held: &SideFirst) -> TopicPartitionList {
    let mut out = TopicPartitionList::new();
    for e in parts.elements() {
        if !held.holds(e.topic(), e.partition()) {
            out.add_partition(e.topic(), e.partition());
        }
    }
    out
}

/// Assigned partitions whose application position has reached their end: the end offset in
/// `ends` if given (partitions missing from it are left out), else the high watermark
/// librdkafka last saw (a cached value: no request to the broker).
fn caught_up_partitions(
    consumer: &SluiceConsumer,
    ends: Option<&TopicPartitionList>,
) -> TopicPartitionList {
    let mut idle = TopicPartitionList::new();
    let Ok(positions) = consumer.position() else {
        return idle;
    };
    let offset = |o: Offset| match o {
        Offset::Offset(o) => Some(o),
        _ => None,
    };
    for e in positions.elements() {
        let (low, cached_high) = cached_watermarks(consumer, e.topic(), e.partition());
        let high = match ends {
            None => cached_high,
            Some(ends) => match ends.find_partition(e.topic(), e.partition()) {
                Some(end) if end.error().is_ok() => offset(end.offset()),
                _ => continue,
            },
        };
        if caught_up(offset(e.offset()), low, high) {
            idle.add_partition(e.topic(), e.partition());
        }
    }
    idle
}

/// The low and high watermarks librdkafka last saw for a partition (`None`: not known yet).
/// The high one comes with every fetch response, even one dropped after a pause.
fn cached_watermarks(
    consumer: &SluiceConsumer,
    topic: &str,
    partition: i32,
) -> (Option<i64>, Option<i64>) {
    let Ok(topic) = std::ffi::CString::new(topic) else {
        return (None, None);
    };
    let (mut low, mut high) = (-1i64, -1i64);
    // rdkafka has no safe wrapper for the cached offsets (`fetch_watermarks` asks the broker).
    // SAFETY: the client pointer is valid while `consumer` lives; the call reads two offsets
    // under librdkafka's own lock into the two locals, and runs no callbacks.
    #[allow(unsafe_code)]
    let err = unsafe {
        rdkafka::bindings::rd_kafka_get_watermark_offsets(
            consumer.client().native_ptr(),
            topic.as_ptr(),
            partition,
            &mut low,
            &mut high,
        )
    };
    if err != rdkafka::bindings::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR {
        return (None, None);
    }
    let known = |o: i64| (o >= 0).then_some(o);
    (known(low), known(high))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn stats(fetches: i64) -> Vec<u8> {
        format!(
            r#"{{"name":"c","brokers":{{"127.0.0.1:9092/1":{{"state":"UP","req":{{"Fetch":{fetches},"Heartbeat":3}}}},
            "GroupCoordinator":{{"req":{{}}}}}},"topics":{{}}}}"#
        )
        .into_bytes()
    }

    #[test]
    fn a_long_polling_broker_is_not_taken_for_a_spinning_one() {
        let spin = FetchSpin::default();
        let t0 = Instant::now();
        assert_eq!(spin.observe(&stats(10), t0), None);
        // A busy consumer: 800 fetches in a second, each carrying data.
        assert_eq!(spin.observe(&stats(810), t0 + Duration::from_secs(1)), None);
        assert_eq!(spin.observe(&stats(812), t0 + Duration::from_secs(2)), None);
        assert!(!spin.detected());
    }

    #[test]
    fn thousands_of_fetches_per_second_are_a_spin_and_it_sticks() {
        let spin = FetchSpin::default();
        let t0 = Instant::now();
        assert_eq!(spin.observe(&stats(100), t0), None);
        let rate = spin.observe(&stats(6100), t0 + Duration::from_secs(2));
        assert_eq!(rate, Some(3000.0));
        assert!(spin.detected());
        // Once paused, the rate falls; the verdict stays.
        assert_eq!(
            spin.observe(&stats(6110), t0 + Duration::from_secs(3)),
            None
        );
        assert!(spin.detected());
    }

    #[test]
    fn a_new_client_is_judged_on_its_first_statistics() {
        let t0 = Instant::now();
        let spin = FetchSpin::starting_at(t0);
        assert_eq!(
            spin.observe(&stats(20_000), t0 + Duration::from_secs(1)),
            Some(20_000.0)
        );
        let calm = FetchSpin::starting_at(t0);
        assert_eq!(calm.observe(&stats(3), t0 + Duration::from_secs(1)), None);
        assert!(!calm.detected());
    }

    #[test]
    fn unreadable_statistics_change_nothing() {
        let spin = FetchSpin::default();
        let t0 = Instant::now();
        assert_eq!(spin.observe(b"not json", t0), None);
        assert_eq!(spin.observe(b"{}", t0 + Duration::from_secs(1)), None);
        assert!(!spin.detected());
    }

    #[test]
    fn only_a_partition_known_to_be_at_its_end_is_caught_up() {
        assert!(caught_up(Some(100), Some(0), Some(100)));
        assert!(!caught_up(Some(99), Some(0), Some(100)));
        assert!(!caught_up(Some(100), Some(0), None));
        assert!(caught_up(None, Some(7), Some(7)));
        assert!(!caught_up(None, Some(0), Some(7)));
        assert!(!caught_up(None, None, None));
    }
}
