//! QEMU for both VM paths: the machine's command line (accelerator, memory, CPUs, kernel,
//! user-mode network, serial console) and the reading of its console; for `cargo xtask vm`
//! also the boot watchdog with its KVM-to-TCG fallback and the console's `VM-RESULT:` line.
use std::io::{Read, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};

use super::{path_str, Kernel, Machine, Options, DEMO_PORTS};

/// The guest's address on QEMU's user-mode network, and the host as the guest sees it
/// (QEMU forwards connections to it to the host's loopback).
pub(crate) const GUEST_ADDRESS: &str = "10.0.2.15/24";
pub(crate) const HOST_ADDRESS: &str = "10.0.2.2";

/// How QEMU runs the guest.
#[derive(Clone, Copy, PartialEq, Eq, Debug, clap::ValueEnum)]
pub enum Accel {
    /// KVM if the host has a KVM that boots stock kernels, else TCG.
    Auto,
    Kvm,
    Tcg,
}

impl Accel {
    /// The accelerator `Auto` stands for on this host; the others as they are.
    pub(crate) fn resolve(self) -> Accel {
        match self {
            Accel::Auto if kvm_works() => Accel::Kvm,
            Accel::Auto => Accel::Tcg,
            chosen => chosen,
        }
    }
}

/// Whether this host's KVM boots stock kernels: a real kvm_intel/kvm_amd, not a nested kind
/// (such as kvm_pvm) on which they hang.
fn kvm_works() -> bool {
    Path::new("/dev/kvm").exists()
        && (Path::new("/sys/module/kvm_intel").exists()
            || Path::new("/sys/module/kvm_amd").exists())
}

/// What QEMU boots besides the machine, and how the guest is reached.
pub(crate) struct Boot<'a> {
    pub kernel: &'a Path,
    pub initrd: &'a Path,
    pub append: &'a str,
    /// A raw disk image, as virtio-blk in PCI slot 4.
    pub disk: Option<&'a Path>,
    /// (host loopback port, guest port) pairs that QEMU's user-mode network forwards over TCP.
    pub forwards: &'a [(u16, u16)],
    /// The virtio NIC's PCI slot, if it matters (udev names the NIC from it).
    pub nic_slot: Option<&'a str>,
    /// The serial console on the user's terminal with QEMU's Ctrl-A escapes (Ctrl-A X quits),
    /// else on QEMU's stdio without the monitor, for a program to read.
    pub on_terminal: bool,
}

impl Machine {
    /// QEMU's command line for a PC without default devices running `boot` under `accel`
    /// (this machine's, resolved): the disk, the NIC and a virtio RNG, in that order of PCI
    /// slots, and no display.
    pub(crate) fn command(&self, accel: Accel, boot: &Boot) -> Result<Command> {
        let mut command = Command::new("qemu-system-x86_64");
        command
            .args(["-machine", "pc", "-nodefaults"])
            .args(["-m", &self.memory_mib.to_string()])
            .args(["-smp", &self.cpus.to_string()])
            .args(match accel {
                Accel::Kvm => ["-accel", "kvm", "-cpu", "host"],
                // One host thread for all guest CPUs: with a thread per CPU, a 6.12 guest once
                // executed a stale int3 in the XDP dispatcher that another CPU had just patched
                // (kernel oops "int3" in bpf_dispatcher_xdp_func while a test attached XDP
                // under traffic), which looks like emulated cross-modifying code. ~40% slower.
                _ => ["-accel", "tcg,thread=single", "-cpu", "max"],
            })
            .arg("-kernel")
            .arg(boot.kernel)
            .arg("-initrd")
            .arg(boot.initrd)
            .args(["-append", boot.append]);
        if let Some(disk) = boot.disk {
            command
                .arg("-drive")
                .arg(format!(
                    "file={},format=raw,if=none,id=root",
                    path_str(disk)?
                ))
                .args(["-device", "virtio-blk-pci,drive=root,addr=0x4"]);
        }
        let mut netdev = String::from("user,id=net0");
        for (host, guest) in boot.forwards {
            netdev += &format!(",hostfwd=tcp:127.0.0.1:{host}-:{guest}");
        }
        let mut nic = String::from("virtio-net-pci,netdev=net0");
        if let Some(slot) = boot.nic_slot {
            nic += &format!(",addr={slot}");
        }
        command
            .args(["-netdev", &netdev])
            .args(["-device", &nic])
            .args(["-device", "virtio-rng-pci", "-display", "none"]);
        if boot.on_terminal {
            command.args(["-serial", "mon:stdio"]);
        } else {
            command.args(["-monitor", "none", "-serial", "stdio"]);
        }
        Ok(command)
    }

