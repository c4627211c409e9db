//! Default socket locations (docs/interfaces.md §1): `/run/lockwarden` for root, `$XDG_RUNTIME_DIR/lockwarden`
//! otherwise. Plugin, daemon and CLI must agree, so the rule lives here once.

use std::path::PathBuf;

/// File name of the main (lock) socket.
pub const SOCKET_NAME: &str = "lockwardend.sock";
/// File name of the admin socket.
pub const ADMIN_SOCKET_NAME: &str = "lockwardend-admin.sock";

/// Directory holding the sockets for a process with effective uid `euid`.
/// `xdg_runtime_dir` is `$XDG_RUNTIME_DIR` as read by the caller (the plugin reads it once in
/// `drvInit`, never in the forked child).
pub fn runtime_dir(euid: u32, xdg_runtime_dir: Option<&str>) -> PathBuf {
    if euid == 0 {
        return PathBuf::from("/run/lockwarden");
    }
    match xdg_runtime_dir {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir).join("lockwarden"),
        _ => PathBuf::from(format!("/run/user/{euid}/lockwarden")),
    }
}

/// The current process's effective uid.
pub fn current_euid() -> u32 {
    nix::unistd::geteuid().as_raw()
}

/// Default main socket for this process.
pub fn default_socket() -> PathBuf {
    let xdg = std::env::var("XDG_RUNTIME_DIR").ok();
    runtime_dir(current_euid(), xdg.as_deref()).join(SOCKET_NAME)
}

/// Default admin socket for this process.
pub fn default_admin_socket() -> PathBuf {
    let xdg = std::env::var("XDG_RUNTIME_DIR").ok();
    runtime_dir(current_euid(), xdg.as_deref()).join(ADMIN_SOCKET_NAME)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_uses_run() {
        assert_eq!(
            runtime_dir(0, Some("/run/user/0")),
            PathBuf::from("/run/lockwarden")
        );
    }

    #[test]
    fn user_uses_xdg() {
        assert_eq!(
            runtime_dir(1000, Some("/run/user/1000")),
            PathBuf::from("/run/user/1000/lockwarden")
        );
        assert_eq!(
            runtime_dir(1000, None),
            PathBuf::from("/run/user/1000/lockwarden")
        );
    }
}
