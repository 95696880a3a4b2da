//! The pinned state under a bpffs directory, which keeps filtering when no daemon runs:
//!
//! ```text
//! DIR/                      mode 0700
//!   build-<object id>/      per build of the XDP object (a new build brings new maps):
//!     FW_*                  its maps
//!     prog-<name>           its programs
//!   bans-v1/FW_BAN*         the runtime bans, shared by every build (kept while they hold
//!                           any ban, also when the daemon stops)
//!   xdp-<iface>             the XDP link of an interface
//!   tc-<iface>              the tc egress link (TCX, Linux 6.6+)
//! ```
//!
//! A link pin keeps its program attached, and the program its maps, after the daemon exits or
//! dies; a new daemon swaps its own program into the same links, so there is no moment without
//! a program.
use std::ffi::CString;
use std::os::fd::AsFd as _;
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _, Result};

use crate::dataplane::sys::bpf;

pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/firewall";

/// `statfs` type of bpffs.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkKind {
    Xdp,
    Tc,
}

impl LinkKind {
    fn prefix(self) -> &'static str {
        match self {
            LinkKind::Xdp => "xdp-",
            LinkKind::Tc => "tc-",
        }
    }
}

#[derive(Clone, Debug)]
pub struct Pins {
    dir: PathBuf,
}

