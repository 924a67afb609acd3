//! Child processes and loopback ports for the demo and the benchmarks.

use std::net::TcpListener;
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

/// A loopback port that was free a moment ago.
pub fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// `n` consecutive free loopback ports (a simulated fleet binds base..base+n).
pub fn free_port_run(n: usize) -> Result<u16> {
    for _ in 0..200 {
        let base = free_port()?;
        if base as usize + n >= 65535 {
            continue;
        }
        let held: std::io::Result<Vec<TcpListener>> = (0..n as u16)
            .map(|i| TcpListener::bind(("127.0.0.1", base + i)))
            .collect();
        if held.is_ok() {
            return Ok(base);
        }
    }
    bail!("found no {n} consecutive free loopback ports")
}
