//! The bench's tiny programs (the generator's redirect, the bare drop and pass anchors) and
//! the bpf(2) calls that load, run and attach them, made directly: aya 0.14's `TestRun` has no
//! `flags`, so it cannot ask for live frames.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use anyhow::{bail, Result};

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_TEST_RUN: libc::c_long = 10;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_PROG_TYPE_XDP: u32 = 6;
/// `enum bpf_attach_type`'s BPF_XDP.
const BPF_XDP: u32 = 37;
/// XDP_FLAGS_DRV_MODE: the driver's own XDP hook, never the generic one.
const XDP_FLAGS_DRV_MODE: u32 = 4;
/// Linux 5.18+: the test run's frames are real XDP frames, redirected or transmitted.
pub const BPF_F_TEST_XDP_LIVE_FRAMES: u32 = 2;
const BPF_FUNC_REDIRECT: i32 = 23;
pub const XDP_DROP: i32 = 1;
pub const XDP_PASS: i32 = 2;
#[cfg(test)]
const XDP_REDIRECT: u32 = 4;

/// `struct bpf_insn`: opcode, destination and source register (4 bits each), offset, immediate.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Insn {
    code: u8,
    regs: u8,
    off: i16,
    imm: i32,
}

impl Insn {
    /// `dst = imm` (BPF_ALU64 | BPF_MOV | BPF_K).
    const fn mov64_imm(dst: u8, imm: i32) -> Insn {
        Insn {
            code: 0xb7,
            regs: dst & 0x0f,
            off: 0,
            imm,
        }
    }

    /// `call helper` (BPF_JMP | BPF_CALL).
    const fn call(helper: i32) -> Insn {
        Insn {
            code: 0x85,
            regs: 0,
            off: 0,
            imm: helper,
        }
    }

    /// `exit` (BPF_JMP | BPF_EXIT): returns r0.
    const fn exit() -> Insn {
        Insn {
            code: 0x95,
            regs: 0,
            off: 0,
            imm: 0,
        }
    }
}

/// `return bpf_redirect(ifindex, 0)`, as xdp-trafficgen's generator: every live frame goes
/// out of the device `ifindex` (the sending veth end, so its peer receives it).
pub fn redirect_program(ifindex: u32) -> [Insn; 4] {
    [
        Insn::mov64_imm(1, ifindex as i32),
        Insn::mov64_imm(2, 0),
        Insn::call(BPF_FUNC_REDIRECT),
        Insn::exit(),
    ]
}

/// `return XDP_DROP`: what firewall-ebpf's `floor.rs` compiles to.
pub fn drop_program() -> [Insn; 2] {
    [Insn::mov64_imm(0, XDP_DROP), Insn::exit()]
}

/// `return XDP_PASS`: an XDP program that costs next to nothing and hands every frame to the
/// stack, the anchor of rows whose frames pass.
pub fn pass_program() -> [Insn; 2] {
    [Insn::mov64_imm(0, XDP_PASS), Insn::exit()]
}

/// The BPF_PROG_LOAD part of `union bpf_attr`, up to `expected_attach_type`.
#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

/// The BPF_PROG_TEST_RUN part of `union bpf_attr` (`test`), through `batch_size` (5.18).
#[repr(C)]
#[derive(Default)]
pub struct TestRunAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    _pad: u32,
}

/// `struct xdp_md`, the context given to a test run: live frames need `ingress_ifindex` (and
/// a queue of that device) so the kernel knows which device the frames "arrived" on.
#[repr(C)]
#[derive(Default)]
pub struct XdpMd {
    data: u32,
    data_end: u32,
    data_meta: u32,
    ingress_ifindex: u32,
    rx_queue_index: u32,
    egress_ifindex: u32,
}

/// The BPF_LINK_CREATE part of `union bpf_attr` for XDP.
#[repr(C)]
#[derive(Default)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_ifindex: u32,
    attach_type: u32,
    flags: u32,
}

fn bpf<T>(command: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a live, properly laid out `union bpf_attr` prefix of its full size;
    // the kernel zero-extends the rest.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            command,
            attr as *mut T,
            std::mem::size_of::<T>(),
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(rc)
}

/// Loads `insns` as an XDP program; the verifier's log is the error when it refuses.
pub fn load_xdp(name: &str, insns: &[Insn]) -> Result<OwnedFd> {
    let license = c"Dual MIT/GPL";
    let mut log = vec![0u8; 64 * 1024];
    let mut prog_name = [0u8; 16];
    for (slot, byte) in prog_name.iter_mut().zip(name.bytes().take(15)) {
        *slot = byte;
    }
    let mut attr = ProgLoadAttr {
        prog_type: BPF_PROG_TYPE_XDP,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: 1,
        log_size: log.len() as u32,
        log_buf: log.as_mut_ptr() as u64,
        prog_name,
        expected_attach_type: BPF_XDP,
        ..Default::default()
    };
    match bpf(BPF_PROG_LOAD, &mut attr) {
        // SAFETY: the kernel returned a new descriptor that nothing else owns.
        Ok(fd) => Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) }),
        Err(error) => {
            let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
            bail!(
                "loading {name}: {error}: {}",
                String::from_utf8_lossy(&log[..end])
            )
        }
    }
}

