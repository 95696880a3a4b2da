//! The build chain, installed on demand and verified on every run.
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context as _, Result};

const BPF_LINKER_VERSION: &str = "0.13.0";
/// Debian packages the tests use, by the command (or, starting with `/`, the file) that proves
/// each is there.
const PACKAGES: &[(&str, &str)] = &[("ip", "iproute2")];
/// What the tests add: a DHCP server (dnsmasq-base has no service to start) and client for
/// the end-to-end DHCP test, hping3 for the SYN flood test, fail2ban for the bans' action,
/// and `/etc/services` for the port names of rule files.
pub const TEST_PACKAGES: &[(&str, &str)] = &[
    ("/etc/services", "netbase"),
    ("dnsmasq", "dnsmasq-base"),
    ("dhclient", "isc-dhcp-client"),
    ("hping3", "hping3"),
    ("fail2ban-server", "fail2ban"),
];
/// What the tests in the VMs take from the host (copied into the guest with their libraries).
pub const GUEST_TEST_PACKAGES: &[(&str, &str)] = &[("hping3", "hping3")];
/// What the benchmark adds: nftables, to compare set load times.
pub const BENCH_PACKAGES: &[(&str, &str)] = &[("nft", "nftables")];
/// What `bench --wholepath` adds: the filters it compares, ethtool for GRO and the veth
/// counters, bpftool for the program's size.
pub const WHOLEPATH_PACKAGES: &[(&str, &str)] = &[
    ("nft", "nftables"),
    ("ip6tables", "iptables"),
    ("xdp-filter", "xdp-tools"),
    ("ethtool", "ethtool"),
    ("bpftool", "bpftool"),
];
/// What `cargo xtask image` adds: podman builds the image; its test runs it with runc (crun
/// refuses a hybrid cgroup hierarchy whose v2 part holds a controller, as some VMs have).
pub const IMAGE_PACKAGES: &[(&str, &str)] = &[("podman", "podman"), ("runc", "runc")];
/// What `cargo xtask vm` adds: QEMU, dpkg-deb for the kernel packages, xz for their modules.
pub const VM_PACKAGES: &[(&str, &str)] = &[
    ("qemu-system-x86_64", "qemu-system-x86"),
    ("dpkg-deb", "dpkg"),
    ("xz", "xz-utils"),
];

/// For every apt-get call: wait up to 10 minutes for another apt or dpkg (an unattended
/// upgrade, a second `cargo xtask`) to release dpkg's lock instead of failing at once.
pub const APT_LOCK_WAIT: [&str; 2] = ["-o", "DPkg::Lock::Timeout=600"];

/// What later steps need: where bpf-linker lives.
pub struct Env {
    bpf_linker_bin: PathBuf,
}

impl Env {
    /// `cargo` with bpf-linker on PATH.
    pub fn cargo(&self) -> Command {
        let mut command = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        let path = std::env::var_os("PATH").unwrap_or_default();
        let mut paths = vec![self.bpf_linker_bin.clone()];
        paths.extend(std::env::split_paths(&path));
        command.env("PATH", std::env::join_paths(paths).expect("valid PATH"));
        command
    }
}

pub fn setup() -> Result<Env> {
    ensure_nightly()?;
    let bpf_linker_bin = ensure_bpf_linker()?;
    ensure_packages(PACKAGES)?;
    Ok(Env { bpf_linker_bin })
}

