//! lockwardend, the lock-holder daemon (docs/interfaces.md §1-§3).
//!
//! Why a daemon: an OFD lock lives as long as its open file description, so the locks must be
//! held by a process that outlives libvirtd restarts and notices when a VM dies. The plugin in
//! libvirtd sends one request per call over a Unix socket; this daemon opens and locks the
//! files, remembers which VM (owner) holds what, and lets go when the VM's lifetime handle
//! closes or its process exits.
//!
//! One module per concept:
//! - start-up: [`args`] (command line), [`settings`] (config file), [`logging`], [`pidfile`],
//!   [`listen`] (sockets, systemd activation), [`signals`], [`notify`] (sd_notify);
//! - the loop: [`server`] (poll), [`conn`] (buffers and frames), [`dispatch`] (who may ask what);
//! - the tables: [`state`], [`owner`], [`lease`], and their operations [`acquire`],
//!   [`release`], [`kill`] (terminating an owner that lost its handle);
//! - the system: [`lock`] (raw OFD calls), [`lockfile`] (opening targets), [`pidfd`];
//! - never unprotected (docs/reliability.md): [`keeper`] (a process holding a duplicate of
//!   every lease's descriptor, so a crash or stop drops no lock), [`recover`] and [`record`]
//!   (rebuilding the tables), [`reexec`] (live upgrade on SIGHUP/SIGUSR1).

mod acquire;
mod args;
mod beat;
mod clocks;
mod conn;
mod dispatch;
mod error;
mod fence;
mod health;
mod heartbeat;
pub mod holder;
mod keepalive;
mod keeper;
mod keptmeta;
mod kill;
mod lease;
mod ledger;
mod limits;
mod listen;
mod liveness;
mod lock;
mod lockfile;
mod logging;
mod lost;
// metrics (issue 18)
mod metrics;
mod notify;
mod owner;
mod pidfd;
mod pidfile;
mod record;
mod recover;
mod reexec;
mod release;
mod route;
mod server;
mod settings;
mod signals;
mod state;
mod storage;
mod sys;
mod thaw;
mod watchdog;

// The core's rules against a recording keeper, with real files and locks.
#[cfg(test)]
mod core_tests;

use args::Command;
use log::{error, info, warn};
use std::process::ExitCode;

/// A refused request, boxed because it travels up through several returns.
type Failure = Box<error::DaemonError>;

/// Exit status for a command line that cannot be understood.
const EXIT_USAGE: u8 = 2;

/// glibc's allocator, set before any thread starts (the forked keeper inherits it): one arena
/// for every thread (storage and closer threads mostly wait on I/O, and each extra arena keeps a
/// heap of its own resident), and a fixed mmap threshold, so that large tables (the lease map
/// past a few thousand leases, receive buffers) always come from mmap and go back to the system
/// when freed; glibc's adaptive threshold would move them into the heap after the first free.
fn tune_malloc() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets allocator parameters; no thread exists yet.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
    }
}

/// Entry point of the `lockwardend` binary.
pub fn main() -> ExitCode {
    tune_malloc();
    // The daemon starts its keeper as `lockwardend --internal-keeper ...` (keeper/process.rs).
    keeper::become_keeper_if_asked();
    let args = match args::parse(std::env::args_os().skip(1)) {
        Ok(Command::Run(a)) => a,
        Ok(Command::Help) => {
            print!("{}", args::USAGE);
            return ExitCode::SUCCESS;
        }
        Ok(Command::Version) => {
            println!(
                "lockwardend {} (lockwarden protocol {})",
                env!("CARGO_PKG_VERSION"),
                crate::protocol::PROTOCOL_VERSION
            );
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("lockwardend: {e}\nTry 'lockwardend --help' for more information.");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let settings = match settings::load(&args, &settings::Env::current()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("lockwardend: configuration error: {e}");
            return ExitCode::FAILURE;
        }
    };
    logging::init(settings.log_level, logging::under_systemd());
    match serve(&settings) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e}");
            ExitCode::FAILURE
        }
    }
}