impl Pins {
    /// Opens the pin directory, creating it (mode 0700) and mounting bpffs on its parent when
    /// the parent is not on bpffs.
    pub fn open(dir: &Path) -> Result<Pins> {
        let parent = dir
            .parent()
            .context("the pin directory needs a parent directory")?;
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
        if !on_bpffs(parent)? {
            mount_bpffs(parent)?;
        }
        if !dir.exists() {
            std::fs::create_dir(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("chmod 0700 {}", dir.display()))?;
        Ok(Pins {
            dir: dir.to_path_buf(),
        })
    }

    /// The pin directory as it is, for commands that only read or remove pins.
    pub fn existing(dir: &Path) -> Result<Pins> {
        if !dir.is_dir() {
            bail!(
                "{}: no pinned firewall state (no daemon has run with this --pin-dir)",
                dir.display()
            );
        }
        Ok(Pins {
            dir: dir.to_path_buf(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Takes the pin directory for this daemon's life: one daemon per pin directory, as two
    /// would overwrite each other's rules and links. The lock goes with the process, however
    /// it ends.
    pub fn lock(&self) -> Result<PinLock> {
        use std::os::fd::AsRawFd as _;
        let dir = std::fs::File::open(&self.dir)
            .with_context(|| format!("opening {}", self.dir.display()))?;
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(dir.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let error = std::io::Error::last_os_error();
            if error.raw_os_error() != Some(libc::EWOULDBLOCK) {
                return Err(error).with_context(|| format!("locking {}", self.dir.display()));
            }
            let holder = match lock_holder(&dir) {
                Some(pid) => format!("pid {pid}"),
                None => "another process".to_string(),
            };
            bail!(
                "another firewall daemon ({holder}) runs on {}; stop it first, or give this \
                 one its own --pin-dir",
                self.dir.display()
            );
        }
        Ok(PinLock { _dir: dir })
    }

    /// Where the maps and programs of the XDP object with id `object` are pinned.
    pub fn build_dir(&self, object: u64) -> PathBuf {
        self.dir.join(format!("build-{object:016x}"))
    }

    /// Every build's directory, newest or not.
    pub fn all_build_dirs(&self) -> Result<Vec<PathBuf>> {
        Ok(self
            .entries()?
            .into_iter()
            .filter(|path| file_name(path).starts_with("build-"))
            .collect())
    }

    /// Where the ban maps are pinned ([`firewall_common::bans`]).
    pub fn bans_dir(&self) -> PathBuf {
        self.dir.join(firewall_common::bans::PIN_SUBDIR)
    }

    pub fn link_path(&self, kind: LinkKind, iface: &str) -> PathBuf {
        self.dir.join(format!("{}{iface}", kind.prefix()))
    }

    /// Pinned links, as (kind, interface, path).
    pub fn links(&self) -> Result<Vec<(LinkKind, String, PathBuf)>> {
        let mut links = Vec::new();
        for path in self.entries()? {
            let name = file_name(&path);
            for kind in [LinkKind::Xdp, LinkKind::Tc] {
                if let Some(iface) = name.strip_prefix(kind.prefix()) {
                    links.push((kind, iface.to_string(), path.clone()));
                }
            }
        }
        Ok(links)
    }

    /// Unpins the links of `iface` (all interfaces with `None`): once no process holds them,
    /// the programs are detached. Returns the interfaces.
    pub fn remove_links(&self, iface: Option<&str>) -> Result<Vec<String>> {
        let mut removed = Vec::new();
        for (_, name, path) in self.links()? {
            if iface.is_none_or(|iface| iface == name) {
                std::fs::remove_file(&path)
                    .with_context(|| format!("unpinning {}", path.display()))?;
                if !removed.contains(&name) {
                    removed.push(name);
                }
            }
        }
        Ok(removed)
    }

    /// Renames the pins of `from`'s links to `to`'s (the interface was renamed).
    pub fn rename_links(&self, from: &str, to: &str) -> Result<()> {
        for kind in [LinkKind::Xdp, LinkKind::Tc] {
            let old = self.link_path(kind, from);
            if old.exists() {
                let new = self.link_path(kind, to);
                std::fs::rename(&old, &new)
                    .with_context(|| format!("renaming {} to {}", old.display(), new.display()))?;
            }
        }
        Ok(())
    }

    /// Unpins links that no longer filter the interface they are named after: it was
    /// deleted (the kernel detached the link) or deleted and created anew (another ifindex).
    /// Returns their pin names.
    pub fn remove_dead_links(&self) -> Result<Vec<String>> {
        let mut removed = Vec::new();
        for (_, iface, path) in self.links()? {
            let attached = open_pinned(&path).and_then(|fd| link_ifindex(fd.as_fd()));
            let alive = match (attached, crate::host::ifaces::ifindex(&iface)) {
                (Ok(attached), Some(current)) => attached == current,
                // Not a link we can read: leave it to `detach`.
                (Err(_), _) => true,
                (Ok(_), None) => false,
            };
            if !alive {
                std::fs::remove_file(&path)
                    .with_context(|| format!("unpinning {}", path.display()))?;
                removed.push(file_name(&path));
            }
        }
        Ok(removed)
    }

    /// Removes build directories other than `keep` (those of earlier builds, which no link
    /// uses once the links run the new program).
    pub fn remove_builds_except(&self, keep: Option<&Path>) -> Result<()> {
        for maps in self.all_build_dirs()? {
            if Some(maps.as_path()) != keep {
                remove_pinned_dir(&maps)?;
            }
        }
        Ok(())
    }

    /// With no link left: removes the builds, the ban maps unless they hold bans, and the
    /// directory itself when nothing is left. Returns whether it removed the directory.
    pub fn remove_if_unused(&self) -> Result<bool> {
        if !self.links()?.is_empty() {
            return Ok(false);
        }
        self.remove_builds_except(None)?;
        let bans = self.bans_dir();
        if bans.is_dir() {
            // Unreadable maps hold nothing worth keeping.
            let now = crate::dataplane::monotonic_now_ns();
            let held = crate::dataplane::bans::pinned_bans(&bans)
                .map(|bans| crate::dataplane::bans::in_force(&bans, now) > 0);
            if held.unwrap_or(false) {
                return Ok(false);
            }
            remove_pinned_dir(&bans)?;
        }
        std::fs::remove_dir(&self.dir)
            .with_context(|| format!("removing {}", self.dir.display()))?;
        Ok(true)
    }

    fn entries(&self) -> Result<Vec<PathBuf>> {
        let mut entries = Vec::new();
        for entry in std::fs::read_dir(&self.dir)
            .with_context(|| format!("reading {}", self.dir.display()))?
        {
            entries.push(entry?.path());
        }
        entries.sort();
        Ok(entries)
    }
}

/// Held while a daemon runs on a pin directory (see [`Pins::lock`]).
pub struct PinLock {
    _dir: std::fs::File,
}

/// The pid holding a `flock` on `file`, from /proc/locks (`1: FLOCK ADVISORY WRITE PID
/// MAJ:MIN:INODE 0 EOF`, device numbers in hex).
fn lock_holder(file: &std::fs::File) -> Option<u32> {
    use std::os::unix::fs::MetadataExt as _;
    let meta = file.metadata().ok()?;
    let dev = meta.dev();
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    let wanted = format!("{major:02x}:{minor:02x}:{}", meta.ino());
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    locks.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        match fields.as_slice() {
            [_, "FLOCK", _, _, pid, id, ..] if *id == wanted => pid.parse().ok(),
            _ => None,
        }
    })
}

pub fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn remove_pinned_dir(dir: &Path) -> Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        std::fs::remove_file(&path).with_context(|| format!("unpinning {}", path.display()))?;
    }
    std::fs::remove_dir(dir).with_context(|| format!("removing {}", dir.display()))
}

fn on_bpffs(path: &Path) -> Result<bool> {
    let c_path = CString::new(path.as_os_str().as_bytes())?;
    // SAFETY: statfs on a valid C string, writing into a zeroed struct we own.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c_path.as_ptr(), &mut stat) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("statfs {}", path.display()));
    }
    Ok(stat.f_type as i64 == BPF_FS_MAGIC)
}

