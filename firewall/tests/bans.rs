//! End to end: `firewall ban`, `unban` and `bans` against a running daemon, with real
//! connections from a peer namespace.
#[expect(dead_code, reason = "these tests use a part of the shared test hosts")]
mod common;

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{firewall_exe, serve, tcp_reaches, BpfMount, Daemon, RuleFile, TestNet};

/// `firewall ARGS --control SOCKET`, with `stdin` piped in when given.
fn firewall(control: &Path, args: &[&str], stdin: Option<&str>) -> Output {
    let mut command = Command::new(firewall_exe());
    command
        .args(args)
        .arg("--control")
        .arg(control)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .env_remove("SSH_CONNECTION");
    let mut child = command.spawn().unwrap();
    let mut input = child.stdin.take().unwrap();
    if let Some(text) = stdin {
        input.write_all(text.as_bytes()).unwrap();
    }
    drop(input);
    child.wait_with_output().unwrap()
}

/// As [`firewall`], which must succeed; its stdout.
fn ok(control: &Path, args: &[&str], stdin: Option<&str>) -> String {
    let output = firewall(control, args, stdin);
    assert!(output.status.success(), "firewall {args:?}: {output:?}");
    String::from_utf8(output.stdout).unwrap()
}

fn listed(control: &Path) -> Vec<serde_json::Value> {
    let text = ok(control, &["bans", "--json"], None);
    serde_json::from_str::<Vec<serde_json::Value>>(&text).unwrap()
}

/// A host serving TCP 8080 on its IPv4 address under an allow-all rule file, with its daemon.
fn open_host() -> (TestNet, SocketAddr, RuleFile, Daemon) {
    let net = TestNet::new();
    serve(&net.a, vec![net.a4], vec![8080]);
    let to4 = SocketAddr::new(net.a4, 8080);
    let file = RuleFile::new("bans.toml", "[defaults]\npolicy = \"allow\"\n");
    let daemon = Daemon::builder(&net.a, &file.path, &net.veth_a).start();
    (net, to4, file, daemon)
}

/// Bans take effect when the command returns, hold over reloads and restarts, end by
/// themselves, and a bad list changes nothing.
#[test]
fn bans_drop_at_once_and_outlive_reloads_and_restarts() {
    let net = TestNet::new();
    serve(&net.a, vec![net.a4, net.a6], vec![8080]);
    let (to4, to6) = (SocketAddr::new(net.a4, 8080), SocketAddr::new(net.a6, 8080));
    let file = RuleFile::new("bans.toml", "[defaults]\npolicy = \"allow\"\n");
    let pins = BpfMount::new();
    let daemon = Daemon::builder(&net.a, &file.path, &net.veth_a)
        .pins(&pins)
        .start();
    let control = daemon.control.clone();
    assert!(tcp_reaches(&net.b, to4) && tcp_reaches(&net.b, to6));

    let started = Instant::now();
    let (b4, b6) = (net.b4.to_string(), net.b6.to_string());
    let said = ok(&control, &["ban", &b4, &b6], None);
    let took = started.elapsed();
    assert!(said.contains("banned 2 addresses"), "{said}");
    assert!(!tcp_reaches(&net.b, to4), "IPv4 peer banned");
    assert!(!tcp_reaches(&net.b, to6), "IPv6 peer banned");
    println!("ban of 2 addresses in force after {took:?} (command start to return)");
    assert!(took < Duration::from_secs(1), "{took:?}");
    let bans = listed(&control);
    assert_eq!(bans.len(), 2, "{bans:?}");
    assert!(bans.iter().all(|ban| ban["expires_in_seconds"].is_null()));

    daemon.reload();
    assert!(!tcp_reaches(&net.b, to4), "a reload keeps the bans");
    let stats = pins.run("stats");
    assert!(stats.contains("banned (firewall ban)"), "{stats}");
    assert!(stats.contains("bans in force: 2"), "{stats}");

    // Stopped (detached: the peer gets through) and started again: the bans are back.
    assert!(daemon.terminate().success());
    assert!(tcp_reaches(&net.b, to4), "no daemon, nothing attached");
    let daemon = Daemon::builder(&net.a, &file.path, &net.veth_a)
        .pins(&pins)
        .start();
    let control = daemon.control.clone();
    assert!(!tcp_reaches(&net.b, to4), "the bans outlive the daemon");
    assert_eq!(listed(&control).len(), 2);

    let said = ok(&control, &["unban", &b4], None);
    assert!(said.contains("(1 of them were banned)"), "{said}");
    assert!(tcp_reaches(&net.b, to4), "unbanned");
    assert!(!tcp_reaches(&net.b, to6), "the other ban stays");
    ok(&control, &["unban", &b6], None);

    // A bad entry anywhere: non-zero exit, the position named, nothing banned.
    let list = format!("{b4}\n192.0.2.1 192.0.2.300\n");
    let output = firewall(&control, &["ban"], Some(&list));
    assert!(!output.status.success());
    let error = String::from_utf8_lossy(&output.stderr);
    assert!(
        error.contains("stdin:2: \"192.0.2.300\" is no address"),
        "{error}"
    );
    let output = firewall(&control, &["ban", &b4, "--timeout", "soon"], None);
    assert!(!output.status.success());
    assert!(listed(&control).is_empty());
    assert!(tcp_reaches(&net.b, to4));

    // A timed ban ends by itself (the kernel reads its end; no sweep needed).
    ok(&control, &["ban", &b4, "--timeout", "2s"], None);
    assert!(!tcp_reaches(&net.b, to4), "banned for 2 s");
    let left = listed(&control)[0]["expires_in_seconds"].as_u64().unwrap();
    assert!((1..=2).contains(&left), "{left}");
    std::thread::sleep(Duration::from_millis(2300));
    assert!(tcp_reaches(&net.b, to4), "the ban ended");
    assert!(listed(&control).is_empty(), "ended bans are not listed");
    assert!(daemon.terminate().success());
}

