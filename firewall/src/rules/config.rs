//! Rule files: TOML text -> validated [`RuleSet`], with every mistake reported as
//! `FILE:LINE:COL: message` at the value that is wrong.
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::net::IpAddr;
use std::ops::{Range, RangeInclusive};
use std::path::Path;

use firewall_common::MAX_RULES;
use ipnet::IpNet;
use serde::Deserialize;
use toml::Spanned;

use crate::rules::files::{self, Trust, MAX_RULE_FILE_BYTES, MAX_SET_FILE_BYTES};
use crate::rules::model::{unit_seconds, Action, Limit, LogRate, Proto, Rule, RuleSet, Timeouts};

/// A mistake in a rule file, with its 1-based position (column in characters).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: String,
    pub line: usize,
    pub col: usize,
    pub message: String,
}

impl fmt::Display for ConfigError {
    /// `FILE:LINE:COL: message`, or `FILE:LINE: message` for set files (column 0).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.col == 0 {
            write!(f, "{}:{}: {}", self.file, self.line, self.message)
        } else {
            let (file, line, col) = (&self.file, self.line, self.col);
            write!(f, "{file}:{line}:{col}: {}", self.message)
        }
    }
}

impl std::error::Error for ConfigError {}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    defaults: Option<RawDefaults>,
    state: Option<RawState>,
    log: Option<RawLog>,
    limits: Option<RawLimits>,
    sets: Option<BTreeMap<String, Spanned<RawSet>>>,
    rules: Option<Vec<Spanned<RawRule>>>,
}

/// The kernel's rate limit on log lines.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLog {
    lines_per_second: Option<Spanned<i64>>,
    burst: Option<Spanned<i64>>,
}

/// A named set of networks, used in `from`/`to` as `"@NAME"`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSet {
    cidrs: Option<Spanned<Vec<Spanned<String>>>>,
    /// Files of one address or CIDR per line; `#` comments and blank lines allowed.
    files: Option<Spanned<Vec<Spanned<String>>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    max_entries: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDefaults {
    policy: Option<Spanned<String>>,
    established: Option<bool>,
    essentials: Option<bool>,
    dhcp: Option<bool>,
    /// "enforce" (default) or "audit".
    mode: Option<Spanned<String>>,
}

/// Idle timeouts in seconds.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawState {
    tcp_timeout: Option<Spanned<i64>>,
    tcp_closing_timeout: Option<Spanned<i64>>,
    udp_timeout: Option<Spanned<i64>>,
    icmp_timeout: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    name: Option<Spanned<String>>,
    action: Option<Spanned<String>>,
    proto: Option<Spanned<String>>,
    from: Option<Spanned<Vec<Spanned<String>>>>,
    to: Option<Spanned<Vec<Spanned<String>>>>,
    ports: Option<Spanned<Vec<Spanned<toml::Value>>>>,
    iface: Option<Spanned<Vec<Spanned<String>>>>,
    /// `"COUNT/s"`, `"COUNT/m"` or `"COUNT/h"`, per source address.
    limit: Option<Spanned<String>>,
    burst: Option<Spanned<i64>>,
    log: Option<bool>,
}

/// Longest idle timeout accepted: 30 days.
const MAX_TIMEOUT_SECS: i64 = 30 * 24 * 3600;

/// A message and the byte range it is about.
type Located = (Range<usize>, String);

/// Parses and validates a rule file's text; `file` only names it in messages, and set files
/// are looked up relative to the current directory.
pub fn parse_rules(file: &str, text: &str) -> Result<RuleSet, ConfigError> {
    parse_rules_in(file, text, Path::new("."))
}

/// Like [`parse_rules`], with set files relative to `dir`, read whoever wrote them.
pub fn parse_rules_in(file: &str, text: &str, dir: &Path) -> Result<RuleSet, ConfigError> {
    parse_rules_with(file, text, dir, Trust::Anyone)
}

