//! Watching the rule file and its set files with inotify, so that an edit reloads them.
use std::collections::{HashMap, HashSet};
use std::ffi::OsString;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};
use futures_util::StreamExt as _;
use inotify::{EventStream, Inotify, WatchDescriptor, WatchMask};

/// Watches the rule file and its set files through their directories (editors replace files
/// by renaming a new one over them).
pub(super) struct FileWatcher {
    events: EventStream<Vec<u8>>,
    /// Per watched directory, the file names that matter.
    names: HashMap<WatchDescriptor, HashSet<OsString>>,
}

impl FileWatcher {
    pub(super) fn new(files: &[PathBuf]) -> Result<FileWatcher> {
        let inotify = Inotify::init().context("inotify")?;
        let mut names: HashMap<WatchDescriptor, HashSet<OsString>> = HashMap::new();
        for file in files {
            let dir = match file.parent() {
                Some(dir) if !dir.as_os_str().is_empty() => dir,
                _ => Path::new("."),
            };
            let Some(name) = file.file_name() else {
                continue;
            };
            let mask = WatchMask::CLOSE_WRITE
                | WatchMask::MOVED_TO
                | WatchMask::CREATE
                | WatchMask::DELETE;
            let wd = inotify
                .watches()
                .add(dir, mask)
                .with_context(|| format!("watching {}", dir.display()))?;
            names.entry(wd).or_default().insert(name.to_os_string());
        }
        let events = inotify.into_event_stream(vec![0u8; 4096])?;
        Ok(FileWatcher { events, names })
    }

    /// Waits for a change to one of the files.
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
