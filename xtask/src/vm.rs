//! `cargo xtask vm`: the firewall, or its packet and end-to-end tests, inside a throwaway
//! QEMU machine booting a stock Debian kernel.
//!
//! Nothing of the guest comes from this machine's root filesystem but `ip` (which the tests
//! run) and its libraries: the kernel and its modules come from Debian's archive (the newest
//! of a release's `linux-image-amd64` metapackage, fetched with apt into target/vm/ and kept
//! by checksum), and the initramfs is written here, holding a static init (`vm-init`), the
//! static firewall, the rule files and the test binaries.
use std::collections::{BTreeMap, BTreeSet};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{anyhow, bail, Context as _, Result};

use crate::setup;

/// The guest's target: static binaries need no libraries in the initramfs.
pub const GUEST_TARGET: &str = "x86_64-unknown-linux-musl";

/// A kernel users run, by the Debian release that ships it.
pub struct DebianKernel {
    pub name: &'static str,
    pub suite: &'static str,
}

/// Debian 12's kernel (the oldest supported) and Debian 13's.
pub const DEBIAN_KERNELS: &[DebianKernel] = &[
    DebianKernel {
        name: "6.1",
        suite: "bookworm",
    },
    DebianKernel {
        name: "6.12",
        suite: "trixie",
    },
];

/// What `cargo xtask vm` boots unless told otherwise: the newer of the two.
pub const DEFAULT_KERNEL: &str = "6.12";

pub fn debian_kernel_names() -> Vec<String> {
    DEBIAN_KERNELS.iter().map(|k| k.name.into()).collect()
}

/// Modules the guest needs, if the kernel has them as modules: the virtio NIC, veth for the
/// tests' namespaces, clsact + cls_bpf for tc egress on kernels without TCX (before 6.6), tun
/// for the test of interfaces without a link header.
/// Their dependencies are found from the modules themselves.
const WANTED_MODULES: &[&str] = &[
    "virtio_pci",
    "virtio_net",
    "veth",
    "sch_ingress",
    "cls_bpf",
    "tun",
];

/// The guest's address on QEMU's user-mode network, and the host as the guest sees it
/// (QEMU forwards connections to it to the host's loopback).
const GUEST_ADDRESS: &str = "10.0.2.15/24";
const HOST_ADDRESS: &str = "10.0.2.2";

/// Guest ports that answer TCP connections with a greeting in `cargo xtask vm`, each
/// forwarded from 127.0.0.1:(10000 + port) on the host: what `rules/default.toml` allows
/// (22, 80, 443) and what it does not (23, 8080).
const DEMO_PORTS: &[u16] = &[22, 23, 80, 443, 8080];

/// A kernel to boot: its image and, if it has loadable modules, their directory
/// (`lib/modules/RELEASE`).
pub struct Kernel {
    pub label: String,
    pub image: PathBuf,
    pub modules: Option<PathBuf>,
}

/// How QEMU runs the guest.
#[derive(Clone, Copy, PartialEq, Eq, Debug, clap::ValueEnum)]
pub enum Accel {
    /// KVM if the host has a KVM that boots stock kernels, else TCG.
    Auto,
    Kvm,
    Tcg,
}

/// What the guest runs.
pub enum Plan {
    /// `firewall run` on the guest's NIC, interactively, with these extra arguments.
    Firewall { rules: String, extra: Vec<String> },
    /// The test suites, with these arguments for each test binary.
    Tests { extra: Vec<String> },
}

/// Guest memory and CPUs unless told otherwise: the tests' namespaces and maps fit in 2 GiB.
pub const MEMORY_MIB: u32 = 2048;
pub const CPUS: u32 = 2;

pub struct Options {
    pub accel: Accel,
    pub memory_mib: u32,
    pub cpus: u32,
    /// Print the kernel's boot messages too.
    pub verbose: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            accel: Accel::Auto,
            memory_mib: MEMORY_MIB,
            cpus: CPUS,
            verbose: false,
        }
    }
}

