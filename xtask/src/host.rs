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
use std::io::{BufRead as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _, Result};

use crate::vm::path_str;
use crate::{install, setup, vm};

/// What the host needs besides QEMU: mmdebstrap, mkfs.ext4, ssh and ssh-keygen.
pub const HOST_PACKAGES: &[(&str, &str)] = &[
    ("mmdebstrap", "mmdebstrap"),
    ("mkfs.ext4", "e2fsprogs"),
    ("ssh", "openssh-client"),
    ("ssh-keygen", "openssh-client"),
];

const SUITE: &str = "bookworm";
const MIRROR: &str = "http://deb.debian.org/debian";
const PACKAGES: &[&str] = &[
    "systemd-sysv",
    "udev",
    "dbus",
    "openssh-server",
    "linux-image-amd64",
    "initramfs-tools",
    "iproute2",
    "busybox",
];

/// The guest's NIC: virtio-net in PCI slot 3, named by udev from its slot.
const NIC: &str = "ens3";
const NIC_PCI_ADDRESS: &str = "0x3";
const IMAGE_SIZE: &str = "1500M";

/// Guest ports: SSH and HTTP (allowed by rules/default.toml) and a greeting on 8080 (denied).
const SSH_PORT: u16 = 22;
const HTTP_PORT: u16 = 80;
const DENIED_PORT: u16 = 8080;
const GREETING: &str = "hello from port 8080";

/// Files written into the root file system after mmdebstrap (part of the recipe's hash).
const FILES: &[(&str, &str)] = &[
    ("etc/hostname", "fwhost\n"),
    ("etc/hosts", "127.0.0.1 localhost\n127.0.1.1 fwhost\n"),
    ("etc/fstab", "/dev/vda / ext4 rw,errors=remount-ro 0 1\n"),
    (
        "etc/systemd/network/20-wired.network",
        "[Match]\nName=en*\n\n[Network]\nDHCP=ipv4\n",
    ),
    ("srv/www/index.html", "hello from the host VM\n"),
    (
        "etc/systemd/system/http.service",
        "[Unit]\nDescription=HTTP on port 80 (busybox httpd)\n\n[Service]\n\
         ExecStart=/bin/busybox httpd -f -p 80 -h /srv/www\n\n[Install]\n\
         WantedBy=multi-user.target\n",
    ),
    (
        "etc/systemd/system/greet.socket",
        "[Unit]\nDescription=A greeting on port 8080\n\n[Socket]\nListenStream=8080\n\
         Accept=yes\n\n[Install]\nWantedBy=sockets.target\n",
    ),
    (
        "etc/systemd/system/greet@.service",
        "[Unit]\nDescription=A greeting on port 8080\n\n[Service]\n\
         ExecStart=/bin/echo \"hello from port 8080\"\nStandardInput=socket\n\
         StandardOutput=socket\n",
    ),
];

/// Commands run in the root file system (chroot) after the files are written.
const COMMANDS: &[&str] = &[
    "systemctl enable systemd-networkd http.service greet.socket",
    // Console login as root without a password (QEMU's serial line only: sshd refuses empty
    // passwords); SSH takes the key of the run.
    "passwd -d root",
];

pub struct HostOptions {
    pub accel: vm::Accel,
    pub memory_mib: u32,
    pub cpus: u32,
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
    let key = ssh_key(&dir)?;
    let timer = Instant::now();
    let base = base_tree(&dir)?;
    println!(
        "host: root file system {} ({:.0} s)",
        base.display(),
        timer.elapsed().as_secs_f64()
    );

