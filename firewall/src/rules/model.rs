//! The validated rule set: what a rule file means, independent of TOML and of BPF maps.
//!
//! Semantics (the contract both the map compiler and the reference evaluator implement):
//! rules are tried top to bottom and the first match decides; no match gives the default
//! policy. A rule matches a packet when every field it has matches:
//! - `proto`: the IP protocol number (IPv6: the upper-layer header after extension headers);
//!   `Any` matches every protocol.
//! - `ports`: the destination port lies in one of the ranges; only TCP and UDP packets that
//!   carry a port (not non-first fragments) can match a rule with ports.
//! - `icmp_types` (rules of `proto` icmp or icmpv6 only): the packet is ICMP in IPv4 (icmp) or
//!   ICMPv6 in IPv6 (icmpv6), carries its ICMP header (not a non-first fragment), and its
//!   type is one of the list.
//! - `from` / `to`: the source / destination address lies in one of the networks of the
//!   packet's family; a list with no network of that family never matches.
//!
//! Rules have a direction: in rules judge packets arriving (XDP), out rules packets the host
//! sends (tc egress), with their own default (`outbound_policy`). Out rules keep the
//! packet's fields: `from` is the (local) source, `to` the (remote) destination, `ports`
//! the remote port. Both directions share the rule numbering (file order).
use std::ops::RangeInclusive;

use firewall_common::proto::{
    icmp_type_names, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP,
};
use firewall_common::{ACTION_ALLOW, ACTION_DENY, ACTION_MASK};
use ipnet::IpNet;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Allow,
    Deny,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    Any,
    Tcp,
    Udp,
    Icmp,
    Icmpv6,
}

/// Which packets a rule judges: arriving ones (`in`, the default) or the host's own outbound
/// ones (`out`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    #[default]
    In,
    Out,
}

impl Direction {
    /// As written in rule files.
    pub fn name(self) -> &'static str {
        match self {
            Direction::In => "in",
            Direction::Out => "out",
        }
    }

    /// The direction written `name` in a rule file.
    pub fn from_name(name: &str) -> Option<Direction> {
        [Direction::In, Direction::Out]
            .into_iter()
            .find(|direction| direction.name() == name)
    }
}

impl Action {
    const ALL: [Action; 2] = [Action::Allow, Action::Deny];

    /// As written in rule files.
    pub fn name(self) -> &'static str {
        match self {
            Action::Allow => "allow",
            Action::Deny => "deny",
        }
    }

    /// The action written `name` in a rule file.
    pub fn from_name(name: &str) -> Option<Action> {
        Self::ALL.into_iter().find(|action| action.name() == name)
    }

    /// The verdict bits of the action word the maps hold for it.
    pub fn code(self) -> u32 {
        match self {
            Action::Allow => ACTION_ALLOW,
            Action::Deny => ACTION_DENY,
        }
    }

    /// The action of an action word read from the maps (its flags aside).
    pub fn from_code(code: u32) -> Action {
        if code & ACTION_MASK == ACTION_ALLOW {
            Action::Allow
        } else {
            Action::Deny
        }
    }
}

impl Proto {
    const ALL: [Proto; 5] = [
        Proto::Any,
        Proto::Tcp,
        Proto::Udp,
        Proto::Icmp,
        Proto::Icmpv6,
    ];

    /// As written in rule files.
    pub fn name(self) -> &'static str {
        match self {
            Proto::Any => "any",
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
            Proto::Icmp => "icmp",
            Proto::Icmpv6 => "icmpv6",
        }
    }

    /// The protocol written `name` in a rule file.
    pub fn from_name(name: &str) -> Option<Proto> {
        Self::ALL.into_iter().find(|proto| proto.name() == name)
    }

    /// The IP protocol number; `None` for `Any`.
    pub fn number(self) -> Option<u8> {
        match self {
            Proto::Any => None,
            Proto::Tcp => Some(IPPROTO_TCP),
            Proto::Udp => Some(IPPROTO_UDP),
            Proto::Icmp => Some(IPPROTO_ICMP),
            Proto::Icmpv6 => Some(IPPROTO_ICMPV6),
        }
    }

    /// Whether this rule protocol matches IP protocol number `ip_proto`.
    pub fn matches(self, ip_proto: u8) -> bool {
        self.number().is_none_or(|number| number == ip_proto)
    }

    /// For ICMP and ICMPv6: whether its messages travel in IPv6 (its type numbers are
    /// ICMPv6's). `None` for other protocols.
    pub fn icmp_family_v6(self) -> Option<bool> {
        match self {
            Proto::Icmp => Some(false),
            Proto::Icmpv6 => Some(true),
            _ => None,
        }
    }
}

