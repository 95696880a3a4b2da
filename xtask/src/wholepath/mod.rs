//! `cargo xtask bench --wholepath`: packets per second through the whole receive path.
//!
//! Per row, two namespaces joined by a veth pair, the row's filter on the receiving end for the
//! whole run (so rows take turns of a second, and the machine's load falls on all alike). In
//! the sending one, a four-instruction XDP program (`return bpf_redirect(sending end, 0)`) is
//! run by BPF_PROG_TEST_RUN in live-frames mode, as xdp-trafficgen does: each frame becomes a
//! real XDP frame redirected out of the sending end, so the receiving end's NAPI takes it off
//! its queue, runs its XDP program (if any) and hands what passes to the stack. One sending
//! thread per CPU, pinned, each feeding the receiving queue of its CPU. The figure is what the
//! receiving end handled, from its own counters.
//!
//! Sender and receiver share the CPUs (the receiving NAPI runs in the softirq that each batch's
//! flush raises on the sending CPU), so a figure is the rate of "generate + receive": the
//! generator's share is the same in every row, and the floor row (bare `XDP_DROP`) shows what
//! it leaves. Rows whose frames pass to a socket are measured against a bare `XDP_PASS` row
//! with frames of the same shape to a bound socket instead: the stack's share is theirs too.
mod bpf;
mod filters;
mod frames;
mod net;
mod report;

use std::net::{Ipv6Addr, SocketAddr, UdpSocket};
use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};

use filters::{Daemon, DENIED_PORT, DENY_ANY_RULE, DENY_RULE, SET_ENTRIES};
use net::{Cleanup, Counters, Topology};

const ROUNDS: usize = 10;
/// Between the two counter reads.
const INTERVAL: Duration = Duration::from_secs(1);
/// Sending before the first read, so queues and caches are in their steady state.
const WARMUP: Duration = Duration::from_millis(300);
/// Distinct flood sources (frames), sent in turn.
const FLOOD_SOURCES: usize = 64;
/// Frames per test-run call: live frames repeat one frame, so the source changes per call.
const FRAMES_PER_CALL: u32 = 4096;
/// Frames per batch: the kernel's default, NAPI's budget.
const BATCH: u32 = 64;
/// The sending side's port for the established flow.
const PEER_PORT: u16 = 40999;

// The veth pairs, one per filter on the receiving end (the index names the namespaces).
const NO_FILTER: usize = 0;
const FLOOR: usize = 1;
const XDP_FILTER: usize = 2;
const NFT: usize = 3;
const IP6TABLES: usize = 4;
const ONE_RULE: usize = 5;
const LARGE: usize = 6;
const PASS_ANCHOR: usize = 7;
/// With `--baseline`: the other build's daemons, with the same rule files.
const BASELINE_ONE_RULE: usize = 8;
const BASELINE_LARGE: usize = 9;

/// What a row's filter should do with its frames: checked on the receiving end's counters, so
/// a filter that is not in place fails the bench instead of measuring the wrong thing.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Pass,
    Drop,
}

/// The row a row's figure is divided by in the "× anchor" column: the bare program that gives
/// the same verdict to frames of the same kind at next to no cost.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Anchor {
    /// None comparable: no filter hands a flood to the stack, where no socket takes it.
    None,
    /// The bare `XDP_DROP` row: for rows that drop.
    Floor,
    /// The bare `XDP_PASS` row: for rows that pass frames up to a bound UDP socket.
    Pass,
}

/// A row's frames: all IPv6 UDP to [`DENIED_PORT`] on the receiving end.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Traffic {
    /// From [`FLOOD_SOURCES`] addresses of the large set, in turn.
    SetMembers,
    /// From [`FLOOD_SOURCES`] pseudo-random addresses outside the set and the fillers.
    RandomSources,
    /// From the peer's [`PEER_PORT`]: replies on the flow the receiving host opened.
    Established,
    /// The same frames where no flow was opened, to a socket bound to the port.
    ToBoundSocket,
}