/// 10,000 addresses on stdin in one call each way, with the peer among them.
#[test]
fn ten_thousand_bans_in_one_call() {
    let (net, to4, _file, daemon) = open_host();
    let mut list: String = (0..9_999u32)
        .map(|i| format!("2001:db8:{:x}:{:x}::1\n", i / 256, i % 256))
        .collect();
    list.push_str(&format!("{}\n", net.b4));

    let started = Instant::now();
    ok(&daemon.control, &["ban"], Some(&list));
    let banned = started.elapsed();
    assert!(!tcp_reaches(&net.b, to4));
    assert_eq!(listed(&daemon.control).len(), 10_000);
    let started = Instant::now();
    let said = ok(&daemon.control, &["unban"], Some(&list));
    let unbanned = started.elapsed();
    assert!(said.contains("(10000 of them were banned)"), "{said}");
    assert!(tcp_reaches(&net.b, to4));
    println!("10,000 bans in {banned:?}, 10,000 unbans in {unbanned:?} (whole commands)");
    assert!(banned < Duration::from_secs(2) && unbanned < Duration::from_secs(2));
}

/// `ban` refuses the address the operator's SSH session comes from, unless forced; no
/// daemon needed to say so.
#[test]
fn ban_refuses_to_cut_the_operators_own_session() {
    let output = Command::new(firewall_exe())
        .args([
            "ban",
            "203.0.113.0/24",
            "--control",
            "/nonexistent/control.sock",
        ])
        .env("SSH_CONNECTION", "203.0.113.5 50022 192.0.2.1 22")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let error = String::from_utf8_lossy(&output.stderr);
    assert!(
        error.contains("203.0.113.0/24 holds 203.0.113.5, the address this SSH session comes from"),
        "{error}"
    );
    // Forced, it goes on to the daemon (here: none).
    let output = Command::new(firewall_exe())
        .args([
            "ban",
            "203.0.113.0/24",
            "--force",
            "--control",
            "/nonexistent/control.sock",
        ])
        .env("SSH_CONNECTION", "203.0.113.5 50022 192.0.2.1 22")
        .output()
        .unwrap();
    let error = String::from_utf8_lossy(&output.stderr);
    assert!(error.contains("no firewall daemon answers"), "{error}");
}

