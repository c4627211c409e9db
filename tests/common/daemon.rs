//! Starting a bare `lockwardend` with a config of the test's choosing (the scenario harness in
//! `common::Daemon` wraps the same binary with the plugin host around it).

use super::proto::{Client, Proc, acquire_request, ok, release_request};
use lockwarden::protocol::{LeaseInfo, LeaseSpec, Owner, Request, Response};
use std::fs::{self, File};
use std::os::fd::RawFd;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The daemon binary under test.
pub const DAEMON: &str = env!("CARGO_BIN_EXE_lockwardend");

/// `lockwardend --config CONF --socket SOCKET --admin-socket ADMIN --pid-file PID_FILE`, out of
/// reach of any systemd activation variables of the test's own environment, stdin and stdout
/// null, stderr to a new file `log`. Add arguments, environment or a pre-exec hook, then spawn.
pub fn command(conf: &Path, socket: &Path, admin: &Path, pid_file: &Path, log: &Path) -> Command {
    let mut cmd = Command::new(DAEMON);
    cmd.arg("--config")
        .arg(conf)
        .arg("--socket")
        .arg(socket)
        .arg("--admin-socket")
        .arg(admin)
        .arg("--pid-file")
        .arg(pid_file)
        .env_remove("NOTIFY_SOCKET")
        .env_remove("LISTEN_PID")
        .env_remove("LISTEN_FDS")
        .env_remove("LISTEN_FDNAMES")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(File::create(log).expect("daemon log"));
    cmd
}

/// The usual layout of a test daemon: a new temporary directory holding `lockwardend.conf`
/// (written), `daemon.log`, and `run/` for the sockets and the pid file.
pub struct Layout {
    pub dir: tempfile::TempDir,
    pub conf: PathBuf,
    pub socket: PathBuf,
    pub admin: PathBuf,
    pub pid_file: PathBuf,
    pub log: PathBuf,
}

impl Layout {
    /// A new temporary directory with `config` as lockwardend.conf.
    pub fn new(config: &str) -> Layout {
        let dir = tempfile::tempdir().expect("temp dir");
        let conf = dir.path().join("lockwardend.conf");
        fs::write(&conf, config).expect("write lockwardend.conf");
        Layout {
            socket: dir.path().join("run/lockwardend.sock"),
            admin: dir.path().join("run/lockwardend-admin.sock"),
            pid_file: dir.path().join("run/lockwardend.pid"),
            log: dir.path().join("daemon.log"),
            conf,
            dir,
        }
    }

    /// [`command`] for these paths.
    pub fn command(&self) -> Command {
        command(
            &self.conf,
            &self.socket,
            &self.admin,
            &self.pid_file,
            &self.log,
        )
    }
}

