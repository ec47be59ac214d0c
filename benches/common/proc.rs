//! CPU time from `/proc`, for the benchmarks that report it. Include it with
//! `#[path = "common/proc.rs"] mod proc;`.

use std::path::Path;

/// Clock ticks per second (`getconf CLK_TCK`; 100 when it cannot be asked).
pub fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// utime + stime, in ticks, from a `stat` file (the comm field may hold spaces).
pub fn stat_ticks(path: &Path) -> Option<u64> {
    let s = std::fs::read_to_string(path).ok()?;
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    // rest starts at field 3 (state); utime is field 14, stime field 15.
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// A `Key: value` line of `/proc/PID/FILE` (`VmHWM:` of `status`, say), its first number.
#[allow(dead_code)]
pub fn proc_field(pid: u32, file: &str, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/{file}")).ok()?;
    text.lines().find(|l| l.starts_with(key)).and_then(|l| l.split_whitespace().nth(1)).and_then(|v| v.parse().ok())
}

/// Context switches (voluntary and not) of every thread a process has now, summed over
/// `/proc/PID/task/*/status`. Threads that have ended are not counted (tokio's blocking
/// threads live 10 s idle, longer than a benchmark case waits between its two readings).
#[allow(dead_code)]
pub fn context_switches(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return 0 };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("status")).ok())
        .map(|status| {
            status
                .lines()
                .filter(|l| l.starts_with("voluntary_ctxt_switches:") || l.starts_with("nonvoluntary_ctxt_switches:"))
                .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                .sum::<u64>()
        })
        .sum()
}

/// The loopback TCP port a process listens on, from /proc/net/tcp and its socket inodes.
#[allow(dead_code)]
pub fn listening_port(pid: u32) -> Option<std::net::SocketAddr> {
    let inodes: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .ok()?
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .filter_map(|l| {
            l.to_str().and_then(|s| s.strip_prefix("socket:[")).map(|s| s.trim_end_matches(']').to_string())
        })
        .collect();
    let table = std::fs::read_to_string("/proc/net/tcp").ok()?;
    table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        // state 0A = LISTEN, local address 0100007F:PORT = 127.0.0.1
        if f.get(3) == Some(&"0A") && inodes.iter().any(|i| Some(&i.as_str()) == f.get(9)) {
            let port = u16::from_str_radix(f[1].split(':').nth(1)?, 16).ok()?;
            Some(std::net::SocketAddr::from(([127, 0, 0, 1], port)))
        } else {
            None
        }
    })
}
