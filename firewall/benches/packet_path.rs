//! `cargo xtask bench`: nanoseconds per packet through BPF_PROG_TEST_RUN for a packet mix at
//! 1, 100 and 1,024 rules, next to a bare `XDP_DROP` program measured in the same run.
//!
//! The rules are built so that the mix is the expensive case: no packet matches before the
//! last rule, and half match none, so the kernel ANDs every word of the rule bit sets. The
//! figures are ratios within one run; absolute numbers move with the machine's load.
use std::time::Duration;

use anyhow::Result;
use aya::programs::Xdp;
use firewall::analysis::reference::{inbound_flow, parse_frame, Parsed};
use firewall::dataplane::monotonic_now_ns;
use firewall::dataplane::test_run::run_program;
use firewall::dataplane::Kernel;
use firewall::rules::compile::compile;
use firewall::rules::model::{Action, Direction, Proto, Rule, RuleSet};
use firewall::testing::packet::{self, Frame, L4, TCP_ACK};
use firewall_common::FlowState;

/// Runs per measurement (the kernel averages them), and measurements per figure (median).
#[path = "packet_path/memory.rs"]
mod memory;

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
            direction: Direction::In,
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
            icmp_types: None,
            comment: None,
            iface: None,
            limit: None,
            log: false,
        })
        .collect();
    rules.push(Rule {
        name: "allow-web".into(),
        direction: Direction::In,
        action: Action::Allow,
        proto: Proto::Any,
        from: Some(vec![
            "10.0.0.0/8".parse().unwrap(),
            "fd00::/8".parse().unwrap(),
        ]),
        to: None,
        ports: Some(vec![80..=80, 443..=443]),
        icmp_types: None,
        comment: None,
        iface: None,
        limit: None,
        log: false,
    });
    RuleSet::new(Action::Deny, rules)
}

fn median(mut samples: Vec<Duration>) -> f64 {
    samples.sort();
    samples[samples.len() / 2].as_nanos() as f64
}

/// Runs one frame `REPEAT` times through a program, returning the mean time per run.
type Runner<'a> = Box<dyn Fn(&[u8]) -> Result<Duration> + 'a>;
/// A program and the named frames it is measured on.
type Measured<'a> = (Runner<'a>, &'a [(&'static str, Vec<u8>)]);

fn on(kernel: &Kernel) -> Runner<'_> {
    Box::new(move |frame| Ok(kernel.test_run(frame, REPEAT)?.1))
}

