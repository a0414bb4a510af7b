//! Shadow runs: a candidate plugin version processes the same records as the live one, its
//! output is compared and discarded. The report says what would change if it were promoted.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use super::bindings::{BatchResult, InputRecordRef};
use super::runtime::{LoadedPlugin, PluginInstance};
use crate::plugin_store::PluginRef;

/// Samples of differing records kept in a report.
const MAX_SAMPLES: usize = 5;

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct ShadowReport {
    pub live: PluginRef,
    pub candidate: PluginRef,
    pub started_at_ms: i64,
    pub batches: u64,
    pub records: u64,
    pub rows_live: u64,
    pub rows_candidate: u64,
    /// Records for which both versions produced the same rows (or the same error kind).
    pub records_same: u64,
    /// Records whose rows or outcome differ.
    pub records_changed: u64,
    /// Per-record errors each version returned.
    pub errors_live: u64,
    pub errors_candidate: u64,
    /// Calls of the candidate that trapped, timed out or hit a limit.
    pub candidate_failures: u64,
    /// Top-level fields of changed rows: present only in the candidate's row, only in the
    /// live row, or in both with another value; counted per row.
    pub fields_added: BTreeMap<String, u64>,
    pub fields_removed: BTreeMap<String, u64>,
    pub fields_changed: BTreeMap<String, u64>,
    /// Time spent in each version's calls.
    pub live_ms: f64,
    pub candidate_ms: f64,
    pub samples: Vec<ShadowSample>,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct ShadowSample {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub live: Vec<String>,
    pub candidate: Vec<String>,
}

pub(super) struct ShadowRun {
    pub candidate: Arc<LoadedPlugin>,
    pub instance: Option<PluginInstance>,
    pub report: ShadowReport,
}

/// What one version did with one input record.
#[derive(PartialEq)]
enum Outcome<'a> {
    Rows(Vec<(&'a Option<String>, &'a [u8])>),
    Error(&'a str),
}

fn outcomes(result: &BatchResult, n: usize) -> Vec<Outcome<'_>> {
    let mut out: Vec<Outcome<'_>> = (0..n).map(|_| Outcome::Rows(Vec::new())).collect();
    for e in &result.errors {
        if let Some(o) = out.get_mut(e.input as usize) {
            *o = Outcome::Error(e.kind.as_str());
        }
    }
    for o in &result.outputs {
        if let Some(Outcome::Rows(rows)) = out.get_mut(o.input as usize) {
            rows.push((&o.table, o.value.as_slice()));
        }
    }
    out
}

fn describe(o: &Outcome<'_>) -> Vec<String> {
    match o {
        Outcome::Error(kind) => vec![format!("error: {kind}")],
        Outcome::Rows(rows) => rows
            .iter()
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
            .collect(),
    }
}

impl ShadowRun {
    /// Adds one call's comparison. `candidate` is `None` when the candidate failed the call.
    pub fn observe(
        &mut self,
        inputs: &[InputRecordRef<'_>],
        live: &BatchResult,
        live_time: Duration,
        candidate: Option<&BatchResult>,
        candidate_time: Duration,
    ) {
        let r = &mut self.report;
        r.batches += 1;
        r.records += inputs.len() as u64;
        r.live_ms += live_time.as_secs_f64() * 1e3;
        r.candidate_ms += candidate_time.as_secs_f64() * 1e3;
        r.rows_live += live.outputs.len() as u64;
        r.errors_live += live.errors.len() as u64;
        let Some(candidate) = candidate else {
            r.candidate_failures += 1;
            r.records_changed += inputs.len() as u64;
            return;
        };
        r.rows_candidate += candidate.outputs.len() as u64;
        r.errors_candidate += candidate.errors.len() as u64;
        let (a, b) = (
            outcomes(live, inputs.len()),
            outcomes(candidate, inputs.len()),
        );
        for (i, (l, c)) in a.iter().zip(b.iter()).enumerate() {
            if l == c {
                r.records_same += 1;
                continue;
            }
            r.records_changed += 1;
            if let (Outcome::Rows(lr), Outcome::Rows(cr)) = (l, c) {
                for ((_, lv), (_, cv)) in lr.iter().zip(cr.iter()) {
                    field_diff(lv, cv, r);
                }
            }
            if r.samples.len() < MAX_SAMPLES {
                let src = &inputs[i].source;
                r.samples.push(ShadowSample {
                    topic: src.topic.to_string(),
                    partition: src.partition,
                    offset: src.offset,
                    live: describe(l),
                    candidate: describe(c),
                });
            }
        }
    }
}

/// Counts top-level fields that differ between two JSON object rows.
fn field_diff(live: &[u8], candidate: &[u8], r: &mut ShadowReport) {
    type Obj = serde_json::Map<String, serde_json::Value>;
    let (Ok(l), Ok(c)) = (
        serde_json::from_slice::<Obj>(live),
        serde_json::from_slice::<Obj>(candidate),
    ) else {
        return;
    };
    for (k, v) in &c {
        match l.get(k) {
            None => *r.fields_added.entry(k.clone()).or_default() += 1,
            Some(lv) if lv != v => *r.fields_changed.entry(k.clone()).or_default() += 1,
            Some(_) => {}
        }
    }
    for k in l.keys().filter(|k| !c.contains_key(*k)) {
        *r.fields_removed.entry(k.clone()).or_default() += 1;
    }
}
