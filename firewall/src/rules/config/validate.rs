//! The sections of a rule file other than `[sets]`, each checked on its own: `[defaults]`,
//! `[state]`, `[[rules]]`, `[limits]` (the address entries the rules take) and `[log]`.
use std::collections::{HashMap, HashSet};
use std::ops::{Range, RangeInclusive};

use firewall_common::MAX_RULES;
use ipnet::IpNet;
use serde::Deserialize;
use toml::Spanned;

use super::services::Services;
use super::values::{
    action, address_list, comment, icmp_type_list, interface_list, port_list, proto, rate_limit,
};
use super::{Located, DEFAULT_MAX_ENTRIES};
use crate::rules::model::{Action, Direction, LogRate, Proto, Rule, RuleSet, Timeouts};

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDefaults {
    policy: Option<Spanned<String>>,
    established: Option<bool>,
    essentials: Option<bool>,
    dhcp: Option<bool>,
    /// For outbound packets no out rule matches: "allow" (default) or "deny".
    outbound: Option<Spanned<String>>,
    /// "enforce" (default) or "audit".
    mode: Option<Spanned<String>>,
}

/// `[defaults]`: the default policy, the checks before the rules and the mode.
pub(super) fn defaults(set: &mut RuleSet, defaults: Option<RawDefaults>) -> Result<(), Located> {
    let defaults = defaults.unwrap_or_default();
    if let Some(policy) = &defaults.policy {
        set.default_policy = action(policy, "policy")?;
    }
    if let Some(outbound) = &defaults.outbound {
        set.outbound_policy = action(outbound, "outbound")?;
    }
    for (value, slot) in [
        (defaults.established, &mut set.established),
        (defaults.essentials, &mut set.essentials),
        (defaults.dhcp, &mut set.dhcp),
    ] {
        *slot = value.unwrap_or(*slot);
    }
    if let Some(mode) = &defaults.mode {
        set.audit = match mode.get_ref().as_str() {
            "enforce" => false,
            "audit" => true,
            _ => return Err((mode.span(), "mode must be \"enforce\" or \"audit\"".into())),
        };
    }
    Ok(())
}

/// The kernel's rate limit on log lines.
#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLog {
    lines_per_second: Option<Spanned<i64>>,
    burst: Option<Spanned<i64>>,
}

/// `[log]`: the kernel's rate limit on log lines.
pub(super) fn log_rate(log_rate: &mut LogRate, log: Option<RawLog>) -> Result<(), Located> {
    let log = log.unwrap_or_default();
    let fields = [
        (log.lines_per_second, &mut log_rate.lines_per_second),
        (log.burst, &mut log_rate.burst),
    ];
    numbers(fields, 0..=10_000, "must be 0 to 10000 (0: no log lines)")
}

/// Idle timeouts in seconds.
#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawState {
    tcp_timeout: Option<Spanned<i64>>,
    tcp_closing_timeout: Option<Spanned<i64>>,
    udp_timeout: Option<Spanned<i64>>,
    icmp_timeout: Option<Spanned<i64>>,
}

/// Longest idle timeout accepted: 30 days.
const MAX_TIMEOUT_SECS: i64 = 30 * 24 * 3600;

/// `[state]`: idle timeouts of tracked flows.
pub(super) fn timeouts(timeouts: &mut Timeouts, state: Option<RawState>) -> Result<(), Located> {
    let state = state.unwrap_or_default();
    let fields = [
        (state.tcp_timeout, &mut timeouts.tcp),
        (state.tcp_closing_timeout, &mut timeouts.tcp_closing),
        (state.udp_timeout, &mut timeouts.udp),
        (state.icmp_timeout, &mut timeouts.icmp),
    ];
    let message = format!("timeout must be 1 to {MAX_TIMEOUT_SECS} seconds");
    numbers(fields, 1..=MAX_TIMEOUT_SECS, &message)
}

