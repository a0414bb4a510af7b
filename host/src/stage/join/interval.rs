//! The interval join: a left record (the pipeline's) and a right record (the side topic's) with
//! equal keys pair when `left.ts - before <= right.ts <= left.ts + after`.
//!
//! Both sides are buffered in state, by key and time for matching and in time indexes for
//! expiry. A pair is emitted when the later of its two records arrives, so each pair is emitted
//! exactly once.
//!
//! Each side has a watermark: the largest event time seen on it. A record more than
//! `allowed_lateness` behind its own side's watermark is dead-lettered as `late`; every other
//! record is at least `watermark - allowed_lateness` of its side. That bounds what can still
//! pair: a buffered right is dropped once `right.ts + before` falls below the *left*
//! watermark minus the lateness, a buffered left once `left.ts + after` falls below the
//! *right* one, and a left that never paired is then emitted with the right side null
//! (`left_outer`). Whether a record is late depends only on its own side, and nothing is
//! dropped while a partner that is not late could still arrive, so the emitted rows do not
//! depend on how the engine interleaves left and right batches.
//!
//! A record that arrives already past that point (the other side's watermark far ahead, as
//! when a side topic's backlog is read before the pipeline topic's) pairs with what is
//! buffered and is emitted or dropped at once: buffering it would only write state that the
//! same call's sweep deletes again.
//!
//! State, per stage and partition number:
//! - `L` + key + time + position → the left record (see [`super::codec`]);
//! - `R` + key + time + position → the right record's JSON;
//! - `X` + time + key + position → matched flag (the left expiry index);
//! - `Y` + time + key + position → nothing (the right expiry index);
//! - `WL`, `WR` → the largest event time seen on each side; `CX`, `CY` → sweep cursors.

use std::collections::HashMap;

use bytes::Bytes;

use crate::record::Record;
use crate::stage::keyed::{
    get_i64, not_json, or_dead_letter, put_i64, ts_bytes, ts_from_bytes, with_state,
    EventTimeConfig, IndexEntry, KeySpec, OutputShape, Reject, Sweeper, TimeSource,
};
use crate::stage::{BatchContext, Stage, StageError, StageOutput};
use crate::state::{StageState, StateError, StateTxn};

use super::codec;
use super::config::{IntervalJoinConfig, JoinMode};
use super::merge::{self, Fields, Merge};

/// The two inputs of the join. State tags, watermark and cursor keys per side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Left = 0,
    Right = 1,
}

impl Side {
    const BOTH: [Side; 2] = [Side::Left, Side::Right];

    fn name(self) -> &'static str {
        match self {
            Side::Left => "left",
            Side::Right => "right",
        }
    }

    fn other(self) -> Side {
        match self {
            Side::Left => Side::Right,
            Side::Right => Side::Left,
        }
    }

    /// `tag` + key + time + position → the buffered record.
    fn data(self) -> u8 {
        match self {
            Side::Left => b'L',
            Side::Right => b'R',
        }
    }

    /// `tag` + time + key + position: the expiry index.
    fn index(self) -> u8 {
        match self {
            Side::Left => b'X',
            Side::Right => b'Y',
        }
    }

    fn watermark_key(self) -> &'static [u8] {
        match self {
            Side::Left => b"WL",
            Side::Right => b"WR",
        }
    }

    fn cursor_key(self) -> &'static [u8] {
        match self {
            Side::Left => b"CX",
            Side::Right => b"CY",
        }
    }
}

/// `tag` + key length + key + time + position: all records of a key, in time order.
fn data_key(tag: u8, key: &[u8], ts: i64, pos: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(13 + key.len() + pos.len());
    k.push(tag);
    k.extend_from_slice(&(key.len() as u32).to_be_bytes());
    k.extend_from_slice(key);
    k.extend_from_slice(&ts_bytes(ts));
    k.extend_from_slice(pos);
    k
}

/// `tag` + time + key length + key + position: all records in time order.
fn index_key(tag: u8, ts: i64, key: &[u8], pos: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(13 + key.len() + pos.len());
    k.push(tag);
    k.extend_from_slice(&ts_bytes(ts));
    k.extend_from_slice(&(key.len() as u32).to_be_bytes());
    k.extend_from_slice(key);
    k.extend_from_slice(pos);
    k
}

/// (key, position) from the part of an index key after the time.
fn split_index_rest(rest: &[u8]) -> Option<(&[u8], &[u8])> {
    let n = u32::from_be_bytes(rest.get(..4)?.try_into().ok()?) as usize;
    let key = rest.get(4..4 + n)?;
    Some((key, &rest[4 + n..]))
}

/// (time, position) from a data key of a known key.
fn split_data_key(k: &[u8], key_len: usize) -> Option<(i64, &[u8])> {
    let at = 5 + key_len;
    let ts = ts_from_bytes(k.get(at..at + 8)?)?;
    Some((ts, &k[at + 8..]))
}

/// Data keys of `key` on `side` with time in `[lo, hi]`.
fn time_range(side: Side, key: &[u8], lo: i64, hi: i64) -> (Vec<u8>, Vec<u8>) {
    let start = data_key(side.data(), key, lo, b"");
    let end = data_key(side.data(), key, hi.saturating_add(1), b"");
    (start, end)
}

/// A record that passed the lateness check, with what the join reads from it.
struct Arrival<'a> {
    record: &'a Record,
    /// No record of the other side still to come can pair with it (see
    /// [`IntervalJoinStage::closed_on_arrival`]): it pairs with what is buffered, and is
    /// not buffered itself.
    closed: bool,
    /// `None`: the value is not a JSON object (a right record under `nest` may be anything).
    fields: Option<Fields>,
    key: Vec<u8>,
    ts: i64,
    pos: Vec<u8>,
}

/// A buffered record of the other side, read for one call: decoded on first use (a key's
/// range can hold records that pair with none of the call's records).
struct Buffered {
    ts: i64,
    pos: Vec<u8>,
    blob: Vec<u8>,
    /// The record (lefts only: a right's blob is its value) and the fields of its value.
    parsed: Option<(Option<Record>, Option<Fields>)>,
}

