//! What the daemon holds between events ([`State`]) and how rules change in it: reloading
//! the rule file, `firewall apply` (for good or on trial), `firewall confirm` and the
//! roll-back of rules on trial that were not confirmed in time.
use std::fmt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use log::{error, info, warn};
use tokio::time::Sleep;

use super::dynamic::Members;
use super::watch::FileWatcher;
use super::{heap, prepare, prepare_text, Prepared, RunOptions};
use crate::dataplane::packet_log::RuleNames;
use crate::dataplane::pins::Pins;
use crate::dataplane::Kernel;
use crate::host::ifaces::Held;
use crate::host::notify;
use crate::report::metrics::SharedReloads;
use crate::rules::compile::{compile, Compiled};
use crate::rules::model::RuleSet;

/// What the daemon holds between events.
pub(super) struct State {
    pub(super) kernel: Kernel,
    pub(super) pins: Pins,
    /// The interfaces filtered.
    pub(super) held: Held,
    pub(super) options: RunOptions,
    pub(super) watcher: FileWatcher,
    /// The rules in force (for `explain` and roll-backs; the kernel keeps what it compiled).
    pub(super) in_force: RuleSet,
    /// A file applied with `firewall apply --confirm`, awaiting confirmation.
    pub(super) trial: Option<Trial>,
    /// For the metrics.
    pub(super) reloads: SharedReloads,
    /// For the kernel log.
    pub(super) rule_names: RuleNames,
    /// For `firewall status`: when the daemon started, and when the rules in force were put
    /// in force.
    pub(super) started: Instant,
    pub(super) applied: Instant,
    /// The members of dynamic sets, and when the next one ends.
    pub(super) members: Members,
    pub(super) member_end: Option<Pin<Box<Sleep>>>,
}

/// Rules on trial: in force until confirmed, else rolled back at the deadline.
pub(super) struct Trial {
    /// Where the caller read it.
    file: String,
    /// Its text as validated and put in force: what `confirm` writes to the rule file.
    text: String,
    deadline: Pin<Box<Sleep>>,
    /// The rules in force before.
    previous: RuleSet,
}

impl Trial {
    /// The moment it is rolled back unless confirmed.
    pub(super) fn deadline(&mut self) -> &mut Pin<Box<Sleep>> {
        &mut self.deadline
    }

    /// Where the caller read the rules on trial.
    pub(super) fn file(&self) -> &str {
        &self.file
    }

    pub(super) fn seconds_left(&self) -> u64 {
        let left = self.deadline.deadline() - tokio::time::Instant::now();
        left.as_secs()
    }
}

/// What a reload, an apply or a confirm did; its Display is the line logged and answered.
#[derive(Debug)]
pub(super) enum Outcome {
    Reloaded {
        rule_file: PathBuf,
        took: Duration,
        /// Address map entries of the new rules.
        entries: usize,
        /// Map entries written.
        updates: usize,
    },
    /// `firewall apply` without a confirmation time.
    Adopted {
        name: String,
        rule_file: PathBuf,
    },
    /// `firewall apply --confirm`.
    OnTrial {
        name: String,
        wait: Duration,
    },
    Confirmed {
        name: String,
        rule_file: PathBuf,
    },
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Reloaded {
                rule_file,
                took,
                entries,
                updates,
            } => write!(
                f,
                "reloaded {} in {took:.1?}: {entries} address entries, {updates} map entries changed",
                rule_file.display()
            ),
            Outcome::Adopted { name, rule_file } => {
                write!(f, "{name} in force and copied to {}", rule_file.display())
            }
            Outcome::OnTrial { name, wait } => write!(
                f,
                "{name} in force; rolls back in {}s unless `firewall confirm` arrives",
                wait.as_secs()
            ),
            Outcome::Confirmed { name, rule_file } => {
                write!(f, "confirmed {name}: copied to {}", rule_file.display())
            }
        }
    }
}

