//! Test hosts for end-to-end tests: two network namespaces joined by a veth pair, sockets
//! opened inside them, and the daemon run inside one of them. Everything created here is
//! removed on drop, also when a test fails.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// Whether the tests run in a guest of `cargo xtask vm test` (under emulation there, so
/// timing ratios between a daemon's tasks say nothing); such tests say so and end.
pub fn in_emulated_guest(test: &str) -> bool {
    let guest = std::env::var_os("FW_VM_NIC").is_some();
    if guest {
        eprintln!("{test}: not run in the VM guests (timings under emulation); run on the host");
    }
    guest
}

/// The firewall binary under test: the one cargo built, or `FIREWALL_EXE` where the tests run
/// away from their build tree (in the VM of `cargo xtask vm test`).
pub fn firewall_exe() -> String {
    std::env::var("FIREWALL_EXE").unwrap_or_else(|_| env!("CARGO_BIN_EXE_firewall").into())
}

fn ip(args: &[&str]) {
    let output = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        output.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Namespaces `a` (the firewalled host) and `b` (its peer), linked by `veth_a` <-> `veth_b`.
pub struct TestNet {
    pub a: String,
    pub b: String,
    pub veth_a: String,
    /// The peer's end, in `b`.
    pub veth_b: String,
    pub a4: IpAddr,
    pub b4: IpAddr,
    pub a6: IpAddr,
    pub b6: IpAddr,
}

impl TestNet {
    pub fn new() -> TestNet {
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let id = format!("{}-{n}", std::process::id() % 100_000);
        let subnet = (std::process::id() % 200 + n) % 250 + 1;
        let net = TestNet {
            a: format!("fwt-{id}-a"),
            b: format!("fwt-{id}-b"),
            veth_a: format!("fwa{id}"),
            veth_b: format!("fwb{id}"),
            a4: format!("10.213.{subnet}.1").parse().unwrap(),
            b4: format!("10.213.{subnet}.2").parse().unwrap(),
            a6: format!("fd00:213:{subnet:x}::1").parse().unwrap(),
            b6: format!("fd00:213:{subnet:x}::2").parse().unwrap(),
        };
        ip(&["netns", "add", &net.a]);
        ip(&["netns", "add", &net.b]);
        for ns in [&net.a, &net.b] {
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        net.add_veth_pair();
        net
    }

    /// Runs `f` on a thread that lives in namespace `ns` ("": the test's own); sockets it
    /// opens stay there.
    pub fn within<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = (!ns.is_empty()).then(|| format!("/var/run/netns/{ns}"));
        thread::spawn(move || {
            if let Some(path) = path {
                let file = File::open(&path).expect("open netns");
                // SAFETY: setns on a valid namespace fd affects only this thread.
                let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(rc, 0, "setns {path}");
            }
            f()
        })
        .join()
        .expect("namespace thread")
    }

    /// Attached XDP program shown by `ip link` for the firewalled veth, if any.
    pub fn xdp_attached(&self) -> bool {
        let out = Command::new("ip")
            .args(["-n", &self.a, "-d", "link", "show", &self.veth_a])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).contains("prog/xdp")
    }

    /// tc filters of the firewall's egress program on the firewalled veth: netlink filters,
    /// which kernels before 6.6 (no TCX) use; TCX links are not listed.
    pub fn egress_filters(&self) -> usize {
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.a,
                "tc",
                "filter",
                "show",
                "dev",
                &self.veth_a,
            ])
            .arg("egress")
            .output()
            .unwrap();
        assert!(out.status.success(), "tc filter show: {out:?}");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|line| line.contains("track_egress"))
            .count()
    }

    /// Whether the XDP program goes within two seconds: the kernel frees a link whose last
    /// reference was a pin in deferred work.
    pub fn xdp_detached_soon(&self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(2);
        while self.xdp_attached() {
            if Instant::now() > deadline {
                return false;
            }
            thread::sleep(Duration::from_millis(20));
        }
        true
    }
}

impl Drop for TestNet {
    fn drop(&mut self) {
        // Deleting a namespace deletes the veth pair with it.
        for ns in [&self.a, &self.b] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
            // The state directory of daemons run in it (see `DaemonBuilder::start`).
            let _ = std::fs::remove_dir_all(std::env::temp_dir().join(format!("{ns}.state")));
        }
    }
}