/// Like [`parse_rules_in`], with set files read only if `trust` accepts them.
pub fn parse_rules_with(
    file: &str,
    text: &str,
    dir: &Path,
    trust: Trust,
) -> Result<RuleSet, ConfigError> {
    let located = |(span, message): Located| {
        let (line, col) = line_col(text, span.start);
        ConfigError {
            file: file.to_string(),
            line,
            col,
            message,
        }
    };
    let mut raw: RawFile = toml::from_str(text).map_err(|error| {
        let span = error.span().unwrap_or(0..0);
        located((span, readable(error.message())))
    })?;
    let mut set_files = Vec::new();
    let sets = resolve_sets(
        raw.sets.take().unwrap_or_default(),
        dir,
        trust,
        &located,
        &mut set_files,
    )?;
    let mut set = validate(raw, &sets).map_err(located)?;
    set.set_files = set_files;
    Ok(set)
}

/// Default and hard cap of `[limits] max_entries`: distinct networks in all rules' `from`
/// and `to` after merging, which is what the kernel's address tries hold.
pub const DEFAULT_MAX_ENTRIES: i64 = 1_000_000;

/// Expands every set into its merged networks. Inline errors point into the rule file; set
/// file errors are `SETFILE:LINE: message`.
fn resolve_sets(
    raw: BTreeMap<String, Spanned<RawSet>>,
    dir: &Path,
    trust: Trust,
    located: &dyn Fn(Located) -> ConfigError,
    set_files: &mut Vec<std::path::PathBuf>,
) -> Result<HashMap<String, Vec<IpNet>>, ConfigError> {
    let mut sets = HashMap::new();
    for (name, set) in raw {
        let span = set.span();
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(located((
                span,
                format!("invalid set name {name:?}: use letters, digits, - and _"),
            )));
        }
        let set = set.into_inner();
        let mut nets = Vec::new();
        if let Some(cidrs) = set.cidrs {
            for entry in cidrs.get_ref() {
                nets.push(network(entry).map_err(located)?);
            }
        }
        if let Some(files) = set.files {
            for file in files.get_ref() {
                let path = dir.join(file.get_ref());
                let text = files::read(&path, MAX_SET_FILE_BYTES, trust).map_err(|error| {
                    located((
                        file.span(),
                        format!("cannot read set file {}: {error}", path.display()),
                    ))
                })?;
                nets.extend(parse_set_file(&path.display().to_string(), &text)?);
                set_files.push(path);
            }
        }
        if nets.is_empty() {
            return Err(located((span, format!("set {name:?} is empty"))));
        }
        sets.insert(name, IpNet::aggregate(&nets));
    }
    Ok(sets)
}

/// Most entries read from one set file (before merging; `[limits] max_entries` caps what is
/// left after).
pub const MAX_SET_FILE_ENTRIES: usize = 4 * DEFAULT_MAX_ENTRIES as usize;

/// One address or CIDR per line (FireHOL .netset and plain lists); `#` starts a comment.
pub fn parse_set_file(file: &str, text: &str) -> Result<Vec<IpNet>, ConfigError> {
    let mut nets = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let entry = line.split('#').next().unwrap_or("").trim();
        if entry.is_empty() {
            continue;
        }
        if nets.len() == MAX_SET_FILE_ENTRIES {
            return Err(ConfigError {
                file: file.to_string(),
                line: index + 1,
                col: 0,
                message: format!("more than {MAX_SET_FILE_ENTRIES} entries in one set file"),
            });
        }
        let net = network(&Spanned::new(0..0, entry.to_string())).map_err(|(_, message)| {
            ConfigError {
                file: file.to_string(),
                line: index + 1,
                col: 0,
                message,
            }
        })?;
        nets.push(net);
    }
    Ok(nets)
}

/// Reads and parses a rule file, whoever wrote it and its set files.
pub fn load_rules(path: &Path) -> anyhow::Result<RuleSet> {
    load_rules_trusting(path, Trust::Anyone).map(|(set, _)| set)
}

/// Reads and parses a rule file and its set files if `trust` accepts them; also returns the
/// rule file's text as read.
pub fn load_rules_trusting(path: &Path, trust: Trust) -> anyhow::Result<(RuleSet, String)> {
    let text = files::read(path, MAX_RULE_FILE_BYTES, trust)
        .map_err(|error| anyhow::anyhow!("{}: {error}", path.display()))?;
    let dir = path.parent().unwrap_or(Path::new("."));
    let set = parse_rules_with(&path.display().to_string(), &text, dir, trust)?;
    Ok((set, text))
}

