//! `cargo xtask install`: the daemon, its systemd unit, a starting rule file, and the shell
//! completions and man pages the daemon's binary generates from its command line.
use std::fs;
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context as _, Result};

pub const UNIT: &str = include_str!("../../firewall/dist/firewall.service");
/// The fail2ban action that bans through `firewall ban`.
pub const FAIL2BAN_ACTION: &str = include_str!("../../firewall/dist/fail2ban/firewall.conf");
/// The script crowdsec-custom-bouncer runs for each decision.
pub const CROWDSEC_BOUNCER: &str = include_str!("../../firewall/dist/crowdsec/firewall-bouncer");

/// Installs under `root` (`/` for the real thing). Existing rule and environment files are
/// kept: they are the operator's. Returns what it did, a line each.
pub fn install_files(root: &Path, binary: &Path, rules: &Path, iface: &str) -> Result<Vec<String>> {
    let mut done = Vec::new();
    let sbin = root.join("usr/local/sbin");
    let units = root.join("etc/systemd/system");
    let etc = root.join("etc/firewall");
    for dir in [&sbin, &units, &etc] {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let target = sbin.join("firewall");
    // Through a temporary name: replacing a running binary in place fails (ETXTBSY).
    let staged = sbin.join(".firewall.new");
    fs::copy(binary, &staged).with_context(|| format!("copying {}", binary.display()))?;
    fs::set_permissions(&staged, fs::Permissions::from_mode(0o755))?;
    fs::rename(&staged, &target)?;
    done.push(format!("installed {}", target.display()));
    done.extend(install_docs(root, &target)?);

    // The unit; the fail2ban action, which fail2ban reads when a jail names `action = firewall`
    // (whether or not fail2ban is installed yet; the operator's changes go in firewall.local,
    // as fail2ban has it); the script crowdsec-custom-bouncer runs.
    for (path, text, mode) in [
        ("etc/systemd/system/firewall.service", UNIT, 0o644),
        (
            "etc/fail2ban/action.d/firewall.conf",
            FAIL2BAN_ACTION,
            0o644,
        ),
        (
            "usr/local/libexec/firewall/firewall-bouncer",
            CROWDSEC_BOUNCER,
            0o755,
        ),
    ] {
        let path = root.join(path);
        let dir = path.parent().expect("a file in a directory");
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        fs::write(&path, text)?;
        fs::set_permissions(&path, fs::Permissions::from_mode(mode))?;
        done.push(format!("installed {}", path.display()));
    }

    let rule_file = etc.join("rules.toml");
    if rule_file.exists() {
        done.push(format!("kept {}", rule_file.display()));
    } else {
        fs::copy(rules, &rule_file)?;
        fs::set_permissions(&rule_file, fs::Permissions::from_mode(0o644))?;
        done.push(format!(
            "installed {} (from {})",
            rule_file.display(),
            rules.display()
        ));
    }
    let env_file = etc.join("firewall.env");
    if env_file.exists() {
        done.push(format!("kept {}", env_file.display()));
    } else {
        fs::write(
            &env_file,
            format!(
                "# Arguments for `firewall run` (see `firewall run --help`): the interfaces to filter.\n\
                 FIREWALL_ARGS=\"--iface {iface}\"\n"
            ),
        )?;
        fs::set_permissions(&env_file, fs::Permissions::from_mode(0o644))?;
        done.push(format!(
            "installed {} (--iface {iface})",
            env_file.display()
        ));
    }
    Ok(done)
}

/// Where each shell looks for the completions of packages, under the root.
const COMPLETIONS: [(&str, &str); 3] = [
    ("bash", "usr/share/bash-completion/completions/firewall"),
    ("zsh", "usr/share/zsh/vendor-completions/_firewall"),
    ("fish", "usr/share/fish/vendor_completions.d/firewall.fish"),
];

/// Man pages' directory under the root (section 8: system administration).
const MAN_DIR: &str = "usr/share/man/man8";

/// Has the installed `binary` write its shell completions and man pages under `root`.
fn install_docs(root: &Path, binary: &Path) -> Result<Vec<String>> {
    let mut done = Vec::new();
    for (shell, path) in COMPLETIONS {
        let output = Command::new(binary)
            .args(["completions", shell])
            .output()
            .with_context(|| format!("running {}", binary.display()))?;
        if !output.status.success() || output.stdout.is_empty() {
            bail!(
                "{} completions {shell}: {}",
                binary.display(),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        let file = root.join(path);
        fs::create_dir_all(file.parent().expect("a path under the root"))?;
        fs::write(&file, &output.stdout)?;
        fs::set_permissions(&file, fs::Permissions::from_mode(0o644))?;
        done.push(format!("installed {}", file.display()));
    }
    let man_dir = root.join(MAN_DIR);
    fs::create_dir_all(&man_dir)?;
    let output = Command::new(binary)
        .arg("manpages")
        .arg(&man_dir)
        .output()
        .with_context(|| format!("running {}", binary.display()))?;
    if !output.status.success() {
        bail!(
            "{} manpages: {}",
            binary.display(),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    // The binary prints each page it wrote.
    let pages: Vec<&str> = std::str::from_utf8(&output.stdout)?.lines().collect();
    for page in &pages {
        fs::set_permissions(page, fs::Permissions::from_mode(0o644))?;
    }
    if pages.is_empty() {
        bail!("{} manpages wrote no page", binary.display());
    }
    done.push(format!(
        "installed {} man pages in {}",
        pages.len(),
        man_dir.display()
    ));
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// systemd's own checks of the installed unit, offline: it parses, and its sandboxing
    /// keeps `systemd-analyze security`'s exposure score at 3 or below ("OK"; 2.3 now).
    fn verify_unit(root: &Path) {
        let present = std::process::Command::new("systemd-analyze")
            .arg("--version")
            .output()
            .is_ok();
        if !present {
            eprintln!("systemd-analyze not installed: unit not verified");
            return;
        }
        let root_arg = format!("--root={}", root.display());
        let unit = root.join("etc/systemd/system/firewall.service");
        let verify = std::process::Command::new("systemd-analyze")
            .args(["verify", "--man=no", &root_arg])
            .arg(&unit)
            .output()
            .unwrap();
        assert!(
            verify.status.success() && verify.stderr.is_empty(),
            "systemd-analyze verify: {verify:?}"
        );
        let security = std::process::Command::new("systemd-analyze")
            .args(["security", "--offline=yes", "--threshold=30", &root_arg])
            .arg("firewall.service")
            .output()
            .unwrap();
        assert!(
            security.status.success(),
            "exposure above 3.0: {}",
            String::from_utf8_lossy(&security.stdout)
        );
    }

    #[test]
    fn installs_and_keeps_the_operators_files() {
        let root = std::env::temp_dir().join(format!("fw-install-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        fs::create_dir_all(&root).unwrap();
        // Stands in for the daemon's binary: answers the two generating subcommands the way
        // it does (firewall's own tests check what it generates).
        let binary = root.join("built");
        fs::write(
            &binary,
            "#!/bin/sh\ncase \"$1\" in\n\
             completions) echo \"# $2 completions\" ;;\n\
             manpages) for page in firewall firewall-run; do echo .TH $page 8 > \"$2/$page.8\"; \
             echo \"$2/$page.8\"; done ;;\n\
             *) exit 2 ;;\nesac\n",
        )
        .unwrap();
        fs::set_permissions(&binary, fs::Permissions::from_mode(0o755)).unwrap();
        let rules = root.join("default.toml");
        fs::write(&rules, "[[rules]]\naction = \"allow\"\n").unwrap();

        let done = install_files(&root, &binary, &rules, "eth9").unwrap();
        assert_eq!(done.len(), 10, "{done:?}");
        let mode = |path: &str| fs::metadata(root.join(path)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode("usr/local/sbin/firewall"), 0o755);
        assert_eq!(mode("etc/firewall/rules.toml"), 0o644);
        assert_eq!(mode("etc/fail2ban/action.d/firewall.conf"), 0o644);
        assert_eq!(mode("usr/local/libexec/firewall/firewall-bouncer"), 0o755);
        for (shell, path) in COMPLETIONS {
            let script = fs::read_to_string(root.join(path)).unwrap();
            assert_eq!(script, format!("# {shell} completions\n"), "{path}");
            assert_eq!(mode(path), 0o644);
        }
        for page in ["firewall.8", "firewall-run.8"] {
            let path = format!("{MAN_DIR}/{page}");
            assert!(fs::metadata(root.join(&path)).unwrap().len() > 0, "{path}");
            assert_eq!(mode(&path), 0o644);
        }
        let unit = fs::read_to_string(root.join("etc/systemd/system/firewall.service")).unwrap();
        assert!(unit.contains("Type=notify") && unit.contains("FileDescriptorStoreMax="));
        let exec_start = unit.lines().find(|l| l.starts_with("ExecStart=")).unwrap();
        assert!(!exec_start.contains("--persist"), "stop must end filtering");
        let env = fs::read_to_string(root.join("etc/firewall/firewall.env")).unwrap();
        assert!(env.contains("--iface eth9"));
        verify_unit(&root);

        // A second install keeps the operator's edits.
        fs::write(root.join("etc/firewall/rules.toml"), "# mine\n").unwrap();
        let done = install_files(&root, &binary, &rules, "eth0").unwrap();
        assert!(done.iter().any(|line| line.starts_with("kept")));
        let kept = fs::read_to_string(root.join("etc/firewall/rules.toml")).unwrap();
        assert_eq!(kept, "# mine\n");
        assert!(fs::read_to_string(root.join("etc/firewall/firewall.env"))
            .unwrap()
            .contains("eth9"));
        fs::remove_dir_all(&root).unwrap();
    }
}
