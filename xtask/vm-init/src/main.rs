//! PID 1 of the VM that `cargo xtask vm` boots. Built static (musl) into the initramfs the
//! xtask writes, next to the firewall, its tests and the kernel modules they need.
//!
//! It reads its plan from files the xtask put in `/vm/`:
//! - `modules`: kernel modules to load, one path a line, dependencies first;
//! - `net`: `IFACE ADDRESS/PREFIX` lines, IPv4 addresses to give interfaces (brought up);
//! - `env`: `KEY=VALUE` lines for every command;
//! - `listen`: TCP ports to answer with a greeting (something to reach through the firewall);
//! - `commands`: one command a line (words split at spaces), run in order on the console.
//!
//! Then it prints one line the host looks for, `VM-RESULT: pass` or `VM-RESULT: fail ...`,
//! and powers the machine off.
use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt as _;
use std::process::{Command, Stdio};

/// The line the host's `cargo xtask vm` waits for.
const RESULT: &str = "VM-RESULT:";
/// The serial console the host reads; the commands' controlling terminal.
const CONSOLE: &str = "/dev/ttyS0";

fn main() {
    println!("vm-init: up, kernel {}", kernel_release());
    let result = boot().and_then(|()| run_commands());
    match result {
        Ok(()) => println!("{RESULT} pass"),
        Err(error) => println!("{RESULT} fail: {error}"),
    }
    let _ = std::io::stdout().flush();
    // SAFETY: sync and reboot take no pointers; as PID 1 we must not return from main.
    unsafe {
        libc::sync();
        libc::reboot(libc::RB_POWER_OFF);
    }
    // Only if reboot failed: the kernel would panic when init exits, which the host also sees.
    loop {
        std::thread::park();
    }
}

/// Filesystems, modules, network: what a system has before its services start.
fn boot() -> Result<(), String> {
    for (fstype, target) in [
        ("proc", "/proc"),
        ("sysfs", "/sys"),
        ("devtmpfs", "/dev"),
        ("tmpfs", "/run"),
        ("tmpfs", "/tmp"),
        ("bpf", "/sys/fs/bpf"),
    ] {
        mount(fstype, target)?;
    }
    for path in plan_lines("modules") {
        load_module(&path)?;
    }
    set_up("lo", None)?;
    for line in plan_lines("net") {
        let (iface, address) = line
            .split_once(' ')
            .ok_or_else(|| format!("/vm/net: expected `IFACE ADDRESS/PREFIX`, got {line:?}"))?;
        set_up(iface, Some(address))?;
    }
    for line in plan_lines("env") {
        if let Some((key, value)) = line.split_once('=') {
            // Before the listeners start: no other thread runs yet.
            std::env::set_var(key, value);
        }
    }
    for line in plan_lines("listen") {
        let port: u16 = line
            .parse()
            .map_err(|_| format!("/vm/listen: bad port {line:?}"))?;
        greet_on(port)?;
    }
    Ok(())
}