/// Hand `cmd` two listening sockets the way systemd socket activation does: `admin_fd` as fd 3
/// and `main_fd` as fd 4 in the child (the copies without close-on-exec). The caller sets
/// LISTEN_FDS, LISTEN_FDNAMES and LISTEN_PID.
pub fn pass_listeners(cmd: &mut Command, admin_fd: RawFd, main_fd: RawFd) {
    // SAFETY: fcntl and dup2 only: move the listeners to fds 3 (admin) and 4 (main), clearing
    // close-on-exec on those copies.
    unsafe {
        cmd.pre_exec(move || {
            let m = libc::fcntl(main_fd, libc::F_DUPFD_CLOEXEC, 100);
            let a = libc::fcntl(admin_fd, libc::F_DUPFD_CLOEXEC, 100);
            if m < 0 || a < 0 || libc::dup2(a, 3) < 0 || libc::dup2(m, 4) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// `lockwardend` as systemd socket activation starts it: through `sh`, so that LISTEN_PID is
/// the daemon's own pid, with LISTEN_FDS=2 and LISTEN_FDNAMES naming `admin_fd` (given as fd 3)
/// and `main_fd` (fd 4); its config (absent), unused socket paths and pid file are in `dir`.
/// Set stdio (and NOTIFY_SOCKET) as needed, then spawn.
pub fn socket_activated(dir: &Path, admin_fd: RawFd, main_fd: RawFd) -> Command {
    let mut cmd = Command::new("sh");
    // LISTEN_PID must be the daemon's pid: the shell execs it, keeping its own pid.
    cmd.arg("-c")
        .arg("LISTEN_PID=$$ exec \"$0\" \"$@\"")
        .arg(DAEMON)
        .arg("--config")
        .arg(dir.join("none.conf"))
        .arg("--socket")
        .arg(dir.join("unused.sock"))
        .arg("--admin-socket")
        .arg(dir.join("unused-admin.sock"))
        .arg("--pid-file")
        .arg(dir.join("p.pid"))
        .env("LISTEN_FDS", "2")
        .env(
            "LISTEN_FDNAMES",
            "lockwardend-admin.socket:lockwardend.socket",
        );
    pass_listeners(&mut cmd, admin_fd, main_fd);
    cmd
}

/// Wait (at most `bound`; most suites use [`super::proto::BOUND`]) until every one of `sockets` accepts a
/// connection; panics with the daemon log (`log`) when the daemon exits first or never serves.
pub fn wait_serving(proc: &mut Proc, sockets: &[&Path], log: &Path, bound: Duration) {
    let read_log = || fs::read_to_string(log).unwrap_or_default();
    let t0 = Instant::now();
    while sockets.iter().any(|s| UnixStream::connect(s).is_err()) {
        if let Some(st) = proc.0.try_wait().expect("try_wait") {
            panic!("lockwardend exited during start ({st}):\n{}", read_log());
        }
        assert!(
            t0.elapsed() < bound,
            "lockwardend did not serve:\n{}",
            read_log()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The requests every bare-daemon harness makes, given where its sockets are. Implement the two
/// paths; bring the trait into scope to call the rest.
pub trait Lockwardend {
    /// The client socket.
    fn socket_path(&self) -> &Path;
    /// The admin socket.
    fn admin_path(&self) -> &Path;

    fn client(&self) -> Client {
        Client::connect(self.socket_path())
    }

    fn admin_client(&self) -> Client {
        Client::connect(self.admin_path())
    }

    /// Every lease the daemon holds (admin List; panics unless Ok).
    fn list(&self) -> Vec<LeaseInfo> {
        ok(self.admin_client().call(&Request::List))
    }

    fn acquire(&self, owner: &Owner, leases: Vec<LeaseSpec>) -> Response {
        self.client().call(&acquire_request(owner, leases))
    }

    fn release(&self, owner: &Owner, leases: Vec<LeaseSpec>) -> Response {
        self.client().call(&release_request(owner, leases))
    }

    /// The leases `owner` holds (Inquire: Acquire/Release answers carry no lease list).
    fn held(&self, owner: &Owner) -> Vec<LeaseInfo> {
        self.client().held(owner)
    }
}

/// What a suite may vary when it starts a daemon; everything else is [`Layout`]'s.
#[derive(Default)]
pub struct Opts<'a> {
    /// lockwardend.conf text.
    pub config: &'a str,
    /// Extra environment variables.
    pub env: Vec<(&'a str, std::ffi::OsString)>,
    /// RLIMIT_NOFILE (soft, hard) for the daemon.
    pub nofile: Option<(u64, u64)>,
    /// `--verbose` (debug lines in the log).
    pub verbose: bool,
}

/// The one bare-daemon harness: a `lockwardend` in a [`Layout`], serving both sockets when
/// [`TestDaemon::start`] returns, killed (with its temporary directory removed) on drop.
pub struct TestDaemon {
    pub proc: Proc,
    pub dir: tempfile::TempDir,
    pub conf: PathBuf,
    pub socket: PathBuf,
    pub admin: PathBuf,
    pub pid_file: PathBuf,
    pub log: PathBuf,
}

impl TestDaemon {
    /// A daemon with `config` as its lockwardend.conf.
    pub fn start(config: &str) -> TestDaemon {
        TestDaemon::with(Opts {
            config,
            ..Opts::default()
        })
    }

    pub fn with(opts: Opts<'_>) -> TestDaemon {
        let at = Layout::new(opts.config);
        let mut cmd = at.command();
        if opts.verbose {
            cmd.arg("--verbose");
        }
        cmd.env_remove("JOURNAL_STREAM").env_remove("INVOCATION_ID");
        for (k, v) in &opts.env {
            cmd.env(k, v);
        }
        if let Some((soft, hard)) = opts.nofile {
            // SAFETY: setrlimit is async-signal-safe; the closure touches only its captures.
            unsafe {
                cmd.pre_exec(move || {
                    let r = libc::rlimit {
                        rlim_cur: soft,
                        rlim_max: hard,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &r) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let mut proc = Proc(cmd.spawn().expect("spawning lockwardend"));
        wait_serving(
            &mut proc,
            &[&at.socket, &at.admin],
            &at.log,
            super::proto::BOUND,
        );
        let Layout {
            dir,
            conf,
            socket,
            admin,
            pid_file,
            log,
        } = at;
        TestDaemon {
            proc,
            dir,
            conf,
            socket,
            admin,
            pid_file,
            log,
        }
    }

    /// The daemon's log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Panics (with the log) if the daemon exited: a hostile client must never take it down.
    pub fn assert_alive(&mut self) {
        if let Ok(Some(st)) = self.proc.0.try_wait() {
            panic!("lockwardend died ({st}):\n{}", self.log());
        }
    }

    /// Admin Status; panics unless it answers one.
    pub fn status(&self) -> lockwarden::protocol::StatusInfo {
        match self.admin_client().call(&Request::Status) {
            Response::Status(s) => s,
            other => panic!("status failed: {other:?}"),
        }
    }

    /// Is there a warning line in the log that mentions every one of `needles`?
    pub fn warned(&self, needles: &[&str]) -> bool {
        self.log()
            .lines()
            .any(|l| l.contains("WARN") && needles.iter().all(|n| l.contains(n)))
    }

    /// The daemon's descriptor numbers that resolve to `path` now.
    pub fn fds_on(&self, path: &Path) -> Vec<String> {
        let want = fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
        let dir = format!("/proc/{}/fd", self.proc.pid());
        fs::read_dir(&dir)
            .map(|rd| {
                rd.filter_map(Result::ok)
                    .filter(|e| fs::read_link(e.path()).is_ok_and(|t| t == want))
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// A graceful stop first (SIGTERM, at most 3 s: the daemon then tells an idle keeper to quit),
/// so suites leave no keeper behind; [`Proc`]'s drop kills whatever is left.
impl Drop for TestDaemon {
    fn drop(&mut self) {
        // SAFETY: kill(2) on the pid of our own, not yet reaped, child.
        unsafe { libc::kill(self.proc.pid() as i32, libc::SIGTERM) };
        let _ = self.proc.wait_for(Duration::from_secs(3));
    }
}

impl Lockwardend for TestDaemon {
    fn socket_path(&self) -> &Path {
        &self.socket
    }

    fn admin_path(&self) -> &Path {
        &self.admin
    }
}