fn mount_bpffs(path: &Path) -> Result<()> {
    let c_path = CString::new(path.as_os_str().as_bytes())?;
    let (source, fstype, data) = (c"bpf", c"bpf", c"mode=0700");
    // SAFETY: mount(2) with valid C strings.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            c_path.as_ptr(),
            fstype.as_ptr(),
            0,
            data.as_ptr().cast(),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("mounting bpffs on {}", path.display()));
    }
    log::info!("mounted bpffs on {}", path.display());
    Ok(())
}

const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;

/// The `obj` member of `union bpf_attr` (BPF_OBJ_PIN, BPF_OBJ_GET).
#[repr(C)]
#[derive(Default)]
struct ObjAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
}

/// The `info` member of `union bpf_attr` (BPF_OBJ_GET_INFO_BY_FD).
#[repr(C)]
#[derive(Default)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// Opens the object pinned at `path` (a link, here).
pub fn open_pinned(path: &Path) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd as _;
    let c_path = CString::new(path.as_os_str().as_bytes())?;
    let mut attr = ObjAttr {
        pathname: c_path.as_ptr() as u64,
        ..ObjAttr::default()
    };
    // SAFETY: `obj` member with a C string that outlives the call.
    let fd = unsafe { bpf(BPF_OBJ_GET, &mut attr)? };
    // SAFETY: BPF_OBJ_GET returned a new descriptor that nothing else owns.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) })
}

/// Pins the object open on `fd` at `path`.
pub fn pin_fd(fd: std::os::fd::BorrowedFd<'_>, path: &Path) -> std::io::Result<()> {
    use std::os::fd::AsRawFd as _;
    let c_path = CString::new(path.as_os_str().as_bytes())?;
    let mut attr = ObjAttr {
        pathname: c_path.as_ptr() as u64,
        bpf_fd: fd.as_raw_fd() as u32,
        file_flags: 0,
    };
    // SAFETY: `obj` member with a C string that outlives the call.
    unsafe { bpf(BPF_OBJ_PIN, &mut attr) }.map(|_| ())
}

/// The interface an XDP or TCX link is attached to; 0 once its interface is gone (the kernel
/// detaches the link, which lives on, defunct, as long as something holds it).
pub fn link_ifindex(fd: std::os::fd::BorrowedFd<'_>) -> std::io::Result<u32> {
    use std::os::fd::AsRawFd as _;
    // struct bpf_link_info: type, id, prog_id, then a union that starts at offset 16 (it has
    // 64-bit members) whose xdp and tcx members both begin with the ifindex.
    let mut info = [0u32; 16];
    let mut attr = InfoAttr {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: size_of_val(&info) as u32,
        info: info.as_mut_ptr() as u64,
    };
    // SAFETY: `info` member pointing at `info_len` writable bytes that outlive the call.
    unsafe { bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)? };
    Ok(info[4])
}
