//! Members of dynamic sets (`[sets.NAME] dynamic = true`), added and removed at run time with
//! `firewall ban --set NAME` / `unban --set NAME`, kept in `STATE_DIR/dynamic-sets.json`
//! so they survive reloads, restarts and reboots. Each member may end at a wall-clock time
//! (a reboot does not reset it); the daemon drops ended members and puts the rules in force
//! again at the earliest end.
use std::collections::BTreeMap;
use std::os::unix::fs::DirBuilderExt as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context as _, Result};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// Members one dynamic set holds at most (each is an address entry of the rules).
pub const MAX_MEMBERS: usize = 65_536;

const FILE: &str = "dynamic-sets.json";

#[derive(Debug, Default)]
pub struct Members {
    /// Where they are kept; `None`: in memory only.
    file: Option<PathBuf>,
    /// Set name -> member -> UNIX seconds at which it ends (`None`: never).
    sets: BTreeMap<String, BTreeMap<IpNet, Option<u64>>>,
}

/// One member as stored and as `firewall bans --set` lists it.
#[derive(Debug, Serialize, Deserialize)]
pub struct Member {
    pub address: IpNet,
    /// UNIX seconds; `None`: until removed.
    pub ends: Option<u64>,
}

/// Now, in UNIX seconds (members' ends are wall-clock times).
pub(super) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_secs())
}

impl Members {
    /// Reads `state_dir/dynamic-sets.json` (nothing there: no members).
    pub fn load(state_dir: &Path) -> Result<Members> {
        let file = state_dir.join(FILE);
        let mut members = Members {
            file: Some(file.clone()),
            sets: BTreeMap::new(),
        };
        let text = match std::fs::read_to_string(&file) {
            Ok(text) => text,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(members),
            Err(error) => return Err(error).with_context(|| format!("reading {}", file.display())),
        };
        let stored: BTreeMap<String, Vec<Member>> =
            serde_json::from_str(&text).with_context(|| format!("reading {}", file.display()))?;
        for (set, list) in stored {
            let entries = members.sets.entry(set).or_default();
            for member in list {
                entries.insert(member.address.trunc(), member.ends);
            }
        }
        Ok(members)
    }

    /// The members of `set` that have not ended, with their ends.
    fn live(&self, set: &str) -> impl Iterator<Item = (IpNet, Option<u64>)> + '_ {
        let now = unix_now();
        self.sets
            .get(set)
            .into_iter()
            .flatten()
            .filter(move |(_, ends)| ends.is_none_or(|ends| ends > now))
            .map(|(net, ends)| (*net, *ends))
    }

    /// The members of `set` that have not ended.
    pub fn nets(&self, set: &str) -> Vec<IpNet> {
        self.live(set).map(|(net, _)| net).collect()
    }

    /// Adds `nets` to `set` until `timeout` from now (`None`: until removed) and saves.
    pub fn add(&mut self, set: &str, nets: &[IpNet], timeout: Option<Duration>) -> Result<()> {
        let ends = timeout.map(|timeout| unix_now() + timeout.as_secs());
        let entries = self.sets.entry(set.to_string()).or_default();
        let mut grown = entries.clone();
        for net in nets {
            grown.insert(*net, ends);
        }
        if grown.len() > MAX_MEMBERS {
            bail!(
                "set @{set} would hold {} members, more than {MAX_MEMBERS}",
                grown.len()
            );
        }
        *entries = grown;
        self.save()
    }

    /// Removes `nets` from `set` and saves; returns how many were members.
    pub fn remove(&mut self, set: &str, nets: &[IpNet]) -> Result<usize> {
        let Some(entries) = self.sets.get_mut(set) else {
            return Ok(0);
        };
        let removed = nets
            .iter()
            .filter(|net| entries.remove(net).is_some())
            .count();
        self.save()?;
        Ok(removed)
    }

    /// Drops the members that ended; returns whether any did (then the rules need filling in
    /// again) after saving.
    pub fn sweep(&mut self) -> Result<bool> {
        let now = unix_now();
        let mut ended = false;
        for entries in self.sets.values_mut() {
            let before = entries.len();
            entries.retain(|_, ends| ends.is_none_or(|ends| ends > now));
            ended |= entries.len() != before;
        }
        if ended {
            self.save()?;
        }
        Ok(ended)
    }

    /// How long until the next member ends, if any will.
    pub fn next_end(&self) -> Option<Duration> {
        let now = unix_now();
        self.sets
            .values()
            .flat_map(|entries| entries.values())
            .filter_map(|ends| *ends)
            .min()
            .map(|ends| Duration::from_secs(ends.saturating_sub(now)))
    }

    /// The members of `set`, as listed.
    pub fn list(&self, set: &str) -> Vec<Member> {
        self.live(set)
            .map(|(address, ends)| Member { address, ends })
            .collect()
    }

    /// Writes the members out (a new file synced, renamed over the old).
    fn save(&self) -> Result<()> {
        let Some(file) = &self.file else {
            return Ok(());
        };
        let stored: BTreeMap<&String, Vec<Member>> = self
            .sets
            .iter()
            .map(|(set, entries)| {
                let list = entries
                    .iter()
                    .map(|(net, ends)| Member {
                        address: *net,
                        ends: *ends,
                    })
                    .collect();
                (set, list)
            })
            .collect();
        let text = serde_json::to_string_pretty(&stored)?;
        if let Some(dir) = file.parent() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .with_context(|| format!("creating {}", dir.display()))?;
        }
        crate::rules::files::replace(file, &text)
            .with_context(|| format!("writing {}", file.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_persist_and_end() {
        let dir = std::env::temp_dir().join(format!("fw-dynamic-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let net = |text: &str| -> IpNet { text.parse().unwrap() };
        let mut members = Members::load(&dir).unwrap();
        members
            .add("ops", &[net("192.0.2.7/32"), net("2001:db8::/32")], None)
            .unwrap();
        members
            .add(
                "ops",
                &[net("198.51.100.1/32")],
                Some(Duration::from_secs(3600)),
            )
            .unwrap();
        let again = Members::load(&dir).unwrap();
        assert_eq!(again.nets("ops").len(), 3);
        assert!(again.nets("other").is_empty());
        let left = again.next_end().unwrap().as_secs();
        assert!((3598..=3600).contains(&left), "{left}");
        let mut again = again;
        assert_eq!(
            again
                .remove("ops", &[net("192.0.2.7/32"), net("192.0.2.8/32")])
                .unwrap(),
            1
        );
        assert_eq!(Members::load(&dir).unwrap().nets("ops").len(), 2);
        // A member that ended is neither a member nor kept by the sweep.
        again
            .sets
            .get_mut("ops")
            .unwrap()
            .insert(net("203.0.113.1/32"), Some(1));
        assert_eq!(again.nets("ops").len(), 2);
        assert!(again.sweep().unwrap());
        assert!(!again.sweep().unwrap());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
