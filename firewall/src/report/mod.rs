//! The counters of the rules in force, for `firewall stats` ([`stats`]) and Prometheus
//! ([`metrics`]).
pub mod flows;
pub mod metrics;
pub mod metrics_server;
pub mod stats;
