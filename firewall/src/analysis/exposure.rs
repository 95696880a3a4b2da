//! `firewall exposure`: for each listening socket of the host, who the rules let reach it
//! (everyone, some sources, nobody). The review of open ports every hardening guide asks
//! for, answered from the firewall's own rules.
//!
//! The source address space is cut at every boundary of every `from` network, so that within
//! each piece every rule matches all addresses or none; one address per piece is judged. The
//! destination is the socket's address, or (for a wildcard socket) one address per piece of
//! the `to` networks, a source counting as reaching the socket when any destination passes.
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Subnets, Ipv6Subnets};

use firewall_common::proto::IPPROTO_TCP;

use crate::host::sockets::Listener;
use crate::rules::model::{Action, Direction, Rule, RuleSet};

/// Who reaches a socket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reach {
    Everyone,
    Nobody,
    /// These sources only.
    Only(Vec<IpNet>),
    /// Everyone but these sources.
    AllBut(Vec<IpNet>),
    /// Bound to a loopback address: not reachable from the network at all.
    Loopback,
}

/// An inclusive range of addresses of one family, as integers.
type Range = (u128, u128);

/// A rule as far as a socket's first packet goes: its action, and its source and destination
/// ranges (`None`: any).
type Judge = (Action, Option<Vec<Range>>, Option<Vec<Range>>);

/// Who the rules let reach a socket of `proto` bound to `addr`:`port` over `addr`'s family.
/// Rules naming interfaces are taken as on an interface no rule names.
pub fn reach(set: &RuleSet, proto: u8, addr: IpAddr, port: u16) -> Reach {
    if addr.is_loopback() {
        return Reach::Loopback;
    }
    let v6 = addr.is_ipv6();
    let max = if v6 { u128::MAX } else { u128::from(u32::MAX) };
    // The in rules that can match a first packet to this port, with their networks as
    // sorted ranges of this family (`None`: any address). Out rules judge only what the host
    // sends, and its replies to what the in rules let in pass them.
    let rules: Vec<Judge> = set
        .rules
        .iter()
        .filter(|rule| rule.direction == Direction::In)
        .filter(|rule| rule.iface.is_none() && port_matches(rule, proto, port))
        .map(|rule| (rule.action, ranges(&rule.from, v6), ranges(&rule.to, v6)))
        .collect();
    let sources = pieces(rules.iter().map(|(_, from, _)| from), max);
    let destinations = if addr.is_unspecified() {
        pieces(rules.iter().map(|(_, _, to)| to), max)
    } else {
        vec![(to_int(addr), to_int(addr))]
    };
    let passes = |src: u128, dst: u128| {
        let hit = rules
            .iter()
            .find(|(_, from, to)| contains(from.as_deref(), src) && contains(to.as_deref(), dst));
        matches!(
            hit.map_or(set.default_policy, |(action, _, _)| *action),
            Action::Allow
        )
    };
    let mut allowed: Vec<Range> = Vec::new();
    let mut denied: Vec<Range> = Vec::new();
    for &(start, end) in &sources {
        let open = destinations.iter().any(|&(dst, _)| passes(start, dst));
        let list = if open { &mut allowed } else { &mut denied };
        match list.last_mut() {
            Some(last) if last.1.checked_add(1) == Some(start) => last.1 = end,
            _ => list.push((start, end)),
        }
    }
    match (allowed.is_empty(), denied.is_empty()) {
        (true, _) => Reach::Nobody,
        (false, true) => Reach::Everyone,
        _ if cidr_count(&allowed, v6) <= cidr_count(&denied, v6) => {
            Reach::Only(cidrs(&allowed, v6))
        }
        _ => Reach::AllBut(cidrs(&denied, v6)),
    }
}

fn port_matches(rule: &Rule, proto: u8, port: u16) -> bool {
    rule.proto.matches(proto)
        && rule
            .ports
            .as_ref()
            .is_none_or(|ranges| ranges.iter().any(|range| range.contains(&port)))
}

