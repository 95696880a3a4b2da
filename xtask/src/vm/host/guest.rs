//! The running host VM: QEMU booting the root file system's own kernel, its serial console
//! (logged, and a root login on it for diagnostics when SSH does not answer), and commands
//! run in it over SSH.
use std::io::Write as _;
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};

use super::probes::Ports;
use super::rootfs::SUITE;
use super::{HostOptions, DENIED_PORT, HTTP_PORT, NIC_PCI_ADDRESS, SSH_PORT};
use crate::vm::{path_str, qemu};

/// The running guest: QEMU, its console (logged to a file, and a login on it for diagnostics
/// when SSH does not answer) and SSH.
pub(super) struct Guest {
    pub qemu: Child,
    console_in: Option<ChildStdin>,
    console: Arc<Mutex<String>>,
    ssh: Vec<String>,
    pub boot_started: Instant,
}

impl Guest {
    #[expect(
        clippy::too_many_arguments,
        reason = "the boot's files, the run's directory, ports and key, each its own thing"
    )]
    pub fn boot(
        options: &HostOptions,
        kernel: &Path,
        initrd: &Path,
        image: &Path,
        run_dir: &Path,
        ports: &Ports,
        key: &Path,
        interactive: bool,
    ) -> Result<Guest> {
        let machine = &options.machine;
        let accel = machine.accel.resolve();
        let forwards = [
            (ports.ssh, SSH_PORT),
            (ports.http, HTTP_PORT),
            (ports.denied, DENIED_PORT),
        ];
        let boot = qemu::Boot {
            kernel,
            initrd,
            append: "root=/dev/vda rw console=ttyS0 random.trust_cpu=on",
            disk: Some(image),
            forwards: &forwards,
            nic_slot: Some(NIC_PCI_ADDRESS),
            on_terminal: interactive,
        };
        let mut command = machine.command(accel, &boot)?;
        if !interactive {
            command.stdin(Stdio::piped()).stdout(Stdio::piped());
        }
        println!(
            "host: booting Debian {SUITE} ({}), console {}",
            machine.describe(accel),
            if interactive {
                "here".to_string()
            } else {
                format!("in {}", run_dir.join("console.log").display())
            }
        );
        let mut qemu = qemu::spawn(&mut command)?;
        let console = Arc::new(Mutex::new(String::new()));
        let console_in = qemu.stdin.take();
        if let Some(stdout) = qemu.stdout.take() {
            let log = std::fs::File::create(run_dir.join("console.log"))?;
            let console = console.clone();
            std::thread::spawn(move || copy_console(stdout, log, console));
        }
        let ssh = [
            "-i",
            path_str(key)?,
            "-p",
            &ports.ssh.to_string(),
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "LogLevel=ERROR",
            "-o",
            "ConnectTimeout=10",
            "root@127.0.0.1",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        Ok(Guest {
            qemu,
            console_in,
            console,
            ssh,
            boot_started: Instant::now(),
        })
    }

    /// `command` in the guest over SSH: its stdout, or an error with its stderr.
    pub fn ssh(&self, command: &str) -> Result<String> {
        self.ssh_within(command, SSH_LIMIT)
    }

    /// The same, given up after `limit`: QEMU's forwarder accepts the connection even while
    /// the guest is down, and ssh would wait for its banner for ever.
    pub fn ssh_within(&self, command: &str, limit: Duration) -> Result<String> {
        let output = Command::new("timeout")
            .args(["-k", "5", &limit.as_secs().to_string(), "ssh"])
            .args(&self.ssh)
            .arg(command)
            .stdin(Stdio::null())
            .output()
            .context("running ssh")?;
        if !output.status.success() {
            bail!(
                "`{command}` in the guest: {} {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// Waits for the console's login prompt (the boot) and then for SSH to answer with a boot
    /// id other than `previous`; returns the boot id.
    pub fn wait_for_ssh(&self, previous: Option<&str>, limit: Duration) -> Result<String> {
        let started = Instant::now();
        loop {
            if let Ok(id) = self.ssh_within(
                "cat /proc/sys/kernel/random/boot_id",
                Duration::from_secs(20),
            ) {
                let id = id.trim().to_string();
                if previous != Some(id.as_str()) {
                    return Ok(id);
                }
            }
            if started.elapsed() > limit {
                bail!("no SSH login within {} s", limit.as_secs());
            }
            std::thread::sleep(Duration::from_secs(2));
        }
    }

    /// Waits until the console has printed `needle` `count` times.
    pub fn wait_console(&self, needle: &str, count: usize, limit: Duration) -> bool {
        let started = Instant::now();
        while started.elapsed() < limit {
            if self.console.lock().unwrap().matches(needle).count() >= count {
                return true;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        false
    }

    /// Logs in as root on the serial console and runs `command` there; its output, if the
    /// console answered in time. For diagnostics when SSH does not answer.
    pub fn console_run(&mut self, command: &str) -> Option<String> {
        let input = self.console_in.as_mut()?;
        let start = self.console.lock().unwrap().len();
        input.write_all(b"\nroot\n").ok()?;
        std::thread::sleep(Duration::from_secs(5));
        let marker = "CONSOLE-DONE";
        let line = format!("stty -echo; {command}; echo {marker}-$((6*7))\n");
        input.write_all(line.as_bytes()).ok()?;
        let _ = input.flush();
        let done = format!("{marker}-42");
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(60) {
            let text = self.console.lock().unwrap()[start..].to_string();
            if let Some(end) = text.find(&done) {
                // What follows the echo of the command line (which has `$((6*7))`, not 42).
                let output = text[..end]
                    .find("$((6*7))")
                    .and_then(|at| text[at..end].find('\n').map(|nl| at + nl + 1))
                    .map_or(&text[..end], |from| &text[from..end]);
                return Some(without_escapes(output));
            }
            std::thread::sleep(Duration::from_millis(300));
        }
        None
    }

    pub fn stop(&mut self) {
        let _ = self.qemu.kill();
        let _ = self.qemu.wait();
    }
}

impl Drop for Guest {
    /// No QEMU outlives the run, whatever ended it.
    fn drop(&mut self) {
        self.stop();
    }
}

/// Text without the terminal's escape sequences (`ESC [ ... letter`), such as bash's
/// bracketed-paste switches.
fn without_escapes(text: &str) -> String {
    let mut out = String::new();
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c != '\x1b' {
            out.push(c);
            continue;
        }
        if chars.next() == Some('[') {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        }
    }
    out
}

fn copy_console(from: impl std::io::Read, mut log: std::fs::File, console: Arc<Mutex<String>>) {
    qemu::read_console(from, |bytes| {
        let _ = log.write_all(bytes);
        console
            .lock()
            .unwrap()
            .push_str(&String::from_utf8_lossy(bytes));
        true
    });
}

/// The longest an SSH command may take (a restart under emulation takes ~10 s).
const SSH_LIMIT: Duration = Duration::from_secs(120);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn console_escapes_are_removed() {
        assert_eq!(
            without_escapes("\x1b[?2004l2: ens3: up\n\x1b[0;32m OK \x1b[0m done"),
            "2: ens3: up\n OK  done"
        );
    }
}
