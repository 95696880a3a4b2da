//! Compiles a [`RuleSet`] into the contents of the kernel's maps (see `firewall_common`).
//!
//! Each packet field gets a table from field value to the bit set of rules that field value
//! satisfies; the kernel ANDs the four bit sets and takes the lowest rule. So each table entry
//! must hold exactly the rules whose condition on that field holds for every value the entry
//! covers:
//! - address tries: one entry per prefix named by any rule, plus `/0`. The trie returns the
//!   longest entry containing the address, and every prefix containing the address is an
//!   ancestor of (or equal to) that entry, so an entry's bits are the rules naming the entry or
//!   one of its ancestors, plus the rules without that field.
//!   In the kernel, hosts and (IPv4) prefixes cut into a few fixed lengths sit in a hash map
//!   looked up before the trie; see [`AddressTable`] and [`layout`]. Entries hold the id of
//!   their bit set, an address class (see [`crate::rules::classes`]).
//! - protocols: a rule with ports can only match TCP and UDP; a rule with ICMP types only
//!   ICMP in IPv4 or ICMPv6 in IPv6 (its own protocol and family).
//! - ports: the kernel looks up one value per packet: a TCP/UDP packet's destination port, an
//!   ICMP message's type (ICMP in IPv4, ICMPv6 in IPv6), or none. Values are cut into classes
//!   at every boundary of the rules' port ranges and ICMP types alike; class 0 is "the packet
//!   has neither" and holds the rules with neither. A port and a type of the same value share
//!   a class, so a TCP rule's port 8 is in the class of an ICMP echo request: the protocol
//!   set, which holds port rules only for TCP and UDP and type rules only for ICMP, is what
//!   keeps them apart.
use std::cmp::Reverse;
use std::collections::HashMap;
use std::hash::Hash;
use std::net::{Ipv4Addr, Ipv6Addr};

use anyhow::{bail, Result};
use firewall_common::proto::{IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP};
use firewall_common::{
    proto_slot, RateLimit, RuleBits, RuleName, ACTION_LIMITED, ACTION_LOG, CHECK_AUDIT, CHECK_DHCP,
    CHECK_ESSENTIALS, CHECK_ESTABLISHED, CHECK_IFACES, CHECK_OUTBOUND, MAX_EXACT_V4, MAX_RULES,
    PROTO_SLOTS, RULE_NAME_BYTES, V4_LEVELS, V6_LEVELS,
};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use crate::rules::classes::{Interner, Renumber};
use crate::rules::model::{Direction, Limit, Rule, RuleSet, Timeouts};
use crate::rules::ports::port_tables;

/// Port values, 0..=65535 ([`firewall_common::PORTS`] as an index bound).
pub const PORTS: usize = firewall_common::PORTS as usize;
/// IP protocol numbers ([`firewall_common::PROTOS`] as an index bound).
pub const PROTOS: usize = firewall_common::PROTOS as usize;

/// Everything one generation of the maps holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Compiled {
    pub default_action: u32,
    /// For outbound packets no out rule matches (with `CHECK_OUTBOUND`).
    pub outbound_action: u32,
    /// `CHECK_*` bits.
    pub checks: u32,
    pub timeouts: Timeouts,
    /// Per rule: `ACTION_ALLOW` / `ACTION_DENY`, with `ACTION_LOG` and `ACTION_LIMITED`.
    pub actions: Vec<u32>,
    /// Per rule: its per-source rate limit (zero: none).
    pub limits: Vec<RateLimit>,
    /// The kernel's log line budget: nanoseconds of credit per line, and at most saved up.
    pub log_line_ns: u64,
    pub log_burst_ns: u64,
    /// Per rule: its name, as `firewall stats` shows it.
    pub names: Vec<RuleName>,
    /// Indexed by [`proto_slot`] (direction, family and IP protocol number).
    pub proto_bits: Vec<RuleBits>,
    /// Indexed by destination port: the port's class.
    pub port_class: Vec<u32>,
    /// Indexed by port class; class 0 is "no port".
    pub port_bits: Vec<RuleBits>,
    /// The address tables' classes: class id -> rules.
    pub address_classes: Vec<RuleBits>,
    pub src_v4: AddressTable<Ipv4Net>,
    pub dst_v4: AddressTable<Ipv4Net>,
    pub src_v6: AddressTable<Ipv6Net>,
    pub dst_v6: AddressTable<Ipv6Net>,
    /// Rules that apply on packets arriving on an interface no rule names.
    pub other_ifaces: RuleBits,
    /// Per interface some rule names: the rules that apply on it. Empty: no rule names one.
    pub ifaces: Vec<(String, RuleBits)>,
}

