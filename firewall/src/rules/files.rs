//! Reading rule and set files, and writing the rule file.
//!
//! A file is opened first and judged by what was opened (its descriptor), never by a path
//! looked at before or after: whoever can swap a file between a check and a read decides what
//! the firewall lets through. Only regular files are read, so a FIFO or a device named as a
//! set file is an error, not a hang or an endless read, and sizes are capped.
use std::io::{Read as _, Write as _};
use std::os::unix::fs::{MetadataExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};

/// Largest rule file read.
pub const MAX_RULE_FILE_BYTES: u64 = 16 << 20;
/// Largest set file read (a million IPv6 networks take about 40 MiB).
pub const MAX_SET_FILE_BYTES: u64 = 256 << 20;

/// Who may have written the files read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trust {
    /// Root only: owned by root, not writable by group or others, in directories only root
    /// can change (what `firewall run` demands).
    RootOnly,
    /// Anyone (`check`, `explain`, `--insecure-files`): only the kind and size are checked.
    Anyone,
}

/// Reads `path` as text: a regular file of at most `limit` bytes that `trust` accepts. The
/// error says what is wrong, without the path (callers name the file).
pub fn read(path: &Path, limit: u64, trust: Trust) -> Result<String, String> {
    let (file, len) = open(path, limit, trust)?;
    // The file may grow while we read: read one byte past the limit to notice.
    let mut bytes = Vec::with_capacity(len as usize);
    file.take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(|error| error.to_string())?;
    if bytes.len() as u64 > limit {
        return Err(too_large(limit));
    }
    String::from_utf8(bytes).map_err(|error| format!("not UTF-8 text: {error}"))
}

/// [`read`] line by line, for set files of a million lines: `line` gets each line (its number
/// from 1, the text without its line end); an error of `line` stops the reading and comes
/// back. Reading errors (the file outgrew `limit` meanwhile, a line is not UTF-8) come back
/// as `Err(Err(message))`, with the line number where it makes sense.
pub fn read_lines<E>(
    path: &Path,
    limit: u64,
    trust: Trust,
    mut line: impl FnMut(usize, &str) -> Result<(), E>,
) -> Result<(), Result<E, String>> {
    use std::io::BufRead as _;
    let (file, _) = open(path, limit, trust).map_err(Err)?;
    let mut reader = std::io::BufReader::with_capacity(1 << 16, file.take(limit + 1));
    let mut bytes = Vec::new();
    let mut read = 0u64;
    for number in 1.. {
        bytes.clear();
        let got = reader
            .read_until(b'\n', &mut bytes)
            .map_err(|error| Err(error.to_string()))?;
        if got == 0 {
            return Ok(());
        }
        read += got as u64;
        if read > limit {
            return Err(Err(too_large(limit)));
        }
        let text = std::str::from_utf8(&bytes)
            .map_err(|error| Err(format!("line {number}: not UTF-8 text: {error}")))?;
        let text = text.strip_suffix('\n').unwrap_or(text);
        line(number, text.strip_suffix('\r').unwrap_or(text)).map_err(Ok)?;
    }
    Ok(())
}

/// Opens `path` for [`read`]: a regular file of at most `limit` bytes (its length returned)
/// that `trust` accepts.
fn open(path: &Path, limit: u64, trust: Trust) -> Result<(std::fs::File, u64), String> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        // A FIFO would block this open until a writer comes; a device could be a terminal.
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(path)
        .map_err(|error| error.to_string())?;
    let meta = file.metadata().map_err(|error| error.to_string())?;
    let kind = meta.file_type();
    if !kind.is_file() {
        use std::os::unix::fs::FileTypeExt as _;
        let what = if kind.is_dir() {
            "a directory"
        } else if kind.is_fifo() {
            "a FIFO"
        } else if kind.is_char_device() || kind.is_block_device() {
            "a device"
        } else if kind.is_socket() {
            "a socket"
        } else {
            "not a file"
        };
        return Err(format!("{what}, not a regular file"));
    }
    if trust == Trust::RootOnly {
        check_owner(&meta, "")?;
        let real = opened_path(&file)?;
        let mut dir = real.parent();
        while let Some(current) = dir {
            let meta = std::fs::metadata(current).map_err(|error| error.to_string())?;
            check_owner(&meta, &format!("its directory {}: ", current.display()))?;
            dir = current.parent();
        }
    }
    if meta.len() > limit {
        return Err(too_large(limit));
    }
    Ok((file, meta.len()))
}

