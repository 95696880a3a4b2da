//! Warnings about rule files that are valid but probably not what the operator wants.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use firewall_common::proto::IPPROTO_TCP;

use crate::analysis::reference::{classify, PacketInfo, Verdict};
use crate::rules::model::{Action, RuleSet};

const SSH_PORT: u16 = 22;

/// Human-readable warnings for `set`.
pub fn warnings(set: &RuleSet) -> Vec<String> {
    let mut warnings = Vec::new();
    if set.default_policy == Action::Deny && !allows_ssh_from_somewhere(set) {
        warnings.push(format!(
            "the default policy is deny and no rule allows SSH (tcp port {SSH_PORT}) from \
             anywhere: once applied, nobody can open a new SSH session to this host"
        ));
    }
    warnings
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
    use super::*;
    use crate::rules::config::parse_rules;

    fn warns(text: &str) -> bool {
        !warnings(&parse_rules("t.toml", text).unwrap()).is_empty()
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
