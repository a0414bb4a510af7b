//! The lookup join: the side topic is a changelog (latest value per key; a null or empty value
//! deletes the key), kept in state; each pipeline record is enriched with the current value of
//! its key when it is processed.
//!
//! State, per stage and partition number:
//! - `V` + key → the latest value (JSON);
//! - `I` + Kafka key → table key, only with `table_key` (so a tombstone, which has no fields,
//!   finds the row its Kafka key last wrote).

use std::collections::HashMap;

use bytes::Bytes;

use crate::record::Record;
use crate::stage::keyed::{
    key_from_bytes, key_of, not_json, or_dead_letter, parse_json, with_state, KeySpec, OutputShape,
    Reject,
};
use crate::stage::{BatchContext, Stage, StageError, StageOutput};
use crate::state::{StageState, StateError, StateTxn};

use super::config::{LookupJoinConfig, Unmatched};
use super::merge::{self, Fields, Merge, Parsed};

const VALUE: u8 = b'V';
const INDEX: u8 = b'I';

fn tagged(tag: u8, key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + key.len());
    k.push(tag);
    k.extend_from_slice(key);
    k
}

/// Key components as text, for messages.
fn show_key(key: &[u8]) -> String {
    let mut parts = Vec::new();
    let mut rest = key;
    while rest.len() >= 4 {
        let n = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        let end = (4 + n).min(rest.len());
        parts.push(String::from_utf8_lossy(&rest[4..end]).into_owned());
        rest = &rest[end..];
    }
    parts.join(", ")
}

fn is_tombstone(v: &[u8]) -> bool {
    let t = v.trim_ascii();
    t.is_empty() || t == b"null"
}

pub struct LookupJoinStage {
    name: String,
    cfg: LookupJoinConfig,
    spec: KeySpec,
    merge: Merge,
}

impl LookupJoinStage {
    /// `cfg` must have passed [`super::JoinConfig::check`].
    pub fn new(name: &str, cfg: &LookupJoinConfig) -> Result<Self, String> {
        Ok(Self {
            name: name.to_string(),
            spec: KeySpec::new(&cfg.key, None),
            merge: Merge::new(&cfg.shape()?),
            cfg: cfg.clone(),
        })
    }

    /// The record's fields (it must be a JSON object) and the state key of its table row.
    fn read(&self, r: &Record) -> Result<(Fields, Vec<u8>), Reject> {
        let Some(fields) = Fields::read(&r.value).map_err(not_json)? else {
            return Err(Reject::schema("value is not a JSON object"));
        };
        let (key, _) = self
            .spec
            .read_fields(r, |name| fields.get(&r.value, name))?;
        Ok((fields, tagged(VALUE, &key)))
    }

    /// `Ok(None)`: the record is dropped (unmatched, `unmatched: drop`).
    fn enrich(
        &self,
        r: &Record,
        fields: &Fields,
        row_key: &[u8],
        row: Option<merge::Side<'_>>,
    ) -> Result<Option<Record>, Reject> {
        if row.is_none() {
            match self.cfg.unmatched {
                Unmatched::Pass => {}
                Unmatched::Drop => return Ok(None),
                Unmatched::DeadLetter => {
                    return Err(Reject {
                        kind: "unmatched",
                        message: format!(
                            "no row with key {} in table topic {}",
                            show_key(&row_key[1..]),
                            self.cfg.table_topic
                        ),
                    })
                }
            }
        }
        let left = merge::Side {
            text: &r.value,
            fields: Some(fields),
        };
        let value = self.merge.merged(left, row).map_err(Reject::schema)?;
        Ok(Some(Record {
            value: Bytes::from(value),
            ..r.clone()
        }))
    }

