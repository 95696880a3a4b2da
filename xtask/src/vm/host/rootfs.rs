//! The root file system of the host VM: built once per recipe by mmdebstrap from Debian's
//! archive and kept under target/vm/host/, then for every run copied, given the firewall as
//! an operator installs it, and made into a fresh ext4 image; and root's SSH key.
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{anyhow, bail, Context as _, Result};

use super::NIC;
use crate::vm::path_str;
use crate::{install, setup};

/// What mmdebstrap installs: Debian 12 from its archive, with these packages.
pub(super) const SUITE: &str = "bookworm";
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

/// The size of the ext4 image made of the tree.
const IMAGE_SIZE: &str = "1500M";

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

/// A new ed25519 key for root's SSH login, kept under target/vm/host/.
pub(super) fn ssh_key(dir: &Path) -> Result<PathBuf> {
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
pub(super) fn base_tree(dir: &Path) -> Result<PathBuf> {
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
pub(super) fn boot_files(tree: &Path) -> Result<(PathBuf, PathBuf)> {
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
pub(super) fn make_image(
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

#[cfg(test)]
mod tests {
    use super::*;

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