/// The shipped fail2ban action (`firewall/dist/fail2ban/firewall.conf`) run by the real
/// fail2ban (Debian package): a jail on a log file gets three failed logins from the peer,
/// bans it through `firewall ban`, and after its bantime unbans it.
#[test]
fn fail2ban_bans_and_unbans_through_the_action() {
    let (net, to4, _file, daemon) = open_host();
    assert!(tcp_reaches(&net.b, to4));

    let dir = tempdir("fail2ban");
    let config = FailToBan::config(&dir, &daemon.control);
    let server = FailToBan::start(&config);
    server.wait_for_log("Jail 'firewall-test' started");
    let log = dir.join("auth.log");
    for _ in 0..3 {
        let mut file = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
        writeln!(file, "failed login from {}", net.b4).unwrap();
    }
    let banned = wait_until(Duration::from_secs(15), || !tcp_reaches(&net.b, to4));
    assert!(banned, "fail2ban did not ban the peer:\n{}", server.log());
    server.wait_for_log(&format!("Ban {}", net.b4));
    let bans = listed(&daemon.control);
    assert_eq!(bans.len(), 1, "{bans:?}");
    assert_eq!(bans[0]["address"], format!("{}/32", net.b4));
    assert!(
        bans[0]["expires_in_seconds"].as_u64().unwrap() <= 4,
        "the jail's bantime travels with the ban: {bans:?}"
    );
    // The jail's bantime is 4 s: fail2ban unbans (and the kernel would end it anyway).
    let unbanned = wait_until(Duration::from_secs(15), || tcp_reaches(&net.b, to4));
    assert!(unbanned, "the peer stayed banned:\n{}", server.log());
    server.wait_for_log(&format!("Unban {}", net.b4));
    assert!(
        !server.log().contains("ERROR"),
        "fail2ban logged errors:\n{}",
        server.log()
    );
}

fn wait_until(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if done() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    false
}

/// A directory of this test's own under the temporary directory, removed on drop.
struct TempDir(std::path::PathBuf);

