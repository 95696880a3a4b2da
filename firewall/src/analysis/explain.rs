//! `firewall explain`: which rule decides a packet and why, from the reference evaluator, with
//! the reason each earlier rule did not match.
use std::fmt::Write as _;
use std::net::IpAddr;

use anyhow::{bail, Result};

use firewall_common::proto::{IPPROTO_TCP, IPPROTO_UDP, TCP_SYN};

use crate::analysis::reference::{classify_on, PacketInfo, Reason};
use crate::rules::model::{Action, ListStyle, Proto, Rule, RuleSet};

/// The packet an operator asks about.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Question {
    /// `tcp`, `udp`, `icmp`, `icmpv6` or an IP protocol number.
    pub proto: String,
    pub from: IpAddr,
    pub to: IpAddr,
    /// Destination port (TCP and UDP).
    pub port: Option<u16>,
    /// Interface the packet arrives on; `None`: one no rule names.
    pub iface: Option<String>,
}

impl Question {
    fn packet(&self) -> Result<PacketInfo> {
        if self.from.is_ipv4() != self.to.is_ipv4() {
            bail!("--from and --to must both be IPv4 or both IPv6");
        }
        let named = Proto::from_name(&self.proto).and_then(Proto::number);
        let Some(proto) = named.or_else(|| self.proto.parse::<u8>().ok()) else {
            bail!("--proto must be tcp, udp, icmp, icmpv6 or a number 0-255");
        };
        let has_ports = proto == IPPROTO_TCP || proto == IPPROTO_UDP;
        if self.port.is_some() && !has_ports {
            bail!("--port needs --proto tcp or udp");
        }
        if has_ports && self.port.is_none() {
            bail!("--port is needed with --proto tcp or udp");
        }
        Ok(PacketInfo {
            src: self.from,
            dst: self.to,
            proto,
            dport: self.port,
            // A new connection's first packet: what the rules, not connection state, decide.
            sport: self.port.map(|_| 40000),
            tcp_flags: TCP_SYN,
            icmp: None,
            quoted: None,
        })
    }
}

/// The explanation, as lines of text.
pub fn explain(set: &RuleSet, question: &Question) -> Result<String> {
    let packet = question.packet()?;
    let iface = question.iface.as_deref();
    let decision = classify_on(set, &packet, iface);
    let mut out = String::new();
    let port = question
        .port
        .map_or(String::new(), |port| format!(" port {port}"));
    let on = iface.map_or("any interface no rule names".to_string(), |name| {
        name.to_string()
    });
    writeln!(
        out,
        "{} {} -> {}{port}, arriving on {on}",
        question.proto, question.from, question.to
    )?;
    let decided_at = match decision.reason {
        Reason::Rule(index) => index,
        _ => set.rules.len(),
    };
    for (index, rule) in set.rules.iter().enumerate().take(decided_at) {
        writeln!(
            out,
            "  rule {} {:?}: does not match: {}",
            index + 1,
            rule.name,
            mismatch(rule, &packet, iface).unwrap_or("?")
        )?;
    }
    let verdict = |action| match action {
        Action::Allow => "pass",
        Action::Deny => "drop",
    };
    match decision.reason {
        Reason::Rule(index) => {
            let rule = &set.rules[index];
            writeln!(
                out,
                "  rule {} {:?}: matches ({})",
                index + 1,
                rule.name,
                describe(rule)
            )?;
            writeln!(
                out,
                "verdict: {} (rule {} {:?})",
                verdict(rule.action),
                index + 1,
                rule.name
            )?;
        }
        _ => writeln!(
            out,
            "verdict: {} (no rule matches: default policy)",
            verdict(set.default_policy)
        )?,
    }
    if set.audit {
        writeln!(
            out,
            "note: audit mode: the packet is counted and logged, never dropped"
        )?;
    }
    if set.established {
        writeln!(
            out,
            "note: replies to connections this host opened pass before the rules (established = true)"
        )?;
    }
    Ok(out)
}

/// The first condition of `rule` that `packet` fails.
fn mismatch(rule: &Rule, packet: &PacketInfo, iface: Option<&str>) -> Option<&'static str> {
    if let Some(names) = &rule.iface {
        if !iface.is_some_and(|iface| names.iter().any(|name| name == iface)) {
            return Some("interface not in its iface list");
        }
    }
    if !rule.proto.matches(packet.proto) {
        return Some("protocol differs");
    }
    if let Some(ranges) = &rule.ports {
        let port_ok = packet
            .dport
            .is_some_and(|port| ranges.iter().any(|range| range.contains(&port)));
        if !port_ok {
            return Some("destination port not in its ports");
        }
    }
    let contains = |nets: &Option<Vec<ipnet::IpNet>>, addr: IpAddr| {
        nets.as_ref()
            .is_none_or(|nets| nets.iter().any(|net| net.contains(&addr)))
    };
    if !contains(&rule.from, packet.src) {
        return Some("source not in its from");
    }
    if !contains(&rule.to, packet.dst) {
        return Some("destination not in its to");
    }
    None
}

/// The rule as `explain` shows a match: `allow: proto tcp, from any, to any, ports 22`.
fn describe(rule: &Rule) -> String {
    let text = rule.text(ListStyle::SENTENCE);
    let (action, proto, ports) = (text.action, text.proto, text.ports);
    format!(
        "{action}: proto {proto}, from {}, to {}, ports {ports}",
        text.from, text.to
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::config::parse_rules;
    use crate::testing::rules::SERVER;

    fn ask(proto: &str, from: &str, port: Option<u16>) -> Result<String> {
        let set = parse_rules("rules.toml", SERVER)?;
        explain(
            &set,
            &Question {
                proto: proto.into(),
                from: from.parse()?,
                to: "192.0.2.1".parse()?,
                port,
                iface: None,
            },
        )
    }

    #[test]
    fn names_the_deciding_rule_and_why_earlier_ones_missed() {
        let out = ask("tcp", "198.51.100.7", Some(22)).unwrap();
        assert!(out.contains("rule 1 \"blocklist\": does not match: source not in its from"));
        assert!(out.contains("rule 2 \"web\": does not match: destination port not in its ports"));
        assert!(out.contains(
            "rule 3 \"ssh\": matches (allow: proto tcp, from 10.0.0.0/8, 198.51.100.0/24"
        ));
        assert!(out.contains("verdict: pass (rule 3 \"ssh\")"), "{out}");

        let out = ask("tcp", "203.0.113.9", Some(443)).unwrap();
        assert!(
            out.contains("verdict: drop (rule 1 \"blocklist\")"),
            "{out}"
        );

        let out = ask("udp", "198.51.100.7", Some(22)).unwrap();
        assert!(out.contains("rule 3 \"ssh\": does not match: protocol differs"));
        assert!(
            out.contains("verdict: drop (no rule matches: default policy)"),
            "{out}"
        );
    }

    #[test]
    fn questions_that_make_no_sense_are_refused() {
        assert!(ask("tcp", "2001:db8::1", Some(22)).is_err());
        assert!(ask("icmp", "198.51.100.7", Some(22)).is_err());
        assert!(ask("tcp", "198.51.100.7", None).is_err());
        assert!(ask("sctp", "198.51.100.7", None).is_err());
        assert!(ask("132", "198.51.100.7", None).is_ok());
    }
}
