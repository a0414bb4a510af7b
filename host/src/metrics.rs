//! Prometheus metrics of the process, served at `/metrics`. One registry for all pipelines;
//! every series carries a `pipeline` label. Names and labels are what
//! `deploy/grafana/sluice-dashboard.json` queries: change them together.

use std::sync::LazyLock;

use prometheus::{
    exponential_buckets, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

pub struct Metrics {
    pub registry: Registry,
    pub consumed: IntCounterVec,
    pub rows_inserted: IntCounterVec,
    pub batches: IntCounterVec,
    pub batch_records: HistogramVec,
    pub stage_seconds: HistogramVec,
    pub insert_seconds: HistogramVec,
    pub end_to_end_seconds: HistogramVec,
    pub dead_letters: IntCounterVec,
    pub stage_events: IntCounterVec,
    pub lag: IntGaugeVec,
    pub pipeline_state: IntGaugeVec,
    pub swaps: IntCounterVec,
    pub insert_retries: IntCounterVec,
}

/// Registration only fails for duplicate or malformed names, which are constants here.
fn reg<T: prometheus::core::Collector + Clone + 'static>(r: &Registry, m: T) -> T {
    if let Err(e) = r.register(Box::new(m.clone())) {
        tracing::error!("metric registration failed: {e}");
    }
    m
}

fn counter(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    // The names are constants: an error here is a programming mistake caught by the tests.
    let m = IntCounterVec::new(Opts::new(name, help), labels).unwrap_or_else(|e| {
        panic!("metric {name}: {e}");
    });
    reg(r, m)
}

fn histogram(
    r: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
    buckets: Vec<f64>,
) -> HistogramVec {
    let m = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels)
        .unwrap_or_else(|e| panic!("metric {name}: {e}"));
    reg(r, m)
}

fn gauge(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let m = IntGaugeVec::new(Opts::new(name, help), labels)
        .unwrap_or_else(|e| panic!("metric {name}: {e}"));
    reg(r, m)
}

/// 1 ms .. ~65 s.
fn seconds_buckets() -> Vec<f64> {
    exponential_buckets(0.001, 2.0, 17).unwrap_or_default()
}

pub static METRICS: LazyLock<Metrics> = LazyLock::new(|| {
    let r = Registry::new();
    Metrics {
        consumed: counter(&r, "sluice_records_consumed_total", "Records read from Kafka (pipeline and side topics).", &["pipeline", "topic"]),
        rows_inserted: counter(&r, "sluice_rows_inserted_total", "Rows acknowledged by ClickHouse.", &["pipeline", "table"]),
        batches: counter(&r, "sluice_batches_total", "Batches completed (inserted, dead letters sent, offsets committed).", &["pipeline"]),
        batch_records: histogram(&r, "sluice_batch_records", "Records per batch entering the stages.", &["pipeline"], exponential_buckets(1.0, 4.0, 10).unwrap_or_default()),
        stage_seconds: histogram(&r, "sluice_stage_seconds", "Time a stage took for one batch.", &["pipeline", "stage"], seconds_buckets()),
        insert_seconds: histogram(&r, "sluice_insert_seconds", "ClickHouse insert time per table and batch, retries included.", &["pipeline", "table"], seconds_buckets()),
        end_to_end_seconds: histogram(&r, "sluice_end_to_end_seconds", "Kafka record timestamp to ClickHouse acknowledgement of its batch.", &["pipeline"], seconds_buckets()),
        dead_letters: counter(&r, "sluice_dead_letters_total", "Records sent to the dead-letter topic.", &["pipeline", "stage", "kind"]),
        stage_events: counter(&r, "sluice_stage_events_total", "Stage counters: dedup duplicates, join matches, plugin failures (traps, timeouts, limits), ...", &["pipeline", "stage", "event"]),
        lag: gauge(&r, "sluice_consumer_lag", "Records between the committed offset and the end of the partition.", &["pipeline", "topic", "partition"]),
        pipeline_state: gauge(&r, "sluice_pipeline_state", "1 for the pipeline's current state (starting, running, paused, failed, stopped).", &["pipeline", "state"]),
        swaps: counter(&r, "sluice_plugin_swaps_total", "Plugin hot-swaps and rollbacks applied.", &["pipeline", "stage", "kind"]),
        insert_retries: counter(&r, "sluice_insert_retries_total", "ClickHouse inserts retried after a retryable error.", &["pipeline", "table"]),
        registry: r,
    }
});

/// The text exposition format of every registered metric.
pub fn render() -> String {
    TextEncoder::new()
        .encode_to_string(&METRICS.registry.gather())
        .unwrap_or_else(|e| format!("# encoding metrics failed: {e}\n"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn metrics_register_and_render() {
        super::METRICS
            .consumed
            .with_label_values(&["p", "t"])
            .inc_by(3);
        let text = super::render();
        assert!(text.contains("sluice_records_consumed_total{pipeline=\"p\",topic=\"t\"} 3"));
    }

    /// Every series the Grafana dashboard queries is one this process exports.
    #[test]
    fn dashboard_queries_exported_metrics() {
        let dashboard = include_str!("../../deploy/grafana/sluice-dashboard.json");
        let m = &super::METRICS;
        // Vec families are exported once they have a series: give each one.
        m.consumed.with_label_values(&["t", "t"]).inc();
        m.rows_inserted.with_label_values(&["t", "t"]).inc();
        m.batches.with_label_values(&["t"]).inc();
        m.batch_records.with_label_values(&["t"]).observe(1.0);
        m.stage_seconds.with_label_values(&["t", "t"]).observe(1.0);
        m.insert_seconds.with_label_values(&["t", "t"]).observe(1.0);
        m.end_to_end_seconds.with_label_values(&["t"]).observe(1.0);
        m.dead_letters.with_label_values(&["t", "t", "t"]).inc();
        m.stage_events.with_label_values(&["t", "t", "t"]).inc();
        m.lag.with_label_values(&["t", "t", "0"]).set(1);
        m.pipeline_state.with_label_values(&["t", "running"]).set(1);
        m.swaps.with_label_values(&["t", "t", "swap"]).inc();
        m.insert_retries.with_label_values(&["t", "t"]).inc();
        let known = [
            "sluice_records_consumed_total",
            "sluice_rows_inserted_total",
            "sluice_batches_total",
            "sluice_batch_records",
            "sluice_stage_seconds",
            "sluice_insert_seconds",
            "sluice_end_to_end_seconds",
            "sluice_dead_letters_total",
            "sluice_stage_events_total",
            "sluice_consumer_lag",
            "sluice_pipeline_state",
            "sluice_plugin_swaps_total",
            "sluice_insert_retries_total",
        ];
        let mut used = 0;
        for word in dashboard.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
            if let Some(name) = word.strip_prefix("sluice_") {
                let base = format!("sluice_{name}");
                let base = base.strip_suffix("_bucket").unwrap_or(&base);
                if base == "sluice_overview" {
                    continue;
                }
                assert!(
                    known.contains(&base),
                    "dashboard queries unknown metric {base}"
                );
                used += 1;
            }
        }
        assert!(used >= 10);
        let text = super::render();
        for k in known {
            assert!(
                text.contains(&format!("# HELP {k} ")),
                "{k} is not registered"
            );
        }
    }
}
