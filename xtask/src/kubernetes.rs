//! The Kubernetes manifests in `firewall/dist/kubernetes/`: the ConfigMap written from
//! `rules/default.toml` (a test fails when they drift apart), and their validation against
//! Kubernetes' schemas with `kubernetes-validate` (PyPI), kept in a virtualenv under
//! `~/.cache/firewall/`. No cluster is involved.
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context as _, Result};

pub const CONFIGMAP: &str = "firewall/dist/kubernetes/configmap.yaml";
pub const DAEMONSET: &str = "firewall/dist/kubernetes/daemonset.yaml";
const RULES: &str = "rules/default.toml";

/// Pinned so that a new release of the validator or its schemas cannot change a result.
const VALIDATOR_VERSION: &str = "1.37.0";
/// The Kubernetes release whose schemas the manifests must satisfy (the newest the validator
/// knows).
const KUBERNETES_VERSION: &str = "1.37.0";

const CONFIGMAP_HEAD: &str = "\
# The rule file of the DaemonSet in daemonset.yaml: rules/default.toml, written here by
# `cargo xtask configmap` (a test fails when the two differ). Edit the rules for your nodes
# before applying: a Kubernetes node needs more than SSH and web open (the kubelet's 10250
# for the API server, the CNI's tunnel ports, NodePorts, the metrics port 9469 for Prometheus).
# The daemon picks up `kubectl apply` of a changed ConfigMap by itself within the kubelet's
# sync period (about a minute): it follows the volume's ..data link swap.
apiVersion: v1
kind: ConfigMap
metadata:
  name: firewall-rules
  namespace: kube-system
  labels:
    app.kubernetes.io/name: firewall
data:
  rules.toml: |
";

/// configmap.yaml's text for the rule file at `root`/rules/default.toml.
pub fn configmap(root: &Path) -> Result<String> {
    let rules =
        std::fs::read_to_string(root.join(RULES)).with_context(|| format!("reading {RULES}"))?;
    configmap_of(&rules)
}

/// The ConfigMap holding `rules` as a literal block: each line indented, kept as it is.
fn configmap_of(rules: &str) -> Result<String> {
    // A literal block (`|`) keeps every line and exactly one final newline.
    if !rules.ends_with('\n') || rules.ends_with("\n\n") {
        bail!("{RULES} must end with exactly one newline to be kept exactly in the ConfigMap");
    }
    if rules
        .lines()
        .next()
        .is_some_and(|line| line.starts_with(' '))
    {
        bail!(
            "{RULES} must not start with an indented line (a YAML block takes it as indentation)"
        );
    }
    let mut text = CONFIGMAP_HEAD.to_string();
    for line in rules.lines() {
        if line.is_empty() {
            text.push('\n');
        } else {
            text.push_str("    ");
            text.push_str(line);
            text.push('\n');
        }
    }
    Ok(text)
}

/// The validator's virtualenv: created on first use (pip from PyPI, about a minute), then
/// only checked.
fn ensure_validator() -> Result<PathBuf> {
    let base = match std::env::var_os("HOME") {
        Some(home) => PathBuf::from(home).join(".cache/firewall"),
        None => PathBuf::from("/var/cache/firewall-build"),
    };
    let venv = base.join("kubernetes-validate");
    let validator = venv.join("bin/kubernetes-validate");
    let installed = Command::new(&validator)
        .arg("--version")
        .output()
        .ok()
        .filter(|output| output.status.success())
        .map(|output| String::from_utf8_lossy(&output.stdout).trim().to_string());
    if installed
        .as_deref()
        .is_some_and(|v| v.ends_with(VALIDATOR_VERSION))
    {
        return Ok(venv);
    }
    // Debian's python3 (not another on PATH), which makes virtualenvs with pip only with
    // python3-venv (ensurepip).
    let has_venv = Command::new("/usr/bin/python3")
        .args(["-c", "import ensurepip"])
        .status()
        .is_ok_and(|status| status.success());
    if !has_venv {
        crate::setup::apt_get(&["update", "-q"])?;
        crate::setup::apt_get(&[
            "install",
            "-y",
            "-q",
            "--no-install-recommends",
            "python3",
            "python3-venv",
        ])?;
    }
    eprintln!(
        "setup: kubernetes-validate {VALIDATOR_VERSION} into {}",
        venv.display()
    );
    let status = Command::new("/usr/bin/python3")
        .args(["-m", "venv", "--clear"])
        .arg(&venv)
        .status()?;
    crate::check(status, "python3 -m venv")?;
    let status = Command::new(venv.join("bin/pip"))
        .args(["install", "--quiet", "--disable-pip-version-check"])
        .arg(format!("kubernetes-validate=={VALIDATOR_VERSION}"))
        .status()?;
    crate::check(status, "pip install kubernetes-validate")?;
    Ok(venv)
}