/// Why a reload, an apply or a confirm did not happen; its Display is the line answered (and
/// for reloads logged). All but [`ReloadError::Adopting`] leave the rules in force as they
/// were; that one comes after the new rules were put in force, only the rule file stays.
#[derive(Debug)]
pub(super) enum ReloadError {
    /// A reload while rules are on trial.
    ReloadDuringTrial { file: String },
    /// The rule file could not be read, compiled or applied.
    ReloadFailed(anyhow::Error),
    /// An apply while rules are on trial.
    ApplyDuringTrial { file: String },
    /// The applied file's set files resolve elsewhere from the rule file's directory.
    NotMovable { name: String, rule_file: PathBuf },
    /// The applied file could not be read, compiled or applied.
    ApplyFailed(anyhow::Error),
    /// A confirm with nothing on trial.
    NothingOnTrial,
    /// Writing the rule file failed.
    Adopting(anyhow::Error),
}

impl fmt::Display for ReloadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReloadError::ReloadDuringTrial { file } => write!(
                f,
                "reload refused: {file} is on trial until `firewall confirm` or its roll-back"
            ),
            ReloadError::ReloadFailed(error) => {
                write!(f, "reload failed, previous rules stay in force: {error:#}")
            }
            ReloadError::ApplyDuringTrial { file } => write!(
                f,
                "{file} is on trial already: `firewall confirm` it or wait for its roll-back"
            ),
            ReloadError::NotMovable { name, rule_file } => write!(
                f,
                "{name} names set files relative to its own directory; put it in {} or use \
                 absolute paths, as it will replace {}",
                rule_file.parent().unwrap_or(Path::new(".")).display(),
                rule_file.display()
            ),
            ReloadError::ApplyFailed(error) | ReloadError::Adopting(error) => {
                write!(f, "{error:#}")
            }
            ReloadError::NothingOnTrial => write!(f, "no rules are on trial"),
        }
    }
}

impl std::error::Error for ReloadError {}

/// What putting a file in force did.
struct Applied {
    /// The rule file and its set files, to watch.
    files: Vec<PathBuf>,
    /// Address map entries of the new rules.
    entries: usize,
    /// Map entries written.
    updates: usize,
}

/// Entries of the four address tables.
pub(super) fn address_entries(compiled: &Compiled) -> usize {
    compiled.src_v4.len() + compiled.src_v6.len() + compiled.dst_v4.len() + compiled.dst_v6.len()
}

impl State {
    /// Re-reads the rule file and swaps it in; on any error the rules in force stay. The
    /// outcome is logged and given to systemd as the status.
    pub(super) fn reload(&mut self) -> Result<Outcome, ReloadError> {
        if let Some(trial) = &self.trial {
            let refused = ReloadError::ReloadDuringTrial {
                file: trial.file.clone(),
            };
            warn!("{refused}");
            return Err(refused);
        }
        let path = self.options.rules.clone();
        let started = Instant::now();
        notify::reloading();
        let result = self.apply_file(&path).and_then(|applied| {
            // Set files may have come or gone.
            self.watcher = FileWatcher::new(&applied.files)?;
            Ok(applied)
        });
        if result.is_err() {
            // Follow the links again all the same: a broken file that came with a swapped
            // link is fixed by editing where the link points now.
            let mut files = vec![path.clone()];
            files.extend(self.in_force.set_files.iter().cloned());
            if let Ok(watcher) = FileWatcher::new(&files) {
                self.watcher = watcher;
            }
        }
        self.count_reload(started, &result);
        let outcome = match result {
            Ok(Applied {
                entries, updates, ..
            }) => Ok(Outcome::Reloaded {
                rule_file: path,
                took: started.elapsed(),
                entries,
                updates,
            }),
            Err(error) => Err(ReloadError::ReloadFailed(error)),
        };
        let status = match &outcome {
            Ok(reloaded) => {
                let message = reloaded.to_string();
                info!("{message}");
                message
            }
            Err(failed) => {
                let message = failed.to_string();
                error!("{message}");
                message
            }
        };
        notify::notify(&format!("READY=1\nSTATUS={status}"));
        outcome
    }

    /// The reload metrics.
    fn count_reload(&self, started: Instant, result: &Result<Applied>) {
        let Ok(mut reloads) = self.reloads.lock() else {
            return;
        };
        reloads.last_seconds = started.elapsed().as_secs_f64();
        reloads.last_succeeded = result.is_ok();
        match result {
            Ok(applied) => {
                reloads.succeeded += 1;
                reloads.rules = self.in_force.rules.len() as i64;
                reloads.address_entries = applied.entries as i64;
            }
            Err(_) => reloads.failed += 1,
        }
    }

