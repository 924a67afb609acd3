//! Free loopback ports, child processes that die with the test, and readiness polling.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Arc, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use anyhow::{Context, Result, bail};

/// Ports handed out come from this range, below Linux's default ephemeral range
/// (32768–60999). A port found free and released for a child process to bind is then never
/// taken in between by an outgoing connection (those draw from the ephemeral range), nor by
/// another test asking the kernel for port 0, which was the race a `bind(0)` probe had.
const PORT_RANGE: std::ops::Range<u16> = 20_000..32_000;

/// The per-process random start of the candidates and the shared counter after it, so the
/// threads of one test binary never get the same port and two binaries rarely collide.
static START: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// Takes `n` consecutive candidates and returns the first.
fn next_candidates(n: u32) -> u16 {
    use std::sync::atomic::Ordering;
    let span = u32::from(PORT_RANGE.end - PORT_RANGE.start);
    let start = *START.get_or_init(|| {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        (std::process::id().wrapping_mul(7_919) ^ nanos) % span
    });
    let offset = (start + NEXT.fetch_add(n, Ordering::Relaxed)) % span;
    // `offset < span <= u16::MAX`, so the conversion cannot fail.
    PORT_RANGE.start + u16::try_from(offset).unwrap_or(0)
}

/// A free TCP port on 127.0.0.1: one that could be bound a moment ago, from a range no
/// outgoing connection uses, and never handed out twice by this process.
pub fn free_port() -> Result<u16> {
    free_port_run(1)
}

/// The first of `n` consecutive free ports (a simulated fleet binds `base..base + n`), with
/// the same guarantees as [`free_port`].
pub fn free_port_run(n: usize) -> Result<u16> {
    let span = u32::from(PORT_RANGE.end - PORT_RANGE.start);
    let n = u16::try_from(n)
        .ok()
        .filter(|&n| (1..=1024).contains(&n))
        .with_context(|| format!("{n} consecutive ports: expected 1 to 1024"))?;
    for _ in 0..span {
        let base = next_candidates(u32::from(n));
        if base.checked_add(n).is_none_or(|end| end > PORT_RANGE.end) {
            continue;
        }
        let held: std::io::Result<Vec<TcpListener>> = (0..n)
            .map(|i| TcpListener::bind(("127.0.0.1", base + i)))
            .collect();
        if held.is_ok() {
            return Ok(base);
        }
    }
    bail!(
        "no {n} consecutive free loopback ports in {}..{}",
        PORT_RANGE.start,
        PORT_RANGE.end
    )
}

/// `n` distinct free ports.
pub fn free_ports(n: usize) -> Result<Vec<u16>> {
    (0..n).map(|_| free_port()).collect()
}

/// The workspace root (the directory holding the workspace `Cargo.toml`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// A child process killed (SIGKILL) and reaped when dropped.
///
/// The child is spawned, watched and reaped by a keeper thread of its own that lives
/// exactly as long as the child. Envoy ties its life to the *thread* that started it
/// (`PR_SET_PDEATHSIG`, set during its start-up): started from a short-lived thread such as
/// a Tokio `spawn_blocking` worker, it received SIGTERM when that thread retired, 10 s
/// later, and a test running longer saw its streams cut mid-response.
#[derive(Debug)]
pub struct ChildGuard {
    name: String,
    pid: u32,
    stop: Option<mpsc::Sender<()>>,
    keeper: Option<JoinHandle<()>>,
    exited: Arc<Mutex<Option<ExitStatus>>>,
    log: Option<PathBuf>,
}

/// How often the keeper checks whether its child exited by itself.
const KEEPER_POLL: Duration = Duration::from_millis(20);

impl ChildGuard {
    /// Spawns `cmd` with stdout and stderr appended to `log` (when given) or discarded.
    pub fn spawn(name: &str, mut cmd: Command, log: Option<PathBuf>) -> Result<Self> {
        cmd.stdin(Stdio::null());
        match &log {
            Some(path) => {
                let f = std::fs::File::create(path)
                    .with_context(|| format!("creating log {}", path.display()))?;
                let f2 = f.try_clone()?;
                cmd.stdout(f).stderr(f2);
            }
            None => {
                cmd.stdout(Stdio::null()).stderr(Stdio::null());
            }
        }
        let (spawned_tx, spawned_rx) = mpsc::channel();
        let (stop, stop_rx) = mpsc::channel::<()>();
        let exited = Arc::new(Mutex::new(None));
        let keeper_exited = exited.clone();
        let description = format!("{cmd:?}");
        let keeper = std::thread::Builder::new()
            .name(format!("keeper-{name}"))
            .spawn(move || {
                let mut child = match cmd.spawn() {
                    Ok(child) => child,
                    Err(e) => {
                        let _ = spawned_tx.send(Err(e));
                        return;
                    }
                };
                let _ = spawned_tx.send(Ok(child.id()));
                loop {
                    match stop_rx.recv_timeout(KEEPER_POLL) {
                        Err(mpsc::RecvTimeoutError::Timeout) => {
                            if let Ok(Some(status)) = child.try_wait() {
                                *keeper_exited.lock() = Some(status);
                                // Exited by itself; stay until told, so the guard's view
                                // and the process table agree.
                                let _ = stop_rx.recv();
                                return;
                            }
                        }
                        Ok(()) | Err(mpsc::RecvTimeoutError::Disconnected) => {
                            let _ = child.kill();
                            if let Ok(status) = child.wait() {
                                *keeper_exited.lock() = Some(status);
                            }
                            return;
                        }
                    }
                }
            })
            .with_context(|| format!("starting a keeper thread for {name}"))?;
        let pid = spawned_rx
            .recv()
            .context("the keeper thread ended before spawning")?
            .with_context(|| format!("starting {name}: {description}"))?;
        Ok(ChildGuard {
            name: name.to_string(),
            pid,
            stop: Some(stop),
            keeper: Some(keeper),
            exited,
            log,
        })
    }