/// Checks the manifests against Kubernetes' schemas (strict: unknown fields are errors), that
/// the ConfigMap, read as YAML, holds rules/default.toml byte for byte, and that the image
/// takes the DaemonSet's arguments; returns those.
pub fn validate(root: &Path) -> Result<Vec<String>> {
    let venv = ensure_validator()?;
    let status = Command::new(venv.join("bin/kubernetes-validate"))
        .args(["--strict", "--kubernetes-version", KUBERNETES_VERSION])
        .arg(root.join(DAEMONSET))
        .arg(root.join(CONFIGMAP))
        .status()
        .context("running kubernetes-validate")?;
    crate::check(status, "kubernetes-validate")?;
    // The validator's own PyYAML, as a YAML reader independent of the writer above.
    let status = Command::new(venv.join("bin/python"))
        .arg("-c")
        .arg(
            "import sys, yaml\n\
             doc = yaml.safe_load(open(sys.argv[1]))\n\
             want = open(sys.argv[2]).read()\n\
             sys.exit(0 if doc['data']['rules.toml'] == want else \
             'the ConfigMap does not hold ' + sys.argv[2] + ': run cargo xtask configmap')\n",
        )
        .arg(root.join(CONFIGMAP))
        .arg(root.join(RULES))
        .status()?;
    crate::check(status, "the ConfigMap's rule file")?;
    let args = check_daemonset_args(root, &venv)?;
    println!("kubernetes: {DAEMONSET} and {CONFIGMAP} valid for Kubernetes {KUBERNETES_VERSION} (strict)");
    Ok(args)
}

/// The DaemonSet's arguments, given to the image's entrypoint with `--help` appended: the
/// command line parser reads them all (unknown flags and bad values are errors) before it
/// prints the help, and runs nothing. Returns them, for the container test to run.
fn check_daemonset_args(root: &Path, venv: &Path) -> Result<Vec<String>> {
    let output = Command::new(venv.join("bin/python"))
        .arg("-c")
        .arg(
            "import sys, yaml, json\n\
             doc = yaml.safe_load(open(sys.argv[1]))\n\
             container = doc['spec']['template']['spec']['containers'][0]\n\
             print(json.dumps([container['image'], container['args']]))\n",
        )
        .arg(root.join(DAEMONSET))
        .output()?;
    crate::check(output.status, "reading the DaemonSet's arguments")?;
    let (image, args): (String, Vec<String>) = serde_json::from_slice(&output.stdout)?;
    if image != crate::image::image_name() {
        bail!(
            "{DAEMONSET} runs {image}, `cargo xtask image` builds {}",
            crate::image::image_name()
        );
    }
    let output = crate::image::podman_to_run()
        .args(["run", "--rm", "--network", "none", "--cap-drop", "all"])
        .args(crate::image::TEST_RUN_FLAGS)
        .arg(&image)
        .args(&args)
        .arg("--help")
        .output()?;
    if !output.status.success() {
        bail!(
            "the image refuses the DaemonSet's arguments {args:?}: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(args)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configmap_holds_the_default_rules() {
        let root = crate::workspace_root();
        let committed = std::fs::read_to_string(root.join(CONFIGMAP)).unwrap();
        assert!(
            committed == configmap(&root).unwrap(),
            "{CONFIGMAP} differs from {RULES}: run `cargo xtask configmap`"
        );
    }

    #[test]
    fn configmap_keeps_blank_lines_and_indentation() {
        let text = configmap_of("# a\n\n[x]\n  y = 1\n").unwrap();
        assert!(text.ends_with("  rules.toml: |\n    # a\n\n    [x]\n      y = 1\n"));
        assert!(configmap_of("a\n\n").is_err());
        assert!(configmap_of("a").is_err());
        assert!(configmap_of("  a\n").is_err());
    }
}
