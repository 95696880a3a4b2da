//! The kernel's log lines: the XDP program writes a fixed [`LogEvent`] record per logged
//! packet into a ring buffer; the daemon turns each into a line for its logger, with the
//! rule's name.
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, RwLock};

use anyhow::{anyhow, Result};
use aya::maps::{MapData, RingBuf};
use firewall_common::{
    map_names, words_address, LogEvent, LOGGED_AUDIT, LOGGED_DROP, LOGGED_LIMIT, LOGGED_PASS,
};
use log::info;

use crate::dataplane::Kernel;
use crate::rules::model::RuleSet;

/// The names of the rules in force, shared by the daemon (which sets them at every reload)
/// and its [`KernelLog`].
#[derive(Clone, Default)]
pub struct RuleNames(Arc<RwLock<Vec<String>>>);

impl RuleNames {
    pub fn set(&self, set: &RuleSet) {
        let names = set.rules.iter().map(|rule| rule.name.clone()).collect();
        if let Ok(mut current) = self.0.write() {
            *current = names;
        }
    }

    /// The name of rule `number` (1-based; 0 is the default policy), if known.
    fn name(&self, number: u32) -> Option<String> {
        if number == 0 {
            return Some("default policy".into());
        }
        let names = self.0.read().ok()?;
        names.get(number as usize - 1).cloned()
    }
}

/// The ring buffer the XDP program logs into, read whenever its fd is readable.
pub struct KernelLog {
    ring: RingBuf<MapData>,
    names: RuleNames,
}

impl KernelLog {
    pub fn open(kernel: &mut Kernel, names: RuleNames) -> Result<KernelLog> {
        let map = kernel
            .ebpf_mut()
            .take_map(map_names::LOG_EVENTS)
            .ok_or_else(|| anyhow!("map {} missing", map_names::LOG_EVENTS))?;
        Ok(KernelLog {
            ring: RingBuf::try_from(map)?,
            names,
        })
    }

    /// Logs every line waiting in the ring buffer.
    pub fn drain(&mut self) {
        while let Some(item) = self.ring.next() {
            if item.len() < std::mem::size_of::<LogEvent>() {
                continue;
            }
            // SAFETY: the record is a LogEvent written by our program (length checked above);
            // read_unaligned makes no alignment assumption about the ring's bytes.
            let event = unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<LogEvent>()) };
            info!("{}", log_line(&event, &self.names));
        }
    }
}

impl AsRawFd for KernelLog {
    fn as_raw_fd(&self) -> RawFd {
        self.ring.as_raw_fd()
    }
}

/// `drop rule=2 (no-web) proto=6 10.0.0.1:40000 -> 10.0.0.2:80`; IPv6 addresses in brackets.
/// A rule number the names do not know (the rules changed meanwhile) goes without a name.
pub fn log_line(event: &LogEvent, names: &RuleNames) -> String {
    let outcome = match event.outcome {
        LOGGED_PASS => "pass",
        LOGGED_DROP => "drop",
        LOGGED_LIMIT => "limit",
        LOGGED_AUDIT => "audit",
        _ => "?",
    };
    let rule = match names.name(event.rule) {
        Some(name) => format!("rule={} ({name})", event.rule),
        None => format!("rule={}", event.rule),
    };
    let v6 = event.v6 != 0;
    let endpoint =
        |words: &[u32; 4], port: u16| SocketAddr::new(words_address(words, v6), port).to_string();
    format!(
        "{outcome} {rule} proto={} {} -> {}",
        event.proto,
        endpoint(&event.src, event.sport),
        endpoint(&event.dst, event.dport)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &[&str]) -> RuleNames {
        let names = RuleNames::default();
        *names.0.write().unwrap() = list.iter().map(|s| s.to_string()).collect();
        names
    }

    fn words(address: &str) -> [u32; 4] {
        firewall_common::address_words(address.parse().unwrap())
    }

    #[test]
    fn lines_name_their_rules() {
        let names = names(&["ssh", "no-web"]);
        let mut event = LogEvent {
            src: words("10.0.0.1"),
            dst: words("10.0.0.2"),
            rule: 2,
            sport: 40000,
            dport: 80,
            proto: 6,
            outcome: LOGGED_DROP,
            ..LogEvent::default()
        };
        assert_eq!(
            log_line(&event, &names),
            "drop rule=2 (no-web) proto=6 10.0.0.1:40000 -> 10.0.0.2:80"
        );
        event.rule = 0;
        event.outcome = LOGGED_AUDIT;
        assert_eq!(
            log_line(&event, &names),
            "audit rule=0 (default policy) proto=6 10.0.0.1:40000 -> 10.0.0.2:80"
        );
        // Unknown numbers (the rules changed meanwhile) go without a name.
        event.rule = 9;
        event.outcome = LOGGED_LIMIT;
        assert_eq!(
            log_line(&event, &names),
            "limit rule=9 proto=6 10.0.0.1:40000 -> 10.0.0.2:80"
        );
    }

    #[test]
    fn ipv6_addresses_are_bracketed() {
        let event = LogEvent {
            src: words("2001:db8::7"),
            dst: words("fd00::1"),
            rule: 1,
            sport: 5353,
            dport: 53,
            proto: 17,
            v6: 1,
            outcome: LOGGED_PASS,
            ..LogEvent::default()
        };
        assert_eq!(
            log_line(&event, &names(&["dns"])),
            "pass rule=1 (dns) proto=17 [2001:db8::7]:5353 -> [fd00::1]:53"
        );
    }
}