    let timer = Instant::now();
    let run_dir = dir.join("run");
    let image = make_image(
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
    let (kernel, initrd) = boot_files(&base)?;
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
                if probe(ssh_port, b"", PROBE_TIMEOUT).is_some_and(|l| l.starts_with("SSH-")) {
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
    let result = checks(&mut guest, &ports, started);
    guest.stop();
    result
}

/// A new ed25519 key for root's SSH login, kept under target/vm/host/.
fn ssh_key(dir: &Path) -> Result<PathBuf> {
    let key = dir.join("id_ed25519");
    if !key.exists() || !dir.join("id_ed25519.pub").exists() {
        let _ = std::fs::remove_file(&key);
        setup::output(
            "ssh-keygen",
            &[
                "-q",
                "-t",
                "ed25519",
                "-N",
                "",
                "-C",
                "firewall-host-vm",
                "-f",
                path_str(&key)?,
            ],
        )?;
    }
    Ok(key)
}

/// The recipe of the root file system, which names its cache directory.
fn recipe() -> String {
    format!(
        "mmdebstrap --variant=apt --include={} {SUITE} {MIRROR}\nfiles: {FILES:?}\ncommands: {COMMANDS:?}\n",
        PACKAGES.join(",")
    )
}

fn sha256(text: &str) -> Result<String> {
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("running sha256sum")?;
    child.stdin.take().unwrap().write_all(text.as_bytes())?;
    let output = child.wait_with_output()?;
    let text = String::from_utf8_lossy(&output.stdout);
    Ok(text
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string())
}

/// The cached root file system of the current recipe (built if missing, ~2 minutes).
fn base_tree(dir: &Path) -> Result<PathBuf> {
    let recipe = recipe();
    let hash = sha256(&recipe)?;
    let base = dir.join(format!("base-{}", &hash[..16]));
    let tree = base.join("rootfs");
    if base.join(".complete").exists() {
        return Ok(tree);
    }
    // Older recipes' trees go: each is ~700 MB.
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        if name.starts_with("base-") && path != base {
            eprintln!("host: removing the root file system of an older recipe, {name}");
            std::fs::remove_dir_all(&path)?;
        }
    }
    let _ = std::fs::remove_dir_all(&base);
    std::fs::create_dir_all(&base)?;
    eprintln!("host: building a Debian {SUITE} root file system with mmdebstrap (about 2 minutes)");
    let status = Command::new("mmdebstrap")
        .args(["--variant=apt", "--quiet"])
        .arg(format!("--include={}", PACKAGES.join(",")))
        .args([SUITE, path_str(&tree)?, MIRROR])
        .status()
        .context("running mmdebstrap")?;
    crate::check(status, "mmdebstrap")?;
    for (path, text) in FILES {
        let path = tree.join(path);
        std::fs::create_dir_all(path.parent().unwrap())?;
        std::fs::write(&path, text)?;
    }
    for command in COMMANDS {
        let status = Command::new("chroot")
            .arg(&tree)
            .args(["sh", "-c", command])
            .status()?;
        crate::check(status, command)?;
    }
    std::fs::write(base.join("recipe"), &recipe)?;
    std::fs::write(base.join(".complete"), "")?;
    Ok(tree)
}

/// The kernel and initrd of the root file system (the newest, should there be several).
fn boot_files(tree: &Path) -> Result<(PathBuf, PathBuf)> {
    let boot = tree.join("boot");
    let mut kernels: Vec<PathBuf> = std::fs::read_dir(&boot)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .starts_with("vmlinuz-")
        })
        .collect();
    kernels.sort();
    let kernel = kernels
        .pop()
        .ok_or_else(|| anyhow!("no vmlinuz-* in {}", boot.display()))?;
    let release = kernel.file_name().unwrap().to_string_lossy()["vmlinuz-".len()..].to_string();
    let initrd = boot.join(format!("initrd.img-{release}"));
    if !initrd.is_file() {
        bail!("no {} for the kernel", initrd.display());
    }
    Ok((kernel, initrd))
}

