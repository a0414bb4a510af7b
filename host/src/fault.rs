//! Fault injection for the crash tests: `SLUICE_FAULT_POINT=<name>` and `SLUICE_FAULT_AFTER=<n>`
//! make the process abort (as `kill -9` would: no flush, no cleanup) the n-th time it reaches
//! the named point, or, for [`REDELIVER`], misbehave once there. Unset (the normal case), a
//! point costs one relaxed atomic load.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

/// Points in the batch cycle where a crash is interesting.
pub const AFTER_BEGIN: &str = "after_begin";
pub const AFTER_INSERT: &str = "after_insert";
pub const AFTER_DEAD_LETTERS: &str = "after_dead_letters";
pub const AFTER_COMMIT: &str = "after_commit";
/// The consumer seeks back to the first record of the chunk it just returned, so the
/// application gets those records again, as librdkafka does when a partition is paused while a
/// message is being handed over.
pub const REDELIVER: &str = "redeliver";

struct Plan {
    point: String,
    after: u64,
    hits: AtomicU64,
}

fn plan() -> Option<&'static Plan> {
    static PLAN: OnceLock<Option<Plan>> = OnceLock::new();
    PLAN.get_or_init(|| {
        let point = std::env::var("SLUICE_FAULT_POINT").ok()?;
        let after = std::env::var("SLUICE_FAULT_AFTER")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(1);
        Some(Plan {
            point,
            after,
            hits: AtomicU64::new(0),
        })
    })
    .as_ref()
}

/// Whether this is the configured point and this is its n-th hit.
pub fn hit(name: &str) -> bool {
    let Some(p) = plan() else { return false };
    p.point == name && p.hits.fetch_add(1, Ordering::Relaxed) + 1 == p.after
}

/// Aborts the process if this is the configured point and hit.
pub fn point(name: &str) {
    if hit(name) {
        let after = plan().map_or(0, |p| p.after);
        eprintln!("sluice: fault injection: aborting at {name} (hit {after})");
        std::process::abort();
    }
}