impl Buffered {
    /// The decoded record, if any, the value's text and its fields.
    fn parsed(
        &mut self,
        decode: impl FnOnce(&[u8]) -> Result<(Option<Record>, Option<Fields>), StateError>,
    ) -> Result<(Option<&Record>, merge::Side<'_>), StateError> {
        let parsed = match self.parsed.take() {
            Some(p) => p,
            None => decode(&self.blob)?,
        };
        let (r, fields) = &*self.parsed.insert(parsed);
        let text = match r {
            Some(r) => &r.value[..],
            None => &self.blob[..],
        };
        let side = merge::Side {
            text,
            fields: fields.as_ref(),
        };
        Ok((r.as_ref(), side))
    }
}

/// A record's place in its source: offset, a sequence number among the outputs of the same
/// Kafka message, and the topic. Unique within a partition number.
fn position(r: &Record, seq: u32) -> Vec<u8> {
    let mut p = Vec::with_capacity(12 + r.origin.topic.len());
    p.extend_from_slice(&r.origin.offset.to_be_bytes());
    p.extend_from_slice(&seq.to_be_bytes());
    p.extend_from_slice(r.origin.topic.as_bytes());
    p
}

fn corrupt(stage: &str, what: &str) -> StateError {
    StateError::Corrupt {
        key: format!("{stage} {what}"),
        message: "cannot decode".into(),
    }
}

pub struct IntervalJoinStage {
    name: String,
    cfg: IntervalJoinConfig,
    /// Key and event time of each side.
    specs: [KeySpec; 2],
    merge: Merge,
    before: i64,
    after: i64,
    lateness: i64,
    sweepers: [Sweeper; 2],
    /// Buffered partners read in the current transaction (see [`Partners`]).
    partners: Partners,
}

/// The buffered records of the other side read during one transaction, per key. A batch
/// reaches the stage in several calls (slices) in one transaction; reading a key's partners
/// once per transaction instead of once per record saves most of the join's state reads.
///
/// Within a transaction the buffer of the other side only loses records (the sweep at the
/// end of each call; the other side's records arrive in other batches), and a swept record
/// cannot pair with any record that is not late, so a list read earlier in the transaction
/// still gives exactly the partners of every later record of the same side.
#[derive(Default)]
struct Partners {
    /// Transaction, partition number and side the lists were read for.
    txn: u64,
    partition: i32,
    side: Option<Side>,
    /// Key → its slot in `lists`.
    slots: HashMap<Vec<u8>, usize>,
    lists: Vec<PartnerList>,
}

impl Partners {
    /// The slot of `key`, a new unread one the first time.
    fn slot(&mut self, key: &[u8]) -> usize {
        if let Some(&slot) = self.slots.get(key) {
            return slot;
        }
        let slot = self.lists.len();
        self.slots.insert(key.to_vec(), slot);
        self.lists.push(PartnerList::default());
        slot
    }
}

/// One key's buffered records of the other side, read during the transaction.
#[derive(Default)]
struct PartnerList {
    /// The time range read (`None`: not read yet).
    read: Option<(i64, i64)>,
    list: Vec<Buffered>,
    /// The earliest and latest event time of the key's records in the current call.
    span: Option<(i64, i64)>,
}

/// Per-batch view of the side watermarks and sweep cursors (indexed by [`Side`]), written
/// back once at the end.
struct Marks {
    watermark: [Option<i64>; 2],
    cursor: [Option<i64>; 2],
    old: ([Option<i64>; 2], [Option<i64>; 2]),
}

impl Marks {
    fn load(st: &StageState<'_, '_>) -> Result<Self, StateError> {
        let (mut watermark, mut cursor) = ([None; 2], [None; 2]);
        for side in Side::BOTH {
            watermark[side as usize] = get_i64(st, side.watermark_key())?;
            cursor[side as usize] = get_i64(st, side.cursor_key())?;
        }
        Ok(Self {
            watermark,
            cursor,
            old: (watermark, cursor),
        })
    }

    fn store(&self, st: &mut StageState<'_, '_>) {
        for side in Side::BOTH {
            let i = side as usize;
            for (now, old, key) in [
                (self.watermark[i], self.old.0[i], side.watermark_key()),
                (self.cursor[i], self.old.1[i], side.cursor_key()),
            ] {
                if let Some(v) = now.filter(|_| now != old) {
                    put_i64(st, key, v);
                }
            }
        }
    }

    /// Records a new record of `side` at `ts`; `buffered`: it is kept, so the sweep must
    /// reach it.
    fn add(&mut self, side: Side, ts: i64, buffered: bool) {
        let i = side as usize;
        self.watermark[i] = Some(self.watermark[i].map_or(ts, |w| w.max(ts)));
        if buffered {
            self.cursor[i] = Some(self.cursor[i].map_or(ts, |c| c.min(ts)));
        }
    }
}

impl IntervalJoinStage {
    /// `cfg` must have passed [`super::JoinConfig::check`].
    pub fn new(name: &str, cfg: &IntervalJoinConfig) -> Result<Self, String> {
        let spec =
            |key, time: &EventTimeConfig| KeySpec::new(key, Some(TimeSource::Field(time.clone())));
        Ok(Self {
            name: name.to_string(),
            specs: [
                spec(&cfg.left_key, &cfg.left_time),
                spec(&cfg.right_key, &cfg.right_time),
            ],
            merge: Merge::new(&cfg.shape()?),
            before: cfg.before.as_millis_i64(),
            after: cfg.after.as_millis_i64(),
            lateness: cfg.allowed_lateness.as_millis_i64(),
            cfg: cfg.clone(),
            sweepers: [Sweeper::default(), Sweeper::default()],
            partners: Partners::default(),
        })
    }

    /// `Err` when `ts` is too far behind `watermark`, the largest time seen on its side.
    fn check_late(&self, watermark: Option<i64>, ts: i64, side: Side) -> Result<(), Reject> {
        let Some(w) = watermark.filter(|w| ts < w.saturating_sub(self.lateness)) else {
            return Ok(());
        };
        Err(Reject {
            kind: "late",
            message: format!(
                "event time {ts} is {} ms behind the {} watermark {w} (allowed lateness {} ms)",
                w - ts,
                side.name(),
                self.lateness
            ),
        })
    }