/// TCP listeners and UDP echo sockets on `ports`, in namespace `ns`, on `addrs`.
pub fn serve(ns: &str, addrs: Vec<IpAddr>, ports: Vec<u16>) {
    TestNet::within(ns, move || {
        for addr in addrs {
            for &port in &ports {
                let tcp = TcpListener::bind(SocketAddr::new(addr, port)).expect("bind tcp");
                thread::spawn(move || {
                    for stream in tcp.incoming().flatten() {
                        let _ = (&stream).write_all(b"hello");
                    }
                });
                let udp = UdpSocket::bind(SocketAddr::new(addr, port)).expect("bind udp");
                thread::spawn(move || {
                    let mut buf = [0u8; 64];
                    while let Ok((n, from)) = udp.recv_from(&mut buf) {
                        let _ = udp.send_to(&buf[..n], from);
                    }
                });
            }
        }
    });
}

const WAIT: Duration = Duration::from_millis(700);

/// From namespace `ns`: does a TCP connection to `to` complete and deliver the greeting?
pub fn tcp_reaches(ns: &str, to: SocketAddr) -> bool {
    TestNet::within(ns, move || {
        let Ok(mut stream) = TcpStream::connect_timeout(&to, WAIT) else {
            return false;
        };
        stream.set_read_timeout(Some(WAIT)).unwrap();
        let mut greeting = [0u8; 5];
        stream.read_exact(&mut greeting).is_ok() && &greeting == b"hello"
    })
}

/// From namespace `ns`: does a UDP datagram to `to` come back echoed?
pub fn udp_reaches(ns: &str, to: SocketAddr) -> bool {
    TestNet::within(ns, move || {
        let any: SocketAddr = if to.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }
            .parse()
            .unwrap();
        let socket = UdpSocket::bind(any).unwrap();
        socket.set_read_timeout(Some(WAIT)).unwrap();
        // Two tries: the first datagram may wait for neighbour resolution.
        for _ in 0..2 {
            socket.send_to(b"ping", to).unwrap();
            let mut buf = [0u8; 16];
            if let Ok((4, _)) = socket.recv_from(&mut buf) {
                return &buf[..4] == b"ping";
            }
        }
        false
    })
}

/// The daemon, run inside a namespace, its log captured to a file.
pub struct Daemon {
    child: Option<Child>,
    log: PathBuf,
    /// Its control socket, for `firewall reload --control`.
    pub control: PathBuf,
    /// Its own bpffs for pins, when the test gave none.
    _pins: Option<BpfMount>,
}

/// A bpffs mounted for one test in this (the host's) mount namespace: `ip netns exec` runs
/// the daemon in a mount namespace of its own, which sees this mount, so pins made there
/// outlive the daemon. Unmounted on drop, which unpins everything and detaches what the pins
/// held.
pub struct BpfMount {
    pub path: PathBuf,
}

