//! Memory at 100,000 and 1,000,000 set entries: the real daemon (`firewall run`) filtering a
//! veth pair in a scratch network namespace, with its pins on a bpffs of its own.
//!
//! - Daemon: `VmRSS` (steady) and `VmHWM` (peak) from `/proc/PID/status`, once the rules are
//!   in force at start and again after a reload that changes one rule's port (the first
//!   reload fills the idle generation, so both generations are then held).
//! - Kernel: the `memlock` line of `/proc/PID/fdinfo/FD` of each map (each map once, by id),
//!   summed. Since Linux 6.4 it is the map's own account of its memory (elements of a hash
//!   map or trie as they are allocated, arrays as preallocated), where slab totals move with
//!   everything else the machine does. Per entry: the sum less that of an empty rule set,
//!   divided by the address entries the daemon reports.
//!
//! `FW_BENCH_BASELINE=PATH` measures another daemon binary too, in turns with this one: the
//! before and after of a change in one run.
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _, Result};

/// One daemon run's figures, in KiB and milliseconds.
#[derive(Default)]
struct Figures {
    start_ms: f64,
    rss_kib: u64,
    peak_kib: u64,
    reload_ms: f64,
    reloaded_rss_kib: u64,
    reloaded_peak_kib: u64,
    maps_kib: u64,
    entries: u64,
}

/// A case: set entries and rules in the rule file.
struct Case {
    label: &'static str,
    entries: u32,
    rules: usize,
}

const CASES: [Case; 3] = [
    Case {
        label: "no set (maps' fixed size)",
        entries: 0,
        rules: 1,
    },
    Case {
        label: "100,000 entries, 1,024 rules",
        entries: 100_000,
        rules: 1024,
    },
    Case {
        label: "1,000,000 entries, 2 rules",
        entries: 1_000_000,
        rules: 2,
    },
];

pub fn report(dir: &Path, mixed_list: fn(u32) -> Vec<String>) -> Result<()> {
    let mut daemons = vec![("this build", PathBuf::from(env!("CARGO_BIN_EXE_firewall")))];
    if let Some(baseline) = std::env::var_os("FW_BENCH_BASELINE") {
        daemons.insert(0, ("baseline", PathBuf::from(baseline)));
    }
    println!();
    println!(
        "memory: {:<30} {:>8} {:>9} {:>9} {:>9} {:>9} {:>9} {:>10} {:>9}",
        "daemon, case",
        "start ms",
        "RSS MiB",
        "peak MiB",
        "reload ms",
        "RSS MiB",
        "peak MiB",
        "maps MiB",
        "B/entry"
    );
    // Per daemon: the maps' memory with no set (the first case).
    let mut fixed_kib = vec![0; daemons.len()];
    for case in &CASES {
        let rule_file = write_case(dir, case, mixed_list)?;
        for ((name, exe), fixed_kib) in daemons.iter().zip(&mut fixed_kib) {
            let figures = run_daemon(exe, &rule_file, dir)?;
            let per_entry = match case.entries {
                0 => {
                    *fixed_kib = figures.maps_kib;
                    "-".to_string()
                }
                _ => format!(
                    "{:.0}",
                    (figures.maps_kib.saturating_sub(*fixed_kib) * 1024) as f64
                        / figures.entries as f64
                ),
            };
            let mib = |kib: u64| kib as f64 / 1024.0;
            println!(
                "memory: {:<30} {:>8.0} {:>9.1} {:>9.1} {:>9.0} {:>9.1} {:>9.1} {:>10.1} {:>9}",
                format!("{name}, {}", case.label),
                figures.start_ms,
                mib(figures.rss_kib),
                mib(figures.peak_kib),
                figures.reload_ms,
                mib(figures.reloaded_rss_kib),
                mib(figures.reloaded_peak_kib),
                mib(figures.maps_kib),
                per_entry
            );
        }
    }
    println!("(RSS and peak: at start, then after the first reload; maps: memlock of all maps)");
    Ok(())
}

/// The rule file of `case` (and its set file) in `dir`, with the last rule's port 23.
fn write_case(dir: &Path, case: &Case, mixed_list: fn(u32) -> Vec<String>) -> Result<PathBuf> {
    let mut text = String::from("[defaults]\npolicy = \"allow\"\n\n");
    if case.entries > 0 {
        let mut list = mixed_list(case.entries).join("\n");
        list.push('\n');
        std::fs::write(dir.join("memory-set.txt"), list)?;
        text += "[sets.block]\nfiles = [\"memory-set.txt\"]\n\n";
        text += "[[rules]]\naction = \"deny\"\nfrom = [\"@block\"]\n\n";
    }
    // Fillers naming a network and a port each, as the packet benchmark's rule sets do.
    for i in 0..case.rules.saturating_sub(2) {
        text += &format!(
            "[[rules]]\naction = \"deny\"\nproto = \"tcp\"\nfrom = [\"172.{}.{}.0/24\"]\nports = [{}]\n\n",
            16 + i / 256,
            i % 256,
            1000 + i
        );
    }
    text += "[[rules]]\naction = \"deny\"\nproto = \"tcp\"\nports = [23]\n";
    let path = dir.join("memory-rules.toml");
    std::fs::write(&path, text)?;
    Ok(path)
}

/// The daemon, its namespace and bpffs, removed on drop even when a measurement fails.
struct Scratch {
    ns: String,
    bpffs: PathBuf,
    daemon: Option<Child>,
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Some(mut daemon) = self.daemon.take() {
            // SAFETY: a plain signal to our own child.
            unsafe { libc::kill(daemon.id() as i32, libc::SIGTERM) };
            let _ = daemon.wait();
        }
        if let Ok(target) = std::ffi::CString::new(self.bpffs.as_os_str().as_encoded_bytes()) {
            // SAFETY: a NUL-terminated path; a lazy unmount, as `umount -l`.
            unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
        }
        let _ = std::fs::remove_dir(&self.bpffs);
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
    }
}

