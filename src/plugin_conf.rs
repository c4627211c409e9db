//! The plugin configuration, `qemu-lockwarden.conf` (docs/interfaces.md §1).
//!
//! The lockd keys keep lockd's meaning so an operator can switch by renaming
//! `qemu-lockd.conf`; the other keys are ours. Read once, in `drvInit`; a missing file means
//! defaults; an unknown key or a bad value is an error naming the file, the line and the key.

//!
//! It lives below the plugin, the daemon and the CLI because `lockwarden who`, `audit` and
//! `doctor` read the same file to find the lock files the plugin would use.

use crate::config::{ConfFile, ConfigError};
use std::path::{Path, PathBuf};

/// A problem with the plugin configuration file, as one sentence for the operator (the plugin
/// reports it to libvirt as a configuration error).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SettingsError {
    pub message: String,
}

impl std::fmt::Display for SettingsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for SettingsError {}

/// What a `<readonly/>` disk gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadonlyDisks {
    /// A shared lease: no writer can start under its readers (default).
    Shared,
    /// Not locked at all (lockd's behaviour).
    Ignore,
}

/// Default `request_timeout_ms`.
pub const DEFAULT_TIMEOUT_MS: u32 = 30_000;
/// Largest accepted `request_timeout_ms` (one hour).
pub const MAX_TIMEOUT_MS: u32 = 3_600_000;
/// `sun_path` holds 108 bytes including the terminating NUL.
const MAX_SOCKET_PATH: usize = 107;

/// The parsed plugin configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    /// Where the settings came from (`None`: libvirt passed no file name), for messages.
    pub source: Option<PathBuf>,
    pub auto_disk_leases: bool,
    pub require_lease_for_disks: bool,
    pub file_lockspace_dir: Option<String>,
    pub lvm_lockspace_dir: Option<String>,
    pub scsi_lockspace_dir: Option<String>,
    pub daemon_socket: PathBuf,
    pub request_timeout_ms: u32,
    pub readonly_disks: ReadonlyDisks,
}

impl Settings {
    /// Every key at its default; `default_socket` is `paths::default_socket()` as computed by
    /// `drvInit`.
    pub fn defaults(default_socket: PathBuf) -> Settings {
        Settings {
            source: None,
            auto_disk_leases: true,
            require_lease_for_disks: false,
            file_lockspace_dir: None,
            lvm_lockspace_dir: None,
            scsi_lockspace_dir: None,
            daemon_socket: default_socket,
            request_timeout_ms: DEFAULT_TIMEOUT_MS,
            readonly_disks: ReadonlyDisks::Shared,
        }
    }

    /// Load `path` (libvirt's `configFile`; `None` = defaults). A missing file is defaults.
    pub fn load(path: Option<&Path>, default_socket: PathBuf) -> Result<Settings, SettingsError> {
        let Some(path) = path else {
            return Ok(Settings::defaults(default_socket));
        };
        let conf = ConfFile::load(path).map_err(config_error)?;
        Settings::from_conf(conf, default_socket).map_err(config_error)
    }

    /// Take every known key from `conf`, then reject what is left.
    pub fn from_conf(mut conf: ConfFile, default_socket: PathBuf) -> Result<Settings, ConfigError> {
        let mut s = Settings::defaults(default_socket);
        s.source = Some(conf.path().to_path_buf());
        if let Some(v) = conf.take_bool("auto_disk_leases")? {
            s.auto_disk_leases = v;
        }
        s.require_lease_for_disks = conf
            .take_bool("require_lease_for_disks")?
            .unwrap_or(!s.auto_disk_leases);
        s.file_lockspace_dir = lockspace_dir(&mut conf, "file_lockspace_dir")?;
        s.lvm_lockspace_dir = lockspace_dir(&mut conf, "lvm_lockspace_dir")?;
        s.scsi_lockspace_dir = lockspace_dir(&mut conf, "scsi_lockspace_dir")?;
        if let Some(p) = conf.take_abs_path("daemon_socket")? {
            if p.as_os_str().len() > MAX_SOCKET_PATH {
                return Err(ConfigError {
                    file: conf.path().to_path_buf(),
                    line: None,
                    key: Some("daemon_socket".into()),
                    message: format!(
                        "the path {:?} is {} bytes long; a Unix socket path may have at most \
                         {MAX_SOCKET_PATH}",
                        p,
                        p.as_os_str().len()
                    ),
                });
            }
            s.daemon_socket = p;
        }
        if let Some(ms) = conf.take_int("request_timeout_ms", 1, i64::from(MAX_TIMEOUT_MS))? {
            // In range 1..=MAX_TIMEOUT_MS, checked by take_int.
            s.request_timeout_ms = u32::try_from(ms).unwrap_or(DEFAULT_TIMEOUT_MS);
        }
        if let Some(v) = conf.take_choice("readonly_disks", &["shared", "ignore"])? {
            s.readonly_disks = if v == "ignore" {
                ReadonlyDisks::Ignore
            } else {
                ReadonlyDisks::Shared
            };
        }
        conf.finish()?;
        Ok(s)
    }

