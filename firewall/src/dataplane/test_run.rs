//! Running frames through the loaded programs with BPF_PROG_TEST_RUN, for tests and
//! benchmarks (cargo feature `testing`).
use std::time::Duration;

use anyhow::{anyhow, Result};
use aya::programs::{SchedClassifier, TestRun, TestRunOptions, TestRunResult, Xdp};

use crate::dataplane::Kernel;
use crate::host::link::LinkLayer;

/// Spare room in the output buffer beyond the frame.
const HEADROOM: usize = 256;

impl Kernel {
    /// Runs `frame` (an Ethernet frame) through the tc egress program, as the host sending
    /// it on the test run's device (the namespace's loopback); returns the tc action.
    pub fn test_run_egress(&self, frame: &[u8]) -> Result<u32> {
        self.test_run_egress_on(LinkLayer::Ethernet, frame)
    }

    /// [`Kernel::test_run_egress`] with the tc program of link layer `layer` (for
    /// [`LinkLayer::Ip`], `frame` starts at the IP header).
    pub fn test_run_egress_on(&self, layer: LinkLayer, frame: &[u8]) -> Result<u32> {
        let name = layer.egress_program();
        let program: &SchedClassifier = self
            .ebpf
            .program(name)
            .ok_or_else(|| anyhow!("tc program {name} missing"))?
            .try_into()?;
        Ok(run_program(program, frame, 1)?.0)
    }

    /// Runs `frame` through the program `repeat` times with BPF_PROG_TEST_RUN; returns the
    /// XDP action and the kernel's average time per run.
    pub fn test_run(&self, frame: &[u8], repeat: u32) -> Result<(u32, Duration)> {
        self.test_run_on(LinkLayer::Ethernet, frame, repeat)
    }

    /// [`Kernel::test_run`] with the XDP program of link layer `layer` (for
    /// [`LinkLayer::Ip`], `frame` starts at the IP header).
    pub fn test_run_on(
        &self,
        layer: LinkLayer,
        frame: &[u8],
        repeat: u32,
    ) -> Result<(u32, Duration)> {
        let name = layer.xdp_program();
        let program: &Xdp = self
            .ebpf
            .program(name)
            .ok_or_else(|| anyhow!("XDP program {name} missing"))?
            .try_into()?;
        run_program(program, frame, repeat)
    }
}

/// BPF_PROG_TEST_RUN of `program` on `frame`, `repeat` times: the return value and the mean
/// time per run. For any loaded program (the benchmark's floor, too).
pub fn run_program<P>(program: &P, frame: &[u8], repeat: u32) -> Result<(u32, Duration)>
where
    P: for<'a> TestRun<Opts<'a> = TestRunOptions<'a>, Result = TestRunResult>,
{
    let mut out = vec![0u8; frame.len() + HEADROOM];
    let result = program.test_run(TestRunOptions {
        data_in: Some(frame),
        data_out: Some(&mut out),
        repeat,
        ..Default::default()
    })?;
    Ok((result.return_value, result.duration))
}
