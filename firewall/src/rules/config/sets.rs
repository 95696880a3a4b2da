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
    /// Filled at run time by `firewall ban --set NAME`, not from the file.
    dynamic: Option<Spanned<bool>>,
}

/// Expands every set into its merged networks. Inline errors point into the rule file; set
/// file errors are `SETFILE:LINE: message`.
pub(super) fn resolve_sets(
    raw: BTreeMap<String, Spanned<RawSet>>,
    dir: &Path,
    trust: Trust,
    located: &dyn Fn(Located) -> ConfigError,
    set_files: &mut Vec<PathBuf>,
    dynamic: &mut Vec<String>,
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
        if set
            .dynamic
            .as_ref()
            .is_some_and(|dynamic| *dynamic.get_ref())
        {
            if set.cidrs.is_some() || set.files.is_some() {
                return Err(located((
                    span,
                    format!(
                        "set {name:?} is dynamic: it takes no `cidrs` or `files` (`firewall ban \
                         --set {name}` fills it)"
                    ),
                )));
            }
            // Rules naming it match none of its (run-time) members until they are filled in.
            dynamic.push(name.clone());
            sets.insert(name, Vec::new());
            continue;
        }
        let mut nets = Vec::new();
        if let Some(cidrs) = set.cidrs {
            for entry in cidrs.get_ref() {
                nets.push(network(entry).map_err(located)?);
            }
        }
        if let Some(files) = set.files {
            for file in files.get_ref() {
                let path = dir.join(file.get_ref());
                // Line by line: a million-line file is never held whole.
                let name = path.display().to_string();
                let mut entries = SetFileEntries::new(&name, &mut nets);
                let read = files::read_lines(&path, MAX_SET_FILE_BYTES, trust, |number, line| {
                    entries.line(number, line)
                });
                match read {
                    Ok(()) => {}
                    Err(Ok(error)) => return Err(error),
                    Err(Err(error)) => {
                        return Err(located((
                            file.span(),
                            format!("cannot read set file {}: {error}", path.display()),
                        )))
                    }
                }
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
    let mut entries = SetFileEntries::new(file, &mut nets);
    for (index, line) in text.lines().enumerate() {
        entries.line(index + 1, line)?;
    }
    Ok(nets)
}

/// The entries of one set file as its lines come, appended to a list.
struct SetFileEntries<'a> {
    file: &'a str,
    nets: &'a mut Vec<IpNet>,
    /// Entries of this file so far.
    count: usize,
}

impl<'a> SetFileEntries<'a> {
    fn new(file: &'a str, nets: &'a mut Vec<IpNet>) -> Self {
        SetFileEntries {
            file,
            nets,
            count: 0,
        }
    }

    fn line(&mut self, number: usize, line: &str) -> Result<(), ConfigError> {
        let entry = line.split('#').next().unwrap_or("").trim();
        if entry.is_empty() {
            return Ok(());
        }
        let error = |message| ConfigError {
            file: self.file.to_string(),
            line: number,
            col: 0,
            message,
        };
        if self.count == MAX_SET_FILE_ENTRIES {
            return Err(error(format!(
                "more than {MAX_SET_FILE_ENTRIES} entries in one set file"
            )));
        }
        let net = network(&Spanned::new(0..0, entry.to_string()))
            .map_err(|(_, message)| error(message))?;
        self.nets.push(net);
        self.count += 1;
        Ok(())
    }
}