impl Traffic {
    fn label(self) -> &'static str {
        match self {
            Traffic::SetMembers => "set members",
            Traffic::RandomSources => "random sources",
            Traffic::Established => "established",
            Traffic::ToBoundSocket => "to a bound socket",
        }
    }

    fn frames(self, pair: &Topology) -> Vec<Vec<u8>> {
        let flood = |source: fn(usize) -> Ipv6Addr| {
            (0..FLOOD_SOURCES)
                .map(|k| {
                    let sport = 40000 + k as u16;
                    frames::udp6(
                        pair.rx_mac,
                        pair.tx_mac,
                        source(k),
                        pair.rx_addr,
                        sport,
                        DENIED_PORT,
                    )
                })
                .collect()
        };
        match self {
            // Spread over the set, each from its own source port.
            Traffic::SetMembers => {
                flood(|k| filters::set_address((k * (SET_ENTRIES - 1) / FLOOD_SOURCES) as u64))
            }
            Traffic::RandomSources => flood(|k| filters::random_source(k as u64)),
            Traffic::Established | Traffic::ToBoundSocket => vec![frames::udp6(
                pair.rx_mac,
                pair.tx_mac,
                pair.tx_addr,
                pair.rx_addr,
                PEER_PORT,
                DENIED_PORT,
            )],
        }
    }
}

/// What one row is: a name, its frames, the pair it runs on, and what must become of them.
struct Spec {
    name: &'static str,
    traffic: Traffic,
    pair: usize,
    verdict: Verdict,
    anchor: Anchor,
    /// The large firewall's rule that must count this row's frames (read from its stats).
    rule: Option<&'static str>,
}

const LARGE_NAME: &str = "firewall, 1,024 rules + 1M set";
const BASELINE_LARGE_NAME: &str = "baseline, 1,024 rules + 1M set";

#[rustfmt::skip]
static SPECS: [Spec; 10] = {
    use {Anchor as A, Traffic as T, Verdict as V};
    [
        // Only the pair without a filter lets the flood through.
        spec("no filter", T::SetMembers, NO_FILTER, V::Pass, A::None, None),
        spec("bare XDP_DROP (floor)", T::SetMembers, FLOOR, V::Drop, A::Floor, None),
        spec("xdp-filter, port denied", T::SetMembers, XDP_FILTER, V::Drop, A::Floor, None),
        spec("nft netdev ingress drop", T::SetMembers, NFT, V::Drop, A::Floor, None),
        spec("ip6tables raw PREROUTING drop", T::SetMembers, IP6TABLES, V::Drop, A::Floor, None),
        spec("firewall, 1 rule", T::SetMembers, ONE_RULE, V::Drop, A::Floor, None),
        spec(LARGE_NAME, T::SetMembers, LARGE, V::Drop, A::Floor, Some(DENY_RULE)),
        spec(LARGE_NAME, T::RandomSources, LARGE, V::Drop, A::Floor, Some(DENY_ANY_RULE)),
        spec("bare XDP_PASS", T::ToBoundSocket, PASS_ANCHOR, V::Pass, A::Pass, None),
        spec(LARGE_NAME, T::Established, LARGE, V::Pass, A::Pass, None),
    ]
};

/// The rows of `--baseline`: the same firewall rows from another build, measured in the same
/// turns, so that two builds compare within one run.
#[rustfmt::skip]
static BASELINE_SPECS: [Spec; 4] = {
    use {Anchor as A, Traffic as T, Verdict as V};
    [
        spec("baseline, 1 rule", T::SetMembers, BASELINE_ONE_RULE, V::Drop, A::Floor, None),
        spec(BASELINE_LARGE_NAME, T::SetMembers, BASELINE_LARGE, V::Drop, A::Floor, Some(DENY_RULE)),
        spec(BASELINE_LARGE_NAME, T::RandomSources, BASELINE_LARGE, V::Drop, A::Floor, Some(DENY_ANY_RULE)),
        spec(BASELINE_LARGE_NAME, T::Established, BASELINE_LARGE, V::Pass, A::Pass, None),
    ]
};