/// Start (fresh, after a crash, or as the new image of a live re-exec), serve until told to
/// stop, clean up.
fn serve(settings: &settings::Settings) -> Result<(), String> {
    limits::install(settings.limits.clone());
    lockfile::set_lease_dir(
        settings
            .lease_dir
            .as_ref()
            .map(|d| d.to_string_lossy().into_owned()),
        &settings.limits.config_file,
    );
    limits::check_fd_limit(settings.max_clients, settings.limits.max_owners);
    let signals = signals::Signals::install()
        .map_err(|e| format!("cannot set up signal handling: {}", e.desc()))?;
    let hostname = nix::unistd::gethostname()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_else(|_| "localhost".into());
    let detached = keeper::Keeper::detached(std::path::PathBuf::new());
    let storage = storage::Storage::new()?;
    let mut state = state::State::new(
        hostname,
        crate::text::now_secs(),
        settings.kill_grace,
        detached,
        storage,
    );
    state.storage_timeout = settings.storage_timeout;
    state
        .health
        .configure(settings.lease_check_interval, std::time::Instant::now());
    state.heartbeat.configure(
        settings.heartbeat_interval,
        settings.fence_after,
        std::time::Instant::now(),
    );
    let mut server = server::Server::new(
        state,
        Vec::new(),
        signals,
        settings.max_clients,
        settings.config_file.display().to_string(),
        exe_path(),
    )?;
    match reexec::take()? {
        Some(doc) => {
            server.restore(doc, settings.heartbeat_interval)?;
            reconcile_watchdog(settings, &mut server);
        }
        None => {
            // Opened (and armed) before anything else, so a bad device stops the start before
            // it serves; disarmed again if the start fails.
            server.state.watchdog = open_watchdog(settings)?;
            if let Err(e) = start(settings, &mut server) {
                if let Some(w) = server.state.watchdog.take() {
                    w.magic_close();
                }
                return Err(e);
            }
        }
    }
    if let Err(e) = notify::notify("READY=1") {
        warn!("cannot notify systemd (NOTIFY_SOCKET): {e}");
    }
    info!(
        "lockwardend {} serving (pid {}, config {:?}, keeper pid {})",
        env!("CARGO_PKG_VERSION"),
        std::process::id(),
        settings.config_file,
        server.state.keeper.pid
    );
    let result = server.run();
    // A clean stop disarms the watchdog; a failed loop exits like a crash (docs/storage.md,
    // "Watchdog"): the device closes without the magic close and stays armed until the
    // restarted lockwardend feeds it.
    if let Some(w) = server.state.watchdog.take() {
        match &result {
            Ok(_) => w.magic_close(),
            Err(e) => error!(
                "the event loop failed ({e}); watchdog_device {:?} is closed without the magic                  close and stays armed: this host resets unless lockwardend is started again                  within the watchdog's timeout",
                w.path
            ),
        }
    }
    if let Err(e) = notify::notify("STOPPING=1") {
        warn!("cannot notify systemd (NOTIFY_SOCKET): {e}");
    }
    let (leases, owners) = server.held();
    let quit = server.quit_keeper();
    let keeper_pid = server.state.keeper.pid;
    match quit {
        Ok(0) if leases == 0 => info!("the keeper (pid {keeper_pid}) stopped too"),
        Ok(held) => warn!(
            "stopping while {owners} VM(s) hold {leases} lease(s): the keeper (pid {keeper_pid}) \
             keeps holding {held} lease(s), so no other host can take these disks; a restarted \
             lockwardend (same --socket) takes them back, and the keeper drops a lease by itself \
             once its VM exits"
        ),
        Err(e) if leases > 0 => error!(
            "stopping while {owners} VM(s) hold {leases} lease(s), and no keeper could be made to \
             hold them ({e}): the kernel drops these locks as lockwardend exits, so these VMs \
             are unprotected: {}; start lockwardend again at once (it cannot take back what no \
             keeper holds: re-acquire by restarting or re-attaching those VMs' disks)",
            server.vms_holding()
        ),
        Err(e) => warn!("could not stop the keeper: {e}"),
    }
    listen::remove_bound(&server.listeners);
    if let Some(p) = server.pid_file.take() {
        p.remove();
    }
    result.map(|_| info!("lockwardend stopped"))
}

