//! What the operating system says about the processes under test, read from `/proc`: CPU time
//! (cores used over a measured interval), resident memory now and at its peak, and which
//! process listens on a loopback port (to find a Cassandra or Redis the harness did not start).

use anyhow::Context as _;
use std::time::Instant;

/// A process the harness watches: a display name and its pid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Watched {
    /// Name in the report (`read-svc`, `redis`, `cassandra`, `esq-bench`, ...).
    pub name: String,
    /// Process id.
    pub pid: u32,
}

impl Watched {
    /// A watched process.
    pub fn new(name: impl Into<String>, pid: u32) -> Self {
        Self {
            name: name.into(),
            pid,
        }
    }

    /// The harness's own process (the load generator of the Rust-client rows).
    pub fn me() -> Self {
        Self::new("esq-bench", std::process::id())
    }
}

/// Clock ticks per second of `/proc/<pid>/stat` times (`getconf CLK_TCK`, 100 if unknown).
pub fn ticks_per_second() -> f64 {
    static HZ: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *HZ.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse::<f64>().ok())
            .filter(|hz| *hz > 0.0)
            .unwrap_or(100.0)
    })
}

/// CPU ticks (user + system, threads included) the process has used so far; `None` once it
/// is gone.
pub fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces: fields count from
    // the last ')'. utime and stime are fields 14 and 15 (1-based), so 12 and 13 after it.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// A CPU sample in progress: started by [`Cpu::sample`], read by [`Cpu::cores`].
#[derive(Debug, Clone)]
pub struct Cpu {
    start: Instant,
    procs: Vec<(Watched, Option<u64>)>,
}

/// Cores one process used over a measured interval (1.0 = one core busy the whole time).
#[derive(Debug, Clone, PartialEq)]
pub struct CpuUse {
    /// The process's name.
    pub name: String,
    /// Cores used on average.
    pub cores: f64,
}

impl Cpu {
    /// Starts sampling `procs` now.
    pub fn sample(procs: &[Watched]) -> Self {
        Self {
            start: Instant::now(),
            procs: procs
                .iter()
                .map(|w| (w.clone(), cpu_ticks(w.pid)))
                .collect(),
        }
    }

    /// Cores each process used since [`Cpu::sample`] (processes that vanished are left out).
    pub fn cores(&self) -> Vec<CpuUse> {
        let secs = self.start.elapsed().as_secs_f64().max(1e-6);
        let hz = ticks_per_second();
        self.procs
            .iter()
            .filter_map(|(w, before)| {
                let before = (*before)?;
                let after = cpu_ticks(w.pid)?;
                Some(CpuUse {
                    name: w.name.clone(),
                    cores: after.saturating_sub(before) as f64 / hz / secs,
                })
            })
            .collect()
    }
}

fn status_kb(pid: u32, field: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("process {pid} is gone"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with(field))
        .with_context(|| format!("no {field} in /proc/{pid}/status"))?;
    line[field.len()..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .with_context(|| format!("unreadable {line:?}"))
}

/// Peak resident memory (VmHWM) of a process so far, in MiB.
pub fn peak_rss_mib(pid: u32) -> anyhow::Result<f64> {
    Ok(status_kb(pid, "VmHWM:")? as f64 / 1024.0)
}

/// Resident memory (VmRSS) of a process now, in MiB.
pub fn rss_mib(pid: u32) -> anyhow::Result<f64> {
    Ok(status_kb(pid, "VmRSS:")? as f64 / 1024.0)
}

/// The pid of the process listening on TCP `port` (IPv4 or IPv6), if this user can see it:
/// the LISTEN socket's inode from `/proc/net/tcp{,6}`, then the process holding it in
/// `/proc/*/fd`.
pub fn pid_listening_on(port: u16) -> Option<u32> {
    let mut inodes = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // local_address is HEXIP:HEXPORT; st 0A is LISTEN; inode is field 10.
            let (Some(local), Some(st), Some(inode)) = (f.get(1), f.get(3), f.get(9)) else {
                continue;
            };
            let local_port = local
                .rsplit(':')
                .next()
                .and_then(|p| u16::from_str_radix(p, 16).ok());
            if *st == "0A" && local_port == Some(port) {
                inodes.push(format!("socket:[{inode}]"));
            }
        }
    }
    if inodes.is_empty() {
        return None;
    }
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if let Ok(target) = std::fs::read_link(fd.path()) {
                if inodes.iter().any(|i| target.as_os_str() == i.as_str()) {
                    return Some(pid);
                }
            }
        }
    }
    None
}

