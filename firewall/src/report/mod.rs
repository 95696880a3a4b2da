//! The counters of the rules in force, for `firewall stats` ([`stats`]) and Prometheus
//! ([`metrics`]), and what `firewall status` shows ([`status`]).
pub mod flows;
pub mod metrics;
pub mod metrics_server;
pub mod stats;
pub mod status;
