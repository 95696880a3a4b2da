//! `cargo xtask bench`: nanoseconds per packet through BPF_PROG_TEST_RUN for a packet mix at
//! 1, 100 and 1,024 rules, next to a bare `XDP_DROP` program measured in the same run.
//!
//! The rules are built so that the mix is the expensive case: no packet matches before the
//! last rule, and half match none, so the kernel ANDs every word of the rule bit sets. The
//! figures are ratios within one run; absolute numbers move with the machine's load.
use std::time::Duration;

use anyhow::Result;
use aya::programs::{TestRun, TestRunOptions, Xdp};
use firewall::compile::compile;
use firewall::kernel::monotonic_now_ns;
use firewall::kernel::Kernel;
use firewall::model::{Action, Proto, Rule, RuleSet};
use firewall::packet::{self, Frame, L4, TCP_ACK};
use firewall::reference::{inbound_flow, parse_frame, Parsed};
use firewall_common::FlowState;

/// Runs per measurement (the kernel averages them), and measurements per figure (median).
const REPEAT: u32 = 200_000;
const ROUNDS: usize = 7;

static FLOOR_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/xdp-floor"));

fn mix() -> Vec<(&'static str, Vec<u8>)> {
    packet::bench_mix()
}

/// `count` rules naming other hosts and ports, then (as the last rule) one that the mix's
/// allowed packets match.
fn rule_set(count: usize) -> RuleSet {
    let mut rules: Vec<Rule> = (0..count.saturating_sub(1))
        .map(|i| Rule {
            name: format!("filler {i}"),
            action: Action::Deny,
            proto: if i % 2 == 0 { Proto::Tcp } else { Proto::Udp },
            from: Some(vec![
                format!("172.{}.{}.0/24", 16 + i / 256, i % 256)
                    .parse()
                    .unwrap(),
                format!("2001:db8:{:x}::/48", i + 1).parse().unwrap(),
            ]),
            to: None,
            ports: Some(vec![(1000 + i as u16)..=(1000 + i as u16)]),
        })
        .collect();
    rules.push(Rule {
        name: "allow-web".into(),
        action: Action::Allow,
        proto: Proto::Any,
        from: Some(vec![
            "10.0.0.0/8".parse().unwrap(),
            "fd00::/8".parse().unwrap(),
        ]),
        to: None,
        ports: Some(vec![80..=80, 443..=443]),
    });
    RuleSet::new(Action::Deny, rules)
}

fn median(mut samples: Vec<Duration>) -> f64 {
    samples.sort();
    samples[samples.len() / 2].as_nanos() as f64
}

/// Median over rounds of the mean ns/packet over the mix.
fn measure(run: impl Fn(&[u8]) -> Result<Duration>, frames: &[(&str, Vec<u8>)]) -> Result<f64> {
    let mut rounds = Vec::new();
    for _ in 0..ROUNDS {
        let mut total = Duration::ZERO;
        for (_, frame) in frames {
            total += run(frame)?;
        }
        rounds.push(total / frames.len() as u32);
    }
    Ok(median(rounds))
}

fn main() -> Result<()> {
    let frames = mix();
    let mut floor_ebpf = aya::Ebpf::load(FLOOR_OBJECT)?;
    let floor: &mut Xdp = floor_ebpf.program_mut("floor").unwrap().try_into()?;
    floor.load()?;
    let run_floor = |frame: &[u8]| -> Result<Duration> {
        let mut out = vec![0u8; frame.len() + 256];
        let result = floor.test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            repeat: REPEAT,
            ..Default::default()
        })?;
        Ok(result.duration)
    };

    let mut kernel = Kernel::load()?;
    println!(
        "packet mix: {}",
        frames
            .iter()
            .map(|(name, _)| *name)
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "{:<24} {:>10} {:>14} {:>14}",
        "program", "ns/packet", "vs 1 rule", "vs floor"
    );
    let floor_ns = measure(run_floor, &frames)?;
    println!("{:<24} {:>10.1}", "bare XDP_DROP (floor)", floor_ns);
    let mut one_rule_ns = None;
    for count in [1usize, 100, 1024] {
        kernel.apply(&compile(&rule_set(count))?)?;
        let ns = measure(|frame| Ok(kernel.test_run(frame, REPEAT)?.1), &frames)?;
        let base = *one_rule_ns.get_or_insert(ns);
        println!(
            "{:<24} {:>10.1} {:>13.2}x {:>+13.1}",
            format!("firewall, {count} rules"),
            ns,
            ns / base,
            ns - floor_ns
        );
    }

    // Connection state, with the 1,024-rule set in force: replies that hit the flow map (and
    // pass before the rules), segments of unknown flows that miss it, and SYNs, which skip it.
    let replies = vec![
        (
            "tcp4 reply",
            Frame::v4("198.51.100.7", "10.0.0.1", L4::Tcp { dport: 40000 })
                .tcp_flags(TCP_ACK)
                .build(),
        ),
        (
            "udp6 reply",
            Frame::v6("2001:db8:ffff::9", "fd00::1", L4::Udp { dport: 40001 }).build(),
        ),
    ];
    let table: Vec<_> = replies
        .iter()
        .filter_map(|(_, frame)| match parse_frame(frame) {
            Parsed::Ip(packet) => inbound_flow(&packet),
            _ => None,
        })
        .map(|key| {
            (
                key,
                FlowState {
                    last_seen_ns: monotonic_now_ns(),
                    flags: 0,
                    _pad: 0,
                },
            )
        })
        .collect();
    kernel.set_flows(&table)?;
    let misses = vec![
        (
            "tcp4 unknown ack",
            Frame::v4("198.51.100.8", "10.0.0.1", L4::Tcp { dport: 40000 })
                .tcp_flags(TCP_ACK)
                .build(),
        ),
        (
            "udp6 unknown",
            Frame::v6("2001:db8:ffff::8", "fd00::1", L4::Udp { dport: 40001 }).build(),
        ),
    ];
    let syns = vec![(
        "tcp4 syn",
        Frame::v4("198.51.100.7", "10.0.0.1", L4::Tcp { dport: 40000 }).build(),
    )];
    for (name, frames) in [
        ("state hit (replies)", &replies),
        ("state miss (new)", &misses),
        ("SYN (lookup skipped)", &syns),
    ] {
        let ns = measure(|frame| Ok(kernel.test_run(frame, REPEAT)?.1), frames)?;
        println!(
            "{:<24} {:>10.1} {:>14} {:>+13.1}",
            name,
            ns,
            "",
            ns - floor_ns
        );
    }
    Ok(())
}
