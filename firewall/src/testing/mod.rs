//! Test and benchmark support: frames built byte by byte ([`packet`]) and shared rule files
//! ([`rules`]).
pub mod packet;
pub mod rules;
