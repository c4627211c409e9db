//! The pid file, locked for the daemon's whole life.
//!
//! Why locked: two daemons on one pid file would mean two daemons on one set of sockets and two
//! views of who holds which disk; the lock (an OFD lock on the whole file, dropped by the kernel
//! when we die) makes the second one refuse with a message naming the first, and a pid file
//! left by a crash never blocks a restart.

use super::lock;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// A pid file holds a pid and a newline; anything larger was not written by lockwardend.
const MAX_PID_FILE: u64 = 64;

#[derive(Debug)]
pub struct PidFile {
    path: PathBuf,
    file: File,
}

impl PidFile {
    /// Create (or reuse) and lock `path`, then write our pid into it.
    pub fn create(path: &Path) -> Result<PidFile, String> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            if !parent.exists() {
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o755)
                    .create(parent)
                    .map_err(|e| {
                        format!("cannot create the directory {parent:?} for the pid file: {e}")
                    })?;
            }
        }
        let dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        super::listen::check_private_dir(dir, "the pid file")?;
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o644)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NOCTTY | libc::O_NONBLOCK)
            .open(path)
            .map_err(|e| format!("cannot open the pid file {path:?}: {e}"))?;
        // Before anything is truncated or written: only a plain file of ours with one name (a
        // hard link planted there would make the truncation land in another file).
        let st = nix::sys::stat::fstat(file.as_fd())
            .map_err(|e| format!("cannot inspect the pid file {path:?}: {}", e.desc()))?;
        crate::untrusted::check_writable(&st, MAX_PID_FILE).map_err(|why| {
            format!(
                "refusing to write the pid file {path:?}: {why}; remove it (lockwardend \
                 creates it anew) or choose another path with --pid-file"
            )
        })?;
        if let Err(e) = lock::try_lock_whole_file(file.as_fd()) {
            let mut text = String::new();
            let _ = file.read_to_string(&mut text);
            let holder = text.trim();
            return Err(if lock::is_conflict(e) && !holder.is_empty() {
                format!(
                    "another lockwardend (pid {holder}) is running with the pid file {path:?}; \
                     stop it first, or give this daemon its own --pid-file and sockets"
                )
            } else if lock::is_conflict(e) {
                format!(
                    "another lockwardend is running with the pid file {path:?}; stop it first, or \
                     give this daemon its own --pid-file and sockets"
                )
            } else {
                format!("cannot lock the pid file {path:?}: {}", e.desc())
            });
        }
        let pid = format!("{}\n", std::process::id());
        file.set_len(0)
            .and_then(|()| file.seek(SeekFrom::Start(0)))
            .and_then(|_| file.write_all(pid.as_bytes()))
            .map_err(|e| format!("cannot write the pid file {path:?}: {e}"))?;
        Ok(PidFile {
            path: path.to_path_buf(),
            file,
        })
    }

    /// The pid file a previous image of this process (live re-exec) kept open and locked.
    pub fn adopt(path: PathBuf, file: File) -> PidFile {
        PidFile { path, file }
    }

    pub fn raw_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        self.file.as_raw_fd()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Remove the file (while still holding its lock) if the path is still ours.
    pub fn remove(self) {
        let ours = match (std::fs::symlink_metadata(&self.path), self.file.metadata()) {
            (Ok(a), Ok(b)) => (a.dev(), a.ino()) == (b.dev(), b.ino()),
            _ => false,
        };
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}
