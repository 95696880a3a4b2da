//! `firewall explain`: which rule decides a packet and why, from the reference evaluator, with
//! the reason each earlier rule did not match.
use std::fmt::Write as _;
use std::net::IpAddr;

use anyhow::{bail, Result};

use firewall_common::proto::{
    icmp_type_names, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP, TCP_SYN,
};

use crate::analysis::reference::{classify_direction, PacketInfo, Reason};
use crate::rules::model::{icmp_type_text, Action, Direction, ListStyle, Proto, Rule, RuleSet};

/// The packet an operator asks about.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Question {
    /// `tcp`, `udp`, `icmp`, `icmpv6` or an IP protocol number.
    pub proto: String,
    pub from: IpAddr,
    pub to: IpAddr,
    /// Destination port (TCP and UDP).
    pub port: Option<u16>,
    /// ICMP type (ICMP over IPv4, ICMPv6 over IPv6): a name as nftables spells it, or a
    /// number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub icmp_type: Option<String>,
    /// Interface the packet arrives on (leaves by, outbound); `None`: one no rule names.
    pub iface: Option<String>,
    /// Arriving (`in`, judged by in rules) or sent by the host (`out`, by out rules).
    #[serde(default, skip_serializing_if = "is_inbound")]
    pub direction: Direction,
}

fn is_inbound(direction: &Direction) -> bool {
    *direction == Direction::In
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
        let icmp = match &self.icmp_type {
            None => None,
            Some(kind) => Some((self.icmp_type(proto, kind)?, 0)),
        };
        Ok(PacketInfo {
            src: self.from,
            dst: self.to,
            proto,
            dport: self.port,
            // A new connection's first packet: what the rules, not connection state, decide.
            sport: self.port.map(|_| 40000),
            tcp_flags: TCP_SYN,
            icmp,
            quoted: None,
        })
    }

    /// The type number `kind` names for a packet of IP protocol `proto`.
    fn icmp_type(&self, proto: u8, kind: &str) -> Result<u8> {
        let v6 = self.from.is_ipv6();
        let own = if v6 { IPPROTO_ICMPV6 } else { IPPROTO_ICMP };
        if proto != own {
            bail!("--icmp-type needs --proto icmp with IPv4 addresses, or icmpv6 with IPv6");
        }
        let named = icmp_type_names(v6)
            .iter()
            .find(|(name, _)| *name == kind)
            .map(|&(_, number)| number);
        match named.or_else(|| kind.parse().ok()) {
            Some(number) => Ok(number),
            None => bail!("unknown ICMP type {kind:?}: a name as nftables spells it, or 0-255"),
        }
    }
}

