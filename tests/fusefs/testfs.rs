//! lockwarden-testfs: a FUSE pass-through file system that misbehaves on demand, standing in for
//! an NFS mount in tests/nfs.rs (these machines have no NFS client).
//!
//! Usage: `testfs BACKING_DIR MOUNTPOINT CONTROL_FILE EVENT_LOG`. Runs in the foreground until
//! killed or unmounted. Every file and directory under MOUNTPOINT is the one under BACKING_DIR.
//!
//! Locks: the file system negotiates FUSE_POSIX_LOCKS, so the kernel sends every POSIX and OFD
//! lock call (F_OFD_SETLK included, with the open file as lock owner) to `setlk`/`getlk`. Each
//! FUSE open has its own backing descriptor, and a lock call is forwarded to it as an OFD lock,
//! so conflicts behave exactly as on a local file system (one open file description above = one
//! below); closing the last descriptor (FUSE release) closes the backing one and drops its lock.
//!
//! CONTROL_FILE is re-read on every operation (a missing file = normal behaviour). Lines:
//! - `delay_ms N`: every lock call (setlk/getlk) waits N ms before it is served (a setlk held
//!   back logs `setlk-delayed NAME T0` when it arrives);
//! - `hang 1`: every operation (lookup, getattr, open, create, lock calls, read, write, flush,
//!   unlink) waits until the line is gone or says `hang 0`, like a hard NFS mount whose server
//!   went away; waiting calls are served, in order of arrival, once released;
//! - `lost NAME...`: files (by name, anywhere in the tree) whose locks the "server" lost: lock
//!   calls and I/O on them fail with EIO, the way an NFSv4 client reports a lock lost after a
//!   lease expiry; their backing locks are dropped so somebody else can take them.
//! - `errno E N NAME...`: the next N lock calls (setlk/getlk) on these files fail with errno E
//!   (a number, e.g. 110 for ETIMEDOUT), like a `softerr` NFS mount whose server did not answer
//!   in time; their backing locks are kept. The count is per line: the same line written again
//!   does not start a new count, another N (or E) does.
//!
//! - `lease_ms N`: this mount is one client host of a lock server with client leases (mount
//!   the same backing directory twice for two hosts: their locks conflict through the backing
//!   files). Every served request renews the lease, and so does the client itself while it is
//!   connected (not `hang`); once a partition (`hang`) left it without a served request for
//!   N ms, the lease expires: every lock this mount holds
//!   is dropped at once (the strict, pre-courteous NFSv4 server: a courteous one drops them
//!   only when another client asks, which is later) and the lock state of its open files that
//!   held locks is revoked (lock requests and I/O on them fail with EIO from then on; lock
//!   tests and files without locks work again once requests flow). EVENT_LOG gets
//!   `expire N 0 NS NS 0`.
//! - `mkdir` creates directories (the `.lockwarden` record directory next to a disk);
//! - `fsync` calls are gated like every other operation (`hang 1` holds them), so a heartbeat
//!   written and fsync'ed through this file system proves it was served (tests/partition.rs).
//!
//! EVENT_LOG gets one line per served lock call:
//! `setlk|getlk NAME TYPE START_NS END_NS RESULT` (wall-clock nanoseconds of arrival and answer),
//! so a test can prove that several lock calls were in flight at once; and one per fsync,
//! `fsync NAME 0 START_NS END_NS RESULT`.

use fuser::{
    Config, Errno, FileAttr, FileHandle, FileType, FopenFlags, Generation, INodeNo, InitFlags,
    KernelConfig, LockOwner, MountOption, OpenFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyLock, ReplyOpen, ReplyStatfs, ReplyWrite, Request,
    WriteFlags,
};
use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const TTL: Duration = Duration::ZERO;