/// `--kernel 6.1|6.12|PATH` to a bootable kernel; `modules` for a kernel of one's own.
pub fn kernel(root: &Path, choice: &str, modules: Option<PathBuf>) -> Result<Kernel> {
    if let Some(debian) = DEBIAN_KERNELS.iter().find(|k| k.name == choice) {
        return debian_kernel(root, debian);
    }
    let image = PathBuf::from(choice);
    if !image.is_file() {
        bail!(
            "--kernel {choice}: neither a Debian kernel ({}) nor a kernel image file",
            DEBIAN_KERNELS
                .iter()
                .map(|k| k.name)
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(Kernel {
        label: choice.to_string(),
        image,
        modules,
    })
}

/// The newest kernel of a Debian release, fetched (and checked) by apt from Debian's archive
/// into a private apt state under target/vm/apt/, kept under target/vm/kernels/SHA256/.
fn debian_kernel(root: &Path, debian: &DebianKernel) -> Result<Kernel> {
    let vm_dir = root.join("target/vm");
    let apt = Apt::new(&vm_dir.join("apt").join(debian.suite), debian.suite)?;
    apt.update_if_stale()?;
    let meta = apt.show("linux-image-amd64")?;
    let package = first_dependency(&meta)
        .ok_or_else(|| anyhow!("linux-image-amd64 in {} depends on nothing", debian.suite))?;
    let fields = apt.show(&package)?;
    let sha256 = field(&fields, "SHA256")
        .ok_or_else(|| anyhow!("{package}: no SHA256 in the {} index", debian.suite))?;
    let version = field(&fields, "Version").unwrap_or_default();
    let tree = vm_dir.join("kernels").join(&sha256);
    let complete = tree.join(".complete");
    if !complete.exists() {
        eprintln!("vm: fetching {package} {version} ({})", debian.suite);
        let download = vm_dir.join("downloads");
        let _ = std::fs::remove_dir_all(&download);
        std::fs::create_dir_all(&download)?;
        // apt checks the file against the index, whose signature it checked.
        apt.download(&format!("{package}={version}"), &download)?;
        let deb = std::fs::read_dir(&download)?
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .find(|path| path.extension().is_some_and(|e| e == "deb"))
            .ok_or_else(|| anyhow!("apt-get download left no .deb"))?;
        let _ = std::fs::remove_dir_all(&tree);
        std::fs::create_dir_all(&tree)?;
        setup::output("dpkg-deb", &["-x", path_str(&deb)?, path_str(&tree)?])?;
        std::fs::remove_dir_all(&download)?;
        std::fs::write(&complete, format!("{package} {version}\n"))?;
    }
    let release = package
        .strip_prefix("linux-image-")
        .ok_or_else(|| anyhow!("unexpected kernel package name {package}"))?;
    let image = tree.join(format!("boot/vmlinuz-{release}"));
    let modules = ["lib/modules", "usr/lib/modules"]
        .iter()
        .map(|dir| tree.join(dir).join(release))
        .find(|dir| dir.is_dir());
    Ok(Kernel {
        label: format!(
            "{} (Debian {}, {package} {version})",
            debian.name, debian.suite
        ),
        image,
        modules,
    })
}

/// apt with a state of its own: one Debian release, nothing of the host's configuration.
struct Apt {
    dir: PathBuf,
    options: Vec<String>,
}

impl Apt {
    fn new(dir: &Path, suite: &str) -> Result<Apt> {
        for sub in ["lists/partial", "cache/archives/partial", "parts"] {
            std::fs::create_dir_all(dir.join(sub))?;
        }
        std::fs::write(
            dir.join("sources.list"),
            format!(
                "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] \
                 http://deb.debian.org/debian {suite} main\n"
            ),
        )?;
        let at = |sub: &str| dir.join(sub).display().to_string();
        let options = [
            format!("Dir::Etc::SourceList={}", at("sources.list")),
            "Dir::Etc::SourceParts=/dev/null".into(),
            format!("Dir::Etc::Parts={}", at("parts")),
            format!("Dir::State::Lists={}", at("lists")),
            format!("Dir::Cache={}", at("cache")),
            "Dir::State::status=/dev/null".into(),
            "APT::Architecture=amd64".into(),
            "Acquire::Languages=none".into(),
            "APT::Sandbox::User=root".into(),
            setup::APT_LOCK_WAIT[1].into(),
        ]
        .into_iter()
        .flat_map(|option| ["-o".to_string(), option])
        .collect();
        Ok(Apt {
            dir: dir.to_path_buf(),
            options,
        })
    }

    /// Refreshes the index once a day; offline, an older index still names a kernel that is
    /// probably cached.
    fn update_if_stale(&self) -> Result<()> {
        let stamp = self.dir.join("updated");
        let fresh = std::fs::metadata(&stamp)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| SystemTime::now().duration_since(t).ok())
            .is_some_and(|age| age < Duration::from_secs(24 * 3600));
        if fresh {
            return Ok(());
        }
        let output = Command::new("apt-get")
            .args(&self.options)
            .args(["-q", "update"])
            .output()
            .context("running apt-get update")?;
        if output.status.success() {
            std::fs::write(&stamp, "")?;
        } else if stamp.exists() {
            eprintln!(
                "vm: apt-get update failed, using the index of the last update:\n{}",
                String::from_utf8_lossy(&output.stderr)
            );
        } else {
            bail!(
                "apt-get update for the kernel index failed:\n{}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(())
    }

    /// The index stanza of `package` (its first, newest version).
    fn show(&self, package: &str) -> Result<String> {
        let output = Command::new("apt-cache")
            .args(&self.options)
            .args(["show", package])
            .output()
            .context("running apt-cache")?;
        if !output.status.success() {
            bail!(
                "apt-cache show {package}: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        let text = String::from_utf8_lossy(&output.stdout);
        Ok(text.split("\n\n").next().unwrap_or_default().to_string())
    }

    fn download(&self, package: &str, into: &Path) -> Result<()> {
        let status = Command::new("apt-get")
            .args(&self.options)
            .args(["-q", "download", package])
            .current_dir(into)
            .status()
            .context("running apt-get download")?;
        if !status.success() {
            bail!("apt-get download {package} failed ({status})");
        }
        Ok(())
    }
}

fn field(stanza: &str, name: &str) -> Option<String> {
    stanza.lines().find_map(|line| {
        let (key, value) = line.split_once(": ")?;
        (key == name).then(|| value.trim().to_string())
    })
}

/// `linux-image-6.1.0-50-amd64` from `Depends: linux-image-6.1.0-50-amd64 (= 6.1.176-1)`.
fn first_dependency(stanza: &str) -> Option<String> {
    let depends = field(stanza, "Depends")?;
    let first = depends
        .split([',', '|'])
        .next()?
        .split_whitespace()
        .next()?;
    Some(first.to_string())
}

/// Module files to load, dependencies first, for the modules the guest needs that `kernel`
/// has as loadable modules (built-in ones and ones it lacks are skipped).
pub fn modules_to_load(modules_dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files = BTreeMap::new();
    index_modules(modules_dir, &mut files)?;
    let mut order = Vec::new();
    let mut seen = BTreeSet::new();
    for name in WANTED_MODULES {
        add_with_dependencies(name, &files, &mut seen, &mut order)?;
    }
    Ok(order)
}

/// Module name (with `_` for `-`) -> file, for every module under `dir`.
fn index_modules(dir: &Path, files: &mut BTreeMap<String, PathBuf>) -> Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            index_modules(&path, files)?;
        } else if let Some(file) = path.file_name().and_then(|n| n.to_str()) {
            if let Some(name) = [".ko", ".ko.xz", ".ko.zst"]
                .iter()
                .find_map(|ext| file.strip_suffix(ext))
            {
                files.insert(name.replace('-', "_"), path);
            }
        }
    }
    Ok(())
}

fn add_with_dependencies(
    name: &str,
    files: &BTreeMap<String, PathBuf>,
    seen: &mut BTreeSet<String>,
    order: &mut Vec<PathBuf>,
) -> Result<()> {
    if !seen.insert(name.to_string()) {
        return Ok(());
    }
    // Not a file: built in (or absent, which the guest will say when it matters).
    let Some(path) = files.get(name) else {
        return Ok(());
    };
    for dependency in module_dependencies(path)? {
        add_with_dependencies(&dependency, files, seen, order)?;
    }
    order.push(path.clone());
    Ok(())
}

/// The `depends=` entry of a module's .modinfo section: NUL-separated `key=value` strings.
fn module_dependencies(path: &Path) -> Result<Vec<String>> {
    let bytes = read_module(path)?;
    let needle = b"\0depends=";
    let Some(start) = bytes.windows(needle.len()).position(|w| w == needle) else {
        return Ok(Vec::new());
    };
    let value = &bytes[start + needle.len()..];
    let end = value.iter().position(|&b| b == 0).unwrap_or(value.len());
    Ok(String::from_utf8_lossy(&value[..end])
        .split(',')
        .filter(|d| !d.is_empty())
        .map(|d| d.replace('-', "_"))
        .collect())
}

fn read_module(path: &Path) -> Result<Vec<u8>> {
    let name = path.to_string_lossy();
    let decompress = if name.ends_with(".xz") {
        Some("xz")
    } else if name.ends_with(".zst") {
        Some("zstd")
    } else {
        None
    };
    match decompress {
        None => Ok(std::fs::read(path)?),
        Some(tool) => {
            let output = Command::new(tool)
                .args(["-dc"])
                .arg(path)
                .output()
                .with_context(|| format!("running {tool} on {}", path.display()))?;
            if !output.status.success() {
                bail!("{tool} -dc {} failed", path.display());
            }
            Ok(output.stdout)
        }
    }
}

/// The static binaries the guest runs, built for [`GUEST_TARGET`].
pub struct GuestBinaries {
    pub init: PathBuf,
    pub firewall: PathBuf,
    /// Test suite name -> test binary.
    pub tests: Vec<(String, PathBuf)>,
}

/// The packet-level and end-to-end suites; the differential one runs with fewer packets, and
/// last: it waits for the machine to be up a minute (flows cannot be older than it).
const GUEST_SUITES: &[&str] = &["packets", "e2e", "differential"];

pub fn build_guest(env: &setup::Env, root: &Path, with_tests: bool) -> Result<GuestBinaries> {
    let status = env
        .cargo()
        .args(["build", "--release", "--target", GUEST_TARGET])
        .args(["-p", "firewall", "-p", "vm-init"])
        .status()?;
    crate::check(status, "cargo build (guest)")?;
    let out = root.join("target").join(GUEST_TARGET).join("release");
    let mut tests = Vec::new();
    if with_tests {
        let output = env
            .cargo()
            .args(["test", "--release", "--no-run", "--target", GUEST_TARGET])
            .args(["-p", "firewall", "--message-format=json-render-diagnostics"])
            .args(GUEST_SUITES.iter().flat_map(|suite| ["--test", suite]))
            .stderr(Stdio::inherit())
            .output()?;
        crate::check(output.status, "cargo test --no-run (guest)")?;
        for line in String::from_utf8_lossy(&output.stdout).lines() {
            let Ok(message) = serde_json::from_str::<serde_json::Value>(line) else {
                continue;
            };
            let name = message["target"]["name"].as_str().unwrap_or_default();
            if let (Some(executable), true) = (
                message["executable"].as_str(),
                message["profile"]["test"].as_bool() == Some(true),
            ) {
                if GUEST_SUITES.contains(&name) {
                    tests.push((name.to_string(), PathBuf::from(executable)));
                }
            }
        }
        tests.sort_by_key(|(name, _)| GUEST_SUITES.iter().position(|s| s == name));
        if tests.len() != GUEST_SUITES.len() {
            bail!(
                "cargo built {} of the test suites {GUEST_SUITES:?}",
                tests.len()
            );
        }
    }
    Ok(GuestBinaries {
        init: out.join("vm-init"),
        firewall: out.join("firewall"),
        tests,
    })
}

/// Writes the initramfs for `plan` on `kernel` to `path`.
///
/// The guest's commands are lines split at spaces, so no argument may contain one.
pub fn write_initramfs(
    path: &Path,
    root: &Path,
    kernel: &Kernel,
    binaries: &GuestBinaries,
    plan: &Plan,
    host_port: Option<u16>,
) -> Result<()> {
    let extra = match plan {
        Plan::Firewall { extra, .. } | Plan::Tests { extra } => extra,
    };
    if let Some(arg) = extra.iter().find(|arg| arg.contains(char::is_whitespace)) {
        bail!("{arg:?}: arguments for the guest cannot contain spaces");
    }
    if let Plan::Firewall { rules, .. } = plan {
        if !root.join("rules").join(rules).is_file() {
            bail!("--rules {rules}: no such file in rules/");
        }
    }
    let mut cpio = Cpio::default();
    for dir in [
        "dev", "proc", "sys", "run", "tmp", "vm", "bin", "rules", "tests",
    ] {
        cpio.dir(dir);
    }
    cpio.dir("var");
    cpio.symlink("var/run", "../run");
    // The kernel gives init /dev/console as its stdio before anything is mounted.
    cpio.char_device("dev/console", 5, 1);
    cpio.file("init", &std::fs::read(&binaries.init)?, 0o755);
    cpio.file("bin/firewall", &std::fs::read(&binaries.firewall)?, 0o755);
    for entry in std::fs::read_dir(root.join("rules"))? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            cpio.file(
                &format!("rules/{name}"),
                &std::fs::read(entry.path())?,
                0o644,
            );
        }
    }
    let mut module_list = String::new();
    if let Some(dir) = &kernel.modules {
        cpio.dir("vm/modules.d");
        for module in modules_to_load(dir)? {
            let name = module.file_name().unwrap().to_string_lossy();
            let guest = format!("vm/modules.d/{name}");
            cpio.file(&guest, &std::fs::read(&module)?, 0o644);
            module_list += &format!("/{guest}\n");
        }
    }
    cpio.file("vm/modules", module_list.as_bytes(), 0o644);
    cpio.file(
        "vm/net",
        format!("eth0 {GUEST_ADDRESS}\n").as_bytes(),
        0o644,
    );
    let mut env = String::from("PATH=/usr/sbin:/usr/bin:/sbin:/bin\nHOME=/tmp\n");
    let commands = match plan {
        Plan::Firewall { rules, extra } => {
            let ports: Vec<String> = DEMO_PORTS.iter().map(u16::to_string).collect();
            cpio.file("vm/listen", ports.join("\n").as_bytes(), 0o644);
            env += "RUST_LOG=info\n";
            format!(
                "/bin/firewall run --rules /rules/{rules} --iface eth0 --pin-dir \
                 /sys/fs/bpf/firewall {}\n",
                extra.join(" ")
            )
        }
        Plan::Tests { extra } => {
            // The tests run `ip` (namespaces, veth) and `tc`: the host's, with their libraries.
            for program in ["/usr/sbin/ip", "/usr/sbin/tc"] {
                add_with_libraries(&mut cpio, Path::new(program))?;
            }
            env += "FIREWALL_EXE=/bin/firewall\nRUST_BACKTRACE=1\nFW_VM_NIC=eth0\n";
            if let Some(port) = host_port {
                env += &format!("FW_VM_HOST={HOST_ADDRESS}:{port}\n");
            }
            // Under emulation a million frames and 400 rule sets take minutes; the host runs
            // the full count.
            env += "FW_PACKETS=50000\nFW_RULE_SETS=100\n";
            let mut commands = String::new();
            for (suite, binary) in &binaries.tests {
                cpio.file(&format!("tests/{suite}"), &std::fs::read(binary)?, 0o755);
                // The ignored tests are the ones that need this VM (its NIC).
                commands += &format!("/tests/{suite} --include-ignored {}\n", extra.join(" "));
            }
            commands
        }
    };
    cpio.file("vm/env", env.as_bytes(), 0o644);
    cpio.file("vm/commands", commands.as_bytes(), 0o644);
    std::fs::write(path, cpio.finish()).with_context(|| format!("writing {}", path.display()))
}

