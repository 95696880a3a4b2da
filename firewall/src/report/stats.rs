//! `firewall stats`: the counters of the rules in force, read from the pinned maps, so it
//! works whether a daemon runs or not.
use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::{bail, Context as _, Result};
use aya::maps::{Array, Map, MapData, PerCpuArray};
use firewall_common::{
    map_names, Counter, GenerationConfig, LogLimit, RuleName, CHECK_OUTBOUND, MAX_RULES,
    STAT_BANNED, STAT_DEFAULT_ALLOW, STAT_DEFAULT_DENY, STAT_DHCP, STAT_ESSENTIAL,
    STAT_ESTABLISHED, STAT_LOG_SUPPRESSED, STAT_MALFORMED, STAT_NON_IP, STAT_OUT_DEFAULT_ALLOW,
    STAT_OUT_DEFAULT_DENY, STAT_OUT_ESTABLISHED, STAT_RATE_LIMITED,
};
use serde::Serialize;

use crate::dataplane::bans;
use crate::dataplane::pins::Pins;
use crate::dataplane::{monotonic_now_ns, object_id};
use crate::report::flows::{read_fill, FlowFill};
use crate::rules::model::Action;

#[derive(Clone, Debug, Serialize)]
pub struct Stats {
    /// The rules in force, in order, counted since they were applied.
    pub rules: Vec<RuleStats>,
    /// Packets no rule matched, by the default policy.
    pub default_policy: Verdicts,
    /// Frames with truncated or inconsistent headers: always dropped.
    pub malformed: Count,
    /// Frames that are not IPv4 or IPv6 (ARP, ...): always passed.
    pub non_ip: Count,
    /// Replies to the host's own flows, passed before the rules.
    pub established: Count,
    /// Essential ICMPv6, passed before the rules.
    pub essential: Count,
    /// DHCP replies on an interface where the host had just asked, passed before the rules.
    pub dhcp: Count,
    /// Packets of allow rules over their per-source rate limit: dropped.
    pub rate_limited: Count,
    /// Packets from banned sources (`firewall ban`): dropped before the rules.
    pub banned: Count,
    /// Whether outbound packets are judged (an out rule, or `outbound = "deny"`).
    pub outbound_filtered: bool,
    /// Outbound packets no out rule matched, by the outbound default.
    pub outbound_default: Verdicts,
    /// Outbound packets of tracked flows (the host's own, or connections it accepted),
    /// passed before the out rules.
    pub outbound_established: Count,
    /// Log lines suppressed by the rate limit or lost to a full log buffer (no daemon reading).
    pub log_lines_suppressed: u64,
    /// How full the table of the host's flows is.
    pub flows: FlowFill,
    /// Bans in force (`firewall ban`).
    pub bans: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct RuleStats {
    /// 1-based, as in the rule file.
    pub number: usize,
    pub name: String,
    /// "allow" or "deny".
    pub action: &'static str,
    pub packets: u64,
    pub bytes: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Verdicts {
    /// "allow" or "deny": the policy in force.
    pub policy: &'static str,
    pub passed: Count,
    pub dropped: Count,
}

#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Count {
    pub packets: u64,
    pub bytes: u64,
}

/// Packets decided without a rule, for one reason and verdict.
pub struct Decided {
    /// As `firewall stats` names the reason.
    pub what: String,
    /// As the metrics label it.
    pub reason: &'static str,
    /// `pass` or `drop`.
    pub verdict: &'static str,
    pub count: Count,
}

impl Stats {
    /// Every count of packets decided without a rule, in the order they are shown.
    pub fn decided(&self) -> [Decided; 12] {
        let policy = &self.default_policy;
        let default = format!("default policy ({})", policy.policy);
        let default = default.as_str();
        let outbound = &self.outbound_default;
        let out_default = format!("outbound default ({})", outbound.policy);
        let out_default = out_default.as_str();
        // A table: one row a reason (as `stats` shows it, as the metrics label it).
        #[rustfmt::skip]
        let rows = [
            (default, "default_policy", "pass", policy.passed),
            (default, "default_policy", "drop", policy.dropped),
            ("malformed", "malformed", "drop", self.malformed),
            ("not IP (ARP, ...)", "non_ip", "pass", self.non_ip),
            ("established (replies)", "established", "pass", self.established),
            ("essential ICMPv6", "essential", "pass", self.essential),
            ("DHCP replies (host asked)", "dhcp", "pass", self.dhcp),
            ("over a rule's rate limit", "rate_limit", "drop", self.rate_limited),
            ("banned (firewall ban)", "banned", "drop", self.banned),
            (out_default, "outbound_default", "pass", outbound.passed),
            (out_default, "outbound_default", "drop", outbound.dropped),
            ("outbound established", "outbound_established", "pass", self.outbound_established),
        ];
        rows.map(|(what, reason, verdict, count)| Decided {
            what: what.to_string(),
            reason,
            verdict,
            count,
        })
    }
}

impl From<Counter> for Count {
    fn from(counter: Counter) -> Count {
        Count {
            packets: counter.packets,
            bytes: counter.bytes,
        }
    }
}

/// The log lines the per-CPU rate limits refused (the counter slot holds those lost to a full
/// ring). Builds before the limit counted its refusals in the slot and have no such map.
fn refused_log_lines(limits: Result<MapData>) -> Result<u64> {
    let Ok(limits) = limits else {
        return Ok(0);
    };
    let limits: PerCpuArray<MapData, LogLimit> = PerCpuArray::try_from(Map::PerCpuArray(limits))?;
    Ok(limits
        .get(&0, 0)?
        .iter()
        .map(|limit| limit.suppressed)
        .sum())
}

fn action(code: u32) -> &'static str {
    Action::from_code(code).name()
}