pub fn output(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {program}"))?;
    if !out.status.success() {
        bail!(
            "{program} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn run(program: &str, args: &[&str]) -> Result<()> {
    eprintln!("setup: {program} {}", args.join(" "));
    let status = Command::new(program).args(args).status()?;
    if !status.success() {
        bail!("{program} {} failed ({status})", args.join(" "));
    }
    Ok(())
}

fn ensure_nightly() -> Result<()> {
    let toolchains = output("rustup", &["toolchain", "list"])?;
    if !toolchains.lines().any(|line| line.starts_with("nightly")) {
        run(
            "rustup",
            &["toolchain", "install", "nightly", "--profile", "minimal"],
        )?;
    }
    let components = output(
        "rustup",
        &["component", "list", "--toolchain", "nightly", "--installed"],
    )?;
    if !components.lines().any(|line| line.starts_with("rust-src")) {
        run(
            "rustup",
            &["component", "add", "rust-src", "--toolchain", "nightly"],
        )?;
    }
    Ok(())
}

/// bpf-linker links against the very libLLVM that rustc nightly ships, found through a prefix
/// of symlinks. Both live outside target/ so `cargo clean` keeps them (the binary has an rpath
/// into the prefix). A stamp records which libLLVM it was built for; a new nightly rebuilds it.
fn ensure_bpf_linker() -> Result<PathBuf> {
    let sysroot = PathBuf::from(output("rustc", &["+nightly", "--print", "sysroot"])?.trim());
    let version = output("rustc", &["+nightly", "-vV"])?;
    let llvm_major = version
        .lines()
        .find_map(|line| line.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .context("rustc -vV printed no LLVM version")?
        .to_string();
    let libllvm = find_libllvm(&sysroot.join("lib"))?;
    let libllvm_name = libllvm.file_name().unwrap().to_string_lossy().into_owned();

    // Outside the workspace, so that `cargo clean` keeps it (the linker has an rpath into it).
    let base = match std::env::var_os("HOME") {
        Some(home) => PathBuf::from(home).join(".cache/firewall"),
        None => PathBuf::from("/var/cache/firewall-build"),
    };
    let prefix = base.join(format!("llvm-{llvm_major}"));
    let root = base.join("bpf-linker");
    let bin = root.join("bin");
    let stamp = root.join("built-for");
    let linker = bin.join("bpf-linker");
    let want = format!("{BPF_LINKER_VERSION} {}", libllvm.display());
    if linker.exists() && std::fs::read_to_string(&stamp).ok().as_deref() == Some(want.as_str()) {
        return Ok(bin);
    }

    std::fs::create_dir_all(prefix.join("lib"))?;
    for name in ["libLLVM.so", libllvm_name.as_str()] {
        let link = prefix.join("lib").join(name);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&libllvm, &link)?;
    }
    eprintln!(
        "setup: building bpf-linker {BPF_LINKER_VERSION} against {libllvm_name} (about 2 minutes)"
    );
    let status = Command::new("cargo")
        .args(["+nightly", "install", "bpf-linker", "--force"])
        .args(["--version", BPF_LINKER_VERSION, "--no-default-features"])
        .args(["--features", &format!("llvm-{llvm_major}")])
        .arg("--root")
        .arg(&root)
        .env("LLVM_PREFIX", &prefix)
        .status()?;
    if !status.success() {
        bail!("building bpf-linker failed ({status})");
    }
    std::fs::write(&stamp, want)?;
    Ok(bin)
}

/// rustc's shared LLVM, e.g. `libLLVM.so.22.1-rust-1.97.0-nightly`.
/// The standard library for a rustup target (the VM's guest binaries are static musl ones).
pub fn ensure_target(target: &str) -> Result<()> {
    let installed = output("rustup", &["target", "list", "--installed"])?;
    if !installed.lines().any(|line| line.trim() == target) {
        run("rustup", &["target", "add", target])?;
    }
    Ok(())
}

fn find_libllvm(lib: &Path) -> Result<PathBuf> {
    for entry in std::fs::read_dir(lib)? {
        let path = entry?.path();
        let name = path.file_name().unwrap().to_string_lossy();
        if name.starts_with("libLLVM.so.") {
            return Ok(path);
        }
    }
    bail!("no libLLVM.so.* in {}", lib.display())
}

pub fn ensure_packages(packages: &[(&str, &str)]) -> Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .filter(|(probe, _)| {
            if probe.starts_with('/') {
                !Path::new(probe).exists()
            } else {
                which(probe).is_none()
            }
        })
        .map(|(_, package)| *package)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    apt_get(&["update", "-q"])?;
    let mut args = vec!["install", "-y", "-q", "--no-install-recommends"];
    args.extend(&missing);
    apt_get(&args)
}

/// `apt-get ARGS`, waiting for another apt or dpkg (an unattended upgrade, a second `cargo
/// xtask`) to finish: dpkg's lock through [`APT_LOCK_WAIT`], the index lock of `update`
/// (which that option does not cover) by trying again, for up to 10 minutes.
pub fn apt_get(args: &[&str]) -> Result<()> {
    let mut full = APT_LOCK_WAIT.to_vec();
    full.extend(args);
    eprintln!("setup: apt-get {}", full.join(" "));
    let started = std::time::Instant::now();
    loop {
        let output = Command::new("apt-get")
            .args(&full)
            .stdout(std::process::Stdio::inherit())
            .output()
            .context("running apt-get")?;
        if output.status.success() {
            return Ok(());
        }
        let stderr = String::from_utf8_lossy(&output.stderr);
        let locked = stderr.contains("Could not get lock");
        if locked && started.elapsed() < std::time::Duration::from_secs(600) {
            eprintln!("setup: apt-get is waiting for another apt to finish");
            std::thread::sleep(std::time::Duration::from_secs(5));
            continue;
        }
        bail!(
            "apt-get {} failed ({}): {stderr}",
            full.join(" "),
            output.status
        );
    }
}

fn which(command: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|dir| dir.join(command))
        .find(|candidate| candidate.is_file())
}