/// One BPF_PROG_TEST_RUN of `frame` through `program`, `repeat` times, as live frames
/// arriving on `ingress_ifindex` (of the calling thread's namespace) queue 0, in batches of
/// `batch_size` (0: the kernel's 64). Without `live`, an ordinary test run: returns the
/// program's verdict.
pub fn test_run(
    program: &OwnedFd,
    frame: &[u8],
    ingress_ifindex: u32,
    repeat: u32,
    batch_size: u32,
    live: bool,
) -> io::Result<u32> {
    let context = XdpMd {
        data_end: frame.len() as u32,
        ingress_ifindex,
        ..Default::default()
    };
    let mut attr = TestRunAttr {
        prog_fd: program.as_raw_fd() as u32,
        data_size_in: frame.len() as u32,
        data_in: frame.as_ptr() as u64,
        repeat,
        ctx_size_in: std::mem::size_of::<XdpMd>() as u32,
        ctx_in: &context as *const XdpMd as u64,
        flags: if live { BPF_F_TEST_XDP_LIVE_FRAMES } else { 0 },
        batch_size: if live { batch_size } else { 0 },
        ..Default::default()
    };
    bpf(BPF_PROG_TEST_RUN, &mut attr)?;
    Ok(attr.retval)
}

/// Attaches `program` to `ifindex` (of the calling thread's namespace) in driver mode, through
/// a BPF link: closing the returned descriptor detaches it.
pub fn attach_xdp(program: &OwnedFd, ifindex: u32) -> Result<OwnedFd> {
    let mut attr = LinkCreateAttr {
        prog_fd: program.as_raw_fd() as u32,
        target_ifindex: ifindex,
        attach_type: BPF_XDP,
        flags: XDP_FLAGS_DRV_MODE,
    };
    let fd = bpf(BPF_LINK_CREATE, &mut attr)
        .map_err(|error| anyhow::anyhow!("attaching XDP to ifindex {ifindex}: {error}"))?;
    // SAFETY: the kernel returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

#[cfg(test)]
mod tests {
    use std::mem::{offset_of, size_of};

    use super::*;

    fn bytes(insns: &[Insn]) -> Vec<u8> {
        insns
            .iter()
            .flat_map(|insn| {
                let mut b = vec![insn.code, insn.regs];
                b.extend(insn.off.to_le_bytes());
                b.extend(insn.imm.to_le_bytes());
                b
            })
            .collect()
    }

    #[test]
    fn redirect_program_encodes_as_the_kernel_reads_it() {
        // opcode, dst | src << 4, offset (le16), immediate (le32); as `llvm-objdump -d` prints
        // the same instructions of firewall-ebpf's objects (`b7 00 00 00 01 00 00 00  r0 = 1`).
        assert_eq!(
            bytes(&redirect_program(7)),
            [
                0xb7, 0x01, 0, 0, 7, 0, 0, 0, // r1 = 7
                0xb7, 0x02, 0, 0, 0, 0, 0, 0, // r2 = 0
                0x85, 0x00, 0, 0, 23, 0, 0, 0, // call 23
                0x95, 0x00, 0, 0, 0, 0, 0, 0, // exit
            ]
        );
        assert_eq!(size_of::<Insn>(), 8);
        // floor.rs's object, disassembled: `r0 = 1; exit`.
        assert_eq!(
            bytes(&drop_program()),
            [0xb7, 0, 0, 0, 1, 0, 0, 0, 0x95, 0, 0, 0, 0, 0, 0, 0]
        );
        // `r0 = 2; exit`.
        assert_eq!(
            bytes(&pass_program()),
            [0xb7, 0, 0, 0, 2, 0, 0, 0, 0x95, 0, 0, 0, 0, 0, 0, 0]
        );
    }

    #[test]
    fn attr_layouts_match_the_uapi() {
        assert_eq!(offset_of!(TestRunAttr, data_in), 16);
        assert_eq!(offset_of!(TestRunAttr, repeat), 32);
        assert_eq!(offset_of!(TestRunAttr, ctx_in), 48);
        assert_eq!(offset_of!(TestRunAttr, flags), 64);
        assert_eq!(offset_of!(TestRunAttr, batch_size), 72);
        assert_eq!(size_of::<TestRunAttr>(), 80);
        assert_eq!(size_of::<XdpMd>(), 24);
        assert_eq!(offset_of!(XdpMd, ingress_ifindex), 12);
        assert_eq!(offset_of!(ProgLoadAttr, log_buf), 32);
        assert_eq!(offset_of!(ProgLoadAttr, prog_name), 48);
        assert_eq!(offset_of!(ProgLoadAttr, expected_attach_type), 68);
    }

    /// The programs as the kernel runs them (as root, like the project's other kernel tests):
    /// an ordinary test run returns their verdicts.
    #[test]
    fn the_kernel_runs_the_programs() {
        let frame = [0u8; 64];
        let redirect = load_xdp("test_redirect", &redirect_program(1)).unwrap();
        assert_eq!(
            test_run(&redirect, &frame, 0, 1, 0, false).unwrap(),
            XDP_REDIRECT
        );
        let drop = load_xdp("test_drop", &drop_program()).unwrap();
        assert_eq!(
            test_run(&drop, &frame, 0, 1, 0, false).unwrap(),
            XDP_DROP as u32
        );
        let pass = load_xdp("test_pass", &pass_program()).unwrap();
        assert_eq!(
            test_run(&pass, &frame, 0, 1, 0, false).unwrap(),
            XDP_PASS as u32
        );
    }
}
