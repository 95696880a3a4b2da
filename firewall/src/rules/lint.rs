//! Warnings about rule files that are valid but probably not what the operator wants.
use std::borrow::Cow;
use std::cell::OnceCell;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::ops::RangeInclusive;

use firewall_common::proto::{IPPROTO_TCP, IPPROTO_UDP};
use ipnet::IpNet;

use crate::analysis::reference::{classify, PacketInfo, Verdict};
use crate::rules::model::{Action, Direction, Position, Proto, Rule, RuleSet};

const SSH_PORT: u16 = 22;

/// A warning about a rule set, at the rule it is about when there is one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Warning {
    /// Where the rule the warning is about starts in the rule file.
    pub position: Option<Position>,
    pub message: String,
}

impl Warning {
    /// `FILE:LINE:COL: message`, or `FILE: message` without a position.
    pub fn located(&self, file: &str) -> String {
        match self.position {
            Some(Position { line, col }) => format!("{file}:{line}:{col}: {}", self.message),
            None => format!("{file}: {}", self.message),
        }
    }
}

impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// Warnings for `set`: rules that can never match, then a default deny that shuts out SSH.
pub fn warnings(set: &RuleSet) -> Vec<Warning> {
    let mut warnings = shadowed_rules(set);
    if set.default_policy == Action::Deny && !allows_ssh_from_somewhere(set) {
        warnings.push(Warning {
            position: None,
            message: format!(
                "the default policy is deny and no rule allows SSH (tcp port {SSH_PORT}) from \
                 anywhere: once applied, nobody can open a new SSH session to this host"
            ),
        });
    }
    warnings
}

/// Rules that an earlier rule covers: every packet they would match, the earlier one matches
/// first (the first covering rule is named). A rate-limited allow rule covers like any other:
/// packets over its limit are dropped, they do not go on to later rules. `log` changes what
/// is logged, not what matches.
/// Rules naming dynamic sets are left out either way: what they match changes at run time.
fn shadowed_rules(set: &RuleSet) -> Vec<Warning> {
    let shapes: Vec<MatchShape> = set.rules.iter().map(MatchShape::of).collect();
    let dynamic = |index: usize| set.dynamic_uses.iter().any(|use_| use_.rule == index);
    let mut warnings = Vec::new();
    for (index, shape) in shapes.iter().enumerate() {
        if dynamic(index) {
            continue;
        }
        let Some(cover) = shapes[..index]
            .iter()
            .enumerate()
            .position(|(earlier, earlier_shape)| !dynamic(earlier) && earlier_shape.covers(shape))
        else {
            continue;
        };
        warnings.push(Warning {
            position: set.rule_positions.get(index).copied(),
            message: format!(
                "{} can never match: {} matches everything it would",
                label(set, index),
                label(set, cover)
            ),
        });
    }
    warnings
}

/// `rule 3 (web)`, or `rule 3` for a rule without a name of its own.
fn label(set: &RuleSet, index: usize) -> String {
    let number = format!("rule {}", index + 1);
    match &set.rules[index].name {
        name if *name == number => number,
        name => format!("{number} ({name})"),
    }
}

/// What a rule matches, in a form where coverage is a field-by-field check.
struct MatchShape<'a> {
    /// A rule only covers rules of its own direction.
    direction: Direction,
    /// IP protocol numbers the rule can match; `None`: every protocol.
    protos: Option<Vec<u8>>,
    /// Destination port ranges, merged and sorted; `None`: no port needed (so also packets
    /// without one: other protocols, non-first fragments).
    ports: Option<Vec<RangeInclusive<u16>>>,
    from: Networks<'a>,
    to: Networks<'a>,
    iface: Option<&'a [String]>,
    /// ICMP types (sorted); `None`: any.
    icmp_types: Option<&'a [u8]>,
}

/// A rule's `from` or `to` list; `None` is any address.
struct Networks<'a> {
    listed: Option<&'a [IpNet]>,
    /// `listed` aggregated and sorted, made when a later rule is first checked against it
    /// (only rules that pass the cheaper fields are: a set can hold a million networks).
    aggregated: OnceCell<Cow<'a, [IpNet]>>,
}