    /// `accel`, memory and CPUs as the boot messages say them.
    pub(crate) fn describe(&self, accel: Accel) -> String {
        format!("{accel:?}, {} MiB, {} CPUs", self.memory_mib, self.cpus)
    }
}

pub(crate) fn spawn(command: &mut Command) -> Result<Child> {
    command
        .spawn()
        .context("starting qemu-system-x86_64 (package qemu-system-x86)")
}

/// Hands the guest console's output to `chunk` as it comes, until QEMU closes it or `chunk`
/// returns false.
pub(crate) fn read_console(mut from: impl Read, mut chunk: impl FnMut(&[u8]) -> bool) {
    let mut buf = [0u8; 4096];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if !chunk(&buf[..n]) {
            return;
        }
    }
}

/// What a run of the guest came to.
pub struct Outcome {
    pub passed: bool,
    pub summary: String,
    pub seconds: f64,
}

/// Boots `kernel` with `initramfs`, shows the console, and returns the guest's result line.
/// Interactive runs pass the terminal through (Ctrl-C reaches the firewall; Ctrl-A X quits).
pub fn boot(
    kernel: &Kernel,
    initramfs: &Path,
    options: &Options,
    interactive: bool,
) -> Result<Outcome> {
    let asked = options.machine.accel;
    let mut accel = asked.resolve();
    let mut panics = 0;
    loop {
        match boot_with(kernel, initramfs, options, interactive, accel)? {
            BootOutcome::Done(outcome) => return Ok(outcome),
            BootOutcome::NeverBooted(why) if accel == Accel::Kvm && asked == Accel::Auto => {
                eprintln!(
                    "vm: under KVM {why}; trying software emulation (TCG). Pass --accel tcg \
                     to skip KVM on this host."
                );
                accel = Accel::Tcg;
            }
            BootOutcome::NeverBooted(why) => {
                bail!("under {accel:?}, {why}; try another --accel, or --verbose")
            }
            // Under emulation the stock kernels have panicked now and then in code far from
            // the firewall (a slab allocation in munmap, once), which says nothing of the
            // tests: their run starts over, once and loudly; a second panic fails it.
            BootOutcome::Panicked(line) if panics == 0 && !interactive => {
                panics += 1;
                eprintln!(
                    "vm: the {} guest's kernel panicked (\"{line}\"; its messages are above); \
                     running its tests once more from the start",
                    kernel.label
                );
            }
            BootOutcome::Panicked(line) => bail!("the guest's kernel panicked: {line}"),
        }
    }
}

const BOOT_WATCHDOG_KVM: Duration = Duration::from_secs(30);
const BOOT_WATCHDOG_TCG: Duration = Duration::from_secs(180);
/// The longest a guest may run unattended (tests), after which it is stopped.
const RUN_LIMIT: Duration = Duration::from_secs(45 * 60);

enum BootOutcome {
    Done(Outcome),
    /// Why the guest's init never started.
    NeverBooted(String),
    /// The kernel's panic line, after init started and before a result.
    Panicked(String),
}