fn kernel_release() -> String {
    // SAFETY: utsname is plain data, filled in by uname.
    let mut names: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: a valid pointer to a utsname.
    if unsafe { libc::uname(&mut names) } != 0 {
        return "unknown".into();
    }
    // SAFETY: uname NUL-terminates the release.
    unsafe { std::ffi::CStr::from_ptr(names.release.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

/// Answers every TCP connection to `port` (IPv4 and IPv6) with one line naming the port.
fn greet_on(port: u16) -> Result<(), String> {
    let listener = std::net::TcpListener::bind(("::", port))
        .map_err(|e| format!("listen on port {port}: {e}"))?;
    std::thread::spawn(move || {
        let greeting = format!("hello from the guest's port {port}\n");
        for mut stream in listener.incoming().flatten() {
            // One write: a client that reads once gets the whole line.
            let _ = stream.write_all(greeting.as_bytes());
        }
    });
    Ok(())
}

/// Non-empty lines of `/vm/NAME`, none if the file is absent.
fn plan_lines(name: &str) -> Vec<String> {
    std::fs::read_to_string(format!("/vm/{name}"))
        .unwrap_or_default()
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .map(String::from)
        .collect()
}

fn mount(fstype: &str, target: &str) -> Result<(), String> {
    std::fs::create_dir_all(target).map_err(|e| format!("mkdir {target}: {e}"))?;
    let c_type = CString::new(fstype).unwrap();
    let c_target = CString::new(target).unwrap();
    // SAFETY: valid NUL-terminated strings; no mount data.
    let rc = unsafe {
        libc::mount(
            c_type.as_ptr(),
            c_target.as_ptr(),
            c_type.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(format!(
            "mount {fstype} on {target}: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// Loads one module file; compressed ones (`.ko.xz`, `.ko.zst`) are decompressed by the
/// kernel, which needs CONFIG_MODULE_DECOMPRESS (Debian's 6.12 has it, its 6.1 ships them
/// uncompressed).
fn load_module(path: &str) -> Result<(), String> {
    const MODULE_INIT_COMPRESSED_FILE: libc::c_uint = 4;
    let file = File::open(path).map_err(|e| format!("open {path}: {e}"))?;
    let flags = if path.ends_with(".ko") {
        0
    } else {
        MODULE_INIT_COMPRESSED_FILE
    };
    // SAFETY: a valid fd, an empty NUL-terminated parameter string.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_finit_module,
            file.as_raw_fd(),
            c"".as_ptr(),
            flags,
        )
    };
    let error = std::io::Error::last_os_error();
    if rc != 0 && error.raw_os_error() != Some(libc::EEXIST) {
        return Err(format!("load module {path}: {error}"));
    }
    Ok(())
}

/// Brings `iface` up, first giving it `address` (`A.B.C.D/N`) if there is one.
fn set_up(iface: &str, address: Option<&str>) -> Result<(), String> {
    // SAFETY: a plain socket(2) call; the fd is closed when `socket` drops.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(format!("socket: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: we own the new fd.
    let socket = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let ioctl = |request: libc::Ioctl, req: &mut libc::ifreq, what: &str| {
        // SAFETY: `req` is a valid ifreq naming the interface, as the request expects.
        if unsafe { libc::ioctl(socket.as_raw_fd(), request, req as *mut libc::ifreq) } != 0 {
            return Err(format!(
                "{what} {iface}: {}",
                std::io::Error::last_os_error()
            ));
        }
        Ok(())
    };
    let request = || {
        // SAFETY: ifreq is plain data; all zeroes is a valid value.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        for (slot, byte) in req.ifr_name.iter_mut().zip(iface.bytes().take(15)) {
            *slot = byte as libc::c_char;
        }
        req
    };
    if let Some(address) = address {
        let (ip, prefix) = address
            .split_once('/')
            .and_then(|(ip, prefix)| Some((ip.parse().ok()?, prefix.parse().ok()?)))
            .filter(|&(_, prefix): &(std::net::Ipv4Addr, u32)| prefix <= 32)
            .ok_or_else(|| format!("/vm/net: bad address {address:?}"))?;
        let mask = u32::MAX.checked_shl(32 - prefix).unwrap_or(0);
        for (value, request_code, what) in [
            (u32::from(ip), libc::SIOCSIFADDR, "set address of"),
            (mask, libc::SIOCSIFNETMASK, "set netmask of"),
        ] {
            let mut req = request();
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: 0,
                sin_addr: libc::in_addr {
                    s_addr: value.to_be(),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_in fits in the ifreq union's sockaddr.
            unsafe {
                std::ptr::write_unaligned(
                    std::ptr::addr_of_mut!(req.ifr_ifru.ifru_addr).cast::<libc::sockaddr_in>(),
                    sin,
                );
            }
            ioctl(request_code as libc::Ioctl, &mut req, what)?;
        }
    }
    let mut req = request();
    ioctl(libc::SIOCGIFFLAGS as libc::Ioctl, &mut req, "read flags of")?;
    // SAFETY: SIOCGIFFLAGS filled in the flags member.
    unsafe { req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
    ioctl(libc::SIOCSIFFLAGS as libc::Ioctl, &mut req, "bring up")
}

/// Runs every command of the plan, all of them even when one fails.
fn run_commands() -> Result<(), String> {
    let commands = plan_lines("commands");
    let mut failed = Vec::new();
    for line in &commands {
        let words: Vec<&str> = line.split(' ').filter(|w| !w.is_empty()).collect();
        println!("vm-init: running {line}");
        match run_on_console(&words) {
            Ok(0) => println!("vm-init: {} passed", words[0]),
            Ok(code) => {
                println!("vm-init: {} failed (exit {code})", words[0]);
                failed.push(words[0].to_string());
            }
            Err(error) => {
                println!("vm-init: {}: {error}", words[0]);
                failed.push(words[0].to_string());
            }
        }
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{} of {} commands failed: {}",
            failed.len(),
            commands.len(),
            failed.join(" ")
        ))
    }
}

/// Runs one command in a session of its own whose controlling terminal is the console, so
/// that Ctrl-C typed on the host reaches it as SIGINT. Reaps every orphan meanwhile (we are
/// PID 1) and returns the command's exit code (128 + signal if killed).
fn run_on_console(words: &[&str]) -> Result<i32, String> {
    let console = || {
        OpenOptions::new()
            .read(true)
            .write(true)
            .open(CONSOLE)
            .map_err(|e| format!("open {CONSOLE}: {e}"))
    };
    let mut command = Command::new(words[0]);
    command
        .args(&words[1..])
        .stdin(Stdio::from(console()?))
        .stdout(Stdio::from(console()?))
        .stderr(Stdio::from(console()?));
    // SAFETY: setsid and ioctl are async-signal-safe.
    unsafe {
        command.pre_exec(|| {
            if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 1) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = command.spawn().map_err(|e| format!("start: {e}"))?;
    let pid = child.id() as libc::pid_t;
    loop {
        let mut status = 0;
        // SAFETY: waitpid with a valid status pointer.
        let reaped = unsafe { libc::waitpid(-1, &mut status, 0) };
        if reaped < 0 {
            return Err(format!("wait: {}", std::io::Error::last_os_error()));
        }
        if reaped == pid {
            return Ok(if libc::WIFEXITED(status) {
                libc::WEXITSTATUS(status)
            } else {
                128 + libc::WTERMSIG(status)
            });
        }
    }
}
