//! The one daemon harness of the suites: [`TestDaemon`] starts `lockwardend` with a config,
//! binary, directory and environment of the test's choosing; [`socket_activated`] builds the
//! command line of a socket-activated start for the tests of that path.

use super::proto::{Client, Proc, acquire_request, ok, release_request};
use lockwarden::protocol::{LeaseInfo, LeaseSpec, Owner, Request, Response};
use std::fs::{self, File};
use std::os::fd::RawFd;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

/// The daemon binary under test.
pub const DAEMON: &str = env!("CARGO_BIN_EXE_lockwardend");

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
    super::wait::wait_until_or("lockwardend serves", bound, read_log, || {
        if let Some(st) = proc.0.try_wait().expect("try_wait") {
            panic!("lockwardend exited during start ({st}):\n{}", read_log());
        }
        sockets.iter().all(|s| UnixStream::connect(s).is_ok())
    });
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

/// What a suite may vary when it starts a daemon. The default layout: a new temporary
/// directory DIR holding `lockwardend.conf`, `daemon.log` and `run/` (both sockets, pid file).
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
    /// The binary to run instead of cargo's [`DAEMON`] (a copy the test may replace).
    pub bin: Option<PathBuf>,
    /// An existing directory to lay the daemon out in, kept on drop (a later daemon in it finds
    /// the same sockets, pid file and keeper); the log is then a new `daemon-N.log` in it.
    /// A new temporary directory when None.
    pub dir: Option<&'a Path>,
    /// The directory of the sockets instead of `DIR/run`.
    pub run: Option<&'a Path>,
    /// The pid file instead of `RUN/lockwardend.pid`.
    pub pid_file: Option<&'a Path>,
    /// Run the daemon in a UTS namespace of its own named this (another host, as far as shared
    /// storage can tell).
    pub hostname: Option<&'static str>,
    /// Return as soon as the process runs, without waiting for it to serve (a start that must
    /// fail, or a test that waits for something else).
    pub no_wait: bool,
}

/// The one daemon harness: a `lockwardend` laid out as [`Opts`] says, serving both sockets when
/// [`TestDaemon::start`] returns; stopped on drop (SIGTERM, then SIGKILL), with its log printed
/// when the test is failing, the keepers it was told about killed, and its temporary
/// directory removed.
pub struct TestDaemon {
    pub proc: Proc,
    /// The layout directory (a temporary one unless [`Opts::dir`] named one).
    pub dir: PathBuf,
    tmp: Option<tempfile::TempDir>,
    pub bin: PathBuf,
    pub conf: PathBuf,
    pub socket: PathBuf,
    pub admin: PathBuf,
    pub pid_file: PathBuf,
    pub log: PathBuf,
    launch: Launch,
    /// Keeper pids to kill on drop if they still are keepers (see [`TestDaemon::track_keeper`]).
    pub keepers: Vec<u32>,
}

impl TestDaemon {
    /// A daemon with `config` as its lockwardend.conf.
    pub fn start(config: &str) -> TestDaemon {
        TestDaemon::with(Opts {
            config,
            ..Opts::default()
        })
    }

    /// A daemon with `config`, logging debug lines too (`--verbose`).
    pub fn verbose(config: &str) -> TestDaemon {
        TestDaemon::with(Opts {
            config,
            verbose: true,
            ..Opts::default()
        })
    }

    pub fn with(opts: Opts<'_>) -> TestDaemon {
        let (dir, tmp) = match opts.dir {
            Some(d) => (d.to_path_buf(), None),
            None => {
                let t = tempfile::tempdir().expect("temp dir");
                (t.path().to_path_buf(), Some(t))
            }
        };
        let conf = dir.join("lockwardend.conf");
        fs::write(&conf, opts.config).expect("write lockwardend.conf");
        let run = opts.run.map_or_else(|| dir.join("run"), Path::to_path_buf);
        let log = match opts.dir {
            Some(_) => dir.join(format!("daemon-{}.log", super::proto::next_seq())),
            None => dir.join("daemon.log"),
        };
        let launch = Launch {
            bin: opts.bin.unwrap_or_else(|| PathBuf::from(DAEMON)),
            conf,
            socket: run.join("lockwardend.sock"),
            admin: run.join("lockwardend-admin.sock"),
            pid_file: opts
                .pid_file
                .map_or_else(|| run.join("lockwardend.pid"), Path::to_path_buf),
            log,
            verbose: opts.verbose,
            env: opts
                .env
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
            nofile: opts.nofile,
            hostname: opts.hostname,
        };
        let mut d = TestDaemon {
            proc: launch.spawn(),
            dir,
            tmp,
            bin: launch.bin.clone(),
            conf: launch.conf.clone(),
            socket: launch.socket.clone(),
            admin: launch.admin.clone(),
            pid_file: launch.pid_file.clone(),
            log: launch.log.clone(),
            launch,
            keepers: Vec::new(),
        };
        if !opts.no_wait {
            d.wait_serving();
        }
        d
    }