    fn process_main(
        &self,
        batch: Vec<Record>,
        st: &StageState<'_, '_>,
    ) -> Result<StageOutput, StateError> {
        let mut out = StageOutput::default();
        let (mut matches, mut unmatched) = (0u64, 0u64);
        // All rows of the batch in one batched read, each parsed once however often it is used.
        let (mut objs, mut row_keys) = (Vec::new(), Vec::new());
        for r in &batch {
            let (obj, key) = or_dead_letter(self.read(r), &mut out, &self.name, r).unzip();
            objs.push(obj);
            row_keys.push(key);
        }
        let mut keys: Vec<&[u8]> = row_keys.iter().flatten().map(|k| &k[..]).collect();
        keys.sort_unstable();
        keys.dedup();
        let mut rows: HashMap<&[u8], Option<Parsed>> = HashMap::with_capacity(keys.len());
        for (k, v) in keys.iter().zip(st.get_many(&keys)?) {
            let row = match v {
                Some(b) => Some(Parsed::read(b).map_err(|_| StateError::Corrupt {
                    key: format!("{} table row", self.name),
                    message: "not JSON".into(),
                })?),
                None => None,
            };
            rows.insert(k, row);
        }
        for ((r, obj), key) in batch.iter().zip(objs).zip(&row_keys) {
            let (Some(obj), Some(key)) = (obj, key) else {
                continue;
            };
            let row = rows
                .get(&key[..])
                .and_then(Option::as_ref)
                .map(Parsed::side);
            match self.enrich(r, &obj, key, row) {
                Ok(Some(j)) => {
                    out.records.push(j);
                    if row.is_some() {
                        matches += 1;
                    } else {
                        unmatched += 1;
                    }
                }
                Ok(None) => unmatched += 1,
                Err(reject) => {
                    if reject.kind == "unmatched" {
                        unmatched += 1;
                    }
                    out.dead_letters
                        .push(reject.into_dead_letter(&self.name, r));
                }
            }
        }
        out.counters.push(("join_matches", matches));
        out.counters.push(("join_unmatched", unmatched));
        Ok(out)
    }
    /// The key of a changelog row (not a tombstone).
    fn row_key(&self, r: &Record, kafka_key: Option<&[u8]>) -> Result<Vec<u8>, Reject> {
        let v = parse_json(r)?;
        if matches!(self.merge.shape(), OutputShape::Prefix { .. }) && !v.is_object() {
            return Err(Reject::schema(
                "value is not a JSON object (needed by `prefix`)",
            ));
        }
        match (&self.cfg.table_key, kafka_key) {
            (Some(p), _) => key_of(&v, p),
            (None, Some(kk)) => Ok(key_from_bytes(kk)),
            (None, None) => Err(Reject::schema(
                "the table is keyed by the Kafka message key, and this record has none (or set table_key)",
            )),
        }
    }

    fn process_changelog(
        &self,
        batch: Vec<Record>,
        st: &mut StageState<'_, '_>,
    ) -> Result<StageOutput, StateError> {
        let mut out = StageOutput::default();
        let (mut upserts, mut deletes) = (0u64, 0u64);
        for r in &batch {
            let kafka_key = r.key.as_deref().or(r.origin.key.as_deref());
            if is_tombstone(&r.value) {
                let missing =
                    Reject::schema("a tombstone (null value) without a Kafka key deletes nothing");
                let Some(kk) = or_dead_letter(kafka_key.ok_or(missing), &mut out, &self.name, r)
                else {
                    continue;
                };
                match self.cfg.table_key {
                    None => st.delete(&tagged(VALUE, &key_from_bytes(kk))),
                    Some(_) => {
                        let ik = tagged(INDEX, kk);
                        if let Some(tk) = st.get(&ik)? {
                            st.delete(&tagged(VALUE, &tk));
                        }
                        st.delete(&ik);
                    }
                }
                deletes += 1;
                continue;
            }
            let Some(key) = or_dead_letter(self.row_key(r, kafka_key), &mut out, &self.name, r)
            else {
                continue;
            };
            if let (Some(_), Some(kk)) = (&self.cfg.table_key, kafka_key) {
                // The Kafka key now names another row: its old row is superseded.
                let ik = tagged(INDEX, kk);
                if let Some(old) = st.get(&ik)? {
                    if old != key {
                        st.delete(&tagged(VALUE, &old));
                    }
                }
                st.put(&ik, &key);
            }
            st.put(&tagged(VALUE, &key), &r.value);
            upserts += 1;
        }
        out.counters.push(("table_upserts", upserts));
        out.counters.push(("table_deletes", deletes));
        Ok(out)
    }
}