fn validate(raw: RawFile, sets: &HashMap<String, Vec<IpNet>>) -> Result<RuleSet, Located> {
    let defaults = raw.defaults.unwrap_or(RawDefaults {
        policy: None,
        established: None,
        essentials: None,
        dhcp: None,
        mode: None,
    });
    let default_policy = match defaults.policy {
        None => Action::Allow,
        Some(policy) => action(&policy, "policy")?,
    };
    let mut timeouts = Timeouts::default();
    if let Some(state) = raw.state {
        for (value, slot) in [
            (state.tcp_timeout, &mut timeouts.tcp),
            (state.tcp_closing_timeout, &mut timeouts.tcp_closing),
            (state.udp_timeout, &mut timeouts.udp),
            (state.icmp_timeout, &mut timeouts.icmp),
        ] {
            if let Some(value) = value {
                if !(1..=MAX_TIMEOUT_SECS).contains(value.get_ref()) {
                    return Err((
                        value.span(),
                        format!("timeout must be 1 to {MAX_TIMEOUT_SECS} seconds"),
                    ));
                }
                *slot = *value.get_ref() as u64;
            }
        }
    }
    let raw_rules = raw.rules.unwrap_or_default();
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
        let span = raw_rule.span();
        rule_spans.push(span.clone());
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
                Some(port_list(ports)?)
            }
        };
        let limit = match raw_rule.limit {
            None => {
                if let Some(burst) = &raw_rule.burst {
                    return Err((burst.span(), "`burst` needs a `limit`".into()));
                }
                None
            }
            Some(limit) => {
                if action != Action::Allow {
                    return Err((
                        limit.span(),
                        "`limit` applies to allow rules (deny rules drop anyway)".into(),
                    ));
                }
                Some(rate_limit(&limit, raw_rule.burst.as_ref())?)
            }
        };
        rules.push(Rule {
            log: raw_rule.log.unwrap_or(action == Action::Deny),
            limit,
            name,
            action,
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
            iface: raw_rule.iface.map(interface_list).transpose()?,
        });
    }
    let max_entries = match raw.limits.and_then(|limits| limits.max_entries) {
        None => DEFAULT_MAX_ENTRIES,
        Some(value) if (1..=DEFAULT_MAX_ENTRIES).contains(value.get_ref()) => *value.get_ref(),
        Some(value) => {
            return Err((
                value.span(),
                format!("max_entries must be 1 to {DEFAULT_MAX_ENTRIES}"),
            ))
        }
    };
    check_capacity(&rules, &rule_spans, max_entries as usize)?;
    let audit = match &defaults.mode {
        None => false,
        Some(mode) => match mode.get_ref().as_str() {
            "enforce" => false,
            "audit" => true,
            _ => {
                return Err((
                    mode.span(),
                    "mode must be \"enforce\" or \"audit\"".to_string(),
                ))
            }
        },
    };
    let mut log_rate = LogRate::default();
    if let Some(log) = raw.log {
        for (value, field) in [
            (log.lines_per_second, &mut log_rate.lines_per_second),
            (log.burst, &mut log_rate.burst),
        ] {
            if let Some(value) = value {
                *field = match u32::try_from(*value.get_ref()) {
                    Ok(n) if n <= 10_000 => n,
                    _ => return Err((value.span(), "must be 0 to 10000 (0: no log lines)".into())),
                };
            }
        }
    }
    Ok(RuleSet {
        default_policy,
        established: defaults.established.unwrap_or(true),
        essentials: defaults.essentials.unwrap_or(true),
        dhcp: defaults.dhcp.unwrap_or(true),
        audit,
        log_rate,
        timeouts,
        rules,
        set_files: Vec::new(),
    })
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

/// Interface names (`iface = ["eth0"]`, ufw's `in on`).
fn interface_list(list: Spanned<Vec<Spanned<String>>>) -> Result<Vec<String>, Located> {
    if list.get_ref().is_empty() {
        return Err((
            list.span(),
            "empty interface list: omit the key to match every interface".into(),
        ));
    }
    let mut names = Vec::new();
    for name in list.get_ref() {
        let valid = !name.get_ref().is_empty()
            && name.get_ref().len() < 16
            && !name
                .get_ref()
                .contains(|c: char| c == '/' || c.is_whitespace());
        if !valid {
            return Err((
                name.span(),
                format!("invalid interface name {:?}", name.get_ref()),
            ));
        }
        names.push(name.get_ref().clone());
    }
    Ok(names)
}

