//! Debian's kernels for the VM: a private apt state per release under target/vm/apt/, the
//! kernel package downloaded and unpacked under target/vm/kernels/SHA256/, and the modules the
//! guest loads, in dependency order.
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime};

use anyhow::{anyhow, bail, Context as _, Result};

use super::{path_str, Kernel};
use crate::setup;

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

/// The newest kernel of a Debian release, fetched (and checked) by apt from Debian's archive
/// into a private apt state under target/vm/apt/, kept under target/vm/kernels/SHA256/.
pub(super) fn debian_kernel(root: &Path, debian: &DebianKernel) -> Result<Kernel> {
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
}