/// The networks of `nets` in the family, as sorted disjoint ranges; `None` for "any".
fn ranges(nets: &Option<Vec<IpNet>>, v6: bool) -> Option<Vec<Range>> {
    let nets = nets.as_ref()?;
    let mut ranges: Vec<Range> = nets
        .iter()
        .filter(|net| net.addr().is_ipv6() == v6)
        .map(|net| (to_int(net.network()), to_int(net.broadcast())))
        .collect();
    ranges.sort_unstable();
    let mut merged: Vec<Range> = Vec::with_capacity(ranges.len());
    for (start, end) in ranges {
        match merged.last_mut() {
            Some(last) if start <= last.1 => last.1 = last.1.max(end),
            _ => merged.push((start, end)),
        }
    }
    Some(merged)
}

fn contains(ranges: Option<&[Range]>, addr: u128) -> bool {
    let Some(ranges) = ranges else {
        return true;
    };
    // Disjoint and sorted: only the last range starting at or before `addr` can hold it.
    let after = ranges.partition_point(|&(start, _)| start <= addr);
    after > 0 && ranges[after - 1].1 >= addr
}

/// The address space cut at every range boundary: pieces within which each range holds all
/// addresses or none.
fn pieces<'a>(lists: impl Iterator<Item = &'a Option<Vec<Range>>>, max: u128) -> Vec<Range> {
    let mut cuts = vec![0u128];
    for ranges in lists.flatten() {
        for &(start, end) in ranges {
            cuts.push(start);
            if end < max {
                cuts.push(end + 1);
            }
        }
    }
    cuts.sort_unstable();
    cuts.dedup();
    cuts.iter()
        .enumerate()
        .map(|(i, &start)| (start, cuts.get(i + 1).map_or(max, |next| next - 1)))
        .collect()
}

fn to_int(addr: IpAddr) -> u128 {
    match addr {
        IpAddr::V4(addr) => u128::from(u32::from(addr)),
        IpAddr::V6(addr) => u128::from(addr),
    }
}

fn cidrs(ranges: &[Range], v6: bool) -> Vec<IpNet> {
    let mut nets = Vec::new();
    for &(start, end) in ranges {
        if v6 {
            let subnets = Ipv6Subnets::new(Ipv6Addr::from(start), Ipv6Addr::from(end), 0);
            nets.extend(subnets.map(IpNet::V6));
        } else {
            let (start, end) = (start as u32, end as u32);
            let subnets = Ipv4Subnets::new(Ipv4Addr::from(start), Ipv4Addr::from(end), 0);
            nets.extend(subnets.map(IpNet::V4));
        }
    }
    nets
}

fn cidr_count(ranges: &[Range], v6: bool) -> usize {
    cidrs(ranges, v6).len()
}

/// Up to `shown` networks, then how many more.
fn list(nets: &[IpNet], shown: usize) -> String {
    let mut text = nets
        .iter()
        .take(shown)
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    if nets.len() > shown {
        let _ = write!(text, " (+{} more)", nets.len() - shown);
    }
    text
}

fn describe(reach: &Reach) -> String {
    match reach {
        Reach::Everyone => "everyone".into(),
        Reach::Nobody => "nobody".into(),
        Reach::Only(nets) => format!("only {}", list(nets, 6)),
        Reach::AllBut(nets) => format!("everyone except {}", list(nets, 6)),
        Reach::Loopback => "this host only (loopback)".into(),
    }
}