impl BpfMount {
    pub fn new() -> BpfMount {
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let path = std::env::temp_dir().join(format!("fwt-bpf-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&path).unwrap();
        let target = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: NUL-terminated strings; bpffs takes no mount data.
        let rc = unsafe {
            libc::mount(
                c"bpf".as_ptr(),
                target.as_ptr(),
                c"bpf".as_ptr(),
                0,
                std::ptr::null(),
            )
        };
        assert_eq!(
            rc,
            0,
            "mount bpffs on {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        );
        BpfMount { path }
    }

    /// The daemon's `--pin-dir`.
    pub fn pin_dir(&self) -> PathBuf {
        self.path.join("firewall")
    }

    /// Runs `firewall detach` on the pins, which must succeed.
    pub fn detach(&self) {
        self.run("detach");
    }

    /// Runs `firewall COMMAND --pin-dir` on the pins, which must succeed; its output.
    pub fn run(&self, command: &str) -> String {
        self.run_args(&[command])
    }

    /// `firewall stats --json` of the pins.
    pub fn stats_json(&self) -> serde_json::Value {
        serde_json::from_str(&self.run_args(&["stats", "--json"])).unwrap()
    }

    /// Runs `firewall ARGS... --pin-dir` on the pins, which must succeed; its output.
    pub fn run_args(&self, args: &[&str]) -> String {
        let output = Command::new(firewall_exe())
            .args(args)
            .arg("--pin-dir")
            .arg(self.pin_dir())
            .output()
            .unwrap();
        assert!(output.status.success(), "{output:?}");
        String::from_utf8(output.stdout).unwrap()
    }
}

/// The metrics page a daemon in namespace `ns` serves on `127.0.0.1:port`.
pub fn scrape_metrics(ns: &str, port: u16) -> String {
    http_exchange(ns, port, "GET /metrics HTTP/1.0\r\n\r\n")
}

/// From namespace `ns`: sends `request` to `127.0.0.1:port` and reads the answer until the
/// server closes the connection.
pub fn http_exchange(ns: &str, port: u16, request: &str) -> String {
    let request = request.to_string();
    TestNet::within(ns, move || {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
        stream.write_all(request.as_bytes()).unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).unwrap();
        answer
    })
}

impl Drop for BpfMount {
    fn drop(&mut self) {
        if let Ok(target) = std::ffi::CString::new(self.path.as_os_str().as_encoded_bytes()) {
            // SAFETY: a NUL-terminated path; a lazy unmount, as `umount -l`.
            unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
        }
        let _ = std::fs::remove_dir(&self.path);
    }
}

/// How to start a [`Daemon`]: `firewall run` in a namespace ("" is the test's own) on a rule
/// file and an `--iface`, with whatever else the test sets; [`DaemonBuilder::start`] starts it.
pub struct DaemonBuilder {
    ns: String,
    rules: PathBuf,
    iface: String,
    /// `--pin-dir`; without it, a bpffs of the daemon's own.
    pin_dir: Option<PathBuf>,
    args: Vec<String>,
    env: Vec<(String, String)>,
    /// Passed as systemd passes its file descriptor store.
    fds: Vec<(String, std::os::fd::OwnedFd)>,
}

impl DaemonBuilder {
    /// Pins on `pins` (which outlives the daemon) instead of a bpffs of its own.
    pub fn pins(mut self, pins: &BpfMount) -> DaemonBuilder {
        self.pin_dir = Some(pins.pin_dir());
        self
    }

    /// One more argument to `firewall run`.
    pub fn arg(mut self, arg: &str) -> DaemonBuilder {
        self.args.push(arg.to_string());
        self
    }

    /// More arguments to `firewall run`.
    pub fn args(self, args: &[&str]) -> DaemonBuilder {
        args.iter().fold(self, |builder, arg| builder.arg(arg))
    }

    /// An environment variable of the daemon's.
    pub fn env(mut self, name: &str, value: &Path) -> DaemonBuilder {
        self.env
            .push((name.to_string(), value.display().to_string()));
        self
    }

    /// Passes `fds` as systemd passes its file descriptor store to a service it starts: as
    /// descriptors 3.. with `LISTEN_FDS`, `LISTEN_FDNAMES` and `LISTEN_PID`.
    pub fn inherit(mut self, fds: Vec<(String, std::os::fd::OwnedFd)>) -> DaemonBuilder {
        self.fds.extend(fds);
        self
    }

    /// Starts the daemon and waits until it filters.
    pub fn start(self) -> Daemon {
        let DaemonBuilder {
            ns,
            rules,
            iface,
            pin_dir,
            args,
            mut env,
            fds,
        } = self;
        let own_pins = pin_dir.is_none().then(BpfMount::new);
        let pin_dir = pin_dir.unwrap_or_else(|| own_pins.as_ref().unwrap().pin_dir());
        // The empty name is this (the test's own) namespace.
        let label = if ns.is_empty() {
            format!("fwt-root-{}", std::process::id())
        } else {
            ns.clone()
        };
        let log = std::env::temp_dir().join(format!("{label}.log"));
        let control = std::env::temp_dir().join(format!("{label}.sock"));
        // Dynamic sets' members: a directory of this daemon's own, kept across its restarts
        // in one test (the same label), never the host's /var/lib/firewall.
        let state_dir = std::env::temp_dir().join(format!("{label}.state"));
        let mut command = if ns.is_empty() {
            Command::new(firewall_exe())
        } else {
            let mut command = Command::new("ip");
            command.args(["netns", "exec", &ns, &firewall_exe()]);
            command
        };
        command
            .args(["run", "--rules"])
            .arg(&rules)
            .args(["--iface", &iface])
            .arg("--control")
            .arg(&control)
            .arg("--pin-dir")
            .arg(&pin_dir)
            .arg("--state-dir")
            .arg(&state_dir)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log).unwrap());
        env.push(("RUST_LOG".into(), "info".into()));
        if fds.is_empty() {
            command.envs(env);
        } else {
            let names: Vec<&str> = fds.iter().map(|(name, _)| name.as_str()).collect();
            env.push(("LISTEN_FDS".into(), fds.len().to_string()));
            env.push(("LISTEN_FDNAMES".into(), names.join(":")));
            pass_descriptors(&mut command, &fds, env);
        }
        let child = command.spawn().expect("start the daemon");
        drop(fds);
        let daemon = Daemon {
            child: Some(child),
            log,
            control,
            _pins: own_pins,
        };
        daemon.wait_for("filtering; ", 1);
        daemon
    }
}

