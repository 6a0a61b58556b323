//! The human summary of a report, printed on stdout at the end of a run.

use std::fmt::Write;

use crate::report::Report;

pub fn render(report: &Report) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "scenario {}: {} process(es), {:.1} s, throughput {:.1}/s",
        report.scenario, report.processes, report.duration_s, report.throughput_per_s
    );
    if !report.latency_us.is_empty() {
        let _ = writeln!(
            out,
            "\n{:<20} {:>9} {:>10} {:>10} {:>10} {:>10}",
            "latency (ms)", "count", "p50", "p99", "p99.9", "max"
        );
        for (name, latency) in &report.latency_us {
            let _ = writeln!(
                out,
                "{:<20} {:>9} {:>10} {:>10} {:>10} {:>10}",
                name,
                latency.count,
                millis(latency.p50),
                millis(latency.p99),
                millis(latency.p999),
                millis(latency.max)
            );
        }
    }
    let _ = writeln!(out, "\ncounts");
    for (name, n) in &report.counts {
        let _ = writeln!(out, "  {name:<28} {n}");
    }
    if let Some(license) = &report.license {
        let _ = writeln!(out, "\nlicense rounds (limit {})", license.limit);
        let _ = writeln!(
            out,
            "  {:>5} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
            "round", "attempted", "admitted", "refused", "failed", "closed", "abandoned"
        );
        for round in &license.rounds {
            let _ = writeln!(
                out,
                "  {:>5} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
                round.round,
                round.attempted,
                round.admitted,
                round.refused,
                round.failed,
                round.closed,
                round.abandoned
            );
        }
    }
    if let Some(memory) = &report.memory {
        let kb = |value: Option<u64>| value.map_or("-".to_owned(), |kb| format!("{kb} kB"));
        let _ = writeln!(out, "\nmemory");
        let _ = writeln!(out, "  server rss before            {}", kb(memory.server_rss_before_kb));
        let _ = writeln!(out, "  server rss, sessions open    {}", kb(memory.server_rss_opened_kb));
        let _ = writeln!(out, "  server rss after the hold    {}", kb(memory.server_rss_after_kb));
        if let Some(bytes) = memory.server_bytes_per_session {
            let _ = writeln!(out, "  server bytes per session     {bytes:.0}");
        }
        let _ = writeln!(out, "  load generator rss           {}", kb(memory.loadgen_rss_kb));
    }
    if let Some(storm) = &report.chat_storm {
        let drain = storm.queue_drain_ms.map_or("-".to_owned(), |ms| format!("{ms:.1} ms"));
        let _ = writeln!(out, "\nrouting {}, queue drain time {drain}", storm.routing);
    }
    if report.errors_by_reason.is_empty() {
        let _ = writeln!(out, "\nerrors: none");
    } else {
        let _ = writeln!(out, "\nerrors by reason");
        for (reason, n) in &report.errors_by_reason {
            let _ = writeln!(out, "  {reason:<28} {n}");
        }
    }
    if report.invariants.ok {
        let _ = writeln!(out, "\ninvariants: ok");
    } else {
        let _ = writeln!(out, "\ninvariants: {} violation(s)", report.invariants.violations_total);
        for violation in &report.invariants.violations {
            let _ = writeln!(out, "  {violation}");
        }
    }
    for precondition in &report.invariants.preconditions {
        let _ = writeln!(out, "  precondition: {precondition}");
    }
    out
}

fn millis(micros: u64) -> String {
    format!("{:.3}", micros as f64 / 1000.0)
}
