//! lockwardend, the lock-holder daemon (design §1-§3).
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
//! - the system: [`lock`] (raw OFD calls), [`lockfile`] (opening targets), [`pidfd`].

mod acquire;
mod args;
mod conn;
mod dispatch;
mod kill;
mod lease;
mod listen;
mod lock;
mod lockfile;
mod logging;
mod notify;
mod owner;
mod pidfd;
mod pidfile;
mod release;
mod server;
mod settings;
mod signals;
mod state;
mod text;

use args::Command;
use log::{error, info, warn};
use std::process::ExitCode;

/// A refused request, boxed because it travels up through several returns.
type Failure = Box<crate::protocol::ErrorReply>;

/// Exit status for a command line that cannot be understood.
const EXIT_USAGE: u8 = 2;

/// Entry point of the `lockwardend` binary.
pub fn main() -> ExitCode {
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

/// Start, serve until told to stop, clean up.
fn serve(settings: &settings::Settings) -> Result<(), String> {
    raise_fd_limit();
    let pid_file = pidfile::PidFile::create(&settings.pid_file)?;
    let signals = signals::Signals::install()
        .map_err(|e| format!("cannot set up signal handling: {}", e.desc()))?;
    let listeners = match listen::open(settings) {
        Ok(l) => l,
        Err(e) => {
            pid_file.remove();
            return Err(e);
        }
    };
    let hostname = nix::unistd::gethostname()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_else(|_| "localhost".into());
    let state = state::State::new(hostname, text::now_secs(), settings.kill_grace);
    let mut server = server::Server::new(
        state,
        listeners,
        signals,
        settings.max_clients,
        settings.config_file.display().to_string(),
    );
    if let Err(e) = notify::notify("READY=1") {
        warn!("cannot notify systemd (NOTIFY_SOCKET): {e}");
    }
    info!(
        "lockwardend {} serving (pid {}, config {:?})",
        env!("CARGO_PKG_VERSION"),
        std::process::id(),
        settings.config_file
    );
    let result = server.run();
    if let Err(e) = notify::notify("STOPPING=1") {
        warn!("cannot notify systemd (NOTIFY_SOCKET): {e}");
    }
    let (leases, owners) = server.held();
    if leases > 0 {
        warn!(
            "stopping while {owners} VM(s) hold {leases} lease(s): the kernel drops these locks \
             as lockwardend exits, so those VMs are unprotected until their disks are locked \
             again"
        );
    }
    listen::remove_bound(&server.listeners);
    pid_file.remove();
    result.map(|_| info!("lockwardend stopped"))
}

/// Each running VM keeps a connection and each lease a descriptor: use the whole hard limit.
fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                warn!("cannot raise the open-file limit to {hard}: {}", e.desc());
            }
        }
    }
}
