//! The figures of the three targets side by side, their ratios (Switchboard / bare relay), and the goals of
//! the comparison judged against them.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use crate::compare::cpu::LOAD_GENERATOR;
use crate::compare::figures::{ChatStorm, Idle, License, Search, Steady};

/// Latency allowed above the bare relay's p99, in microseconds.
pub const P99_MARGIN_US: u64 = 3_000;
/// The share of the bare relay's sustained throughput Switchboard must reach.
pub const MIN_THROUGHPUT_SHARE: f64 = 0.25;
/// How many times the bare relay's memory per idle session Switchboard may use.
pub const MAX_MEMORY_FACTOR: f64 = 2.0;
/// The offer latency p99 ceiling, in microseconds.
pub const MAX_OFFER_P99_US: u64 = 5_000;
/// The share of its target rate a steady run must achieve to count as sustained.
pub const SUSTAINED_SHARE: f64 = 0.9;

/// Everything measured on one target.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TargetFigures {
    pub steady: Option<Steady>,
    pub search: Option<Search>,
    pub idle: Option<Idle>,
    pub chat_storm: Option<ChatStorm>,
    pub license: Option<License>,
    /// What went wrong, when the target could not be measured (in part or at all).
    pub errors: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Pass,
    Fail,
    /// A figure is missing: the goal could not be judged.
    Unknown,
}

#[derive(Debug, Clone, Serialize)]
pub struct Goal {
    pub target: &'static str,
    pub goal: String,
    pub measured: String,
    pub verdict: Verdict,
}

fn ms(us: u64) -> String {
    format!("{:.2} ms", us as f64 / 1000.0)
}

fn verdict(pass: bool) -> Verdict {
    if pass { Verdict::Pass } else { Verdict::Fail }
}

/// The goals of one Switchboard target (`serve` or the cluster) against the bare relay.
pub fn judge(target: &'static str, relay: &TargetFigures, switchboard: &TargetFigures, rate: f64) -> Vec<Goal> {
    let mut goals = Vec::new();
    let steady = |figures: &TargetFigures| figures.steady.clone().filter(|steady| steady.message.is_some());
    goals.push(match (steady(relay), steady(switchboard)) {
        (Some(bare), Some(measured)) => {
            let (bare_p99, p99) = (bare.message.unwrap_or_default().p99, measured.message.unwrap_or_default().p99);
            let mut text = format!("p99 {} vs bare {} (+{})", ms(p99), ms(bare_p99), ms(p99.saturating_sub(bare_p99)));
            let healthy = measured.sustained(SUSTAINED_SHARE) && bare.sustained(SUSTAINED_SHARE);
            if !healthy {
                text.push_str("; a run did not sustain its rate without errors");
            }
            Goal {
                target,
                goal: format!("message latency p99 within 3 ms of the bare relay's at {rate:.0}/s"),
                measured: text,
                verdict: verdict(healthy && p99 <= bare_p99 + P99_MARGIN_US),
            }
        }
        _ => unknown(target, "message latency p99 within 3 ms of the bare relay's", "no steady figures"),
    });
    goals.push(match (&relay.search, &switchboard.search) {
        (Some(bare), Some(measured)) if bare.sustained_per_s > 0.0 => {
            let share = measured.sustained_per_s / bare.sustained_per_s;
            let mut text =
                format!("{:.0}/s vs bare {:.0}/s ({:.2}×)", measured.sustained_per_s, bare.sustained_per_s, share);
            if bare.capped {
                text.push_str("; the bare figure is a lower bound (the search stopped at its last step)");
            }
            Goal {
                target,
                goal: "sustained throughput at least a quarter of the bare relay's".into(),
                measured: text,
                verdict: verdict(share >= MIN_THROUGHPUT_SHARE),
            }
        }
        _ => unknown(target, "sustained throughput at least a quarter of the bare relay's", "no throughput search"),
    });
    let per_session = |figures: &TargetFigures| figures.idle.as_ref().and_then(|idle| idle.bytes_per_session);
    goals.push(match (per_session(relay), per_session(switchboard)) {
        (Some(bare), Some(measured)) if bare > 0.0 => Goal {
            target,
            goal: "memory per idle customer session at most twice the bare relay's".into(),
            measured: format!(
                "{:.1} KiB vs bare {:.1} KiB ({:.2}×)",
                measured / 1024.0,
                bare / 1024.0,
                measured / bare
            ),
            verdict: verdict(measured <= MAX_MEMORY_FACTOR * bare),
        },
        _ => unknown(target, "memory per idle customer session at most twice the bare relay's", "no idle figures"),
    });
    goals.push(match switchboard.chat_storm.as_ref().and_then(|storm| storm.offer.map(|offer| (storm, offer))) {
        Some((storm, offer)) => Goal {
            target,
            goal: format!("offer latency p99 under 5 ms at {:.0} chat starts/s", storm.rate_per_s),
            measured: format!(
                "p99 {} (p50 {}, {} offers, {} errors, {} invariant violations; the load generator's own lateness p99 {})",
                ms(offer.p99),
                ms(offer.p50),
                offer.count,
                storm.errors,
                storm.violations,
                storm.schedule_lag.map_or_else(|| "unknown".to_owned(), |lag| ms(lag.p99)),
            ),
            verdict: verdict(offer.p99 < MAX_OFFER_P99_US && offer.count > 0 && storm.violations == 0),
        },
        None => unknown(target, "offer latency p99 under 5 ms", "no chat-storm offer latency"),
    });
    goals.push(match &switchboard.license {
        Some(license) if !license.rounds.is_empty() => {
            let admitted: Vec<String> = license.rounds.iter().map(|round| round.admitted.to_string()).collect();
            Goal {
                target,
                goal: format!("admitted sessions exactly the limit ({}) in every license burst", license.limit),
                measured: format!("admitted per round: {}", admitted.join(", ")),
                verdict: verdict(license.exact() && license.violations == 0),
            }
        }
        _ => unknown(target, "admitted sessions exactly the limit in every license burst", "no license rounds"),
    });
    goals
}

