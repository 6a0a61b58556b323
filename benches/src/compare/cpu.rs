//! The CPU time each process of a target spends over a scenario run, read from `/proc`: with the run's
//! messages (or chat starts) it gives the CPU per message of each kind of process, so that where a target's
//! time goes comes out of the comparison itself rather than out of a profiler run by hand.

use std::collections::{BTreeMap, HashMap};

/// `/proc` counts CPU time in USER_HZ ticks: 100 a second on Linux, whatever the kernel's own tick.
const TICKS_PER_S: f64 = 100.0;

/// The load generator's name in the figures (its time is that of the comparison's reaped children).
pub const LOAD_GENERATOR: &str = "load generator";

/// Where the CPU time of a named part of a target is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// One process.
    Process(u32),
    /// A process and every descendant, living or exited (PostgreSQL's postmaster and its backends).
    Tree(u32),
}

/// The fields of `/proc/PID/stat` used here.
#[derive(Debug, Clone, Copy)]
struct Stat {
    ppid: u32,
    /// `utime + stime`.
    own: u64,
    /// `cutime + cstime`: what its exited and reaped children used, theirs included.
    reaped: u64,
}

/// Reads `/proc/PID/stat` (`self` for this process); `None` once the process is gone.
fn stat(pid: &str) -> Option<Stat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&text)
}

/// The fields after the command's name, which is in parentheses and may hold spaces and parentheses itself.
fn parse_stat(text: &str) -> Option<Stat> {
    let rest = text.get(text.rfind(')')? + 1..)?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Fields are numbered from 1 in proc(5); `rest` begins at field 3 (`state`).
    let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
    Some(Stat { ppid: u32::try_from(field(4)?).ok()?, own: field(14)? + field(15)?, reaped: field(16)? + field(17)? })
}

/// The CPU ticks a source has used so far; `None` when its process is gone.
fn ticks(source: Source) -> Option<u64> {
    match source {
        Source::Process(pid) => stat(&pid.to_string()).map(|stat| stat.own),
        Source::Tree(root) => {
            let root_stat = stat(&root.to_string())?;
            let mut children: HashMap<u32, Vec<(u32, Stat)>> = HashMap::new();
            for entry in std::fs::read_dir("/proc").ok()?.flatten() {
                let name = entry.file_name();
                let Some(name) = name.to_str() else { continue };
                let Ok(pid) = name.parse::<u32>() else { continue };
                if let Some(stat) = stat(name) {
                    children.entry(stat.ppid).or_default().push((pid, stat));
                }
            }
            Some(tree_ticks(root, root_stat, &children))
        }
    }
}

/// A process's own and reaped children's ticks, and those of every living descendant: an exited child's
/// time moves from its own count to its parent's reaped count, so the sum is kept across exits.
fn tree_ticks(root: u32, root_stat: Stat, children: &HashMap<u32, Vec<(u32, Stat)>>) -> u64 {
    let mut total = root_stat.own + root_stat.reaped;
    let mut stack = vec![root];
    while let Some(parent) = stack.pop() {
        for (pid, stat) in children.get(&parent).map(Vec::as_slice).unwrap_or_default() {
            total += stat.own + stat.reaped;
            stack.push(*pid);
        }
    }
    total
}

/// The CPU time of a target's parts and of the load generator over one run.
#[derive(Debug)]
pub struct Meter {
    sources: Vec<(String, Source)>,
    before: Vec<Option<u64>>,
    reaped_before: Option<u64>,
}

impl Meter {
    /// Reads every source now: the start of the run. The load generator is the only child of this process
    /// that exits during a run, so its time is what this process's reaped children gain meanwhile.
    pub fn start(sources: &[(String, Source)]) -> Meter {
        Meter {
            sources: sources.to_vec(),
            before: sources.iter().map(|(_, source)| ticks(*source)).collect(),
            reaped_before: stat("self").map(|stat| stat.reaped),
        }
    }

    /// The CPU seconds of each named part (parts of one name summed) since the start, and the load
    /// generator's; a part whose process ended meanwhile is left out.
    pub fn finish(self) -> BTreeMap<String, f64> {
        let mut seconds = BTreeMap::new();
        for ((name, source), before) in self.sources.iter().zip(self.before) {
            if let (Some(before), Some(after)) = (before, ticks(*source)) {
                *seconds.entry(name.clone()).or_insert(0.0) += after.saturating_sub(before) as f64 / TICKS_PER_S;
            }
        }
        if let (Some(before), Some(after)) = (self.reaped_before, stat("self").map(|stat| stat.reaped)) {
            seconds.insert(LOAD_GENERATOR.to_owned(), after.saturating_sub(before) as f64 / TICKS_PER_S);
        }
        seconds
    }
}

/// CPU microseconds per unit of work (a message, a chat start), by part; empty when there was no work.
pub fn per_unit_us(seconds: &BTreeMap<String, f64>, units: u64) -> BTreeMap<String, f64> {
    if units == 0 {
        return BTreeMap::new();
    }
    seconds.iter().map(|(name, s)| (name.clone(), s * 1e6 / units as f64)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stat_line_is_read_after_the_name_whatever_it_holds() {
        let line = "4242 (tokio (runtime) 1) S 17 4242 4242 0 -1 4194560 900 0 0 0 1234 567 89 10 20 0 8 0 \
                    100 1000000 300 18446744073709551615";
        let stat = parse_stat(line).unwrap();
        assert_eq!((stat.ppid, stat.own, stat.reaped), (17, 1234 + 567, 89 + 10));
        assert!(parse_stat("4242 (cut").is_none());
    }

    #[test]
    fn a_tree_counts_its_living_descendants_and_what_the_exited_ones_left_with_their_parents() {
        let stat = |ppid, own, reaped| Stat { ppid, own, reaped };
        let mut children: HashMap<u32, Vec<(u32, Stat)>> = HashMap::new();
        children.entry(1).or_default().push((2, stat(1, 10, 5)));
        children.entry(2).or_default().push((3, stat(2, 7, 0)));
        // Another tree: not counted.
        children.entry(9).or_default().push((10, stat(9, 1_000, 0)));
        assert_eq!(tree_ticks(1, stat(0, 100, 40), &children), 100 + 40 + 10 + 5 + 7);
    }

    #[test]
    fn this_process_and_its_children_are_measured() {
        let me = Source::Process(std::process::id());
        let meter = Meter::start(&[("me".to_owned(), me)]);
        let started = meter.before[0].unwrap();
        // Work until `/proc` counts some of it (a tick is 10 ms), and a child that runs and is reaped.
        let mut spin = 0u64;
        while ticks(me).unwrap() == started {
            for _ in 0..100_000 {
                spin = spin.wrapping_add(std::hint::black_box(1));
            }
        }
        std::process::Command::new("true").status().unwrap();
        let seconds = meter.finish();
        assert!(seconds["me"] > 0.0, "{seconds:?} ({spin})");
        assert!(seconds.contains_key(LOAD_GENERATOR), "{seconds:?}");
        assert_eq!(per_unit_us(&seconds, 0), BTreeMap::new());
        let per = per_unit_us(&BTreeMap::from([("x".to_owned(), 0.5)]), 1_000);
        assert_eq!(per["x"], 500.0);
    }
}
