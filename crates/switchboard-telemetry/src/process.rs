//! The standard process metrics, read from `/proc` at each scrape (Linux; elsewhere none).

use std::fmt::Write;

/// Clock ticks per second of `/proc/*/stat` times (USER_HZ, as the kernel tells the process).
fn ticks_per_second() -> f64 {
    rustix::param::clock_ticks_per_second().max(1) as f64
}

pub(crate) fn render() -> String {
    let mut text = String::new();
    let Some(stat) = read_stat() else { return text };
    let mut metric = |name: &str, kind: &str, help: &str, value: f64| {
        let _ = writeln!(text, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}");
    };
    metric(
        "process_cpu_seconds_total",
        "counter",
        "Total user and system CPU time spent in seconds.",
        stat.cpu_seconds,
    );
    metric("process_virtual_memory_bytes", "gauge", "Virtual memory size in bytes.", stat.virtual_bytes);
    if let Some(rss) = resident_bytes() {
        metric("process_resident_memory_bytes", "gauge", "Resident memory size in bytes.", rss);
    }
    if let Some(start) = boot_time_seconds().map(|boot| boot + stat.start_ticks / ticks_per_second()) {
        metric(
            "process_start_time_seconds",
            "gauge",
            "Start time of the process since the Unix epoch in seconds.",
            start,
        );
    }
    if let Ok(entries) = std::fs::read_dir("/proc/self/fd") {
        metric("process_open_fds", "gauge", "Number of open file descriptors.", entries.count() as f64);
    }
    if let Some(max) = max_fds() {
        metric("process_max_fds", "gauge", "Maximum number of open file descriptors.", max);
    }
    text
}

struct Stat {
    cpu_seconds: f64,
    virtual_bytes: f64,
    start_ticks: f64,
}

fn read_stat() -> Option<Stat> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name (field 2) is in parentheses and may hold spaces: the fields after it follow the last ')'.
    let after = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    // `after` starts at field 3 (state): field n is at index n - 3.
    let field = |n: usize| fields.get(n - 3).and_then(|value| value.parse::<f64>().ok());
    Some(Stat {
        cpu_seconds: (field(14)? + field(15)?) / ticks_per_second(),
        start_ticks: field(22)?,
        virtual_bytes: field(23)?,
    })
}

fn resident_bytes() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|line| line.starts_with("VmRSS:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024.0)
}

fn boot_time_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    stat.lines().find_map(|line| line.strip_prefix("btime ")).and_then(|value| value.trim().parse().ok())
}

fn max_fds() -> Option<f64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|line| line.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The value of metric `name` in `text`, which must have it.
    fn value_of(text: &str, name: &str) -> f64 {
        let value = text
            .lines()
            .find_map(|line| line.strip_prefix(&format!("{name} ")))
            .unwrap_or_else(|| panic!("{name} missing from {text}"));
        value.parse().unwrap_or_else(|_| panic!("{name} {value}"))
    }

    #[test]
    fn the_process_metrics_are_read_on_linux() {
        let text = render();
        if cfg!(target_os = "linux") {
            for name in [
                "process_cpu_seconds_total",
                "process_resident_memory_bytes",
                "process_virtual_memory_bytes",
                "process_start_time_seconds",
                "process_open_fds",
                "process_max_fds",
            ] {
                let value = value_of(&text, name);
                assert!(value >= 0.0, "{name} {value}");
            }
            let rss = value_of(&text, "process_resident_memory_bytes");
            assert!(rss > 1_000_000.0, "a test process holds more than a megabyte: {rss}");
            // The start time is the boot time plus the start in clock ticks: with the wrong ticks per second,
            // a process started moments ago would seem to have started long before or after now.
            let started = value_of(&text, "process_start_time_seconds");
            // Now on the same scale: the boot time plus the time since boot.
            let uptime = std::fs::read_to_string("/proc/uptime").unwrap();
            let uptime: f64 = uptime.split_whitespace().next().unwrap().parse().unwrap();
            let now = boot_time_seconds().unwrap() + uptime;
            assert!((now - 120.0..=now + 1.0).contains(&started), "started at {started}, now {now}");
        }
    }
}
