//! Percentiles and the latency computation of the fixed-rate run.

/// The `q`-quantile (0..=1) of sorted values, nearest-rank.
pub fn quantile<T: Copy>(sorted: &[T], q: f64) -> Option<T> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted.get(rank - 1).copied()
}

/// One observation of the table: at `t_ms` (epoch ms, taken when the answer arrived) the
/// first `visible` offsets of the (single) partition were visible.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Poll {
    pub t_ms: i64,
    pub visible: u64,
}

/// Latency of each row: the first poll that saw its offset minus the time the row carries
/// (its produce time). `polls` in time order; `rows` are (offset, produced_at_ms).
/// A row whose offset no poll saw is an error (the caller waits until all rows are visible).
pub fn latencies(polls: &[Poll], rows: &[(i64, i64)]) -> Result<Vec<i64>, String> {
    // Visible counts never go down (one partition, batches inserted in offset order, nothing
    // deleted); taking the running maximum guards against a poll answered out of order.
    let mut maxed = Vec::with_capacity(polls.len());
    let mut m = 0;
    for p in polls {
        m = m.max(p.visible);
        maxed.push(Poll {
            t_ms: p.t_ms,
            visible: m,
        });
    }
    rows.iter()
        .map(|&(offset, produced)| {
            let offset = u64::try_from(offset).map_err(|_| format!("negative offset {offset}"))?;
            let i = maxed.partition_point(|p| p.visible <= offset);
            maxed
                .get(i)
                .map(|p| p.t_ms - produced)
                .ok_or_else(|| format!("offset {offset} was never seen by a poll"))
        })
        .collect()
}

/// Where the batches of a run spent their time after sealing, from sluice's debug lines
/// (`batch done ... stages_ms=.. journal_ms=.. deliver_ms=..`, see `Worker::process`):
/// (p50, p90, max) in ms of each phase, over the batches that had `min_rows` rows or more
/// (the warm-up's small batches are left out).
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct BatchPhases {
    pub batches: usize,
    pub stages_ms: (f64, f64, f64),
    pub journal_ms: (f64, f64, f64),
    pub deliver_ms: (f64, f64, f64),
    pub after_seal_ms: (f64, f64, f64),
}

/// `None` when the log has no such line (sluice ran without `sluice::pipeline=debug`).
pub fn batch_phases(log: &str, min_rows: u64) -> Option<BatchPhases> {
    let field = |line: &str, name: &str| -> Option<f64> {
        let at = line.find(&format!(" {name}="))? + name.len() + 2;
        line[at..].split_whitespace().next()?.parse().ok()
    };
    let mut cols: [Vec<f64>; 4] = Default::default();
    for line in log.lines().filter(|l| l.contains("batch done")) {
        let (Some(rows), Some(q), Some(s), Some(j), Some(d)) = (
            field(line, "rows"),
            field(line, "queue_ms"),
            field(line, "stages_ms"),
            field(line, "journal_ms"),
            field(line, "deliver_ms"),
        ) else {
            continue;
        };
        if rows < min_rows as f64 {
            continue;
        }
        for (c, v) in cols.iter_mut().zip([s, j, d, q + s + j + d]) {
            c.push(v);
        }
    }
    let summary = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        let q = |x| quantile(v, x).unwrap_or(f64::NAN);
        (q(0.5), q(0.9), q(1.0))
    };
    let batches = cols[0].len();
    if batches == 0 {
        return None;
    }
    let [s, j, d, a] = &mut cols;
    Some(BatchPhases {
        batches,
        stages_ms: summary(s),
        journal_ms: summary(j),
        deliver_ms: summary(d),
        after_seal_ms: summary(a),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn batch_phases_from_debug_lines() {
        let line = |rows: u64, ms: f64| {
            format!(
                "2026-12-07T04:43:08Z DEBUG sluice::pipeline: batch done partition=latency/0 \
                 first=0 last=9 rows={rows} fill_ms=250.1 queue_ms=0.5 stages_ms={ms} \
                 journal_ms={} deliver_ms={}",
                ms / 10.0,
                ms / 2.0
            )
        };
        let mut log = String::from("INFO sluice::pipeline: pipeline started\n");
        for (i, ms) in [50.0, 60.0, 70.0, 80.0].iter().enumerate() {
            log.push_str(&line(10_000 + i as u64, *ms));
            log.push('\n');
        }
        // Warm-up batches below `min_rows` are left out.
        log.push_str(&line(10, 900.0));
        let p = batch_phases(&log, 1_000).unwrap();
        assert_eq!(p.batches, 4);
        assert_eq!(p.stages_ms, (60.0, 80.0, 80.0));
        assert_eq!(p.journal_ms, (6.0, 8.0, 8.0));
        assert_eq!(p.deliver_ms, (30.0, 40.0, 40.0));
        assert_eq!(p.after_seal_ms.2, 0.5 + 80.0 + 8.0 + 40.0);
        assert_eq!(batch_phases("INFO nothing\n", 1), None);
    }

    #[test]
    fn quantiles_nearest_rank() {
        let v: Vec<i64> = (1..=100).collect();
        assert_eq!(quantile(&v, 0.5), Some(50));
        assert_eq!(quantile(&v, 0.99), Some(99));
        assert_eq!(quantile(&v, 1.0), Some(100));
        assert_eq!(quantile(&v, 0.0), Some(1));
        assert_eq!(quantile::<i64>(&[], 0.5), None);
    }

    #[test]
    fn latency_is_first_poll_that_sees_the_offset() {
        let polls = [
            Poll {
                t_ms: 100,
                visible: 0,
            },
            Poll {
                t_ms: 110,
                visible: 2,
            },
            Poll {
                t_ms: 120,
                visible: 1,
            }, // out of order: ignored
            Poll {
                t_ms: 130,
                visible: 5,
            },
        ];
        let rows = [(0, 90), (1, 95), (2, 100), (4, 125)];
        assert_eq!(latencies(&polls, &rows).unwrap(), vec![20, 15, 30, 5]);
        assert!(latencies(&polls, &[(5, 0)]).is_err());
    }
}
