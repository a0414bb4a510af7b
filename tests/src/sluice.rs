//! Runs the real `sluice` binary as a child process (so tests can `kill -9` it).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// `target/<profile>/sluice`, next to the test executable's `deps/` folder. `.ci/run` and
/// `scripts/test.sh` build it before the tests (`cargo build --release -p sluice`).
pub fn binary() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("current_exe")?;
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .context("test executable has no target/<profile> parent")?;
    let bin = profile_dir.join("sluice");
    if !bin.exists() {
        bail!(
            "{} not found: build it first with `cargo build --release -p sluice` (scripts/test.sh does)",
            bin.display()
        );
    }
    Ok(bin)
}

/// A running `sluice` process whose log goes to a file (shown when a test fails).
pub struct SluiceProcess {
    child: Option<Child>,
    pub log: PathBuf,
}

impl SluiceProcess {
    pub fn spawn(args: &[&str], log: &Path) -> Result<Self> {
        Self::spawn_with_env(args, &[], log)
    }

    /// Like [`spawn`](Self::spawn) with extra environment (e.g. fault injection).
    pub fn spawn_with_env(args: &[&str], env: &[(&str, &str)], log: &Path) -> Result<Self> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("open {}", log.display()))?;
        let err = file.try_clone()?;
        let child = Command::new(binary()?)
            .args(args)
            .env("SLUICE_LOG", "info,sluice=debug")
            .envs(env.iter().copied())
            .stdout(Stdio::from(file))
            .stderr(Stdio::from(err))
            .spawn()
            .context("spawn sluice")?;
        Ok(Self {
            child: Some(child),
            log: log.to_path_buf(),
        })
    }

    /// `sluice run -c <config>`.
    pub fn run(config: &Path, log: &Path) -> Result<Self> {
        let c = config.to_string_lossy().into_owned();
        Self::spawn(&["run", "-c", &c], log)
    }

    /// Waits for the process to end by itself (e.g. an injected crash).
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let Some(c) = self.child.as_mut() else {
            bail!("sluice is not running");
        };
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = c.try_wait()? {
                self.child = None;
                return Ok(s);
            }
            if Instant::now() > deadline {
                bail!(
                    "sluice still running after {timeout:?}\n{}",
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The whole log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// `kill -9`: no flush, no goodbye.
    pub fn kill9(&mut self) -> Result<()> {
        if let Some(mut c) = self.child.take() {
            c.kill().context("kill -9 sluice")?;
            c.wait()?;
        }
        Ok(())
    }

    /// SIGTERM and wait for a clean exit.
    pub fn terminate(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let Some(mut c) = self.child.take() else {
            bail!("sluice is not running");
        };
        let status = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status()?;
        if !status.success() {
            bail!("kill -TERM failed");
        }
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = c.try_wait()? {
                return Ok(s);
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                bail!(
                    "sluice did not stop within {timeout:?} after SIGTERM\n{}",
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM, and fails unless the process exits cleanly (exit code 0) in time, with its log.
    pub fn stop_cleanly(&mut self, timeout: Duration) -> Result<()> {
        let status = self.terminate(timeout)?;
        if !status.success() {
            bail!("sluice exited with {status}\n{}", self.log_tail());
        }
        Ok(())
    }

    /// Fails if the process has exited (with its log).
    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(c) = self.child.as_mut() {
            if let Some(s) = c.try_wait()? {
                bail!("sluice exited early with {s}\n{}", self.log_tail());
            }
        }
        Ok(())
    }

    /// Last lines of the log, for failure messages.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let start = lines.len().saturating_sub(60);
        format!(
            "--- sluice log ({}) ---\n{}",
            self.log.display(),
            lines[start..].join("\n")
        )
    }
}

impl Drop for SluiceProcess {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Runs `sluice <args>` to completion, returning (exit status, stdout + stderr).
pub fn run_to_end(args: &[&str]) -> Result<(ExitStatus, String)> {
    let out = Command::new(binary()?)
        .args(args)
        .env("SLUICE_LOG", "warn")
        .output()
        .context("run sluice")?;
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    Ok((out.status, text))
}