fn boot_with(
    kernel: &Kernel,
    initramfs: &Path,
    options: &Options,
    interactive: bool,
    accel: Accel,
) -> Result<BootOutcome> {
    let mut append = String::from("console=ttyS0 panic=-1 random.trust_cpu=on");
    if !options.verbose {
        append += " quiet loglevel=3";
    }
    let forwards: Vec<(u16, u16)> = if interactive {
        DEMO_PORTS
            .iter()
            .map(|&port| (10_000 + port, port))
            .collect()
    } else {
        Vec::new()
    };
    let boot = Boot {
        kernel: &kernel.image,
        initrd: initramfs,
        append: &append,
        disk: None,
        forwards: &forwards,
        nic_slot: None,
        on_terminal: interactive,
    };
    let mut command = options.machine.command(accel, &boot)?;
    command.arg("-no-reboot");
    if !interactive {
        command.stdin(Stdio::null());
    }
    command.stdout(Stdio::piped());
    eprintln!(
        "vm: booting {} ({})",
        kernel.label,
        options.machine.describe(accel)
    );
    let started = Instant::now();
    let mut qemu = spawn(&mut command)?;
    let stdout = qemu.stdout.take().unwrap();
    let (lines, events) = mpsc::channel();
    let reader = std::thread::spawn(move || forward_console(stdout, std::io::stdout(), lines));
    let watchdog = match accel {
        Accel::Kvm => BOOT_WATCHDOG_KVM,
        _ => BOOT_WATCHDOG_TCG,
    };
    let mut booted = false;
    let mut result = None;
    let mut panic = None;
    loop {
        // Until the console closes (QEMU exited), within the boot watchdog's time and, for
        // tests, the run limit; an interactive session runs as long as its user wants.
        let event = if interactive && booted {
            events
                .recv()
                .map_err(|_| mpsc::RecvTimeoutError::Disconnected)
        } else {
            let limit = if booted { RUN_LIMIT } else { watchdog };
            events.recv_timeout(limit.saturating_sub(started.elapsed()))
        };
        match event {
            Ok(Console::Booted) => booted = true,
            Ok(Console::Result(line)) => result = Some(line),
            Ok(Console::Panic(line)) => panic = Some(line),
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let _ = qemu.kill();
                let _ = qemu.wait();
                let _ = reader.join();
                if !booted {
                    return Ok(BootOutcome::NeverBooted(format!(
                        "the guest's init did not start within {} s",
                        watchdog.as_secs()
                    )));
                }
                bail!(
                    "the guest ran longer than {} minutes; stopped",
                    RUN_LIMIT.as_secs() / 60
                );
            }
        }
    }
    let status = qemu.wait()?;
    let _ = reader.join();
    let seconds = started.elapsed().as_secs_f64();
    let Some(line) = result else {
        if let (true, Some(line)) = (booted, panic) {
            return Ok(BootOutcome::Panicked(line));
        }
        if !booted {
            return Ok(BootOutcome::NeverBooted(format!(
                "QEMU stopped ({status}) before the guest's init started"
            )));
        }
        bail!(
            "the guest stopped without a result ({status}); run with --verbose for the \
             kernel's messages"
        );
    };
    let summary = line.trim_start_matches(RESULT).trim().to_string();
    Ok(BootOutcome::Done(Outcome {
        passed: summary == "pass",
        summary,
        seconds,
    }))
}

/// The init's first line, the line with its result, and the kernel's last words.
const BOOTED: &str = "vm-init: up";
const RESULT: &str = "VM-RESULT:";
const PANIC: &str = "Kernel panic - not syncing";

enum Console {
    Booted,
    Result(String),
    Panic(String),
}