    /// The left record with `right` merged in, as a new record with the left record's origin.
    fn joined(
        &self,
        left: &Record,
        left_fields: Option<&Fields>,
        right: Option<merge::Side<'_>>,
    ) -> Result<Record, Reject> {
        let l = merge::Side {
            text: &left.value,
            fields: left_fields,
        };
        let value = self.merge.merged(l, right).map_err(Reject::schema)?;
        Ok(Record {
            origin: left.origin.clone(),
            key: left.key.clone(),
            value: Bytes::from(value),
            headers: left.headers.clone(),
            table: left.table.clone(),
        })
    }

    fn emit(
        &self,
        out: &mut StageOutput,
        left: &Record,
        left_fields: Option<&Fields>,
        right: Option<merge::Side<'_>>,
    ) {
        let joined = self.joined(left, left_fields, right);
        if let Some(r) = or_dead_letter(joined, out, &self.name, left) {
            out.records.push(r);
        }
    }

    /// The fields, key and event time of a record of `side`: one pass over its text, no tree.
    fn read(&self, r: &Record, side: Side) -> Result<(Option<Fields>, Vec<u8>, i64), Reject> {
        let spec = &self.specs[side as usize];
        let needs_object =
            side == Side::Left || matches!(self.merge.shape(), OutputShape::Prefix { .. });
        match Fields::read(&r.value).map_err(not_json)? {
            Some(f) => {
                let (k, ts) = spec.read_fields(r, |name| f.get(&r.value, name))?;
                Ok((Some(f), k, ts))
            }
            None if needs_object => Err(Reject::schema("value is not a JSON object")),
            None => {
                let (k, ts) = spec.read(r)?;
                Ok((None, k, ts))
            }
        }
    }

    /// A buffered left record and its fields.
    fn buffered_left(&self, blob: &[u8]) -> Result<(Record, Option<Fields>), StateError> {
        let left = codec::decode(blob).ok_or_else(|| corrupt(&self.name, "left record"))?;
        let fields = Fields::read(&left.value)
            .ok()
            .flatten()
            .ok_or_else(|| corrupt(&self.name, "left record"))?;
        Ok((left, Some(fields)))
    }

    /// One batch of `side`: each record pairs with the buffered records of the other side in
    /// its window and is buffered itself; then what can no longer pair expires.
    ///
    /// The lateness checks run first, in order (each record moves its side's watermark);
    /// then each key's buffered partners are read once, over the union of its records'
    /// windows, and kept for the rest of the transaction ([`Partners`]). Records of the same
    /// side never pair with each other, so what the batch buffers does not change them.
    fn process_batch(
        &mut self,
        side: Side,
        partition: i32,
        batch: Vec<Record>,
        st: &mut StageState<'_, '_>,
    ) -> Result<StageOutput, StateError> {
        let mut out = StageOutput::default();
        let mut marks = Marks::load(st)?;
        let mut seqs: HashMap<i64, u32> = HashMap::new();
        let mut cache = std::mem::take(&mut self.partners);
        if (cache.txn, cache.partition, cache.side) != (st.txn_id(), partition, Some(side)) {
            cache = Partners {
                txn: st.txn_id(),
                partition,
                side: Some(side),
                ..Partners::default()
            };
        }
        // Arrivals, each with its key's slot; the call's slots in order of first appearance,
        // each with the index of its first arrival.
        let mut arrivals = Vec::with_capacity(batch.len());
        let mut touched = Vec::new();
        for r in &batch {
            let Some((fields, key, ts)) =
                or_dead_letter(self.read(r, side), &mut out, &self.name, r)
            else {
                continue;
            };
            let late = self.check_late(marks.watermark[side as usize], ts, side);
            if or_dead_letter(late, &mut out, &self.name, r).is_none() {
                continue;
            }
            let closed = self.closed_on_arrival(side, ts, &marks);
            marks.add(side, ts, !closed);
            let seq = seqs.entry(r.origin.offset).or_insert(0);
            let pos = position(r, *seq);
            *seq += 1;
            let slot = cache.slot(&key);
            let span = &mut cache.lists[slot].span;
            match span {
                Some((lo, hi)) => {
                    *lo = (*lo).min(ts);
                    *hi = (*hi).max(ts);
                }
                None => {
                    *span = Some((ts, ts));
                    touched.push((slot, arrivals.len()));
                }
            }
            arrivals.push((
                Arrival {
                    record: r,
                    closed,
                    fields,
                    key,
                    ts,
                    pos,
                },
                slot,
            ));
        }
        let result = self.read_partners(st, side, &arrivals, &touched, &mut cache);
        let (mut matches, mut unmatched) = (0u64, 0u64);
        let result = result.and_then(|()| {
            arrivals.iter().try_for_each(|(a, slot)| {
                let list = &mut cache.lists[*slot].list;
                let n = match side {
                    Side::Left => self.pair_left(st, &mut out, a, list)?,
                    Side::Right => self.pair_right(st, &mut out, a, list)?,
                };
                matches += n;
                if a.closed && n == 0 && side == Side::Left && self.cfg.mode == JoinMode::LeftOuter
                {
                    // What the sweep would emit at the end of this call, without buffering it.
                    self.emit(&mut out, a.record, a.fields.as_ref(), None);
                    unmatched += 1;
                }
                Ok::<_, StateError>(())
            })
        });
        for (slot, _) in touched {
            cache.lists[slot].span = None;
        }
        self.partners = cache;
        result?;
        let budget = (batch.len() * 2).max(10_000);
        unmatched += self.expire(st, &mut marks, &mut out, budget)?;
        marks.store(st);
        out.counters.push(("join_matches", matches));
        out.counters.push(("join_unmatched", unmatched));
        Ok(out)
    }

