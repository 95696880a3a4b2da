//! The OCI image of `cargo xtask image`, run by podman as the DaemonSet runs it: in a network
//! namespace of the test's (`--network ns:`), with only CAP_BPF, CAP_NET_ADMIN and
//! CAP_PERFMON, a read-only root, no seccomp profile, a bpffs and a control-socket directory
//! from the host.
//! Real connections from the peer namespace; the image's own `rules/default.toml`.
//!
//! Ignored by plain `cargo test`: it needs the image, whose name `cargo xtask test` (or
//! `cargo xtask image --test`) passes in `FW_IMAGE` after building it.
#[expect(dead_code, reason = "these tests use a part of the shared test hosts")]
mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::{firewall_exe, scrape_metrics, serve, tcp_reaches, udp_reaches, BpfMount, TestNet};

fn image() -> String {
    std::env::var("FW_IMAGE")
        .expect("FW_IMAGE names the image under test: run `cargo xtask image --test`")
}

/// `podman` with the flags this kind of machine needs, none of which the image or the
/// DaemonSet depend on: cgroupfs where systemd is not PID 1; runc, since crun 1.8 refuses a
/// hybrid cgroup hierarchy whose v2 part holds a controller; and limits within the machine's
/// own, since podman's defaults (1,048,576 files, 4,194,304 processes) may exceed them.
fn podman() -> Command {
    let mut command = Command::new("podman");
    if !Path::new("/run/systemd/system").exists() {
        command.arg("--cgroup-manager=cgroupfs");
    }
    command.args(["--runtime", "runc"]);
    command
}

const LIMITS: [&str; 4] = [
    "--ulimit",
    "nofile=4096:4096",
    "--ulimit",
    "nproc=4096:4096",
];

fn podman_output(args: &[&str]) -> Output {
    podman().args(args).output().expect("run podman")
}

/// A container of the image, removed on drop (also when the test fails).
struct Container {
    name: String,
}

impl Container {
    /// Starts the image with `args` in the background as the DaemonSet does, in `net`'s
    /// firewalled namespace with `volumes` (`HOST:CONTAINER[:ro]`); waits until it filters.
    fn start(name: &str, net: &TestNet, volumes: &[String], args: &[String]) -> Container {
        let _ = podman_output(&["rm", "--force", name]);
        let container = Container {
            name: name.to_string(),
        };
        let output = podman()
            .args(["run", "--detach", "--name", name])
            .arg(format!("--network=ns:/run/netns/{}", net.a))
            .args([
                "--cap-drop",
                "all",
                "--cap-add",
                "CAP_BPF,CAP_NET_ADMIN,CAP_PERFMON",
            ])
            // As readOnlyRootFilesystem: no tmpfs on /tmp and /run either.
            .args(["--read-only", "--read-only-tmpfs=false"])
            .args(["--security-opt", "no-new-privileges"])
            // As the DaemonSet: podman's default profile allows bpf(2) and perf_event_open(2)
            // only with CAP_SYS_ADMIN (map creation fails with EPERM).
            .args(["--security-opt", "seccomp=unconfined"])
            .args(LIMITS)
            .args(volumes.iter().map(|volume| format!("--volume={volume}")))
            .args(["--env", "RUST_LOG=info", &image()])
            .args(args)
            .output()
            .expect("run podman");
        assert!(output.status.success(), "podman run: {output:?}");
        container.wait_for("filtering; ");
        container
    }

    fn logs(&self) -> String {
        let output = podman_output(&["logs", &self.name]);
        String::from_utf8_lossy(&output.stdout).into_owned()
            + &String::from_utf8_lossy(&output.stderr)
    }

