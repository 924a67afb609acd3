//! Child processes and loopback ports for the demo and the benchmarks.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use anyhow::{Context, Result, bail};

/// A child process whose output goes to a log file; killed when dropped.
pub struct Proc {
    pub name: String,
    pub child: Child,
    log: PathBuf,
}

impl Proc {
    /// Starts `cmd` with stdout and stderr in `log`.
    pub fn spawn(name: &str, cmd: &mut Command, log: PathBuf) -> Result<Proc> {
        let f =
            std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let f2 = f.try_clone()?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(f)
            .stderr(f2)
            .spawn()
            .with_context(|| format!("starting {name}: {cmd:?}"))?;
        Ok(Proc {
            name: name.to_string(),
            child,
            log,
        })
    }

    /// Fails, with the end of its log, if the process has exited.
    pub fn check(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(20).collect();
            bail!(
                "{} exited with {status}; last log lines:\n{}",
                self.name,
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        Ok(())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A free loopback port, from a range below the kernel's ephemeral ports, so an outgoing
/// connection cannot take it between this probe and the child binding it (the bind(0)
/// probe this replaced lost that race now and then: "Address already in use").
pub fn free_port() -> Result<u16> {
    sluice_testkit::process::free_port()
}

/// `n` consecutive free loopback ports (a simulated fleet binds base..base+n).
pub fn free_port_run(n: usize) -> Result<u16> {
    sluice_testkit::process::free_port_run(n)
}