/// A copy of the base tree with the firewall installed and enabled, as a fresh ext4 image.
fn make_image(
    root: &Path,
    base: &Path,
    run_dir: &Path,
    firewall: &Path,
    key: &Path,
    rules: &str,
) -> Result<PathBuf> {
    let _ = std::fs::remove_dir_all(run_dir);
    std::fs::create_dir_all(run_dir)?;
    let tree = run_dir.join("rootfs");
    let status = Command::new("cp").arg("-a").arg(base).arg(&tree).status()?;
    crate::check(status, "cp -a (root file system)")?;
    let rule_file = root.join("rules").join(rules);
    if !rule_file.is_file() {
        bail!("--rules {rules}: no such file in rules/");
    }
    // What `cargo xtask install --root` does, then `systemctl enable firewall`.
    for line in install::install_files(&tree, firewall, &rule_file, NIC)? {
        eprintln!("host: {line}");
    }
    let status = Command::new("chroot")
        .arg(&tree)
        .args(["systemctl", "enable", "firewall"])
        .status()?;
    crate::check(status, "systemctl enable firewall")?;
    let ssh = tree.join("root/.ssh");
    std::fs::create_dir_all(&ssh)?;
    std::fs::set_permissions(&ssh, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
    let public = std::fs::read(key.with_extension("pub"))?;
    std::fs::write(ssh.join("authorized_keys"), public)?;
    let image = run_dir.join("disk.img");
    setup::output(
        "mkfs.ext4",
        &[
            "-q",
            "-F",
            "-L",
            "root",
            "-d",
            path_str(&tree)?,
            path_str(&image)?,
            IMAGE_SIZE,
        ],
    )?;
    std::fs::remove_dir_all(&tree)?;
    Ok(image)
}

/// Host loopback ports forwarded to the guest's SSH, HTTP and denied ports.
struct Ports {
    ssh: u16,
    http: u16,
    denied: u16,
}

impl Ports {
    /// Free ports now (another run may be using 10022 and friends).
    fn free() -> Result<Ports> {
        let listeners: Vec<std::net::TcpListener> = (0..3)
            .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
            .collect::<std::io::Result<_>>()?;
        let port = |i: usize| listeners[i].local_addr().map(|a| a.port());
        Ok(Ports {
            ssh: port(0)?,
            http: port(1)?,
            denied: port(2)?,
        })
    }
}

/// The running guest: QEMU, its console (logged to a file, and a login on it for diagnostics
/// when SSH does not answer) and SSH.
struct Guest {
    qemu: Child,
    console_in: Option<ChildStdin>,
    console: Arc<Mutex<String>>,
    ssh: Vec<String>,
    boot_started: Instant,
}

impl Guest {
    #[allow(clippy::too_many_arguments)]
    fn boot(
        options: &HostOptions,
        kernel: &Path,
        initrd: &Path,
        image: &Path,
        run_dir: &Path,
        ports: &Ports,
        key: &Path,
        interactive: bool,
    ) -> Result<Guest> {
        let accel = match options.accel {
            vm::Accel::Auto if vm::kvm_works() => vm::Accel::Kvm,
            vm::Accel::Auto => vm::Accel::Tcg,
            chosen => chosen,
        };
        let mut command = Command::new("qemu-system-x86_64");
        command
            .args(["-machine", "pc", "-nodefaults"])
            .args(["-m", &options.memory_mib.to_string()])
            .args(["-smp", &options.cpus.to_string()])
            .args(match accel {
                vm::Accel::Kvm => ["-accel", "kvm", "-cpu", "host"],
                // One host thread for all guest CPUs, as for `cargo xtask vm`.
                _ => ["-accel", "tcg,thread=single", "-cpu", "max"],
            })
            .arg("-kernel")
            .arg(kernel)
            .arg("-initrd")
            .arg(initrd)
            .args([
                "-append",
                "root=/dev/vda rw console=ttyS0 random.trust_cpu=on",
            ])
            .arg("-drive")
            .arg(format!(
                "file={},format=raw,if=none,id=root",
                path_str(image)?
            ))
            .args(["-device", "virtio-blk-pci,drive=root,addr=0x4"])
            .args([
                "-netdev",
                &format!(
                    "user,id=net0,hostfwd=tcp:127.0.0.1:{}-:{SSH_PORT},\
                     hostfwd=tcp:127.0.0.1:{}-:{HTTP_PORT},hostfwd=tcp:127.0.0.1:{}-:{DENIED_PORT}",
                    ports.ssh, ports.http, ports.denied
                ),
            ])
            .args([
                "-device",
                &format!("virtio-net-pci,netdev=net0,addr={NIC_PCI_ADDRESS}"),
            ])
            .args(["-device", "virtio-rng-pci", "-display", "none"]);
        if interactive {
            command.args(["-serial", "mon:stdio"]);
        } else {
            command
                .args(["-monitor", "none", "-serial", "stdio"])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped());
        }
        println!(
            "host: booting Debian {SUITE} ({accel:?}, {} MiB, {} CPUs), console {}",
            options.memory_mib,
            options.cpus,
            if interactive {
                "here".to_string()
            } else {
                format!("in {}", run_dir.join("console.log").display())
            }
        );
        let mut qemu = command
            .spawn()
            .context("starting qemu-system-x86_64 (package qemu-system-x86)")?;
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
    fn ssh(&self, command: &str) -> Result<String> {
        self.ssh_within(command, SSH_LIMIT)
    }

    /// The same, given up after `limit`: QEMU's forwarder accepts the connection even while
    /// the guest is down, and ssh would wait for its banner for ever.
    fn ssh_within(&self, command: &str, limit: Duration) -> Result<String> {
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
    fn wait_for_ssh(&self, previous: Option<&str>, limit: Duration) -> Result<String> {
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
    fn wait_console(&self, needle: &str, count: usize, limit: Duration) -> bool {
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
    fn console_run(&mut self, command: &str) -> Option<String> {
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

    fn stop(&mut self) {
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

fn copy_console(mut from: impl std::io::Read, mut log: std::fs::File, console: Arc<Mutex<String>>) {
    let mut buf = [0u8; 4096];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let _ = log.write_all(&buf[..n]);
        console
            .lock()
            .unwrap()
            .push_str(&String::from_utf8_lossy(&buf[..n]));
    }
}

/// What a probe of a forwarded port got: data (the service answered) or nothing.
fn probe(port: u16, request: &[u8], timeout: Duration) -> Option<String> {
    let address = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut stream = TcpStream::connect_timeout(&address, timeout).ok()?;
    stream.set_read_timeout(Some(timeout)).ok()?;
    if !request.is_empty() {
        stream.write_all(request).ok()?;
    }
    let mut reader = std::io::BufReader::new(stream);
    let mut line = String::new();
    match reader.read_line(&mut line) {
        Ok(n) if n > 0 => Some(line.trim().to_string()),
        _ => None,
    }
}

/// The longest an SSH command may take (a restart under emulation takes ~10 s).
const SSH_LIMIT: Duration = Duration::from_secs(120);

const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

fn ssh_answers(ports: &Ports) -> bool {
    probe(ports.ssh, b"", PROBE_TIMEOUT).is_some_and(|l| l.starts_with("SSH-"))
}

fn http_answers(ports: &Ports) -> bool {
    probe(ports.http, b"GET / HTTP/1.0\r\n\r\n", PROBE_TIMEOUT)
        .is_some_and(|l| l.starts_with("HTTP/"))
}

fn denied_answers(ports: &Ports) -> bool {
    probe(ports.denied, b"", PROBE_TIMEOUT).is_some_and(|l| l.contains(GREETING))
}

/// Probes started every `every` until stopped, each in its own thread; counts answers.
struct Prober {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<(usize, usize)>,
}

impl Prober {
    fn start(every: Duration, probe: fn(u16) -> bool, port: u16) -> Prober {
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut probes = Vec::new();
            while !stopping.load(Ordering::Relaxed) {
                probes.push(std::thread::spawn(move || probe(port)));
                std::thread::sleep(every);
            }
            let total = probes.len();
            let answered = probes
                .into_iter()
                .map(|p| p.join().unwrap_or(false))
                .filter(|&answered| answered)
                .count();
            (total, answered)
        });
        Prober { stop, thread }
    }

    /// (probes, answered).
    fn finish(self) -> (usize, usize) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap_or((0, 0))
    }
}

fn denied_probe(port: u16) -> bool {
    probe(port, b"", PROBE_TIMEOUT).is_some_and(|l| l.contains(GREETING))
}

fn http_probe(port: u16) -> bool {
    probe(port, b"GET / HTTP/1.0\r\n\r\n", PROBE_TIMEOUT).is_some_and(|l| l.starts_with("HTTP/"))
}

const DENIED_EVERY: Duration = Duration::from_millis(75);
const ALLOWED_EVERY: Duration = Duration::from_millis(250);

/// The checks' names, in the order they run.
const CHECKS: [&str; 7] = [
    "1 boot: DHCP address, firewall started before the network",
    "2 SSH and HTTP answer, the denied port does not",
    "3 edit + reload, apply --confirm and its roll-back",
    "4 restart under probes",
    "5 kill -9: systemd restarts it",
    "6 stop removes filtering",
    "7 start, reboot: filtering again",
];

/// The checks, each a line with its result and time.
fn checks(guest: &mut Guest, ports: &Ports, started: Instant) -> Result<Report> {
    let mut results: Vec<(String, bool)> = Vec::new();
    let mut record = |name: &str, timer: Instant, outcome: Result<String>| {
        let seconds = timer.elapsed().as_secs_f64();
        let passed = outcome.is_ok();
        match outcome {
            Ok(detail) => println!("host-test: {name}: pass ({seconds:.1} s) {detail}"),
            Err(why) => println!("host-test: {name}: FAIL ({seconds:.1} s) {why:#}"),
        }
        results.push((name.to_string(), passed));
        passed
    };

    // The boot: the console's login prompt, then SSH (which needs the DHCP address).
    let timer = guest.boot_started;
    let booted = guest.wait_console("login:", 1, Duration::from_secs(300));
    let boot_seconds = timer.elapsed().as_secs_f64();
    println!(
        "host: boot to the login prompt: {}",
        if booted {
            format!("{boot_seconds:.0} s")
        } else {
            "none within 300 s".into()
        }
    );
    let ssh = guest.wait_for_ssh(None, Duration::from_secs(if booted { 90 } else { 10 }));
    println!(
        "host: boot to SSH: {}",
        match &ssh {
            Ok(_) => format!("{:.0} s", timer.elapsed().as_secs_f64()),
            Err(why) => format!("{why:#}"),
        }
    );
    let boot_id = match ssh {
        Ok(id) => id,
        Err(why) => {
            let diagnosis = guest
                .console_run(&format!(
                    "ip -4 -o addr show dev {NIC}; ip -o link show dev {NIC}; \
                     systemctl is-active firewall; \
                     journalctl -b --no-pager -o short-monotonic -u firewall -u systemd-networkd | tail -n 15"
                ))
                .unwrap_or_else(|| "(the console did not answer either)".into());
            record(
                CHECKS[0],
                timer,
                Err(anyhow!(
                    "{why:#}: the guest cannot be reached. From its console:\n{}",
                    diagnosis.trim()
                )),
            );
            for name in &CHECKS[1..] {
                println!("host-test: {name}: not run (no SSH)");
                results.push((name.to_string(), false));
            }
            return summary(&results, started);
        }
    };

    let guest = &*guest;
    let runs: [&dyn Fn() -> Result<String>; 7] = [
        &|| check_boot(guest),
        &|| check_verdicts(ports, false),
        &|| check_reload(guest, ports),
        &|| check_restart(guest, ports),
        &|| check_kill(guest, ports),
        &|| check_stop(guest, ports),
        &|| check_reboot(guest, ports, &boot_id),
    ];
    for (name, run) in CHECKS.iter().zip(runs) {
        let timer = Instant::now();
        let outcome = run();
        record(name, timer, outcome);
    }

    summary(&results, started)
}

fn summary(results: &[(String, bool)], started: Instant) -> Result<Report> {
    let passed = results.iter().filter(|r| r.1).count();
    let failed = results.len() - passed;
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "host-test: {passed} passed, {failed} failed, in {seconds:.0} s ({})",
        if failed == 0 { "pass" } else { "FAIL" }
    );
    Ok(Report {
        passed,
        failed,
        seconds,
    })
}

/// `KEY=VALUE` lines of `systemctl show`.
fn show(guest: &Guest, properties: &str) -> Result<std::collections::BTreeMap<String, String>> {
    let text = guest.ssh(&format!("systemctl show firewall -p {properties}"))?;
    Ok(text
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect())
}

fn xdp_on_nic(guest: &Guest) -> Result<bool> {
    let link = guest.ssh(&format!("ip -o link show dev {NIC}"))?;
    Ok(link.contains("xdp"))
}

/// 1: the address from DHCP, the unit active and filtering the NIC, and ready before
/// systemd-networkd configured the address.
fn check_boot(guest: &Guest) -> Result<String> {
    let mut problems = Vec::new();
    let address = guest.ssh(&format!("ip -4 -o addr show dev {NIC}"))?;
    if !address.contains("10.0.2.15/24") {
        problems.push(format!("{NIC} has no 10.0.2.15/24: {}", address.trim()));
    }
    let unit = show(
        guest,
        "ActiveState,ActiveEnterTimestampMonotonic,NRestarts,MainPID",
    )?;
    let active = unit.get("ActiveState").map(String::as_str) == Some("active");
    if !active {
        problems.push(format!("firewall.service is {:?}", unit.get("ActiveState")));
    }
    if !xdp_on_nic(guest)? {
        problems.push(format!("no XDP program on {NIC}"));
    }
    let ready_us: u64 = unit
        .get("ActiveEnterTimestampMonotonic")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    // "[   12.345678] fwhost systemd-networkd[201]: ens3: DHCPv4 address 10.0.2.15/24, ..."
    let journal = guest.ssh(
        "journalctl -b --no-pager -o short-monotonic -u systemd-networkd | grep -m1 'DHCPv4 address' || true",
    )?;
    let configured_us = journal
        .trim()
        .strip_prefix('[')
        .and_then(|rest| rest.split(']').next())
        .and_then(|s| s.trim().parse::<f64>().ok())
        .map(|s| (s * 1e6) as u64);
    let restarts = unit.get("NRestarts").cloned().unwrap_or_default();
    match configured_us {
        None => problems.push("systemd-networkd logged no DHCPv4 address".into()),
        Some(_) if ready_us == 0 => problems.push("firewall.service never became active".into()),
        Some(at) if ready_us >= at => problems.push(format!(
            "firewall ready at {:.2} s, after the address at {:.2} s",
            ready_us as f64 / 1e6,
            at as f64 / 1e6
        )),
        Some(_) => {}
    }
    let detail = format!(
        "firewall ready at {:.2} s (restarts {restarts}), DHCP address at {}",
        ready_us as f64 / 1e6,
        configured_us.map_or("-".into(), |at| format!("{:.2} s", at as f64 / 1e6))
    );
    if problems.is_empty() {
        Ok(detail)
    } else {
        let journal = guest
            .ssh("journalctl -b --no-pager -u firewall | tail -n 25")
            .unwrap_or_default();
        bail!(
            "{}; {detail}\nthe firewall's journal:\n{journal}",
            problems.join("; ")
        )
    }
}

/// 2: SSH and HTTP answer; the denied port answers only if `denied_open`.
fn check_verdicts(ports: &Ports, denied_open: bool) -> Result<String> {
    let (ssh, http, denied) = (
        ssh_answers(ports),
        http_answers(ports),
        denied_answers(ports),
    );
    let detail = format!(
        "SSH {}, HTTP {}, port 8080 {}",
        answered(ssh),
        answered(http),
        answered(denied)
    );
    if ssh && http && denied == denied_open {
        Ok(detail)
    } else {
        bail!("{detail}")
    }
}

fn answered(yes: bool) -> &'static str {
    if yes {
        "answers"
    } else {
        "no answer"
    }
}

/// 3: allow port 8080 in /etc/firewall/rules.toml (saved atomically), `systemctl reload`: it
/// answers; the original back, reload: it does not.
fn check_reload(guest: &Guest, ports: &Ports) -> Result<String> {
    guest.ssh(
        "cp -p /etc/firewall/rules.toml /root/rules.toml.orig && \
         cp -p /etc/firewall/rules.toml /etc/firewall/rules.toml.new && \
         printf '\\n[[rules]]\\nname = \"test-8080\"\\naction = \"allow\"\\nproto = \"tcp\"\\nports = [8080]\\n' \
           >> /etc/firewall/rules.toml.new && \
         mv /etc/firewall/rules.toml.new /etc/firewall/rules.toml",
    )?;
    let reload = guest.ssh("systemctl reload firewall");
    let opened = denied_answers(ports);
    guest.ssh(
        "cp -p /root/rules.toml.orig /etc/firewall/rules.toml.new && \
         mv /etc/firewall/rules.toml.new /etc/firewall/rules.toml",
    )?;
    let revert = guest.ssh("systemctl reload firewall");
    let closed = !denied_answers(ports);
    // `firewall apply` under the unit's sandbox: the file lies in /root, which the daemon
    // cannot see (ProtectHome), so only its text can reach it. On trial for 8 s, then rolled
    // back.
    let apply = guest.ssh(
        "cp -p /etc/firewall/rules.toml /root/open.toml && \
         printf '\n[[rules]]\nname = \"test-8080\"\naction = \"allow\"\nproto = \"tcp\"\nports = [8080]\n' \
           >> /root/open.toml && firewall apply /root/open.toml --confirm 8s",
    );
    let applied = denied_answers(ports);
    std::thread::sleep(Duration::from_secs(10));
    let rolled_back = !denied_answers(ports);
    let detail = format!(
        "allowed: port 8080 {}; reverted: port 8080 {}; applied from /root with --confirm: \
         port 8080 {}; rolled back: port 8080 {}",
        answered(opened),
        answered(!closed),
        answered(applied),
        answered(!rolled_back)
    );
    reload.context("systemctl reload (allowing 8080)")?;
    revert.context("systemctl reload (reverting)")?;
    apply.context("firewall apply --confirm")?;
    if opened && closed && applied && rolled_back {
        Ok(detail)
    } else {
        bail!("{detail}")
    }
}

/// Probes of the denied port (every 75 ms) and HTTP (every 250 ms) around `action`; fails if
/// a denied probe got its greeting or an HTTP probe got no answer.
fn under_probes(ports: &Ports, action: impl FnOnce() -> Result<String>) -> Result<String> {
    let denied = Prober::start(DENIED_EVERY, denied_probe, ports.denied);
    let allowed = Prober::start(ALLOWED_EVERY, http_probe, ports.http);
    std::thread::sleep(Duration::from_secs(1));
    let outcome = action();
    std::thread::sleep(Duration::from_secs(2));
    let (denied_total, denied_through) = denied.finish();
    let (allowed_total, allowed_answered) = allowed.finish();
    let detail = format!(
        "{denied_through} of {denied_total} denied probes got through, \
         {allowed_answered} of {allowed_total} HTTP probes answered"
    );
    let what = outcome?;
    if denied_through == 0 && allowed_answered == allowed_total {
        Ok(format!("{what}; {detail}"))
    } else {
        bail!("{what}; {detail}")
    }
}

fn main_pid(guest: &Guest) -> Result<(String, String)> {
    let unit = show(guest, "MainPID,ActiveState")?;
    Ok((
        unit.get("MainPID").cloned().unwrap_or_default(),
        unit.get("ActiveState").cloned().unwrap_or_default(),
    ))
}

/// 4: `systemctl restart` under probes.
fn check_restart(guest: &Guest, ports: &Ports) -> Result<String> {
    let (before, _) = main_pid(guest)?;
    under_probes(ports, || {
        let timer = Instant::now();
        guest.ssh("systemctl restart firewall")?;
        let seconds = timer.elapsed().as_secs_f64();
        let (after, state) = main_pid(guest)?;
        if after == before || state != "active" {
            bail!("after the restart: pid {after} (was {before}), {state}");
        }
        Ok(format!(
            "restart took {seconds:.1} s, pid {before} -> {after}"
        ))
    })
}

/// 5: `kill -9` of the daemon: systemd starts a new one.
fn check_kill(guest: &Guest, ports: &Ports) -> Result<String> {
    let (before, _) = main_pid(guest)?;
    under_probes(ports, || {
        let timer = Instant::now();
        guest.ssh(&format!("kill -9 {before}"))?;
        loop {
            let (after, state) = main_pid(guest)?;
            if after != before && after != "0" && state == "active" {
                return Ok(format!(
                    "active again as pid {after} (was {before}) after {:.1} s",
                    timer.elapsed().as_secs_f64()
                ));
            }
            if timer.elapsed() > Duration::from_secs(30) {
                bail!("30 s after kill -9: pid {after}, {state}");
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    })
}

/// 6: `systemctl stop` ends filtering: the denied port answers, no XDP on the NIC.
fn check_stop(guest: &Guest, ports: &Ports) -> Result<String> {
    guest.ssh("systemctl stop firewall")?;
    // The kernel frees a link whose last holder let go in deferred work: allow it a moment.
    let mut xdp = xdp_on_nic(guest)?;
    for _ in 0..10 {
        if !xdp {
            break;
        }
        std::thread::sleep(Duration::from_millis(300));
        xdp = xdp_on_nic(guest)?;
    }
    // The guest may first have to serve a backlog: QEMU's forwarder keeps retrying the
    // connections of earlier probes that the firewall dropped, and they all arrive now, each
    // starting a greeting service (slow under emulation).
    let stopped = Instant::now();
    let mut denied = denied_answers(ports);
    while !denied && stopped.elapsed() < Duration::from_secs(90) {
        std::thread::sleep(Duration::from_millis(500));
        denied = denied_answers(ports);
    }
    let detail = format!(
        "after stop: XDP {} {NIC}, port 8080 {} (after {:.1} s)",
        if xdp { "still on" } else { "gone from" },
        answered(denied),
        stopped.elapsed().as_secs_f64()
    );
    if !xdp && denied {
        Ok(detail)
    } else {
        bail!("{detail}")
    }
}

/// 7: `systemctl start`, then a reboot: filtering again after it.
fn check_reboot(guest: &Guest, ports: &Ports, boot_id: &str) -> Result<String> {
    guest.ssh("systemctl start firewall")?;
    let (_, state) = main_pid(guest)?;
    let started = state == "active" && xdp_on_nic(guest)? && !denied_answers(ports);
    // The connection drops as the guest goes down: ssh's status says nothing.
    let _ = guest.ssh_within("systemctl reboot", Duration::from_secs(30));
    let timer = Instant::now();
    guest.wait_for_ssh(Some(boot_id), Duration::from_secs(300))?;
    let reboot_seconds = timer.elapsed().as_secs_f64();
    let (_, state) = main_pid(guest)?;
    let xdp = xdp_on_nic(guest)?;
    let verdicts = check_verdicts(ports, false);
    let detail = format!(
        "after start: {}; reboot to SSH in {reboot_seconds:.0} s; then firewall {state}, XDP {} {NIC}, {}",
        if started { "filtering" } else { "NOT filtering" },
        if xdp { "on" } else { "not on" },
        match &verdicts {
            Ok(d) => d.clone(),
            Err(e) => e.to_string(),
        }
    );
    if started && state == "active" && xdp && verdicts.is_ok() {
        Ok(detail)
    } else {
        bail!("{detail}")
    }
}

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

    /// The recipe names everything that goes into the cached tree, so that a change rebuilds it.
    #[test]
    fn the_recipe_names_packages_files_and_commands() {
        let recipe = recipe();
        for needle in [
            "openssh-server",
            "bookworm",
            "greet.socket",
            "passwd -d root",
        ] {
            assert!(recipe.contains(needle), "{needle} not in {recipe}");
        }
    }
}
