//! The bench's two namespaces and veth pair, commands and threads inside them, the receiving
//! end's counters, and the cleanup that runs on every way out (return, error, panic, Ctrl-C).

use std::collections::BTreeMap;
use std::fs::File;
use std::net::Ipv6Addr;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{bail, Context as _, Result};

use super::frames::Mac;
use crate::setup::output;

type Action = Box<dyn FnOnce() + Send>;

/// What must be undone, by registration number; run newest first.
static CLEANUP: Mutex<BTreeMap<u64, (String, Action)>> = Mutex::new(BTreeMap::new());
static NEXT_CLEANUP: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Undoes its action when dropped, or at [`cleanup_all`], whichever comes first.
pub struct Cleanup(u64);

impl Cleanup {
    pub fn register(what: impl Into<String>, action: impl FnOnce() + Send + 'static) -> Cleanup {
        let id = NEXT_CLEANUP.fetch_add(1, Ordering::SeqCst);
        CLEANUP
            .lock()
            .unwrap()
            .insert(id, (what.into(), Box::new(action)));
        Cleanup(id)
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        // Taken out before it runs: the lock is never held across an action.
        let entry = CLEANUP.lock().unwrap().remove(&self.0);
        if let Some((_, action)) = entry {
            action();
        }
    }
}

/// Runs every action still registered, newest first.
pub fn cleanup_all() {
    loop {
        let entry = CLEANUP.lock().unwrap().pop_last();
        let Some((_, (what, action))) = entry else {
            return;
        };
        eprintln!("wholepath: cleaning up {what}");
        action();
    }
}

extern "C" fn on_signal(_: libc::c_int) {
    // Only an atomic store: anything more is not async-signal-safe.
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// On SIGINT, SIGTERM or SIGHUP: clean up and exit 130. A watcher thread does the work, since
/// a signal handler may do next to nothing. Handlers (unlike a blocked mask) are not inherited
/// across exec, so the daemon and tools started later keep their own signal behaviour.
pub fn clean_up_on_signals() {
    for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: the handler only stores to an atomic.
        unsafe { libc::signal(signal, on_signal as *const () as libc::sighandler_t) };
    }
    std::thread::spawn(|| loop {
        if INTERRUPTED.load(Ordering::SeqCst) {
            eprintln!("wholepath: interrupted");
            cleanup_all();
            std::process::exit(130);
        }
        std::thread::sleep(Duration::from_millis(50));
    });
}

/// A sending namespace and a receiving one, joined by a veth pair. Each row of the bench has
/// its own, with its filter in place for the whole run.
pub struct Topology {
    pub tx_ns: String,
    pub rx_ns: String,
    pub tx_if: &'static str,
    pub rx_if: &'static str,
    pub tx_mac: Mac,
    pub rx_mac: Mac,
    pub tx_addr: Ipv6Addr,
    pub rx_addr: Ipv6Addr,
    /// The sending end's ifindex in its namespace: the redirect target and the live frames'
    /// ingress device.
    pub tx_ifindex: u32,
    _cleanup: Cleanup,
}

impl Topology {
    /// `queues` rx/tx queues on each end: veth hands a frame to the peer's queue of the
    /// sending CPU, so each sending thread feeds its own NAPI instance.
    pub fn new(index: usize, queues: usize) -> Result<Topology> {
        let id = std::process::id();
        let tx_ns = format!("fwbench-{id}-{index}-tx");
        let rx_ns = format!("fwbench-{id}-{index}-rx");
        let names = [tx_ns.clone(), rx_ns.clone()];
        let cleanup = Cleanup::register(format!("namespaces {tx_ns}, {rx_ns}"), move || {
            // Deleting a namespace deletes its end of the veth pair, and so the pair, and
            // everything attached to or configured in it.
            for ns in &names {
                let _ = output("ip", &["netns", "del", ns]);
            }
        });
        let topology = Topology {
            tx_ns,
            rx_ns,
            tx_if: "fwbtx",
            rx_if: "fwbrx",
            tx_mac: [0x02, 0, 0, 0, 0xb0, 0x01],
            rx_mac: [0x02, 0, 0, 0, 0xb0, 0x02],
            tx_addr: "fd00:b0::1".parse().unwrap(),
            rx_addr: "fd00:b0::2".parse().unwrap(),
            tx_ifindex: 0,
            _cleanup: cleanup,
        };
        topology.build(queues)
    }

    fn build(mut self, queues: usize) -> Result<Topology> {
        let queues = queues.to_string();
        let (tx, rx) = (self.tx_ns.clone(), self.rx_ns.clone());
        output("ip", &["netns", "add", &tx])?;
        output("ip", &["netns", "add", &rx])?;
        let mac = |m: Mac| {
            m.iter()
                .map(|b| format!("{b:02x}"))
                .collect::<Vec<_>>()
                .join(":")
        };
        #[rustfmt::skip]
        output("ip", &[
            "link", "add", self.tx_if, "netns", &tx, "address", &mac(self.tx_mac),
            "numtxqueues", &queues, "numrxqueues", &queues,
            "type", "veth", "peer", "name", self.rx_if, "netns", &rx, "address", &mac(self.rx_mac),
            "numtxqueues", &queues, "numrxqueues", &queues,
        ])?;
        for (ns, iface, addr) in [
            (&tx, self.tx_if, self.tx_addr),
            (&rx, self.rx_if, self.rx_addr),
        ] {
            let addr = format!("{addr}/64");
            output(
                "ip",
                &["-n", ns, "addr", "add", &addr, "dev", iface, "nodad"],
            )?;
            output("ip", &["-n", ns, "link", "set", "lo", "up"])?;
            output("ip", &["-n", ns, "link", "set", iface, "up"])?;
        }
        // veth takes frames redirected into it only through NAPI, which GRO (or an XDP
        // program on the receiving end) turns on; with GRO, the rows without XDP get NAPI too.
        self.in_rx(&["ethtool", "-K", self.rx_if, "gro", "on"])?;
        self.tx_ifindex = ifindex(&tx, self.tx_if)?;
        Ok(self)
    }

