//! CPU time and memory of processes, read from `/proc` (Linux only, like the rest of the bench).

use std::process::Command;
use std::sync::OnceLock;

/// Clock ticks per second of `utime`/`stime` in `/proc/<pid>/stat`.
fn clk_tck() -> f64 {
    static TCK: OnceLock<f64> = OnceLock::new();
    *TCK.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// A process's CPU time so far (user + system, all threads) and its memory.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ProcUsage {
    pub cpu_s: f64,
    pub rss_kb: u64,
    /// Peak resident set (`VmHWM`) since start or since [`reset_peak_rss`].
    pub peak_rss_kb: u64,
}

impl ProcUsage {
    pub fn peak_rss_mib(&self) -> f64 {
        self.peak_rss_kb as f64 / 1024.0
    }
}

/// `None` once the process is gone.
pub fn usage(pid: u32) -> Option<ProcUsage> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name (which may contain spaces) start at field 3.
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<u64>().ok());
    // utime and stime are fields 14 and 15, i.e. indices 11 and 12 from field 3.
    let cpu_ticks = ticks(11)? + ticks(12)?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb = |key: &str| {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    Some(ProcUsage {
        cpu_s: cpu_ticks as f64 / clk_tck(),
        rss_kb: kb("VmRSS:"),
        peak_rss_kb: kb("VmHWM:"),
    })
}

/// CPU time the calling thread has used so far, in nanoseconds (`/proc/thread-self/schedstat`):
/// unlike wall time, it does not count the time other processes on a shared machine took.
pub fn thread_cpu_ns() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    text.split_whitespace().next()?.parse().ok()
}

/// This process.
pub fn self_usage() -> ProcUsage {
    usage(std::process::id()).unwrap_or_default()
}

/// Resets `VmHWM` to the current RSS (`echo 5 > /proc/<pid>/clear_refs`), so a peak can be
/// measured for one phase of a long-lived process.
pub fn reset_peak_rss(pid: u32) -> std::io::Result<()> {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5")
}

/// CPU seconds the whole machine spent busy (all cores, from `/proc/stat`): tells whether a
/// phase was limited by the two cores rather than by one process.
pub fn machine_busy_s() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/stat") else {
        return 0.0;
    };
    let Some(line) = stat.lines().find(|l| l.starts_with("cpu ")) else {
        return 0.0;
    };
    // user nice system idle iowait irq softirq steal ...
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let busy: u64 = [0, 1, 2, 5, 6, 7].iter().filter_map(|&i| v.get(i)).sum();
    busy as f64 / clk_tck()
}

/// Sum of the usage of several processes (CPU added, peak RSS the largest).
pub fn combine(list: &[ProcUsage]) -> ProcUsage {
    ProcUsage {
        cpu_s: list.iter().map(|u| u.cpu_s).sum(),
        rss_kb: list.iter().map(|u| u.rss_kb).sum(),
        peak_rss_kb: list.iter().map(|u| u.peak_rss_kb).max().unwrap_or(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let u = self_usage();
        assert!(u.rss_kb > 0, "{u:?}");
        assert!(u.peak_rss_kb >= u.rss_kb, "{u:?}");
        // Burn a little CPU so the counter cannot be zero.
        let mut x = 0u64;
        for i in 0..50_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        assert!(self_usage().cpu_s > 0.0);
        assert!(machine_busy_s() > 0.0);
    }
}