#[derive(Default)]
struct Control {
    delay_ms: u64,
    hang: bool,
    /// `lease_ms N`: this mount is a client whose lease expires N ms after its last served
    /// request.
    lease_ms: Option<u64>,
    lost: Vec<String>,
    /// `errno E N NAME...` lines: (the line, E, N, names).
    errors: Vec<(String, i32, u64, Vec<String>)>,
}

struct Inner {
    backing: PathBuf,
    control: PathBuf,
    log: Mutex<File>,
    inodes: Mutex<HashMap<u64, PathBuf>>,
    files: Mutex<HashMap<u64, (Arc<File>, PathBuf)>>,
    next_fh: AtomicU64,
    /// Failures served per `errno` control line.
    served: Mutex<HashMap<String, u64>>,
    /// When a request of this mount ("client") was last served: its lease renewal.
    renewed: Mutex<std::time::Instant>,
    /// Open files holding a lock (their last lock call was a successful lock, not an unlock).
    locking: Mutex<std::collections::HashSet<u64>>,
    /// Open files whose locks the "server" dropped when this client's lease expired.
    revoked: Mutex<std::collections::HashSet<u64>>,
}

struct TestFs {
    inner: Arc<Inner>,
}

fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

fn errno(e: &std::io::Error) -> Errno {
    Errno::from_i32(e.raw_os_error().unwrap_or(libc::EIO))
}

impl Inner {
    fn control(&self) -> Control {
        let mut c = Control::default();
        let Ok(text) = std::fs::read_to_string(&self.control) else {
            return c;
        };
        for line in text.lines() {
            let mut w = line.split_whitespace();
            match w.next() {
                Some("delay_ms") => c.delay_ms = w.next().and_then(|n| n.parse().ok()).unwrap_or(0),
                Some("hang") => c.hang = w.next() != Some("0"),
                Some("lease_ms") => c.lease_ms = w.next().and_then(|n| n.parse().ok()),
                Some("lost") => c.lost.extend(w.map(str::to_string)),
                Some("errno") => {
                    let e = w.next().and_then(|n| n.parse().ok()).unwrap_or(libc::EIO);
                    let n = w.next().and_then(|n| n.parse().ok()).unwrap_or(0);
                    c.errors.push((
                        line.trim().to_string(),
                        e,
                        n,
                        w.map(str::to_string).collect(),
                    ));
                }
                _ => {}
            }
        }
        c
    }

    /// Lock calls and I/O on this open file fail: its file is `lost`, or its lock state was
    /// revoked when this client's lease expired.
    fn gone(&self, c: &Control, fh: FileHandle, path: &Path) -> bool {
        self.is_lost(c, path) || self.revoked.lock().is_ok_and(|r| r.contains(&fh.0))
    }

    /// The lease of this client ran out (`lease_ms`, no request served for that long): the
    /// server drops every lock it holds (its backing locks go, so another mount can take
    /// them) and revokes the lock state of the open files that held locks (later lock
    /// requests and I/O on them fail with EIO, as an NFSv4 client reports locks lost with an
    /// expired lease; lock tests and other files work again once the client is back).
    fn expire(&self) {
        let Ok(files) = self.files.lock() else { return };
        let Ok(mut revoked) = self.revoked.lock() else {
            return;
        };
        let locking = self.locking.lock().map(|l| l.clone()).unwrap_or_default();
        let mut n = 0;
        for (fh, (f, _)) in files.iter() {
            if locking.contains(fh) && revoked.insert(*fh) {
                let mut un = flock(libc::F_UNLCK, 0, u64::MAX);
                // SAFETY: F_OFD_SETLK on a descriptor we own, with a valid flock.
                unsafe { libc::fcntl(f.as_raw_fd(), libc::F_OFD_SETLK, &mut un) };
                n += 1;
            }
        }
        drop(files);
        drop(revoked);
        self.log(format!("expire {n} 0 {} {} 0\n", now_ns(), now_ns()));
    }

    fn is_lost(&self, c: &Control, path: &Path) -> bool {
        path.file_name()
            .is_some_and(|n| c.lost.iter().any(|l| l.as_bytes() == n.as_bytes()))
    }