/// Reads the counters from the maps pinned under `pins`.
pub fn read(pins: &Pins) -> Result<Stats> {
    let dir = build_dir(pins)?;
    let open = |name: &str| -> Result<MapData> {
        let path = dir.join(name);
        MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))
    };
    let active: Array<MapData, u32> =
        Array::try_from(Map::Array(open(map_names::ACTIVE_GENERATION)?))?;
    let gen = active.get(&0, 0)? & 1;
    let configs: Array<MapData, GenerationConfig> =
        Array::try_from(Map::Array(open(map_names::GEN_CONFIG)?))?;
    let config = configs.get(&gen, 0)?;
    let names: Array<MapData, RuleName> =
        Array::try_from(Map::Array(open(map_names::RULE_NAMES)?))?;
    let actions: Array<MapData, u32> = Array::try_from(Map::Array(open(map_names::RULE_ACTIONS)?))?;
    let counters: PerCpuArray<MapData, Counter> =
        PerCpuArray::try_from(Map::PerCpuArray(open(map_names::STATS)?))?;
    let counter =
        |slot: u32| -> Result<Counter> { Ok(Counter::sum(counters.get(&slot, 0)?.iter())) };

    let flows = Map::LruHashMap(open(map_names::FLOWS)?);
    let flows = read_fill(&flows, &config, monotonic_now_ns())?;
    let bans = match pins.bans_dir() {
        dir if dir.is_dir() => bans::in_force(&bans::pinned_bans(&dir)?, monotonic_now_ns()),
        _ => 0,
    };

    let mut rules = Vec::new();
    for index in 0..MAX_RULES as u32 {
        let slot = gen * MAX_RULES as u32 + index;
        let name = names.get(&slot, 0)?;
        let len = name
            .bytes
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(name.bytes.len());
        if len == 0 {
            break;
        }
        let hits = counter(slot)?;
        rules.push(RuleStats {
            number: index as usize + 1,
            name: String::from_utf8_lossy(&name.bytes[..len]).into_owned(),
            action: action(actions.get(&slot, 0)?),
            packets: hits.packets,
            bytes: hits.bytes,
        });
    }
    Ok(Stats {
        rules,
        default_policy: Verdicts {
            policy: action(config.default_action),
            passed: counter(STAT_DEFAULT_ALLOW)?.into(),
            dropped: counter(STAT_DEFAULT_DENY)?.into(),
        },
        malformed: counter(STAT_MALFORMED)?.into(),
        non_ip: counter(STAT_NON_IP)?.into(),
        established: counter(STAT_ESTABLISHED)?.into(),
        essential: counter(STAT_ESSENTIAL)?.into(),
        dhcp: counter(STAT_DHCP)?.into(),
        rate_limited: counter(STAT_RATE_LIMITED)?.into(),
        banned: counter(STAT_BANNED)?.into(),
        outbound_filtered: config.checks & CHECK_OUTBOUND != 0,
        outbound_default: Verdicts {
            policy: action(config.outbound_action),
            passed: counter(STAT_OUT_DEFAULT_ALLOW)?.into(),
            dropped: counter(STAT_OUT_DEFAULT_DENY)?.into(),
        },
        outbound_established: counter(STAT_OUT_ESTABLISHED)?.into(),
        log_lines_suppressed: counter(STAT_LOG_SUPPRESSED)?.packets
            + refused_log_lines(open(map_names::LOG_LIMIT))?,
        flows,
        bans,
    })
}

/// This build's maps; else the only maps there are (another build's, read with this build's
/// layouts: a map whose value size differs, as the generation config's did when outbound
/// rules came, is an error, not a misreading).
fn build_dir(pins: &Pins) -> Result<PathBuf> {
    let own = pins.build_dir(object_id());
    if own.is_dir() {
        return Ok(own);
    }
    match pins.all_build_dirs()?.as_slice() {
        [only] => Ok(only.clone()),
        [] => bail!("{}: no pinned maps", pins.dir().display()),
        _ => bail!(
            "{}: maps of several builds are pinned; run the daemon of this build once",
            pins.dir().display()
        ),
    }
}

pub fn json(stats: &Stats) -> Result<String> {
    Ok(serde_json::to_string_pretty(stats)? + "\n")
}

pub fn table(stats: &Stats) -> String {
    let mut out = format!(
        "{:<36} {:<6} {:>14} {:>16}\n",
        "rule", "action", "packets", "bytes"
    );
    let mut line = |what: &str, verdict: &str, packets: u64, bytes: u64| {
        let _ = writeln!(out, "{what:<36} {verdict:<6} {packets:>14} {bytes:>16}");
    };
    for rule in &stats.rules {
        let what = format!("{:>4} {}", rule.number, rule.name);
        line(&what, rule.action, rule.packets, rule.bytes);
    }
    for decided in stats.decided() {
        let count = decided.count;
        line(&decided.what, decided.verdict, count.packets, count.bytes);
    }
    let _ = writeln!(
        out,
        "log lines suppressed (rate limit, or no daemon reading): {}",
        stats.log_lines_suppressed
    );
    let flows = &stats.flows;
    let _ = writeln!(
        out,
        "flows: {} live of {} ({} entries with expired ones)",
        flows.live, flows.capacity, flows.entries
    );
    let _ = writeln!(out, "bans in force: {}", stats.bans);
    out
}
