//! What the benchmark binaries (`src/bin/`) share: their arguments and statistics.

/// The `n`th command-line argument as a number, or `default`.
pub fn arg(n: usize, default: u64) -> u64 {
    std::env::args()
        .nth(n)
        .map(|a| {
            a.parse()
                .unwrap_or_else(|_| panic!("argument {n} must be a number"))
        })
        .unwrap_or(default)
}

/// CPU time (user + system) a process has used so far, from `/proc/PID/stat`, in
/// milliseconds; `None` once it is gone. `pid` 0 is this process.
pub fn cpu_ms(pid: u32) -> Option<f64> {
    let path = if pid == 0 {
        "/proc/self/stat".to_owned()
    } else {
        format!("/proc/{pid}/stat")
    };
    let stat = std::fs::read_to_string(path).ok()?;
    // The command name (field 2) may hold spaces; the fields after it do not.
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line, in clock ticks of the
    // userspace ABI (USER_HZ, 100 per second on Linux).
    let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 * 10.0)
}

/// The `p` quantile (0–1) of ascending `sorted` samples, nearest rank; NaN when empty.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

#[cfg(test)]
mod tests {
    #[test]
    fn percentiles() {
        let v = [1.0, 2.0, 3.0, 4.0, 5.0];
        assert_eq!(super::percentile(&v, 0.5), 3.0);
        assert_eq!(super::percentile(&v, 0.99), 5.0);
        assert!(super::percentile(&[], 0.5).is_nan());
    }
}
