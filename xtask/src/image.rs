//! `cargo xtask image`: an OCI image of the daemon, built with podman from scratch and
//! offline: the static binary the VM runs and `rules/default.toml`, nothing else. Its test
//! runs the image on a veth pair in network namespaces (`tests/container.rs`).
use std::path::Path;
use std::process::Command;

use anyhow::{Context as _, Result};

use crate::{setup, vm};

/// The image's name as podman stores it, tagged with the workspace's version.
pub fn image_name() -> String {
    format!("localhost/firewall:{}", env!("CARGO_PKG_VERSION"))
}

/// The image: one static binary, one rule file, no shell, no libraries. `run` by default,
/// on every interface but `lo`; the DaemonSet and `podman run` name their own arguments.
const CONTAINERFILE: &str = r#"FROM scratch
COPY firewall /usr/local/sbin/firewall
COPY rules.toml /etc/firewall/rules.toml
ENTRYPOINT ["/usr/local/sbin/firewall"]
CMD ["run", "--rules", "/etc/firewall/rules.toml", "--iface", "all"]
"#;

/// `podman` with its global flags: without systemd as PID 1 (containers, CI machines) podman
/// must manage cgroups itself.
pub fn podman() -> Command {
    let mut command = Command::new("podman");
    if !Path::new("/run/systemd/system").exists() {
        command.arg("--cgroup-manager=cgroupfs");
    }
    command
}

/// [`podman`] to run containers here: with runc, since crun 1.8 refuses a hybrid cgroup
/// hierarchy whose v2 part holds a controller (as this kind of machine has).
/// `tests/container.rs` runs podman alike.
pub fn podman_to_run() -> Command {
    let mut command = podman();
    command.args(["--runtime", "runc"]);
    command
}

/// `podman run` flags this kind of machine needs and the image does not: limits within the
/// machine's own, since podman's defaults (1,048,576 files, 4,194,304 processes) may exceed
/// them; and never a pull.
pub const TEST_RUN_FLAGS: [&str; 5] = [
    "--ulimit",
    "nofile=4096:4096",
    "--ulimit",
    "nproc=4096:4096",
    "--pull=never",
];

/// Builds the static daemon and the image from it; also saves the image as an OCI archive
/// (`target/image/firewall-VERSION.oci.tar`) to load where podman's store is not at hand.
/// Returns the image's name.
pub fn build(env: &setup::Env, root: &Path) -> Result<String> {
    setup::ensure_packages(setup::IMAGE_PACKAGES)?;
    setup::ensure_target(vm::GUEST_TARGET)?;
    let binaries = vm::build_guest(env, root, false)?;
    let context = root.join("target/image/context");
    let _ = std::fs::remove_dir_all(&context);
    std::fs::create_dir_all(&context)?;
    stage(&binaries.firewall, &context.join("firewall"), 0o755)?;
    stage(
        &root.join("rules/default.toml"),
        &context.join("rules.toml"),
        0o644,
    )?;
    std::fs::write(context.join("Containerfile"), CONTAINERFILE)?;
    let name = image_name();
    let status = podman()
        .args(["build", "--pull=never", "--timestamp", "0"])
        .args(["--tag", &name, "--file"])
        .arg(context.join("Containerfile"))
        .arg(&context)
        .status()
        .context("running podman build")?;
    crate::check(status, "podman build")?;
    let archive = root
        .join("target/image")
        .join(format!("firewall-{}.oci.tar", env!("CARGO_PKG_VERSION")));
    let _ = std::fs::remove_file(&archive);
    let status = podman()
        .args(["save", "--quiet", "--format", "oci-archive", "--output"])
        .arg(&archive)
        .arg(&name)
        .status()?;
    crate::check(status, "podman save")?;
    println!("image: {name} (also {})", archive.display());
    Ok(name)
}

/// Copies `from` to `to` with `mode`: what COPY puts in the image keeps the mode.
fn stage(from: &Path, to: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::copy(from, to).with_context(|| format!("copying {}", from.display()))?;
    std::fs::set_permissions(to, std::fs::Permissions::from_mode(mode))?;
    Ok(())
}

/// Runs the container test (ignored by plain `cargo test`: it needs the image) against
/// `image`, the daemon started with the DaemonSet's arguments `args`.
pub fn test(env: &setup::Env, image: &str, args: &[String]) -> Result<()> {
    let status = env
        .cargo()
        .args(["test", "--release", "-p", "firewall", "--test", "container"])
        .args(["--", "--ignored", "--test-threads=1"])
        .env("FW_IMAGE", image)
        .env("FW_DAEMONSET_ARGS", serde_json::to_string(args)?)
        .status()?;
    crate::check(status, "the container test")
}