impl<'a> MatchShape<'a> {
    fn of(rule: &'a Rule) -> MatchShape<'a> {
        // Every field listed, so that a new field of `Rule` does not compile until it is
        // decided here whether it narrows what the rule matches.
        let Rule {
            name: _,
            action: _,
            direction,
            proto,
            from,
            to,
            ports,
            iface,
            icmp_types,
            limit: _,
            log: _,
            comment: _,
        } = rule;
        let protos = match (proto, ports) {
            // Ports match only TCP and UDP: "any" with ports means those two.
            (Proto::Any, Some(_)) => Some(vec![IPPROTO_TCP, IPPROTO_UDP]),
            (proto, _) => proto.number().map(|number| vec![number]),
        };
        let networks = |listed: &'a Option<Vec<IpNet>>| Networks {
            listed: listed.as_deref(),
            aggregated: OnceCell::new(),
        };
        MatchShape {
            direction: *direction,
            protos,
            ports: ports.as_deref().map(merged_ranges),
            from: networks(from),
            to: networks(to),
            iface: iface.as_deref(),
            icmp_types: icmp_types.as_deref(),
        }
    }

    /// Whether every packet `later` matches, this one matches too.
    fn covers(&self, later: &MatchShape) -> bool {
        let protos = match (&self.protos, &later.protos) {
            (None, _) => true,
            (Some(_), None) => false,
            (Some(mine), Some(theirs)) => theirs.iter().all(|proto| mine.contains(proto)),
        };
        let ports = || match (&self.ports, &later.ports) {
            (None, _) => true,
            (Some(_), None) => false,
            (Some(mine), Some(theirs)) => theirs.iter().all(|range| range_covered(mine, range)),
        };
        let iface = || match (self.iface, later.iface) {
            (None, _) => true,
            (Some(_), None) => false,
            (Some(mine), Some(theirs)) => theirs.iter().all(|name| mine.contains(name)),
        };
        let icmp_types = || match (self.icmp_types, later.icmp_types) {
            (None, _) => true,
            (Some(_), None) => false,
            (Some(mine), Some(theirs)) => theirs.iter().all(|kind| mine.contains(kind)),
        };
        self.direction == later.direction
            && protos
            && ports()
            && iface()
            && icmp_types()
            && self.from.cover(&later.from)
            && self.to.cover(&later.to)
    }
}

impl<'a> Networks<'a> {
    /// Whether the addresses `later` matches (`None`: every address of both families) lie
    /// in these.
    fn cover(&self, later: &Networks<'_>) -> bool {
        let Some(listed) = self.listed else {
            return true;
        };
        let everything = [
            IpNet::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0).expect("/0 is a valid prefix"),
            IpNet::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0).expect("/0 is a valid prefix"),
        ];
        let later = later.listed.unwrap_or(&everything);
        if listed == later {
            return true;
        }
        let mine = self.aggregated.get_or_init(|| aggregated(listed));
        later.iter().all(|net| {
            // The last prefix starting at or before `net` is the only one that can hold it.
            let after = mine.partition_point(|candidate| candidate <= net);
            after > 0 && mine[after - 1].contains(net)
        })
    }
}

/// `ranges` sorted, overlapping and adjacent ones joined.
fn merged_ranges(ranges: &[RangeInclusive<u16>]) -> Vec<RangeInclusive<u16>> {
    let mut sorted = ranges.to_vec();
    sorted.sort_by_key(|range| *range.start());
    let mut merged: Vec<RangeInclusive<u16>> = Vec::with_capacity(sorted.len());
    for range in sorted {
        match merged.last_mut() {
            Some(last) if u32::from(*range.start()) <= u32::from(*last.end()) + 1 => {
                *last = *last.start()..=*last.end().max(range.end());
            }
            _ => merged.push(range),
        }
    }
    merged
}

/// Whether `range` lies in the union of `merged` (sorted, disjoint, not adjacent): then it
/// lies in one of them.
fn range_covered(merged: &[RangeInclusive<u16>], range: &RangeInclusive<u16>) -> bool {
    let after = merged.partition_point(|candidate| candidate.start() <= range.start());
    after > 0 && merged[after - 1].end() >= range.end()
}

