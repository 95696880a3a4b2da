//! The kernel's log lines: the XDP program writes a fixed [`LogEvent`] record per logged
//! packet into a ring buffer; the daemon turns each into a line for its logger, with the
//! rule's name.
use std::collections::HashMap;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

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

/// Interface names by index, as log lines show them: looked up with `if_indextoname` and
/// kept for a few seconds, so a burst of lines costs one lookup and a renamed interface shows
/// its new name soon after.
#[derive(Default)]
struct IfaceNames {
    known: HashMap<u32, (String, Instant)>,
}

/// How long a looked-up interface name is used before it is looked up again.
const IFACE_NAME_FRESH: Duration = Duration::from_secs(5);

impl IfaceNames {
    /// The name of interface `ifindex`, or `#INDEX` when there is none (it is gone).
    fn name(&mut self, ifindex: u32) -> String {
        if let Some((name, since)) = self.known.get(&ifindex) {
            if since.elapsed() < IFACE_NAME_FRESH {
                return name.clone();
            }
        }
        let name = crate::host::ifaces::name_of(ifindex).unwrap_or_else(|| format!("#{ifindex}"));
        self.known.insert(ifindex, (name.clone(), Instant::now()));
        name
    }
}

/// The log target of packet lines: `RUST_LOG=firewall::packet=off` silences them.
pub const LOG_TARGET: &str = "firewall::packet";

/// The ring buffer the XDP program logs into, read whenever its fd is readable.
pub struct KernelLog {
    ring: RingBuf<MapData>,
    names: RuleNames,
    ifaces: IfaceNames,
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
            ifaces: IfaceNames::default(),
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
            let iface = self.ifaces.name(event.ifindex);
            info!(target: LOG_TARGET, "{}", log_line(&event, &self.names, &iface));
        }
    }
}

impl AsRawFd for KernelLog {
    fn as_raw_fd(&self) -> RawFd {
        self.ring.as_raw_fd()
    }
}

/// One `key=value` line after the verdict, for people and for parsers (fail2ban, CrowdSec):
/// `drop rule=2 name=no-web iface=eth0 proto=6 src=10.0.0.1 sport=40000 dst=10.0.0.2
/// dport=80`. The keys are always there, in that order; a value with spaces, quotes, `=` or
/// backslashes (a rule name like `rule 3`) is quoted, `"` and `\` escaped. A rule number the
/// names do not know (the rules changed meanwhile) has `name=?`.
pub fn log_line(event: &LogEvent, names: &RuleNames, iface: &str) -> String {
    let outcome = match event.outcome {
        LOGGED_PASS => "pass",
        LOGGED_DROP => "drop",
        LOGGED_LIMIT => "limit",
        LOGGED_AUDIT => "audit",
        _ => "?",
    };
    let name = names.name(event.rule).unwrap_or_else(|| "?".into());
    let v6 = event.v6 != 0;
    // Outbound lines say so: their source is this host, not a peer to ban.
    let direction = if event.outbound != 0 { " dir=out" } else { "" };
    format!(
        "{outcome} rule={} name={} iface={}{direction} proto={} src={} sport={} dst={} dport={}",
        event.rule,
        value(&name),
        value(iface),
        event.proto,
        words_address(&event.src, v6),
        event.sport,
        words_address(&event.dst, v6),
        event.dport
    )
}

/// `text` as a value of a `key=value` line: as it is, or quoted when it would not read back
/// as one value.
fn value(text: &str) -> String {
    let plain = !text.is_empty()
        && !text.contains(|c: char| c.is_whitespace() || c.is_control() || "\"=\\".contains(c));
    if plain {
        return text.to_string();
    }
    let mut quoted = String::with_capacity(text.len() + 2);
    quoted.push('"');
    for c in text.chars() {
        match c {
            '"' | '\\' => {
                quoted.push('\\');
                quoted.push(c);
            }
            c if c.is_control() => quoted.extend(c.escape_default()),
            c => quoted.push(c),
        }
    }
    quoted.push('"');
    quoted
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
    fn lines_are_key_value_pairs_after_the_verdict() {
        let names = names(&["ssh", "no-web", "rule 3"]);
        let mut event = LogEvent {
            src: words("10.0.0.1"),
            dst: words("10.0.0.2"),
            rule: 2,
            ifindex: 4,
            sport: 40000,
            dport: 80,
            proto: 6,
            outcome: LOGGED_DROP,
            ..LogEvent::default()
        };
        assert_eq!(
            log_line(&event, &names, "eth0"),
            "drop rule=2 name=no-web iface=eth0 proto=6 src=10.0.0.1 sport=40000 dst=10.0.0.2 dport=80"
        );
        event.rule = 0;
        event.outcome = LOGGED_AUDIT;
        assert_eq!(
            log_line(&event, &names, "eth0"),
            "audit rule=0 name=\"default policy\" iface=eth0 proto=6 src=10.0.0.1 sport=40000 \
             dst=10.0.0.2 dport=80"
        );
        event.rule = 3;
        event.outcome = LOGGED_PASS;
        assert!(log_line(&event, &names, "eth0").starts_with("pass rule=3 name=\"rule 3\" "));
        // Unknown numbers (the rules changed meanwhile) have no name.
        event.rule = 9;
        event.outcome = LOGGED_LIMIT;
        assert!(log_line(&event, &names, "#4").starts_with("limit rule=9 name=? iface=#4 "));
        // An out rule's line says so: its source is this host.
        event.rule = 2;
        event.outcome = LOGGED_DROP;
        event.outbound = 1;
        assert_eq!(
            log_line(&event, &names, "eth0"),
            "drop rule=2 name=no-web iface=eth0 dir=out proto=6 src=10.0.0.1 sport=40000 \
             dst=10.0.0.2 dport=80"
        );
    }

    #[test]
    fn ipv6_addresses_are_bare() {
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
            log_line(&event, &names(&["dns"]), "wg0"),
            "pass rule=1 name=dns iface=wg0 proto=17 src=2001:db8::7 sport=5353 dst=fd00::1 dport=53"
        );
    }

    #[test]
    fn values_that_would_not_read_back_are_quoted() {
        assert_eq!(value("web-1.2"), "web-1.2");
        assert_eq!(value("rule 3"), "\"rule 3\"");
        assert_eq!(value("a=b"), "\"a=b\"");
        assert_eq!(value("say \"hi\""), "\"say \\\"hi\\\"\"");
        assert_eq!(value("back\\slash"), "\"back\\\\slash\"");
        assert_eq!(value("tab\there"), "\"tab\\there\"");
        assert_eq!(value(""), "\"\"");
    }

    #[test]
    fn interface_names_are_looked_up_by_index() {
        let mut ifaces = IfaceNames::default();
        // Index 1 is loopback in every network namespace.
        assert_eq!(ifaces.name(1), "lo");
        assert_eq!(ifaces.name(1), "lo");
        assert_eq!(ifaces.name(u32::MAX), format!("#{}", u32::MAX));
    }
}
