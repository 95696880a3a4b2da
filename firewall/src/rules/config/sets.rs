//! `[sets.NAME]`: named lists of networks from the rule file (`cidrs`) and from set files of
//! one address or CIDR per line (`files`), merged, for rules to use as `"@NAME"`.
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use serde::Deserialize;
use toml::Spanned;

use super::values::network;
use super::{ConfigError, Located, DEFAULT_MAX_ENTRIES};
use crate::rules::files::{self, Trust, MAX_SET_FILE_BYTES};

/// A named set of networks, used in `from`/`to` as `"@NAME"`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSet {
    cidrs: Option<Spanned<Vec<Spanned<String>>>>,
    /// Files of one address or CIDR per line; `#` comments and blank lines allowed.
    files: Option<Spanned<Vec<Spanned<String>>>>,
}

/// Expands every set into its merged networks. Inline errors point into the rule file; set
/// file errors are `SETFILE:LINE: message`.
pub(super) fn resolve_sets(
    raw: BTreeMap<String, Spanned<RawSet>>,
    dir: &Path,
    trust: Trust,
    located: &dyn Fn(Located) -> ConfigError,
    set_files: &mut Vec<PathBuf>,
) -> Result<HashMap<String, Vec<IpNet>>, ConfigError> {
    let mut sets = HashMap::new();
    for (name, set) in raw {
        let span = set.span();
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(located((
                span,
                format!("invalid set name {name:?}: use letters, digits, - and _"),
            )));
        }
        let set = set.into_inner();
        let mut nets = Vec::new();
        if let Some(cidrs) = set.cidrs {
            for entry in cidrs.get_ref() {
                nets.push(network(entry).map_err(located)?);
            }
        }
        if let Some(files) = set.files {
            for file in files.get_ref() {
                let path = dir.join(file.get_ref());
                let text = files::read(&path, MAX_SET_FILE_BYTES, trust).map_err(|error| {
                    located((
                        file.span(),
                        format!("cannot read set file {}: {error}", path.display()),
                    ))
                })?;
                nets.extend(parse_set_file(&path.display().to_string(), &text)?);
                set_files.push(path);
            }
        }
        if nets.is_empty() {
            return Err(located((span, format!("set {name:?} is empty"))));
        }
        sets.insert(name, IpNet::aggregate(&nets));
    }
    Ok(sets)
}

/// Most entries read from one set file (before merging; `[limits] max_entries` caps what is
/// left after).
pub const MAX_SET_FILE_ENTRIES: usize = 4 * DEFAULT_MAX_ENTRIES as usize;

/// One address or CIDR per line (FireHOL .netset and plain lists); `#` starts a comment.
pub fn parse_set_file(file: &str, text: &str) -> Result<Vec<IpNet>, ConfigError> {
    let mut nets = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let entry = line.split('#').next().unwrap_or("").trim();
        if entry.is_empty() {
            continue;
        }
        if nets.len() == MAX_SET_FILE_ENTRIES {
            return Err(ConfigError {
                file: file.to_string(),
                line: index + 1,
                col: 0,
                message: format!("more than {MAX_SET_FILE_ENTRIES} entries in one set file"),
            });
        }
        let net = network(&Spanned::new(0..0, entry.to_string())).map_err(|(_, message)| {
            ConfigError {
                file: file.to_string(),
                line: index + 1,
                col: 0,
                message,
            }
        })?;
        nets.push(net);
    }
    Ok(nets)
}