    /// Makes each touched key's list cover the windows of its records in this call (the
    /// union over the call's records of the key; the same for all of them). Read in order of
    /// first appearance, as the records would have read them one by one.
    fn read_partners(
        &self,
        st: &StageState<'_, '_>,
        side: Side,
        arrivals: &[(Arrival<'_>, usize)],
        touched: &[(usize, usize)],
        cache: &mut Partners,
    ) -> Result<(), StateError> {
        for &(slot, first) in touched {
            let (Some((a, _)), Some(entry)) = (arrivals.get(first), cache.lists.get_mut(slot))
            else {
                continue;
            };
            let key = &a.key[..];
            let Some((lo, hi)) = entry.span else {
                continue;
            };
            let (from, to) = (self.window(side, lo).0, self.window(side, hi).1);
            let Some((read_from, read_to)) = entry.read else {
                entry.list = self.partners(st, side, key, from, to)?;
                entry.read = Some((from, to));
                continue;
            };
            // A later call can reach past what was read: read only the missing times (the
            // lists stay in time order). Ahead, read at least as far again as read before this
            // call: as a batch's slices move on in event time, each would otherwise extend
            // every key's list by one range read (a seek) per slice; this way a key takes a
            // few reads per transaction. Partners read beyond every window are never paired.
            // `read` follows each read as it succeeds: it never claims more than the list
            // holds.
            let span = read_to.saturating_sub(read_from);
            let mut held_from = read_from;
            if from < read_from {
                let mut head = self.partners(st, side, key, from, read_from - 1)?;
                head.append(&mut entry.list);
                entry.list = head;
                held_from = from;
                entry.read = Some((held_from, read_to));
            }
            if to > read_to {
                let until = to.max(read_to.saturating_add(span));
                entry
                    .list
                    .extend(self.partners(st, side, key, read_to + 1, until)?);
                entry.read = Some((held_from, until));
            }
        }
        Ok(())
    }

    /// The window of the other side a record of `side` at `ts` pairs with: rights in
    /// `[ts - before, ts + after]` of a left, lefts in `[ts - after, ts + before]` of a right.
    fn window(&self, side: Side, ts: i64) -> (i64, i64) {
        let (back, ahead) = match side {
            Side::Left => (self.before, self.after),
            Side::Right => (self.after, self.before),
        };
        (ts.saturating_sub(back), ts.saturating_add(ahead))
    }

    /// Buffered records of `side` with event times below this can pair with no record of the
    /// other side still to come: a right pairs with lefts up to `right.ts + before`, a left
    /// with rights up to `left.ts + after`, and records of the other side still to come are
    /// at least at its watermark minus the lateness.
    fn cutoff(&self, side: Side, marks: &Marks) -> Option<i64> {
        let reach = match side {
            Side::Right => self.before,
            Side::Left => self.after,
        };
        marks.watermark[side.other() as usize]
            .map(|w| w.saturating_sub(self.lateness).saturating_sub(reach))
    }

    /// Whether a record of `side` at `ts` would expire at the end of the call it arrives in:
    /// then it is not buffered at all (its buffering, sweep and deletion are writes to state
    /// that cancel out). Happens when one side is far ahead of the other, as when a side
    /// topic's backlog is read before the pipeline topic's.
    fn closed_on_arrival(&self, side: Side, ts: i64, marks: &Marks) -> bool {
        self.cutoff(side, marks).is_some_and(|c| ts < c)
    }

    /// The buffered records of the other side of `key` (records of `side` pair with them)
    /// with event times in `[from, to]`, in key order (time, then position).
    fn partners(
        &self,
        st: &StageState<'_, '_>,
        side: Side,
        key: &[u8],
        from: i64,
        to: i64,
    ) -> Result<Vec<Buffered>, StateError> {
        let (start, end) = time_range(side.other(), key, from, to);
        st.range(&start, &end)?
            .into_iter()
            .map(|(k, blob)| {
                let (ts, pos) = split_data_key(&k, key.len())
                    .ok_or_else(|| corrupt(&self.name, "buffered key"))?;
                Ok(Buffered {
                    ts,
                    pos: pos.to_vec(),
                    blob,
                    parsed: None,
                })
            })
            .collect()
    }

    /// Pairs a left record with its buffered rights and buffers it, flagged as matched or not.
    /// Returns the number of pairs.
    fn pair_left(
        &self,
        st: &mut StageState<'_, '_>,
        out: &mut StageOutput,
        a: &Arrival<'_>,
        rights: &mut [Buffered],
    ) -> Result<u64, StateError> {
        let (lo, hi) = self.window(Side::Left, a.ts);
        let mut n = 0u64;
        let start = rights.partition_point(|b| b.ts < lo);
        for b in rights[start..].iter_mut().take_while(|b| b.ts <= hi) {
            let (_, right) = b.parsed(|blob| Ok((None, self.buffered_right(blob)?)))?;
            self.emit(out, a.record, a.fields.as_ref(), Some(right));
            n += 1;
        }
        if !a.closed {
            st.put_owned(
                data_key(Side::Left.data(), &a.key, a.ts, &a.pos),
                codec::encode(a.record),
            );
            st.put_owned(
                index_key(Side::Left.index(), a.ts, &a.key, &a.pos),
                vec![u8::from(n > 0)],
            );
        }
        Ok(n)
    }

    /// Pairs a right record with its buffered lefts (flagging them as matched) and buffers it.
    /// Returns the number of pairs.
    fn pair_right(
        &self,
        st: &mut StageState<'_, '_>,
        out: &mut StageOutput,
        a: &Arrival<'_>,
        lefts: &mut [Buffered],
    ) -> Result<u64, StateError> {
        let (lo, hi) = self.window(Side::Right, a.ts);
        let mut n = 0u64;
        let start = lefts.partition_point(|b| b.ts < lo);
        for b in lefts[start..].iter_mut().take_while(|b| b.ts <= hi) {
            st.put_owned(index_key(Side::Left.index(), b.ts, &a.key, &b.pos), vec![1]);
            let (left, lv) =
                b.parsed(|blob| self.buffered_left(blob).map(|(r, f)| (Some(r), f)))?;
            if let Some(left) = left {
                let right = merge::Side {
                    text: &a.record.value,
                    fields: a.fields.as_ref(),
                };
                self.emit(out, left, lv.fields, Some(right));
            }
            n += 1;
        }
        if !a.closed {
            st.put(
                &data_key(Side::Right.data(), &a.key, a.ts, &a.pos),
                &a.record.value,
            );
            st.put_owned(
                index_key(Side::Right.index(), a.ts, &a.key, &a.pos),
                Vec::new(),
            );
        }
        Ok(n)
    }

    /// A buffered right record's fields (`None`: not an object).
    fn buffered_right(&self, blob: &[u8]) -> Result<Option<Fields>, StateError> {
        Fields::read(blob).map_err(|_| corrupt(&self.name, "right record"))
    }

    /// Drops buffered records no future (non-late) record can pair with; emits unmatched left
    /// records for `left_outer` and returns how many.
    fn expire(
        &mut self,
        st: &mut StageState<'_, '_>,
        marks: &mut Marks,
        out: &mut StageOutput,
        budget: usize,
    ) -> Result<u64, StateError> {
        let mut unmatched = 0u64;
        for side in [Side::Right, Side::Left] {
            let cutoff = self.cutoff(side, marks);
            let i = side as usize;
            let Some((c, cutoff)) = marks.cursor[i].zip(cutoff).filter(|(c, k)| c < k) else {
                continue;
            };
            // Unmatched lefts of a left outer join are output: all that closed must come out
            // now, since no further batch may come to sweep the rest (a partition that goes
            // quiet after a watermark jump held them back indefinitely). Other expiries only
            // free state and may take several batches.
            let budget = if side == Side::Left && self.cfg.mode == JoinMode::LeftOuter {
                usize::MAX
            } else {
                budget
            };
            let (entries, next) = self.sweepers[i].expired(st, side.index(), c, cutoff, budget)?;
            for IndexEntry { ts, rest, value } in entries {
                let (key, pos) = split_index_rest(&rest)
                    .ok_or_else(|| corrupt(&self.name, &format!("{} index", side.name())))?;
                let dk = data_key(side.data(), key, ts, pos);
                let unpaired_left = side == Side::Left && value.first() == Some(&0);
                if unpaired_left && self.cfg.mode == JoinMode::LeftOuter {
                    let blob = st
                        .get(&dk)?
                        .ok_or_else(|| corrupt(&self.name, "left record"))?;
                    let (left, fields) = self.buffered_left(&blob)?;
                    self.emit(out, &left, fields.as_ref(), None);
                    unmatched += 1;
                }
                st.delete(&dk);
                st.delete(&index_key(side.index(), ts, key, pos));
            }
            marks.cursor[i] = Some(next);
        }
        Ok(unmatched)
    }
}

impl Stage for IntervalJoinStage {
    fn name(&self) -> &str {
        &self.name
    }

    fn side_topics(&self) -> Vec<String> {
        vec![self.cfg.right_topic.clone()]
    }

    fn process(
        &mut self,
        batch: Vec<Record>,
        ctx: &BatchContext,
        state: &mut StateTxn<'_>,
    ) -> Result<StageOutput, StageError> {
        with_state(state, &self.name.clone(), ctx, |st| {
            self.process_batch(Side::Left, ctx.partition.partition, batch, st)
        })
    }

    fn process_side(
        &mut self,
        batch: Vec<Record>,
        ctx: &BatchContext,
        state: &mut StateTxn<'_>,
    ) -> Result<StageOutput, StageError> {
        with_state(state, &self.name.clone(), ctx, |st| {
            self.process_batch(Side::Right, ctx.partition.partition, batch, st)
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::collections::BTreeSet;

    use serde_json::{json, Value};

    use super::*;
    use crate::stage::dedup::tests::{counter, ctx, record, run_batch, run_batch_inspecting};
    use crate::stage::join::JoinConfig;
    use crate::state::StateStore;

    const MIN: i64 = 60_000;

    fn stage(extra: &str) -> IntervalJoinStage {
        let yaml = format!(
            "kind: interval\nright_topic: users\nleft_key: /user_id\nright_key: /uid\n\
             left_time: {{field: /ts}}\nright_time: {{field: /at, format: epoch_ms}}\n\
             before: 5m\nafter: 5m\n{extra}"
        );
        let cfg: JoinConfig = serde_yaml_ng::from_str(&yaml).unwrap();
        cfg.check(&["tx".into()], "dlq").unwrap();
        let JoinConfig::Interval(c) = cfg else {
            panic!()
        };
        IntervalJoinStage::new("join", &c).unwrap()
    }

    fn tx(off: i64, id: &str, user: u64, ts: i64) -> Record {
        record("tx", 0, off, json!({"id": id, "user_id": user, "ts": ts}))
    }

    fn user(off: i64, uid: u64, at: i64, name: &str) -> Record {
        record("users", 0, off, json!({"uid": uid, "at": at, "name": name}))
    }

    fn rows(out: &StageOutput) -> Vec<Value> {
        out.records
            .iter()
            .map(|r| serde_json::from_slice(&r.value).unwrap())
            .collect()
    }

    /// `(left id, right name)` pairs, as [`pairs`] gives them.
    fn expect(v: &[(&str, &str)]) -> BTreeSet<(String, String)> {
        v.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    /// The `id` of each output row, in output order.
    fn ids(out: &StageOutput) -> Vec<String> {
        rows(out)
            .iter()
            .map(|v| v["id"].as_str().unwrap().to_string())
            .collect()
    }

    fn pairs(out: &StageOutput) -> BTreeSet<(String, String)> {
        rows(out)
            .iter()
            .map(|v| {
                (
                    v["id"].as_str().unwrap().to_string(),
                    v["user"]["name"].as_str().unwrap_or("-").to_string(),
                )
            })
            .collect()
    }

    #[test]
    fn records_of_one_key_in_one_batch_pair_only_within_their_own_windows() {
        // The partners of a key are read once per batch over all its records' windows; each
        // record must still pair only with those in its own window.
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path()).unwrap();
        let mut s = stage("allowed_lateness: 1h\nnest: user\n");
        let out = run_batch(
            &store,
            &mut s,
            true,
            vec![
                user(0, 1, 10 * MIN, "early"),
                user(1, 1, 30 * MIN, "late"),
                user(2, 2, 30 * MIN, "other"),
            ],
        );
        assert!(out.records.is_empty());
        let out = run_batch(
            &store,
            &mut s,
            false,
            vec![
                tx(0, "a", 1, 12 * MIN),
                tx(1, "b", 1, 20 * MIN),
                tx(2, "c", 1, 27 * MIN),
                tx(3, "d", 1, 34 * MIN),
            ],
        );
        assert_eq!(
            pairs(&out),
            expect(&[("a", "early"), ("c", "late"), ("d", "late")])
        );
        // Emitted in the batch's order.
        assert_eq!(ids(&out), ["a", "c", "d"]);
        // Rights of one key in one batch, each with its own window over the buffered lefts.
        let out = run_batch(
            &store,
            &mut s,
            true,
            vec![user(3, 1, 16 * MIN, "mid"), user(4, 1, 38 * MIN, "last")],
        );
        assert_eq!(
            pairs(&out),
            expect(&[("a", "mid"), ("b", "mid"), ("d", "last")])
        );
    }

    #[test]
    fn a_batch_in_several_calls_pairs_as_in_one() {
        // The engine runs a large batch through the stages in slices, in one transaction; the
        // partners read by one slice are kept for the next ones.
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path()).unwrap();
        let mut s = stage("allowed_lateness: 1h\nnest: user\n");
        run_batch(
            &store,
            &mut s,
            true,
            vec![
                user(0, 1, 10 * MIN, "early"),
                user(1, 1, 30 * MIN, "late"),
                user(2, 1, 6 * MIN, "earliest"),
            ],
        );
        let mut txn = store.txn();
        let c = ctx("tx", 0);
        let first = s
            .process(vec![tx(0, "a", 1, 12 * MIN)], &c, &mut txn)
            .unwrap();
        // Reaches past the span the first call read.
        let second = s
            .process(
                vec![tx(1, "b", 1, 20 * MIN), tx(2, "c", 1, 33 * MIN)],
                &c,
                &mut txn,
            )
            .unwrap();
        // Reaches before it (out of order, within the lateness).
        let third = s
            .process(vec![tx(3, "e", 1, 11 * MIN)], &c, &mut txn)
            .unwrap();
        // Another partition number in the same transaction has no partners.
        let other = s
            .process(vec![tx(0, "x", 1, 12 * MIN)], &ctx("tx", 1), &mut txn)
            .unwrap();
        assert_eq!(pairs(&first), expect(&[("a", "early")]));
        assert_eq!(pairs(&second), expect(&[("c", "late")]));
        assert_eq!(pairs(&third), expect(&[("e", "early"), ("e", "earliest")]));
        assert!(other.records.is_empty());
        drop(txn);
        // The transaction was dropped: nothing of it is buffered, and the next one reads the
        // state afresh.
        let out = run_batch(&store, &mut s, false, vec![tx(3, "d", 1, 31 * MIN)]);
        assert_eq!(pairs(&out), expect(&[("d", "late")]));
        let out = run_batch(&store, &mut s, true, vec![user(2, 1, 14 * MIN, "mid")]);
        assert!(pairs(&out).is_empty(), "{:?}", pairs(&out));
    }

    #[test]
    fn pairs_are_emitted_once_when_the_later_side_arrives() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path()).unwrap();
        let mut s = stage("allowed_lateness: 15m\nnest: user\n");
        // Left first: nothing to pair with yet.
        let out = run_batch(
            &store,
            &mut s,
            false,
            vec![tx(0, "t1", 1, 10 * MIN), tx(1, "t2", 2, 10 * MIN)],
        );
        assert!(out.records.is_empty());
        // Right arrives: pairs with t1 (within 5 min), not with t2 (other key).
        let out = run_batch(
            &store,
            &mut s,
            true,
            vec![
                user(0, 1, 14 * MIN, "ann"),
                user(1, 1, 16 * MIN, "too-late-for-t1"),
            ],
        );
        assert_eq!(pairs(&out), BTreeSet::from([("t1".into(), "ann".into())]));
        assert_eq!(counter(&out, "join_matches"), 1);
        // The emitted record keeps the left record's origin.
        assert_eq!(out.records[0].origin.topic.as_ref(), "tx");
        assert_eq!(out.records[0].origin.offset, 0);
        // A later left pairs with both buffered rights within its window.
        let out = run_batch(&store, &mut s, false, vec![tx(2, "t3", 1, 15 * MIN)]);
        assert_eq!(
            pairs(&out),
            BTreeSet::from([
                ("t3".into(), "ann".into()),
                ("t3".into(), "too-late-for-t1".into())
            ])
        );
        // Window edges are inclusive: right at exactly left - 5 min and left + 5 min.
        let out = run_batch(
            &store,
            &mut s,
            true,
            vec![
                user(2, 2, 5 * MIN, "edge-before"),
                user(3, 2, 15 * MIN, "edge-after"),
            ],
        );
        assert_eq!(
            pairs(&out),
            BTreeSet::from([
                ("t2".into(), "edge-before".into()),
                ("t2".into(), "edge-after".into())
            ])
        );
    }

    #[test]
    fn left_outer_emits_unmatched_when_the_window_closes_and_state_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path()).unwrap();
        let mut s = stage("mode: left_outer\nallowed_lateness: 1m\nnest: user\n");
        run_batch(
            &store,
            &mut s,
            false,
            vec![tx(0, "matched", 1, 10 * MIN), tx(1, "lonely", 2, 10 * MIN)],
        );
        let out = run_batch(&store, &mut s, true, vec![user(0, 1, 11 * MIN, "ann")]);
        assert_eq!(
            pairs(&out),
            BTreeSet::from([("matched".into(), "ann".into())])
        );
        // The right watermark (11m) does not close lefts at 10m: 10m + 5m + 1m > 11m.
        let out = run_batch(&store, &mut s, false, vec![tx(2, "later", 3, 17 * MIN)]);
        assert!(out.records.is_empty());
        // Right watermark 16m+1ms > 10m + 5m + 1m: "lonely" closes, unmatched.
        let out = run_batch(&store, &mut s, true, vec![user(1, 9, 16 * MIN + 1, "x")]);
        let r = rows(&out);
        assert_eq!(r.len(), 1, "{r:?}");
        assert_eq!(r[0]["id"], "lonely");
        assert_eq!(r[0]["user"], Value::Null);
        assert_eq!(out.records[0].origin.offset, 1);
        assert_eq!(counter(&out, "join_unmatched"), 1);
        // Buffered: left "later"; rights at 11m and 16m (a right at 11m closes once the left
        // watermark passes 11m + 5m + 1m; it is 17m).
        let mut txn = store.txn();
        let st = txn.stage("join", 0);
        assert_eq!(st.scan_prefix(b"L").unwrap().len(), 1);
        assert_eq!(st.scan_prefix(b"X").unwrap().len(), 1);
        assert_eq!(st.scan_prefix(b"R").unwrap().len(), 2);
        drop(txn);
        // Right watermark 30m: "later" (17m) closes, unmatched.
        let out = run_batch(&store, &mut s, true, vec![user(2, 9, 30 * MIN, "y")]);
        assert_eq!(rows(&out).len(), 1);
        assert_eq!(rows(&out)[0]["id"], "later");
        // Left watermark 30m: rights at 11m and 16m close; "last" stays buffered.
        let out = run_batch(&store, &mut s, false, vec![tx(3, "last", 4, 30 * MIN)]);
        assert!(out.records.is_empty());
        let mut txn = store.txn();
        let st = txn.stage("join", 0);
        assert_eq!(st.scan_prefix(b"R").unwrap().len(), 1);
        assert_eq!(st.scan_prefix(b"Y").unwrap().len(), 1);
        assert_eq!(st.scan_prefix(b"L").unwrap().len(), 1);
    }