    /// Runs a command inside the receiving namespace (`ip netns exec`, which also mounts that
    /// namespace's sysfs).
    pub fn in_rx(&self, command: &[&str]) -> Result<String> {
        let mut args = vec!["netns", "exec", &self.rx_ns];
        args.extend(command);
        output("ip", &args)
    }

    /// The receiving end's counters, and the sending end's count of frames the receiving
    /// queues had no room for.
    pub fn rx_counters(&self) -> Result<Counters> {
        let mut counters = Counters::default();
        // One command per namespace, so the two reads of an interval are alike in timing.
        let script = format!("ethtool -S {}; cat /proc/net/snmp6", self.rx_if);
        for line in self.in_rx(&["sh", "-c", &script])?.lines() {
            let mut words = line.split_whitespace();
            let (Some(name), Some(value)) = (words.next(), words.next()) else {
                continue;
            };
            let value: u64 = value.parse().unwrap_or(0);
            match queue_counter(name, "rx_queue_") {
                Some("xdp_packets:") => counters.napi_frames += value,
                Some("xdp_drops:") => counters.xdp_drops += value,
                _ => {}
            }
            if matches!(name, "Udp6InDatagrams" | "Udp6NoPorts" | "Udp6InErrors") {
                counters.reached_udp += value;
            }
        }
        let sender = output(
            "ip",
            &["netns", "exec", &self.tx_ns, "ethtool", "-S", self.tx_if],
        )?;
        for line in sender.lines() {
            let mut words = line.split_whitespace();
            if let (Some(name), Some(value)) = (words.next(), words.next()) {
                if queue_counter(name, "tx_queue_") == Some("xdp_xmit_errors:") {
                    counters.queue_full += value.parse::<u64>().unwrap_or(0);
                }
            }
        }
        Ok(counters)
    }
}

/// `rx_queue_3_xdp_drops:` with prefix `rx_queue_` is `xdp_drops:` (of queue 3).
fn queue_counter<'a>(name: &'a str, prefix: &str) -> Option<&'a str> {
    let (_, counter) = name.strip_prefix(prefix)?.split_once('_')?;
    Some(counter)
}

/// What the receiving veth end did with the frames it was given.
#[derive(Clone, Copy, Default, Debug)]
pub struct Counters {
    /// Frames the receiving end's NAPI took off its queues, whatever became of them (XDP drop,
    /// XDP pass, or the stack with no XDP program): what the receiver handled.
    pub napi_frames: u64,
    /// Of those, dropped by an XDP program.
    pub xdp_drops: u64,
    /// UDP datagrams that reached the IPv6 UDP layer (delivered, no socket, or errors such as
    /// a full receive buffer): what got past every filter.
    pub reached_udp: u64,
    /// Frames the sending end could not queue because the receiving queue was full (the
    /// sender's `tx_queue_N_xdp_xmit_errors`): more than zero means the receiver, not the
    /// generator, set the pace.
    pub queue_full: u64,
}

impl Counters {
    pub fn since(&self, before: &Counters) -> Counters {
        Counters {
            napi_frames: self.napi_frames - before.napi_frames,
            xdp_drops: self.xdp_drops - before.xdp_drops,
            reached_udp: self.reached_udp - before.reached_udp,
            queue_full: self.queue_full - before.queue_full,
        }
    }
}

fn ifindex(ns: &str, iface: &str) -> Result<u32> {
    let json = output("ip", &["-n", ns, "-j", "link", "show", "dev", iface])?;
    let links: serde_json::Value = serde_json::from_str(&json)?;
    links[0]["ifindex"]
        .as_u64()
        .map(|index| index as u32)
        .with_context(|| format!("no ifindex for {iface} in {ns}"))
}

/// Moves the calling thread into namespace `ns` (only this thread: setns on a network
/// namespace is per thread).
pub fn enter(ns: &str) -> Result<()> {
    let path = format!("/var/run/netns/{ns}");
    let file = File::open(&path).with_context(|| format!("opening {path}"))?;
    // SAFETY: setns on a namespace descriptor we hold; it changes only this thread.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        bail!("setns {path}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// Pins the calling thread to `cpu`.
pub fn pin_to_cpu(cpu: usize) -> Result<()> {
    // SAFETY: a zeroed cpu_set_t is an empty set; CPU_SET writes within it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: pid 0 is the calling thread; `set` is a valid cpu_set_t of the given size.
    if unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) } != 0 {
        bail!("pinning to CPU {cpu}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}