    fn wait_for(&self, needle: &str) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !self.logs().contains(needle) {
            let state = podman_output(&["inspect", "--format", "{{.State.Status}}", &self.name]);
            assert!(
                Instant::now() < deadline
                    && String::from_utf8_lossy(&state.stdout).trim() == "running",
                "the container never logged {needle:?}; logs:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `podman stop`: SIGTERM to the daemon, which is the container's PID 1.
    fn stop(&self) {
        let output = podman_output(&["stop", "--time", "20", &self.name]);
        assert!(output.status.success(), "podman stop: {output:?}");
        let state = podman_output(&["inspect", "--format", "{{.State.ExitCode}}", &self.name]);
        assert_eq!(
            String::from_utf8_lossy(&state.stdout).trim(),
            "0",
            "the daemon's exit; logs:\n{}",
            self.logs()
        );
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = podman_output(&["rm", "--force", "--time", "0", &self.name]);
    }
}

/// A directory of the host's, removed on drop: the DaemonSet's /run/firewall.
struct ScratchDir(PathBuf);

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// What `rules/default.toml` decides for the peer: TCP 22 and UDP 443 pass, TCP and UDP 23
/// are dropped.
fn assert_default_rules(net: &TestNet) {
    let at = |port| SocketAddr::new(net.a4, port);
    assert!(tcp_reaches(&net.b, at(22)), "TCP 22 (allowed) did not pass");
    assert!(
        udp_reaches(&net.b, at(443)),
        "UDP 443 (allowed) did not pass"
    );
    assert!(!tcp_reaches(&net.b, at(23)), "TCP 23 (denied) passed");
    assert!(!udp_reaches(&net.b, at(23)), "UDP 23 (denied) passed");
    let at6 = |port| SocketAddr::new(net.a6, port);
    assert!(
        tcp_reaches(&net.b, at6(22)),
        "TCP 22 over IPv6 did not pass"
    );
    assert!(!tcp_reaches(&net.b, at6(23)), "TCP 23 over IPv6 passed");
}

/// The DaemonSet's arguments (`cargo xtask` reads them from daemonset.yaml).
fn daemonset_args() -> Vec<String> {
    let json = std::env::var("FW_DAEMONSET_ARGS").expect(
        "FW_DAEMONSET_ARGS holds the DaemonSet's arguments: run `cargo xtask image --test`",
    );
    serde_json::from_str(&json).expect("FW_DAEMONSET_ARGS: a JSON list of strings")
}

/// A directory laid out as the kubelet lays out a ConfigMap volume (`rules.toml ->
/// ..data/rules.toml`, `..data -> ..vN`, the volume's directory mode 0777, files 0444), which
/// [`ConfigMapVolume::update`] changes as the kubelet does: a new version directory, a new
/// `..data` link renamed over the old one.
struct ConfigMapVolume {
    dir: ScratchDir,
    version: u32,
}

impl ConfigMapVolume {
    fn new(rules: &str) -> ConfigMapVolume {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = ScratchDir(std::env::temp_dir().join(format!("fwt-cm-{}", std::process::id())));
        let _ = std::fs::remove_dir_all(&dir.0);
        std::fs::create_dir_all(&dir.0).unwrap();
        std::fs::set_permissions(&dir.0, std::fs::Permissions::from_mode(0o777)).unwrap();
        let mut volume = ConfigMapVolume { dir, version: 0 };
        volume.update(rules);
        std::os::unix::fs::symlink("..data/rules.toml", volume.dir.0.join("rules.toml")).unwrap();
        volume
    }

    fn update(&mut self, rules: &str) {
        use std::os::unix::fs::PermissionsExt as _;
        self.version += 1;
        let name = format!("..v{}", self.version);
        let data = self.dir.0.join(&name);
        std::fs::create_dir(&data).unwrap();
        std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::write(data.join("rules.toml"), rules).unwrap();
        std::fs::set_permissions(
            data.join("rules.toml"),
            std::fs::Permissions::from_mode(0o444),
        )
        .unwrap();
        let staged = self.dir.0.join("..data_tmp");
        std::os::unix::fs::symlink(&name, &staged).unwrap();
        std::fs::rename(&staged, self.dir.0.join("..data")).unwrap();
    }
}

#[test]
#[ignore = "needs the image: cargo xtask image --test"]
fn daemonset_pod_filters_survives_a_pod_swap_and_follows_its_configmap() {
    let mut net = TestNet::new();
    // The DaemonSet takes the node's uplinks by pattern (en*, eth*).
    let uplink = "eth0";
    // A link set down loses its IPv6 addresses: given again.
    let a6 = format!("{}/64", net.a6);
    for args in [
        vec!["link", "set", &net.veth_a, "down"],
        vec!["link", "set", &net.veth_a, "name", uplink],
        vec!["link", "set", uplink, "up"],
        vec!["addr", "replace", &a6, "dev", uplink, "nodad"],
    ] {
        let status = Command::new("ip")
            .args(["-n", &net.a])
            .args(&args)
            .status()
            .unwrap();
        assert!(status.success(), "ip {args:?}");
    }
    net.veth_a = uplink.to_string();
    serve(&net.a, vec![net.a4, net.a6], vec![22, 23, 443]);
    // The control: without the firewall the denied port answers (once the new link carries
    // traffic: on a loaded machine the first tries can time out).
    let deadline = Instant::now() + Duration::from_secs(10);
    let denied = SocketAddr::new(net.a4, 23);
    while !(tcp_reaches(&net.b, denied) && udp_reaches(&net.b, denied)) {
        assert!(
            Instant::now() < deadline,
            "port 23 never answered without the firewall"
        );
    }

    // The DaemonSet's volumes: the host's bpffs and /run/firewall, the ConfigMap read-only.
    let bpffs = BpfMount::new();
    let run_dir = ScratchDir(std::env::temp_dir().join(format!("fwt-run-{}", std::process::id())));
    std::fs::create_dir_all(&run_dir.0).unwrap();
    let default_rules = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../rules/default.toml"
    ))
    .unwrap();
    let mut configmap = ConfigMapVolume::new(&default_rules);
    let volumes = [
        format!("{}:/sys/fs/bpf", bpffs.path.display()),
        format!("{}:/run/firewall", run_dir.0.display()),
        format!("{}:/etc/firewall:ro", configmap.dir.0.display()),
    ];
    let args = daemonset_args();
    let name = format!("fwt-{}", std::process::id());
    let first = Container::start(&format!("{name}-1"), &net, &volumes, &args);
    assert!(net.xdp_attached());
    assert_default_rules(&net);

