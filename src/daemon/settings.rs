//! `lockwardend.conf` and the defaults it overrides (docs/interfaces.md §1).
//!
//! Precedence: command line over config file over defaults, so a unit file can pin a socket
//! while the operator tunes the rest. The file uses libvirt's syntax (`crate::config`), and an
//! unknown key stops the start with the file, line and key, because a typo silently ignored
//! would leave the operator believing a setting is active.

use super::args::Args;
use super::limits::{self, Limits};
use crate::config::{ConfFile, ConfigError};
use crate::paths;
use log::LevelFilter;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// `max_clients` default: one connection per running VM plus CLI calls.
pub const DEFAULT_MAX_CLIENTS: usize = 4096;
/// `kill_grace_ms` default: SIGTERM to SIGKILL for an owner that lost its handle.
pub const DEFAULT_KILL_GRACE_MS: u64 = 3000;
/// `storage_timeout_ms` default: a little below the plugin's 30 s `request_timeout_ms`, so the
/// daemon's answer naming the stuck storage arrives before the plugin gives up.
pub const DEFAULT_STORAGE_TIMEOUT_MS: u64 = 25_000;
/// `lease_check_interval_ms` default (0 disables lost-lock checks).
pub const DEFAULT_LEASE_CHECK_INTERVAL_MS: u64 = 10_000;
/// `heartbeat_interval_ms` default (0 disables heartbeats and fencing): a few beats within
/// `fence_after_ms` (docs/storage.md, "Partitions").
pub const DEFAULT_HEARTBEAT_INTERVAL_MS: u64 = 5_000;
/// `fence_after_ms` default, derived from NFSv4's 90 s lease (Linux nfsd): 60 s + at most 5 s
/// to stop a VM + 5 s of clock slack leaves 20 s before the server could give a lock away.
pub const DEFAULT_FENCE_AFTER_MS: u64 = 60_000;
/// Pid file name inside the runtime directory.
pub const PID_FILE_NAME: &str = "lockwardend.pid";

/// Everything the daemon needs to start, resolved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    pub config_file: PathBuf,
    pub socket: PathBuf,
    pub admin_socket: PathBuf,
    pub pid_file: PathBuf,
    pub max_clients: usize,
    pub kill_grace: Duration,
    pub log_level: LevelFilter,
    /// How long a request may wait on storage before it is answered with a Timeout error.
    pub storage_timeout: Duration,
    /// How often held leases are probed for a lost lock (None: never).
    pub lease_check_interval: Option<Duration>,
    /// How often the storage of every mount with leases must confirm a heartbeat (None: never,
    /// and no fencing).
    pub heartbeat_interval: Option<Duration>,
    /// How long a mount with leases may stay unconfirmed before its VMs are stopped.
    pub fence_after: Duration,
    /// `max_owners`, `max_leases_per_request`, `request_read_timeout_ms`, `idle_timeout_ms`
    /// (docs/hardening.md).
    pub limits: Limits,
    /// `lease_dir`: the only directory (with its subdirectories) where `<lease>` lock files are
    /// created and locked; None refuses every `<lease>` (docs/hardening.md).
    pub lease_dir: Option<PathBuf>,
    /// `watchdog_device`: a watchdog fed only while every VM that had to be stopped for a
    /// silent storage is stopped (docs/storage.md, "Watchdog"); None: no watchdog.
    pub watchdog_device: Option<PathBuf>,
}

/// The environment the defaults depend on, read once so tests can supply their own.
#[derive(Clone, Debug, Default)]
pub struct Env {
    pub euid: u32,
    pub xdg_config_home: Option<String>,
    pub xdg_runtime_dir: Option<String>,
    pub home: Option<String>,
}

impl Env {
    /// The real process environment.
    pub fn current() -> Env {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        Env {
            euid: paths::current_euid(),
            xdg_config_home: var("XDG_CONFIG_HOME"),
            xdg_runtime_dir: var("XDG_RUNTIME_DIR"),
            home: var("HOME"),
        }
    }
}

/// `/etc/libvirt/lockwardend.conf` for root, the XDG location otherwise.
pub fn default_config_path(env: &Env) -> PathBuf {
    if env.euid == 0 {
        let sysconf = option_env!("LOCKWARDEN_SYSCONFDIR").unwrap_or("/etc");
        return Path::new(sysconf).join("libvirt/lockwardend.conf");
    }
    let base = match (&env.xdg_config_home, &env.home) {
        (Some(x), _) => PathBuf::from(x),
        (None, Some(h)) => Path::new(h).join(".config"),
        (None, None) => PathBuf::from(format!("/run/user/{}/.config", env.euid)),
    };
    base.join("libvirt/lockwardend.conf")
}

