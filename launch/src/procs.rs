//! The processes of a group, found through `/proc`: the roots the launcher started and
//! everything they started. `mpirun` puts each rank in its own process group, and a rank
//! whose `mpirun` was killed is re-parented to init, so signalling the roots' process
//! groups is not enough: every descendant ever seen is remembered (with its start time,
//! so a reused pid is never signalled) and signalled by pid.

use std::collections::{BTreeMap, BTreeSet};

/// `(ppid, start time)` of `pid`, from `/proc/<pid>/stat`; `None` once it is gone or a
/// zombie.
fn stat(pid: i32) -> Option<(i32, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: parse after the last ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // fields[0] is the state (field 3), fields[1] the ppid, fields[19] the start time.
    if fields.first() == Some(&"Z") {
        return None;
    }
    Some((fields.get(1)?.parse().ok()?, fields.get(19)?.parse().ok()?))
}

/// Every live process: pid -> (ppid, start time).
fn all() -> BTreeMap<i32, (i32, u64)> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return BTreeMap::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|pid| Some((pid, stat(pid)?)))
        .collect()
}

/// The value of `name` in `pid`'s environment (as it was started).
pub(crate) fn environ_var(pid: i32, name: &str) -> Option<String> {
    let bytes = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    bytes.split(|&b| b == 0).find_map(|kv| {
        let kv = std::str::from_utf8(kv).ok()?;
        let (k, v) = kv.split_once('=')?;
        (k == name).then(|| v.to_string())
    })
}

/// The roots of a group and every descendant seen so far.
#[derive(Debug, Default)]
pub(crate) struct Tree {
    roots: Vec<i32>,
    seen: BTreeMap<i32, u64>,
}

impl Tree {
    pub(crate) fn new(roots: Vec<i32>) -> Self {
        let mut t = Tree {
            roots,
            seen: BTreeMap::new(),
        };
        t.refresh();
        t
    }

    /// Looks for new descendants (of the roots and of every process seen before).
    pub(crate) fn refresh(&mut self) {
        let procs = all();
        let mut children: BTreeMap<i32, Vec<i32>> = BTreeMap::new();
        for (&pid, &(ppid, _)) in &procs {
            children.entry(ppid).or_default().push(pid);
        }
        let mut stack: Vec<i32> = self.roots.clone();
        stack.extend(self.alive_in(&procs));
        let mut visited = BTreeSet::new();
        while let Some(pid) = stack.pop() {
            if !visited.insert(pid) {
                continue;
            }
            if let Some(&(_, start)) = procs.get(&pid) {
                self.seen.entry(pid).or_insert(start);
            }
            stack.extend(children.get(&pid).into_iter().flatten());
        }
    }

    fn alive_in(&self, procs: &BTreeMap<i32, (i32, u64)>) -> Vec<i32> {
        self.seen
            .iter()
            .filter(|(pid, start)| procs.get(pid).is_some_and(|p| p.1 == **start))
            .map(|(&pid, _)| pid)
            .collect()
    }

    /// Processes of the group still running (not zombies).
    pub(crate) fn alive(&mut self) -> Vec<i32> {
        self.refresh();
        self.alive_in(&all())
    }

    /// Live children of `pid` among the group's processes.
    pub(crate) fn children_of(&mut self, pid: i32) -> Vec<i32> {
        self.refresh();
        let procs = all();
        self.alive_in(&procs)
            .into_iter()
            .filter(|p| procs.get(p).is_some_and(|s| s.0 == pid))
            .collect()
    }

    /// Sends `signal` to the roots' process groups and to every live process seen.
    pub(crate) fn signal(&mut self, signal: i32) {
        self.refresh();
        for &root in &self.roots {
            // SAFETY: plain system call; a group that no longer exists gives ESRCH.
            unsafe { libc::killpg(root, signal) };
        }
        for pid in self.alive_in(&all()) {
            // SAFETY: as above; the start time check above keeps reused pids out.
            unsafe { libc::kill(pid, signal) };
        }
    }
}