/// Copies a dynamically linked host program into the initramfs at its own path, with the
/// libraries and loader `ldd` names.
fn add_with_libraries(cpio: &mut Cpio, program: &Path) -> Result<()> {
    let ldd = setup::output("ldd", &[path_str(program)?])?;
    let mut files = vec![program.to_path_buf()];
    for line in ldd.lines() {
        // "libx.so.1 => /lib/x86_64-linux-gnu/libx.so.1 (0x...)" or "/lib64/ld-linux... (0x...)"
        let path = line
            .split("=>")
            .last()
            .and_then(|rest| rest.split_whitespace().next())
            .filter(|p| p.starts_with('/'));
        files.extend(path.map(PathBuf::from));
    }
    for file in files {
        let guest = file.to_string_lossy().trim_start_matches('/').to_string();
        let mut parent = String::new();
        for component in guest.split('/').collect::<Vec<_>>().split_last().unwrap().1 {
            parent = if parent.is_empty() {
                component.to_string()
            } else {
                format!("{parent}/{component}")
            };
            cpio.dir(&parent);
        }
        // Through symlinks: the guest gets the library itself under the name asked for.
        // Programs share libraries: each goes in once.
        if cpio.paths.insert(guest.clone()) {
            cpio.file(&guest, &std::fs::read(&file)?, 0o755);
        }
    }
    Ok(())
}

