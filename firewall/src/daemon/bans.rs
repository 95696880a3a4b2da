//! `firewall ban`, `unban` and `bans`: what the operator types (addresses and prefixes, one
//! per argument or per line of stdin), checked whole before anything is changed, and the
//! daemon's side of the three requests.
use std::io::BufRead;
use std::net::IpAddr;
use std::time::Duration;

use anyhow::{bail, Result};
use ipnet::IpNet;
use log::info;
use serde::Serialize;

use super::reload::State;
use crate::dataplane::bans::BanEntry;
use crate::dataplane::{monotonic_now_ns, Kernel};

/// Largest batch one request carries (a request line is at most a rule file's size).
pub const MAX_BATCH: usize = 200_000;

/// One ban target: `ADDR` or `ADDR/LEN` without host bits.
pub fn parse_target(text: &str) -> Result<IpNet, String> {
    let net = if text.contains('/') {
        let net: IpNet = text
            .parse()
            .map_err(|_| format!("{text:?} is no address or CIDR prefix"))?;
        if net.trunc() != net {
            return Err(format!(
                "{text} has bits set past its prefix length: did you mean {}?",
                net.trunc()
            ));
        }
        net
    } else {
        let addr: IpAddr = text
            .parse()
            .map_err(|_| format!("{text:?} is no address or CIDR prefix"))?;
        IpNet::from(addr)
    };
    if net.prefix_len() == 0 {
        return Err(format!("{text} would ban every source"));
    }
    Ok(net)
}

/// Targets from `input` (stdin): whitespace- or comma-separated, `#` comments; an error names
/// the line.
pub fn read_targets(input: impl BufRead) -> Result<Vec<IpNet>> {
    let mut nets = Vec::new();
    for (index, line) in input.lines().enumerate() {
        let line = line?;
        let line = line.split('#').next().unwrap_or("");
        for word in line.split([' ', '\t', ',']).filter(|word| !word.is_empty()) {
            match parse_target(word) {
                Ok(net) => nets.push(net),
                Err(message) => bail!("stdin:{}: {message}", index + 1),
            }
        }
        if nets.len() > MAX_BATCH {
            bail!("stdin: more than {MAX_BATCH} addresses in one call; split the list");
        }
    }
    Ok(nets)
}

/// The daemon's side of `firewall ban`.
pub fn ban(kernel: &mut Kernel, targets: &[String], timeout: Option<Duration>) -> Result<String> {
    let nets = parse_all(targets)?;
    let expires_ns = match timeout {
        Some(timeout) => monotonic_now_ns().saturating_add(timeout.as_nanos() as u64),
        None => 0,
    };
    kernel.ban(&nets, expires_ns)?;
    let until = match timeout {
        Some(timeout) => format!("for {}", duration_text(timeout.as_secs())),
        None => "until unbanned".to_string(),
    };
    let message = format!("banned {} {until}", count_text(&nets));
    info!("{message}");
    Ok(message)
}

/// The daemon's side of `firewall unban`.
pub fn unban(kernel: &mut Kernel, targets: &[String]) -> Result<String> {
    let nets = parse_all(targets)?;
    let lifted = kernel.unban(&nets)?;
    let message = format!(
        "unbanned {} ({} of them were banned)",
        count_text(&nets),
        lifted
    );
    info!("{message}");
    Ok(message)
}

/// The dynamic set `set` of the rules in force, or an error saying there is none.
fn dynamic_set<'a>(state: &State, set: &'a str) -> Result<&'a str> {
    if !state.in_force.dynamic_sets.iter().any(|name| name == set) {
        bail!(
            "the rules in force declare no dynamic set {set:?} (`[sets.{set}]` with \
             `dynamic = true`)"
        );
    }
    Ok(set)
}

/// The daemon's side of `firewall ban --set NAME`: members of a dynamic set, then the rules
/// put in force again with them.
pub(super) fn add_to_set(
    state: &mut State,
    set: &str,
    targets: &[String],
    timeout: Option<Duration>,
) -> Result<String> {
    let set = dynamic_set(state, set)?;
    let nets = parse_all(targets)?;
    state.members.add(set, &nets, timeout)?;
    state.refill()?;
    let message = format!("added {} to @{set}", count_text(&nets));
    info!("{message}");
    Ok(message)
}

/// The daemon's side of `firewall unban --set NAME`.
pub(super) fn remove_from_set(state: &mut State, set: &str, targets: &[String]) -> Result<String> {
    let set = dynamic_set(state, set)?;
    let nets = parse_all(targets)?;
    let removed = state.members.remove(set, &nets)?;
    state.refill()?;
    let message = format!(
        "removed {} from @{set} ({removed} of them were members)",
        count_text(&nets)
    );
    info!("{message}");
    Ok(message)
}