/// The name nftables gives ICMP type `kind` (ICMPv6 if `v6`), or its number.
pub fn icmp_type_text(v6: bool, kind: u8) -> String {
    icmp_type_names(v6)
        .iter()
        .find(|&&(_, number)| number == kind)
        .map_or_else(|| kind.to_string(), |(name, _)| name.to_string())
}

/// Units of durations and rates, in rule files (`limit = "6/m"`) and on the command line
/// (`--confirm 5m`), with their length in seconds.
pub const TIME_UNITS: [(&str, u32); 3] = [("s", 1), ("m", 60), ("h", 3600)];

/// Seconds in time unit `unit` (`s`, `m` or `h`).
pub fn unit_seconds(unit: &str) -> Option<u32> {
    TIME_UNITS
        .iter()
        .find(|(name, _)| *name == unit)
        .map(|&(_, seconds)| seconds)
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    /// Name from the file, or `rule N` (1-based position) when it has none.
    pub name: String,
    pub action: Action,
    /// Inbound (XDP) or outbound (tc egress) packets.
    pub direction: Direction,
    pub proto: Proto,
    /// `None`: any source. `Some`: one of these networks (host bits are zero).
    pub from: Option<Vec<IpNet>>,
    /// `None`: any destination.
    pub to: Option<Vec<IpNet>>,
    /// `None`: any port (and any protocol). `Some`: destination port in one of these ranges.
    pub ports: Option<Vec<RangeInclusive<u16>>>,
    /// `None`: any ICMP type (and any protocol). `Some` (only with `proto` icmp or icmpv6):
    /// ICMP messages of the rule's family with one of these types, sorted, no duplicates.
    pub icmp_types: Option<Vec<u8>>,
    /// `None`: every interface the daemon manages. `Some`: packets arriving on one of these.
    pub iface: Option<Vec<String>>,
    /// Allow rules only: per source address, matches beyond this rate are dropped.
    pub limit: Option<Limit>,
    /// Matches are logged (rate-limited): by default deny rules log, allow rules do not.
    pub log: bool,
    /// The operator's note on the rule (one line, at most [`MAX_COMMENT_CHARS`]); shown by
    /// `check` and `explain`, no part of matching.
    pub comment: Option<String>,
}

/// Longest `comment` accepted, in characters.
pub const MAX_COMMENT_CHARS: usize = 256;

impl Limit {
    /// The unit of the rate as written (`s`, `m`, `h`); `h` for a period not in the table.
    pub fn unit(&self) -> &'static str {
        let (last, _) = TIME_UNITS[TIME_UNITS.len() - 1];
        TIME_UNITS
            .iter()
            .find(|&&(_, seconds)| seconds == self.per_secs)
            .map_or(last, |&(name, _)| name)
    }
}

/// How [`Rule::text`] writes lists: `separator` between items, and at most `most_listed`
/// networks before their count stands in for them.
#[derive(Clone, Copy, Debug)]
pub struct ListStyle {
    pub separator: &'static str,
    pub most_listed: usize,
}

impl ListStyle {
    /// `firewall check`'s table: `22,80`, up to 3 networks.
    pub const TABLE: ListStyle = ListStyle {
        separator: ",",
        most_listed: 3,
    };
    /// `firewall explain`'s sentences: `22, 80`, up to 4 networks.
    pub const SENTENCE: ListStyle = ListStyle {
        separator: ", ",
        most_listed: 4,
    };
}

/// A rule's matching fields as text, as `firewall check` and `firewall explain` show them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleText {
    pub action: &'static str,
    pub proto: &'static str,
    pub from: String,
    pub to: String,
    pub ports: String,
    /// `echo-request,3`; `None` when the rule has no `icmp_types`.
    pub icmp_types: Option<String>,
}

impl Rule {
    /// The rule's action, protocol, networks and ports as written, lists in `style`.
    pub fn text(&self, style: ListStyle) -> RuleText {
        let nets = |nets: &Option<Vec<IpNet>>| match nets {
            None => "any".to_string(),
            Some(nets) if nets.len() > style.most_listed => format!("{} networks", nets.len()),
            Some(nets) => nets
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(style.separator),
        };
        RuleText {
            action: self.action.name(),
            proto: self.proto.name(),
            from: nets(&self.from),
            to: nets(&self.to),
            ports: self.ports_text(style.separator),
            icmp_types: self.icmp_types.as_ref().map(|types| {
                let v6 = self.proto.icmp_family_v6().unwrap_or(false);
                types
                    .iter()
                    .map(|&kind| icmp_type_text(v6, kind))
                    .collect::<Vec<_>>()
                    .join(style.separator)
            }),
        }
    }

    /// The rule's ports as written (`22`, `8000-8100`) joined by `separator`, or `any`.
    fn ports_text(&self, separator: &str) -> String {
        match &self.ports {
            None => "any".to_string(),
            Some(ranges) => ranges
                .iter()
                .map(|range| {
                    if range.start() == range.end() {
                        range.start().to_string()
                    } else {
                        format!("{}-{}", range.start(), range.end())
                    }
                })
                .collect::<Vec<_>>()
                .join(separator),
        }
    }
}