/// The explanation, as lines of text.
pub fn explain(set: &RuleSet, question: &Question) -> Result<String> {
    let packet = question.packet()?;
    let iface = question.iface.as_deref();
    let direction = question.direction;
    let decision = classify_direction(set, &packet, iface, direction);
    let mut out = String::new();
    let port = match (question.port, &packet.icmp) {
        (Some(port), _) => format!(" port {port}"),
        (None, Some((kind, _))) => {
            format!(" type {}", icmp_type_text(question.from.is_ipv6(), *kind))
        }
        (None, None) => String::new(),
    };
    let on = iface.map_or("any interface no rule names".to_string(), |name| {
        name.to_string()
    });
    let travel = match direction {
        Direction::In => "arriving on",
        Direction::Out => "sent by this host by",
    };
    writeln!(
        out,
        "{} {} -> {}{port}, {travel} {on}",
        question.proto, question.from, question.to
    )?;
    let decided_at = match decision.reason {
        Reason::Rule(index) => index,
        _ => set.rules.len(),
    };
    // Rules of the other direction never judge the packet: not listed.
    let earlier = set.rules.iter().enumerate().take(decided_at);
    for (index, rule) in earlier.filter(|(_, rule)| rule.direction == direction) {
        writeln!(
            out,
            "  rule {}: does not match: {}",
            rule_title(index, rule),
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
                "  rule {}: matches ({})",
                rule_title(index, rule),
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
        _ if direction == Direction::In => writeln!(
            out,
            "verdict: {} (no rule matches: default policy)",
            verdict(set.default_policy)
        )?,
        _ if set.filters_outbound() => writeln!(
            out,
            "verdict: {} (no out rule matches: outbound default)",
            verdict(set.outbound_policy)
        )?,
        _ => writeln!(
            out,
            "verdict: pass (outbound packets are not filtered: no out rule, outbound = \"allow\")"
        )?,
    }
    if set.audit {
        writeln!(
            out,
            "note: audit mode: the packet is counted and logged, never dropped"
        )?;
    }
    match direction {
        Direction::In if set.established => writeln!(
            out,
            "note: replies to connections this host opened pass before the rules (established = true)"
        )?,
        Direction::Out if set.filters_outbound() => writeln!(
            out,
            "note: packets of connections this host opened or accepted pass before the out rules"
        )?,
        _ => {}
    }
    Ok(out)
}

/// `2 "ssh"`, with the rule's comment after its name: `2 "ssh" [admins only]`.
fn rule_title(index: usize, rule: &Rule) -> String {
    match &rule.comment {
        Some(comment) => format!("{} {:?} [{comment}]", index + 1, rule.name),
        None => format!("{} {:?}", index + 1, rule.name),
    }
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
    if let Some(types) = &rule.icmp_types {
        if !packet.icmp.is_some_and(|(kind, _)| types.contains(&kind)) {
            return Some("ICMP type not in its icmp_types");
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
    let (proto, ports) = (text.proto, text.ports);
    let action = match rule.direction {
        Direction::In => text.action.to_string(),
        Direction::Out => format!("{} out", text.action),
    };
    let types = text
        .icmp_types
        .map_or(String::new(), |types| format!(", icmp types {types}"));
    format!(
        "{action}: proto {proto}, from {}, to {}, ports {ports}{types}",
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
                icmp_type: None,
                iface: None,
                direction: Direction::In,
            },
        )
    }

    #[test]
    fn outbound_questions_are_judged_by_the_out_rules() {
        let text = format!(
            "{SERVER}\n[[rules]]\nname = \"https-out\"\naction = \"allow\"\n\
             direction = \"out\"\nproto = \"tcp\"\nports = [443]\n"
        );
        let mut set = parse_rules("rules.toml", &text).unwrap();
        let question = |port| Question {
            proto: "tcp".into(),
            from: "192.0.2.1".parse().unwrap(),
            to: "198.51.100.7".parse().unwrap(),
            port: Some(port),
            icmp_type: None,
            iface: None,
            direction: Direction::Out,
        };
        let out = explain(&set, &question(443)).unwrap();
        assert!(out.contains("sent by this host"), "{out}");
        assert!(!out.contains("\"web\""), "in rules are not listed: {out}");
        assert!(out.contains("matches (allow out: proto tcp"), "{out}");
        let out = explain(&set, &question(8080)).unwrap();
        assert!(
            out.contains("verdict: pass (no out rule matches: outbound default)"),
            "{out}"
        );
        set.outbound_policy = Action::Deny;
        let out = explain(&set, &question(8080)).unwrap();
        assert!(out.contains("verdict: drop (no out rule matches"), "{out}");
        // The same packet asked about inbound: the out rule plays no part.
        let inbound = Question {
            direction: Direction::In,
            ..question(443)
        };
        assert!(!explain(&set, &inbound).unwrap().contains("https-out"));
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

    fn ask_icmp(proto: &str, from: &str, to: &str, kind: &str) -> Result<String> {
        let set = parse_rules(
            "rules.toml",
            r#"
            [defaults]
            policy = "deny"
            [[rules]]
            name = "ping"
            action = "allow"
            proto = "icmp"
            icmp_types = ["echo-request", 3]
            comment = "pings from anywhere"
            [[rules]]
            name = "ping6"
            action = "allow"
            proto = "icmpv6"
            icmp_types = ["echo-request"]
            "#,
        )?;
        explain(
            &set,
            &Question {
                proto: proto.into(),
                from: from.parse()?,
                to: to.parse()?,
                port: None,
                icmp_type: Some(kind.into()),
                iface: None,
                direction: Direction::In,
            },
        )
    }

    #[test]
    fn icmp_types_are_asked_about_and_shown() {
        let out = ask_icmp("icmp", "192.0.2.7", "192.0.2.1", "echo-request").unwrap();
        assert!(
            out.starts_with("icmp 192.0.2.7 -> 192.0.2.1 type echo-request,"),
            "{out}"
        );
        assert!(
            out.contains("rule 1 \"ping\" [pings from anywhere]: matches (allow: proto icmp, from any, to any, ports any, icmp types destination-unreachable, echo-request)"),
            "{out}"
        );
        let out = ask_icmp("icmp", "192.0.2.7", "192.0.2.1", "13").unwrap();
        assert!(
            out.contains(
                "rule 1 \"ping\" [pings from anywhere]: does not match: ICMP type not in its icmp_types"
            ),
            "{out}"
        );
        assert!(out.contains("verdict: drop (no rule matches"), "{out}");
        let out = ask_icmp("icmpv6", "2001:db8::7", "2001:db8::1", "echo-request").unwrap();
        assert!(out.contains("verdict: pass (rule 2 \"ping6\")"), "{out}");
        // Names of the other family, and types of the other family's protocol, are refused.
        assert!(ask_icmp("icmp", "192.0.2.7", "192.0.2.1", "nd-neighbor-solicit").is_err());
        assert!(ask_icmp("icmp", "2001:db8::7", "2001:db8::1", "echo-request").is_err());
        assert!(ask_icmp("tcp", "192.0.2.7", "192.0.2.1", "8").is_err());
    }
}
