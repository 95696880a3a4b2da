//! The firewall daemon as a library: parse config -> compile -> apply -> run.
//!
//! - [`rules`]: rule files to a validated rule set, and that set to the contents of the maps;
//! - [`dataplane`]: the XDP and tc programs as seen from userspace: load, pin, attach, write
//!   generations, read flows, counters and the packet log;
//! - [`daemon`]: `firewall run`: the run loop, reloads, the control socket;
//! - [`host`]: what the daemon learns from and tells the host: interfaces, link types, open
//!   sockets, systemd;
//! - [`analysis`]: the reference evaluator and what is answered from it (`explain`,
//!   `exposure`);
//! - [`report`]: counters for `stats` and Prometheus;
//! - `testing` (cargo feature `testing`): frames for tests and benchmarks.
pub mod analysis;
pub mod daemon;
pub mod dataplane;
pub mod host;
pub mod report;
pub mod rules;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