/// One address field as the kernel holds it. A lookup tries the exact map at each level,
/// longest first, then the trie; an exact entry is the complete answer for every address it
/// covers, so the trie only holds what the exact levels cannot answer. Entries hold address
/// class ids (`V`: scratch ids while compiling).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AddressTable<N, V = u32> {
    /// Sorted; the first is always the zero-length prefix.
    pub trie: Vec<(N, V)>,
    /// Sorted; every prefix length is one of the family's exact levels.
    pub exact: Vec<(N, V)>,
}

impl<N, V: Copy> AddressTable<N, V> {
    /// The class of `/0`: the answer for an address no other entry covers.
    pub fn any(&self) -> V {
        self.trie[0].1
    }

    pub fn len(&self) -> usize {
        self.trie.len() + self.exact.len()
    }

    /// Never: `/0` is always there.
    pub fn is_empty(&self) -> bool {
        false
    }
}

/// Exact-map entries one generation may use (both directions; the map holds both generations).
/// Hosts always fit: at most `DEFAULT_MAX_ENTRIES` per direction.
pub const EXACT_BUDGET: usize = MAX_EXACT_V4 as usize / 2;

pub fn compile(set: &RuleSet) -> Result<Compiled> {
    compile_with_budget(set, EXACT_BUDGET)
}

/// [`compile`] with at most `budget` IPv4 exact-map entries: past it, prefixes stay in the
/// trie instead of being cut. For tests of that path.
pub fn compile_with_budget(set: &RuleSet, budget: usize) -> Result<Compiled> {
    if set.rules.len() > MAX_RULES {
        bail!(
            "{} rules; at most {MAX_RULES} are supported",
            set.rules.len()
        );
    }
    let (port_class, port_bits) = port_tables(&set.rules)?;
    let mut scratch = Interner::default();
    // Sources first: blocklists are mostly about them. Destination hosts are kept exact
    // whatever the sources used.
    let (dst_v4, dst_v6) = address_tables(&set.rules, |rule| rule.to.as_deref(), &mut scratch);
    let dst_hosts = dst_v4.iter().filter(|(net, _)| net.is_host()).count();
    let src_budget = budget.saturating_sub(dst_hosts);
    let (src_v4, src_v6) = address_tables(&set.rules, |rule| rule.from.as_deref(), &mut scratch);
    let src_v4 = layout(src_v4, src_budget);
    let dst_v4 = layout(dst_v4, budget.saturating_sub(src_v4.exact.len()));
    let (src_v6, dst_v6) = (layout(src_v6, usize::MAX), layout(dst_v6, usize::MAX));
    let mut renumber = Renumber::new(&scratch);
    let (src_v4, dst_v4) = (renumber.table(src_v4), renumber.table(dst_v4));
    let (src_v6, dst_v6) = (renumber.table(src_v6), renumber.table(dst_v6));
    let address_classes = renumber.classes()?;
    let (other_ifaces, ifaces) = interface_table(&set.rules);
    Ok(Compiled {
        default_action: set.default_policy.code(),
        outbound_action: set.outbound_policy.code(),
        checks: if set.established {
            CHECK_ESTABLISHED
        } else {
            0
        } | if set.essentials { CHECK_ESSENTIALS } else { 0 }
            | if set.dhcp { CHECK_DHCP } else { 0 }
            | if set.rules.iter().any(|rule| rule.iface.is_some()) {
                CHECK_IFACES
            } else {
                0
            }
            | if set.audit { CHECK_AUDIT } else { 0 }
            | if set.filters_outbound() {
                CHECK_OUTBOUND
            } else {
                0
            },
        timeouts: set.timeouts,
        actions: set
            .rules
            .iter()
            .map(|rule| {
                rule.action.code()
                    | if rule.log { ACTION_LOG } else { 0 }
                    | if rule.limit.is_some() {
                        ACTION_LIMITED
                    } else {
                        0
                    }
            })
            .collect(),
        limits: set
            .rules
            .iter()
            .map(|rule| rule.limit.map_or(RateLimit::default(), rate_limit))
            .collect(),
        log_line_ns: match set.log_rate.lines_per_second {
            0 => 0,
            rate => NANOS_PER_SEC / u64::from(rate),
        },
        log_burst_ns: match set.log_rate.lines_per_second {
            0 => 0,
            rate => NANOS_PER_SEC / u64::from(rate) * u64::from(set.log_rate.burst.max(1)),
        },
        names: set.rules.iter().map(|rule| rule_name(&rule.name)).collect(),
        proto_bits: proto_table(&set.rules),
        port_class,
        port_bits,
        address_classes,
        src_v4,
        dst_v4,
        src_v6,
        dst_v6,
        other_ifaces,
        ifaces,
    })
}