    /// Start the daemon process again with the same arguments (after [`TestDaemon::stop`]),
    /// appending to the same log, and wait until it serves.
    pub fn respawn(&mut self) {
        self.proc = self.launch.spawn();
        self.wait_serving();
    }

    fn wait_serving(&mut self) {
        wait_serving(
            &mut self.proc,
            &[&self.socket, &self.admin],
            &self.log,
            super::proto::BOUND,
        );
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// Is the daemon process still running (not exited)?
    pub fn running(&mut self) -> bool {
        matches!(self.proc.0.try_wait(), Ok(None))
    }

    /// Send `sig` and wait (bounded) for the daemon process to end; panics with the log if it
    /// does not.
    pub fn stop(&mut self, sig: libc::c_int) -> std::process::ExitStatus {
        super::proto::signal(self.pid(), sig);
        self.wait_exit()
    }

    /// Wait (bounded) for the daemon process to exit by itself; panics with the log if it
    /// does not.
    pub fn wait_exit(&mut self) -> std::process::ExitStatus {
        self.proc
            .wait_for(super::proto::BOUND)
            .unwrap_or_else(|| panic!("lockwardend did not exit:\n{}", self.log()))
    }

    /// The daemon's log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Wait (bounded) until `cond` holds; panics naming `what`, with the daemon log.
    pub fn wait_for(&self, what: &str, cond: impl FnMut() -> bool) -> Duration {
        self.wait_for_within(super::proto::BOUND, what, cond)
    }

    /// [`TestDaemon::wait_for`] with a bound of the caller's.
    pub fn wait_for_within(
        &self,
        bound: Duration,
        what: &str,
        cond: impl FnMut() -> bool,
    ) -> Duration {
        super::wait::wait_until_or(what, bound, || format!("daemon log:\n{}", self.log()), cond)
    }

    /// Wait (bounded) until the log contains `needle`: the event that proves the daemon made a
    /// decision, so a test can check what it did not do.
    pub fn wait_log(&self, needle: &str) {
        self.wait_log_n(needle, 1);
    }

    /// Wait (bounded) until the log holds `needle` at least `count` times.
    pub fn wait_log_n(&self, needle: &str, count: usize) {
        self.wait_for(&format!("the daemon logs {needle:?} ({count}x)"), || {
            self.log().matches(needle).count() >= count
        });
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

    /// Let every uid reach the client socket (its directories 0755, the socket 0666), so that
    /// what refuses a client of another uid is the daemon's own SO_PEERCRED check.
    pub fn open_to_others(&self) {
        use std::os::unix::fs::PermissionsExt;
        let run = self.socket.parent().expect("socket directory");
        for (p, mode) in [
            (self.dir.as_path(), 0o755),
            (run, 0o755),
            (&self.socket, 0o666),
        ] {
            fs::set_permissions(p, fs::Permissions::from_mode(mode))
                .unwrap_or_else(|e| panic!("chmod {mode:o} {}: {e}", p.display()));
        }
    }

    /// The keeper's socket (beside the daemon's).
    pub fn keeper_socket(&self) -> PathBuf {
        self.socket.with_file_name("lockwardend-keeper.sock")
    }

    /// The pid in the last "started the keeper (pid N)" line of the log (read from the log, so
    /// that nothing connects to the keeper).
    pub fn logged_keeper_pid(&self) -> Option<u32> {
        self.log()
            .lines()
            .rev()
            .filter_map(|l| l.split("started the keeper (pid ").nth(1))
            .find_map(|rest| rest.split(')').next()?.parse::<u32>().ok())
    }

    /// Remember `pid` as a keeper of this daemon: killed on drop if it still is a keeper.
    pub fn track_keeper(&mut self, pid: u32) {
        if !self.keepers.contains(&pid) {
            self.keepers.push(pid);
        }
    }

    /// Plugin config pointing at this daemon, plus `extra` lines.
    pub fn plugin_conf(&self, extra: &str) -> String {
        format!("daemon_socket = \"{}\"\n{extra}\n", self.socket.display())
    }

    /// A C host using the plugin configured for this daemon.
    pub fn host(&self) -> super::host::Host {
        super::host::Host::spawn(&self.plugin_conf(""))
    }

    /// A C host using the plugin configured for this daemon, plus `extra` plugin config lines.
    pub fn host_with(&self, extra: &str) -> super::host::Host {
        super::host::Host::spawn(&self.plugin_conf(extra))
    }
}

/// How a [`TestDaemon`] starts its process (kept for [`TestDaemon::respawn`]).
struct Launch {
    bin: PathBuf,
    conf: PathBuf,
    socket: PathBuf,
    admin: PathBuf,
    pid_file: PathBuf,
    log: PathBuf,
    verbose: bool,
    env: Vec<(String, std::ffi::OsString)>,
    nofile: Option<(u64, u64)>,
    hostname: Option<&'static str>,
}

impl Launch {
    /// Spawn `BIN --config .. --socket .. --admin-socket .. --pid-file ..`, out of reach of any
    /// systemd variables of the test's own environment, stdout and stderr appended to the log.
    fn spawn(&self) -> Proc {
        let log = File::options()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("daemon log");
        let mut cmd = Command::new(&self.bin);
        cmd.arg("--config")
            .arg(&self.conf)
            .arg("--socket")
            .arg(&self.socket)
            .arg("--admin-socket")
            .arg(&self.admin)
            .arg("--pid-file")
            .arg(&self.pid_file)
            .env_remove("NOTIFY_SOCKET")
            .env_remove("LISTEN_PID")
            .env_remove("LISTEN_FDS")
            .env_remove("LISTEN_FDNAMES")
            .env_remove("JOURNAL_STREAM")
            .env_remove("INVOCATION_ID")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup daemon log"))
            .stderr(log);
        if self.verbose {
            cmd.arg("--verbose");
        }
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        if let Some((soft, hard)) = self.nofile {
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
        if let Some(host) = self.hostname {
            // SAFETY: unshare(2) and sethostname(2) only, between fork and exec: the child gets
            // a UTS namespace of its own and names it `host` (a 'static string).
            unsafe {
                cmd.pre_exec(move || {
                    if libc::unshare(libc::CLONE_NEWUTS) != 0
                        || libc::sethostname(host.as_ptr().cast(), host.len()) != 0
                    {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        // A sibling test thread may fork while a copy of the binary is still open for writing
        // in its child (until that child execs): ETXTBSY is transient, retry.
        let mut tries = 0;
        let child = loop {
            match cmd.spawn() {
                Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && tries < 100 => {
                    tries += 1;
                    std::thread::sleep(Duration::from_millis(20));
                }
                other => {
                    break other.unwrap_or_else(|e| {
                        panic!("spawning lockwardend {}: {e}", self.bin.display())
                    });
                }
            }
        };
        Proc(child)
    }
}

/// A graceful stop first (SIGTERM, at most 3 s: the daemon then tells an idle keeper to quit),
/// so suites leave no keeper behind; [`Proc`]'s drop kills whatever is left, then every
/// tracked keeper that still is one is killed.
impl Drop for TestDaemon {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "----- lockwardend log ({}) -----\n{}----- end lockwardend log -----",
                self.log.display(),
                self.log()
            );
        }
        if !self.keepers.is_empty() {
            // The keeper the daemon started last, too.
            if let Some(k) = self.logged_keeper_pid() {
                self.track_keeper(k);
            }
        }
        if self.running() {
            // SAFETY: kill(2) on the pid of our own, not yet reaped, child.
            unsafe { libc::kill(self.proc.pid() as i32, libc::SIGTERM) };
            let _ = self.proc.wait_for(Duration::from_secs(3));
        }
        let _ = self.proc.0.kill();
        let _ = self.proc.0.wait();
        for &k in &self.keepers {
            let comm = fs::read_to_string(format!("/proc/{k}/comm")).unwrap_or_default();
            if comm.trim() == "lockwardend-kpr" {
                // SAFETY: kill(2); the pid was checked to still be a lockwarden keeper.
                unsafe { libc::kill(k as libc::pid_t, libc::SIGKILL) };
            }
        }
        drop(self.tmp.take());
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
