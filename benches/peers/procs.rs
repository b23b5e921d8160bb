//! The bench's child processes: started pinned to one core, stopped by their own PID (and the
//! descendants recorded before the signal), and their CPU time read from `/proc`.
//!
//! Every PID started is also in a process-wide list, so that Ctrl-C or a TERM to the bench
//! stops them too (`on_signal_cleanup`), and `setpriv --pdeathsig KILL` (when available) makes
//! the kernel kill a child whose bench died without running any clean-up.

use anyhow::{bail, Context};
use std::collections::HashMap;
use std::io::Read;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// PIDs started and not yet reaped.
static LIVE: Mutex<Vec<u32>> = Mutex::new(Vec::new());
/// Set once a signal arrived: nothing new is started after it.
pub static STOPPING: AtomicBool = AtomicBool::new(false);

fn has_pdeathsig() -> bool {
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        Command::new("setpriv")
            .arg("--help")
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("--pdeathsig"))
    })
}

/// `taskset -c CPU PROGRAM ARGS…`, behind `setpriv --pdeathsig KILL` when there is one. Both
/// exec, so the PID is the program's.
pub fn pinned(cpu: u32, program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut cmd = if has_pdeathsig() {
        let mut c = Command::new("setpriv");
        c.args(["--pdeathsig", "KILL", "taskset"]);
        c
    } else {
        Command::new("taskset")
    };
    cmd.arg("-c").arg(cpu.to_string()).arg(program);
    cmd.stdin(Stdio::null());
    cmd
}

/// A long-running child: a peer, the upstream or Redis.
pub struct Proc {
    pub name: String,
    pub pid: u32,
    child: Option<Child>,
    /// The signal that stops it promptly (`TERM`, or `INT` for pingora's fast shutdown).
    stop_signal: &'static str,
    pub log: PathBuf,
}

impl Proc {
    /// Starts `cmd` with stdout and stderr in `log`.
    pub fn spawn(
        name: &str,
        mut cmd: Command,
        log: &Path,
        stop_signal: &'static str,
    ) -> anyhow::Result<Proc> {
        if STOPPING.load(Ordering::SeqCst) {
            bail!("interrupted");
        }
        let out = std::fs::File::create(log).with_context(|| format!("creating {log:?}"))?;
        cmd.stdout(out.try_clone()?).stderr(out);
        let child = cmd.spawn().with_context(|| format!("starting {name}"))?;
        let pid = child.id();
        lock_live().push(pid);
        Ok(Proc {
            name: name.to_string(),
            pid,
            child: Some(child),
            stop_signal,
            log: log.to_path_buf(),
        })
    }

    /// Still running?
    pub fn alive(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// The last lines of its log, for error messages.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }

    /// Stops it and whatever it started (nginx's worker): the stop signal, 5 s, then KILL.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let kids = descendants(self.pid);
        signal(self.pid, self.stop_signal);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline && matches!(child.try_wait(), Ok(None)) {
            std::thread::sleep(Duration::from_millis(20));
        }
        if matches!(child.try_wait(), Ok(None)) {
            let _ = child.kill();
        }
        let _ = child.wait();
        for k in kids {
            if Path::new(&format!("/proc/{k}")).exists() {
                signal(k, "KILL");
            }
        }
        lock_live().retain(|&p| p != self.pid);
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

fn lock_live() -> std::sync::MutexGuard<'static, Vec<u32>> {
    LIVE.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs a short-lived pinned command (wrk, the fixed-rate client) to its end, registered like
/// a `Proc` so that a signal to the bench stops it too.
pub fn run_output(name: &str, mut cmd: Command) -> anyhow::Result<Output> {
    if STOPPING.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let child = cmd.spawn().with_context(|| format!("starting {name}"))?;
    let pid = child.id();
    lock_live().push(pid);
    let out = child.wait_with_output();
    lock_live().retain(|&p| p != pid);
    out.with_context(|| format!("waiting for {name}"))
}

/// After Ctrl-C or TERM: stops every child still running (TERM, then KILL after 3 s).
pub fn kill_all_live() {
    STOPPING.store(true, Ordering::SeqCst);
    let pids: Vec<u32> = lock_live().clone();
    let mut all = Vec::new();
    for &p in &pids {
        all.push(p);
        all.extend(descendants(p));
    }
    for &p in &pids {
        signal(p, "TERM");
    }
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline && all.iter().any(|p| running(*p)) {
        std::thread::sleep(Duration::from_millis(50));
    }
    for p in all {
        if running(p) {
            signal(p, "KILL");
        }
    }
}

/// A PID that exists and is not a zombie (a zombie child of ours has exited).
fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rfind(')').map(|i| s[i + 1..].trim_start().chars().next()))
        .flatten()
        .is_some_and(|state| state != 'Z')
}

fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// `(ppid, utime+stime+cutime+cstime)` of every process, by PID.
fn proc_table() -> HashMap<u32, (u32, u64, String)> {
    let mut t = HashMap::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return t;
    };
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if let Some((ppid, ticks, comm)) = stat(pid) {
            t.insert(pid, (ppid, ticks, comm));
        }
    }
    t
}

fn stat(pid: u32) -> Option<(u32, u64, String)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let comm = text[open + 1..close].to_string();
    // After `(comm)`: state ppid … utime(14) stime cutime cstime, counted from field 3.
    let f: Vec<&str> = text[close + 1..].split_whitespace().collect();
    let ppid = f.get(1)?.parse().ok()?;
    let ticks = f
        .get(11..15)?
        .iter()
        .map(|v| v.parse::<u64>().ok())
        .sum::<Option<u64>>()?;
    Some((ppid, ticks, comm))
}

fn descendants(pid: u32) -> Vec<u32> {
    descendants_in(&proc_table(), pid)
}

fn descendants_in(t: &HashMap<u32, (u32, u64, String)>, pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let mut queue = vec![pid];
    while let Some(p) = queue.pop() {
        for (&c, (ppid, _, _)) in t {
            if *ppid == p && !out.contains(&c) {
                out.push(c);
                queue.push(c);
            }
        }
    }
    out
}

/// Clock ticks per second of `/proc` times (`getconf CLK_TCK`, 100 on Linux).
pub fn clk_tck() -> f64 {
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

/// CPU seconds used so far by the process trees `pids`, and by every process named `comm`.
pub struct CpuSnap {
    pub trees: Vec<f64>,
    pub by_name: f64,
    /// `/proc/stat` per core: (busy, steal, total) jiffies.
    pub cores: Vec<(u64, u64, u64)>,
}

pub fn cpu_snapshot(pids: &[u32], comm: &str) -> CpuSnap {
    let t = proc_table();
    let tck = clk_tck();
    let trees = pids
        .iter()
        .map(|&p| {
            let own = t.get(&p).map_or(0, |e| e.1);
            let kids: u64 = descendants_in(&t, p)
                .iter()
                .map(|c| t.get(c).map_or(0, |e| e.1))
                .sum();
            (own + kids) as f64 / tck
        })
        .collect();
    let by_name = t
        .values()
        .filter(|e| e.2 == comm)
        .map(|e| e.1 as f64 / tck)
        .sum();
    CpuSnap {
        trees,
        by_name,
        cores: core_times(),
    }
}

fn core_times() -> Vec<(u64, u64, u64)> {
    let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    text.lines()
        .filter(|l| l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit))
        .map(|l| {
            let v: Vec<u64> = l
                .split_whitespace()
                .skip(1)
                .map(|x| x.parse().unwrap_or(0))
                .collect();
            let g = |i: usize| v.get(i).copied().unwrap_or(0);
            // user nice system idle iowait irq softirq steal
            let busy = g(0) + g(1) + g(2) + g(5) + g(6);
            (busy, g(7), v.iter().take(8).sum())
        })
        .collect()
}

/// A port nothing listens on now (the kernel's choice; released before the child binds it).
pub fn free_port() -> anyhow::Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").context("binding a free port")?;
    Ok(l.local_addr()?.port())
}

/// Waits until `addr` accepts, or the process exits, or 20 s pass.
pub fn wait_accepting(p: &mut Proc, addr: SocketAddr) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        if !p.alive() {
            bail!("{} exited at start:\n{}", p.name, p.log_tail());
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    bail!(
        "{} does not accept on {addr} after 20 s:\n{}",
        p.name,
        p.log_tail()
    )
}

/// One `Connection: close` GET: (status, body). Headers are `(name, value)`.
pub fn http_get(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> anyhow::Result<(u16, Vec<u8>)> {
    use std::io::Write;
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req += &format!("{k}: {v}\r\n");
    }
    req += "\r\n";
    s.write_all(req.as_bytes())?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    let head_end = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .with_context(|| format!("no HTTP head in {:?}", String::from_utf8_lossy(&buf)))?;
    let head = String::from_utf8_lossy(&buf[..head_end]);
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("no status in {head:?}"))?;
    let mut body = buf[head_end + 4..].to_vec();
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        body = dechunk(&body);
    }
    Ok((status, body))
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = b.windows(2).position(|w| w == b"\r\n") {
        let size = std::str::from_utf8(&b[..eol])
            .ok()
            .and_then(|s| usize::from_str_radix(s.split(';').next().unwrap_or("").trim(), 16).ok())
            .unwrap_or(0);
        if size == 0 || b.len() < eol + 2 + size {
            break;
        }
        out.extend_from_slice(&b[eol + 2..eol + 2 + size]);
        b = &b[(eol + 4 + size).min(b.len())..];
    }
    out
}
