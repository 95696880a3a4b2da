//! Developer tasks: `cargo xtask setup|build|run|test|bench [--wholepath]|fuzz|install|vm|
//! image|configmap`.
//!
//! Every task starts with [`setup`], which is idempotent and quick when everything is in place:
//! the nightly toolchain with rust-src, bpf-linker built against rustc nightly's own libLLVM
//! (no system LLVM needed), and the Debian packages the tests use.
mod image;
mod install;
mod kubernetes;
mod setup;
mod vm;
mod wholepath;

use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context as _, Result};
use clap::{Parser, Subcommand};

use vm::host;

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install the build chain: nightly + rust-src, bpf-linker, test packages.
    Setup,
    /// Build the daemon (with its XDP object) to target/release/firewall.
    Build,
    /// Set up, build and run the firewall in the foreground.
    Run {
        /// Interface to attach to (default: the interface of the default route).
        #[arg(long)]
        iface: Option<String>,
        /// Rule file (default: rules/default.toml).
        #[arg(long, default_value = "rules/default.toml")]
        rules: PathBuf,
        /// More arguments for `firewall run`.
        #[arg(last = true)]
        extra: Vec<String>,
    },
    /// Set up and run every test (unit, kernel packet tests, differential, end to end), then
    /// the packet and end-to-end suites in VMs on Debian's 6.1 and 6.12 kernels.
    Test {
        /// Skip the VM runs (this machine's kernel only).
        #[arg(long)]
        no_vm: bool,
        /// Arguments passed to `cargo test` after `--` (and to the test binaries in the VMs).
        #[arg(last = true)]
        extra: Vec<String>,
    },
    /// Benchmark the packet path through BPF_PROG_TEST_RUN.
    Bench {
        /// Instead: packets per second through the whole receive path, from XDP live frames
        /// into a veth pair, against no filter, bare XDP_DROP, xdp-filter, nft and ip6tables.
        #[arg(long)]
        wholepath: bool,
        /// Also measure the firewall rows with this other build of the daemon (e.g. a copy
        /// of the previous commit's target/release/firewall), in the same turns.
        #[arg(long)]
        baseline: Option<PathBuf>,
    },
    /// Install the daemon to /usr/local/sbin, its systemd unit, and (unless present)
    /// /etc/firewall/rules.toml and firewall.env.
    Install {
        /// Install under this directory instead of / (for packaging).
        #[arg(long, default_value = "/")]
        root: PathBuf,
        /// Interface for a new firewall.env (default: the interface of the default route).
        #[arg(long)]
        iface: Option<String>,
        /// Rule file to start from when /etc/firewall/rules.toml does not exist.
        #[arg(long, default_value = "rules/default.toml")]
        rules: PathBuf,
    },
    /// Build the OCI image (from scratch: the static daemon and rules/default.toml) with
    /// podman, offline.
    Image {
        /// Then run it on a veth pair in namespaces (the container test) and validate the
        /// Kubernetes manifests, as `cargo xtask test` does.
        #[arg(long)]
        test: bool,
    },
    /// Write firewall/dist/kubernetes/configmap.yaml from rules/default.toml.
    Configmap,
    /// Run the kernel-vs-reference differential test for longer; reports the seed of any
    /// disagreement.
    Fuzz {
        /// Random frames to try.
        #[arg(long, default_value_t = 10_000_000)]
        packets: u64,
        /// Seed to replay (default: random, printed).
        #[arg(long)]
        seed: Option<u64>,
    },
    /// Boot a throwaway QEMU machine with a stock Debian kernel and run the firewall on its
    /// NIC (guest ports 22, 23, 80, 443, 8080 answer on 127.0.0.1:10022 ... :18080), or with
    /// `test` the packet and end-to-end tests in it; `host` and `host-test` boot a real
    /// Debian 12 with the firewall installed as a systemd service.
    Vm {
        /// `test`: run the test suites (on 6.1 and 6.12 unless --kernel says otherwise);
        /// `host`: a Debian 12 host with the firewall installed as a service, for SSH;
        /// `host-test`: the checks of that service.
        #[arg(value_enum)]
        mode: Option<VmMode>,
        /// 6.1 (Debian 12), 6.12 (Debian 13), or a kernel image file; repeat for several.
        #[arg(long)]
        kernel: Vec<String>,
        /// lib/modules/RELEASE of a kernel image given by path, if it has modules.
        #[arg(long)]
        modules: Option<PathBuf>,
        /// KVM or software emulation (auto: KVM only where it boots stock kernels).
        #[arg(long, value_enum, default_value = "auto")]
        accel: vm::Accel,
        /// Guest memory in MiB.
        #[arg(long, default_value_t = vm::MEMORY_MIB)]
        memory: u32,
        /// Guest CPUs.
        #[arg(long, default_value_t = vm::CPUS)]
        cpus: u32,
        /// Show the kernel's boot messages.
        #[arg(long)]
        verbose: bool,
        /// Rule file from rules/ for the firewall.
        #[arg(long, default_value = "default.toml")]
        rules: String,
        /// More arguments for `firewall run`, or for each test binary.
        #[arg(last = true)]
        extra: Vec<String>,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum VmMode {
    Test,
    /// A Debian 12 host with systemd and the firewall installed as a service; SSH into it.
    Host,
    /// The scripted checks of the installed service on that host.
    HostTest,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let root = workspace_root();
    std::env::set_current_dir(&root)?;
    let env = setup::setup()?;
    match cli.task {
        Task::Setup => Ok(()),
        Task::Build => build(&env),
        Task::Run {
            iface,
            rules,
            extra,
        } => {
            build(&env)?;
            let iface = match iface {
                Some(iface) => iface,
                None => default_route_iface()?,
            };
            require_root("cargo xtask run")?;
            // The rule files of a checkout belong to the developer, not root.
            eprintln!(
                "firewall run --rules {} --iface {iface} --insecure-files",
                rules.display()
            );
            let status = Command::new(root.join("target/release/firewall"))
                .args(["run", "--rules"])
                .arg(&rules)
                .args(["--iface", &iface, "--insecure-files"])
                .args(extra)
                .status()?;
            check(status, "firewall run")
        }
        Task::Test { no_vm, extra } => {
            require_root("cargo xtask test (the tests load XDP programs and create namespaces)")?;
            setup::ensure_packages(setup::TEST_PACKAGES)?;
            let status = env
                .cargo()
                // The eBPF crate is built by firewall's build script for the BPF target.
                .args([
                    "test",
                    "--release",
                    "--workspace",
                    "--exclude",
                    "firewall-ebpf",
                ])
                .arg("--")
                .args(&extra)
                .status()?;
            check(status, "cargo test")?;
            deploy_tests(&env, &root)?;
            if no_vm {
                return Ok(());
            }
            let timer = std::time::Instant::now();
            let suites = run_vm(
                &env,
                &root,
                &vm::debian_kernel_names(),
                None,
                &vm::Options::default(),
                &vm::Plan::Tests { extra },
            );
            let suites_seconds = timer.elapsed().as_secs_f64();
            // The installed service on a real host, after the suites whatever their result.
            let host = host_test(
                &env,
                &root,
                &host::HostOptions {
                    machine: vm::Machine::default(),
                    rules: "default.toml".into(),
                },
            );
            println!(
                "test: VM suites {} in {suites_seconds:.0} s, host checks {}",
                if suites.is_ok() { "passed" } else { "FAILED" },
                match &host {
                    Ok(seconds) => format!("passed in {seconds:.0} s"),
                    Err(_) => "FAILED".into(),
                }
            );
            suites?;
            host.map(|_| ())
        }
        Task::Image { test } => {
            if test {
                require_root("cargo xtask image --test (it creates namespaces and loads XDP)")?;
                return deploy_tests(&env, &root);
            }
            image::build(&env, &root).map(|_| ())
        }
        Task::Configmap => {
            let path = root.join(kubernetes::CONFIGMAP);
            std::fs::write(&path, kubernetes::configmap(&root)?)?;
            println!("wrote {}", path.display());
            Ok(())
        }
        Task::Fuzz { packets, seed } => {
            require_root("cargo xtask fuzz")?;
            let mut command = env.cargo();
            command
                .args([
                    "test",
                    "--release",
                    "-p",
                    "firewall",
                    "--test",
                    "differential",
                ])
                .args(["small_rule_sets", "--", "--nocapture"])
                .env("FW_PACKETS", packets.to_string());
            if let Some(seed) = seed {
                command.env("FW_SEED", seed.to_string());
            }
            check(command.status()?, "the differential test")
        }
        Task::Install {
            root: dest,
            iface,
            rules,
        } => {
            if dest == std::path::Path::new("/") {
                require_root("cargo xtask install")?;
            }
            build(&env)?;
            let iface = match iface {
                Some(iface) => iface,
                None => default_route_iface()?,
            };
            let binary = root.join("target/release/firewall");
            for line in install::install_files(&dest, &binary, &rules, &iface)? {
                println!("{line}");
            }
            if dest == std::path::Path::new("/")
                && std::path::Path::new("/run/systemd/system").exists()
            {
                let status = Command::new("systemctl").arg("daemon-reload").status()?;
                check(status, "systemctl daemon-reload")?;
            }
            println!(
                "next: edit /etc/firewall/rules.toml and firewall.env, `firewall check`, then \
                 `systemctl enable --now firewall`"
            );
            Ok(())
        }
        Task::Vm {
            mode,
            kernel,
            modules,
            accel,
            memory,
            cpus,
            verbose,
            rules,
            extra,
        } => {
            let machine = vm::Machine {
                accel,
                memory_mib: memory,
                cpus,
            };
            if matches!(mode, Some(VmMode::Host | VmMode::HostTest)) {
                if !kernel.is_empty() || modules.is_some() || !extra.is_empty() {
                    bail!("vm host boots Debian 12's own kernel and runs the installed unit: no --kernel, --modules or extra arguments");
                }
                let options = host::HostOptions { machine, rules };
                if mode == Some(VmMode::Host) {
                    host::run(&env, &root, &options, true)?;
                    return Ok(());
                }
                return host_test(&env, &root, &options).map(|_| ());
            }
            let testing = mode == Some(VmMode::Test);
            let kernels = match (kernel.is_empty(), testing) {
                (false, _) => kernel,
                (true, true) => vm::debian_kernel_names(),
                (true, false) => vec![vm::DEFAULT_KERNEL.into()],
            };
            let plan = if testing {
                vm::Plan::Tests { extra }
            } else {
                vm::Plan::Firewall { rules, extra }
            };
            let options = vm::Options { machine, verbose };
            run_vm(&env, &root, &kernels, modules, &options, &plan)
        }
        Task::Bench {
            wholepath: true,
            baseline,
        } => {
            require_root("cargo xtask bench --wholepath")?;
            setup::ensure_packages(setup::WHOLEPATH_PACKAGES)?;
            build(&env)?;
            wholepath::run(&root.join("target/release/firewall"), baseline.as_deref())
        }
        Task::Bench {
            wholepath: false,
            baseline,
        } => {
            require_root("cargo xtask bench")?;
            setup::ensure_packages(setup::BENCH_PACKAGES)?;
            let mut cargo = env.cargo();
            cargo.args(["bench", "-p", "firewall", "--bench", "packet_path"]);
            if let Some(baseline) = baseline {
                // The bench loads the other build's XDP object, which its binary embeds.
                let object = root.join("target/bench-baseline.o");
                std::fs::write(&object, embedded_xdp_object(&std::fs::read(&baseline)?)?)?;
                cargo.env("FW_BENCH_BASELINE", object);
            }
            check(cargo.status()?, "cargo bench")
        }
    }
}

/// The XDP object a firewall binary embeds: the one 64-bit little-endian ELF file for BPF
/// (e_machine 247) inside it, up to the end of its section headers (where the linker puts
/// them, last).
fn embedded_xdp_object(binary: &[u8]) -> Result<&[u8]> {
    const EM_BPF: u16 = 247;
    let field = |at: usize, len: usize| -> Option<u64> {
        let bytes = binary.get(at..at + len)?;
        Some(
            bytes
                .iter()
                .rev()
                .fold(0, |value, &b| value << 8 | u64::from(b)),
        )
    };
    let mut at = 0;
    while let Some(found) = binary[at..].windows(4).position(|w| w == b"\x7fELF") {
        let start = at + found;
        at = start + 1;
        let header = (
            field(start + 4, 1),
            field(start + 5, 1),
            field(start + 18, 2),
        );
        if header != (Some(2), Some(1), Some(u64::from(EM_BPF))) {
            continue;
        }
        let (Some(table), Some(entry), Some(entries)) = (
            field(start + 0x28, 8),
            field(start + 0x3a, 2),
            field(start + 0x3c, 2),
        ) else {
            continue;
        };
        let end = start + (table + entry * entries) as usize;
        if let Some(object) = binary.get(start..end) {
            return Ok(object);
        }
    }
    bail!("no BPF object in that binary: is it a firewall daemon?")
}

/// The deployment's tests: the image run on a veth pair, the manifests against Kubernetes'
/// schemas.
fn deploy_tests(env: &setup::Env, root: &std::path::Path) -> Result<()> {
    let image = image::build(env, root)?;
    let args = kubernetes::validate(root)?;
    image::test(env, &image, &args)
}

/// `vm host-test`: fails if a check failed; the run's seconds.
fn host_test(env: &setup::Env, root: &std::path::Path, options: &host::HostOptions) -> Result<f64> {
    let report = host::run(env, root, options, false)?;
    if report.failed > 0 {
        bail!(
            "{} of {} host checks failed",
            report.failed,
            report.failed + report.passed
        );
    }
    Ok(report.seconds)
}

/// Boots each kernel in turn with `plan`; for tests, a summary of every kernel at the end.
fn run_vm(
    env: &setup::Env,
    root: &std::path::Path,
    kernels: &[String],
    modules: Option<PathBuf>,
    options: &vm::Options,
    plan: &vm::Plan,
) -> Result<()> {
    setup::ensure_packages(setup::VM_PACKAGES)?;
    setup::ensure_target(vm::GUEST_TARGET)?;
    let testing = matches!(plan, vm::Plan::Tests { .. });
    if testing {
        // The guest's tests run the host's hping3.
        setup::ensure_packages(setup::GUEST_TEST_PACKAGES)?;
    }
    let binaries = vm::build_guest(env, root, testing)?;
    // What the tests on the guest's NIC connect to, through QEMU's user-mode network.
    let host_port = if testing {
        Some(vm::greet_on_host()?)
    } else {
        None
    };
    let mut results = Vec::new();
    for choice in kernels {
        let kernel = vm::kernel(root, choice, modules.clone())?;
        let initramfs = root.join("target/vm").join(format!(
            "initramfs-{}.cpio",
            choice.replace(|c: char| !c.is_ascii_alphanumeric() && c != '.', "_")
        ));
        vm::write_initramfs(&initramfs, root, &kernel, &binaries, plan, host_port)?;
        let outcome = vm::boot(&kernel, &initramfs, options, !testing)?;
        results.push((kernel.label, outcome));
    }
    let mut failed = 0;
    for (label, outcome) in &results {
        println!(
            "vm: {label}: {} in {:.0} s",
            outcome.summary, outcome.seconds
        );
        failed += usize::from(!outcome.passed);
    }
    if testing && failed > 0 {
        bail!("the tests failed on {failed} of {} kernels", results.len());
    }
    Ok(())
}

fn build(env: &setup::Env) -> Result<()> {
    let status = env
        .cargo()
        .args(["build", "--release", "-p", "firewall"])
        .status()?;
    check(status, "cargo build")
}

fn check(status: std::process::ExitStatus, what: &str) -> Result<()> {
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}

fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

fn require_root(what: &str) -> Result<()> {
    // SAFETY: getuid has no preconditions.
    if unsafe { libc_getuid() } != 0 {
        bail!("{what} needs root");
    }
    Ok(())
}

extern "C" {
    #[link_name = "getuid"]
    fn libc_getuid() -> u32;
}

/// The interface of the IPv4 (else IPv6) default route.
fn default_route_iface() -> Result<String> {
    for family in ["-4", "-6"] {
        let output = Command::new("ip")
            .args([family, "route", "show", "default"])
            .output()
            .context("running `ip route`")?;
        let text = String::from_utf8_lossy(&output.stdout);
        let mut words = text.split_whitespace();
        while let Some(word) = words.next() {
            if word == "dev" {
                if let Some(iface) = words.next() {
                    return Ok(iface.to_string());
                }
            }
        }
    }
    bail!("no default route; name the interface with --iface")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 64-byte ELF header of `machine` whose section table (two 64-byte entries) ends the
    /// file at 64 + 128 bytes.
    fn elf(machine: u16) -> Vec<u8> {
        let mut header = vec![0u8; 64];
        header[..4].copy_from_slice(b"\x7fELF");
        header[4] = 2;
        header[5] = 1;
        header[18..20].copy_from_slice(&machine.to_le_bytes());
        header[0x28..0x30].copy_from_slice(&64u64.to_le_bytes());
        header[0x3a..0x3c].copy_from_slice(&64u16.to_le_bytes());
        header[0x3c..0x3e].copy_from_slice(&2u16.to_le_bytes());
        header.resize(64 + 128, 0xaa);
        header
    }

    #[test]
    fn the_embedded_bpf_object_is_found_whole() {
        // An x86-64 ELF (the binary itself) first, then the BPF object, then other bytes.
        let mut binary = elf(62);
        let object = elf(247);
        binary.extend_from_slice(&object);
        binary.extend_from_slice(b"more of the binary");
        assert_eq!(embedded_xdp_object(&binary).unwrap(), &object[..]);
        assert!(embedded_xdp_object(&elf(62)).is_err());
    }
}