const fn spec(
    name: &'static str,
    traffic: Traffic,
    pair: usize,
    verdict: Verdict,
    anchor: Anchor,
    rule: Option<&'static str>,
) -> Spec {
    Spec {
        name,
        traffic,
        pair,
        verdict,
        anchor,
        rule,
    }
}

struct Row {
    spec: &'static Spec,
    generator: Generator,
    samples: Vec<Sample>,
    /// Nanoseconds per frame inside the receiving end's XDP program, from the kernel's
    /// run-time statistics in rounds of their own; None where no XDP program runs.
    program_ns: Option<f64>,
}

struct Sample {
    mpps: f64,
    counters: Counters,
    /// Packets the row's firewall rule counted from just before the senders started to just
    /// after they stopped (so at least those of the measured interval); 0 without a rule.
    rule_packets: u64,
}

/// Runs the bench with the daemon at `firewall` (and the rows of `baseline`, another build's
/// daemon, beside its rows); cleans up on every way out.
pub fn run(firewall: &Path, baseline: Option<&Path>) -> Result<()> {
    struct CleanUpOnExit;
    impl Drop for CleanUpOnExit {
        fn drop(&mut self) {
            net::cleanup_all();
        }
    }
    let _clean_up = CleanUpOnExit;
    net::clean_up_on_signals();
    bench(firewall, baseline)
}