    #[test]
    fn records_closed_on_arrival_pair_with_the_buffer_and_are_not_kept() {
        // One side far ahead of the other (a side topic's backlog read first): a record of the
        // side behind pairs with what is buffered and, since nothing still to come can pair
        // with it, is emitted at once (unmatched lefts included) and never written to state.
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path()).unwrap();
        let mut s = stage("mode: left_outer\nallowed_lateness: 1m\nnest: user\n");
        let keys = |tag: &[u8]| {
            let mut txn = store.txn();
            let n = txn.stage("join", 0).scan_prefix(tag).unwrap().len();
            n
        };
        run_batch(
            &store,
            &mut s,
            true,
            vec![user(0, 1, 10 * MIN, "ann"), user(1, 9, 200 * MIN, "zoe")],
        );
        // Right watermark 200m: lefts below 200m - 1m - 5m close on arrival.
        let (out, written) = run_batch_writes(
            &store,
            &mut s,
            false,
            vec![
                tx(0, "a", 1, 12 * MIN),
                tx(1, "b", 2, 12 * MIN),
                tx(2, "c", 9, 198 * MIN),
            ],
        );
        // Of the lefts, the batch writes "c" (data and index); nothing of "a" and "b", not
        // even a deletion.
        let lefts: Vec<_> = written
            .into_iter()
            .filter(|(tag, _)| matches!(tag, b'L' | b'X'))
            .collect();
        assert_eq!(lefts, [(b'L', true), (b'X', true)]);
        // Emitted as they arrive: the unmatched "b" does not wait for the end of the batch.
        assert_eq!(ids(&out), ["a", "b", "c"]);
        assert_eq!(
            pairs(&out),
            expect(&[("a", "ann"), ("b", "-"), ("c", "zoe")])
        );
        assert_eq!(counter(&out, "join_unmatched"), 1);
        assert_eq!(counter(&out, "join_matches"), 2);
        // Only "c" is buffered (it may still meet a right up to 203m).
        assert_eq!((keys(b"L"), keys(b"X")), (1, 1));