    // From the host, as on a node: the control socket in the host's directory, the pins in
    // the host's bpffs.
    let control = run_dir.0.join("control.sock");
    let status = Command::new(firewall_exe())
        .args(["status", "--control"])
        .arg(&control)
        .args(["--pin-dir"])
        .arg(bpffs.pin_dir())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(status.status.success(), "firewall status: {status:?}");
    assert!(
        text.contains("Status: active") && text.contains(uplink),
        "firewall status from the host:\n{text}"
    );
    let stats = bpffs.run("stats");
    assert!(
        stats.contains("ssh"),
        "stats from the host's pins:\n{stats}"
    );
    // The DaemonSet's --metrics listens on 0.0.0.0:9469, in the namespace it filters.
    let page = scrape_metrics(&net.a, 9469);
    assert!(
        page.contains("firewall_decided_packets_total"),
        "metrics page:\n{page}"
    );
    // The DaemonSet's liveness and readiness probes.
    for path in ["/healthz", "/readyz"] {
        let answer = common::http_exchange(&net.a, 9469, &format!("GET {path} HTTP/1.0\r\n\r\n"));
        assert!(answer.contains(" 200 "), "{path}:\n{answer}");
    }

    // The DaemonSet's rolling update: the old pod stops (--persist leaves its links and rules
    // pinned), no daemon runs, then the new pod takes the pins over.
    first.stop();
    assert!(
        net.xdp_attached(),
        "the XDP program went with the container"
    );
    assert!(!tcp_reaches(&net.b, denied), "TCP 23 passed between pods");
    let second = Container::start(&format!("{name}-2"), &net, &volumes, &args);
    assert_default_rules(&net);

