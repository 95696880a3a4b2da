//! End to end with a real DHCP server (dnsmasq) and client (dhclient): the client's host is
//! firewalled with `rules/default.toml` (default deny) and still gets and renews its leases,
//! over DHCPv4 and DHCPv6; with `dhcp = false` it gets none (the control). The client runs
//! with `-sf /bin/true`: it configures nothing, it only writes its lease file (in a temporary
//! directory), which is what the test reads.
#[expect(dead_code, reason = "these tests use a part of the shared test hosts")]
mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use common::{Daemon, RuleFile, TestNet};

/// A temporary directory for the server's and clients' files, and the server, stopped and
/// removed on drop.
struct Server {
    dir: PathBuf,
    child: Child,
}

impl Server {
    /// dnsmasq in the peer's namespace, DHCP only (no DNS), for both families, with the
    /// shortest lease it grants (two minutes).
    fn start(net: &TestNet) -> Server {
        let dir = std::env::temp_dir().join(format!("fwt-dhcp-{}", net.veth_a));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let v4 = net.b4.to_string();
        let v4_prefix = v4.rsplit_once('.').unwrap().0;
        let v6 = net.b6.to_string();
        let v6_prefix = v6.trim_end_matches("::2");
        let child = Command::new("ip")
            .args(["netns", "exec", &net.b, "dnsmasq", "--keep-in-foreground"])
            .args([
                "--conf-file=/dev/null",
                "--port=0",
                "--user=root",
                "--group=root",
            ])
            .arg(format!("--interface={}", net.veth_b))
            .args(["--bind-interfaces", "--dhcp-authoritative", "--log-dhcp"])
            .arg(format!("--dhcp-range={v4_prefix}.50,{v4_prefix}.99,2m"))
            .arg(format!(
                "--dhcp-range={v6_prefix}::100,{v6_prefix}::1ff,64,2m"
            ))
            .arg(format!(
                "--dhcp-leasefile={}",
                dir.join("dnsmasq.leases").display()
            ))
            .arg(format!("--pid-file={}", dir.join("dnsmasq.pid").display()))
            .arg(format!(
                "--log-facility={}",
                dir.join("dnsmasq.log").display()
            ))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start dnsmasq");
        let server = Server { dir, child };
        // Listening once it logs its DHCP ranges.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !server.log().contains("DHCPv6") {
            assert!(
                Instant::now() < deadline,
                "dnsmasq did not start: {}",
                server.log()
            );
            thread::sleep(Duration::from_millis(50));
        }
        server
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("dnsmasq.log")).unwrap_or_default()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One `dhclient -1` run in `ns` on `iface` with lease file `leases` (kept between runs, so
/// a second run renews): whether it got a lease within `wait`. The client stays in the
/// foreground and is killed once it has the lease, or when the time is up.
fn lease(ns: &str, iface: &str, dir: &Path, leases: &str, v6: bool, wait: Duration) -> bool {
    let conf = dir.join("dhclient.conf");
    std::fs::write(&conf, "timeout 30;\ninitial-interval 1;\n").unwrap();
    let leases = dir.join(leases);
    let blocks = |path: &Path| {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        text.matches(if v6 { "lease6 {" } else { "lease {" })
            .count()
    };
    let before = blocks(&leases);
    let log = dir.join(format!("dhclient-{}.log", if v6 { 6 } else { 4 }));
    let mut child = Command::new("ip")
        .args([
            "netns",
            "exec",
            ns,
            "dhclient",
            if v6 { "-6" } else { "-4" },
        ])
        .args(["-1", "-d", "-v", "-sf", "/bin/true", "-cf"])
        .arg(&conf)
        .arg("-lf")
        .arg(&leases)
        .arg("-pf")
        .arg(dir.join("dhclient.pid"))
        .arg(iface)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("start dhclient");
    let deadline = Instant::now() + wait;
    let got = loop {
        if blocks(&leases) > before {
            break true;
        }
        if Instant::now() > deadline || child.try_wait().unwrap().is_some() {
            break false;
        }
        thread::sleep(Duration::from_millis(50));
    };
    let _ = child.kill();
    let _ = child.wait();
    got
}

/// The address of the last lease in a lease file.
fn leased_address(path: &Path, v6: bool) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    let key = if v6 { "iaaddr " } else { "fixed-address " };
    let at = text.rfind(key)? + key.len();
    let rest = &text[at..];
    Some(rest[..rest.find([' ', ';', '{'])?].trim().to_string())
}

/// `rules/default.toml` with `dhcp` set to `on`.
fn default_rules(on: bool) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../rules/default.toml");
    let text = std::fs::read_to_string(path).unwrap();
    assert!(
        text.contains("\ndhcp = true"),
        "rules/default.toml sets dhcp"
    );
    text.replace("\ndhcp = true", &format!("\ndhcp = {on}"))
}

fn leases_under_default_rules(v6: bool) {
    let net = TestNet::new();
    let server = Server::start(&net);
    let file = RuleFile::new("default.toml", &default_rules(true));
    let pins = common::BpfMount::new();
    let daemon = Daemon::builder(&net.a, &file.path, &net.veth_a)
        .pins(&pins)
        .start();
    if v6 {
        // The client sends from its link-local address: wait until it is usable.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let out = Command::new("ip")
                .args(["-n", &net.a, "-6", "addr", "show", "dev", &net.veth_a])
                .args(["scope", "link"])
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            if text.contains("inet6") && !text.contains("tentative") {
                break;
            }
            assert!(Instant::now() < deadline, "no link-local address: {text}");
            thread::sleep(Duration::from_millis(100));
        }
    }
    let family = if v6 { "DHCPv6" } else { "DHCPv4" };
    let wait = Duration::from_secs(25);
    let dir = server.dir.clone();
    assert!(
        lease(&net.a, &net.veth_a, &dir, "client.leases", v6, wait),
        "{family}: no lease under rules/default.toml\nserver log:\n{}\nfirewall log:\n{}",
        server.log(),
        daemon.log()
    );
    let first = leased_address(&dir.join("client.leases"), v6).expect("a leased address");
    // The same client again: it asks to keep its address, and gets it renewed.
    assert!(
        lease(&net.a, &net.veth_a, &dir, "client.leases", v6, wait),
        "{family}: the lease was not renewed\nserver log:\n{}",
        server.log()
    );
    let renewed = leased_address(&dir.join("client.leases"), v6).unwrap();
    assert_eq!(first, renewed, "{family}: the renewal changed the address");
    let stats = pins.stats_json();
    assert!(
        stats["dhcp"]["packets"].as_u64().unwrap() >= 2,
        "{family}: DHCP replies not counted: {stats}"
    );

    // The control: with the switch off, a new client gets no lease.
    file.write(&default_rules(false));
    daemon.reload();
    assert!(
        !lease(
            &net.a,
            &net.veth_a,
            &dir,
            "control.leases",
            v6,
            Duration::from_secs(12)
        ),
        "{family}: a lease with dhcp = false\nserver log:\n{}",
        server.log()
    );
    assert!(daemon.terminate().success());
}

#[test]
fn dhcpv4_leases_are_obtained_and_renewed_under_default_deny() {
    leases_under_default_rules(false);
}

#[test]
fn dhcpv6_leases_are_obtained_and_renewed_under_default_deny() {
    leases_under_default_rules(true);
}
