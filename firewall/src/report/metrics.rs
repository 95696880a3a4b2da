//! Prometheus metrics on `firewall run --metrics ADDR`: the counters `firewall stats` shows,
//! read from the pinned maps at each scrape, plus reloads and what is loaded; served by
//! [`metrics_server`](super::metrics_server).
use std::sync::{Arc, Mutex};

use anyhow::Result;
use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::dataplane::pins::Pins;
use crate::report::stats;

/// What the daemon tells the metrics about its reloads.
#[derive(Clone, Debug, Default)]
pub struct Reloads {
    pub succeeded: u64,
    pub failed: u64,
    /// Duration of the last reload (or of the first apply), in seconds.
    pub last_seconds: f64,
    pub last_succeeded: bool,
    /// Of the rules in force.
    pub rules: i64,
    pub address_entries: i64,
    /// For `/readyz`: whether the daemon has started filtering, and the interfaces it should
    /// filter and does not (absent, or refused).
    pub filtering: bool,
    pub not_filtered: Vec<String>,
}

impl Reloads {
    /// `/readyz`: `Ok` when the rules are in force on every interface the daemon should hold
    /// and the last reload was good; else why not.
    pub fn readiness(&self) -> Result<(), String> {
        let mut not = Vec::new();
        if !self.filtering {
            not.push("starting".to_string());
        }
        if !self.last_succeeded {
            not.push("the last reload failed (the rules from before are in force)".to_string());
        }
        if !self.not_filtered.is_empty() {
            not.push(format!("not filtering {}", self.not_filtered.join(", ")));
        }
        if not.is_empty() {
            Ok(())
        } else {
            Err(not.join("; "))
        }
    }
}

pub type SharedReloads = Arc<Mutex<Reloads>>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RuleLabels {
    number: u64,
    name: String,
    action: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: String,
    verdict: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: String,
}

/// The metrics page.
pub fn render(pins: &Pins, reloads: &Reloads) -> Result<String> {
    let stats = stats::read(pins)?;
    let mut registry = Registry::with_prefix("firewall");

    let rules = stats.rules.iter().map(|rule| {
        let labels = RuleLabels {
            number: rule.number as u64,
            name: rule.name.clone(),
            action: rule.action.to_string(),
        };
        let count = stats::Count {
            packets: rule.packets,
            bytes: rule.bytes,
        };
        (labels, count)
    });
    let each_rule = "each rule decided, since the rules in force were applied";
    register_counts(&mut registry, "rule", each_rule, rules);
    let decided = stats.decided().into_iter().map(|decided| {
        let labels = ReasonLabels {
            reason: decided.reason.into(),
            verdict: decided.verdict.into(),
        };
        (labels, decided.count)
    });
    let by_reason = "decided without a rule, by reason";
    register_counts(&mut registry, "decided", by_reason, decided);
    let suppressed = Counter::<u64>::default();
    suppressed.inc_by(stats.log_lines_suppressed);
    registry.register(
        "log_lines_suppressed",
        "Log lines suppressed by the kernel's rate limit or lost to a full log buffer",
        suppressed,
    );

    let reload_count = Family::<ResultLabels, Counter>::default();
    for (result, count) in [("ok", reloads.succeeded), ("error", reloads.failed)] {
        let labels = ResultLabels {
            result: result.into(),
        };
        reload_count.get_or_create(&labels).inc_by(count);
    }
    registry.register("reloads", "Reloads since the daemon started", reload_count);
    let last_seconds = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
    last_seconds.set(reloads.last_seconds);
    registry.register(
        "last_reload_seconds",
        "Duration of the last reload (or the first apply)",
        last_seconds,
    );
    for (name, help, value) in [
        (
            "last_reload_success",
            "1 if the last reload put its rules in force",
            i64::from(reloads.last_succeeded),
        ),
        ("rules", "Rules in force", reloads.rules),
        (
            "flows_live",
            "Tracked flows of this host inside their timeouts",
            stats.flows.live as i64,
        ),
        (
            "flows_entries",
            "Entries of the flow table, expired ones included",
            stats.flows.entries as i64,
        ),
        (
            "flows_capacity",
            "Flows the table holds; beyond, the least recently used are evicted",
            stats.flows.capacity as i64,
        ),
        (
            "address_entries",
            "Address map entries of the rules in force",
            reloads.address_entries,
        ),
        ("bans", "Bans in force (firewall ban)", stats.bans as i64),
    ] {
        let gauge = Gauge::<i64>::default();
        gauge.set(value);
        registry.register(name, help, gauge);
    }

    let mut page = String::new();
    encode(&mut page, &registry)?;
    Ok(page)
}

/// Registers the counters `{prefix}_packets` and `{prefix}_bytes` ("Packets/Bytes {help}"),
/// one of each per labelled count.
fn register_counts<Labels>(
    registry: &mut Registry,
    prefix: &str,
    help: &str,
    counts: impl Iterator<Item = (Labels, stats::Count)>,
) where
    Labels: Clone + std::hash::Hash + Eq + EncodeLabelSet + std::fmt::Debug + Send + Sync + 'static,
{
    let packets = Family::<Labels, Counter>::default();
    let bytes = Family::<Labels, Counter>::default();
    for (labels, count) in counts {
        packets.get_or_create(&labels).inc_by(count.packets);
        bytes.get_or_create(&labels).inc_by(count.bytes);
    }
    registry.register(
        format!("{prefix}_packets"),
        format!("Packets {help}"),
        packets,
    );
    registry.register(format!("{prefix}_bytes"), format!("Bytes {help}"), bytes);
}
