//! Test and benchmark support: frames built byte by byte ([`packet`]).
pub mod packet;