/// Load the config file named by `args` (or the default one) and merge the command line.
pub fn load(args: &Args, env: &Env) -> Result<Settings, ConfigError> {
    let path = args
        .config
        .clone()
        .unwrap_or_else(|| default_config_path(env));
    let conf = ConfFile::load(&path)?;
    resolve(conf, args, env)
}

/// Take every known key from `conf`, reject the rest, and apply the command line on top.
pub fn resolve(mut conf: ConfFile, args: &Args, env: &Env) -> Result<Settings, ConfigError> {
    let runtime = paths::runtime_dir(env.euid, env.xdg_runtime_dir.as_deref());
    let socket = conf.take_abs_path("socket")?;
    let admin_socket = conf.take_abs_path("admin_socket")?;
    let pid_file = conf.take_abs_path("pid_file")?;
    let max_clients = conf.take_int("max_clients", 1, 1_000_000)?;
    let kill_grace_ms = conf.take_int("kill_grace_ms", 0, 600_000)?;
    let log_level = conf.take_choice("log_level", &["error", "warn", "info", "debug"])?;
    let storage_timeout_ms = conf.take_int("storage_timeout_ms", 100, 3_600_000)?;
    let check_ms = conf.take_int("lease_check_interval_ms", 0, 86_400_000)?;
    let max_owners = conf.take_int("max_owners", 1, 1_000_000)?;
    let max_leases = conf.take_int("max_leases_per_request", 1, 65_536)?;
    let read_timeout_ms = conf.take_int("request_read_timeout_ms", 100, 3_600_000)?;
    let idle_ms = conf.take_int("idle_timeout_ms", 0, 86_400_000)?;
    let lease_dir = conf.take_abs_path("lease_dir")?;
    let heartbeat_ms = conf.take_int("heartbeat_interval_ms", 0, 600_000)?;
    let fence_after_ms = conf.take_int("fence_after_ms", 100, 3_600_000)?;
    let watchdog_device = conf.take_abs_path("watchdog_device")?;
    let config_file = conf.path().to_path_buf();
    let config_text = config_file.display().to_string();
    conf.finish()?;

    let log_level = match log_level.as_deref() {
        _ if args.verbose => LevelFilter::Debug,
        Some("error") => LevelFilter::Error,
        Some("warn") => LevelFilter::Warn,
        Some("debug") => LevelFilter::Debug,
        _ => LevelFilter::Info,
    };
    Ok(Settings {
        config_file,
        socket: args
            .socket
            .clone()
            .or(socket)
            .unwrap_or_else(|| runtime.join(paths::SOCKET_NAME)),
        admin_socket: args
            .admin_socket
            .clone()
            .or(admin_socket)
            .unwrap_or_else(|| runtime.join(paths::ADMIN_SOCKET_NAME)),
        pid_file: args
            .pid_file
            .clone()
            .or(pid_file)
            .unwrap_or_else(|| runtime.join(PID_FILE_NAME)),
        max_clients: max_clients.map_or(DEFAULT_MAX_CLIENTS, |n| n as usize),
        kill_grace: Duration::from_millis(
            kill_grace_ms.map_or(DEFAULT_KILL_GRACE_MS, |n| n as u64),
        ),
        log_level,
        storage_timeout: Duration::from_millis(
            storage_timeout_ms.map_or(DEFAULT_STORAGE_TIMEOUT_MS, |n| n as u64),
        ),
        lease_check_interval: match check_ms.map_or(DEFAULT_LEASE_CHECK_INTERVAL_MS, |n| n as u64) {
            0 => None,
            n => Some(Duration::from_millis(n)),
        },
        heartbeat_interval: match heartbeat_ms.map_or(DEFAULT_HEARTBEAT_INTERVAL_MS, |n| n as u64) {
            0 => None,
            n => Some(Duration::from_millis(n)),
        },
        fence_after: Duration::from_millis(
            fence_after_ms.map_or(DEFAULT_FENCE_AFTER_MS, |n| n as u64),
        ),
        limits: Limits {
            max_owners: max_owners.map_or(limits::DEFAULT_MAX_OWNERS, |n| n as usize),
            max_leases_per_request: max_leases
                .map_or(limits::DEFAULT_MAX_LEASES_PER_REQUEST, |n| n as usize),
            request_read_timeout: Duration::from_millis(
                read_timeout_ms.map_or(limits::DEFAULT_REQUEST_READ_TIMEOUT_MS, |n| n as u64),
            ),
            idle_timeout: match idle_ms.map_or(limits::DEFAULT_IDLE_TIMEOUT_MS, |n| n as u64) {
                0 => None,
                n => Some(Duration::from_millis(n)),
            },
            config_file: config_text,
        },
        lease_dir,
        watchdog_device,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root() -> Env {
        Env {
            euid: 0,
            ..Env::default()
        }
    }

    fn parse(text: &str) -> ConfFile {
        ConfFile::parse(Path::new("/etc/libvirt/lockwardend.conf"), text).unwrap()
    }

    #[test]
    fn defaults_for_root() {
        let s = resolve(parse(""), &Args::default(), &root()).unwrap();
        assert_eq!(s.socket, PathBuf::from("/run/lockwarden/lockwardend.sock"));
        assert_eq!(
            s.admin_socket,
            PathBuf::from("/run/lockwarden/lockwardend-admin.sock")
        );
        assert_eq!(s.pid_file, PathBuf::from("/run/lockwarden/lockwardend.pid"));
        assert_eq!(s.max_clients, 4096);
        assert_eq!(s.kill_grace, Duration::from_millis(3000));
        assert_eq!(s.log_level, LevelFilter::Info);
        assert_eq!(s.limits.max_owners, 4096);
        assert_eq!(s.limits.max_leases_per_request, 1024);
        assert_eq!(s.limits.request_read_timeout, Duration::from_millis(10_000));
        assert_eq!(s.limits.idle_timeout, Some(Duration::from_millis(300_000)));
        assert_eq!(s.lease_dir, None);
        assert_eq!(s.watchdog_device, None);
        assert_eq!(s.heartbeat_interval, Some(Duration::from_millis(5000)));
        assert_eq!(s.fence_after, Duration::from_millis(60_000));
        assert_eq!(
            default_config_path(&root()),
            PathBuf::from("/etc/libvirt/lockwardend.conf")
        );
    }

    #[test]
    fn user_paths_follow_xdg() {
        let env = Env {
            euid: 1000,
            xdg_config_home: None,
            xdg_runtime_dir: Some("/run/user/1000".into()),
            home: Some("/home/u".into()),
        };
        assert_eq!(
            default_config_path(&env),
            PathBuf::from("/home/u/.config/libvirt/lockwardend.conf")
        );
        let s = resolve(parse(""), &Args::default(), &env).unwrap();
        assert_eq!(
            s.pid_file,
            PathBuf::from("/run/user/1000/lockwarden/lockwardend.pid")
        );
    }

    #[test]
    fn file_then_command_line() {
        let conf = parse(
            "socket = \"/x/s.sock\"\nadmin_socket = \"/x/a.sock\"\nmax_clients = 7\n\
             kill_grace_ms = 0\nlog_level = \"warn\"\npid_file = \"/x/p\"\n\
             max_owners = 3\nmax_leases_per_request = 5\nrequest_read_timeout_ms = 250\n\
             idle_timeout_ms = 0\nlease_dir = \"/srv/leases\"\nheartbeat_interval_ms = 0\n\
             fence_after_ms = 1500\nwatchdog_device = \"/dev/watchdog\"\n",
        );
        let args = Args {
            socket: Some("/cli.sock".into()),
            verbose: true,
            ..Args::default()
        };
        let s = resolve(conf, &args, &root()).unwrap();
        assert_eq!(s.socket, PathBuf::from("/cli.sock"));
        assert_eq!(s.admin_socket, PathBuf::from("/x/a.sock"));
        assert_eq!(s.pid_file, PathBuf::from("/x/p"));
        assert_eq!(s.max_clients, 7);
        assert_eq!(s.kill_grace, Duration::ZERO);
        assert_eq!(s.log_level, LevelFilter::Debug);
        assert_eq!(s.limits.max_owners, 3);
        assert_eq!(s.limits.max_leases_per_request, 5);
        assert_eq!(s.limits.request_read_timeout, Duration::from_millis(250));
        assert_eq!(s.limits.idle_timeout, None);
        assert_eq!(s.lease_dir, Some(PathBuf::from("/srv/leases")));
        assert_eq!(s.heartbeat_interval, None);
        assert_eq!(s.fence_after, Duration::from_millis(1500));
        assert_eq!(s.watchdog_device, Some(PathBuf::from("/dev/watchdog")));
        assert_eq!(s.limits.config_file, "/etc/libvirt/lockwardend.conf");
    }

    #[test]
    fn unknown_key_and_bad_values() {
        let e = resolve(parse("sockt = \"/x\"\n"), &Args::default(), &root()).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("sockt"));
        assert_eq!(e.line, Some(1));
        for bad in [
            "socket = \"relative\"\n",
            "max_clients = 0\n",
            "kill_grace_ms = -1\n",
            "log_level = \"loud\"\n",
            "max_owners = 0\n",
            "max_leases_per_request = 0\n",
            "request_read_timeout_ms = 10\n",
            "idle_timeout_ms = -5\n",
            "lease_dir = \"leases\"\n",
            "watchdog_device = \"watchdog\"\n",
            "heartbeat_interval_ms = -1\n",
            "heartbeat_interval_ms = 600001\n",
            "fence_after_ms = 99\n",
        ] {
            assert!(
                resolve(parse(bad), &Args::default(), &root()).is_err(),
                "{bad}"
            );
        }
    }
}