/// The daemon's side of `firewall bans --set NAME`.
pub(super) fn list_set(state: &State, set: &str, json: bool) -> Result<String> {
    let set = dynamic_set(state, set)?;
    let members = state.members.list(set);
    if json {
        return Ok(serde_json::to_string_pretty(&members)?);
    }
    let now = super::dynamic::unix_now();
    let mut text = format!("@{set}: {} members\n", members.len());
    for member in &members {
        let left = match member.ends {
            Some(ends) => format!("{} left", duration_text(ends.saturating_sub(now))),
            None => "until removed".to_string(),
        };
        text.push_str(&format!("{:<43} {left}\n", member.address.to_string()));
    }
    Ok(text.trim_end().to_string())
}

fn parse_all(targets: &[String]) -> Result<Vec<IpNet>> {
    if targets.len() > MAX_BATCH {
        bail!("more than {MAX_BATCH} addresses in one request");
    }
    targets
        .iter()
        .map(|text| parse_target(text).map_err(anyhow::Error::msg))
        .collect()
}

fn count_text(nets: &[IpNet]) -> String {
    match nets {
        [one] => one.to_string(),
        many => format!("{} addresses and prefixes", many.len()),
    }
}

/// One ban as `firewall bans` shows it.
#[derive(Debug, Serialize)]
pub struct Listed {
    pub address: String,
    /// Seconds left; `None`: until unbanned.
    pub expires_in_seconds: Option<u64>,
}

/// The daemon's side of `firewall bans`: the bans in force (not those that ended and wait for
/// the sweep), sorted, as a table or JSON.
pub fn list(kernel: &Kernel, json: bool) -> Result<String> {
    let now = monotonic_now_ns();
    let mut listed: Vec<(IpNet, Listed)> = kernel
        .bans()?
        .into_iter()
        .filter(|entry| entry.expires_ns == 0 || entry.expires_ns > now)
        .map(|BanEntry { net, expires_ns }| {
            let left = (expires_ns != 0).then(|| (expires_ns - now).div_ceil(1_000_000_000));
            (
                net,
                Listed {
                    address: net.to_string(),
                    expires_in_seconds: left,
                },
            )
        })
        .collect();
    listed.sort_by_key(|(net, _)| *net);
    let listed: Vec<Listed> = listed.into_iter().map(|(_, listed)| listed).collect();
    if json {
        return Ok(serde_json::to_string_pretty(&listed)?);
    }
    let mut text = format!("{} bans\n", listed.len());
    for ban in &listed {
        let left = match ban.expires_in_seconds {
            Some(seconds) => format!("{} left", duration_text(seconds)),
            None => "until unbanned".to_string(),
        };
        text.push_str(&format!("{:<43} {left}\n", ban.address));
    }
    Ok(text.trim_end().to_string())
}

/// `1h 2m 3s`, without the zero parts.
pub fn duration_text(seconds: u64) -> String {
    let parts = [
        (seconds / 86_400, "d"),
        (seconds / 3600 % 24, "h"),
        (seconds / 60 % 60, "m"),
    ];
    let mut text: Vec<String> = parts
        .iter()
        .filter(|(n, _)| *n > 0)
        .map(|(n, unit)| format!("{n}{unit}"))
        .collect();
    if !seconds.is_multiple_of(60) || text.is_empty() {
        text.push(format!("{}s", seconds % 60));
    }
    text.join(" ")
}

/// The client address of the SSH session this command runs in (`SSH_CONNECTION`), if any:
/// banning it would cut the operator off.
pub fn ssh_client() -> Option<IpAddr> {
    let connection = std::env::var("SSH_CONNECTION").ok()?;
    connection.split_whitespace().next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_are_addresses_or_clean_prefixes() {
        assert_eq!(
            parse_target("192.0.2.7").unwrap().to_string(),
            "192.0.2.7/32"
        );
        assert_eq!(parse_target("2001:db8::/32").unwrap().prefix_len(), 32);
        let error = parse_target("192.0.2.7/24").unwrap_err();
        assert!(error.contains("did you mean 192.0.2.0/24"), "{error}");
        assert!(parse_target("0.0.0.0/0")
            .unwrap_err()
            .contains("every source"));
        assert!(parse_target("::/0").unwrap_err().contains("every source"));
        assert!(parse_target("example.com")
            .unwrap_err()
            .contains("no address"));
        assert!(parse_target("192.0.2.300").is_err());
    }

    #[test]
    fn stdin_lists_name_the_bad_line() {
        let input = "192.0.2.1 192.0.2.2\n# a comment\n2001:db8::1, 198.51.100.0/24\n";
        assert_eq!(read_targets(input.as_bytes()).unwrap().len(), 4);
        let error = read_targets("192.0.2.1\n\nnot-an-address\n".as_bytes()).unwrap_err();
        assert!(error.to_string().starts_with("stdin:3: "), "{error}");
    }

    #[test]
    fn durations_read_as_operators_write_them() {
        assert_eq!(duration_text(3600), "1h");
        assert_eq!(duration_text(3723), "1h 2m 3s");
        assert_eq!(duration_text(0), "0s");
        assert_eq!(duration_text(90_061), "1d 1h 1m 1s");
    }
}