    /// Prepares `path` and puts it in force.
    fn apply_file(&mut self, path: &Path) -> Result<Applied> {
        let prepared = prepare(
            path,
            self.options.insecure_files,
            self.options.audit,
            &self.members,
        )?;
        self.put_in_force(prepared)
    }

    fn put_in_force(&mut self, prepared: Prepared) -> Result<Applied> {
        let Prepared {
            set,
            compiled,
            files,
            ..
        } = prepared;
        let updates = self.kernel.apply(&compiled)?;
        let entries = address_entries(&compiled);
        drop(compiled);
        self.rule_names.set(&set);
        self.in_force = set;
        self.applied = Instant::now();
        heap::release_freed();
        Ok(Applied {
            files,
            entries,
            updates,
        })
    }

    /// `firewall apply FILE [--confirm SECS]`: the file's text in force now; with a
    /// confirmation time, on trial (see [`Trial`]); without, it replaces the rule file at once.
    pub(super) fn apply_request(
        &mut self,
        name: &str,
        text: String,
        set_files: &[PathBuf],
        confirm: Option<Duration>,
    ) -> Result<Outcome, ReloadError> {
        if let Some(trial) = &self.trial {
            return Err(ReloadError::ApplyDuringTrial {
                file: trial.file.clone(),
            });
        }
        let prepared = prepare_text(
            name,
            text,
            &self.options.rules,
            self.options.insecure_files,
            self.options.audit,
            &self.members,
        )
        .map_err(ReloadError::ApplyFailed)?;
        self.check_movable(name, set_files, &prepared.set.set_files)?;
        let previous = self.in_force.clone();
        let text = prepared.text.clone();
        self.put_in_force(prepared)
            .map_err(ReloadError::ApplyFailed)?;
        let outcome = match confirm {
            None => {
                self.adopt(&text)?;
                Outcome::Adopted {
                    name: name.to_string(),
                    rule_file: self.options.rules.clone(),
                }
            }
            Some(wait) => {
                self.trial = Some(Trial {
                    file: name.to_string(),
                    text,
                    deadline: Box::pin(tokio::time::sleep(wait)),
                    previous,
                });
                Outcome::OnTrial {
                    name: name.to_string(),
                    wait,
                }
            }
        };
        info!("{outcome}");
        Ok(outcome)
    }

    /// A file applied by request becomes the rule file, so that it stays in force across
    /// reloads and restarts: its set files as read from its own directory (`theirs`) must
    /// resolve the same from the rule file's (`ours`).
    fn check_movable(
        &self,
        name: &str,
        theirs: &[PathBuf],
        ours: &[PathBuf],
    ) -> Result<(), ReloadError> {
        if theirs != ours {
            return Err(ReloadError::NotMovable {
                name: name.to_string(),
                rule_file: self.options.rules.clone(),
            });
        }
        Ok(())
    }

    /// Replaces the rule file with `text` (atomically: see [`crate::rules::files::replace`]).
    fn adopt(&mut self, text: &str) -> Result<(), ReloadError> {
        let target = &self.options.rules;
        crate::rules::files::replace(target, text)
            .with_context(|| format!("replacing {}", target.display()))
            .map_err(ReloadError::Adopting)
    }

    /// Fills the dynamic sets' members into the rules in force and puts them in force again
    /// (only the changed map entries are written).
    pub(super) fn refill(&mut self) -> Result<()> {
        let members = &self.members;
        self.in_force.fill_dynamic(|name| members.nets(name));
        let compiled = compile(&self.in_force)?;
        self.kernel.apply(&compiled)?;
        self.time_member_ends();
        Ok(())
    }

    /// Sets the timer for the next member of a dynamic set to end.
    pub(super) fn time_member_ends(&mut self) {
        self.member_end = self
            .members
            .next_end()
            .map(|wait| Box::pin(tokio::time::sleep(wait)));
    }

