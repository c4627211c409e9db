//! The listening sockets: bound by us, or handed over by systemd (`LISTEN_FDS`).
//!
//! Why the care: the main socket is the only door to every disk lock on the host, so it is
//! created 0600 (umask set around `bind`, no window with looser permissions), its directory
//! is created when missing, and an existing socket file is removed only when nothing answers on
//! it — a second daemon must never steal a live daemon's socket. Sockets systemd passed belong
//! to systemd and are never unlinked by us.

use super::settings::Settings;
use log::{info, warn};
use nix::sys::socket::{SockType, UnixAddr, getsockname, getsockopt, sockopt};
use nix::sys::stat::{Mode, umask};
use std::fs;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

/// First descriptor systemd passes (SD_LISTEN_FDS_START).
const LISTEN_FDS_START: RawFd = 3;
/// `FileDescriptorName=` of the main and admin socket units (their default names).
pub const MAIN_FD_NAME: &str = "lockwardend.socket";
pub const ADMIN_FD_NAME: &str = "lockwardend-admin.socket";

/// Which door a socket is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Lock requests from the plugin (and admin requests).
    Main,
    /// Status and List only, for the CLI.
    Admin,
}

impl Role {
    fn word(self) -> &'static str {
        match self {
            Role::Main => "main",
            Role::Admin => "admin",
        }
    }
}

#[derive(Debug)]
pub struct Listener {
    pub socket: UnixListener,
    pub role: Role,
    pub path: PathBuf,
    /// We created the socket file: remove it at exit, if it is still ours (dev, ino).
    pub bound: Option<(u64, u64)>,
}

/// All listening sockets: those systemd passed, plus any role it did not pass, bound by us.
pub fn open(settings: &Settings) -> Result<Vec<Listener>, String> {
    let mut out = activated()?;
    for (role, path) in [
        (Role::Main, &settings.socket),
        (Role::Admin, &settings.admin_socket),
    ] {
        if out.iter().any(|l| l.role == role) {
            continue;
        }
        match bind(path, role) {
            Ok(l) => out.push(l),
            Err(e) => {
                remove_bound(&out);
                return Err(e);
            }
        }
    }
    Ok(out)
}

/// Remove the socket files we created, if they still are the sockets we bound.
pub fn remove_bound(listeners: &[Listener]) {
    for l in listeners {
        let Some(id) = l.bound else { continue };
        match fs::symlink_metadata(&l.path) {
            Ok(m) if (m.dev(), m.ino()) == id => {
                if let Err(e) = fs::remove_file(&l.path) {
                    warn!("cannot remove socket {:?}: {e}", l.path);
                }
            }
            _ => warn!(
                "socket {:?} was replaced by someone else; leaving it alone",
                l.path
            ),
        }
    }
}

fn bind(path: &Path, role: Role) -> Result<Listener, String> {
    let what = role.word();
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        if !parent.exists() {
            let mode = if nix::unistd::geteuid().is_root() {
                0o755
            } else {
                0o700
            };
            fs::DirBuilder::new()
                .recursive(true)
                .mode(mode)
                .create(parent)
                .map_err(|e| {
                    format!("cannot create the directory {parent:?} for the {what} socket: {e}")
                })?;
        }
    }
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        check_private_dir(parent, &format!("the {what} socket"))?;
    }
    remove_stale(path, what)?;
    // The umask alone makes the socket 0600 at bind time (no chmod by path afterwards, which
    // would follow whatever a name swap put there).
    let old = umask(Mode::from_bits_truncate(0o177));
    let bound = UnixListener::bind(path);
    umask(old);
    let socket = bound.map_err(|e| {
        format!("cannot bind the {what} socket {path:?}: {e}; choose another path with --socket or --admin-socket")
    })?;
    let meta = fs::symlink_metadata(path).map_err(|e| format!("cannot stat {path:?}: {e}"))?;
    if !meta.file_type().is_socket() || meta.mode() & 0o077 != 0 {
        return Err(format!(
            "the {what} socket {path:?} is not the private socket just bound (mode {:o}); check \
             who else writes to {:?}",
            meta.mode() & 0o7777,
            path.parent().unwrap_or(path)
        ));
    }
    socket
        .set_nonblocking(true)
        .map_err(|e| format!("cannot make {path:?} non-blocking: {e}"))?;
    info!("listening on {what} socket {path:?}");
    Ok(Listener {
        socket,
        role,
        path: path.to_path_buf(),
        bound: Some((meta.dev(), meta.ino())),
    })
}