fn action(value: &Spanned<String>, key: &str) -> Result<Action, Located> {
    Action::from_name(value.get_ref()).ok_or_else(|| {
        (
            value.span(),
            format!(
                "invalid {key} {:?}: expected \"allow\" or \"deny\"",
                value.get_ref()
            ),
        )
    })
}

/// `"20/s"`, `"6/m"`, `"100/h"`, with `burst` (default: the count).
fn rate_limit(limit: &Spanned<String>, burst: Option<&Spanned<i64>>) -> Result<Limit, Located> {
    let bad = || {
        (
            limit.span(),
            format!(
                "invalid limit {:?}: expected COUNT/s, COUNT/m or COUNT/h, COUNT 1 to 1000000",
                limit.get_ref()
            ),
        )
    };
    let (count, unit) = limit.get_ref().split_once('/').ok_or_else(bad)?;
    let count: u32 = count.trim().parse().map_err(|_| bad())?;
    let per_secs = unit_seconds(unit.trim()).ok_or_else(bad)?;
    if !(1..=1_000_000).contains(&count) {
        return Err(bad());
    }
    let burst = match burst {
        None => count,
        Some(burst) => match u32::try_from(*burst.get_ref()) {
            Ok(value) if (1..=1_000_000).contains(&value) => value,
            _ => return Err((burst.span(), "burst must be 1 to 1000000".into())),
        },
    };
    Ok(Limit {
        count,
        per_secs,
        burst,
    })
}

fn proto(value: &Spanned<String>) -> Result<Proto, Located> {
    Proto::from_name(value.get_ref()).ok_or_else(|| {
        (
            value.span(),
            format!(
                "invalid proto {:?}: expected \"tcp\", \"udp\", \"icmp\", \"icmpv6\" or \"any\"",
                value.get_ref()
            ),
        )
    })
}

/// Networks and `@set` references, merged (overlapping and adjacent prefixes joined).
fn address_list(
    list: Spanned<Vec<Spanned<String>>>,
    sets: &HashMap<String, Vec<IpNet>>,
) -> Result<Vec<IpNet>, Located> {
    if list.get_ref().is_empty() {
        return Err((
            list.span(),
            "empty address list: omit the key to match any address".into(),
        ));
    }
    let mut nets = Vec::new();
    for entry in list.get_ref() {
        match entry.get_ref().strip_prefix('@') {
            Some(name) => match sets.get(name) {
                Some(set) => nets.extend_from_slice(set),
                None => return Err((entry.span(), format!("unknown set @{name}"))),
            },
            None => nets.push(network(entry)?),
        }
    }
    Ok(IpNet::aggregate(&nets))
}

/// An address (a host) or a CIDR whose host bits are zero.
fn network(entry: &Spanned<String>) -> Result<IpNet, Located> {
    let text = entry.get_ref().trim();
    let error = |message: String| Err((entry.span(), message));
    if let Ok(addr) = text.parse::<IpAddr>() {
        return Ok(IpNet::from(addr));
    }
    let Some((addr, len)) = text.split_once('/') else {
        return error(format!("invalid address {text:?}"));
    };
    let Ok(addr) = addr.parse::<IpAddr>() else {
        return error(format!("invalid address {addr:?} in {text:?}"));
    };
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let Ok(len) = len.parse::<u8>() else {
        return error(format!("invalid prefix length {len:?} in {text:?}"));
    };
    let Ok(net) = IpNet::new(addr, len) else {
        return error(format!(
            "invalid CIDR {text:?}: prefix length {len} exceeds {max}"
        ));
    };
    if net.trunc() != net {
        return error(format!(
            "host bits set in {text:?}; did you mean {}?",
            net.trunc()
        ));
    }
    Ok(net)
}