/// Machine facts for the report: cores, memory, kernel.
pub fn machine() -> String {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0 / 1024.0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!(
        "{cores} cores (nproc), {mem_gib:.1} GiB RAM, Linux {}",
        kernel.trim()
    )
}

/// `--pin`: the CPU affinity of a deployment where the database has a machine (here a core) of
/// its own. Cassandra's threads go to core 0; Redis, this process and everything it starts
/// afterwards (the services, `esq dev`, ghz, redis-benchmark) go to the other cores. Both sides
/// of every row run pinned the same way. [`Pinned::restore`] gives every core back.
pub struct Pinned {
    pids: Vec<u32>,
    all: String,
    /// The header line of the report that says so.
    pub fact: String,
}

impl Pinned {
    /// Pins `cassandra` to core 0 and `others` and this process to cores 1..n; fails on a
    /// machine of one core, without `taskset`, or when a process cannot be pinned (then
    /// every process it had pinned has every core again).
    pub fn apply(cassandra: u32, others: &[u32]) -> anyhow::Result<Self> {
        let n = std::thread::available_parallelism()?.get();
        anyhow::ensure!(
            n >= 2,
            "--pin needs at least 2 cores; this process may use {n}"
        );
        let rest = if n == 2 {
            "1".to_owned()
        } else {
            format!("1-{}", n - 1)
        };
        let mut pids = vec![cassandra];
        pids.extend(others);
        pids.push(std::process::id());
        let pinned = Self {
            pids,
            all: format!("0-{}", n - 1),
            fact: format!(
                "pinned (--pin): Cassandra on core 0; Redis, esq-bench and every process it \
                 starts on cores {rest}"
            ),
        };
        let pin_all = || {
            taskset(cassandra, "0")?;
            for &pid in &pinned.pids[1..] {
                taskset(pid, &rest)?;
            }
            anyhow::Ok(())
        };
        match pin_all() {
            Ok(()) => Ok(pinned),
            Err(e) => {
                // Half pinned is worse than not: give back what was taken.
                pinned.restore();
                Err(e)
            }
        }
    }

    /// Every pinned process (still running) may use every core again.
    pub fn restore(&self) {
        for &pid in &self.pids {
            if let Err(e) = taskset(pid, &self.all) {
                eprintln!("esq-bench: giving process {pid} every core back failed: {e:#}");
            }
        }
    }
}

/// Sets the affinity of every thread of `pid` to `cpus` (a `taskset -c` list).
fn taskset(pid: u32, cpus: &str) -> anyhow::Result<()> {
    let out = std::process::Command::new("taskset")
        .args(["-a", "-p", "-c", cpus, &pid.to_string()])
        .output()
        .context("running taskset (util-linux)")?;
    anyhow::ensure!(
        out.status.success(),
        "taskset -a -p -c {cpus} {pid}: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_is_readable() {
        let pid = std::process::id();
        assert!(cpu_ticks(pid).is_some());
        assert!(peak_rss_mib(pid).expect("VmHWM") > 0.0);
        assert!(rss_mib(pid).expect("VmRSS") > 0.0);
    }

    #[test]
    fn busy_loop_shows_as_cpu() {
        let pid = std::process::id();
        let cpu = Cpu::sample(&[Watched::me()]);
        let before = cpu_ticks(pid).expect("ticks");
        // Spin until the kernel has charged this process a few ticks (a condition, not a
        // time: on a busy machine that may take a while; the bound is only against a hang).
        let give_up = Instant::now() + std::time::Duration::from_secs(120);
        let mut x = 0u64;
        while cpu_ticks(pid).expect("ticks") < before + 3 && Instant::now() < give_up {
            for _ in 0..100_000 {
                x = x.wrapping_mul(31).wrapping_add(1);
            }
        }
        std::hint::black_box(x);
        let used = cpu.cores();
        assert_eq!(used.len(), 1);
        assert_eq!(used[0].name, "esq-bench");
        assert!(used[0].cores > 0.0, "{used:?}");
    }

    #[test]
    fn listener_is_found_by_port() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = l.local_addr().expect("addr").port();
        assert_eq!(pid_listening_on(port), Some(std::process::id()));
    }
}
