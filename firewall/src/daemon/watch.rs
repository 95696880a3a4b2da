//! Watching the rule file and its set files with inotify, so that an edit reloads them.
//!
//! A file is watched through the directory that holds it (editors replace files by renaming
//! a new one over them), and so is every symbolic link on the way to it: Kubernetes mounts a
//! ConfigMap as `rules.toml -> ..data/rules.toml` with `..data -> ..2026_12_07_...`, and
//! updates it by renaming a new `..data` link over the old one; release directories switched
//! by a link work the same way. The daemon builds a new watcher after every reload, so the
//! links are followed again to wherever they point now.
use std::collections::{HashMap, HashSet};
use std::ffi::OsString;
use std::path::{Component, Path, PathBuf};

use anyhow::{Context as _, Result};
use futures_util::StreamExt as _;
use inotify::{EventStream, Inotify, WatchDescriptor, WatchMask};

/// Links followed on the way to one file before giving up (as the kernel's ELOOP).
const MAX_LINKS: usize = 40;

/// Watches the rule file and its set files through their directories.
pub(super) struct FileWatcher {
    events: EventStream<Vec<u8>>,
    /// Per watched directory, the entry names that matter.
    names: HashMap<WatchDescriptor, HashSet<OsString>>,
}

impl FileWatcher {
    pub(super) fn new(files: &[PathBuf]) -> Result<FileWatcher> {
        let inotify = Inotify::init().context("inotify")?;
        let mut names: HashMap<WatchDescriptor, HashSet<OsString>> = HashMap::new();
        let mask =
            WatchMask::CLOSE_WRITE | WatchMask::MOVED_TO | WatchMask::CREATE | WatchMask::DELETE;
        for file in files {
            for (dir, name) in watch_points(file) {
                let wd = inotify
                    .watches()
                    .add(&dir, mask)
                    .with_context(|| format!("watching {}", dir.display()))?;
                names.entry(wd).or_default().insert(name);
            }
        }
        let events = inotify.into_event_stream(vec![0u8; 4096])?;
        Ok(FileWatcher { events, names })
    }

    /// Waits for a change to one of the files, or to a link on the way to one.
    pub(super) async fn changed(&mut self) -> Result<()> {
        loop {
            let event = self.events.next().await.context("inotify stream ended")??;
            let relevant = match (&event.name, self.names.get(&event.wd)) {
                (Some(name), Some(names)) => names.contains(name),
                _ => false,
            };
            if relevant {
                return Ok(());
            }
        }
    }
}

/// The (directory, entry name) pairs whose change can change what `file` reads: the file in
/// its directory, and each symbolic link met while resolving its path, in the directory that
/// holds the link. Resolution stops where the path does not exist (yet).
fn watch_points(file: &Path) -> Vec<(PathBuf, OsString)> {
    let start = std::path::absolute(file).unwrap_or_else(|_| file.to_path_buf());
    let mut points = Vec::new();
    // The directory resolved so far, and the components still to walk.
    let mut resolved = PathBuf::from("/");
    let mut pending: Vec<OsString> = components(&start);
    pending.reverse();
    let mut links = 0;
    while let Some(name) = pending.pop() {
        if name == ".." {
            resolved.pop();
            continue;
        }
        let path = resolved.join(&name);
        let target = match std::fs::read_link(&path) {
            Ok(target) if links < MAX_LINKS => target,
            // Not a link (or too many): a plain entry.
            _ => {
                if pending.is_empty() {
                    points.push((resolved.clone(), name));
                }
                resolved = path;
                continue;
            }
        };
        links += 1;
        points.push((resolved.clone(), name));
        // The link's target takes its place: from / when absolute, else from its directory.
        if target.is_absolute() {
            resolved = PathBuf::from("/");
        }
        let mut rest = components(&target);
        rest.reverse();
        pending.extend(rest);
    }
    points
}

/// A path's components as names (`..` kept, `.` and the root dropped).
fn components(path: &Path) -> Vec<OsString> {
    path.components()
        .filter_map(|component| match component {
            Component::Normal(name) => Some(name.to_os_string()),
            Component::ParentDir => Some("..".into()),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_on_the_way_are_watched_where_they_live() {
        let dir = std::env::temp_dir().join(format!("fw-watch-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        // The ConfigMap layout: rules.toml -> ..data/rules.toml, ..data -> ..v1/.
        std::fs::create_dir_all(dir.join("..v1")).unwrap();
        std::fs::write(dir.join("..v1/rules.toml"), "").unwrap();
        std::os::unix::fs::symlink("..v1", dir.join("..data")).unwrap();
        std::os::unix::fs::symlink("..data/rules.toml", dir.join("rules.toml")).unwrap();
        // A plain file beside it, and a link to a directory above an absolute target.
        std::fs::write(dir.join("plain.toml"), "").unwrap();
        std::os::unix::fs::symlink(&dir, dir.join("..v1/up")).unwrap();

        let points = watch_points(&dir.join("rules.toml"));
        let dir_of = |sub: &str| {
            if sub.is_empty() {
                dir.clone()
            } else {
                dir.join(sub)
            }
        };
        let want: Vec<(PathBuf, OsString)> =
            [("", "rules.toml"), ("", "..data"), ("..v1", "rules.toml")]
                .iter()
                .map(|(sub, name)| (dir_of(sub), OsString::from(name)))
                .collect();
        assert_eq!(points, want);
        assert_eq!(
            watch_points(&dir.join("plain.toml")),
            vec![(dir.clone(), OsString::from("plain.toml"))]
        );
        // Through `up` (absolute) and `..data` again to the same file.
        let points = watch_points(&dir.join("..v1/up/..data/rules.toml"));
        assert_eq!(
            points.last(),
            Some(&(dir.join("..v1"), "rules.toml".into()))
        );
        assert!(
            points.contains(&(dir.join("..v1"), "up".into())),
            "{points:?}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
