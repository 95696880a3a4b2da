//! The daemon's side of `firewall status`: what it holds, as
//! [`crate::report::status::DaemonStatus`].
use super::reload::State;
use crate::host::link;
use crate::report::status::{DaemonStatus, InterfaceStatus, TrialStatus};

impl State {
    pub(super) fn status(&self) -> DaemonStatus {
        let interfaces = self
            .held
            .held()
            .map(|(name, ifindex)| InterfaceStatus {
                name: name.to_string(),
                ifindex,
                xdp_mode: link::xdp_mode(ifindex).ok().flatten().map(str::to_string),
                link_type: link::arphrd(name)
                    .map_or("unknown", link::arphrd_name)
                    .to_string(),
            })
            .collect();
        let trial = self.trial.as_ref().map(|trial| TrialStatus {
            file: trial.file().to_string(),
            seconds_left: trial.seconds_left(),
        });
        DaemonStatus {
            pid: std::process::id(),
            uptime_seconds: self.started.elapsed().as_secs(),
            rule_file: self.options.rules.display().to_string(),
            applied_seconds_ago: self.applied.elapsed().as_secs(),
            audit: self.options.audit,
            interfaces,
            waiting_for: self.held.missing(),
            trial,
        }
    }
}