    /// A member's end came: drop the ended members and put the rules in force again.
    pub(super) fn end_members(&mut self) {
        let result = self.members.sweep().and_then(|ended| {
            if ended {
                info!("members of dynamic sets ended; rules filled in again");
            }
            self.refill()
        });
        if let Err(error) = result {
            error!("ending members of dynamic sets: {error:#}");
            // Try again in a second rather than spin.
            self.member_end = Some(Box::pin(tokio::time::sleep(Duration::from_secs(1))));
        }
    }

    /// `firewall confirm`: the rules on trial stay, and become the rule file.
    pub(super) fn confirm(&mut self) -> Result<Outcome, ReloadError> {
        let Some(trial) = self.trial.take() else {
            return Err(ReloadError::NothingOnTrial);
        };
        self.adopt(&trial.text)?;
        let confirmed = Outcome::Confirmed {
            name: trial.file,
            rule_file: self.options.rules.clone(),
        };
        info!("{confirmed}");
        Ok(confirmed)
    }

    /// The deadline passed without a confirmation: the rules from before come back.
    pub(super) fn roll_back(&mut self) {
        let mut trial = self.trial.take().expect("a trial to roll back");
        // Dynamic sets may have changed since.
        trial.previous.fill_dynamic(|name| self.members.nets(name));
        let applied = compile(&trial.previous).and_then(|compiled| self.kernel.apply(&compiled));
        match applied {
            Ok(_) => {
                self.rule_names.set(&trial.previous);
                self.in_force = trial.previous;
                warn!(
                    "{} was not confirmed in time: rolled back to the rules from before",
                    trial.file
                );
            }
            Err(error) => error!(
                "rolling back {} failed, it stays in force: {error:#}",
                trial.file
            ),
        }
        heap::release_freed();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_read_as_the_lines_logged_and_answered() {
        let rule_file = PathBuf::from("/etc/firewall/rules.toml");
        let reloaded = Outcome::Reloaded {
            rule_file: rule_file.clone(),
            took: Duration::from_micros(1500),
            entries: 3,
            updates: 7,
        };
        assert_eq!(
            reloaded.to_string(),
            "reloaded /etc/firewall/rules.toml in 1.5ms: 3 address entries, 7 map entries changed"
        );
        let name = "/tmp/new.toml".to_string();
        let adopted = Outcome::Adopted {
            name: name.clone(),
            rule_file: rule_file.clone(),
        };
        assert_eq!(
            adopted.to_string(),
            "/tmp/new.toml in force and copied to /etc/firewall/rules.toml"
        );
        let on_trial = Outcome::OnTrial {
            name: name.clone(),
            wait: Duration::from_secs(90),
        };
        assert_eq!(
            on_trial.to_string(),
            "/tmp/new.toml in force; rolls back in 90s unless `firewall confirm` arrives"
        );
        let confirmed = Outcome::Confirmed { name, rule_file };
        assert_eq!(
            confirmed.to_string(),
            "confirmed /tmp/new.toml: copied to /etc/firewall/rules.toml"
        );
    }

    #[test]
    fn errors_read_as_the_lines_answered() {
        let file = "/tmp/new.toml".to_string();
        let cases = [
            (
                ReloadError::ReloadDuringTrial { file: file.clone() },
                "reload refused: /tmp/new.toml is on trial until `firewall confirm` or its \
                 roll-back",
            ),
            (
                ReloadError::ReloadFailed(anyhow::anyhow!("bad").context("rules.toml")),
                "reload failed, previous rules stay in force: rules.toml: bad",
            ),
            (
                ReloadError::ApplyDuringTrial { file: file.clone() },
                "/tmp/new.toml is on trial already: `firewall confirm` it or wait for its \
                 roll-back",
            ),
            (
                ReloadError::NotMovable {
                    name: file,
                    rule_file: PathBuf::from("/etc/firewall/rules.toml"),
                },
                "/tmp/new.toml names set files relative to its own directory; put it in \
                 /etc/firewall or use absolute paths, as it will replace \
                 /etc/firewall/rules.toml",
            ),
            (
                ReloadError::ApplyFailed(anyhow::anyhow!("bad").context("new.toml")),
                "new.toml: bad",
            ),
            (ReloadError::NothingOnTrial, "no rules are on trial"),
        ];
        for (error, message) in cases {
            assert_eq!(error.to_string(), message);
        }
    }
}
