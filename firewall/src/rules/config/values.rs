//! The values of a rule file's keys: actions, protocols, rates, interface names, networks
//! and ports, each checked and turned into its [`crate::rules::model`] form, or a message
//! located at the value.
use std::collections::HashMap;
use std::net::IpAddr;
use std::ops::RangeInclusive;

use firewall_common::proto::icmp_type_names;
use ipnet::IpNet;
use toml::Spanned;

use super::services::Services;
use super::Located;
use crate::rules::model::{unit_seconds, Action, Limit, Proto, MAX_COMMENT_CHARS};

/// `Ok` unless the list of `what` is empty (leaving the key out matches `omitted`).
fn not_empty<T>(list: &Spanned<Vec<T>>, what: &str, omitted: &str) -> Result<(), Located> {
    if list.get_ref().is_empty() {
        let message = format!("empty {what} list: omit the key to match {omitted}");
        return Err((list.span(), message));
    }
    Ok(())
}

/// Interface names (`iface = ["eth0"]`, ufw's `in on`).
pub(super) fn interface_list(list: Spanned<Vec<Spanned<String>>>) -> Result<Vec<String>, Located> {
    not_empty(&list, "interface", "every interface")?;
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

/// A rule's `comment`: one line of at most [`MAX_COMMENT_CHARS`] characters, as it is shown on
/// one line of `check` and `explain`.
pub(super) fn comment(value: &Spanned<String>) -> Result<String, Located> {
    let text = value.get_ref();
    let chars = text.chars().count();
    if chars > MAX_COMMENT_CHARS {
        return Err((
            value.span(),
            format!("comment is {chars} characters long; at most {MAX_COMMENT_CHARS}"),
        ));
    }
    if text.chars().any(char::is_control) {
        return Err((
            value.span(),
            "comment must be one line, without control characters".into(),
        ));
    }
    Ok(text.clone())
}

pub(super) fn action(value: &Spanned<String>, key: &str) -> Result<Action, Located> {
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
pub(super) fn rate_limit(
    limit: &Spanned<String>,
    burst: Option<&Spanned<i64>>,
) -> Result<Limit, Located> {
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

pub(super) fn proto(value: &Spanned<String>) -> Result<Proto, Located> {
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
pub(super) fn address_list(
    list: Spanned<Vec<Spanned<String>>>,
    sets: &HashMap<String, Vec<IpNet>>,
) -> Result<Vec<IpNet>, Located> {
    not_empty(&list, "address", "any address")?;
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
pub(super) fn network(entry: &Spanned<String>) -> Result<IpNet, Located> {
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

/// The ports of a rule of protocol `proto`, names looked up in `services`.
pub(super) fn port_list(
    list: Spanned<Vec<Spanned<toml::Value>>>,
    proto: Proto,
    services: &Services,
) -> Result<Vec<RangeInclusive<u16>>, Located> {
    not_empty(&list, "port", "any port")?;
    list.into_inner()
        .iter()
        .map(|entry| port_entry(entry, proto, services))
        .collect()
}

/// `22`, `"22"`, `"8000-8100"` or a service name (`"ssh"`: anything but digits and `-`).
fn port_entry(
    entry: &Spanned<toml::Value>,
    proto: Proto,
    services: &Services,
) -> Result<RangeInclusive<u16>, Located> {
    let span = entry.span();
    match entry.get_ref() {
        toml::Value::Integer(port) => {
            let port = port_number(*port).map_err(|message| (span.clone(), message))?;
            Ok(port..=port)
        }
        toml::Value::String(name)
            if !name
                .chars()
                .all(|c| c.is_ascii_digit() || c == '-' || c.is_whitespace()) =>
        {
            let port = services
                .port(name.trim(), proto)
                .map_err(|message| (span, message))?;
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

/// `icmp_types` of a rule of ICMP protocol `proto`: names as nftables spells them for the
/// rule's family (`nft describe icmp_type` / `icmpv6_type`) or numbers 0-255; sorted, each
/// once.
pub(super) fn icmp_type_list(
    list: Spanned<Vec<Spanned<toml::Value>>>,
    proto: Proto,
) -> Result<Vec<u8>, Located> {
    not_empty(&list, "icmp type", "every type")?;
    let Some(v6) = proto.icmp_family_v6() else {
        return Err((
            list.span(),
            "`icmp_types` apply to rules with proto = \"icmp\" or \"icmpv6\"".into(),
        ));
    };
    let family = proto.name();
    let mut types = Vec::new();
    for entry in list.get_ref() {
        let kind = match entry.get_ref() {
            toml::Value::Integer(number) => u8::try_from(*number).map_err(|_| {
                (
                    entry.span(),
                    format!("{family} type {number} is out of range 0-255"),
                )
            })?,
            toml::Value::String(name) => {
                let find = |v6| {
                    icmp_type_names(v6)
                        .iter()
                        .find(|(known, _)| known == name)
                        .map(|&(_, kind)| kind)
                };
                match (find(v6), find(!v6)) {
                    (Some(kind), _) => kind,
                    (None, Some(_)) => {
                        let other = if v6 { "icmp" } else { "icmpv6" };
                        return Err((
                            entry.span(),
                            format!("{name:?} is an {other} type, and this rule is {family}"),
                        ));
                    }
                    (None, None) => {
                        return Err((
                            entry.span(),
                            format!(
                                "unknown {family} type {name:?}: expected a name as `nft \
                                 describe {family}_type` lists them (echo-request, ...) or a \
                                 number 0-255"
                            ),
                        ))
                    }
                }
            }
            other => {
                return Err((
                    entry.span(),
                    format!("invalid {family} type {other}: expected a name or a number 0-255"),
                ))
            }
        };
        types.push(kind);
    }
    types.sort_unstable();
    types.dedup();
    Ok(types)
}
