//! `cargo xtask vm`: the firewall, or its packet and end-to-end tests, inside a throwaway
//! QEMU machine booting a stock Debian kernel.
//!
//! Nothing of the guest comes from this machine's root filesystem but `ip` (which the tests
//! run) and its libraries: the kernel and its modules come from Debian's archive (the newest
//! of a release's `linux-image-amd64` metapackage, fetched with apt into target/vm/ and kept
//! by checksum), and the initramfs is written here, holding a static init (`vm-init`), the
//! static firewall, the rule files and the test binaries.
//!
//! [`debian`] fetches the kernels, [`initramfs`] writes what the guest runs, [`qemu`] boots
//! it; [`host`] is `cargo xtask vm host|host-test`, a real Debian host with systemd.
mod debian;
pub mod host;
mod initramfs;
mod qemu;

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use anyhow::{anyhow, bail, Result};

pub use debian::{debian_kernel_names, DEFAULT_KERNEL};
pub use initramfs::write_initramfs;
pub use qemu::{boot, Accel};

use crate::setup;

/// The guest's target: static binaries need no libraries in the initramfs.
pub const GUEST_TARGET: &str = "x86_64-unknown-linux-musl";

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

/// The guest's hardware, for both VM paths: how QEMU runs it, its memory and CPUs.
#[derive(Clone, Copy)]
pub struct Machine {
    pub accel: Accel,
    pub memory_mib: u32,
    pub cpus: u32,
}

impl Default for Machine {
    fn default() -> Self {
        Machine {
            accel: Accel::Auto,
            memory_mib: MEMORY_MIB,
            cpus: CPUS,
        }
    }
}

#[derive(Default)]
pub struct Options {
    pub machine: Machine,
    /// Print the kernel's boot messages too.
    pub verbose: bool,
}

/// `--kernel 6.1|6.12|PATH` to a bootable kernel; `modules` for a kernel of one's own.
pub fn kernel(root: &Path, choice: &str, modules: Option<PathBuf>) -> Result<Kernel> {
    if let Some(debian) = debian::DEBIAN_KERNELS.iter().find(|k| k.name == choice) {
        return debian::debian_kernel(root, debian);
    }
    let image = PathBuf::from(choice);
    if !image.is_file() {
        bail!(
            "--kernel {choice}: neither a Debian kernel ({}) nor a kernel image file",
            debian::DEBIAN_KERNELS
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

pub(crate) fn path_str(path: &Path) -> Result<&str> {
    path.to_str()
        .ok_or_else(|| anyhow!("non-UTF-8 path {}", path.display()))
}