/// Stores each number the file gives in its slot if it lies in `range`; else the first one
/// outside is reported with `message`.
fn numbers<T: TryFrom<i64>, const N: usize>(
    fields: [(Option<Spanned<i64>>, &mut T); N],
    range: RangeInclusive<i64>,
    message: &str,
) -> Result<(), Located> {
    for (value, slot) in fields {
        let Some(value) = value else {
            continue;
        };
        match T::try_from(*value.get_ref()) {
            Ok(number) if range.contains(value.get_ref()) => *slot = number,
            _ => return Err((value.span(), message.to_string())),
        }
    }
    Ok(())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLimits {
    max_entries: Option<Spanned<i64>>,
}

/// `[limits]`: how many address entries the rules may take, and that `rules` (read from
/// `spans` of the file) fit.
pub(super) fn limits(
    limits: Option<RawLimits>,
    rules: &[Rule],
    spans: &[Range<usize>],
) -> Result<(), Located> {
    let mut max_entries = DEFAULT_MAX_ENTRIES;
    let field = [(
        limits.and_then(|limits| limits.max_entries),
        &mut max_entries,
    )];
    let message = format!("max_entries must be 1 to {DEFAULT_MAX_ENTRIES}");
    numbers(field, 1..=DEFAULT_MAX_ENTRIES, &message)?;
    check_capacity(rules, spans, max_entries as usize)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRule {
    name: Option<Spanned<String>>,
    action: Option<Spanned<String>>,
    /// "in" (default) or "out".
    direction: Option<Spanned<String>>,
    proto: Option<Spanned<String>>,
    from: Option<Spanned<Vec<Spanned<String>>>>,
    to: Option<Spanned<Vec<Spanned<String>>>>,
    ports: Option<Spanned<Vec<Spanned<toml::Value>>>>,
    /// ICMP or ICMPv6 type names (as nftables spells them) and numbers.
    icmp_types: Option<Spanned<Vec<Spanned<toml::Value>>>>,
    iface: Option<Spanned<Vec<Spanned<String>>>>,
    /// `"COUNT/s"`, `"COUNT/m"` or `"COUNT/h"`, per source address.
    limit: Option<Spanned<String>>,
    burst: Option<Spanned<i64>>,
    log: Option<bool>,
    comment: Option<Spanned<String>>,
}

/// `[[rules]]`, in order, using the resolved `sets` and port names from `services`; with the
/// span of each in the file.
pub(super) fn rules(
    raw_rules: Vec<Spanned<RawRule>>,
    sets: &HashMap<String, Vec<IpNet>>,
    services: &Services,
) -> Result<(Vec<Rule>, Vec<Range<usize>>), Located> {
    if raw_rules.len() > MAX_RULES {
        let span = raw_rules[MAX_RULES].span();
        return Err((
            span,
            format!("too many rules: at most {MAX_RULES} are supported"),
        ));
    }
    let mut names: HashMap<String, usize> = HashMap::new();
    let mut rules = Vec::with_capacity(raw_rules.len());
    let mut rule_spans = Vec::with_capacity(raw_rules.len());
    for (index, raw_rule) in raw_rules.into_iter().enumerate() {
        rule_spans.push(raw_rule.span());
        rules.push(rule(index, raw_rule, &mut names, sets, services)?);
    }
    Ok((rules, rule_spans))
}

/// Rule `index` (0-based); `names` holds the names of the rules before it.
fn rule(
    index: usize,
    raw_rule: Spanned<RawRule>,
    names: &mut HashMap<String, usize>,
    sets: &HashMap<String, Vec<IpNet>>,
    services: &Services,
) -> Result<Rule, Located> {
    let span = raw_rule.span();
    let raw_rule = raw_rule.into_inner();
    let name = match raw_rule.name {
        Some(name) => {
            if name.get_ref().is_empty() {
                return Err((name.span(), "empty rule name".into()));
            }
            if let Some(first) = names.insert(name.get_ref().clone(), index) {
                return Err((
                    name.span(),
                    format!(
                        "duplicate rule name {:?} (also rule {})",
                        name.get_ref(),
                        first + 1
                    ),
                ));
            }
            name.into_inner()
        }
        None => format!("rule {}", index + 1),
    };
    let action = match &raw_rule.action {
        Some(value) => action(value, "action")?,
        None => {
            return Err((
                span,
                format!("rule {:?} has no `action` (\"allow\" or \"deny\")", name),
            ))
        }
    };
    let direction = match &raw_rule.direction {
        None => Direction::In,
        Some(value) => Direction::from_name(value.get_ref()).ok_or_else(|| {
            (
                value.span(),
                format!(
                    "invalid direction {:?}: expected \"in\" or \"out\"",
                    value.get_ref()
                ),
            )
        })?,
    };
    let proto = match &raw_rule.proto {
        None => Proto::Any,
        Some(value) => proto(value)?,
    };
    let ports = match raw_rule.ports {
        None => None,
        Some(ports) => {
            if matches!(proto, Proto::Icmp | Proto::Icmpv6) {
                return Err((
                    ports.span(),
                    "`ports` only apply to tcp and udp, not to icmp/icmpv6".into(),
                ));
            }
            Some(port_list(ports, proto, services)?)
        }
    };
    let icmp_types = raw_rule
        .icmp_types
        .map(|list| icmp_type_list(list, proto))
        .transpose()?;
    let limit = match raw_rule.limit {
        None => {
            if let Some(burst) = &raw_rule.burst {
                return Err((burst.span(), "`burst` needs a `limit`".into()));
            }
            None
        }
        Some(limit) => {
            if direction == Direction::Out {
                return Err((
                    limit.span(),
                    "`limit` applies to inbound rules (per source address)".into(),
                ));
            }
            if action != Action::Allow {
                return Err((
                    limit.span(),
                    "`limit` applies to allow rules (deny rules drop anyway)".into(),
                ));
            }
            Some(rate_limit(&limit, raw_rule.burst.as_ref())?)
        }
    };
    Ok(Rule {
        comment: raw_rule.comment.as_ref().map(comment).transpose()?,
        log: raw_rule.log.unwrap_or(action == Action::Deny),
        limit,
        name,
        action,
        direction,
        proto,
        from: raw_rule
            .from
            .map(|list| address_list(list, sets))
            .transpose()?,
        to: raw_rule
            .to
            .map(|list| address_list(list, sets))
            .transpose()?,
        ports,
        icmp_types,
        iface: raw_rule.iface.map(interface_list).transpose()?,
    })
}

/// Per rule (0-based) and field (`to` when true), the dynamic sets it names, in file order.
pub(super) fn dynamic_names(
    raw_rules: &[Spanned<RawRule>],
    dynamic: &[String],
) -> Vec<(usize, bool, Vec<String>)> {
    let mut uses = Vec::new();
    for (index, raw_rule) in raw_rules.iter().enumerate() {
        let raw_rule = raw_rule.get_ref();
        for (to, list) in [(false, &raw_rule.from), (true, &raw_rule.to)] {
            let names: Vec<String> = list
                .iter()
                .flat_map(|list| list.get_ref())
                .filter_map(|entry| entry.get_ref().strip_prefix('@'))
                .filter(|name| dynamic.iter().any(|set| set == name))
                .map(str::to_string)
                .collect();
            if !names.is_empty() {
                uses.push((index, to, names));
            }
        }
    }
    uses
}

/// The distinct networks of all `from` lists, and of all `to` lists, must each fit the
/// limit; the first rule that goes over it is reported.
fn check_capacity(
    rules: &[Rule],
    spans: &[Range<usize>],
    max_entries: usize,
) -> Result<(), Located> {
    let mut sources: HashSet<IpNet> = HashSet::new();
    let mut destinations: HashSet<IpNet> = HashSet::new();
    for (rule, span) in rules.iter().zip(spans) {
        sources.extend(rule.from.iter().flatten());
        destinations.extend(rule.to.iter().flatten());
        let entries = sources.len().max(destinations.len());
        if entries > max_entries {
            return Err((
                span.clone(),
                format!(
                    "rule {:?} takes the rules past {max_entries} address entries \
                     (raise [limits] max_entries, at most {DEFAULT_MAX_ENTRIES})",
                    rule.name
                ),
            ));
        }
    }
    Ok(())
}
