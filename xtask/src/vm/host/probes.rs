//! Probes of the host VM's forwarded ports from this machine: whether SSH, HTTP and the
//! denied port answer, once or continually while a check changes the service.
use std::io::{BufRead as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;

use super::GREETING;

/// Host loopback ports forwarded to the guest's SSH, HTTP and denied ports.
pub(super) struct Ports {
    pub ssh: u16,
    pub http: u16,
    pub denied: u16,
}

impl Ports {
    /// Free ports now (another run may be using 10022 and friends).
    pub fn free() -> Result<Ports> {
        let listeners: Vec<std::net::TcpListener> = (0..3)
            .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
            .collect::<std::io::Result<_>>()?;
        let port = |i: usize| listeners[i].local_addr().map(|a| a.port());
        Ok(Ports {
            ssh: port(0)?,
            http: port(1)?,
            denied: port(2)?,
        })
    }
}

/// What a probe of a forwarded port got: data (the service answered) or nothing.
fn probe(port: u16, request: &[u8], timeout: Duration) -> Option<String> {
    let address = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut stream = TcpStream::connect_timeout(&address, timeout).ok()?;
    stream.set_read_timeout(Some(timeout)).ok()?;
    if !request.is_empty() {
        stream.write_all(request).ok()?;
    }
    let mut reader = std::io::BufReader::new(stream);
    let mut line = String::new();
    match reader.read_line(&mut line) {
        Ok(n) if n > 0 => Some(line.trim().to_string()),
        _ => None,
    }
}

const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// Whether sshd greets on the forward at `port`.
pub(super) fn ssh_probe(port: u16) -> bool {
    probe(port, b"", PROBE_TIMEOUT).is_some_and(|l| l.starts_with("SSH-"))
}

/// Whether busybox httpd answers a GET on the forward at `port`.
pub(super) fn http_probe(port: u16) -> bool {
    probe(port, b"GET / HTTP/1.0\r\n\r\n", PROBE_TIMEOUT).is_some_and(|l| l.starts_with("HTTP/"))
}

/// Whether the greeting service on the denied port got through on the forward at `port`.
pub(super) fn denied_probe(port: u16) -> bool {
    probe(port, b"", PROBE_TIMEOUT).is_some_and(|l| l.contains(GREETING))
}

pub(super) fn ssh_answers(ports: &Ports) -> bool {
    ssh_probe(ports.ssh)
}

pub(super) fn http_answers(ports: &Ports) -> bool {
    http_probe(ports.http)
}

pub(super) fn denied_answers(ports: &Ports) -> bool {
    denied_probe(ports.denied)
}

/// Probes started every `every` until stopped, each in its own thread; counts answers.
pub(super) struct Prober {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<(usize, usize)>,
}

impl Prober {
    pub fn start(every: Duration, probe: fn(u16) -> bool, port: u16) -> Prober {
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut probes = Vec::new();
            while !stopping.load(Ordering::Relaxed) {
                probes.push(std::thread::spawn(move || probe(port)));
                std::thread::sleep(every);
            }
            let total = probes.len();
            let answered = probes
                .into_iter()
                .map(|p| p.join().unwrap_or(false))
                .filter(|&answered| answered)
                .count();
            (total, answered)
        });
        Prober { stop, thread }
    }

    /// (probes, answered).
    pub fn finish(self) -> (usize, usize) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap_or((0, 0))
    }
}

/// How often the probes under a check's action start: the denied port's, and HTTP's.
pub(super) const DENIED_EVERY: Duration = Duration::from_millis(75);
pub(super) const ALLOWED_EVERY: Duration = Duration::from_millis(250);