fn unknown(target: &'static str, goal: &str, why: &str) -> Goal {
    Goal { target, goal: goal.into(), measured: why.into(), verdict: Verdict::Unknown }
}

#[derive(Clone, Copy)]
enum Unit {
    PerSecond,
    Millis,
    KiB,
    Count,
    Micros,
}

impl Unit {
    fn show(self, value: Option<f64>) -> String {
        match value {
            None => "—".into(),
            Some(value) => match self {
                Unit::PerSecond => format!("{value:.0}/s"),
                Unit::Millis => format!("{:.2} ms", value / 1000.0),
                Unit::KiB => format!("{:.1} KiB", value / 1024.0),
                Unit::Count => format!("{value:.0}"),
                Unit::Micros => format!("{value:.0} µs"),
            },
        }
    }
}

/// The rows of the table: label, unit, whether Switchboard / bare is shown.
const ROWS: [(&str, Unit, bool); 12] = [
    ("steady: achieved", Unit::PerSecond, true),
    ("  message latency p50", Unit::Millis, true),
    ("  message latency p99", Unit::Millis, true),
    ("  message latency p99.9", Unit::Millis, true),
    ("  ack latency p99", Unit::Millis, true),
    ("  errors", Unit::Count, false),
    ("  CPU per message, server", Unit::Micros, true),
    // The load generator's own work: no ratio of the servers'.
    ("  CPU per message, load generator", Unit::Micros, false),
    ("sustained throughput", Unit::PerSecond, true),
    ("memory per idle session", Unit::KiB, true),
    ("offer latency p99", Unit::Millis, false),
    ("license rounds exact", Unit::Count, false),
];

/// The figures of one target, in the order of [`ROWS`].
fn row_values(figures: &TargetFigures) -> [Option<f64>; 12] {
    let steady = figures.steady.as_ref();
    let message = steady.and_then(|steady| steady.message);
    let license = figures.license.as_ref().map(|license| {
        license
            .rounds
            .iter()
            .filter(|round| round.failed == 0 && round.admitted == round.attempted.min(license.limit))
            .count() as f64
    });
    [
        steady.map(|steady| steady.achieved_per_s),
        message.map(|latency| latency.p50 as f64),
        message.map(|latency| latency.p99 as f64),
        message.map(|latency| latency.p999 as f64),
        steady.and_then(|steady| steady.ack).map(|latency| latency.p99 as f64),
        steady.map(|steady| steady.errors as f64),
        steady.and_then(|steady| server_cpu(&steady.cpu_us_per_message)),
        steady.and_then(|steady| steady.cpu_us_per_message.get(LOAD_GENERATOR).copied()),
        figures.search.as_ref().map(|search| search.sustained_per_s),
        figures.idle.as_ref().and_then(|idle| idle.bytes_per_session),
        figures.chat_storm.as_ref().and_then(|storm| storm.offer).map(|offer| offer.p99 as f64),
        license,
    ]
}

/// The CPU of every part of a target but the load generator, summed; `None` when none was measured.
fn server_cpu(per_part: &BTreeMap<String, f64>) -> Option<f64> {
    let server: Vec<f64> =
        per_part.iter().filter(|(part, _)| part.as_str() != LOAD_GENERATOR).map(|(_, us)| *us).collect();
    (!server.is_empty()).then(|| server.iter().sum())
}

/// One target's CPU per unit of work, part by part, the load generator last: `gateway 69 · store 49 · load
/// generator 46 µs`.
fn cpu_parts(per_part: &BTreeMap<String, f64>) -> String {
    let mut parts: Vec<(&String, &f64)> = per_part.iter().collect();
    parts.sort_by_key(|(part, _)| part.as_str() == LOAD_GENERATOR);
    let shown: Vec<String> = parts.iter().map(|(part, us)| format!("{part} {us:.0}")).collect();
    format!("{} µs", shown.join(" · "))
}