/// `nets` as the fewest prefixes of the same union, sorted: a prefix lies in that union only
/// if it lies in one of them (aggregation would have joined any that fill it together).
/// The rule-file parser aggregates every list already: a list that is sorted and disjoint is
/// taken as it is, which saves sorting a million-entry set again on every reload.
fn aggregated(nets: &[IpNet]) -> Cow<'_, [IpNet]> {
    let sorted_disjoint = nets
        .windows(2)
        .all(|pair| pair[0] < pair[1] && !pair[0].contains(&pair[1]));
    if sorted_disjoint {
        return Cow::Borrowed(nets);
    }
    let mut nets = IpNet::aggregate(&nets.to_vec());
    nets.sort();
    Cow::Owned(nets)
}

/// Tries an SSH connection attempt from and to every network the rules name (and from and to
/// an address no rule names), v4 and v6.
fn allows_ssh_from_somewhere(set: &RuleSet) -> bool {
    let named = |field: fn(&crate::rules::model::Rule) -> Option<&Vec<ipnet::IpNet>>| {
        let mut addrs: Vec<IpAddr> = set
            .rules
            .iter()
            .filter_map(field)
            .flatten()
            .map(|net| net.network())
            .collect();
        addrs.push(IpAddr::V4(Ipv4Addr::new(203, 0, 113, 77)));
        addrs.push(IpAddr::V6(Ipv6Addr::new(
            0x2001, 0xdb8, 0x77, 0, 0, 0, 0, 0x77,
        )));
        addrs
    };
    let sources = named(|rule| rule.from.as_ref());
    let destinations = named(|rule| rule.to.as_ref());
    sources.iter().any(|&src| {
        destinations
            .iter()
            .filter(|dst| dst.is_ipv4() == src.is_ipv4())
            .any(|&dst| {
                let attempt = PacketInfo {
                    src,
                    dst,
                    proto: IPPROTO_TCP,
                    dport: Some(SSH_PORT),
                    sport: Some(50_000),
                    tcp_flags: 0x02,
                    icmp: None,
                    quoted: None,
                };
                classify(set, &attempt).verdict == Verdict::Pass
            })
    })
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::rules::config::parse_rules;

    fn warns(text: &str) -> bool {
        !warnings(&parse_rules("t.toml", text).unwrap()).is_empty()
    }

    /// The shadowing warnings for a file of `[[rules]]` bodies (an SSH allow rule first
    /// would shadow others, so the SSH warning is avoided with a default allow).
    fn shadowed(rules: &[&str]) -> Vec<String> {
        let text: String = rules
            .iter()
            .map(|body| format!("[[rules]]\n{body}\n"))
            .collect();
        warnings(&parse_rules("t.toml", &text).unwrap())
            .iter()
            .map(|warning| warning.located("t.toml"))
            .collect()
    }

    /// Whether rule 2 is reported as shadowed by rule 1.
    fn second_shadowed(first: &str, second: &str) -> bool {
        let found = shadowed(&[first, second]);
        assert!(found.len() <= 1, "{found:?}");
        found.len() == 1
    }

    #[test]
    fn rules_cover_only_rules_of_their_direction() {
        let deny_all = "action = \"deny\"";
        let deny_all_out = "action = \"deny\"\ndirection = \"out\"";
        let web_out = "action = \"allow\"\ndirection = \"out\"\nproto = \"tcp\"\nports = [443]";
        assert!(!second_shadowed(deny_all, web_out));
        assert!(!second_shadowed(
            deny_all_out,
            "action = \"allow\"\nproto = \"tcp\""
        ));
        assert!(second_shadowed(deny_all_out, web_out));
    }

    /// Out rules let nothing in: the SSH warning does not count them.
    #[test]
    fn an_out_rule_for_ssh_does_not_silence_the_ssh_warning() {
        let text = "[defaults]\npolicy = \"deny\"\n[[rules]]\naction = \"allow\"\n\
                    direction = \"out\"\nproto = \"tcp\"\nports = [22]\n";
        assert!(warns(text));
        assert!(!warns(&text.replace("direction = \"out\"\n", "")));
    }

    #[test]
    fn icmp_types_narrow_what_a_rule_covers() {
        let echo = "action = \"allow\"\nproto = \"icmp\"\nicmp_types = [\"echo-request\"]";
        let unreachable = "action = \"deny\"\nproto = \"icmp\"\nicmp_types = [3]";
        let any_icmp = "action = \"deny\"\nproto = \"icmp\"";
        assert!(second_shadowed(echo, echo));
        assert!(!second_shadowed(echo, unreachable));
        assert!(!second_shadowed(echo, any_icmp));
        assert!(second_shadowed(any_icmp, unreachable));
    }

    /// A rule naming a dynamic set matches what the set holds at run time: empty when the file
    /// is checked, so it would look covered by anything; it is not judged either way.
    #[test]
    fn rules_naming_dynamic_sets_are_not_judged() {
        let text =
            "[sets.ops]\ndynamic = true\n\n[[rules]]\naction = \"deny\"\nproto = \"udp\"\n\n\
                    [[rules]]\naction = \"allow\"\nproto = \"udp\"\nfrom = [\"@ops\"]\n\n\
                    [[rules]]\naction = \"allow\"\nfrom = [\"@ops\"]\n\n\
                    [[rules]]\naction = \"deny\"\nproto = \"udp\"\nports = [53]\n";
        let found: Vec<String> = warnings(&parse_rules("t.toml", text).unwrap())
            .iter()
            .map(|warning| warning.located("t.toml"))
            .collect();
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(
            found[0].contains("rule 4 can never match: rule 1"),
            "{found:?}"
        );
    }

    #[test]
    fn names_both_rules_and_the_position_of_the_shadowed_one() {
        let found = shadowed(&[
            "name = \"lan\"\naction = \"allow\"\nfrom = [\"10.0.0.0/8\"]",
            "action = \"deny\"\nproto = \"udp\"",
            "name = \"office\"\naction = \"deny\"\nproto = \"tcp\"\nfrom = [\"10.1.0.0/16\"]\nports = [22]",
        ]);
        assert_eq!(
            found,
            ["t.toml:8:1: rule 3 (office) can never match: rule 1 (lan) matches everything it would"]
        );
    }

    #[test]
    fn addresses_are_covered_by_containment_in_the_union() {
        let allow = |field: &str, nets: &str| format!("action = \"allow\"\n{field} = [{nets}]");
        let deny = |field: &str, nets: &str| format!("action = \"deny\"\n{field} = [{nets}]");
        for field in ["from", "to"] {
            // Two halves together hold the whole /24, though neither alone does.
            assert!(second_shadowed(
                &allow(field, "\"10.0.0.0/25\", \"10.0.0.128/25\""),
                &deny(field, "\"10.0.0.0/24\"")
            ));
            assert!(!second_shadowed(
                &allow(field, "\"10.0.0.0/25\", \"10.0.1.0/25\""),
                &deny(field, "\"10.0.0.0/24\"")
            ));
            assert!(second_shadowed(
                &allow(field, "\"10.0.0.0/8\", \"2001:db8::/32\""),
                &deny(field, "\"2001:db8:1::7\", \"10.9.9.9\"")
            ));
            // An IPv4-only list never matches IPv6: it does not cover "anywhere".
            assert!(!second_shadowed(
                &allow(field, "\"0.0.0.0/0\""),
                "action = \"deny\""
            ));
            assert!(second_shadowed(
                &allow(field, "\"0.0.0.0/0\", \"::/0\""),
                "action = \"deny\""
            ));
            assert!(!second_shadowed(
                &allow(field, "\"10.0.0.0/8\""),
                &deny(field, "\"10.0.0.0/8\", \"11.0.0.1\"")
            ));
            assert!(second_shadowed(
                "action = \"allow\"",
                &deny(field, "\"10.0.0.0/8\"")
            ));
        }
    }

    #[test]
    fn ports_are_covered_by_the_union_of_ranges() {
        let tcp = |ports: &str| format!("action = \"allow\"\nproto = \"tcp\"\nports = [{ports}]");
        assert!(second_shadowed(
            &tcp("\"1-100\", \"101-200\""),
            &tcp("\"50-150\"")
        ));
        assert!(second_shadowed(&tcp("22, 80, 443"), &tcp("443, 22")));
        assert!(!second_shadowed(
            &tcp("\"1-100\", \"102-200\""),
            &tcp("\"50-150\"")
        ));
        assert!(!second_shadowed(&tcp("22"), &tcp("22, 23")));
        assert!(second_shadowed(&tcp("\"1-65535\""), &tcp("8080")));
        // Ports match only packets that carry one: not ICMP, not non-first fragments.
        assert!(!second_shadowed(
            &tcp("\"1-65535\""),
            "action = \"deny\"\nproto = \"tcp\""
        ));
        assert!(second_shadowed(
            "action = \"deny\"\nproto = \"tcp\"",
            &tcp("22")
        ));
    }

    #[test]
    fn protocols_with_ports_mean_tcp_and_udp() {
        let rule =
            |proto: &str, ports: &str| format!("action = \"allow\"\nproto = \"{proto}\"{ports}");
        assert!(second_shadowed(
            &rule("any", "\nports = [53]"),
            &rule("udp", "\nports = [53]")
        ));
        assert!(!second_shadowed(
            &rule("udp", "\nports = [53]"),
            &rule("any", "\nports = [53]")
        ));
        assert!(second_shadowed(&rule("any", ""), &rule("icmpv6", "")));
        assert!(!second_shadowed(
            &rule("any", "\nports = [53]"),
            &rule("icmp", "")
        ));
        assert!(!second_shadowed(&rule("tcp", ""), &rule("udp", "")));
        assert!(!second_shadowed(&rule("tcp", ""), &rule("any", "")));
    }

    #[test]
    fn interfaces_limits_and_logging() {
        let on = |names: &str| format!("action = \"deny\"\niface = [{names}]");
        assert!(second_shadowed(&on("\"eth0\", \"eth1\""), &on("\"eth1\"")));
        assert!(!second_shadowed(&on("\"eth0\""), &on("\"eth0\", \"eth1\"")));
        assert!(!second_shadowed(&on("\"eth0\""), "action = \"deny\""));
        assert!(second_shadowed("action = \"deny\"", &on("\"eth0\"")));
        // Over its limit a rule drops: packets never go on to the next rule.
        assert!(second_shadowed(
            "action = \"allow\"\nproto = \"tcp\"\nports = [22]\nlimit = \"6/m\"",
            "action = \"deny\"\nproto = \"tcp\"\nports = [22]"
        ));
        assert!(second_shadowed(
            "action = \"deny\"\nlog = false",
            "action = \"allow\"\nlog = true"
        ));
    }

    #[test]
    fn the_first_covering_rule_is_named_once() {
        let found = shadowed(&[
            "action = \"allow\"\nproto = \"tcp\"",
            "action = \"allow\"\nproto = \"tcp\"\nports = [22]",
            "action = \"deny\"\nproto = \"tcp\"\nports = [22]",
        ]);
        assert_eq!(found.len(), 2, "{found:?}");
        assert!(
            found[0].ends_with(":4:1: rule 2 can never match: rule 1 matches everything it would")
        );
        assert!(
            found[1].ends_with(":8:1: rule 3 can never match: rule 1 matches everything it would")
        );
    }

    #[test]
    fn the_example_rule_files_have_no_shadowed_rules() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../rules");
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|ext| ext == "toml") {
                let set = crate::rules::config::load_rules(&path).unwrap();
                assert_eq!(shadowed_rules(&set), [], "{}", path.display());
            }
        }
    }

    #[test]
    fn warns_when_default_deny_shuts_out_ssh() {
        assert!(warns("[defaults]\npolicy = \"deny\"\n"));
        assert!(warns(
            "[defaults]\npolicy = \"deny\"\n[[rules]]\naction = \"allow\"\nproto = \"tcp\"\nports = [2222]\n"
        ));
        // SSH allowed from one network is enough.
        assert!(!warns(
            "[defaults]\npolicy = \"deny\"\n[[rules]]\naction = \"allow\"\nproto = \"tcp\"\nfrom = [\"10.0.0.0/8\"]\nports = [22]\n"
        ));
        // A deny of everything before the allow shadows it.
        assert!(warns(
            "[defaults]\npolicy = \"deny\"\n[[rules]]\naction = \"deny\"\n[[rules]]\naction = \"allow\"\nports = [22]\n"
        ));
        assert!(!warns("[defaults]\npolicy = \"allow\"\n"));
    }
}