    /// The errno the next lock call on `path` must fail with (`errno` lines), counted.
    fn injected(&self, c: &Control, path: &Path) -> Option<i32> {
        let name = path.file_name()?;
        let mut served = self.served.lock().ok()?;
        for (line, e, n, names) in &c.errors {
            if names.iter().any(|l| l.as_bytes() == name.as_bytes()) {
                let count = served.entry(line.clone()).or_insert(0);
                if *count < *n {
                    *count += 1;
                    return Some(*e);
                }
            }
        }
        None
    }

    fn path(&self, ino: u64) -> Option<PathBuf> {
        self.inodes.lock().ok()?.get(&ino).cloned()
    }

    fn attr(&self, path: &Path) -> std::io::Result<FileAttr> {
        let m = std::fs::symlink_metadata(path)?;
        let ft = m.file_type();
        use std::os::unix::fs::FileTypeExt;
        let kind = if ft.is_dir() {
            FileType::Directory
        } else if ft.is_symlink() {
            FileType::Symlink
        } else if ft.is_block_device() {
            FileType::BlockDevice
        } else if ft.is_char_device() {
            FileType::CharDevice
        } else if ft.is_fifo() {
            FileType::NamedPipe
        } else if ft.is_socket() {
            FileType::Socket
        } else {
            FileType::RegularFile
        };
        // The root is inode 1 for FUSE; everything else keeps its backing inode number.
        let ino = if path == self.backing { 1 } else { m.ino() };
        if let Ok(mut map) = self.inodes.lock() {
            map.insert(ino, path.to_path_buf());
        }
        let t = |s: i64, ns: i64| UNIX_EPOCH + Duration::new(s.max(0) as u64, ns.max(0) as u32);
        Ok(FileAttr {
            ino: INodeNo(ino),
            size: m.size(),
            blocks: m.blocks(),
            atime: t(m.atime(), m.atime_nsec()),
            mtime: t(m.mtime(), m.mtime_nsec()),
            ctime: t(m.ctime(), m.ctime_nsec()),
            crtime: UNIX_EPOCH,
            kind,
            perm: (m.mode() & 0o7777) as u16,
            nlink: m.nlink() as u32,
            uid: m.uid(),
            gid: m.gid(),
            rdev: m.rdev() as u32,
            blksize: 4096,
            flags: 0,
        })
    }

    fn file(&self, fh: FileHandle) -> Option<(Arc<File>, PathBuf)> {
        self.files.lock().ok()?.get(&fh.0).cloned()
    }

    fn log(&self, line: String) {
        if let Ok(mut f) = self.log.lock() {
            let _ = f.write_all(line.as_bytes());
            let _ = f.flush();
        }
    }

    fn renew(&self) {
        if let Ok(mut t) = self.renewed.lock() {
            *t = std::time::Instant::now();
        }
    }

    /// Run `op` now, or on a thread once a hang is lifted and after `delay` (lock calls).
    fn gate(self: &Arc<Self>, lock_call: bool, op: impl FnOnce(&Arc<Inner>) + Send + 'static) {
        let c = self.control();
        let delay = if lock_call { c.delay_ms } else { 0 };
        if !c.hang && delay == 0 {
            self.renew();
            op(self);
            return;
        }
        let me = Arc::clone(self);
        std::thread::spawn(move || {
            while me.control().hang {
                std::thread::sleep(Duration::from_millis(10));
            }
            if delay > 0 {
                std::thread::sleep(Duration::from_millis(delay));
            }
            me.renew();
            op(&me);
        });
    }
}

fn flock(typ: i32, start: u64, end: u64) -> libc::flock {
    let len = if end == u64::MAX || end == i64::MAX as u64 {
        0
    } else {
        (end - start + 1) as i64
    };
    libc::flock {
        l_type: typ as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: start as i64,
        l_len: len,
        l_pid: 0,
    }
}