const NANOS_PER_SEC: u64 = 1_000_000_000;

/// A token every `per_secs / count` seconds, `burst` of them at most.
fn rate_limit(limit: Limit) -> RateLimit {
    let interval_ns = u64::from(limit.per_secs) * NANOS_PER_SEC / u64::from(limit.count);
    RateLimit {
        interval_ns,
        burst_ns: interval_ns * u64::from(limit.burst),
    }
}

/// `name` cut to fit (at a character boundary), NUL-padded.
pub fn rule_name(name: &str) -> RuleName {
    let mut end = name.len().min(RULE_NAME_BYTES);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    let mut bytes = [0; RULE_NAME_BYTES];
    bytes[..end].copy_from_slice(&name.as_bytes()[..end]);
    RuleName { bytes }
}

/// Per [`proto_slot`] (direction, family, protocol): the rules that can match. A rule is only
/// in its own direction's slots; a rule naming addresses of one family only (in `from` or
/// `to`) is left out of the other's.
fn proto_table(rules: &[Rule]) -> Vec<RuleBits> {
    let mut table = vec![RuleBits::EMPTY; PROTO_SLOTS as usize];
    for (outbound, v6) in [(false, false), (false, true), (true, false), (true, true)] {
        let has_family = |nets: &Option<Vec<IpNet>>| match nets {
            None => true,
            Some(nets) => nets.iter().any(|net| matches!(net, IpNet::V6(_)) == v6),
        };
        for proto in 0..=u8::MAX {
            let bits = &mut table[proto_slot(outbound, v6, proto) as usize];
            for (index, rule) in rules.iter().enumerate() {
                if (rule.direction == Direction::Out) != outbound {
                    continue;
                }
                let port_ok = rule.ports.is_none() || proto == IPPROTO_TCP || proto == IPPROTO_UDP;
                // ICMP fields count only in their own family (as the parser reads them).
                let own_icmp = (proto == IPPROTO_ICMP && !v6) || (proto == IPPROTO_ICMPV6 && v6);
                let types_ok = rule.icmp_types.is_none() || own_icmp;
                if rule.proto.matches(proto)
                    && port_ok
                    && types_ok
                    && has_family(&rule.from)
                    && has_family(&rule.to)
                {
                    bits.set(index);
                }
            }
        }
    }
    table
}

/// Rules without `iface` apply everywhere; a named interface adds the rules naming it.
fn interface_table(rules: &[Rule]) -> (RuleBits, Vec<(String, RuleBits)>) {
    let mut everywhere = RuleBits::EMPTY;
    let mut named: std::collections::BTreeMap<String, RuleBits> = Default::default();
    for (index, rule) in rules.iter().enumerate() {
        match &rule.iface {
            None => everywhere.set(index),
            Some(names) => {
                for name in names {
                    named
                        .entry(name.clone())
                        .or_insert(RuleBits::EMPTY)
                        .set(index);
                }
            }
        }
    }
    let ifaces = named
        .into_iter()
        .map(|(name, mut bits)| {
            bits.union_with(&everywhere);
            (name, bits)
        })
        .collect();
    (everywhere, ifaces)
}