        // The other way round: lefts buffered up to 100m (no right watermark yet), then a
        // right at 12m, below 100m - 1m - 5m: it pairs with the left at 10m and is not kept.
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path()).unwrap();
        let mut s = stage("allowed_lateness: 1m\nnest: user\n");
        run_batch(
            &store,
            &mut s,
            false,
            vec![tx(0, "e", 5, 10 * MIN), tx(1, "f", 6, 100 * MIN)],
        );
        let (out, written) =
            run_batch_writes(&store, &mut s, true, vec![user(0, 5, 12 * MIN, "eve")]);
        assert_eq!(pairs(&out), expect(&[("e", "eve")]));
        assert!(
            !written.iter().any(|(tag, _)| matches!(tag, b'R' | b'Y')),
            "{written:?}"
        );
    }

    /// [`run_batch`], also returning the batch's writes to state: each key's tag and whether
    /// it is a put (`false`: a deletion).
    fn run_batch_writes(
        store: &StateStore,
        stage: &mut IntervalJoinStage,
        side: bool,
        batch: Vec<Record>,
    ) -> (StageOutput, Vec<(u8, bool)>) {
        // Keys are relative to the stage's namespace: its name, a zero byte, the partition.
        let ns = "join".len() + 5;
        let mut written = Vec::new();
        let out = run_batch_inspecting(store, stage, side, batch, |txn| {
            written = txn.writes().map(|(k, v)| (k[ns], v.is_some())).collect();
        });
        (out, written)
    }

    #[test]
    fn left_outer_emits_every_closed_left_at_once_even_past_the_sweep_budget() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path()).unwrap();
        let mut s = stage("mode: left_outer\nallowed_lateness: 1m\nnest: user\n");
        // 12,000 lefts without partners (more than the 10,000 sweep budget of a small batch).
        let n = 12_000i64;
        let lefts: Vec<Record> = (0..n)
            .map(|i| tx(i, &format!("t{i}"), 1, 10 * MIN + i))
            .collect();
        run_batch(&store, &mut s, false, lefts);
        // One small right batch far ahead closes all of them; nothing comes after it.
        let out = run_batch(&store, &mut s, true, vec![user(0, 9, 60 * MIN, "x")]);
        assert_eq!(rows(&out).len(), n as usize);
        assert_eq!(counter(&out, "join_unmatched"), n as u64);
        let mut txn = store.txn();
        let st = txn.stage("join", 0);
        assert_eq!(st.scan_prefix(b"L").unwrap().len(), 0);
    }

    #[test]
    fn late_records_are_dead_lettered_and_out_of_order_ones_within_lateness_join() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path()).unwrap();
        let mut s = stage("allowed_lateness: 2m\nnest: user\n");
        run_batch(&store, &mut s, false, vec![tx(0, "a", 1, 20 * MIN)]);
        run_batch(&store, &mut s, true, vec![user(0, 1, 20 * MIN, "ann")]);
        // Watermark 20m. A left at 18m is out of order but within lateness: it joins.
        let out = run_batch(&store, &mut s, false, vec![tx(1, "b", 1, 18 * MIN)]);
        assert_eq!(pairs(&out), BTreeSet::from([("b".into(), "ann".into())]));
        // At 17m59.999s it is late on either side.
        let out = run_batch(&store, &mut s, false, vec![tx(2, "c", 1, 18 * MIN - 1)]);
        assert!(out.records.is_empty());
        assert_eq!(out.dead_letters.len(), 1);
        assert_eq!(out.dead_letters[0].kind, "late");
        assert!(out.dead_letters[0]
            .message
            .contains("allowed lateness 120000 ms"));
        let out = run_batch(&store, &mut s, true, vec![user(1, 1, 17 * MIN, "old")]);
        assert_eq!(out.dead_letters.len(), 1);
        assert_eq!(out.dead_letters[0].kind, "late");
        assert_eq!(out.dead_letters[0].origin.topic.as_ref(), "users");
    }

    #[test]
    fn result_does_not_depend_on_interleaving() {
        // The same two streams fed in different batch orders give the same rows.
        let lefts: Vec<Record> = (0..60)
            .map(|i| {
                tx(
                    i,
                    &format!("t{i}"),
                    (i % 5) as u64,
                    // Disorder within the lateness, and every 17th record 3 minutes behind:
                    // late, whatever the other side did.
                    i * 20_000 + (i % 3) * 7_000 - if i % 17 == 16 { 3 * MIN } else { 0 },
                )
            })
            .collect();
        let rights: Vec<Record> = (0..20)
            .map(|i| {
                let late = if i % 7 == 6 { 4 * MIN } else { 0 };
                user(i, (i % 5) as u64, i * 60_000 - late, &format!("u{i}"))
            })
            .collect();
        let run = |chunk_l: usize, chunk_r: usize, right_first: bool| {
            let dir = tempfile::tempdir().unwrap();
            let store = StateStore::open(dir.path()).unwrap();
            let mut s =
                stage("mode: left_outer\nallowed_lateness: 1m\nprefix: user_\nfields: [name]\n");
            let mut got = BTreeSet::new();
            let mut late = BTreeSet::new();
            let mut l = lefts.chunks(chunk_l);
            let mut r = rights.chunks(chunk_r);
            loop {
                let (a, b) = if right_first {
                    (r.next().map(|c| (true, c)), l.next().map(|c| (false, c)))
                } else {
                    (l.next().map(|c| (false, c)), r.next().map(|c| (true, c)))
                };
                if a.is_none() && b.is_none() {
                    break;
                }
                for (side, c) in a.into_iter().chain(b) {
                    let out = run_batch(&store, &mut s, side, c.to_vec());
                    for d in &out.dead_letters {
                        assert_eq!(d.kind, "late");
                        late.insert((d.origin.topic.to_string(), d.origin.offset));
                    }
                    for v in rows(&out) {
                        assert!(
                            got.insert((
                                v["id"].as_str().unwrap().to_string(),
                                v["user_name"].as_str().unwrap_or("-").to_string()
                            )),
                            "pair emitted twice: {v}"
                        );
                    }
                }
            }
            (got, late)
        };
        let (a, late) = run(7, 3, false);
        assert_eq!(
            late,
            BTreeSet::from([
                ("tx".to_string(), 16),
                ("tx".to_string(), 33),
                ("tx".to_string(), 50),
                ("users".to_string(), 6),
                ("users".to_string(), 13),
            ])
        );
        let a = (a, late);
        assert_eq!(a, run(60, 20, true));
        assert_eq!(a, run(1, 1, true));
        assert_eq!(a, run(13, 20, false));
        // Brute force over all pairs for the matched part.
        let mut expected = BTreeSet::new();
        let (a, late) = a;
        let accepted = |r: &&Record| !late.contains(&(r.origin.topic.to_string(), r.origin.offset));
        for l in lefts.iter().filter(accepted) {
            let lv: Value = serde_json::from_slice(&l.value).unwrap();
            for r in rights.iter().filter(accepted) {
                let rv: Value = serde_json::from_slice(&r.value).unwrap();
                let (lt, rt) = (lv["ts"].as_i64().unwrap(), rv["at"].as_i64().unwrap());
                if lv["user_id"] == rv["uid"] && rt >= lt - 5 * MIN && rt <= lt + 5 * MIN {
                    expected.insert((
                        lv["id"].as_str().unwrap().to_string(),
                        rv["name"].as_str().unwrap().to_string(),
                    ));
                }
            }
        }
        let matched: BTreeSet<_> = a.iter().filter(|(_, u)| u != "-").cloned().collect();
        assert_eq!(matched, expected);
    }

    #[test]
    fn missing_key_fields_are_dead_lettered() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path()).unwrap();
        let mut s = stage("nest: user\n");
        let out = run_batch(
            &store,
            &mut s,
            false,
            vec![record("tx", 0, 0, json!({"id": "x", "ts": 1}))],
        );
        assert_eq!(out.dead_letters.len(), 1);
        assert_eq!(out.dead_letters[0].kind, "schema");
        assert_eq!(out.dead_letters[0].message, "key field /user_id is missing");
        let out = run_batch(
            &store,
            &mut s,
            true,
            vec![record("users", 0, 0, json!({"uid": 1}))],
        );
        assert_eq!(out.dead_letters[0].message, "time field /at is missing");
    }
}
