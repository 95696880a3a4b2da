//! The guest's initramfs: a newc cpio archive written here with the static init (`vm-init`),
//! the firewall, the rule files, the kernel's modules, and for tests the test binaries and the
//! host's `ip` and `tc` with their libraries.
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _, Result};

use super::debian::modules_to_load;
use super::qemu::{GUEST_ADDRESS, HOST_ADDRESS};
use super::{path_str, GuestBinaries, Kernel, Plan, DEMO_PORTS};
use crate::setup;

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
            // The tests run `ip` (namespaces, veth), `tc` and `hping3` (the SYN flood): the
            // host's, with their libraries.
            for program in ["/usr/sbin/ip", "/usr/sbin/tc", "/usr/sbin/hping3"] {
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

#[cfg(test)]
mod tests {
    use super::*;

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