/// Where each target's CPU went, part by part: per message in the steady run at `rate`, and per chat start
/// in the chat storm (warm-up and connections included, as the CPU is counted over the whole run).
pub fn cpu_text(targets: [(&str, &TargetFigures); 3], rate: f64) -> String {
    let mut text = String::new();
    let steady = targets.map(|(name, figures)| (name, figures.steady.as_ref().map(|s| &s.cpu_us_per_message)));
    cpu_section(&mut text, &format!("CPU per message, steady at {rate:.0}/s:"), &steady);
    let storms = targets.map(|(name, figures)| (name, figures.chat_storm.as_ref().map(|s| &s.cpu_us_per_start)));
    cpu_section(&mut text, "CPU per chat start, chat storm:", &storms);
    text
}

/// A heading and a line per target that has figures; nothing when none has.
fn cpu_section(text: &mut String, heading: &str, targets: &[(&str, Option<&BTreeMap<String, f64>>)]) {
    let measured: Vec<(&str, &BTreeMap<String, f64>)> = targets
        .iter()
        .filter_map(|(name, per_part)| {
            per_part.filter(|per_part| !per_part.is_empty()).map(|per_part| (*name, per_part))
        })
        .collect();
    if measured.is_empty() {
        return;
    }
    let _ = writeln!(text, "{heading}");
    for (name, per_part) in measured {
        let _ = writeln!(text, "  {name:<10} {}", cpu_parts(per_part));
    }
}

/// The table of figures and ratios, as text.
pub fn table(targets: [&TargetFigures; 3], rate: f64) -> String {
    let values = targets.map(row_values);
    let header = ["", "bare relay", "serve", "cluster", "serve/bare", "cluster/bare"];
    let mut lines: Vec<[String; 6]> = vec![header.map(str::to_owned)];
    for (i, (label, unit, with_ratio)) in ROWS.into_iter().enumerate() {
        let bare = values[0][i];
        let ratio = |value: Option<f64>| match (with_ratio, value, bare) {
            (true, Some(value), Some(bare)) if bare > 0.0 => format!("{:.2}×", value / bare),
            _ => String::new(),
        };
        let label = if i == 0 { format!("steady {rate:.0}/s: achieved") } else { label.to_owned() };
        lines.push([
            label,
            unit.show(bare),
            unit.show(values[1][i]),
            unit.show(values[2][i]),
            ratio(values[1][i]),
            ratio(values[2][i]),
        ]);
    }
    let widths: Vec<usize> =
        (0..6).map(|i| lines.iter().map(|line| line[i].chars().count()).max().unwrap_or(0)).collect();
    let mut text = String::new();
    for line in &lines {
        let cells: Vec<String> = line
            .iter()
            .zip(&widths)
            .enumerate()
            .map(|(i, (cell, width))| {
                let pad = width.saturating_sub(cell.chars().count());
                if i == 0 { format!("{cell}{}", " ".repeat(pad)) } else { format!("{}{cell}", " ".repeat(pad)) }
            })
            .collect();
        let _ = writeln!(text, "{}", cells.join("  ").trim_end());
    }
    text
}

/// The goals as text, one line each.
pub fn goals_text(goals: &[Goal]) -> String {
    let mut text = String::new();
    for goal in goals {
        let mark = match goal.verdict {
            Verdict::Pass => "PASS",
            Verdict::Fail => "FAIL",
            Verdict::Unknown => "????",
        };
        let _ = writeln!(text, "[{mark}] {:<7} {}: {}", goal.target, goal.goal, goal.measured);
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn steady(cpu: &[(&str, f64)]) -> Steady {
        Steady {
            target_per_s: 5_000.0,
            achieved_per_s: 5_000.0,
            message: None,
            ack: None,
            errors: 0,
            violations: 0,
            loadgen_failed: None,
            cpu_us_per_message: cpu.iter().map(|(part, us)| ((*part).to_owned(), *us)).collect(),
        }
    }

    #[test]
    fn the_cpu_is_shown_part_by_part_with_the_load_generator_last_and_summed_without_it() {
        let relay =
            TargetFigures { steady: Some(steady(&[("relay", 49.4), (LOAD_GENERATOR, 70.0)])), ..Default::default() };
        let cluster = TargetFigures {
            steady: Some(steady(&[("gateway", 84.0), (LOAD_GENERATOR, 58.0), ("store", 59.0), ("routers", 82.0)])),
            ..Default::default()
        };
        let text =
            cpu_text([("bare relay", &relay), ("serve", &TargetFigures::default()), ("cluster", &cluster)], 5_000.0);
        assert_eq!(
            text,
            "CPU per message, steady at 5000/s:\n  bare relay relay 49 · load generator 70 µs\n  cluster    gateway 84 \
             · routers 82 · store 59 · load generator 58 µs\n",
            "no storm, no storm section; a target without figures, no line"
        );
        assert_eq!(server_cpu(&cluster.steady.unwrap().cpu_us_per_message), Some(84.0 + 59.0 + 82.0));
        assert_eq!(server_cpu(&BTreeMap::from([(LOAD_GENERATOR.to_owned(), 1.0)])), None);
    }
}