/// The report: a line per listening socket.
pub fn report(set: &RuleSet, listeners: &[Listener]) -> String {
    let mut out = format!(
        "{:<5} {:<28} {:<22} exposed to\n",
        "proto", "address", "process"
    );
    for listener in listeners {
        let proto = if listener.proto == IPPROTO_TCP {
            "tcp"
        } else {
            "udp"
        };
        let addr = match listener.addr {
            IpAddr::V6(addr) => format!("[{addr}]:{}", listener.port),
            IpAddr::V4(addr) => format!("{addr}:{}", listener.port),
        };
        let mut exposed = describe(&reach(set, listener.proto, listener.addr, listener.port));
        if listener.addr == IpAddr::V6(Ipv6Addr::UNSPECIFIED) {
            // A dual-stack socket takes IPv4 too (unless IPV6_V6ONLY).
            let v4 = reach(
                set,
                listener.proto,
                IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                listener.port,
            );
            let _ = write!(exposed, "; over IPv4 (dual-stack): {}", describe(&v4));
        }
        let process = listener.process.as_deref().unwrap_or("?");
        let _ = writeln!(out, "{proto:<5} {addr:<28} {process:<22} {exposed}");
    }
    if set.audit {
        out.push_str("note: audit mode: nothing is dropped, so everything above is reachable\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::config::parse_rules;
    use crate::testing::rules::SERVER;
    use firewall_common::proto::IPPROTO_UDP;

    fn set(text: &str) -> RuleSet {
        parse_rules("t.toml", text).unwrap()
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|n| n.parse().unwrap()).collect()
    }

    #[test]
    fn everyone_nobody_some_and_all_but_some() {
        let rules = set(SERVER);
        let any4 = ip("0.0.0.0");
        let web = reach(&rules, IPPROTO_TCP, any4, 443);
        let expect = Reach::AllBut(nets(&["203.0.113.0/24"]));
        assert_eq!(web, expect);
        assert_eq!(
            reach(&rules, IPPROTO_TCP, any4, 22),
            Reach::Only(nets(&["10.0.0.0/8", "198.51.100.0/24"]))
        );
        assert_eq!(reach(&rules, IPPROTO_TCP, any4, 25), Reach::Nobody);
        // Port 53 only on one destination: a wildcard socket is reachable there, one bound
        // elsewhere is not.
        assert!(matches!(
            reach(&rules, IPPROTO_UDP, any4, 53),
            Reach::AllBut(_)
        ));
        assert_eq!(
            reach(&rules, IPPROTO_UDP, ip("192.0.2.54"), 53),
            Reach::Nobody
        );
        assert_eq!(
            reach(&rules, IPPROTO_TCP, ip("127.0.0.1"), 631),
            Reach::Loopback
        );
        // IPv6 sources: the IPv4 blocklist does not apply; ssh allows no IPv6 source.
        assert_eq!(reach(&rules, IPPROTO_TCP, ip("::"), 443), Reach::Everyone);
        assert_eq!(reach(&rules, IPPROTO_TCP, ip("::"), 22), Reach::Nobody);
    }

    #[test]
    fn out_rules_change_no_exposure() {
        let rules = set(SERVER);
        // Out rules first: as in rules they would decide everything.
        let outbound = format!(
            "[[rules]]\naction = \"deny\"\ndirection = \"out\"\nproto = \"udp\"\n\n\
             [[rules]]\naction = \"allow\"\ndirection = \"out\"\nproto = \"tcp\"\n{SERVER}"
        );
        let mut with_out = set(&outbound);
        with_out.outbound_policy = Action::Deny;
        for (proto, port) in [(IPPROTO_TCP, 443), (IPPROTO_TCP, 22), (IPPROTO_UDP, 53)] {
            let any4 = ip("0.0.0.0");
            assert_eq!(
                reach(&with_out, proto, any4, port),
                reach(&rules, proto, any4, port)
            );
        }
    }

    #[test]
    fn default_allow_with_a_deny() {
        let rules = set(
            "[[rules]]\naction = \"deny\"\nproto = \"udp\"\nports = [5353]\nfrom = [\"0.0.0.0/1\"]\n",
        );
        assert_eq!(
            reach(&rules, IPPROTO_UDP, ip("0.0.0.0"), 5353),
            Reach::Only(nets(&["128.0.0.0/1"]))
        );
        assert_eq!(
            reach(&rules, IPPROTO_TCP, ip("0.0.0.0"), 5353),
            Reach::Everyone
        );
    }
}
