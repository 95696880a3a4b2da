//! The rule semantics applied directly ([`reference`]), and the answers built on them:
//! which rule decides a packet ([`explain`]), who may reach each listening socket
//! ([`exposure`]).
pub mod explain;
pub mod exposure;
pub mod reference;
