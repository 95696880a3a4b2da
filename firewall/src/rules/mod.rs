//! Rule files: read ([`files`]), parsed and validated ([`config`]) into a [`model::RuleSet`],
//! checked for likely mistakes ([`lint`]) and compiled into map contents ([`compile`], which
//! interns address rule sets into [`classes`]).
pub mod classes;
pub mod compile;
pub mod config;
pub mod files;
pub mod lint;
pub mod model;
mod ports;