/// IPv4 and IPv6 entries (each with its ancestors' rules, as a class id of `classes`) for the
/// address field `field` selects.
#[expect(
    clippy::type_complexity,
    reason = "the two families' entry lists, each read once by the caller"
)]
fn address_tables(
    rules: &[Rule],
    field: impl Fn(&Rule) -> Option<&[IpNet]>,
    classes: &mut Interner,
) -> (Vec<(Ipv4Net, u32)>, Vec<(Ipv6Net, u32)>) {
    let empty = classes.intern(RuleBits::EMPTY);
    let mut wildcard = empty;
    let mut named_v4: HashMap<Ipv4Net, u32> = HashMap::new();
    let mut named_v6: HashMap<Ipv6Net, u32> = HashMap::new();
    for (index, rule) in rules.iter().enumerate() {
        match field(rule) {
            None => wildcard = classes.with_rule(wildcard, index),
            Some(nets) => {
                for net in nets {
                    let class = match net {
                        IpNet::V4(net) => named_v4.entry(*net).or_insert(empty),
                        IpNet::V6(net) => named_v6.entry(*net).or_insert(empty),
                    };
                    *class = classes.with_rule(*class, index);
                }
            }
        }
    }
    let v4 = with_ancestors(&named_v4, wildcard, classes, |net, len| {
        Some(net.truncated(len))
    });
    let v6 = with_ancestors(&named_v6, wildcard, classes, |net, len| {
        Some(net.truncated(len))
    });
    (v4, v6)
}

/// Splits one field's entries (each with its ancestors' bits) into exact entries and trie.
///
/// A prefix is cut into entries of the next longer exact level (its *level*): a /22 into four
/// /24s. Prefixes are cut longest first until `budget` entries are used; from the first that
/// does not fit on, the rest stay in the trie. So every prefix left in the trie is no longer
/// than any prefix that was cut, and (as every IPv4 length but /0 has a level, and IPv6 cuts
/// only into hosts) none lies inside an exact entry: an exact entry answers for all its
/// addresses, with the bits of the most specific prefix containing it.
fn layout<N: Prefix + Copy + Eq + Hash + Ord>(
    entries: Vec<(N, u32)>,
    budget: usize,
) -> AddressTable<N> {
    let mut cuttable: Vec<(u8, usize)> = entries
        .iter()
        .enumerate()
        .filter_map(|(index, (net, _))| Some((N::level(net.length())?, index)))
        .collect();
    cuttable.sort_by_key(|&(_, index)| Reverse(entries[index].0.length()));
    let mut used = 0usize;
    let mut is_cut = vec![false; entries.len()];
    // Exact entry -> index of the entry whose bits it takes.
    let mut pieces: HashMap<N, usize> = HashMap::with_capacity(cuttable.len());
    for (level, index) in cuttable {
        let net = entries[index].0;
        let count = 1usize << (level - net.length());
        if used + count > budget {
            break;
        }
        used += count;
        is_cut[index] = true;
        if count == 1 {
            pieces.entry(net).or_insert(index);
        } else {
            for piece in net.cut(level) {
                // Longer prefixes came first: a piece keeps the most specific bits.
                pieces.entry(piece).or_insert(index);
            }
        }
    }
    let mut exact: Vec<(N, u32)> = pieces
        .into_iter()
        .map(|(piece, index)| (piece, entries[index].1))
        .collect();
    exact.sort_unstable_by_key(|(net, _)| *net);
    let trie: Vec<(N, u32)> = entries
        .into_iter()
        .zip(is_cut)
        .filter_map(|(entry, cut)| (!cut).then_some(entry))
        .collect();
    // `entries` came sorted, so the trie is too, `/0` first.
    AddressTable { trie, exact }
}

/// For every named prefix (and the zero-length prefix), the class of the union of the rules of
/// itself and all its named ancestors, plus `wildcard`'s.
fn with_ancestors<N>(
    named: &HashMap<N, u32>,
    wildcard: u32,
    classes: &mut Interner,
    ancestor: impl Fn(&N, u8) -> Option<N>,
) -> Vec<(N, u32)>
where
    N: Copy + Eq + std::hash::Hash + Ord + Prefix,
{
    let mut prefixes: Vec<N> = named.keys().copied().collect();
    prefixes.push(N::ZERO);
    prefixes.sort_unstable();
    prefixes.dedup();
    // Only lengths some rule names can hold an ancestor: a blocklist of hosts and /24s needs
    // two lookups per prefix, not 33.
    let mut lengths: Vec<u8> = named.keys().map(Prefix::length).collect();
    lengths.sort_unstable();
    lengths.dedup();
    prefixes
        .into_iter()
        .map(|prefix| {
            let mut class = wildcard;
            for &len in lengths.iter().take_while(|&&len| len <= prefix.length()) {
                if let Some(&named_class) = ancestor(&prefix, len).and_then(|a| named.get(&a)) {
                    class = classes.union(class, named_class);
                }
            }
            (prefix, class)
        })
        .collect()
}