    // `kubectl apply` of a ConfigMap that opens TCP 23: the kubelet swaps ..data, the daemon
    // follows the swap through the read-only mount and reloads.
    configmap.update(&format!(
        "{default_rules}\n[[rules]]\nname = \"telnet\"\naction = \"allow\"\nproto = \"tcp\"\nports = [23]\n"
    ));
    let deadline = Instant::now() + Duration::from_secs(10);
    while !tcp_reaches(&net.b, denied) {
        assert!(
            Instant::now() < deadline,
            "the ConfigMap update did not open TCP 23; logs:\n{}",
            second.logs()
        );
    }
    assert!(
        !udp_reaches(&net.b, denied),
        "UDP 23 passed after the update"
    );
    second.stop();
    drop(second);
    drop(first);
    // What README "Deployment" says to run on a node after deleting the DaemonSet.
    let output = podman()
        .args(["run", "--rm", "--network", "none", "--cap-drop", "all"])
        .args(["--cap-add", "CAP_BPF,CAP_NET_ADMIN"])
        .args(["--security-opt", "seccomp=unconfined"])
        .args(LIMITS)
        .arg(format!("--volume={}:/sys/fs/bpf", bpffs.path.display()))
        .args([&image(), "detach"])
        .output()
        .unwrap();
    assert!(output.status.success(), "detach in the image: {output:?}");
    assert!(net.xdp_detached_soon(), "XDP still attached after detach");
}

#[test]
#[ignore = "needs the image: cargo xtask image --test"]
fn check_runs_in_the_image() {
    let output = podman()
        .args(["run", "--rm", "--network", "none", "--cap-drop", "all"])
        .args(LIMITS)
        .args([&image(), "check", "/etc/firewall/rules.toml"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "check: {output:?}");
    assert!(
        text.contains("5 rules, default policy deny"),
        "check of the image's rules:\n{text}"
    );

    // A broken file, mounted in: refused with its position.
    let dir = ScratchDir(std::env::temp_dir().join(format!("fwt-check-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0).unwrap();
    let bad = dir.0.join("bad.toml");
    std::fs::write(
        &bad,
        "[[rules]]\naction = \"allow\"\nfrom = [\"10.0.0.0/33\"]\n",
    )
    .unwrap();
    let output = podman()
        .args(["run", "--rm", "--network", "none", "--cap-drop", "all"])
        .args(LIMITS)
        .arg(format!("--volume={}:/bad.toml:ro", bad.display()))
        .args([&image(), "check", "/bad.toml"])
        .output()
        .unwrap();
    let error = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success(),
        "check accepted a bad file: {output:?}"
    );
    assert!(error.contains("/bad.toml:3:"), "check's error:\n{error}");
}

/// Each of the three capabilities is needed: without any one, the daemon in the image fails
/// to load its program or maps (without CAP_PERFMON the verifier refuses the packet pointer
/// arithmetic) (on `lo` of a container without a network, in a bpffs of its
/// own); with the three it filters.
#[test]
#[ignore = "needs the image: cargo xtask image --test"]
fn each_capability_is_needed() {
    let all = ["CAP_BPF", "CAP_NET_ADMIN", "CAP_PERFMON"];
    for missing in [None, Some(0), Some(1), Some(2)] {
        let caps: Vec<&str> = (0..3)
            .filter(|&i| Some(i) != missing)
            .map(|i| all[i])
            .collect();
        let bpffs = BpfMount::new();
        let name = format!("fwt-{}-caps-{}", std::process::id(), caps.join("-"));
        let _ = podman_output(&["rm", "--force", &name]);
        let container = Container { name: name.clone() };
        let output = podman()
            .args(["run", "--detach", "--name", &name, "--network", "none"])
            .args(["--cap-drop", "all", "--cap-add", &caps.join(",")])
            .args(["--read-only", "--security-opt", "seccomp=unconfined"])
            .args(LIMITS)
            .arg(format!("--volume={}:/sys/fs/bpf", bpffs.path.display()))
            .args([&image(), "run", "--rules", "/etc/firewall/rules.toml"])
            .args(["--iface", "lo"])
            .output()
            .unwrap();
        assert!(output.status.success(), "podman run: {output:?}");
        match missing {
            None => container.wait_for("filtering; "),
            Some(_) => {
                let wait = podman_output(&["wait", &name]);
                let code = String::from_utf8_lossy(&wait.stdout).trim().to_string();
                let logs = container.logs();
                assert!(
                    code != "0"
                        && (logs.contains("Operation not permitted")
                            || logs.contains("Permission denied")),
                    "without {}: exit {code}, logs:\n{logs}",
                    all[missing.unwrap()]
                );
            }
        }
    }
}