/// Per (program, frames): the median over rounds of the mean ns/packet over its frames. The
/// rounds visit every program in turn, so that the machine's noise falls on all of them alike.
fn measure_in_turns(runs: &[Measured<'_>]) -> Result<Vec<f64>> {
    let mut samples = vec![Vec::new(); runs.len()];
    for _ in 0..ROUNDS {
        for ((run, frames), samples) in runs.iter().zip(&mut samples) {
            let mut total = Duration::ZERO;
            for (_, frame) in frames.iter() {
                total += run(frame)?;
            }
            samples.push(total / frames.len() as u32);
        }
    }
    Ok(samples.into_iter().map(median).collect())
}

/// Mid-connection segments to the ports of the host's flows in the benchmark: a TCP ACK from
/// `tcp_src` and a UDP datagram from `udp_src`, named `names`.
fn segments(
    names: [&'static str; 2],
    tcp_src: &str,
    udp_src: &str,
) -> Vec<(&'static str, Vec<u8>)> {
    let tcp = Frame::v4(tcp_src, "10.0.0.1", L4::Tcp { dport: 40000 }).tcp_flags(TCP_ACK);
    let udp = Frame::v6(udp_src, "fd00::1", L4::Udp { dport: 40001 });
    vec![(names[0], tcp.build()), (names[1], udp.build())]
}

fn main() -> Result<()> {
    // `FW_BENCH=sets` runs only the set figures (memory included), `FW_BENCH=memory` only
    // the memory figures, `FW_BENCH=packets` only the per-packet ones.
    let only = std::env::var("FW_BENCH");
    match only.as_deref() {
        Ok("sets") => return sets(),
        Ok("memory") => return in_scratch_dir(|dir| memory::report(dir, mixed_list)),
        _ => {}
    }
    let frames = mix();
    let mut floor_ebpf = aya::Ebpf::load(FLOOR_OBJECT)?;
    let floor: &mut Xdp = floor_ebpf.program_mut("floor").unwrap().try_into()?;
    floor.load()?;
    let run_floor = |frame: &[u8]| -> Result<Duration> { Ok(run_program(floor, frame, REPEAT)?.1) };

    // This build's object, and with `FW_BENCH_BASELINE=OBJECT` another build's (with the
    // same maps, e.g. the previous commit's), measured in the same turns.
    let baseline = match std::env::var_os("FW_BENCH_BASELINE") {
        Some(path) => Some(std::fs::read(&path)?),
        None => None,
    };
    let mut builds = vec![("", Build::load(Kernel::load)?)];
    if let Some(object) = &baseline {
        builds.push(("baseline: ", Build::load(|| Kernel::load_object(object))?));
    }
    println!(
        "packet mix: {}",
        frames
            .iter()
            .map(|(name, _)| *name)
            .collect::<Vec<_>>()
            .join(", ")
    );
    let rows = Rows::new();
    let mut runs: Vec<Measured<'_>> = vec![(Box::new(run_floor), &frames)];
    for (_, build) in &builds {
        let kernels = &build.kernels;
        runs.push((on(&kernels[0]), &frames));
        runs.push((on(&kernels[1]), &frames));
        runs.push((on(&kernels[2]), &frames));
        runs.push((on(&kernels[2]), &rows.replies));
        runs.push((on(&kernels[2]), &rows.misses));
        runs.push((on(&kernels[2]), &rows.syns));
        runs.push((on(&build.banned), &frames));
    }
    let ns = measure_in_turns(&runs)?;
    let floor_ns = ns[0];
    println!(
        "{:<34} {:>10} {:>14} {:>14}",
        "program", "ns/packet", "vs 1 rule", "vs floor"
    );
    println!("{:<34} {:>10.1}", "bare XDP_DROP (floor)", floor_ns);
    for ((label, _), ns) in builds.iter().zip(ns[1..].chunks(7)) {
        for (count, rules_ns) in [1, 100, 1024].iter().zip(&ns[..3]) {
            println!(
                "{:<34} {:>10.1} {:>13.2}x {:>+13.1}",
                format!("{label}firewall, {count} rules"),
                rules_ns,
                rules_ns / ns[0],
                rules_ns - floor_ns
            );
        }
        for (name, state_ns) in [
            "state hit (replies)",
            "state miss (new)",
            "SYN (lookup skipped)",
            "1,024 rules + 101k bans",
        ]
        .iter()
        .zip(&ns[3..])
        {
            println!(
                "{:<34} {:>10.1} {:>14} {:>+13.1}",
                format!("{label}{name}"),
                state_ns,
                "",
                state_ns - floor_ns
            );
        }
    }
    if builds.len() == 2 {
        println!("this build / baseline, row by row (same run):");
        for (row, (new, old)) in ns[1..8].iter().zip(&ns[8..15]).enumerate() {
            println!("  row {}: {:.2}x", row + 1, new / old);
        }
    }
    if only.as_deref() == Ok("packets") {
        return Ok(());
    }
    sets()?;
    Ok(())
}

/// One build's programs: its object loaded with 1, 100 and 1,024 rules (the last with the
/// flows of [`Rows::replies`]), and with 1,024 rules and the bans of [`ban_list`].
struct Build {
    kernels: Vec<Kernel>,
    banned: Kernel,
}

impl Build {
    fn load(load: impl Fn() -> Result<Kernel>) -> Result<Build> {
        let mut kernels = [1usize, 100, 1024]
            .map(|count| -> Result<Kernel> {
                let mut kernel = load()?;
                kernel.apply(&compile(&rule_set(count))?)?;
                Ok(kernel)
            })
            .into_iter()
            .collect::<Result<Vec<_>>>()?;
        let table: Vec<_> = Rows::new()
            .replies
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
        kernels[2].set_flows(&table)?;
        // The 1,024 rules again, with 100,000 host bans and 1,000 prefix bans that the mix's
        // sources are not in: what every packet pays for the bans' lookups.
        let mut banned = load()?;
        banned.apply(&compile(&rule_set(1024))?)?;
        let bans = ban_list();
        let timer = std::time::Instant::now();
        banned.ban(&bans, 0)?;
        println!(
            "{} bans written in {:.0} ms",
            bans.len(),
            timer.elapsed().as_secs_f64() * 1000.0
        );
        Ok(Build { kernels, banned })
    }
}

/// Connection state's frames, with the 1,024-rule set in force: replies that hit the flow map
/// (and pass before the rules), segments of unknown flows that miss it, and SYNs, which skip
/// it.
struct Rows {
    replies: Vec<(&'static str, Vec<u8>)>,
    misses: Vec<(&'static str, Vec<u8>)>,
    syns: Vec<(&'static str, Vec<u8>)>,
}

impl Rows {
    fn new() -> Rows {
        Rows {
            replies: segments(
                ["tcp4 reply", "udp6 reply"],
                "198.51.100.7",
                "2001:db8:ffff::9",
            ),
            misses: segments(
                ["tcp4 unknown ack", "udp6 unknown"],
                "198.51.100.8",
                "2001:db8:ffff::8",
            ),
            syns: vec![(
                "tcp4 syn",
                Frame::v4("198.51.100.7", "10.0.0.1", L4::Tcp { dport: 40000 }).build(),
            )],
        }
    }
}

/// 100,000 host bans (IPv4 and IPv6 alternately) and 1,000 IPv4 /24 prefix bans, away from
/// the mix's sources.
fn ban_list() -> Vec<ipnet::IpNet> {
    let hosts = (0..100_000u32).map(|i| {
        let addr: std::net::IpAddr = if i % 2 == 0 {
            std::net::Ipv4Addr::from(0x6400_0000 + i).into()
        } else {
            std::net::Ipv6Addr::from(0x2001_0db8_00aa_0000_0000_0000_0000_0000u128 + u128::from(i))
                .into()
        };
        ipnet::IpNet::from(addr)
    });
    let prefixes = (0..1_000u32).map(|i| {
        let network = std::net::Ipv4Addr::from(0x6500_0000 + (i << 8));
        ipnet::IpNet::V4(ipnet::Ipv4Net::new(network, 24).unwrap())
    });
    hosts.chain(prefixes).collect()
}

/// Set loading: a 100,000-entry IPv4 set file applied from cold and as a reload, against
/// `nft -f` loading the same list into an interval set (in a scratch network namespace, so the
/// host's own ruleset is never touched); then ns/packet as the set grows to a million.
fn sets() -> Result<()> {
    in_scratch_dir(|dir| {
        sets_in(dir)?;
        memory::report(dir, mixed_list)
    })
}

/// Runs `f` with a scratch directory, removed after.
fn in_scratch_dir(f: impl FnOnce(&std::path::Path) -> Result<()>) -> Result<()> {
    let dir = std::env::temp_dir().join(format!("fw-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let result = f(&dir);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// `count` IPv4 hosts two apart, so that merging cannot shrink the list.
fn host_list(count: u32) -> Vec<String> {
    (0..count)
        .map(|i| std::net::Ipv4Addr::from(0x0100_0000 + 2 * i).to_string())
        .collect()
}

fn rules_with_set(port: u16) -> String {
    format!(
        "[defaults]\npolicy = \"allow\"\n\n[sets.block]\nfiles = [\"block.txt\"]\n\n\
         [[rules]]\naction = \"deny\"\nfrom = [\"@block\"]\n\n\
         [[rules]]\naction = \"deny\"\nproto = \"tcp\"\nports = [{port}]\n"
    )
}

fn sets_in(dir: &std::path::Path) -> Result<()> {
    use std::process::Command;
    use std::time::Instant;

    let hosts = host_list(100_000);
    std::fs::write(dir.join("block.txt"), hosts.join("\n"))?;
    let rule_file = dir.join("rules.toml");
    std::fs::write(&rule_file, rules_with_set(23))?;

    let nft_file = dir.join("set.nft");
    std::fs::write(
        &nft_file,
        format!(
            "table inet fwbench {{\n  set block {{\n    type ipv4_addr\n    flags interval\n    elements = {{ {} }}\n  }}\n}}\n",
            hosts.join(", ")
        ),
    )?;
    let nft_load = |round: usize| -> Result<Duration> {
        let ns = format!("fwbench{}-{round}", std::process::id());
        let status = Command::new("ip").args(["netns", "add", &ns]).status()?;
        anyhow::ensure!(status.success(), "ip netns add failed");
        let started = Instant::now();
        let output = Command::new("ip")
            .args(["netns", "exec", &ns, "nft", "-f"])
            .arg(&nft_file)
            .output();
        let elapsed = started.elapsed();
        let _ = Command::new("ip").args(["netns", "del", &ns]).status();
        let output = output?;
        anyhow::ensure!(
            output.status.success(),
            "nft -f failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        Ok(elapsed)
    };

    // Cold loads, ours and nft's in turns; medians of each step.
    let mut steps: [Vec<Duration>; 5] = Default::default();
    let mut kernel = None;
    for round in 0..5 {
        let started = Instant::now();
        let mut fresh = Kernel::load()?;
        let loaded = started.elapsed();
        let set = firewall::rules::config::load_rules(&rule_file)?;
        let parsed = started.elapsed();
        let compiled = compile(&set)?;
        let compiled_at = started.elapsed();
        fresh.apply(&compiled)?;
        let applied = started.elapsed();
        kernel = Some(fresh);
        for (step, time) in steps.iter_mut().zip([
            loaded,
            parsed - loaded,
            compiled_at - parsed,
            applied - compiled_at,
            nft_load(round)?,
        ]) {
            step.push(time);
        }
    }
    let mut kernel = kernel.expect("five rounds ran");
    let [load, parse, compile_ms, apply, nft] = steps.map(median).map(|ns| ns / 1e6);
    println!();
    println!(
        "{:<44} {:>10}",
        "loading a 100,000-entry IPv4 set (median of 5)", "ms"
    );
    println!(
        "{:<44} {:>10.0}",
        "firewall: parse, compile, apply",
        parse + compile_ms + apply
    );
    println!(
        "{:<44} {:>10}",
        "  of which parse / compile / apply",
        format!("{parse:.0}/{compile_ms:.0}/{apply:.0}")
    );
    println!(
        "{:<44} {:>10.0}",
        "firewall: program load (once per start)", load
    );
    println!("{:<44} {:>10.0}", "nft -f, interval set", nft);
    println!(
        "{:<44} {:>10.2}",
        "firewall parse+compile+apply / nft",
        (parse + compile_ms + apply) / nft
    );
    println!(
        "{:<44} {:>10.2}",
        "firewall incl. program load / nft",
        (load + parse + compile_ms + apply) / nft
    );

    // Reloads that change one rule's port. The first fills the second generation (it held
    // nothing); from then on each generation is diffed against what it held, so the set is
    // not rewritten.
    for (round, port) in [(1, 24), (2, 25)] {
        std::fs::write(&rule_file, rules_with_set(port))?;
        let started = Instant::now();
        let set = firewall::rules::config::load_rules(&rule_file)?;
        let updates = kernel.apply(&compile(&set)?)?;
        let reload = started.elapsed();
        println!(
            "{:<44} {:>10.0}",
            format!("firewall: reload {round}, one port changed ({updates} updates)"),
            reload.as_secs_f64() * 1e3
        );
    }

    for (kind, list) in [
        ("hosts", host_list as fn(u32) -> Vec<String>),
        ("mixed prefixes", mixed_list),
    ] {
        println!();
        println!(
            "{:<44} {:>10} {:>9} {:>24}",
            format!("ns/packet, set of N {kind}"),
            "ns/packet",
            "ratio",
            "exact/trie entries"
        );
        // All sizes loaded at once and measured in turns, so that the machine's noise falls on
        // every size alike.
        let mut loaded = Vec::new();
        for count in [10u32, 10_000, 100_000, 1_000_000] {
            let entries = list(count);
            std::fs::write(dir.join("block.txt"), entries.join("\n"))?;
            let set = firewall::rules::config::load_rules(&rule_file)?;
            let compiled = compile(&set)?;
            let mut kernel = Kernel::load()?;
            kernel.apply(&compiled)?;
            // A listed host and its neighbour.
            let member: std::net::Ipv4Addr = entries
                .iter()
                .find_map(|entry| entry.parse().ok())
                .expect("the list has hosts");
            let neighbour = std::net::Ipv4Addr::from(u32::from(member) ^ 1);
            let probe = [("member", member), ("neighbour", neighbour)].map(|(name, src)| {
                let frame = Frame::v4(&src.to_string(), "10.0.0.1", L4::Tcp { dport: 80 }).build();
                (name, frame)
            });
            let table = &compiled.src_v4;
            let shape = format!("{}/{}", table.exact.len(), table.trie.len());
            loaded.push((count, kernel, probe, shape));
        }
        let runs: Vec<Measured<'_>> = loaded
            .iter()
            .map(|(_, kernel, probe, _)| (on(kernel), probe.as_slice()))
            .collect();
        let ns = measure_in_turns(&runs)?;
        let mut base = None;
        for ((count, _, _, shape), ns) in loaded.iter().zip(ns) {
            let base = *base.get_or_insert(ns);
            println!(
                "{:<44} {:>10.1} {:>8.2}x {:>24}",
                format!("{count} entries"),
                ns,
                ns / base,
                shape
            );
        }
    }
    Ok(())
}

/// `count` IPv4 networks shaped like a large blocklist: mostly hosts and /24s, some /17 to
/// /23 and /25 to /30, scattered over the unicast space (some overlap and merge).
fn mixed_list(count: u32) -> Vec<String> {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    (0..count)
        .map(|_| {
            let roll = next() % 100;
            let len = match roll {
                0..=54 => 32,
                55..=84 => 24,
                85..=92 => 17 + (next() % 7) as u8,
                _ => 25 + (next() % 6) as u8,
            };
            let addr = 0x0100_0000 + (next() % 0xde00_0000) as u32;
            let net = ipnet::Ipv4Net::new(std::net::Ipv4Addr::from(addr), len)
                .expect("valid length")
                .trunc();
            if len == 32 {
                net.addr().to_string()
            } else {
                net.to_string()
            }
        })
        .collect()
}
