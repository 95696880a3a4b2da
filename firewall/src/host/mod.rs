//! What the daemon learns from the host and tells it: the interfaces present ([`ifaces`]) and
//! their link types ([`link`]), the open sockets ([`sockets`]), systemd ([`notify`]).
pub mod ifaces;
pub mod link;
pub mod notify;
pub mod sockets;
