//! `cargo xtask vm host|host-test`: a real Debian 12 host with systemd in QEMU, the firewall
//! installed in it the way an operator installs it, and checks of the service from outside.
//!
//! The root file system is built by mmdebstrap from Debian's archive (systemd, udev,
//! openssh-server, the distribution kernel and its initramfs, iproute2, busybox) and kept
//! under target/vm/host/ by a hash of its recipe. Every run copies it, installs the firewall
//! into the copy with `cargo xtask install --root`'s code (the static musl build, the unit,
//! /etc/firewall/rules.toml, firewall.env naming the guest's NIC), enables the unit, and
//! makes a fresh ext4 image of it with `mkfs.ext4 -d`: the first boot already starts the
//! firewall, and the cached tree stays clean. QEMU boots the tree's own kernel and initrd;
//! systemd-networkd takes the guest's address from QEMU's DHCP server; SSH, HTTP and a
//! service on a port the rules deny are forwarded from the host's loopback.
mod checks;
mod guest;
mod probes;
mod rootfs;

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Result;

use crate::{setup, vm};
use guest::Guest;
use probes::{ssh_probe, Ports};

/// What the host needs besides QEMU: mmdebstrap, mkfs.ext4, ssh and ssh-keygen.
pub const HOST_PACKAGES: &[(&str, &str)] = &[
    ("mmdebstrap", "mmdebstrap"),
    ("mkfs.ext4", "e2fsprogs"),
    ("ssh", "openssh-client"),
    ("ssh-keygen", "openssh-client"),
];

/// The guest's NIC: virtio-net in PCI slot 3, named by udev from its slot.
const NIC: &str = "ens3";
const NIC_PCI_ADDRESS: &str = "0x3";

/// Guest ports: SSH and HTTP (allowed by rules/default.toml) and a greeting on 8080 (denied).
const SSH_PORT: u16 = 22;
const HTTP_PORT: u16 = 80;
const DENIED_PORT: u16 = 8080;
const GREETING: &str = "hello from port 8080";

pub struct HostOptions {
    pub machine: vm::Machine,
    /// Rule file from rules/.
    pub rules: String,
}

/// Timings of a host-test run, for the caller's summary.
pub struct Report {
    pub passed: usize,
    pub failed: usize,
    pub seconds: f64,
}

/// `cargo xtask vm host` (interactive) or `host-test` (the checks; fails if one fails).
pub fn run(
    env: &setup::Env,
    root: &Path,
    options: &HostOptions,
    interactive: bool,
) -> Result<Report> {
    let started = Instant::now();
    setup::ensure_packages(setup::VM_PACKAGES)?;
    setup::ensure_packages(HOST_PACKAGES)?;
    setup::ensure_target(vm::GUEST_TARGET)?;
    let binaries = vm::build_guest(env, root, false)?;
    let dir = root.join("target/vm/host");
    std::fs::create_dir_all(&dir)?;
    let key = rootfs::ssh_key(&dir)?;
    let timer = Instant::now();
    let base = rootfs::base_tree(&dir)?;
    println!(
        "host: root file system {} ({:.0} s)",
        base.display(),
        timer.elapsed().as_secs_f64()
    );

    let timer = Instant::now();
    let run_dir = dir.join("run");
    let image = rootfs::make_image(
        root,
        &base,
        &run_dir,
        &binaries.firewall,
        &key,
        &options.rules,
    )?;
    println!(
        "host: disk image with the firewall installed ({:.0} s)",
        timer.elapsed().as_secs_f64()
    );

    let ports = Ports::free()?;
    let (kernel, initrd) = rootfs::boot_files(&base)?;
    let mut guest = Guest::boot(
        options,
        &kernel,
        &initrd,
        &image,
        &run_dir,
        &ports,
        &key,
        interactive,
    )?;
    if interactive {
        println!(
            "host: ssh -i {} -p {} -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null \
             root@127.0.0.1   (HTTP: 127.0.0.1:{}, denied port 8080: 127.0.0.1:{}; Ctrl-A X quits)",
            key.display(),
            ports.ssh,
            ports.http,
            ports.denied
        );
        // Say when SSH answers, amid the console's messages.
        let ssh_port = ports.ssh;
        std::thread::spawn(move || {
            let started = Instant::now();
            while started.elapsed() < Duration::from_secs(600) {
                if ssh_probe(ssh_port) {
                    eprintln!("\r\nhost: SSH answers on 127.0.0.1:{ssh_port}\r");
                    return;
                }
                std::thread::sleep(Duration::from_secs(3));
            }
        });
        let status = guest.qemu.wait()?;
        crate::check(status, "qemu")?;
        return Ok(Report {
            passed: 0,
            failed: 0,
            seconds: started.elapsed().as_secs_f64(),
        });
    }
    let result = checks::checks(&mut guest, &ports, started);
    guest.stop();
    result
}
