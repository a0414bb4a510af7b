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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

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