fn port_list(
    list: Spanned<Vec<Spanned<toml::Value>>>,
) -> Result<Vec<RangeInclusive<u16>>, Located> {
    if list.get_ref().is_empty() {
        return Err((
            list.span(),
            "empty port list: omit the key to match any port".into(),
        ));
    }
    list.into_inner().iter().map(port_entry).collect()
}

/// `22`, `"22"` or `"8000-8100"`.
fn port_entry(entry: &Spanned<toml::Value>) -> Result<RangeInclusive<u16>, Located> {
    let span = entry.span();
    match entry.get_ref() {
        toml::Value::Integer(port) => {
            let port = port_number(*port).map_err(|message| (span.clone(), message))?;
            Ok(port..=port)
        }
        toml::Value::String(text) => {
            let parse = |part: &str| {
                match part.trim().parse::<i64>() {
                Ok(port) => port_number(port),
                Err(_) => Err(format!(
                    "invalid port range {text:?}: expected a port like \"22\" or a range like \"8000-8100\""
                )),
            }
            };
            let (start, end) = match text.split_once('-') {
                Some((start, end)) => (parse(start), parse(end)),
                None => (parse(text), parse(text)),
            };
            let (start, end) = (
                start.map_err(|m| (span.clone(), m))?,
                end.map_err(|m| (span.clone(), m))?,
            );
            if start > end {
                return Err((
                    span,
                    format!("reversed port range {text:?}: {start} > {end}"),
                ));
            }
            Ok(start..=end)
        }
        other => Err((
            span,
            format!("invalid port {other}: expected a number or a \"start-end\" string"),
        )),
    }
}

fn port_number(port: i64) -> Result<u16, String> {
    match port {
        1..=65535 => Ok(port as u16),
        0 => Err("port 0 is not a valid destination port (use 1-65535)".into()),
        _ => Err(format!("port {port} is out of range 1-65535")),
    }
}

/// Makes serde's messages speak of keys rather than fields.
fn readable(message: &str) -> String {
    message
        .trim()
        .replace("unknown field", "unknown key")
        .replace("missing field", "missing key")
}

/// 1-based line and character column of byte `offset`.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, text[line_start..offset].chars().count() + 1)
}