impl Daemon {
    /// A daemon to start in `ns` on the rule file `rules`, filtering `iface`: see
    /// [`DaemonBuilder`].
    pub fn builder(ns: &str, rules: &Path, iface: &str) -> DaemonBuilder {
        DaemonBuilder {
            ns: ns.to_string(),
            rules: rules.to_path_buf(),
            iface: iface.to_string(),
            pin_dir: None,
            args: Vec::new(),
            env: Vec::new(),
            fds: Vec::new(),
        }
    }

    /// The daemon's pid.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until `needle` appears `count` times in the log.
    pub fn wait_for(&self, needle: &str, count: usize) {
        // Generous: under emulation (the VM suites) on a busy host, loading and verifying the
        // program alone has taken over 20 s; a log line that comes returns at once.
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.log().matches(needle).count() < count {
            assert!(
                Instant::now() < deadline,
                "daemon never logged {needle:?} ({count}x); log:\n{}",
                self.log()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Asserts that the daemon has logged `needle` by now.
    pub fn assert_logged(&self, needle: &str) {
        let log = self.log();
        assert!(
            log.contains(needle),
            "daemon did not log {needle:?}; log:\n{log}"
        );
    }

    /// `firewall reload --control`: returns once the file as it is now is in force.
    pub fn reload(&self) {
        let output = Command::new(firewall_exe())
            .args(["reload", "--control"])
            .arg(&self.control)
            .output()
            .unwrap();
        assert!(output.status.success(), "reload: {output:?}");
    }

    pub fn signal(&self, signal: libc::c_int) {
        let pid = self.child.as_ref().unwrap().id() as libc::pid_t;
        // `ip netns exec` execs the daemon, so the pid is the daemon's.
        // SAFETY: plain kill(2) on our own child.
        assert_eq!(unsafe { libc::kill(pid, signal) }, 0);
    }

    /// Kills the daemon with SIGKILL: nothing of it runs any more.
    pub fn kill(mut self) {
        self.signal(libc::SIGKILL);
        self.child.take().unwrap().wait().unwrap();
    }

    /// Sends SIGTERM and returns the exit status.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        self.signal(libc::SIGTERM);
        let mut child = self.child.take().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "daemon ignored SIGTERM");
            thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Sets up `command` to receive `fds` as descriptors 3.. and `vars` plus `LISTEN_PID` (its own
/// pid, known only after the fork: `ip netns exec` execs, keeping it) in its environment,
/// which is therefore set in the child rather than through `Command::env`.
fn pass_descriptors(
    command: &mut Command,
    fds: &[(String, std::os::fd::OwnedFd)],
    vars: Vec<(String, String)>,
) {
    use std::ffi::CString;
    use std::os::unix::process::CommandExt as _;
    let raw: Vec<i32> = fds.iter().map(|(_, fd)| fd.as_raw_fd()).collect();
    let vars: Vec<(CString, CString)> = vars
        .into_iter()
        .map(|(name, value)| (CString::new(name).unwrap(), CString::new(value).unwrap()))
        .collect();
    // SAFETY: between fork and exec: fcntl, dup2 and setenv on what this closure owns.
    unsafe {
        command.pre_exec(move || {
            // Out of the way first, so that no dup2 below overwrites a source.
            let moved: Vec<i32> = raw
                .iter()
                .map(|&fd| libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 100))
                .collect();
            for (i, &fd) in moved.iter().enumerate() {
                if libc::dup2(fd, 3 + i as i32) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            for (name, value) in &vars {
                libc::setenv(name.as_ptr(), value.as_ptr(), 1);
            }
            let pid = CString::new(libc::getpid().to_string()).unwrap();
            libc::setenv(c"LISTEN_PID".as_ptr(), pid.as_ptr(), 1);
            Ok(())
        });
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_file(&self.log);
        // A killed daemon leaves its control socket behind.
        let _ = std::fs::remove_file(&self.control);
    }
}

/// systemd's end of `$NOTIFY_SOCKET`: a datagram socket in the temporary directory (reads
/// time out after 20 s), removed on drop.
pub struct NotifySocket {
    pub path: PathBuf,
    pub socket: std::os::unix::net::UnixDatagram,
}

impl NotifySocket {
    pub fn new(name: &str) -> NotifySocket {
        let path = std::env::temp_dir().join(format!("fwt-{name}-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let socket = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        NotifySocket { path, socket }
    }
}

impl Drop for NotifySocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A rule file in a fresh temporary directory, removed on drop.
pub struct RuleFile {
    pub path: PathBuf,
}

impl RuleFile {
    pub fn new(name: &str, text: &str) -> RuleFile {
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let dir = std::env::temp_dir().join(format!("fwt-rules-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        write_file(&path, text);
        RuleFile { path }
    }

    pub fn write(&self, text: &str) {
        write_file(&self.path, text);
    }
}

/// Writes a file the daemon accepts as a rule or set file (not writable by group or others,
/// whatever the umask), atomically: a daemon reloading meanwhile reads the old or the new
/// text, never half of it (half a rule file can be a valid rule file with other verdicts).
pub fn write_file(path: &std::path::Path, text: &str) {
    use std::os::unix::fs::PermissionsExt as _;
    let staged = path.with_extension("staged");
    std::fs::write(&staged, text).unwrap();
    std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::rename(&staged, path).unwrap();
}

impl Drop for RuleFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(self.path.parent().unwrap());
    }
}

impl TestNet {
    /// The veth pair between the namespaces, with their addresses, up.
    fn add_veth_pair(&self) {
        ip(&[
            "-n",
            &self.a,
            "link",
            "add",
            &self.veth_a,
            "type",
            "veth",
            "peer",
            "name",
            &self.veth_b,
            "netns",
            &self.b,
        ]);
        for (ns, dev, v4, v6) in [
            (&self.a, &self.veth_a, self.a4, self.a6),
            (&self.b, &self.veth_b, self.b4, self.b6),
        ] {
            ip(&["-n", ns, "addr", "add", &format!("{v4}/24"), "dev", dev]);
            ip(&[
                "-n",
                ns,
                "addr",
                "add",
                &format!("{v6}/64"),
                "dev",
                dev,
                "nodad",
            ]);
            ip(&["-n", ns, "link", "set", dev, "up"]);
        }
    }

    /// Deletes the veth pair and creates it anew with the same names and addresses, as a VPN,
    /// VLAN or bond restart, a driver reload or a replugged USB NIC does: the firewalled end
    /// gets another ifindex.
    pub fn recreate_link(&self) {
        // Gone already, perhaps.
        let _ = Command::new("ip")
            .args(["-n", &self.a, "link", "del", &self.veth_a])
            .stderr(Stdio::null())
            .status();
        self.add_veth_pair();
    }

    /// Renames the firewalled end (it must be down to be renamed) and brings it up again.
    pub fn rename_link(&self, from: &str, to: &str) {
        ip(&["-n", &self.a, "link", "set", from, "down"]);
        ip(&["-n", &self.a, "link", "set", from, "name", to]);
        ip(&["-n", &self.a, "link", "set", to, "up"]);
    }

    /// Whether `ip link` shows an XDP program on `dev` in the firewalled namespace.
    pub fn xdp_on(&self, dev: &str) -> bool {
        let out = Command::new("ip")
            .args(["-n", &self.a, "-d", "link", "show", dev])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).contains("prog/xdp")
    }
}

/// A `tun` device in namespace `ns` with the host's addresses, and its other end held by the
/// test, which acts as the peer: it writes IP packets into the host and reads what the host
/// sends back. The device goes with the namespace (and with the fd, once closed).
pub struct TunPeer {
    pub name: String,
    file: File,
}

impl TunPeer {
    /// `tun` device `name` in `ns` with `host4`/24 and `host6`/64, up.
    pub fn new(ns: &str, name: &str, host4: IpAddr, host6: IpAddr) -> TunPeer {
        ip(&["-n", ns, "tuntap", "add", "mode", "tun", "dev", name]);
        ip(&["-n", ns, "addr", "add", &format!("{host4}/24"), "dev", name]);
        let host6 = format!("{host6}/64");
        ip(&["-n", ns, "addr", "add", &host6, "dev", name, "nodad"]);
        ip(&["-n", ns, "link", "set", name, "up"]);
        let owned = name.to_string();
        // TUNSETIFF finds the device by name in the calling thread's namespace.
        let file = TestNet::within(ns, move || {
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/net/tun")
                .expect("open /dev/net/tun");
            const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
            const IFF_TUN: libc::c_short = 0x0001;
            const IFF_NO_PI: libc::c_short = 0x1000;
            // struct ifreq: the name, then the flags (the rest of the union unused).
            let mut ifreq = [0u8; 40];
            ifreq[..owned.len()].copy_from_slice(owned.as_bytes());
            ifreq[16..18].copy_from_slice(&(IFF_TUN | IFF_NO_PI).to_ne_bytes());
            // SAFETY: a valid fd and a buffer the size of struct ifreq. (The request's type
            // differs between glibc and musl, the C library of the VM's guest binaries.)
            let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF as _, ifreq.as_mut_ptr()) };
            assert_eq!(rc, 0, "TUNSETIFF: {}", std::io::Error::last_os_error());
            file
        });
        TunPeer {
            name: name.to_string(),
            file,
        }
    }

    /// Hands `packet` (an IP packet) to the host as if it arrived on the device.
    pub fn send(&self, packet: &[u8]) {
        let written = (&self.file).write(packet).expect("write to the tun device");
        assert_eq!(written, packet.len());
    }

    /// The first packet the host sends within `wait` that `want` accepts.
    pub fn receive(&self, wait: Duration, want: impl Fn(&[u8]) -> bool) -> Option<Vec<u8>> {
        let deadline = Instant::now() + wait;
        let mut buf = vec![0u8; 2048];
        loop {
            let left = deadline.checked_duration_since(Instant::now())?;
            let mut poll = libc::pollfd {
                fd: self.file.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            let ready = unsafe { libc::poll(&mut poll, 1, left.as_millis() as libc::c_int + 1) };
            if ready <= 0 {
                continue;
            }
            let n = (&self.file)
                .read(&mut buf)
                .expect("read from the tun device");
            if want(&buf[..n]) {
                return Some(buf[..n].to_vec());
            }
        }
    }
}

/// A TCP SYN from `src`:`sport` to `dst`:`dport` as an IP packet, checksums filled in.
pub fn tcp_syn(src: IpAddr, dst: IpAddr, sport: u16, dport: u16) -> Vec<u8> {
    let mut tcp = Vec::with_capacity(20);
    tcp.extend_from_slice(&sport.to_be_bytes());
    tcp.extend_from_slice(&dport.to_be_bytes());
    tcp.extend_from_slice(&0x1234_5678u32.to_be_bytes()); // sequence
    tcp.extend_from_slice(&[0, 0, 0, 0, 0x50, 0x02, 0xfa, 0xf0, 0, 0, 0, 0]);
    let mut pseudo = Vec::new();
    let mut packet = match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            pseudo.extend_from_slice(&s.octets());
            pseudo.extend_from_slice(&d.octets());
            pseudo.extend_from_slice(&[0, 6, 0, 20]);
            let mut ip = vec![0x45, 0, 0, 40, 0x12, 0x34, 0x40, 0, 64, 6, 0, 0];
            ip.extend_from_slice(&s.octets());
            ip.extend_from_slice(&d.octets());
            let checksum = firewall::testing::packet::internet_checksum(&ip);
            ip[10..12].copy_from_slice(&checksum.to_be_bytes());
            ip
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            pseudo.extend_from_slice(&s.octets());
            pseudo.extend_from_slice(&d.octets());
            pseudo.extend_from_slice(&[0, 0, 0, 20, 0, 0, 0, 6]);
            let mut ip = vec![0x60, 0, 0, 0, 0, 20, 6, 64];
            ip.extend_from_slice(&s.octets());
            ip.extend_from_slice(&d.octets());
            ip
        }
        _ => panic!("one address family per packet"),
    };
    pseudo.extend_from_slice(&tcp);
    let sum = firewall::testing::packet::internet_checksum(&pseudo);
    tcp[16..18].copy_from_slice(&sum.to_be_bytes());
    packet.extend(tcp);
    packet
}

/// Whether `packet` (an IP packet) is a TCP SYN-ACK from port `sport` to port `dport`.
pub fn is_syn_ack(packet: &[u8], sport: u16, dport: u16) -> bool {
    let l4 = match packet.first().map(|b| b >> 4) {
        Some(4) if packet.len() >= 20 && packet[9] == 6 => usize::from(packet[0] & 0xf) * 4,
        Some(6) if packet.len() >= 40 && packet[6] == 6 => 40,
        _ => return false,
    };
    let Some(tcp) = packet.get(l4..l4 + 20) else {
        return false;
    };
    u16::from_be_bytes([tcp[0], tcp[1]]) == sport
        && u16::from_be_bytes([tcp[2], tcp[3]]) == dport
        && tcp[13] & 0x12 == 0x12
}