fn ip(args: &[&str]) -> Result<()> {
    let status = Command::new("ip").args(args).status()?;
    ensure!(status.success(), "ip {} failed", args.join(" "));
    Ok(())
}

fn run_daemon(exe: &Path, rule_file: &Path, dir: &Path) -> Result<Figures> {
    let mut scratch = Scratch {
        ns: format!("fwbench-mem-{}", std::process::id()),
        bpffs: dir.join("bpffs"),
        daemon: None,
    };
    ip(&["netns", "add", &scratch.ns])?;
    ip(&[
        "-n",
        &scratch.ns,
        "link",
        "add",
        "fwm0",
        "type",
        "veth",
        "peer",
        "name",
        "fwm1",
    ])?;
    for dev in ["fwm0", "fwm1"] {
        ip(&["-n", &scratch.ns, "link", "set", dev, "up"])?;
    }
    std::fs::create_dir_all(&scratch.bpffs)?;
    let status = Command::new("mount")
        .args(["-t", "bpf", "bpf"])
        .arg(&scratch.bpffs)
        .status()?;
    ensure!(status.success(), "mounting bpffs failed");
    let log = dir.join("memory-daemon.log");
    let started = Instant::now();
    let daemon = Command::new("ip")
        .args(["netns", "exec", &scratch.ns])
        .arg(exe)
        .args(["run", "--insecure-files", "--iface", "fwm0", "--rules"])
        .arg(rule_file)
        .arg("--control")
        .arg(dir.join("memory-control.sock"))
        .arg("--pin-dir")
        .arg(scratch.bpffs.join("firewall"))
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .spawn()?;
    // `ip netns exec` execs the daemon: the child's pid is the daemon's.
    let pid = daemon.id();
    scratch.daemon = Some(daemon);
    wait_for_line(&log, "filtering; ")?;
    let mut figures = Figures {
        start_ms: started.elapsed().as_secs_f64() * 1e3,
        ..Figures::default()
    };
    settle();
    (figures.rss_kib, figures.peak_kib) = rss_and_peak(pid)?;
    figures.maps_kib = maps_memlock(pid)? / 1024;

    let text = std::fs::read_to_string(rule_file)?;
    std::fs::write(rule_file, text.replace("ports = [23]", "ports = [24]"))?;
    let reloaded = wait_for_line(&log, "reloaded ")?;
    settle();
    (figures.reloaded_rss_kib, figures.reloaded_peak_kib) = rss_and_peak(pid)?;
    std::fs::write(rule_file, text)?;
    // "reloaded FILE in 1.2s: N address entries, M map entries changed"
    let (took, rest) = reloaded
        .split_once(" in ")
        .and_then(|(_, rest)| rest.split_once(": "))
        .context("reload line")?;
    figures.reload_ms = duration_ms(took)?;
    figures.entries = rest
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .context("address entries in the reload line")?;
    Ok(figures)
}

/// Lets the allocator and the kernel's deferred frees (RCU) finish what the apply started.
fn settle() {
    std::thread::sleep(Duration::from_millis(500));
}

/// The first line of the daemon's log containing `needle`, waiting up to two minutes.
fn wait_for_line(log: &Path, needle: &str) -> Result<String> {
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if let Some(line) = text.lines().find(|line| line.contains(needle)) {
            return Ok(line.to_string());
        }
        if text.contains("Error: ") {
            bail!("the daemon failed: {text}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!("no {needle:?} in the daemon's log within two minutes")
}

/// "1.2s", "850.9ms" (Debug of a Duration) in milliseconds.
fn duration_ms(text: &str) -> Result<f64> {
    let (number, scale) = if let Some(ms) = text.strip_suffix("ms") {
        (ms, 1.0)
    } else if let Some(us) = text.strip_suffix("µs") {
        (us, 1e-3)
    } else if let Some(s) = text.strip_suffix('s') {
        (s, 1e3)
    } else {
        bail!("duration {text:?}")
    };
    Ok(number.parse::<f64>()? * scale)
}

/// `VmRSS` and `VmHWM` of a process, in KiB.
fn rss_and_peak(pid: u32) -> Result<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> Result<u64> {
        let line = status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .with_context(|| format!("{name} in /proc/{pid}/status"))?;
        Ok(line.trim().trim_end_matches("kB").trim().parse()?)
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

/// The summed `memlock` of every BPF map the process holds, each map once: bytes.
fn maps_memlock(pid: u32) -> Result<u64> {
    let mut seen = std::collections::HashSet::new();
    let mut total = 0;
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd"))? {
        let entry = entry?;
        let is_map = std::fs::read_link(entry.path())
            .is_ok_and(|target| target.as_os_str() == "anon_inode:bpf-map");
        if !is_map {
            continue;
        }
        let info_path = format!("/proc/{pid}/fdinfo/{}", entry.file_name().to_string_lossy());
        let info = std::fs::read_to_string(info_path)?;
        let value = |key: &str| {
            info.lines()
                .find_map(|line| line.strip_prefix(key))
                .and_then(|rest| rest.trim().parse::<u64>().ok())
        };
        if let (Some(id), Some(memlock)) = (value("map_id:"), value("memlock:")) {
            if seen.insert(id) {
                total += memlock;
            }
        }
    }
    Ok(total)
}