/// What [`with_ancestors`] and [`layout`] need of a prefix type.
pub trait Prefix: Sized {
    const ZERO: Self;
    /// Bits of an address: a prefix this long is a host.
    const BITS: u8;
    /// Exact-map levels, longest first.
    const LEVELS: &'static [u8];
    /// Prefixes shorter than the shortest level are cut into it too (IPv4: /16s are few).
    const CUT_SHORTER: bool;
    fn length(&self) -> u8;
    /// The prefix of length `len` (not longer than this one) containing this one.
    fn truncated(&self, len: u8) -> Self;
    /// This prefix as prefixes of length `len`.
    fn cut(&self, len: u8) -> Vec<Self>;
    fn is_host(&self) -> bool {
        self.length() == Self::BITS
    }
    /// The level a prefix of `len` is cut into: the shortest level not shorter than it, if that
    /// takes at most 8 entries (or any number for the shortest level with `CUT_SHORTER`).
    fn level(len: u8) -> Option<u8> {
        let shortest = *Self::LEVELS.last()?;
        if len == 0 {
            return None;
        }
        if len < shortest {
            return Self::CUT_SHORTER.then_some(shortest);
        }
        let level = *Self::LEVELS.iter().rev().find(|&&level| level >= len)?;
        (level - len <= 3).then_some(level)
    }
}

/// [`Prefix`] for an `ipnet` network type: its address type, width, exact-match levels and
/// whether shorter prefixes are cut into the shortest level.
macro_rules! impl_prefix {
    ($net:ty, $addr:ty, $bits:expr, $levels:expr, $cut_shorter:expr) => {
        impl Prefix for $net {
            const BITS: u8 = $bits;
            const ZERO: Self = match <$net>::new(<$addr>::UNSPECIFIED, 0) {
                Ok(net) => net,
                Err(_) => panic!("valid prefix"),
            };
            const LEVELS: &'static [u8] = &$levels;
            const CUT_SHORTER: bool = $cut_shorter;
            fn length(&self) -> u8 {
                self.prefix_len()
            }
            fn truncated(&self, len: u8) -> Self {
                <$net>::new(self.addr(), len).expect("valid length").trunc()
            }
            fn cut(&self, len: u8) -> Vec<Self> {
                self.subnets(len).expect("valid length").collect()
            }
        }
    };
}