impl std::ops::Deref for TempDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn tempdir(name: &str) -> TempDir {
    let path = std::env::temp_dir().join(format!("fwt-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&path);
    std::fs::create_dir_all(&path).unwrap();
    TempDir(path)
}

/// A fail2ban server in the foreground with a configuration of the test's own (its own socket,
/// an in-memory database, one jail); stopped on drop.
struct FailToBan {
    child: std::process::Child,
    log: std::path::PathBuf,
}

impl FailToBan {
    /// Writes the configuration into `dir`: the shipped action, a filter for `failed login
    /// from <HOST>` lines without dates, and a jail on `dir/auth.log` (3 tries, 4 s bans).
    fn config(dir: &Path, control: &Path) -> std::path::PathBuf {
        for sub in ["action.d", "filter.d"] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
        }
        let action = concat!(env!("CARGO_MANIFEST_DIR"), "/dist/fail2ban/firewall.conf");
        std::fs::copy(action, dir.join("action.d/firewall.conf")).unwrap();
        let d = dir.display();
        let files = [
            (
                "fail2ban.conf",
                format!(
                    "[Definition]\nloglevel = INFO\nlogtarget = {d}/fail2ban.log\n\
                     socket = {d}/fail2ban.sock\npidfile = {d}/fail2ban.pid\ndbfile = :memory:\n"
                ),
            ),
            (
                "filter.d/firewall-test.conf",
                "[Definition]\nfailregex = ^failed login from <HOST>$\ndatepattern = {NONE}\n"
                    .to_string(),
            ),
            (
                "jail.conf",
                format!(
                    "[DEFAULT]\nbackend = polling\n\n[firewall-test]\nenabled = true\n\
                     filter = firewall-test\nlogpath = {d}/auth.log\nmaxretry = 3\n\
                     findtime = 60\nbantime = 4\n\
                     action = firewall[firewall={}, control={}]\n",
                    firewall_exe(),
                    control.display()
                ),
            ),
            ("auth.log", String::new()),
        ];
        for (name, text) in files {
            std::fs::write(dir.join(name), text).unwrap();
        }
        dir.to_path_buf()
    }

    fn start(config: &Path) -> FailToBan {
        let child = Command::new("fail2ban-server")
            .args(["-f", "-x", "-c"])
            .arg(config)
            .arg("start")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("run fail2ban-server (Debian package fail2ban)");
        FailToBan {
            child,
            log: config.join("fail2ban.log"),
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn wait_for_log(&self, needle: &str) {
        let found = wait_until(Duration::from_secs(20), || self.log().contains(needle));
        assert!(found, "fail2ban never logged {needle:?}:\n{}", self.log());
    }
}

impl Drop for FailToBan {
    fn drop(&mut self) {
        // SIGTERM: fail2ban stops its jails (unbanning) and exits.
        // SAFETY: kill(2) on our own child, not yet reaped.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A dynamic set (`[sets.NAME] dynamic = true`) filled by `firewall ban --set NAME`: here an
/// allow-list, as a script would manage it; its members outlive reloads and restarts and
/// may end by themselves.
#[test]
fn dynamic_sets_are_filled_at_run_time() {
    let net = TestNet::new();
    serve(&net.a, vec![net.a4], vec![8080]);
    let to4 = SocketAddr::new(net.a4, 8080);
    let file = RuleFile::new(
        "dynamic.toml",
        "[defaults]\npolicy = \"deny\"\n\n[sets.admins]\ndynamic = true\n\n[[rules]]\n\
         name = \"admin-web\"\naction = \"allow\"\nproto = \"tcp\"\nfrom = [\"@admins\"]\n\
         ports = [8080]\n",
    );
    let daemon = Daemon::builder(&net.a, &file.path, &net.veth_a).start();
    let control = daemon.control.clone();
    assert!(
        !tcp_reaches(&net.b, to4),
        "an empty dynamic set admits nobody"
    );

    let b4 = net.b4.to_string();
    let started = Instant::now();
    let said = ok(&control, &["ban", "--set", "admins", &b4], None);
    println!("member added and in force after {:?}", started.elapsed());
    assert!(said.contains("added"), "{said}");
    assert!(tcp_reaches(&net.b, to4), "a member of @admins");
    let members: Vec<serde_json::Value> =
        serde_json::from_str(&ok(&control, &["bans", "--set", "admins", "--json"], None)).unwrap();
    assert_eq!(members.len(), 1, "{members:?}");
    assert!(listed(&control).is_empty(), "a member is no ban");

    daemon.reload();
    assert!(tcp_reaches(&net.b, to4), "a reload keeps the members");
    assert!(daemon.terminate().success());
    let daemon = Daemon::builder(&net.a, &file.path, &net.veth_a).start();
    let control = daemon.control.clone();
    assert!(tcp_reaches(&net.b, to4), "a restart keeps the members");

    let said = ok(&control, &["unban", "--set", "admins", &b4], None);
    assert!(said.contains("(1 of them were members)"), "{said}");
    assert!(!tcp_reaches(&net.b, to4), "removed");

    ok(
        &control,
        &["ban", "--set", "admins", &b4, "--timeout", "2s"],
        None,
    );
    assert!(tcp_reaches(&net.b, to4), "a member for 2 s");
    std::thread::sleep(Duration::from_millis(2500));
    assert!(!tcp_reaches(&net.b, to4), "its membership ended");
    daemon.assert_logged("members of dynamic sets ended");

    let output = firewall(&control, &["ban", "--set", "nosuch", &b4], None);
    assert!(!output.status.success());
    let error = String::from_utf8_lossy(&output.stderr);
    assert!(error.contains("no dynamic set \"nosuch\""), "{error}");
}

/// The CrowdSec custom-bouncer script (`firewall/dist/crowdsec/firewall-bouncer`), run the way
/// crowdsec-custom-bouncer runs it for a decision and for its deletion.
#[test]
fn the_crowdsec_bouncer_script_bans_and_unbans() {
    let (net, to4, _file, daemon) = open_host();
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/dist/crowdsec/firewall-bouncer"
    );
    let bouncer = |args: &[&str]| {
        let output = Command::new(script)
            .args(args)
            .env("FIREWALL", firewall_exe())
            .env("FIREWALL_CONTROL", &daemon.control)
            .env_remove("SSH_CONNECTION")
            .output()
            .unwrap();
        assert!(output.status.success(), "{args:?}: {output:?}");
    };
    let b4 = net.b4.to_string();
    let decision = r#"{"origin":"crowdsec","scenario":"crowdsecurity/ssh-bf"}"#;
    bouncer(&["add", &b4, "3599", "crowdsecurity/ssh-bf", decision]);
    assert!(!tcp_reaches(&net.b, to4), "banned by the decision");
    let bans = listed(&daemon.control);
    let left = bans[0]["expires_in_seconds"].as_u64().unwrap();
    assert!((3590..=3599).contains(&left), "{bans:?}");
    bouncer(&["del", &b4, "3599", "crowdsecurity/ssh-bf", decision]);
    assert!(tcp_reaches(&net.b, to4), "the decision was deleted");
    let wrong = Command::new(script).arg("block").arg(&b4).output().unwrap();
    assert_eq!(wrong.status.code(), Some(2));
}
