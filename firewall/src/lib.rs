//! The firewall daemon as a library: parse config -> compile -> apply -> run.
pub mod batch;
pub mod compile;
pub mod config;
pub mod daemon;
pub mod explain;
pub mod exposure;
pub mod kernel;
pub mod kernel_log;
pub mod lint;
pub mod metrics;
pub mod model;
pub mod notify;
pub mod packet;
pub mod pins;
pub mod reference;
pub mod sockets;
pub mod stats;
