//! Rule files: read ([`files`]), parsed and validated ([`config`]) into a [`model::RuleSet`],
//! checked for likely mistakes ([`lint`]) and compiled into map contents ([`compile`]).
pub mod compile;
pub mod config;
pub mod files;
pub mod lint;
pub mod model;