impl Stage for LookupJoinStage {
    fn name(&self) -> &str {
        &self.name
    }

    fn side_topics(&self) -> Vec<String> {
        vec![self.cfg.table_topic.clone()]
    }

    fn process(
        &mut self,
        batch: Vec<Record>,
        ctx: &BatchContext,
        state: &mut StateTxn<'_>,
    ) -> Result<StageOutput, StageError> {
        with_state(state, &self.name, ctx, |st| self.process_main(batch, st))
    }

    fn process_side(
        &mut self,
        batch: Vec<Record>,
        ctx: &BatchContext,
        state: &mut StateTxn<'_>,
    ) -> Result<StageOutput, StageError> {
        with_state(state, &self.name, ctx, |st| {
            self.process_changelog(batch, st)
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::sync::Arc;

    use serde_json::{json, Value};

    use super::*;
    use crate::record::Origin;
    use crate::stage::dedup::tests::{counter, record, run_batch};
    use crate::stage::join::JoinConfig;
    use crate::state::StateStore;

    fn stage(extra: &str) -> LookupJoinStage {
        let cfg: JoinConfig =
            serde_yaml_ng::from_str(&format!("kind: lookup\ntable_topic: users\n{extra}")).unwrap();
        cfg.check(&["tx".into()], "dlq").unwrap();
        let JoinConfig::Lookup(c) = cfg else { panic!() };
        LookupJoinStage::new("lookup", &c).unwrap()
    }

    /// A changelog record: Kafka key and value (`None`: a tombstone with a null value).
    fn row(off: i64, key: &str, value: Option<Value>) -> Record {
        let mut r = record("users", 0, off, value.unwrap_or(Value::Null));
        let mut o = (*r.origin).clone();
        o.key = Some(Bytes::from(key.to_string()));
        r.origin = Arc::new(o);
        r.key = Some(Bytes::from(key.to_string()));
        r
    }

    fn tx(off: i64, user: Value) -> Record {
        record(
            "tx",
            0,
            off,
            json!({"id": format!("t{off}"), "user_id": user}),
        )
    }

    fn values(out: &StageOutput) -> Vec<Value> {
        out.records
            .iter()
            .map(|r| serde_json::from_slice(&r.value).unwrap())
            .collect()
    }

    #[test]
    fn enriches_with_the_latest_value_and_tombstones_delete() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path()).unwrap();
        let mut s = stage("key: /user_id\nnest: user\n");
        let out = run_batch(
            &store,
            &mut s,
            true,
            vec![
                row(0, "1", Some(json!({"name": "ann"}))),
                row(1, "2", Some(json!({"name": "bob"}))),
                row(2, "1", Some(json!({"name": "ann v2"}))),
            ],
        );
        assert!(out.records.is_empty());
        assert_eq!(counter(&out, "table_upserts"), 3);
        // Numbers and Kafka key text compare equal.
        let out = run_batch(
            &store,
            &mut s,
            false,
            vec![tx(0, json!(1)), tx(1, json!("2")), tx(2, json!(3))],
        );
        let v = values(&out);
        assert_eq!(v[0]["user"], json!({"name": "ann v2"}));
        assert_eq!(v[1]["user"]["name"], "bob");
        assert_eq!(v[2]["user"], Value::Null);
        assert_eq!(counter(&out, "join_matches"), 2);
        assert_eq!(counter(&out, "join_unmatched"), 1);
        assert_eq!(out.records[0].origin.topic.as_ref(), "tx");
        // Tombstones: a null payload and a JSON null.
        let mut empty = row(3, "2", None);
        empty.value = Bytes::new();
        let out = run_batch(
            &store,
            &mut s,
            true,
            vec![row(4, "1", Some(Value::Null)), empty],
        );
        assert_eq!(counter(&out, "table_deletes"), 2);
        let out = run_batch(
            &store,
            &mut s,
            false,
            vec![tx(3, json!(1)), tx(4, json!(2))],
        );
        assert!(values(&out).iter().all(|v| v["user"].is_null()));
        // A key comes back after its tombstone.
        run_batch(
            &store,
            &mut s,
            true,
            vec![row(5, "1", Some(json!({"name": "ann v3"})))],
        );
        let out = run_batch(&store, &mut s, false, vec![tx(5, json!(1))]);
        assert_eq!(values(&out)[0]["user"]["name"], "ann v3");
    }

    #[test]
    fn unmatched_policies() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path()).unwrap();
        let mut drop = stage("key: /user_id\nprefix: u_\nfields: [name]\nunmatched: drop\n");
        let mut dl = stage("key: /user_id\nprefix: u_\nunmatched: dead_letter\n");
        let mut pass = stage("key: /user_id\nprefix: u_\nfields: [name, country]\n");
        let out = run_batch(&store, &mut drop, false, vec![tx(0, json!(7))]);
        assert!(out.records.is_empty() && out.dead_letters.is_empty());
        assert_eq!(counter(&out, "join_unmatched"), 1);
        let out = run_batch(
            &store,
            &mut dl,
            false,
            vec![tx(0, json!(7)), tx(1, json!({"a": 1}))],
        );
        assert_eq!(out.dead_letters.len(), 2);
        assert_eq!(out.dead_letters[0].kind, "unmatched");
        assert_eq!(
            out.dead_letters[0].message,
            "no row with key 7 in table topic users"
        );
        let out = run_batch(&store, &mut pass, false, vec![tx(0, json!(7))]);
        assert_eq!(
            values(&out)[0],
            json!({"id": "t0", "user_id": 7, "u_name": null, "u_country": null})
        );
        // Missing key field: dead-lettered whatever the policy.
        let out = run_batch(
            &store,
            &mut pass,
            false,
            vec![record("tx", 0, 9, json!({"id": "x"}))],
        );
        assert_eq!(out.dead_letters[0].kind, "schema");
        assert_eq!(out.dead_letters[0].message, "key field /user_id is missing");
    }

    #[test]
    fn table_key_from_fields_with_tombstones_by_kafka_key() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path()).unwrap();
        let mut s = stage("key: [/region, /user_id]\ntable_key: [/r, /uid]\nnest: user\n");
        run_batch(
            &store,
            &mut s,
            true,
            vec![
                row(0, "k1", Some(json!({"r": "eu", "uid": 1, "name": "ann"}))),
                row(1, "k2", Some(json!({"r": "us", "uid": 1, "name": "al"}))),
                // k2 moves to another composite key: its old row goes.
                row(2, "k2", Some(json!({"r": "us", "uid": 2, "name": "al"}))),
            ],
        );
        let q = |off, r: &str, u: i64| {
            record("tx", 0, off, json!({"id": off, "region": r, "user_id": u}))
        };
        let out = run_batch(
            &store,
            &mut s,
            false,
            vec![q(0, "eu", 1), q(1, "us", 1), q(2, "us", 2)],
        );
        let v = values(&out);
        assert_eq!(v[0]["user"]["name"], "ann");
        assert!(v[1]["user"].is_null());
        assert_eq!(v[2]["user"]["name"], "al");
        run_batch(&store, &mut s, true, vec![row(3, "k1", None)]);
        let out = run_batch(&store, &mut s, false, vec![q(3, "eu", 1)]);
        assert!(values(&out)[0]["user"].is_null());
    }

    #[test]
    fn tombstone_without_key_is_dead_lettered() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path()).unwrap();
        let mut s = stage("key: /user_id\nnest: user\n");
        let r = record("users", 0, 0, Value::Null);
        let o = Origin {
            ..(*r.origin).clone()
        };
        assert!(o.key.is_none());
        let out = run_batch(&store, &mut s, true, vec![r]);
        assert_eq!(out.dead_letters.len(), 1);
        assert!(out.dead_letters[0].message.contains("without a Kafka key"));
    }
}