/// An existing socket file is removed only when connecting to it is refused (its daemon died).
fn remove_stale(path: &Path, what: &str) -> Result<(), String> {
    let meta = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => {
            return Err(format!(
                "cannot inspect the {what} socket path {path:?}: {e}"
            ));
        }
    };
    if !meta.file_type().is_socket() {
        return Err(format!(
            "{path:?} exists and is not a socket; remove it or choose another path for the {what} \
             socket"
        ));
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(format!(
            "another daemon is already serving the {what} socket {path:?}; stop it first, or give \
             this daemon its own --socket, --admin-socket and --pid-file"
        )),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            fs::remove_file(path)
                .map_err(|e| format!("cannot remove the stale socket {path:?}: {e}"))?;
            info!("removed stale {what} socket {path:?} (nothing was listening)");
            Ok(())
        }
        Err(e) => Err(format!(
            "cannot tell whether a daemon still serves {path:?}: {e}; remove the file if none does"
        )),
    }
}

/// Sockets passed by systemd socket activation, if the variables are meant for this process.
fn activated() -> Result<Vec<Listener>, String> {
    let pid = std::env::var("LISTEN_PID").ok();
    if pid.and_then(|p| p.trim().parse::<u32>().ok()) != Some(std::process::id()) {
        return Ok(Vec::new());
    }
    let count: RawFd = std::env::var("LISTEN_FDS")
        .ok()
        .and_then(|n| n.trim().parse().ok())
        .filter(|n| (0..=64).contains(n))
        .ok_or("LISTEN_FDS is missing or not a small number; check the socket units")?;
    let names: Vec<String> = std::env::var("LISTEN_FDNAMES")
        .map(|s| s.split(':').map(str::to_string).collect())
        .unwrap_or_default();
    let mut out: Vec<Listener> = Vec::new();
    for i in 0..count {
        let fd = LISTEN_FDS_START + i;
        // SAFETY: sd_listen_fds(3): fds 3..3+LISTEN_FDS are passed to this process (LISTEN_PID
        // matched) for it to own; nothing else in the process uses them.
        let owned = unsafe { super::sys::adopt(fd, "LISTEN_FDS (check the socket units)") }?;
        let name = names.get(i as usize).map(String::as_str).unwrap_or("");
        let role = match (name, i) {
            (MAIN_FD_NAME, _) | ("", 0) => Role::Main,
            (ADMIN_FD_NAME, _) | ("", 1) => Role::Admin,
            _ => {
                warn!(
                    "ignoring passed socket fd {fd} named {name:?}; expected {MAIN_FD_NAME} or {ADMIN_FD_NAME}"
                );
                continue;
            }
        };
        if out.iter().any(|l| l.role == role) {
            return Err(format!(
                "systemd passed two {} sockets; check FileDescriptorName= in the socket units",
                role.word()
            ));
        }
        out.push(adopt(owned, role, fd)?);
    }
    Ok(out)
}

fn adopt(owned: OwnedFd, role: Role, fd: RawFd) -> Result<Listener, String> {
    let stream = getsockopt(&owned, sockopt::SockType).ok() == Some(SockType::Stream);
    let listening = getsockopt(&owned, sockopt::AcceptConn).unwrap_or(false);
    let unix = getsockname::<UnixAddr>(owned.as_raw_fd()).is_ok();
    if !(stream && listening && unix) {
        return Err(format!(
            "passed fd {fd} for the {} socket is not a listening Unix stream socket; check the \
             socket unit (ListenStream=)",
            role.word()
        ));
    };
    nix::fcntl::fcntl(
        &owned,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    )
    .map_err(|e| format!("cannot set close-on-exec on fd {fd}: {}", e.desc()))?;
    let socket = UnixListener::from(owned);
    let path = socket
        .local_addr()
        .ok()
        .and_then(|a| a.as_pathname().map(Path::to_path_buf))
        .unwrap_or_else(|| PathBuf::from("(unnamed)"));
    socket
        .set_nonblocking(true)
        .map_err(|e| format!("cannot make fd {fd} non-blocking: {e}"))?;
    info!(
        "using {} socket {path:?} passed by systemd (fd {fd})",
        role.word()
    );
    Ok(Listener {
        socket,
        role,
        path,
        bound: None,
    })
}

