//! systemd's service protocol: readiness (`Type=notify`: datagrams to `$NOTIFY_SOCKET`) and
//! the file descriptor store, which keeps descriptors a service hands it across restarts of
//! the service (`systemctl restart`, a crash and `Restart=`) and closes them when the service
//! is stopped. Nothing happens when the variable is not set (not started by systemd).
use std::os::fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd};
use std::os::linux::net::SocketAddrExt as _;
use std::os::unix::net::{SocketAddr, UnixDatagram};

/// Sends `state` (e.g. `READY=1`) to systemd, if it is listening. Failures are logged, never
/// fatal: the firewall filters whether or not systemd hears about it.
pub fn notify(state: &str) {
    send(state, None);
}

/// `RELOADING=1` with the `MONOTONIC_USEC` systemd wants beside it.
pub fn reloading() {
    let usec = crate::dataplane::monotonic_now_ns() / 1000;
    notify(&format!("RELOADING=1\nMONOTONIC_USEC={usec}"));
}

/// Hands `fd` to systemd's file descriptor store under `name` (the unit needs
/// `FileDescriptorStoreMax=`). systemd keeps one copy of a descriptor however often it is
/// handed over.
pub fn store(name: &str, fd: BorrowedFd<'_>) {
    send(&format!("FDSTORE=1\nFDNAME={name}"), Some(fd));
}

/// Takes the descriptors named `name` out of the store.
pub fn unstore(name: &str) {
    notify(&format!("FDSTOREREMOVE=1\nFDNAME={name}"));
}

/// The descriptors systemd passed at start (`$LISTEN_FDS`, named by `$LISTEN_FDNAMES`: those
/// of the store), if they are for this process. Takes them: the variables are removed.
pub fn received() -> Vec<(String, OwnedFd)> {
    let for_us = std::env::var("LISTEN_PID")
        .ok()
        .and_then(|pid| pid.parse::<u32>().ok())
        == Some(std::process::id());
    let count: i32 = std::env::var("LISTEN_FDS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    let names = std::env::var("LISTEN_FDNAMES").unwrap_or_default();
    for variable in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        std::env::remove_var(variable);
    }
    if !for_us {
        return Vec::new();
    }
    const LISTEN_FDS_START: i32 = 3;
    let mut names = names.split(':');
    (0..count.max(0))
        .map(|i| {
            let fd = LISTEN_FDS_START + i;
            // SAFETY: systemd passed descriptors 3.. to this process for it to own.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            // SAFETY: fcntl on a descriptor we own.
            unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
            (names.next().unwrap_or("").to_string(), fd)
        })
        .collect()
}

fn send(state: &str, fd: Option<BorrowedFd<'_>>) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let path = path.to_string_lossy().into_owned();
    let result = (|| -> std::io::Result<()> {
        let socket = UnixDatagram::unbound()?;
        let addr = match path.strip_prefix('@') {
            // An abstract socket.
            Some(name) => SocketAddr::from_abstract_name(name.as_bytes())?,
            None => SocketAddr::from_pathname(&path)?,
        };
        match fd {
            None => socket.send_to_addr(state.as_bytes(), &addr).map(|_| ()),
            Some(fd) => {
                socket.connect_addr(&addr)?;
                send_with_fd(&socket, state.as_bytes(), fd)
            }
        }
    })();
    if let Err(error) = result {
        log::warn!("telling systemd {state:?} failed: {error}");
    }
}

/// One datagram carrying `fd` (SCM_RIGHTS) on a connected socket.
fn send_with_fd(socket: &UnixDatagram, data: &[u8], fd: BorrowedFd<'_>) -> std::io::Result<()> {
    let raw = fd.as_raw_fd();
    // SAFETY: CMSG_SPACE is arithmetic.
    let space = unsafe { libc::CMSG_SPACE(size_of::<i32>() as u32) } as usize;
    let mut control = vec![0u8; space];
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    // SAFETY: a zeroed msghdr is valid; it points at buffers that outlive the call below.
    let mut message: libc::msghdr = unsafe { std::mem::zeroed() };
    message.msg_iov = &mut iov;
    message.msg_iovlen = 1;
    message.msg_control = control.as_mut_ptr().cast();
    // (`as _`: socklen_t in musl, size_t in glibc.)
    message.msg_controllen = space as _;
    // SAFETY: the control buffer has room for one header with one descriptor.
    unsafe {
        let header = libc::CMSG_FIRSTHDR(&message);
        (*header).cmsg_level = libc::SOL_SOCKET;
        (*header).cmsg_type = libc::SCM_RIGHTS;
        (*header).cmsg_len = libc::CMSG_LEN(size_of::<i32>() as u32) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(header).cast::<i32>(), raw);
    }
    // SAFETY: sendmsg with the message built above.
    if unsafe { libc::sendmsg(socket.as_raw_fd(), &message, libc::MSG_NOSIGNAL) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