    /// The process id.
    pub fn id(&self) -> Option<u32> {
        Some(self.pid)
    }

    /// Fails (with the tail of the log) if the process has exited.
    pub fn check_running(&mut self) -> Result<()> {
        let status = *self.exited.lock();
        if let Some(status) = status {
            bail!(
                "{} exited with {status}; log tail:\n{}",
                self.name,
                self.log_tail(40)
            );
        }
        Ok(())
    }

    /// The last `lines` lines of the log, if there is one.
    pub fn log_tail(&self, lines: usize) -> String {
        let Some(path) = &self.log else {
            return String::from("(no log)");
        };
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Kills the process now (and waits until it is reaped).
    pub fn kill(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(keeper) = self.keeper.take() {
            let _ = keeper.join();
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Polls `check` every 20 ms until it returns `Ok(true)` or `timeout` passes.
pub fn wait_until(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> Result<bool>,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    let mut last_err = None;
    loop {
        match check() {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(e) => last_err = Some(e),
        }
        if Instant::now() >= deadline {
            let why = last_err
                .map(|e| format!(": last error: {e:#}"))
                .unwrap_or_default();
            bail!("timed out after {timeout:?} waiting for {what}{why}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether something accepts TCP connections at `addr`.
pub fn port_open(addr: SocketAddr) -> bool {
    TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
}

/// A minimal blocking HTTP/1.1 GET (for readiness and admin endpoints in tests).
pub fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .with_context(|| format!("connecting to {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("no HTTP status in reply from {addr}{path}"))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// The path of a workspace binary built by cargo for the current profile: looks next to the
/// running test executable (`target/<profile>/`), then under `CARGO_TARGET_DIR`.
pub fn cargo_bin(name: &str) -> Result<PathBuf> {
    if let Ok(p) = std::env::var(format!("CARGO_BIN_EXE_{name}")) {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe()?;
    for dir in exe.ancestors().skip(1).take(3) {
        let candidate = dir.join(name);
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    bail!(
        "binary {name} not found next to {}; build it first (cargo build -p {name})",
        exe.display()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_ports_are_distinct_bindable_and_outside_the_ephemeral_range() {
        let ports = free_ports(64).unwrap();
        let mut sorted = ports.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), 64, "{ports:?}");
        assert!(ports.iter().all(|p| PORT_RANGE.contains(p)), "{ports:?}");
        // Nothing else in this process takes ports from the range, and outgoing
        // connections use the ephemeral range: each port can be bound now.
        let held: Vec<TcpListener> = ports
            .iter()
            .map(|&p| TcpListener::bind(("127.0.0.1", p)).unwrap())
            .collect();
        assert_eq!(held.len(), 64);
    }

    #[test]
    fn a_port_run_is_consecutive_in_range_and_not_handed_out_again() {
        let base = free_port_run(8).unwrap();
        let run: Vec<u16> = (base..base + 8).collect();
        assert!(run.iter().all(|p| PORT_RANGE.contains(p)), "{run:?}");
        let others = free_ports(32).unwrap();
        assert!(
            others.iter().all(|p| !run.contains(p)),
            "{run:?} {others:?}"
        );
        let held: Vec<TcpListener> = run
            .iter()
            .map(|&p| TcpListener::bind(("127.0.0.1", p)).unwrap())
            .collect();
        assert_eq!(held.len(), 8);
        assert!(free_port_run(0).is_err() && free_port_run(5000).is_err());
    }

    #[test]
    fn child_is_killed_on_drop() {
        let mut cmd = Command::new("sleep");
        cmd.arg("30");
        let guard = ChildGuard::spawn("sleep", cmd, None).unwrap();
        let pid = guard.id().unwrap();
        drop(guard);
        assert!(
            !Path::new(&format!("/proc/{pid}/cmdline")).exists()
                || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .map(|s| s.contains(") Z"))
                    .unwrap_or(true)
        );
    }

    #[test]
    fn wait_until_times_out_with_the_reason() {
        let err = wait_until("nothing", Duration::from_millis(50), || {
            anyhow::bail!("still down")
        })
        .unwrap_err();
        assert!(format!("{err:#}").contains("still down"));
    }
}