/// `limit = "COUNT/UNIT"` with `burst`: a token bucket per source address that refills
/// `count` tokens every `per_secs` seconds and holds at most `burst`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limit {
    pub count: u32,
    pub per_secs: u32,
    pub burst: u32,
}

/// `[log]`: the kernel's rate limit on log lines, per CPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LogRate {
    pub lines_per_second: u32,
    pub burst: u32,
}

impl Default for LogRate {
    fn default() -> Self {
        LogRate {
            lines_per_second: 5,
            burst: 10,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleSet {
    /// Verdict when no rule matches.
    pub default_policy: Action,
    /// Verdict on outbound packets no out rule matches (after the host's tracked flows,
    /// essential ICMPv6 and DHCP requests).
    pub outbound_policy: Action,
    /// Replies to the host's own flows (and ICMP errors about them) pass before the rules.
    pub established: bool,
    /// ICMPv6 that IPv6 needs (neighbour discovery, MLD, packet too big) passes before the
    /// rules.
    pub essentials: bool,
    /// DHCP replies pass before the rules on an interface where the host sent a DHCP request
    /// in the last minute.
    pub dhcp: bool,
    /// Audit mode: packets are classified, counted and logged as usual, but none is dropped.
    pub audit: bool,
    pub timeouts: Timeouts,
    pub log_rate: LogRate,
    pub rules: Vec<Rule>,
    /// Set files the rules were read from (the daemon watches them).
    pub set_files: Vec<std::path::PathBuf>,
    /// Sets declared `dynamic = true`: filled at run time (`firewall ban --set NAME`).
    pub dynamic_sets: Vec<String>,
    /// The rule fields that name dynamic sets; [`RuleSet::fill_dynamic`] writes their members
    /// in. Until then such a field holds only its other entries (an empty dynamic set
    /// matches nothing).
    pub dynamic_uses: Vec<DynamicUse>,
    /// Where each rule's `[[rules]]` header is in the rule file, for messages; empty for
    /// rule sets not read from a file.
    pub rule_positions: Vec<Position>,
}

/// A rule's `from` or `to` naming dynamic sets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DynamicUse {
    /// 0-based rule index.
    pub rule: usize,
    /// `to` when true, else `from`.
    pub to: bool,
    /// The dynamic sets the field names.
    pub sets: Vec<String>,
    /// Its entries besides the dynamic sets' members (addresses and static sets).
    pub fixed: Vec<IpNet>,
}

/// A 1-based line and column (in characters) in a file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Position {
    pub line: usize,
    pub col: usize,
}

impl RuleSet {
    /// A rule set with the defaults of an empty file around `rules`.
    pub fn new(default_policy: Action, rules: Vec<Rule>) -> RuleSet {
        RuleSet {
            default_policy,
            outbound_policy: Action::Allow,
            established: true,
            essentials: true,
            dhcp: true,
            audit: false,
            timeouts: Timeouts::default(),
            log_rate: LogRate::default(),
            rules,
            set_files: Vec::new(),
            dynamic_sets: Vec::new(),
            dynamic_uses: Vec::new(),
            rule_positions: Vec::new(),
        }
    }

    /// Whether outbound packets are judged at all: some rule is an out rule, or the outbound
    /// default is deny.
    pub fn filters_outbound(&self) -> bool {
        self.outbound_policy == Action::Deny
            || self
                .rules
                .iter()
                .any(|rule| rule.direction == Direction::Out)
    }

    /// Writes the current members of the dynamic sets (`members(NAME)`) into the rule fields
    /// that name them; idempotent (each field is rebuilt from its fixed entries).
    pub fn fill_dynamic(&mut self, members: impl Fn(&str) -> Vec<IpNet>) {
        for use_ in &self.dynamic_uses {
            let mut nets = use_.fixed.clone();
            for set in &use_.sets {
                nets.extend(members(set));
            }
            let rule = &mut self.rules[use_.rule];
            let field = if use_.to {
                &mut rule.to
            } else {
                &mut rule.from
            };
            *field = Some(IpNet::aggregate(&nets));
        }
    }
}

/// Idle timeouts of tracked flows (`[state]`), in seconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    pub tcp: u64,
    /// After the host sent a FIN or RST.
    pub tcp_closing: u64,
    pub udp: u64,
    pub icmp: u64,
}

impl Default for Timeouts {
    /// As Linux conntrack: established TCP 5 days, closing TCP 10 s; UDP 60 s, ICMP 30 s.
    fn default() -> Self {
        Timeouts {
            tcp: 5 * 24 * 3600,
            tcp_closing: 10,
            udp: 60,
            icmp: 30,
        }
    }
}
