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
//! it leaves.
mod bpf;
mod filters;
mod frames;
mod net;

use std::net::{SocketAddr, UdpSocket};
use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};

use filters::{Daemon, DENIED_PORT, SET_ENTRIES};
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

/// What a row's filter should do with its frames: checked on the receiving end's counters, so
/// a filter that is not in place fails the bench instead of measuring the wrong thing.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Pass,
    Drop,
}

struct Row {
    name: &'static str,
    verdict: Verdict,
    frames: &'static str,
    generator: Generator,
    samples: Vec<Sample>,
}

struct Sample {
    mpps: f64,
    counters: Counters,
}

/// Runs the bench with the daemon at `firewall`; cleans up on every way out.
pub fn run(firewall: &Path) -> Result<()> {
    struct CleanUpOnExit;
    impl Drop for CleanUpOnExit {
        fn drop(&mut self) {
            net::cleanup_all();
        }
    }
    let _clean_up = CleanUpOnExit;
    net::clean_up_on_signals();
    bench(firewall)
}

fn bench(firewall: &Path) -> Result<()> {
    let cpus = thread::available_parallelism()?.get();
    let dir = std::env::temp_dir().join(format!("fwbench-wholepath-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let removed = dir.clone();
    let _dir = Cleanup::register("the rule files", move || {
        let _ = std::fs::remove_dir_all(&removed);
    });
    // One veth pair per row, its filter in place for the whole run, so that rows can take
    // short turns: the machine's load then falls on all rows alike.
    let names = [
        "no filter",
        "bare XDP_DROP (floor)",
        "xdp-filter, port denied",
        "nft netdev ingress drop",
        "ip6tables raw PREROUTING drop",
        "firewall, 1 rule",
        "firewall, 1,024 rules + 1M set",
    ];
    let pairs = (0..names.len())
        .map(|index| Topology::new(index, cpus))
        .collect::<Result<Vec<_>>>()?;
    let timer = Instant::now();
    let (one_rule, large) = filters::write_rule_files(&dir, pairs[6].tx_addr)?;
    eprintln!(
        "wholepath: rule files written in {:.1} s",
        timer.elapsed().as_secs_f64()
    );

    let floor = Arc::new(bpf::load_xdp("wholepath_floor", &bpf::drop_program())?);
    let _floor = filters::attach_floor(&pairs[1], &floor)?;
    let _xdp_filter = filters::load_xdp_filter(&pairs[2])?;
    let _nft = filters::load_nft(&pairs[3], &dir)?;
    let _ip6tables = filters::load_ip6tables(&pairs[4])?;
    let small = Daemon::start(firewall, &pairs[5], &one_rule, &dir)?;
    let large_daemon = Daemon::start(firewall, &pairs[6], &large, &dir)?;
    let sizes = [
        ("bare XDP_DROP", filters::attached_program_size(&pairs[1])?),
        ("firewall", filters::attached_program_size(&pairs[5])?),
    ];
    // The host behind the large firewall opens the flow whose replies the last row sends.
    let flow = open_flow(&pairs[6])?;

    let mut rows = names
        .iter()
        .zip(&pairs)
        .map(|(&name, pair)| {
            Ok(Row {
                name,
                // Only the pair without a filter lets the flood through.
                verdict: if std::ptr::eq(pair, &pairs[0]) {
                    Verdict::Pass
                } else {
                    Verdict::Drop
                },
                frames: "flood",
                generator: Generator::new(pair, cpus, Arc::new(flood_frames(pair)))?,
                samples: Vec::new(),
            })
        })
        .collect::<Result<Vec<Row>>>()?;
    let replies = vec![frames::udp6(
        pairs[6].rx_mac,
        pairs[6].tx_mac,
        pairs[6].tx_addr,
        pairs[6].rx_addr,
        PEER_PORT,
        DENIED_PORT,
    )];
    rows.push(Row {
        name: names[6],
        verdict: Verdict::Pass,
        frames: "established",
        generator: Generator::new(&pairs[6], cpus, Arc::new(replies))?,
        samples: Vec::new(),
    });

    for round in 0..ROUNDS {
        let timer = Instant::now();
        for (row, pair) in rows.iter_mut().zip(pairs.iter().chain([&pairs[6]])) {
            if row.frames == "established" {
                // Keeps the flow fresh (its idle timeout is 60 s): a datagram seen by the
                // firewall's tc egress program on its way out.
                flow.send_to(b"again", (pair.tx_addr, PEER_PORT))?;
                thread::sleep(Duration::from_millis(20));
            }
            row.samples.push(row.generator.measure(pair)?);
        }
        eprintln!(
            "wholepath: round {}/{ROUNDS} in {:.0} s",
            round + 1,
            timer.elapsed().as_secs_f64()
        );
    }
    let starts = [small.start_seconds, large_daemon.start_seconds];
    report(&rows, &sizes, &starts, cpus)
}

/// UDP to the denied port from [`FLOOD_SOURCES`] addresses of the large set (so the
/// 1,024-rule firewall drops them by the set rule), each from its own source port.
fn flood_frames(topology: &Topology) -> Vec<Vec<u8>> {
    (0..FLOOD_SOURCES)
        .map(|k| {
            let index = (k * (SET_ENTRIES - 1) / FLOOD_SOURCES) as u64;
            frames::udp6(
                topology.rx_mac,
                topology.tx_mac,
                filters::set_address(index),
                topology.rx_addr,
                40000 + k as u16,
                DENIED_PORT,
            )
        })
        .collect()
}

/// A socket in the receiving namespace bound to the denied port, which sends one datagram to
/// the peer: the flow whose replies the established row sends.
fn open_flow(topology: &Topology) -> Result<UdpSocket> {
    let (ns, local) = (
        topology.rx_ns.clone(),
        SocketAddr::new(topology.rx_addr.into(), DENIED_PORT),
    );
    let socket = thread::spawn(move || -> Result<UdpSocket> {
        net::enter(&ns)?;
        Ok(UdpSocket::bind(local)?)
    })
    .join()
    .expect("socket thread")?;
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
            })
        })();
        stop.store(true, Ordering::Relaxed);
        for sender in senders {
            sender.join().expect("sender thread")?;
        }
        measured
    }
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn report(
    rows: &[Row],
    sizes: &[(&str, (u64, u64))],
    daemon_starts: &[f64; 2],
    cpus: usize,
) -> Result<()> {
    let kernel = crate::setup::output("uname", &["-r"])?;
    println!(
        "\nwhole path: kernel {}, {cpus} CPUs (one pinned sender each), {ROUNDS} rounds of {:.0} s \
         per row in turns, medians",
        kernel.trim(),
        INTERVAL.as_secs_f64()
    );
    println!(
        "flood: IPv6 UDP to port {DENIED_PORT} from {FLOOD_SOURCES} source addresses of the \
         set, one per test-run call of {FRAMES_PER_CALL} live frames, in turn (round-robin); \
         established: replies from the peer to the host's own UDP flow"
    );
    println!(
        "1,024 rules: 1,023 fillers + a deny rule from a set of {SET_ENTRIES} IPv6 hosts \
         (1,000,000 source entries, the firewall's maximum)\n"
    );
    let medians: Vec<f64> = rows
        .iter()
        .map(|row| median(&mut row.samples.iter().map(|s| s.mpps).collect::<Vec<_>>()))
        .collect();
    let (floor, xdp_filter) = (medians[1], medians[2]);
    println!(
        "| row | frames | Mpps | min–max | × floor | × xdp-filter | XDP drops | reached UDP | queue full |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    let mut wrong = Vec::new();
    for (row, median) in rows.iter().zip(&medians) {
        let min = row
            .samples
            .iter()
            .map(|s| s.mpps)
            .fold(f64::INFINITY, f64::min);
        let max = row.samples.iter().map(|s| s.mpps).fold(0.0, f64::max);
        let total =
            |f: fn(&Counters) -> u64| row.samples.iter().map(|s| f(&s.counters)).sum::<u64>();
        let frames = total(|c| c.napi_frames).max(1) as f64;
        let dropped = total(|c| c.xdp_drops) as f64 / frames * 100.0;
        let reached = total(|c| c.reached_udp) as f64 / frames * 100.0;
        let queue_full = total(|c| c.queue_full) as f64 / frames * 100.0;
        println!(
            "| {} | {} | {median:.2} | {min:.2}–{max:.2} | {:.2} | {:.2} | {dropped:.0} % | {reached:.0} % | {queue_full:.0} % |",
            row.name,
            row.frames,
            median / floor,
            median / xdp_filter,
        );
        let right = match row.verdict {
            Verdict::Pass => reached >= 95.0,
            Verdict::Drop => reached <= 1.0,
        };
        if !right {
            wrong.push(row.name);
        }
    }
    println!(
        "\nMpps: frames the receiving veth's NAPI took off its queues (ethtool -S \
         rx_queue_N_xdp_packets), whatever their fate; XDP drops: rx_queue_N_xdp_drops; \
         reached UDP: Udp6InDatagrams + Udp6NoPorts + Udp6InErrors of the receiving namespace \
         (read just after the NAPI counters, so a few % either way); \
         queue full: frames the sending end could not queue (its tx_queue_N_xdp_xmit_errors), \
         relative to those handled"
    );
    for (name, (insns, jited)) in sizes {
        println!("{name}: {insns} instructions after the verifier, {jited} bytes JIT-compiled");
    }
    for (label, seconds) in ["1 rule", "1,024 rules + set"].iter().zip(daemon_starts) {
        println!("firewall start to filtering, {label}: {seconds:.1} s");
    }
    if !wrong.is_empty() {
        bail!(
            "these rows' frames did not meet the expected verdict (filter not in force?): {}",
            wrong.join(", ")
        );
    }
    Ok(())
}