    /// How messages refer to the configuration file.
    pub fn source_display(&self) -> String {
        match &self.source {
            Some(p) => format!("{:?}", p),
            None => "the plugin configuration (libvirt passed no file name)".into(),
        }
    }
}

fn lockspace_dir(conf: &mut ConfFile, key: &str) -> Result<Option<String>, ConfigError> {
    // The file is UTF-8 (ConfFile::load checks), so the path converts losslessly.
    Ok(conf
        .take_abs_path(key)?
        .map(|p| p.to_string_lossy().into_owned()))
}

fn config_error(e: ConfigError) -> SettingsError {
    SettingsError {
        message: format!("lockwarden plugin configuration: {e}; fix the file and restart libvirtd"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Settings, ConfigError> {
        let conf = ConfFile::parse(Path::new("/etc/libvirt/qemu-lockwarden.conf"), text)?;
        Settings::from_conf(conf, PathBuf::from("/run/lockwarden/lockwardend.sock"))
    }

    #[test]
    fn defaults() {
        let s = parse("").unwrap();
        assert!(s.auto_disk_leases);
        assert!(!s.require_lease_for_disks);
        assert_eq!(s.request_timeout_ms, 30_000);
        assert_eq!(s.readonly_disks, ReadonlyDisks::Shared);
        assert_eq!(
            s.daemon_socket,
            PathBuf::from("/run/lockwarden/lockwardend.sock")
        );
        assert_eq!(s.file_lockspace_dir, None);
    }

    #[test]
    fn every_key() {
        let s = parse(
            "auto_disk_leases = 0\nfile_lockspace_dir = \"/var/lib/libvirt/lockd/files\"\n\
             lvm_lockspace_dir = \"/l\"\nscsi_lockspace_dir = \"/s\"\n\
             daemon_socket = \"/tmp/x.sock\"\nrequest_timeout_ms = 500\n\
             readonly_disks = \"ignore\"\n",
        )
        .unwrap();
        assert!(!s.auto_disk_leases);
        assert!(s.require_lease_for_disks, "defaults to !auto_disk_leases");
        assert_eq!(
            s.file_lockspace_dir.as_deref(),
            Some("/var/lib/libvirt/lockd/files")
        );
        assert_eq!(s.lvm_lockspace_dir.as_deref(), Some("/l"));
        assert_eq!(s.scsi_lockspace_dir.as_deref(), Some("/s"));
        assert_eq!(s.daemon_socket, PathBuf::from("/tmp/x.sock"));
        assert_eq!(s.request_timeout_ms, 500);
        assert_eq!(s.readonly_disks, ReadonlyDisks::Ignore);
        let s = parse("auto_disk_leases = 0\nrequire_lease_for_disks = 0\n").unwrap();
        assert!(!s.require_lease_for_disks);
    }

    #[test]
    fn errors_name_file_line_key() {
        for (text, line, key) in [
            ("auto_disk_leases = 1\nbogus = 1\n", 2, "bogus"),
            ("request_timeout_ms = 0\n", 1, "request_timeout_ms"),
            ("\nrequest_timeout_ms = 3600001\n", 2, "request_timeout_ms"),
            ("readonly_disks = \"sometimes\"\n", 1, "readonly_disks"),
            (
                "file_lockspace_dir = \"relative/dir\"\n",
                1,
                "file_lockspace_dir",
            ),
            ("auto_disk_leases = \"yes\"\n", 1, "auto_disk_leases"),
        ] {
            let e = parse(text).unwrap_err();
            assert_eq!(e.line, Some(line), "{text:?}");
            assert_eq!(e.key.as_deref(), Some(key), "{text:?}");
            let pe = config_error(e);
            assert!(
                pe.message.contains(&format!(
                    "/etc/libvirt/qemu-lockwarden.conf:{line}: key '{key}'"
                )),
                "{}",
                pe.message
            );
        }
        let e = parse(&format!("daemon_socket = \"/{}\"\n", "s".repeat(200))).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("daemon_socket"));
    }

    #[test]
    fn missing_file_and_null_are_defaults() {
        let sock = PathBuf::from("/run/x.sock");
        let s = Settings::load(
            Some(Path::new("/nonexistent/qemu-lockwarden.conf")),
            sock.clone(),
        )
        .unwrap();
        assert_eq!(s.daemon_socket, sock);
        assert!(s.auto_disk_leases);
        let s = Settings::load(None, sock.clone()).unwrap();
        assert_eq!(s, Settings::defaults(sock));
    }
}