/// Copies the guest console to `out` (our stdout) as it comes, and reports the lines that matter.
fn forward_console(from: impl Read, mut out: impl Write, events: mpsc::Sender<Console>) {
    let mut line = Vec::new();
    read_console(from, |bytes| {
        let _ = out.write_all(bytes);
        let _ = out.flush();
        for &byte in bytes {
            if byte != b'\n' {
                line.push(byte);
                continue;
            }
            let text = String::from_utf8_lossy(&line).trim().to_string();
            line.clear();
            let event = if text.starts_with(BOOTED) {
                Console::Booted
            } else if text.starts_with(RESULT) {
                Console::Result(text)
            } else if let Some(at) = text.find(PANIC) {
                Console::Panic(text[at..].to_string())
            } else {
                continue;
            };
            if events.send(event).is_err() {
                return false;
            }
        }
        true
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The console reader tells the boot, the result and a panic (as a 6.12 guest printed it)
    /// from the lines around them.
    #[test]
    fn the_console_reader_reports_boot_result_and_panic() {
        let console = "[    1.2] random: crng init done\r\nvm-init: up\r\nrun: reloads ... ok\r\n\
                       [  217.057633] Kernel panic - not syncing: Fatal exception in interrupt\r\n\
                       VM-RESULT: pass\r\n";
        let (events, received) = mpsc::channel();
        forward_console(console.as_bytes(), std::io::sink(), events);
        let seen: Vec<String> = received
            .iter()
            .map(|event| match event {
                Console::Booted => "booted".into(),
                Console::Result(line) => format!("result {line}"),
                Console::Panic(line) => format!("panic {line}"),
            })
            .collect();
        assert_eq!(
            seen,
            [
                "booted",
                "panic Kernel panic - not syncing: Fatal exception in interrupt",
                "result VM-RESULT: pass"
            ]
        );
    }

    /// The values that follow `flag` on `command`'s line, in order.
    fn after(command: &Command, flag: &str) -> Vec<String> {
        let args: Vec<String> = command
            .get_args()
            .map(|arg| arg.to_string_lossy().into_owned())
            .collect();
        args.windows(2)
            .filter(|pair| pair[0] == flag)
            .map(|pair| pair[1].clone())
            .collect()
    }

    /// QEMU gives PCI slots in the order of the devices: the disk and NIC keep theirs, the RNG
    /// comes after the NIC.
    #[test]
    fn the_command_line_has_disk_nic_and_rng_in_order() {
        let machine = Machine::default();
        let host = Boot {
            kernel: Path::new("/k"),
            initrd: Path::new("/i"),
            append: "console=ttyS0",
            disk: Some(Path::new("/d.img")),
            forwards: &[(10022, 22), (10080, 80)],
            nic_slot: Some("0x3"),
            on_terminal: false,
        };
        let command = machine.command(Accel::Tcg, &host).unwrap();
        assert_eq!(
            after(&command, "-device"),
            [
                "virtio-blk-pci,drive=root,addr=0x4",
                "virtio-net-pci,netdev=net0,addr=0x3",
                "virtio-rng-pci"
            ]
        );
        assert_eq!(
            after(&command, "-netdev"),
            ["user,id=net0,hostfwd=tcp:127.0.0.1:10022-:22,hostfwd=tcp:127.0.0.1:10080-:80"]
        );
        assert_eq!(after(&command, "-accel"), ["tcg,thread=single"]);
        assert_eq!(after(&command, "-m"), ["2048"]);
        assert_eq!(after(&command, "-serial"), ["stdio"]);
        assert_eq!(after(&command, "-monitor"), ["none"]);

        let vm = Boot {
            disk: None,
            forwards: &[],
            nic_slot: None,
            on_terminal: true,
            ..host
        };
        let command = machine.command(Accel::Kvm, &vm).unwrap();
        assert_eq!(
            after(&command, "-device"),
            ["virtio-net-pci,netdev=net0", "virtio-rng-pci"]
        );
        assert_eq!(after(&command, "-netdev"), ["user,id=net0"]);
        assert_eq!(after(&command, "-serial"), ["mon:stdio"]);
        assert!(after(&command, "-monitor").is_empty());
    }
}