impl_prefix!(Ipv4Net, Ipv4Addr, 32, V4_LEVELS, true);
impl_prefix!(Ipv6Net, Ipv6Addr, 128, V6_LEVELS, false);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::model::{Action, Proto};

    fn rule(proto: Proto, from: Option<&[&str]>, ports: Option<Vec<RangeInclusive<u16>>>) -> Rule {
        Rule {
            name: "r".into(),
            direction: Direction::In,
            action: Action::Allow,
            proto,
            from: from.map(|nets| nets.iter().map(|n| n.parse().unwrap()).collect()),
            to: None,
            ports,
            icmp_types: None,
            comment: None,
            iface: None,
            limit: None,
            log: false,
        }
    }

    use std::ops::RangeInclusive;

    fn set(rules: Vec<Rule>) -> Compiled {
        compile(&RuleSet::new(Action::Deny, rules)).unwrap()
    }

    #[test]
    fn icmp_type_rules_share_port_classes_but_only_icmp_of_their_family() {
        let mut ping = rule(Proto::Icmp, None, None);
        ping.icmp_types = Some(vec![8]);
        let mut ping6 = rule(Proto::Icmpv6, None, None);
        ping6.icmp_types = Some(vec![128]);
        let compiled = set(vec![ping, ping6, rule(Proto::Tcp, None, Some(vec![8..=8]))]);
        let slot = |v6, proto| proto_slot(false, v6, proto) as usize;
        assert!(compiled.proto_bits[slot(false, 1)].contains(0));
        assert!(!compiled.proto_bits[slot(true, 1)].contains(0));
        assert!(compiled.proto_bits[slot(true, 58)].contains(1));
        assert!(!compiled.proto_bits[slot(false, 58)].contains(1));
        assert!(!compiled.proto_bits[slot(false, 1)].contains(2));
        // Type 8 and port 8 share a class; 128 has its own; class 0 holds none of the three.
        let class_8 = compiled.port_class[8] as usize;
        assert!(compiled.port_bits[class_8].contains(0) && compiled.port_bits[class_8].contains(2));
        assert!(compiled.port_bits[compiled.port_class[128] as usize].contains(1));
        assert_eq!(compiled.port_bits[0], RuleBits::EMPTY);
    }

    #[test]
    fn rules_with_ports_only_match_tcp_and_udp() {
        let compiled = set(vec![
            rule(Proto::Any, None, Some(vec![22..=22])),
            rule(Proto::Any, None, None),
        ]);
        assert!(compiled.proto_bits[6].contains(0) && compiled.proto_bits[17].contains(0));
        assert!(!compiled.proto_bits[1].contains(0) && !compiled.proto_bits[58].contains(0));
        assert!((0..PROTOS).all(|p| compiled.proto_bits[p].contains(1)));
    }

    #[test]
    fn port_classes_split_at_range_boundaries() {
        let compiled = set(vec![
            rule(Proto::Tcp, None, Some(vec![8000..=8100, 22..=22])),
            rule(Proto::Tcp, None, Some(vec![8050..=9000])),
            rule(Proto::Tcp, None, None),
        ]);
        let bits = |port: usize| compiled.port_bits[compiled.port_class[port] as usize];
        let members = |port: usize| {
            (0..3)
                .filter(|&r| bits(port).contains(r))
                .collect::<Vec<_>>()
        };
        assert_eq!(members(21), vec![2]);
        assert_eq!(members(22), vec![0, 2]);
        assert_eq!(members(23), vec![2]);
        assert_eq!(members(8000), vec![0, 2]);
        assert_eq!(members(8050), vec![0, 1, 2]);
        assert_eq!(members(8100), vec![0, 1, 2]);
        assert_eq!(members(8101), vec![1, 2]);
        assert_eq!(members(9000), vec![1, 2]);
        assert_eq!(members(9001), vec![2]);
        assert_eq!(members(65535), vec![2]);
        // Class 0 ("no port") holds only the rules without ports.
        assert_eq!(compiled.port_bits[0].words[0], 0b100);
        // Ports 21, 23 and 9001 share one class with "no port".
        assert_eq!(compiled.port_class[21], 0);
        assert_eq!(compiled.port_class[9001], 0);
    }

    /// Each prefix in the trie of `table`, as text, with the first word of its rule bits.
    fn trie_words<N: ToString>(
        compiled: &Compiled,
        table: &AddressTable<N>,
    ) -> HashMap<String, u64> {
        let words = table.trie.iter().map(|(net, class)| {
            let bits = compiled.address_classes[*class as usize];
            (net.to_string(), bits.words[0])
        });
        words.collect()
    }

    #[test]
    fn prefixes_inherit_the_rules_of_their_ancestors() {
        // No room in the exact map: every prefix stays in the trie as itself.
        let set = |rules| compile_with_budget(&RuleSet::new(Action::Deny, rules), 0).unwrap();
        let compiled = set(vec![
            rule(Proto::Any, Some(&["10.0.0.0/8"]), None),
            rule(Proto::Any, Some(&["10.1.0.0/16", "2001:db8::/32"]), None),
            rule(Proto::Any, None, None),
            rule(Proto::Any, Some(&["2001:db8::/32"]), None),
        ]);
        let v4 = trie_words(&compiled, &compiled.src_v4);
        assert_eq!(v4["0.0.0.0/0"], 0b0100);
        assert_eq!(v4["10.0.0.0/8"], 0b0101);
        assert_eq!(v4["10.1.0.0/16"], 0b0111);
        let v6 = trie_words(&compiled, &compiled.src_v6);
        assert_eq!(v6["::/0"], 0b0100);
        assert_eq!(v6["2001:db8::/32"], 0b1110);
        // Destination: no rule names one, so only `/0` with every rule.
        assert_eq!(compiled.dst_v4.len(), 1);
        let any = compiled.dst_v4.any() as usize;
        assert_eq!(compiled.address_classes[any].words[0], 0b1111);
        // Equal rule sets share a class whatever the field or family.
        assert_eq!(compiled.dst_v4.any(), compiled.dst_v6.any());
        assert_eq!(compiled.src_v4.any(), compiled.src_v6.any());
    }

    #[test]
    fn a_blocklist_takes_a_handful_of_classes() {
        let hosts: Vec<String> = (0..5000u32)
            .map(|i| format!("{}/32", Ipv4Addr::from(0x0a00_0000 + 3 * i)))
            .collect();
        let mut nets: Vec<&str> = hosts.iter().map(String::as_str).collect();
        nets.extend(["192.0.2.0/24", "198.51.100.0/22", "2001:db8::/32"]);
        let compiled = set(vec![
            rule(Proto::Any, Some(&nets), None),
            rule(Proto::Tcp, Some(&["10.0.0.0/8"]), Some(vec![22..=22])),
            rule(Proto::Any, None, None),
        ]);
        assert!(compiled.src_v4.exact.len() > 5000);
        // Listed hosts (all three rules: they lie in 10/8), the other listed networks (0, 2),
        // the rest of 10/8 (1, 2), anywhere else (2); every destination (all three) shares
        // the listed hosts' class.
        let classes: Vec<u64> = compiled
            .address_classes
            .iter()
            .map(|b| b.words[0])
            .collect();
        assert_eq!(classes.len(), 4, "{classes:?}");
        for bits in [0b111, 0b101, 0b110, 0b100] {
            assert!(classes.contains(&bits), "{bits:b} in {classes:?}");
        }
        // The same rule set compiles to the same ids: a reload rewrites nothing.
        let again = set(vec![
            rule(Proto::Any, Some(&nets), None),
            rule(Proto::Tcp, Some(&["10.0.0.0/8"]), Some(vec![22..=22])),
            rule(Proto::Any, None, None),
        ]);
        assert_eq!(again, compiled);
    }

    /// What the kernel does with an [`AddressTable`]: exact levels longest first, then the
    /// longest prefix in the trie.
    fn kernel_lookup(compiled: &Compiled, addr: Ipv4Addr) -> RuleBits {
        let table = &compiled.src_v4;
        let bits = |class: u32| compiled.address_classes[class as usize];
        for &level in &V4_LEVELS {
            let piece = Ipv4Net::new(addr, level).unwrap().trunc();
            if let Some((_, class)) = table.exact.iter().find(|(net, _)| *net == piece) {
                return bits(*class);
            }
        }
        let longest = table
            .trie
            .iter()
            .filter(|(net, _)| net.contains(&addr))
            .max_by_key(|(net, _)| net.prefix_len())
            .expect("/0 is in the trie");
        bits(longest.1)
    }

    #[test]
    fn blocks_and_trie_answer_like_one_trie() {
        use rand::{rngs::StdRng, Rng, SeedableRng};
        let mut rng = StdRng::seed_from_u64(7);
        for round in 0..200 {
            // Nested prefixes around a few bases, every length.
            let bases = [0x0a01_0200u32, 0x0a01_0a00, 0xc0a8_0000];
            let nets: Vec<String> = (0..rng.gen_range(1..40))
                .map(|_| {
                    let base = bases[rng.gen_range(0..bases.len())] ^ rng.gen_range(0..0x400);
                    let len = rng.gen_range(8..=32);
                    let net = Ipv4Net::new(Ipv4Addr::from(base), len).unwrap().trunc();
                    net.to_string()
                })
                .collect();
            let rules: Vec<Rule> = nets
                .chunks(3)
                .map(|chunk| {
                    let chunk: Vec<&str> = chunk.iter().map(String::as_str).collect();
                    rule(Proto::Any, Some(&chunk), None)
                })
                .collect();
            let set = RuleSet::new(Action::Deny, rules);
            let whole = compile_with_budget(&set, 0).unwrap();
            assert!(whole.src_v4.exact.is_empty());
            let budget = [usize::MAX, rng.gen_range(0..300)][round % 2];
            let cut = compile_with_budget(&set, budget).unwrap();
            for _ in 0..500 {
                let base = bases[rng.gen_range(0..bases.len())] ^ rng.gen_range(0..0x800);
                let addr = Ipv4Addr::from(base);
                assert_eq!(
                    kernel_lookup(&cut, addr),
                    kernel_lookup(&whole, addr),
                    "{addr} with {nets:?}, budget {budget}"
                );
            }
        }
    }

    #[test]
    fn prefixes_cut_into_exact_levels() {
        let nets = [
            "10.0.0.0/22",
            "10.0.1.0/24",
            "10.0.9.9/32",
            "10.0.0.0/15",
            "10.2.0.0/18",
            "10.3.0.0/26",
        ];
        let rules = vec![rule(Proto::Any, Some(&nets), None)];
        let names = |entries: &[(Ipv4Net, u32)]| {
            entries
                .iter()
                .map(|(net, _)| net.to_string())
                .collect::<Vec<_>>()
        };
        // /26 -> 4 x /28; /22 -> 4 x /24, one of them the named /24; /18 -> 4 x /20;
        // /15 -> 2 x /16.
        let table = set(rules.clone()).src_v4;
        assert_eq!(
            names(&table.exact),
            [
                "10.0.0.0/16",
                "10.0.0.0/24",
                "10.0.1.0/24",
                "10.0.2.0/24",
                "10.0.3.0/24",
                "10.0.9.9/32",
                "10.1.0.0/16",
                "10.2.0.0/20",
                "10.2.16.0/20",
                "10.2.32.0/20",
                "10.2.48.0/20",
                "10.3.0.0/28",
                "10.3.0.16/28",
                "10.3.0.32/28",
                "10.3.0.48/28",
            ]
        );
        assert_eq!(names(&table.trie), ["0.0.0.0/0"]);

        // Room for 5 entries: the host and the /26 are cut, the /24 (1 more) is not, so
        // neither is anything shorter.
        let tight = compile_with_budget(&RuleSet::new(Action::Deny, rules), 5).unwrap();
        assert_eq!(tight.src_v4.exact.len(), 5);
        assert_eq!(
            names(&tight.src_v4.trie),
            [
                "0.0.0.0/0",
                "10.0.0.0/15",
                "10.0.0.0/22",
                "10.0.1.0/24",
                "10.2.0.0/18"
            ]
        );
    }

    /// A rule naming addresses of one family only is in that family's protocol sets only,
    /// whether it names them in `from` or in `to`.
    #[test]
    fn protocol_sets_leave_out_rules_of_the_other_family() {
        let mut to_v6 = rule(Proto::Tcp, None, None);
        to_v6.to = Some(vec!["2001:db8::/32".parse().unwrap()]);
        let compiled = set(vec![
            rule(Proto::Tcp, Some(&["10.0.0.0/8"]), None),
            rule(Proto::Tcp, Some(&["fd00::/8"]), None),
            rule(Proto::Tcp, Some(&["10.0.0.0/8", "fd00::/8"]), None),
            rule(Proto::Tcp, None, None),
            to_v6,
        ]);
        let tcp = |v6| compiled.proto_bits[proto_slot(false, v6, IPPROTO_TCP) as usize];
        let members = |bits: RuleBits| (0..5).filter(|&r| bits.contains(r)).collect::<Vec<_>>();
        assert_eq!(members(tcp(false)), [0, 2, 3]);
        assert_eq!(members(tcp(true)), [1, 2, 3, 4]);
        assert_eq!(compiled.proto_bits.len(), PROTO_SLOTS as usize);
    }

    #[test]
    fn out_rules_are_only_in_the_outbound_protocol_slots() {
        let mut out = rule(Proto::Tcp, None, None);
        out.direction = Direction::Out;
        let compiled = set(vec![rule(Proto::Tcp, None, None), out]);
        for v6 in [false, true] {
            let inbound = compiled.proto_bits[proto_slot(false, v6, IPPROTO_TCP) as usize];
            let outbound = compiled.proto_bits[proto_slot(true, v6, IPPROTO_TCP) as usize];
            assert!(inbound.contains(0) && !inbound.contains(1));
            assert!(outbound.contains(1) && !outbound.contains(0));
        }
        assert_ne!(compiled.checks & CHECK_OUTBOUND, 0);
        let inbound_only = set(vec![rule(Proto::Tcp, None, None)]);
        assert_eq!(
            inbound_only.checks & CHECK_OUTBOUND,
            0,
            "off: egress as before"
        );
    }

    #[test]
    fn summaries_mark_the_words_in_use() {
        let mut rules = vec![rule(Proto::Tcp, None, None); 130];
        rules[129].proto = Proto::Udp;
        let compiled = set(rules);
        assert_eq!(compiled.proto_bits[6].summary, 0b111);
        assert_eq!(compiled.proto_bits[17].summary, 0b100);
        assert_eq!(compiled.proto_bits[1].summary, 0);
        let too_many = vec![rule(Proto::Any, None, None); MAX_RULES + 1];
        assert!(compile(&RuleSet::new(Action::Allow, too_many)).is_err());
    }
}
