//! Thin wrappers of the libc calls and raw syscalls the dataplane makes: the `bpf(2)` commands
//! aya 0.14 does not wrap, the RCU wait after a generation flip, the memlock limit and the
//! clock of the kernel programs.
use std::time::Duration;

const NANOS_PER_SEC: u64 = 1_000_000_000;

/// Seconds to nanoseconds, as the kernel programs count time.
pub const fn secs_to_ns(secs: u64) -> u64 {
    secs * NANOS_PER_SEC
}

/// `bpf(command, attr, sizeof attr)`: returns the syscall's non-negative result.
///
/// # Safety
/// `attr` must be the `union bpf_attr` member that `command` reads, and every pointer in it
/// must be valid for what the command reads or writes through it.
pub unsafe fn bpf<A>(command: libc::c_long, attr: &mut A) -> std::io::Result<libc::c_long> {
    // SAFETY: the caller vouches for `attr`; it outlives the call.
    let result = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            command,
            attr as *mut A,
            std::mem::size_of::<A>() as u32,
        )
    };
    if result < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(result)
}

/// Waits for an RCU grace period: BPF programs run inside RCU read-side sections, so when it
/// returns, every run that started before the call has ended. `membarrier(GLOBAL)` is
/// `synchronize_rcu()` in the kernel; where it is unavailable (nohz_full), a pause far longer
/// than any program run stands in.
pub fn wait_for_packets_in_flight() {
    const MEMBARRIER_CMD_GLOBAL: libc::c_long = 1;
    // SAFETY: membarrier takes no pointers.
    let result = unsafe { libc::syscall(libc::SYS_membarrier, MEMBARRIER_CMD_GLOBAL, 0, 0) };
    if result != 0 {
        log::debug!(
            "membarrier: {}; pausing instead",
            std::io::Error::last_os_error()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK.
pub fn raise_memlock_limit() {
    let limit = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: plain syscall with a valid pointer.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &limit) } != 0 {
        log::debug!("could not raise RLIMIT_MEMLOCK");
    }
}

/// CLOCK_MONOTONIC in nanoseconds: the clock of `bpf_ktime_get_ns`.
pub fn monotonic_now_ns() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer to a timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    secs_to_ns(now.tv_sec as u64) + now.tv_nsec as u64
}