fn bench(firewall: &Path, baseline: Option<&Path>) -> Result<()> {
    let cpus = thread::available_parallelism()?.get();
    let dir = std::env::temp_dir().join(format!("fwbench-wholepath-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let removed = dir.clone();
    let _dir = Cleanup::register("the rule files", move || {
        let _ = std::fs::remove_dir_all(&removed);
    });
    // One veth pair per filter, in place for the whole run, so that rows can take short
    // turns: the machine's load then falls on all rows alike.
    let pair_count = if baseline.is_some() {
        BASELINE_LARGE + 1
    } else {
        PASS_ANCHOR + 1
    };
    let pairs = (0..pair_count)
        .map(|index| Topology::new(index, cpus))
        .collect::<Result<Vec<_>>>()?;
    let timer = Instant::now();
    let (one_rule, large) = filters::write_rule_files(&dir, pairs[LARGE].tx_addr)?;
    eprintln!(
        "wholepath: rule files written in {:.1} s",
        timer.elapsed().as_secs_f64()
    );

    let floor = Arc::new(bpf::load_xdp("wholepath_floor", &bpf::drop_program())?);
    let _floor = filters::attach_bare(&pairs[FLOOR], &floor)?;
    let pass = Arc::new(bpf::load_xdp("wholepath_pass", &bpf::pass_program())?);
    let _pass = filters::attach_bare(&pairs[PASS_ANCHOR], &pass)?;
    let _xdp_filter = filters::load_xdp_filter(&pairs[XDP_FILTER])?;
    let _nft = filters::load_nft(&pairs[NFT], &dir)?;
    let _ip6tables = filters::load_ip6tables(&pairs[IP6TABLES])?;
    // Each daemon with the pair it filters and the binary it runs.
    let mut daemons = vec![
        (
            ONE_RULE,
            firewall,
            Daemon::start(firewall, "one", &pairs[ONE_RULE], &one_rule, &dir)?,
        ),
        (
            LARGE,
            firewall,
            Daemon::start(firewall, "large", &pairs[LARGE], &large, &dir)?,
        ),
    ];
    if let Some(baseline) = baseline {
        for (pair, label, rules) in [
            (BASELINE_ONE_RULE, "baseline-one", &one_rule),
            (BASELINE_LARGE, "baseline-large", &large),
        ] {
            let daemon = Daemon::start(baseline, label, &pairs[pair], rules, &dir)?;
            daemons.push((pair, baseline, daemon));
        }
    }
    let sizes = [
        (
            "bare XDP_DROP",
            filters::attached_program_size(&pairs[FLOOR])?,
        ),
        (
            "firewall",
            filters::attached_program_size(&pairs[ONE_RULE])?,
        ),
    ];
    // The host behind each large firewall opens the flow whose replies the established rows
    // send (below); the XDP_PASS row's frames go to a socket bound alike, but without a flow.
    let _bound = bind_in_rx(&pairs[PASS_ANCHOR], DENIED_PORT)?;

    let baseline_specs: &'static [Spec] = match baseline {
        Some(_) => &BASELINE_SPECS,
        None => &[],
    };
    let mut rows = SPECS
        .iter()
        .chain(baseline_specs)
        .map(|spec| {
            let pair = &pairs[spec.pair];
            let frames = Arc::new(spec.traffic.frames(pair));
            Ok(Row {
                spec,
                generator: Generator::new(pair, cpus, frames)?,
                samples: Vec::new(),
                program_ns: None,
            })
        })
        .collect::<Result<Vec<Row>>>()?;

    let flows: Vec<(usize, UdpSocket)> = [LARGE, BASELINE_LARGE]
        .into_iter()
        .filter(|&pair| pair < pairs.len())
        .map(|pair| Ok((pair, open_flow(&pairs[pair])?)))
        .collect::<Result<_>>()?;
    // Keeps a row's flow fresh (its idle timeout is 60 s): a datagram seen by the firewall's tc
    // egress program on its way out.
    let refresh_flow = |spec: &Spec| -> Result<()> {
        if spec.traffic == Traffic::Established {
            let (_, flow) = flows.iter().find(|(pair, _)| *pair == spec.pair).unwrap();
            flow.send_to(b"again", (pairs[spec.pair].tx_addr, PEER_PORT))?;
            thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    };

    for round in 0..ROUNDS {
        let timer = Instant::now();
        for row in &mut rows {
            let spec = row.spec;
            let pair = &pairs[spec.pair];
            refresh_flow(spec)?;
            let rule_packets = || match spec.rule {
                Some(rule) => {
                    let (_, exe, daemon) = daemons.iter().find(|(p, ..)| *p == spec.pair).unwrap();
                    daemon.rule_packets(exe, rule)
                }
                None => Ok(0),
            };
            let before = rule_packets()?;
            let mut sample = row.generator.measure(pair)?;
            sample.rule_packets = rule_packets()? - before;
            row.samples.push(sample);
        }
        eprintln!(
            "wholepath: round {}/{ROUNDS} in {:.0} s",
            round + 1,
            timer.elapsed().as_secs_f64()
        );
    }
    program_rounds(&mut rows, &pairs, &refresh_flow)?;
    let starts = [daemons[0].2.start_seconds, daemons[1].2.start_seconds];
    report::print(&rows, &sizes, &starts, cpus)
}

/// Rounds with the kernel's run-time statistics on, of the rows with an XDP program on their
/// receiving end (the statistics cost two clock reads per run, so the rounds that give the
/// rates run without them): nanoseconds per frame inside the program, median of the rounds.
fn program_rounds(
    rows: &mut [Row],
    pairs: &[Topology],
    refresh_flow: &dyn Fn(&Spec) -> Result<()>,
) -> Result<()> {
    const STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";
    const PROGRAM_ROUNDS: usize = 3;
    let before = std::fs::read_to_string(STATS)?;
    let _restore = Cleanup::register("kernel.bpf_stats_enabled", move || {
        let _ = std::fs::write(STATS, &before);
    });
    std::fs::write(STATS, "1").context("enabling kernel.bpf_stats_enabled")?;
    let mut samples = vec![Vec::new(); rows.len()];
    for _ in 0..PROGRAM_ROUNDS {
        for (row, samples) in rows.iter().zip(&mut samples) {
            let pair = &pairs[row.spec.pair];
            let Ok(program) = filters::attached_program_id(pair) else {
                continue;
            };
            refresh_flow(row.spec)?;
            let (time_before, runs_before) = filters::program_run_time(program)?;
            row.generator.measure(pair)?;
            let (time_after, runs_after) = filters::program_run_time(program)?;
            let runs = runs_after.saturating_sub(runs_before);
            if runs > 0 {
                samples.push(time_after.saturating_sub(time_before) as f64 / runs as f64);
            }
        }
    }
    for (row, mut samples) in rows.iter_mut().zip(samples) {
        if !samples.is_empty() {
            samples.sort_by(f64::total_cmp);
            row.program_ns = Some(samples[samples.len() / 2]);
        }
    }
    Ok(())
}

/// A UDP socket bound to `port` on the receiving end's address, made in its namespace.
fn bind_in_rx(topology: &Topology, port: u16) -> Result<UdpSocket> {
    let (ns, local) = (
        topology.rx_ns.clone(),
        SocketAddr::new(topology.rx_addr.into(), port),
    );
    thread::spawn(move || -> Result<UdpSocket> {
        net::enter(&ns)?;
        Ok(UdpSocket::bind(local)?)
    })
    .join()
    .expect("socket thread")
}

/// A socket in the receiving namespace bound to the denied port, which sends one datagram to
/// the peer: the flow whose replies the established row sends.
fn open_flow(topology: &Topology) -> Result<UdpSocket> {
    let socket = bind_in_rx(topology, DENIED_PORT)?;
    let peer = SocketAddr::new(topology.tx_addr.into(), PEER_PORT);
    socket
        .send_to(b"open", peer)
        .context("sending the flow's first datagram")?;
    // Long enough for neighbour discovery and the datagram's way out through tc egress.
    thread::sleep(Duration::from_millis(300));
    Ok(socket)
}

/// The sending side of one pair: the redirect program for its sending end and the frames.
struct Generator {
    program: Arc<OwnedFd>,
    frames: Arc<Vec<Vec<u8>>>,
    cpus: usize,
}

impl Generator {
    fn new(pair: &Topology, cpus: usize, frames: Arc<Vec<Vec<u8>>>) -> Result<Generator> {
        let program = bpf::load_xdp("wholepath_gen", &bpf::redirect_program(pair.tx_ifindex))?;
        Ok(Generator {
            program: Arc::new(program),
            frames,
            cpus,
        })
    }

    /// Sends the frames in turn from every CPU into `pair` and returns what its receiving
    /// end handled over [`INTERVAL`].
    fn measure(&self, pair: &Topology) -> Result<Sample> {
        let stop = Arc::new(AtomicBool::new(false));
        let senders: Vec<_> = (0..self.cpus)
            .map(|cpu| {
                let (program, frames, stop) =
                    (self.program.clone(), self.frames.clone(), stop.clone());
                let (ns, ifindex, cpus) = (pair.tx_ns.clone(), pair.tx_ifindex, self.cpus);
                thread::spawn(move || -> Result<()> {
                    net::pin_to_cpu(cpu)?;
                    // The live frames' ingress device is looked up in the caller's namespace.
                    net::enter(&ns)?;
                    // Each CPU starts at its own frame, so they send different sources at once.
                    let mut next = cpu * frames.len() / cpus;
                    while !stop.load(Ordering::Relaxed) {
                        let frame = &frames[next % frames.len()];
                        bpf::test_run(&program, frame, ifindex, FRAMES_PER_CALL, BATCH, true)
                            .context("live-frames test run")?;
                        next += 1;
                    }
                    Ok(())
                })
            })
            .collect();
        let measured = (|| -> Result<Sample> {
            thread::sleep(WARMUP);
            let (start, before) = (Instant::now(), pair.rx_counters()?);
            thread::sleep(INTERVAL);
            let (end, after) = (Instant::now(), pair.rx_counters()?);
            let counters = after.since(&before);
            let seconds = (end - start).as_secs_f64();
            Ok(Sample {
                mpps: counters.napi_frames as f64 / seconds / 1e6,
                counters,
                rule_packets: 0,
            })
        })();
        stop.store(true, Ordering::Relaxed);
        for sender in senders {
            sender.join().expect("sender thread")?;
        }
        measured
    }
}
