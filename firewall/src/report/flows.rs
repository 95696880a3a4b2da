//! How full the kernel's flow table is. It is an LRU map of `MAX_FLOWS` entries: when it is
//! full of flows still inside their timeouts, each new outbound flow evicts the least
//! recently used one, and replies to that (idle, but live) flow are then judged by the rules.
//! `firewall stats` and the metrics show the fill; the daemon warns when it nears capacity.
use aya::maps::Map;
use firewall_common::proto::{IPPROTO_TCP, IPPROTO_UDP};
use firewall_common::{FlowKey, FlowState, GenerationConfig, FLOW_CLOSING, MAX_FLOWS};
use serde::Serialize;

use crate::dataplane::batch;

/// Live flows above this share of the capacity draw the daemon's warning.
pub const WARN_PERCENT: u64 = 90;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct FlowFill {
    /// Entries in the table, expired ones included (the LRU reuses those first).
    pub entries: u64,
    /// Entries still inside their timeout: replies to them pass.
    pub live: u64,
    /// `MAX_FLOWS`.
    pub capacity: u64,
}

/// The idle timeout of a flow in state `state`, as the XDP program applies it.
fn timeout_ns(config: &GenerationConfig, key: &FlowKey, state: &FlowState) -> u64 {
    match key.proto {
        IPPROTO_TCP if state.flags & FLOW_CLOSING != 0 => config.tcp_closing_timeout_ns,
        IPPROTO_TCP => config.tcp_timeout_ns,
        IPPROTO_UDP => config.udp_timeout_ns,
        _ => config.icmp_timeout_ns,
    }
}

/// Counts `flows` at CLOCK_MONOTONIC `now_ns` under the timeouts of `config`.
pub fn fill<'a>(
    flows: impl IntoIterator<Item = &'a (FlowKey, FlowState)>,
    config: &GenerationConfig,
    now_ns: u64,
) -> FlowFill {
    let mut fill = FlowFill {
        capacity: u64::from(MAX_FLOWS),
        ..FlowFill::default()
    };
    for (key, state) in flows {
        fill.entries += 1;
        if now_ns.saturating_sub(state.last_seen_ns) <= timeout_ns(config, key, state) {
            fill.live += 1;
        }
    }
    fill
}

/// Reads the flow map (`FW_FLOWS`) and counts it.
pub fn read_fill(flows: &Map, config: &GenerationConfig, now_ns: u64) -> anyhow::Result<FlowFill> {
    let entries = batch::entries::<FlowKey, FlowState>(flows)?;
    Ok(fill(&entries, config, now_ns))
}

/// Warns once when live flows pass [`WARN_PERCENT`] of the capacity, and again only after
/// they have dropped below it and risen again.
#[derive(Debug, Default)]
pub struct FillAlarm {
    raised: bool,
}

impl FillAlarm {
    /// The warning to log for this count, if it is one.
    pub fn check(&mut self, fill: &FlowFill) -> Option<String> {
        let over = fill.live * 100 > fill.capacity * WARN_PERCENT;
        let newly = over && !self.raised;
        self.raised = over;
        newly.then(|| {
            format!(
                "the flow table holds {} live flows of {} (over {WARN_PERCENT}%): new flows of \
                 this host evict the least recently used ones, and replies to those (idle SSH \
                 sessions, long polls) may then be dropped by the rules",
                fill.live, fill.capacity
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: u64 = 1_000_000_000;

    fn config() -> GenerationConfig {
        GenerationConfig {
            default_action: 0,
            tries_in_use: 0,
            log_line_ns: 0,
            log_burst_ns: 0,
            checks: 0,
            exact_in_use: 0,
            outbound_action: 0,
            _pad: 0,
            tcp_timeout_ns: 100 * SECOND,
            tcp_closing_timeout_ns: 10 * SECOND,
            udp_timeout_ns: 60 * SECOND,
            icmp_timeout_ns: 30 * SECOND,
        }
    }

    fn flow(proto: u8, port: u16, age_secs: u64, flags: u32, now: u64) -> (FlowKey, FlowState) {
        let key = FlowKey {
            proto,
            local_port: port,
            ..FlowKey::default()
        };
        let state = FlowState {
            last_seen_ns: now - age_secs * SECOND,
            flags,
            _pad: 0,
        };
        (key, state)
    }

    #[test]
    fn live_flows_are_those_inside_their_timeout() {
        let now = 1_000 * SECOND;
        let flows = [
            flow(IPPROTO_TCP, 1, 99, 0, now),
            flow(IPPROTO_TCP, 2, 101, 0, now),
            flow(IPPROTO_TCP, 3, 9, FLOW_CLOSING, now),
            flow(IPPROTO_TCP, 4, 11, FLOW_CLOSING, now),
            flow(IPPROTO_UDP, 5, 59, 0, now),
            flow(IPPROTO_UDP, 6, 61, 0, now),
            flow(1, 7, 29, 0, now),
            flow(1, 8, 31, 0, now),
        ];
        let got = fill(&flows, &config(), now);
        assert_eq!(
            got,
            FlowFill {
                entries: 8,
                live: 4,
                capacity: u64::from(MAX_FLOWS)
            }
        );
    }

    #[test]
    fn the_alarm_goes_off_once_per_rise_over_the_threshold() {
        let capacity = u64::from(MAX_FLOWS);
        let at = |live: u64| FlowFill {
            entries: capacity,
            live,
            capacity,
        };
        let threshold = capacity * WARN_PERCENT / 100;
        let mut alarm = FillAlarm::default();
        let warned: Vec<bool> = [
            0,
            threshold,
            threshold + 1,
            capacity,
            threshold + 1,
            threshold,
            threshold - 100,
            capacity,
            capacity,
        ]
        .into_iter()
        .map(|live| alarm.check(&at(live)).is_some())
        .collect();
        assert_eq!(
            warned,
            [false, false, true, false, false, false, false, true, false]
        );
        let message = FillAlarm::default().check(&at(capacity)).unwrap();
        assert!(message.contains(&format!("{capacity} live flows of {capacity}")));
    }
}