/// Refuse a directory other users could write to: the sockets, the keeper's socket and the pid
/// file live in it, and whoever can create names there can bind the keeper's path first (and
/// be handed a read-write descriptor of every locked disk) or swap a name under us. The
/// directory and every directory above it must be owned by root or by this daemon's user, and
/// must not be writable by group or others (a sticky ancestor such as /tmp is accepted: nobody
/// else can rename or remove what it holds for us). Symbolic links in the path are followed
/// (`/var/run` -> `/run`); what they lead to is what is checked.
pub fn check_private_dir(dir: &Path, what: &str) -> Result<(), String> {
    let euid = nix::unistd::geteuid().as_raw();
    let real = fs::canonicalize(dir).map_err(|e| {
        format!("cannot inspect the directory {dir:?} that holds {what}: {e}; create it (mode 0700) or choose another path")
    })?;
    let fix = format!(
        "make it owned by uid {euid} (or root) and writable only by its owner (for example \
         chown {euid} {real:?} && chmod 0700 {real:?}), or choose a private directory with \
         --socket, --admin-socket and --pid-file"
    );
    let mut first = true;
    for d in real.ancestors() {
        let m = fs::metadata(d)
            .map_err(|e| format!("cannot inspect the directory {d:?} above {what}: {e}"))?;
        let (mode, uid) = (m.mode(), m.uid());
        let sticky = mode & 0o1000 != 0;
        if uid != euid && uid != 0 {
            return Err(format!(
                "refusing to use {dir:?} for {what}: {} {d:?} is owned by uid {uid}, not by \
                 lockwardend's uid {euid} or root, so that user could replace {what}; {fix}",
                if first {
                    "the directory"
                } else {
                    "its parent directory"
                }
            ));
        }
        if mode & 0o022 != 0 && (first || !sticky) {
            return Err(format!(
                "refusing to use {dir:?} for {what}: {} {d:?} has mode {:o}, writable by {}, \
                 so another user could bind the keeper's socket or swap a file there; {fix}",
                if first {
                    "the directory"
                } else {
                    "its parent directory"
                },
                mode & 0o7777,
                if mode & 0o002 != 0 {
                    "others"
                } else {
                    "its group"
                }
            ));
        }
        first = false;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::check_private_dir;
    use std::fs;
    use std::os::unix::fs::PermissionsExt;

    fn dir_with(parent: &std::path::Path, name: &str, mode: u32) -> std::path::PathBuf {
        let d = parent.join(name);
        fs::create_dir(&d).unwrap();
        fs::set_permissions(&d, fs::Permissions::from_mode(mode)).unwrap();
        d
    }

    #[test]
    fn only_a_directory_nobody_else_can_write_is_private() {
        let top = tempfile::tempdir().unwrap();
        assert!(check_private_dir(&dir_with(top.path(), "private", 0o700), "x").is_ok());
        assert!(check_private_dir(&dir_with(top.path(), "readable", 0o755), "x").is_ok());
        for (name, mode) in [("world", 0o777), ("sticky", 0o1777), ("group", 0o770)] {
            let d = dir_with(top.path(), name, mode);
            let e = check_private_dir(&d, "the main socket").unwrap_err();
            assert!(
                e.contains(&format!("{d:?}")) && e.contains("writable by"),
                "{e}"
            );
        }
        // Below a sticky directory (like /tmp) a private directory is fine; below a plain
        // world-writable one it is not (its entries can be renamed by anybody).
        let sticky = dir_with(top.path(), "sticky-parent", 0o1777);
        assert!(check_private_dir(&dir_with(&sticky, "run", 0o700), "x").is_ok());
        let open = dir_with(top.path(), "open-parent", 0o777);
        let e = check_private_dir(&dir_with(&open, "run", 0o700), "x").unwrap_err();
        assert!(e.contains("parent directory"), "{e}");
        // A missing directory is an error naming it.
        assert!(check_private_dir(&top.path().join("missing"), "x").is_err());
    }
}