/// A short description of what a rule set would load, for `firewall check`.
pub fn summary(set: &RuleSet) -> String {
    let policy = Action::name;
    let nets = |nets: &Option<Vec<IpNet>>| match nets {
        None => "any".to_string(),
        Some(nets) if nets.len() <= 3 => nets
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(","),
        Some(nets) => format!("{} networks", nets.len()),
    };
    let on_off = |on: bool| if on { "on" } else { "off" };
    let mut out = format!(
        "{} rules, default policy {}, established {}, essentials {}, dhcp {}{}\n",
        set.rules.len(),
        policy(set.default_policy),
        on_off(set.established),
        on_off(set.essentials),
        on_off(set.dhcp),
        if set.audit {
            ", audit mode (nothing is dropped)"
        } else {
            ""
        },
    );
    for (index, rule) in set.rules.iter().enumerate() {
        let ports = rule.ports_text(",");
        out += &format!(
            "{:>4}  {:<20} {:<5} proto {:<6} from {} to {} ports {}{}\n",
            index + 1,
            rule.name,
            policy(rule.action),
            rule.proto.name(),
            nets(&rule.from),
            nets(&rule.to),
            ports,
            match &rule.iface {
                Some(names) => format!(" on {}", names.join(",")),
                None => String::new(),
            } + &match &rule.limit {
                Some(limit) => format!(
                    " limit {}/{} burst {}",
                    limit.count,
                    limit.unit(),
                    limit.burst
                ),
                None => String::new(),
            } + if rule.log { " log" } else { "" }
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error(text: &str) -> ConfigError {
        parse_rules("t.toml", text).expect_err("should be rejected")
    }

    #[test]
    fn bad_inputs_are_reported_at_their_position() {
        let cases: &[(&str, usize, usize, &str)] = &[
            ("polcy = 1\n", 1, 1, "unknown key `polcy`"),
            ("[defaults]\npolicy = \"drop\"\n", 2, 10, "invalid policy \"drop\""),
            ("[defaults]\nmood = \"x\"\n", 2, 1, "unknown key `mood`"),
            ("[[rules]]\naction = \"allow\"\nprot = \"tcp\"\n", 3, 1, "unknown key `prot`"),
            ("[[rules]]\nproto = \"tcp\"\n", 1, 1, "has no `action`"),
            ("[[rules]]\naction = \"permit\"\n", 2, 10, "invalid action \"permit\""),
            ("[[rules]]\naction = \"allow\"\nproto = \"sctp\"\n", 3, 9, "invalid proto \"sctp\""),
            ("[[rules]]\naction = \"allow\"\nfrom = \"10.0.0.0/8\"\n", 3, 8, "invalid type"),
            ("[[rules]]\naction = \"allow\"\nfrom = [10]\n", 3, 9, "invalid type"),
            ("[[rules]]\naction = \"allow\"\nfrom = [\"10.0.0.300\"]\n", 3, 9, "invalid address \"10.0.0.300\""),
            ("[[rules]]\naction = \"allow\"\nto = [\"10.0.0.0/33\"]\n", 3, 7, "prefix length 33 exceeds 32"),
            ("[[rules]]\naction = \"allow\"\nto = [\"2001:db8::/129\"]\n", 3, 7, "exceeds 128"),
            ("[[rules]]\naction = \"allow\"\nfrom = [\"10.0.0.1/8\"]\n", 3, 9, "did you mean 10.0.0.0/8?"),
            ("[[rules]]\naction = \"allow\"\nfrom = []\n", 3, 8, "empty address list"),
            ("[[rules]]\naction = \"allow\"\nports = []\n", 3, 9, "empty port list"),
            ("[[rules]]\naction = \"allow\"\nports = [0]\n", 3, 10, "port 0"),
            ("[[rules]]\naction = \"allow\"\nports = [22, 65536]\n", 3, 14, "out of range"),
            ("[[rules]]\naction = \"allow\"\nports = [-1]\n", 3, 10, "out of range"),
            ("[[rules]]\naction = \"allow\"\nports = [\"9000-8000\"]\n", 3, 10, "reversed port range"),
            ("[[rules]]\naction = \"allow\"\nports = [\"80-\"]\n", 3, 10, "invalid port range"),
            ("[[rules]]\naction = \"allow\"\nports = [8.5]\n", 3, 10, "invalid port 8.5"),
            ("[[rules]]\naction = \"allow\"\nports = [true]\n", 3, 10, "invalid port true"),
            ("[[rules]]\naction = \"allow\"\nproto = \"icmp\"\nports = [22]\n", 4, 9, "only apply to tcp and udp"),
            ("[[rules]]\naction = \"allow\"\nname = 7\n", 3, 8, "invalid type"),
            ("[[rules]]\nname = \"a\"\naction = \"allow\"\n[[rules]]\nname = \"a\"\naction = \"deny\"\n", 5, 8, "duplicate rule name \"a\""),
            ("rules = 5\n", 1, 9, "invalid type"),
            ("[[rules]]\naction = \"allow\"\niface = []\n", 3, 9, "empty interface list"),
            ("[[rules]]\naction = \"allow\"\niface = [\"a very long name0\"]\n", 3, 10, "invalid interface name"),
            ("[defaults]\nestablished = \"yes\"\n", 2, 15, "invalid type"),
            ("[defaults]\ndhcp = \"on\"\n", 2, 8, "invalid type"),
            ("[defaults]\ndhcp = 1\n", 2, 8, "invalid type"),
            ("[defaults]\nmode = \"watch\"\n", 2, 8, "mode must be"),
            ("[[rules]]\naction = \"allow\"\nlimit = \"5/d\"\n", 3, 9, "invalid limit \"5/d\""),
            ("[[rules]]\naction = \"allow\"\nlimit = \"0/s\"\n", 3, 9, "invalid limit"),
            ("[[rules]]\naction = \"deny\"\nlimit = \"5/s\"\n", 3, 9, "applies to allow rules"),
            ("[[rules]]\naction = \"allow\"\nburst = 5\n", 3, 9, "`burst` needs a `limit`"),
            ("[[rules]]\naction = \"allow\"\nlimit = \"5/s\"\nburst = 0\n", 4, 9, "burst must be"),
            ("[log]\nlines_per_second = -1\n", 2, 20, "must be 0 to 10000"),
            ("[state]\nudp_timeout = 0\n", 2, 15, "timeout must be 1"),
            ("[state]\ntcp = 5\n", 2, 1, "unknown key `tcp`"),
            ("[[rules]\naction = \"allow\"\n", 1, 8, "invalid table header"),
            ("[[rules]]\naction = \"allow\nproto = \"tcp\"\n", 2, 16, "invalid basic string"),
            ("[[rules]]\n  name = \"é\"  ; action = \"allow\"\n", 2, 15, "expected newline"),
        ];
        for &(text, line, col, message) in cases {
            let error = error(text);
            assert_eq!(
                (error.line, error.col),
                (line, col),
                "position of {error} for input {text:?}"
            );
            assert!(
                error.message.contains(message),
                "message {:?} lacks {message:?}",
                error.message
            );
            assert!(error
                .to_string()
                .starts_with(&format!("t.toml:{line}:{col}: ")));
        }
    }

    /// A rule file and set files in a fresh directory.
    fn with_files(files: &[(&str, &str)], rules: &str) -> Result<RuleSet, ConfigError> {
        let dir = std::env::temp_dir().join(format!(
            "fw-config-{}-{}",
            std::process::id(),
            rand_suffix()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        for (name, text) in files {
            std::fs::write(dir.join(name), text).unwrap();
        }
        let result = parse_rules_in("r.toml", rules, &dir);
        std::fs::remove_dir_all(&dir).unwrap();
        result
    }

    fn rand_suffix() -> u64 {
        use std::sync::atomic::{AtomicU64, Ordering};
        static NEXT: AtomicU64 = AtomicU64::new(0);
        NEXT.fetch_add(1, Ordering::SeqCst)
    }

    fn nets(set: &RuleSet, rule: usize) -> Vec<String> {
        set.rules[rule]
            .from
            .as_ref()
            .unwrap()
            .iter()
            .map(|n| n.to_string())
            .collect()
    }

    #[test]
    fn set_files_that_are_not_regular_files_are_errors_not_hangs() {
        let rules =
            "[sets.s]\nfiles = [\"fifo\"]\n\n[[rules]]\naction = \"deny\"\nfrom = [\"@s\"]\n";
        let dir = std::env::temp_dir().join(format!("fw-config-fifo-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let fifo = std::ffi::CString::new(dir.join("fifo").to_str().unwrap()).unwrap();
        // SAFETY: mkfifo with a valid C string.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
        let error = parse_rules_in("r.toml", rules, &dir).unwrap_err();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!((error.line, error.col), (2, 10));
        assert!(
            error.message.ends_with("fifo: a FIFO, not a regular file"),
            "{error}"
        );
        // A device: /dev/zero would never end.
        let rules = rules.replace("fifo", "/dev/zero");
        let error = parse_rules_in("r.toml", &rules, Path::new("/")).unwrap_err();
        assert!(
            error.message.ends_with("a device, not a regular file"),
            "{error}"
        );
    }

    #[test]
    fn sets_from_inline_lists_and_files_are_merged() {
        let set = with_files(
            &[
                (
                    "drop.netset",
                    "# FireHOL style\n10.0.0.0/25\n\n10.0.0.128/25  # adjacent\n192.0.2.7\n",
                ),
                ("more.txt", "10.0.0.5\n2001:db8::/32\n2001:db8:1::/48\n"),
            ],
            r#"
            [sets.bad]
            cidrs = ["198.51.100.0/24", "198.51.100.0/25"]
            files = ["drop.netset", "more.txt"]

            [[rules]]
            action = "deny"
            from = ["@bad", "203.0.113.1"]

            [[rules]]
            action = "deny"
            to = ["@bad"]
            "#,
        )
        .unwrap();
        assert_eq!(
            nets(&set, 0),
            [
                "10.0.0.0/24",
                "192.0.2.7/32",
                "198.51.100.0/24",
                "203.0.113.1/32",
                "2001:db8::/32"
            ]
        );
        assert_eq!(set.rules[1].to.as_ref().unwrap().len(), 4);
    }

    #[test]
    fn set_mistakes_are_reported() {
        let error = with_files(
            &[("l.txt", "10.0.0.0/8\n# ok\n10.0.0.1/8\n")],
            "[sets.s]\nfiles = [\"l.txt\"]\n",
        )
        .unwrap_err();
        assert!(error.file.ends_with("l.txt"));
        assert_eq!((error.line, error.col), (3, 0));
        assert!(
            error.to_string().contains("l.txt:3: host bits set"),
            "{error}"
        );

        let cases: &[(&str, usize, usize, &str)] = &[
            ("[[rules]]\naction = \"deny\"\nfrom = [\"@nope\"]\n", 3, 9, "unknown set @nope"),
            ("[sets.s]\nfiles = [\"missing.txt\"]\n", 2, 10, "cannot read set file"),
            ("[sets.s]\ncidrs = [\"10.0.0.0/33\"]\n", 2, 10, "exceeds 32"),
            ("[sets.s]\ncidr = []\n", 2, 1, "unknown key `cidr`"),
            ("[sets.\"a b\"]\ncidrs = [\"10.0.0.0/8\"]\n", 1, 1, "invalid set name"),
            ("[sets.s]\ncidrs = []\n", 1, 1, "is empty"),
            ("[limits]\nmax_entries = 0\n", 2, 15, "max_entries must be"),
            (
                "[limits]\nmax_entries = 2\n[[rules]]\naction = \"deny\"\nfrom = [\"10.0.0.1\", \"10.0.0.3\", \"10.0.0.5\"]\n",
                3,
                1,
                "past 2 address entries",
            ),
        ];
        for &(text, line, col, message) in cases {
            let error = with_files(&[], text).unwrap_err();
            assert_eq!((error.line, error.col), (line, col), "{error} for {text:?}");
            assert!(error.message.contains(message), "{error} lacks {message:?}");
        }
    }

    #[test]
    fn too_many_rules_are_rejected() {
        let text = "[[rules]]\naction = \"allow\"\n".repeat(MAX_RULES + 1);
        let error = error(&text);
        assert_eq!(error.line, 2 * MAX_RULES + 1);
        assert!(error.message.contains("too many rules"));
    }

    #[test]
    fn a_full_rule_parses() {
        let set = parse_rules(
            "t.toml",
            r#"
            [defaults]
            policy = "deny"

            [[rules]]
            name = "ssh-from-lan"
            action = "allow"
            proto = "tcp"
            from = ["10.0.0.0/8", "2001:db8::/32", "192.0.2.7"]
            to = ["198.51.100.0/24"]
            ports = [22, "8000-8100", "443"]
            iface = ["eth0", "wg0"]

            [[rules]]
            action = "deny"
            "#,
        )
        .unwrap();
        assert_eq!(set.default_policy, Action::Deny);
        let rule = &set.rules[0];
        assert_eq!(rule.name, "ssh-from-lan");
        assert_eq!((rule.action, rule.proto), (Action::Allow, Proto::Tcp));
        let from: Vec<String> = rule
            .from
            .as_ref()
            .unwrap()
            .iter()
            .map(|n| n.to_string())
            .collect();
        // Merged lists come out sorted, IPv4 first.
        assert_eq!(from, ["10.0.0.0/8", "192.0.2.7/32", "2001:db8::/32"]);
        assert_eq!(rule.ports, Some(vec![22..=22, 8000..=8100, 443..=443]));
        assert_eq!(
            rule.iface,
            Some(vec!["eth0".to_string(), "wg0".to_string()])
        );
        let second = &set.rules[1];
        assert_eq!(second.name, "rule 2");
        assert_eq!(
            (second.proto, &second.from, &second.ports),
            (Proto::Any, &None, &None)
        );
    }

    #[test]
    fn an_empty_file_allows_everything() {
        let set = parse_rules("t.toml", "").unwrap();
        assert_eq!(set.default_policy, Action::Allow);
        assert!(set.rules.is_empty());
    }

    #[test]
    fn the_example_rule_files_parse() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../rules");
        let mut checked = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                load_rules(&path).unwrap_or_else(|e| panic!("{e:#}"));
                checked += 1;
            }
        }
        assert!(checked >= 3);
    }
}