/// A newc-format cpio archive, what the kernel unpacks as its initramfs.
#[derive(Default)]
struct Cpio {
    bytes: Vec<u8>,
    inode: u32,
    /// Directories (each written once) and host files copied in.
    paths: BTreeSet<String>,
}

impl Cpio {
    fn dir(&mut self, path: &str) {
        if self.paths.insert(path.to_string()) {
            self.entry(path, 0o040_755, 0, b"");
        }
    }

    fn file(&mut self, path: &str, data: &[u8], mode: u32) {
        self.entry(path, 0o100_000 | mode, 0, data);
    }

    fn symlink(&mut self, path: &str, target: &str) {
        self.entry(path, 0o120_777, 0, target.as_bytes());
    }

    fn char_device(&mut self, path: &str, major: u32, minor: u32) {
        self.entry(path, 0o020_600, (major << 8) | minor, b"");
    }

    /// `rdev` packs major << 8 | minor.
    fn entry(&mut self, path: &str, mode: u32, rdev: u32, data: &[u8]) {
        self.inode += 1;
        let fields = [
            self.inode,
            mode,
            0, // uid
            0, // gid
            if mode & 0o170_000 == 0o040_000 { 2 } else { 1 },
            0, // mtime
            data.len() as u32,
            0, // device major
            0, // device minor
            rdev >> 8,
            rdev & 0xff,
            path.len() as u32 + 1,
            0, // checksum (newc has none)
        ];
        self.bytes.extend_from_slice(b"070701");
        for field in fields {
            self.bytes
                .extend_from_slice(format!("{field:08x}").as_bytes());
        }
        self.bytes.extend_from_slice(path.as_bytes());
        self.bytes.push(0);
        self.pad();
        self.bytes.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        self.bytes.resize(self.bytes.len().next_multiple_of(4), 0);
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, 0, b"");
        self.bytes
    }
}