fn too_large(limit: u64) -> String {
    format!("larger than {} MiB, the most read", limit >> 20)
}

/// Owned by root and not writable by group or others; a directory may be world-writable
/// with the sticky bit (as /tmp), where only an entry's owner can replace it.
fn check_owner(meta: &std::fs::Metadata, what: &str) -> Result<(), String> {
    if meta.uid() != 0 {
        return Err(format!(
            "{what}owned by uid {}, not root; whoever can change it controls the firewall \
             (chown root, or run with --insecure-files)",
            meta.uid()
        ));
    }
    let sticky_dir = meta.is_dir() && meta.mode() & libc::S_ISVTX != 0;
    if meta.mode() & 0o022 != 0 && !sticky_dir {
        return Err(format!(
            "{what}writable by group or others (mode {:o}); whoever can change it controls \
             the firewall (chmod go-w, or run with --insecure-files)",
            meta.mode() & 0o7777
        ));
    }
    Ok(())
}

/// The path of the file `file` is open on, symlinks resolved.
fn opened_path(file: &std::fs::File) -> Result<PathBuf, String> {
    use std::os::fd::AsRawFd as _;
    std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd()))
        .map_err(|error| format!("resolving its path: {error}"))
}

/// Replaces `target` with `text` atomically and durably: a new file created exclusively
/// beside it (never following a link someone placed there), synced, renamed over the target,
/// then the directory synced. Readers see the old file or the new one, never a mixture.
pub fn replace(target: &Path, text: &str) -> std::io::Result<()> {
    let dir = match target.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let name = target
        .file_name()
        .ok_or_else(|| std::io::Error::other("no file name"))?
        .to_string_lossy();
    let staged = dir.join(format!(".{name}.{}.new", std::process::id()));
    let _ = std::fs::remove_file(&staged);
    let result = (|| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&staged)?;
        file.write_all(text.as_bytes())?;
        file.sync_all()?;
        std::fs::rename(&staged, target)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&staged);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("fw-files-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        dir
    }

    #[test]
    fn lines_come_one_by_one_with_their_numbers() {
        let dir = scratch("lines");
        let path = dir.join("set.txt");
        std::fs::write(&path, b"10.0.0.1\r\n# comment\n\n192.0.2.0/24").unwrap();
        let mut lines = Vec::new();
        let read = read_lines::<()>(&path, 1 << 20, Trust::Anyone, |number, line| {
            lines.push((number, line.to_string()));
            Ok(())
        });
        assert!(read.is_ok());
        let expected = [
            (1, "10.0.0.1"),
            (2, "# comment"),
            (3, ""),
            (4, "192.0.2.0/24"),
        ];
        assert_eq!(lines, expected.map(|(n, l)| (n, l.to_string())));
        // The caller's error stops the reading at its line.
        let mut seen = 0;
        let stopped = read_lines(&path, 1 << 20, Trust::Anyone, |number, _| {
            seen = number;
            if number == 2 {
                Err(number)
            } else {
                Ok(())
            }
        });
        assert_eq!((stopped, seen), (Err(Ok(2)), 2));
        // Text that is not UTF-8 is an error naming its line.
        std::fs::write(&path, b"10.0.0.1\n\xff\xfe\n").unwrap();
        let error = read_lines::<()>(&path, 1 << 20, Trust::Anyone, |_, _| Ok(())).unwrap_err();
        assert!(
            matches!(&error, Err(message) if message.starts_with("line 2: not UTF-8")),
            "{error:?}"
        );
        // Over the limit: refused before reading.
        let error = read_lines::<()>(&path, 4, Trust::Anyone, |_, _| Ok(())).unwrap_err();
        assert!(
            matches!(&error, Err(message) if message.contains("larger than")),
            "{error:?}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn only_regular_files_are_read() {
        let dir = scratch("kinds");
        let fifo = dir.join("fifo");
        let c_path = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo with a valid C string.
        assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o644) }, 0);
        for (path, expected) in [
            (fifo.as_path(), "a FIFO, not a regular file"),
            (Path::new("/dev/zero"), "a device, not a regular file"),
            (dir.as_path(), "a directory, not a regular file"),
        ] {
            // Returns at once: no hang on the FIFO, no endless read of /dev/zero.
            assert_eq!(read(path, 1 << 20, Trust::Anyone).unwrap_err(), expected);
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn sizes_are_capped() {
        let dir = scratch("size");
        let file = dir.join("big");
        std::fs::write(&file, vec![b'#'; 2 << 20]).unwrap();
        assert_eq!(
            read(&file, 1 << 20, Trust::Anyone).unwrap_err(),
            "larger than 1 MiB, the most read"
        );
        assert_eq!(read(&file, 2 << 20, Trust::Anyone).unwrap().len(), 2 << 20);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn trust_is_judged_on_the_opened_file_and_its_directories() {
        if unsafe { libc::geteuid() } != 0 {
            return;
        }
        let dir = scratch("trust");
        let file = dir.join("rules.toml");
        std::fs::write(&file, "").unwrap();
        let chmod = |path: &Path, mode| {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap()
        };
        chmod(&file, 0o644);
        assert_eq!(read(&file, 1 << 20, Trust::RootOnly), Ok(String::new()));
        for mode in [0o664, 0o646] {
            chmod(&file, mode);
            let error = read(&file, 1 << 20, Trust::RootOnly).unwrap_err();
            assert!(error.starts_with("writable by group or others"), "{error}");
            assert!(read(&file, 1 << 20, Trust::Anyone).is_ok());
        }
        chmod(&file, 0o644);
        // A directory others can write: they could replace the file.
        chmod(&dir, 0o777);
        let error = read(&file, 1 << 20, Trust::RootOnly).unwrap_err();
        assert!(
            error.starts_with(&format!("its directory {}: writable", dir.display())),
            "{error}"
        );
        // ... unless it is sticky, as /tmp.
        chmod(&dir, 0o1777);
        assert!(read(&file, 1 << 20, Trust::RootOnly).is_ok());
        chmod(&dir, 0o755);
        // A symlink is judged by its target.
        let bad = dir.join("bad.toml");
        std::fs::write(&bad, "").unwrap();
        chmod(&bad, 0o666);
        let link = dir.join("link.toml");
        std::os::unix::fs::symlink(&bad, &link).unwrap();
        let error = read(&link, 1 << 20, Trust::RootOnly).unwrap_err();
        assert!(error.starts_with("writable by group or others"), "{error}");
        std::fs::remove_file(&link).unwrap();
        std::os::unix::fs::symlink(&file, &link).unwrap();
        assert!(read(&link, 1 << 20, Trust::RootOnly).is_ok());
        // Owned by someone else.
        // SAFETY: chown with a valid C string.
        let c_path = std::ffi::CString::new(file.to_str().unwrap()).unwrap();
        assert_eq!(unsafe { libc::chown(c_path.as_ptr(), 1000, 0) }, 0);
        let error = read(&file, 1 << 20, Trust::RootOnly).unwrap_err();
        assert!(error.starts_with("owned by uid 1000, not root"), "{error}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn replace_is_exclusive_and_complete() {
        let dir = scratch("replace");
        let target = dir.join("rules.toml");
        std::fs::write(&target, "old").unwrap();
        replace(&target, "new").unwrap();
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "new");
        let left: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
        assert_eq!(left.len(), 1, "no staged file left behind");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