/// `watchdog_device`, opened (None when unset).
fn open_watchdog(settings: &settings::Settings) -> Result<Option<watchdog::Watchdog>, String> {
    settings
        .watchdog_device
        .as_deref()
        .map(|p| watchdog::Watchdog::open(p, settings.heartbeat_interval, settings.fence_after))
        .transpose()
}

/// After a live re-exec: keep the handed-over watchdog when the configuration still names it;
/// disarm it when `watchdog_device` was unset; switch when it names another one.
fn reconcile_watchdog(settings: &settings::Settings, server: &mut server::Server) {
    let same = match (&server.state.watchdog, &settings.watchdog_device) {
        // Without heartbeats nothing could decide when to stop feeding it: reopening refuses
        // (Watchdog::open says why) after the magic close below.
        (Some(_), Some(_)) if settings.heartbeat_interval.is_none() => false,
        (Some(w), Some(p)) => &w.path == p,
        (None, None) => true,
        _ => false,
    };
    if same {
        return;
    }
    if let Some(w) = server.state.watchdog.take() {
        info!(
            "after the re-exec: closing watchdog_device {:?} (the configuration now names {:?}, \
             heartbeat_interval_ms {})",
            w.path,
            settings.watchdog_device,
            settings.heartbeat_interval.map_or(0, |d| d.as_millis())
        );
        w.magic_close();
    }
    match open_watchdog(settings) {
        Ok(w) => server.state.watchdog = w,
        // Every lease and VM is already back in this image: serving on without a watchdog
        // beats exiting (the keeper would hold the leases, but nobody would fence).
        Err(e) => error!("{e}; serving on WITHOUT a watchdog"),
    }
}

/// A fresh start: pid file, sockets, then the keeper (whose leases, if a previous lockwardend
/// left any, are taken back before the first request is read).
fn start(settings: &settings::Settings, server: &mut server::Server) -> Result<(), String> {
    let pid_file = pidfile::PidFile::create(&settings.pid_file)?;
    let listeners = match listen::open(settings) {
        Ok(l) => l,
        Err(e) => {
            pid_file.remove();
            return Err(e);
        }
    };
    let main_socket = listeners
        .iter()
        .find(|l| l.role == listen::Role::Main && l.path.is_absolute())
        .map_or_else(|| settings.socket.clone(), |l| l.path.clone());
    let (keeper, entries) = match keeper::Keeper::attach(&keeper::path_for(&main_socket)) {
        Ok(k) => k,
        Err(e) => {
            listen::remove_bound(&listeners);
            pid_file.remove();
            return Err(format!(
                "cannot start or reach the keeper process: {e}; lockwardend will not serve \
                 without it, because its leases would not survive a crash"
            ));
        }
    };
    server.listeners = listeners;
    server.pid_file = Some(pid_file);
    server.state.keeper = keeper;
    recover::adopt(&mut server.state, entries);
    Ok(())
}

/// This binary's path, to exec again on a live upgrade (an upgraded file at the same path is
/// what runs next).
fn exe_path() -> std::path::PathBuf {
    match std::env::current_exe() {
        Ok(p) => {
            let s = p.to_string_lossy();
            match s.strip_suffix(" (deleted)") {
                Some(stripped) => std::path::PathBuf::from(stripped),
                None => p,
            }
        }
        Err(_) => std::path::PathBuf::from("/proc/self/exe"),
    }
}