/// Listens on a free port of the host's loopback, for as long as this process lives, and
/// greets every connection with `hello from the host`; returns the port.
pub fn greet_on_host() -> Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    std::thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            let _ = stream.write_all(b"hello from the host\n");
        }
    });
    Ok(port)
}

/// Whether this host's KVM boots stock kernels: a real kvm_intel/kvm_amd, not a nested kind
/// (such as kvm_pvm) on which they hang.
pub(crate) fn kvm_works() -> bool {
    Path::new("/dev/kvm").exists()
        && (Path::new("/sys/module/kvm_intel").exists()
            || Path::new("/sys/module/kvm_amd").exists())
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
    let accel = match options.accel {
        Accel::Auto if kvm_works() => Accel::Kvm,
        Accel::Auto => Accel::Tcg,
        chosen => chosen,
    };
    match boot_with(kernel, initramfs, options, interactive, accel)? {
        BootOutcome::Done(outcome) => Ok(outcome),
        BootOutcome::NeverBooted(why) if accel == Accel::Kvm && options.accel == Accel::Auto => {
            eprintln!(
                "vm: under KVM {why}; trying software emulation (TCG). Pass --accel tcg to \
                 skip KVM on this host."
            );
            match boot_with(kernel, initramfs, options, interactive, Accel::Tcg)? {
                BootOutcome::Done(outcome) => Ok(outcome),
                BootOutcome::NeverBooted(why) => bail!("under TCG too, {why}"),
            }
        }
        BootOutcome::NeverBooted(why) => {
            bail!("under {accel:?}, {why}; try another --accel, or --verbose")
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
    let mut command = Command::new("qemu-system-x86_64");
    command
        .args(["-machine", "pc", "-nodefaults", "-no-reboot"])
        .args(["-m", &options.memory_mib.to_string()])
        .args(["-smp", &options.cpus.to_string()])
        .args(match accel {
            Accel::Kvm => ["-accel", "kvm", "-cpu", "host"],
            // One host thread for all guest CPUs: with a thread per CPU, a 6.12 guest once
            // executed a stale int3 in the XDP dispatcher that another CPU had just patched
            // (kernel oops "int3" in bpf_dispatcher_xdp_func while a test attached XDP under
            // traffic), which looks like emulated cross-modifying code. ~40% slower.
            _ => ["-accel", "tcg,thread=single", "-cpu", "max"],
        })
        .arg("-kernel")
        .arg(&kernel.image)
        .arg("-initrd")
        .arg(initramfs)
        .args(["-append", &append]);
    let mut forwards = vec![String::from("user,id=net0")];
    if interactive {
        forwards.extend(
            DEMO_PORTS
                .iter()
                .map(|port| format!("hostfwd=tcp:127.0.0.1:{}-:{port}", 10_000 + port)),
        );
        // The console on this terminal, with QEMU's Ctrl-A escapes (Ctrl-A X quits).
        command.args(["-display", "none", "-serial", "mon:stdio"]);
    } else {
        command
            .args(["-display", "none", "-monitor", "none", "-serial", "stdio"])
            .stdin(Stdio::null());
    }
    command
        .args(["-netdev", &forwards.join(",")])
        .args(["-device", "virtio-net-pci,netdev=net0"])
        .args(["-device", "virtio-rng-pci"])
        .stdout(Stdio::piped());
    eprintln!(
        "vm: booting {} ({accel:?}, {} MiB, {} CPUs)",
        kernel.label, options.memory_mib, options.cpus
    );
    let started = Instant::now();
    let mut qemu = command
        .spawn()
        .context("starting qemu-system-x86_64 (package qemu-system-x86)")?;
    let stdout = qemu.stdout.take().unwrap();
    let (lines, events) = mpsc::channel();
    let reader = std::thread::spawn(move || forward_console(stdout, lines));
    let watchdog = match accel {
        Accel::Kvm => BOOT_WATCHDOG_KVM,
        _ => BOOT_WATCHDOG_TCG,
    };
    let mut booted = false;
    let mut result = None;
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

/// The init's first line, and the line with its result.
const BOOTED: &str = "vm-init: up";
const RESULT: &str = "VM-RESULT:";

enum Console {
    Booted,
    Result(String),
}

/// Copies the guest console to our stdout as it comes, and reports the lines that matter.
fn forward_console(mut from: impl std::io::Read, events: mpsc::Sender<Console>) {
    let mut line = Vec::new();
    let mut buf = [0u8; 4096];
    let mut out = std::io::stdout();
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let _ = out.write_all(&buf[..n]);
        let _ = out.flush();
        for &byte in &buf[..n] {
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
            } else {
                continue;
            };
            if events.send(event).is_err() {
                return;
            }
        }
    }
}

pub(crate) fn path_str(path: &Path) -> Result<&str> {
    path.to_str()
        .ok_or_else(|| anyhow!("non-UTF-8 path {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_metapackage_names_the_kernel_package() {
        let stanza = "Package: linux-image-amd64\nVersion: 6.1.176-1\n\
                      Depends: linux-image-6.1.0-50-amd64 (= 6.1.176-1)\nSHA256: ab\n";
        assert_eq!(
            first_dependency(stanza).as_deref(),
            Some("linux-image-6.1.0-50-amd64")
        );
        assert_eq!(field(stanza, "SHA256").as_deref(), Some("ab"));
        assert_eq!(field(stanza, "Size"), None);
    }

    /// Module files with only a .modinfo-like `depends=` string: loaded dependencies first,
    /// each once; built-in (absent) dependencies skipped; `-` and `_` alike.
    #[test]
    fn modules_load_after_their_dependencies() {
        let dir = std::env::temp_dir().join(format!("xtask-modules-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let module = |path: &str, depends: &str| {
            let path = dir.join(path);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            let body = format!("\x7fELF junk\0license=GPL\0depends={depends}\0vermagic=6.1\0");
            std::fs::write(path, body).unwrap();
        };
        module(
            "kernel/drivers/net/virtio_net.ko",
            "net_failover,virtio,virtio_ring",
        );
        module("kernel/drivers/net/net_failover.ko", "failover");
        module("kernel/net/core/failover.ko", "");
        module(
            "kernel/drivers/virtio/virtio_pci.ko",
            "virtio_pci-modern-dev,virtio,virtio_ring",
        );
        module("kernel/drivers/virtio/virtio_pci_modern_dev.ko", "");
        module("kernel/drivers/net/veth.ko", "");
        module("kernel/drivers/net/dummy.ko", "");
        // virtio and virtio_ring are built in: no files. sch_ingress and cls_bpf too.
        let order: Vec<String> = modules_to_load(&dir)
            .unwrap()
            .iter()
            .map(|p| p.file_stem().unwrap().to_string_lossy().into_owned())
            .collect();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(
            order,
            [
                "virtio_pci_modern_dev",
                "virtio_pci",
                "failover",
                "net_failover",
                "virtio_net",
                "veth"
            ]
        );
    }

    /// The archive as the kernel reads it: newc headers, names and data padded to 4 bytes.
    #[test]
    fn cpio_entries_are_newc() {
        let mut cpio = Cpio::default();
        cpio.dir("vm");
        cpio.dir("vm");
        cpio.file("vm/env", b"A=1\n", 0o644);
        cpio.char_device("dev/console", 5, 1);
        let bytes = cpio.finish();
        let mut entries = Vec::new();
        let mut at = 0;
        loop {
            let header = std::str::from_utf8(&bytes[at..at + 110]).unwrap();
            assert_eq!(&header[..6], "070701");
            let field = |i: usize| u32::from_str_radix(&header[6 + 8 * i..14 + 8 * i], 16).unwrap();
            let (mode, size, rdev_major, rdev_minor, name_len) =
                (field(1), field(6), field(9), field(10), field(11) as usize);
            let name_at = at + 110;
            let name = std::str::from_utf8(&bytes[name_at..name_at + name_len - 1]).unwrap();
            assert_eq!(bytes[name_at + name_len - 1], 0);
            let data_at = (name_at + name_len).next_multiple_of(4);
            let data = &bytes[data_at..data_at + size as usize];
            entries.push((
                name.to_string(),
                mode,
                data.to_vec(),
                (rdev_major, rdev_minor),
            ));
            at = (data_at + size as usize).next_multiple_of(4);
            if name == "TRAILER!!!" {
                break;
            }
        }
        assert_eq!(at, bytes.len());
        let names: Vec<&str> = entries.iter().map(|e| e.0.as_str()).collect();
        assert_eq!(names, ["vm", "vm/env", "dev/console", "TRAILER!!!"]);
        assert_eq!(entries[0].1, 0o040_755);
        assert_eq!(
            (entries[1].1, entries[1].2.as_slice()),
            (0o100_644, &b"A=1\n"[..])
        );
        assert_eq!((entries[2].1, entries[2].3), (0o020_600, (5, 1)));
    }
}