impl fuser::Filesystem for TestFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        config
            .add_capabilities(InitFlags::FUSE_POSIX_LOCKS)
            .map_err(|_| std::io::Error::other("the kernel lacks FUSE_POSIX_LOCKS"))?;
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let name = name.to_os_string();
        self.inner.gate(false, move |i| {
            let Some(dir) = i.path(parent.0) else {
                return reply.error(Errno::ENOENT);
            };
            match i.attr(&dir.join(&name)) {
                Ok(a) => reply.entry(&TTL, &a, Generation(0)),
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        self.inner.gate(false, move |i| match i.path(ino.0) {
            Some(p) => match i.attr(&p) {
                Ok(a) => reply.attr(&TTL, &a),
                Err(e) => reply.error(errno(&e)),
            },
            None => reply.error(Errno::ENOENT),
        });
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        self.inner.gate(false, move |i| {
            let Some(p) = i.path(ino.0) else {
                return reply.error(Errno::ENOENT);
            };
            let acc = flags.0 & libc::O_ACCMODE;
            let res = OpenOptions::new()
                .read(acc != libc::O_WRONLY)
                .write(acc != libc::O_RDONLY)
                .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
                .open(&p);
            match res {
                Ok(f) => {
                    let fh = i.next_fh.fetch_add(1, Ordering::SeqCst);
                    if let Ok(mut m) = i.files.lock() {
                        m.insert(fh, (Arc::new(f), p));
                    }
                    reply.opened(FileHandle(fh), FopenFlags::FOPEN_DIRECT_IO);
                }
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let name = name.to_os_string();
        self.inner.gate(false, move |i| {
            let Some(dir) = i.path(parent.0) else {
                return reply.error(Errno::ENOENT);
            };
            let p = dir.join(&name);
            let res = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(flags & libc::O_EXCL != 0)
                .create(true)
                .mode(mode & 0o7777)
                .open(&p)
                .and_then(|f| i.attr(&p).map(|a| (f, a)));
            match res {
                Ok((f, a)) => {
                    let fh = i.next_fh.fetch_add(1, Ordering::SeqCst);
                    if let Ok(mut m) = i.files.lock() {
                        m.insert(fh, (Arc::new(f), p));
                    }
                    reply.created(
                        &TTL,
                        &a,
                        Generation(0),
                        FileHandle(fh),
                        FopenFlags::FOPEN_DIRECT_IO,
                    );
                }
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn mkdir(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        let name = name.to_os_string();
        self.inner.gate(false, move |i| {
            let Some(dir) = i.path(parent.0) else {
                return reply.error(Errno::ENOENT);
            };
            let p = dir.join(&name);
            let made = std::fs::DirBuilder::new()
                .mode(mode & 0o7777)
                .create(&p)
                .and_then(|()| i.attr(&p));
            match made {
                Ok(a) => reply.entry(&TTL, &a, Generation(0)),
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let name = name.to_os_string();
        self.inner.gate(false, move |i| {
            let Some(dir) = i.path(parent.0) else {
                return reply.error(Errno::ENOENT);
            };
            match std::fs::remove_file(dir.join(&name)) {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        self.inner.gate(false, move |i| {
            let Some((f, p)) = i.file(fh) else {
                return reply.error(Errno::EBADF);
            };
            if i.gone(&i.control(), fh, &p) {
                return reply.error(Errno::EIO);
            }
            let mut buf = vec![0u8; size as usize];
            match f.read_at(&mut buf, offset) {
                Ok(n) => reply.data(&buf[..n]),
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let data = data.to_vec();
        self.inner.gate(false, move |i| {
            let Some((f, p)) = i.file(fh) else {
                return reply.error(Errno::EBADF);
            };
            if i.gone(&i.control(), fh, &p) {
                return reply.error(Errno::EIO);
            }
            match f.write_at(&data, offset) {
                Ok(n) => reply.written(n as u32),
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let t0 = now_ns();
        self.inner.gate(false, move |i| {
            let Some((f, p)) = i.file(fh) else {
                return reply.error(Errno::EBADF);
            };
            let name = p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            if i.gone(&i.control(), fh, &p) {
                return reply.error(Errno::EIO);
            }
            let r = f.sync_data();
            i.log(format!(
                "fsync {name} 0 {t0} {} {}\n",
                now_ns(),
                if r.is_ok() { 0 } else { 5 }
            ));
            match r {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        self.inner.gate(false, move |_| reply.ok());
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        // Never delayed: the kernel sends it in the background, and dropping the backing
        // descriptor is what drops its locks.
        if let Ok(mut m) = self.inner.files.lock() {
            m.remove(&fh.0);
        }
        reply.ok();
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        self.inner.gate(false, move |i| match i.path(ino.0) {
            Some(_) => reply.opened(FileHandle(0), FopenFlags::empty()),
            None => reply.error(Errno::ENOENT),
        });
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let Some(dir) = self.inner.path(ino.0) else {
            return reply.error(Errno::ENOENT);
        };
        let Ok(rd) = std::fs::read_dir(&dir) else {
            return reply.error(Errno::EIO);
        };
        for (n, e) in rd.flatten().enumerate().skip(offset as usize) {
            let kind = match e.file_type() {
                Ok(t) if t.is_dir() => FileType::Directory,
                _ => FileType::RegularFile,
            };
            let ino = e.metadata().map(|m| m.ino()).unwrap_or(2);
            if reply.add(INodeNo(ino), (n + 1) as u64, kind, e.file_name()) {
                break;
            }
        }
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        reply.statfs(1 << 20, 1 << 19, 1 << 19, 1 << 16, 1 << 15, 4096, 255, 4096);
    }

    fn getlk(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _lock_owner: LockOwner,
        start: u64,
        end: u64,
        typ: i32,
        _pid: u32,
        reply: ReplyLock,
    ) {
        let t0 = now_ns();
        self.inner.gate(true, move |i| {
            let Some((f, p)) = i.file(fh) else {
                return reply.error(Errno::EBADF);
            };
            let name = p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            if i.is_lost(&i.control(), &p) {
                i.log(format!("getlk {name} {typ} {t0} {} EIO\n", now_ns()));
                return reply.error(Errno::EIO);
            }
            if let Some(e) = i.injected(&i.control(), &p) {
                i.log(format!("getlk {name} {typ} {t0} {} errno{e}\n", now_ns()));
                return reply.error(Errno::from_i32(e));
            }
            let mut fl = flock(typ, start, end);
            // SAFETY: F_OFD_GETLK on a descriptor we own, with a valid flock.
            let r = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) };
            i.log(format!("getlk {name} {typ} {t0} {} {r}\n", now_ns()));
            if r < 0 {
                return reply.error(errno(&std::io::Error::last_os_error()));
            }
            let s = fl.l_start as u64;
            let e = if fl.l_len == 0 {
                i64::MAX as u64
            } else {
                s + fl.l_len as u64 - 1
            };
            reply.locked(s, e, i32::from(fl.l_type), 0);
        });
    }

    fn setlk(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _lock_owner: LockOwner,
        start: u64,
        end: u64,
        typ: i32,
        _pid: u32,
        _sleep: bool,
        reply: ReplyEmpty,
    ) {
        let t0 = now_ns();
        if typ != libc::F_UNLCK && self.inner.control().delay_ms > 0 {
            // A test can wait for this line to know the lock call is in flight (held back).
            if let Some((_, p)) = self.inner.file(fh) {
                let name = p.file_name().map(|n| n.to_string_lossy().into_owned());
                self.inner
                    .log(format!("setlk-delayed {} {t0}\n", name.unwrap_or_default()));
            }
        }
        self.inner.gate(typ != libc::F_UNLCK, move |i| {
            let Some((f, p)) = i.file(fh) else {
                return reply.error(Errno::EBADF);
            };
            let name = p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            if i.gone(&i.control(), fh, &p) {
                // The server forgot this lock: let anybody else take it.
                let mut un = flock(libc::F_UNLCK, 0, 0);
                // SAFETY: F_OFD_SETLK on a descriptor we own, with a valid flock.
                unsafe { libc::fcntl(f.as_raw_fd(), libc::F_OFD_SETLK, &mut un) };
                i.log(format!("setlk {name} {typ} {t0} {} EIO\n", now_ns()));
                return reply.error(Errno::EIO);
            }
            if typ != libc::F_UNLCK {
                if let Some(e) = i.injected(&i.control(), &p) {
                    i.log(format!("setlk {name} {typ} {t0} {} errno{e}\n", now_ns()));
                    return reply.error(Errno::from_i32(e));
                }
            }
            let mut fl = flock(typ, start, end);
            // SAFETY: F_OFD_SETLK on a descriptor we own, with a valid flock.
            let r = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_OFD_SETLK, &mut fl) };
            if r == 0 {
                if let Ok(mut l) = i.locking.lock() {
                    if typ == libc::F_UNLCK {
                        l.remove(&fh.0);
                    } else {
                        l.insert(fh.0);
                    }
                }
            }
            let res = if r < 0 {
                std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
            } else {
                0
            };
            i.log(format!("setlk {name} {typ} {t0} {} {res}\n", now_ns()));
            if r < 0 {
                reply.error(errno(&std::io::Error::last_os_error()));
            } else {
                reply.ok();
            }
        });
    }
}

fn main() {
    let args: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    let [backing, mountpoint, control, log] = args.as_slice() else {
        eprintln!("usage: testfs BACKING_DIR MOUNTPOINT CONTROL_FILE EVENT_LOG");
        std::process::exit(2);
    };
    let backing = std::fs::canonicalize(backing).unwrap_or_else(|e| {
        eprintln!("testfs: {backing:?}: {e}");
        std::process::exit(2)
    });
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap_or_else(|e| {
            eprintln!("testfs: {log:?}: {e}");
            std::process::exit(2)
        });
    let inner = Arc::new(Inner {
        backing: backing.clone(),
        control: control.clone(),
        log: Mutex::new(log),
        inodes: Mutex::new(HashMap::from([(1, backing)])),
        files: Mutex::new(HashMap::new()),
        next_fh: AtomicU64::new(1),
        served: Mutex::new(HashMap::new()),
        renewed: Mutex::new(std::time::Instant::now()),
        revoked: Mutex::new(std::collections::HashSet::new()),
        locking: Mutex::new(std::collections::HashSet::new()),
    });
    // The lease clock of this client (`lease_ms`): expired once per silence.
    let clock = Arc::clone(&inner);
    std::thread::spawn(move || {
        let mut expired = false;
        loop {
            std::thread::sleep(Duration::from_millis(2));
            let c = clock.control();
            let Some(lease) = c.lease_ms else {
                continue;
            };
            if !c.hang {
                // Connected: the client renews its lease by itself (the NFS client's renewal
                // runs whether or not anything is asked of it).
                clock.renew();
            }
            let silent = clock
                .renewed
                .lock()
                .map(|t| t.elapsed())
                .unwrap_or_default();
            if silent < Duration::from_millis(lease) {
                expired = false;
            } else if !expired {
                expired = true;
                clock.expire();
            }
        }
    });
    let mut cfg = Config::default();
    cfg.mount_options = vec![
        MountOption::FSName("lockwarden-testfs".into()),
        MountOption::Subtype("lockwarden-testfs".into()),
        MountOption::RW,
    ];
    if let Err(e) = fuser::mount(TestFs { inner }, mountpoint, &cfg) {
        eprintln!("testfs: cannot mount on {mountpoint:?}: {e}");
        std::process::exit(1);
    }
}
