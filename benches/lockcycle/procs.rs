//! The processes the benchmark drives: the two daemons (each in its own mount namespace) and C
//! test hosts loading either plugin. Every process is owned by a guard whose `Drop` kills it.

use std::fs::{self, File};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

/// Debian's lockd plugin and virtlockd.
pub const LOCKD_SO: &str = "/usr/lib/x86_64-linux-gnu/libvirt/lock-driver/lockd.so";
pub const VIRTLOCKD: &str = "/usr/sbin/virtlockd";
/// lockd.so (euid 0) looks for virtlockd at /run/libvirt/virtlockd-sock; the lockd side
/// bind-mounts a private directory over /run (so /run/libvirt need not exist on the host and
/// the host's own virtlockd, if any, is never touched).
pub const LOCKD_RUN: &str = "/run";

/// Which implementation a process belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Lockwarden,
    Lockd,
    /// benches/lockcycle/noop.c: a plugin that locks nothing (the host's own ceiling).
    Noop,
}

impl Side {
    pub const BOTH: [Side; 2] = [Side::Lockwarden, Side::Lockd];

    pub fn name(self) -> &'static str {
        match self {
            Side::Lockwarden => "lockwarden",
            Side::Lockd => "lockd",
            Side::Noop => "noop",
        }
    }

    fn tag(self) -> u32 {
        match self {
            Side::Lockwarden => 0x1111_1111,
            Side::Lockd => 0x2222_2222,
            Side::Noop => 0x3333_3333,
        }
    }
}

/// Paths of the artefacts under test.
pub struct Artefacts {
    pub host: PathBuf,
    pub plugin: PathBuf,
    pub daemon: PathBuf,
    /// LD_PRELOAD shim calling virInitialize() in the lockd hosts (see virinit.c).
    pub virinit: PathBuf,
}

/// Compile benches/lockcycle/virinit.c into `dir/virinit.so` with the system C compiler.
fn build_virinit(dir: &Path) -> Result<PathBuf, String> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/lockcycle/virinit.c");
    let out = dir.join("virinit.so");
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".to_string());
    let st = Command::new(&cc)
        .args([
            "-shared", "-fPIC", "-O2", "-Wall", "-Wextra", "-Werror", "-o",
        ])
        .arg(&out)
        .arg(&src)
        .arg("-ldl")
        .status()
        .map_err(|e| format!("running {cc} to build {src:?}: {e}"))?;
    if !st.success() {
        return Err(format!("{cc} failed to build {src:?}: {st}"));
    }
    Ok(out)
}

/// Compile benches/lockcycle/noop.c (the no-op lock driver) into `dir/noop.so` against the
/// project's lock-driver header.
pub fn build_noop(dir: &Path) -> Result<PathBuf, String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let src = root.join("benches/lockcycle/noop.c");
    let out = dir.join("noop.so");
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".to_string());
    let st = Command::new(&cc)
        .args([
            "-shared", "-fPIC", "-O2", "-Wall", "-Wextra", "-Werror", "-I",
        ])
        .arg(root.join("include"))
        .arg("-o")
        .arg(&out)
        .arg(&src)
        .status()
        .map_err(|e| format!("running {cc} to build {src:?}: {e}"))?;
    if !st.success() {
        return Err(format!("{cc} failed to build {src:?}: {st}"));
    }
    Ok(out)
}

impl Artefacts {
    pub fn find(tmp: &Path) -> Result<Artefacts, String> {
        let host = option_env!("LOCKWARDEN_TEST_HOST")
            .map(PathBuf::from)
            .ok_or("LOCKWARDEN_TEST_HOST unset: build.rs did not compile tests/c/host.c")?;
        let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
        let deps = exe.parent().ok_or("bench binary has no parent directory")?;
        // cargo leaves the cdylib next to the bench binary (deps/) and, for top-level builds,
        // one level up.
        let plugin = [
            deps.join("liblockwarden.so"),
            deps.join("../liblockwarden.so"),
        ]
        .into_iter()
        .find(|p| p.exists())
        .ok_or_else(|| format!("liblockwarden.so not found in {deps:?} or its parent"))?;
        let daemon = PathBuf::from(env!("CARGO_BIN_EXE_lockwardend"));
        for (what, p) in [
            ("C test host", host.as_path()),
            ("lockwarden plugin", plugin.as_path()),
            ("lockwardend", daemon.as_path()),
            (
                "Debian's lockd plugin (apt install libvirt-daemon-driver-lxc or libvirt-daemon)",
                Path::new(LOCKD_SO),
            ),
            (
                "virtlockd (apt install libvirt-daemon-system)",
                Path::new(VIRTLOCKD),
            ),
            ("/run", Path::new(LOCKD_RUN)),
        ] {
            if !p.exists() {
                return Err(format!("{what} is missing: {p:?}"));
            }
        }
        let virinit = build_virinit(tmp)?;
        Ok(Artefacts {
            host,
            plugin,
            daemon,
            virinit,
        })
    }
}

/// `unshare -m` (private propagation) running `sh -c SCRIPT sh ARGS...`.
fn in_private_ns(script: &str, args: &[&std::ffi::OsStr]) -> Command {
    let mut c = Command::new("unshare");
    c.args([
        "--mount",
        "--propagation",
        "private",
        "--",
        "sh",
        "-c",
        script,
        "sh",
    ]);
    c.args(args);
    c
}

/// Bind `$1` over /run, then exec the rest of the arguments.
const BIND_RUNDIR_EXEC: &str = "mount --bind \"$1\" /run && shift && exec \"$@\"";

fn wait_socket(child: &mut Child, socket: &Path, log: &Path, what: &str) -> Result<(), String> {
    let t0 = Instant::now();
    loop {
        if UnixStream::connect(socket).is_ok() {
            return Ok(());
        }
        if let Ok(Some(st)) = child.try_wait() {
            let log = fs::read_to_string(log).unwrap_or_default();
            return Err(format!(
                "{what} exited before serving {socket:?}: {st}\n{log}"
            ));
        }
        if t0.elapsed() > Duration::from_secs(20) {
            return Err(format!(
                "{what} did not accept connections on {socket:?} within 20 s"
            ));
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// A running daemon (lockwardend or virtlockd) in its own mount namespace.
pub struct Daemon {
    pub side: Side,
    pub dir: PathBuf,
    pub socket: PathBuf,
    pub log: PathBuf,
    child: Child,
}

impl Daemon {
    /// lockwardend with private sockets (default settings, log level info) in `dir`.
    pub fn lockwardend(a: &Artefacts, dir: &Path) -> Result<Daemon, String> {
        fs::create_dir_all(dir).map_err(|e| format!("mkdir {dir:?}: {e}"))?;
        let socket = dir.join("lockwardend.sock");
        let conf = dir.join("lockwardend.conf");
        let log = dir.join("lockwardend.log");
        fs::write(&conf, "# benchmark daemon: defaults\n").map_err(|e| format!("{conf:?}: {e}"))?;
        let logf = File::create(&log).map_err(|e| format!("{log:?}: {e}"))?;
        let mut cmd = in_private_ns("exec \"$@\"", &[]);
        cmd.arg(&a.daemon)
            .arg("--config")
            .arg(&conf)
            .arg("--socket")
            .arg(&socket)
            .arg("--admin-socket")
            .arg(dir.join("lockwardend-admin.sock"))
            .arg("--pid-file")
            .arg(dir.join("lockwardend.pid"));
        Daemon::spawn(Side::Lockwarden, cmd, dir, socket, log, logf)
    }

    /// virtlockd with `dir/run` bound over /run in a private mount namespace, so its sockets
    /// are `dir/run/libvirt/virtlockd-sock` and `-admin-sock` and nothing touches the host's.
    pub fn virtlockd(dir: &Path) -> Result<Daemon, String> {
        let run = dir.join("run");
        let libvirt = run.join("libvirt");
        fs::create_dir_all(&libvirt).map_err(|e| format!("mkdir {libvirt:?}: {e}"))?;
        fs::set_permissions(&libvirt, fs::Permissions::from_mode(0o700))
            .map_err(|e| format!("chmod {libvirt:?}: {e}"))?;
        let conf = dir.join("virtlockd.conf");
        let log = dir.join("virtlockd.log");
        fs::write(
            &conf,
            // max_clients: every VM keeps one connection, and the default (1024) would stop
            // virtlockd accepting (and lockd.so waiting without a timeout) at 1,024 VMs.
            "# benchmark daemon: defaults, log to stderr, room for 4,096 VMs\n\
             log_outputs = \"3:stderr\"\nmax_clients = 4096\n",
        )
        .map_err(|e| format!("{conf:?}: {e}"))?;
        let logf = File::create(&log).map_err(|e| format!("{log:?}: {e}"))?;
        let pidf = dir.join("virtlockd.pid");
        let cmd = in_private_ns(
            BIND_RUNDIR_EXEC,
            &[
                run.as_os_str(),
                VIRTLOCKD.as_ref(),
                "-f".as_ref(),
                conf.as_os_str(),
                "-p".as_ref(),
                pidf.as_os_str(),
            ],
        );
        Daemon::spawn(
            Side::Lockd,
            cmd,
            dir,
            libvirt.join("virtlockd-sock"),
            log,
            logf,
        )
    }

    fn spawn(
        side: Side,
        mut cmd: Command,
        dir: &Path,
        socket: PathBuf,
        log: PathBuf,
        logf: File,
    ) -> Result<Daemon, String> {
        let errf = logf.try_clone().map_err(|e| format!("dup log: {e}"))?;
        let child = cmd
            .env_remove("NOTIFY_SOCKET")
            .env_remove("LISTEN_FDS")
            .env_remove("LISTEN_PID")
            .env_remove("LISTEN_FDNAMES")
            .stdin(Stdio::null())
            .stdout(logf)
            .stderr(errf)
            .spawn()
            .map_err(|e| format!("spawning the {} daemon: {e}", side.name()))?;
        let mut d = Daemon {
            side,
            dir: dir.to_path_buf(),
            socket,
            log,
            child,
        };
        wait_socket(&mut d.child, &d.socket, &d.log, side.name())?;
        Ok(d)
    }

    /// The daemon's pid: `unshare` and `sh` exec it, so it is our child's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Resident set size in KiB (/proc/PID/status VmRSS) of the daemon and of every helper
    /// process it started (lockwardend's lease keeper): `(daemon, helpers)`.
    pub fn rss_kib(&self) -> Result<(u64, u64), String> {
        let exe = fs::read_link(format!("/proc/{}/exe", self.pid())).unwrap_or_default();
        let want = match self.side {
            Side::Lockwarden => "lockwardend",
            Side::Lockd => "virtlockd",
            Side::Noop => return Err("the no-op plugin has no daemon".into()),
        };
        if !exe.to_string_lossy().ends_with(want) {
            return Err(format!("pid {} is {exe:?}, not {want}", self.pid()));
        }
        let mut helpers = 0;
        for pid in self.helpers() {
            helpers += vm_rss(pid).unwrap_or(0);
        }
        Ok((vm_rss(self.pid())?, helpers))
    }

    /// Open descriptors (entries of /proc/PID/fd) of the daemon and of its helpers (the
    /// keeper, found as for `rss_kib`): `(daemon, helpers)`.
    pub fn fd_count(&self) -> Result<(usize, usize), String> {
        let count = |pid: u32| {
            let p = format!("/proc/{pid}/fd");
            fs::read_dir(&p)
                .map(|d| d.count())
                .map_err(|e| format!("{p}: {e}"))
        };
        let mut helpers = 0;
        for pid in self.helpers() {
            helpers += count(pid).unwrap_or(0);
        }
        Ok((count(self.pid())?, helpers))
    }

    /// Proportional set size in KiB (/proc/PID/smaps_rollup Pss) of the daemon plus its
    /// helpers: pages shared between processes are divided among them, so the daemon and the
    /// keeper (the same binary) count their common pages (program text, libc) once between them, where the sum of their VmRSS counts them twice.
    pub fn pss_kib(&self) -> Result<u64, String> {
        let mut total = pss(self.pid())?;
        for pid in self.helpers() {
            total += pss(pid).unwrap_or(0);
        }
        Ok(total)
    }

    /// The daemon and its helpers: the processes whose CPU time [`settle`] watches.
    pub fn pids(&self) -> Vec<u32> {
        let mut v = vec![self.pid()];
        v.extend(self.helpers());
        v
    }

    /// The processes lockwardend started that stay with it: its keeper, which it starts as
    /// `lockwardend --internal-keeper ...` (the same binary, exec'd; re-parented to init).
    pub fn helpers(&self) -> Vec<u32> {
        let me = self.pid();
        let Ok(exe) = fs::read_link(format!("/proc/{me}/exe")) else {
            return Vec::new();
        };
        let Ok(dir) = fs::read_dir("/proc") else {
            return Vec::new();
        };
        dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
            .filter(|&p| p != me && is_helper(p, &exe))
            .collect()
    }
}

/// Whether `pid` runs `exe` as a lockwarden keeper.
fn is_helper(pid: u32, exe: &std::path::Path) -> bool {
    fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|e| e == exe)
        && fs::read(format!("/proc/{pid}/cmdline"))
            .is_ok_and(|c| c.split(|b| *b == 0).nth(1) == Some(b"--internal-keeper".as_slice()))
}

/// Pss of `pid` in KiB.
fn pss(pid: u32) -> Result<u64, String> {
    proc_kib(&format!("/proc/{pid}/smaps_rollup"), "Pss:")
}

/// VmRSS of `pid` in KiB.
fn vm_rss(pid: u32) -> Result<u64, String> {
    proc_kib(&format!("/proc/{pid}/status"), "VmRSS:")
}

/// The "`key` N kB" line of /proc file `p`, in KiB.
fn proc_kib(p: &str, key: &str) -> Result<u64, String> {
    let s = fs::read_to_string(p).map_err(|e| format!("{p}: {e}"))?;
    s.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| format!("no {key} in {p}"))
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let helpers = self.helpers();
        let exe = fs::read_link(format!("/proc/{}/exe", self.pid())).unwrap_or_default();
        // SAFETY: kill(2) on the pid of our own child, which is not reaped yet.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let t0 = Instant::now();
        let mut exited = false;
        while t0.elapsed() < Duration::from_secs(5) {
            if let Ok(Some(_)) = self.child.try_wait() {
                exited = true;
                break;
            }
            thread::sleep(Duration::from_millis(10));
        }
        if !exited {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        // A helper the daemon started (the keeper) stops by itself when it holds nothing; give
        // it a moment, then end it by pid if it is still a keeper of this binary.
        let t0 = Instant::now();
        for pid in helpers {
            while t0.elapsed() < Duration::from_secs(2) && is_helper(pid, &exe) {
                thread::sleep(Duration::from_millis(10));
            }
            if is_helper(pid, &exe) {
                // SAFETY: kill(2) on the keeper our daemon started, identified by its binary
                // and command line just now.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            }
        }
    }
}

static VM_COUNTER: AtomicU32 = AtomicU32::new(1);

/// A domain identity: `NAME UUID ID` as the host's commands take them.
#[derive(Clone, Debug)]
pub struct Vm {
    pub head: String,
}

impl Vm {
    pub fn new(side: Side, label: &str) -> Vm {
        let n = VM_COUNTER.fetch_add(1, Ordering::Relaxed);
        Vm {
            head: format!(
                "bench-{label}-{n} {:08x}-0000-4000-8000-{:012x} {n}",
                side.tag(),
                n
            ),
        }
    }
}

/// `disk:PATH` with the host's %-escaping.
pub fn disk_token(p: &Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    let mut s = String::from("disk:");
    for &b in p.as_os_str().as_bytes() {
        if b.is_ascii_graphic() && b != b'%' {
            s.push(b as char);
        } else {
            s.push_str(&format!("%{b:02X}"));
        }
    }
    s
}

/// A C test host with one plugin loaded; the lockd one runs in a mount namespace where the
/// virtlockd's private run directory is /run/libvirt.
pub struct Host {
    pub side: Side,
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
    /// Owner processes (`start` children) not reaped yet; killed on drop.
    owners: Vec<i32>,
}

impl Host {
    pub fn spawn(a: &Artefacts, d: &Daemon, log: &Path) -> Result<Host, String> {
        let logf = File::options()
            .create(true)
            .append(true)
            .open(log)
            .map_err(|e| format!("{log:?}: {e}"))?;
        let mut cmd = match d.side {
            Side::Lockwarden => {
                let conf = d.dir.join("qemu-lockwarden.conf");
                fs::write(&conf, format!("daemon_socket = {:?}\n", d.socket))
                    .map_err(|e| format!("{conf:?}: {e}"))?;
                let mut c = Command::new(&a.host);
                c.arg(&a.plugin).arg(conf);
                c
            }
            Side::Noop => return Err("a no-op host has no daemon: use Host::noop".into()),
            Side::Lockd => {
                // qemu-lockd.conf absent = defaults: auto_disk_leases, direct locking.
                let conf = d.dir.join("qemu-lockd.conf");
                in_private_ns(
                    "mount --bind \"$1\" /run && LD_PRELOAD=\"$2\" && export LD_PRELOAD \
                     && shift 2 && exec \"$@\"",
                    &[
                        d.dir.join("run").as_os_str(),
                        a.virinit.as_os_str(),
                        a.host.as_os_str(),
                        LOCKD_SO.as_ref(),
                        conf.as_os_str(),
                    ],
                )
            }
        };
        Host::launch(cmd.stderr(logf), d.side)
    }

    /// A host with the no-op plugin `noop` (from `build_noop`), no configuration file.
    pub fn noop(a: &Artefacts, noop: &Path, log: &Path) -> Result<Host, String> {
        let logf = File::options()
            .create(true)
            .append(true)
            .open(log)
            .map_err(|e| format!("{log:?}: {e}"))?;
        let mut cmd = Command::new(&a.host);
        cmd.arg(noop).arg("@null").stderr(logf);
        Host::launch(&mut cmd, Side::Noop)
    }

    /// Spawn `cmd` (stderr already set) and wait for its READY line.
    fn launch(cmd: &mut Command, side: Side) -> Result<Host, String> {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| format!("spawning a {} host: {e}", side.name()))?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().ok_or("host stdout")?;
        let mut h = Host {
            side,
            child,
            stdin,
            stdout: BufReader::new(stdout),
            owners: Vec::new(),
        };
        let ready = h.line()?;
        if ready != "READY" {
            return Err(format!("{} host did not initialise: {ready}", side.name()));
        }
        Ok(h)
    }

    fn line(&mut self) -> Result<String, String> {
        let mut l = String::new();
        match self.stdout.read_line(&mut l) {
            Ok(0) => Err(format!("{} host closed its stdout", self.side.name())),
            Ok(_) => Ok(l.trim_end_matches('\n').to_string()),
            Err(e) => Err(format!("{} host: {e}", self.side.name())),
        }
    }

    /// One command, one reply line; `Err` unless the reply starts with OK.
    pub fn cmd(&mut self, line: &str) -> Result<String, String> {
        let side = self.side.name();
        let stdin = self.stdin.as_mut().ok_or("host stdin closed")?;
        stdin
            .write_all(line.as_bytes())
            .and_then(|_| stdin.write_all(b"\n"))
            .and_then(|_| stdin.flush())
            .map_err(|e| format!("{side} host: write: {e}"))?;
        let reply = self.line()?;
        if reply == "OK" {
            Ok(String::new())
        } else if let Some(rest) = reply.strip_prefix("OK ") {
            Ok(rest.to_string())
        } else {
            let short: String = line.chars().take(160).collect();
            Err(format!("{side} host: `{short}` -> {reply}"))
        }
    }

    /// `start` (registration in a forked child that then execs sleep): the owner pid.
    pub fn start(&mut self, vm: &Vm, disks: &str) -> Result<i32, String> {
        let r = self.cmd(&format!("start {} {disks}", vm.head))?;
        let pid: i32 = r
            .trim()
            .parse()
            .map_err(|_| format!("start reply without a pid: {r:?}"))?;
        self.owners.push(pid);
        Ok(pid)
    }

    pub fn acquire(&mut self, vm: &Vm, pid: i32, disks: &str) -> Result<(), String> {
        self.cmd(&format!("acquire {} {pid} {disks}", vm.head))
            .map(drop)
    }

    pub fn release(&mut self, vm: &Vm, pid: i32, disks: &str) -> Result<(), String> {
        self.cmd(&format!("release {} {pid} {disks}", vm.head))
            .map(drop)
    }

    /// Owner exit: SIGKILL and reap (libvirt reaps QEMU).
    pub fn kill_owner(&mut self, pid: i32) -> Result<(), String> {
        self.cmd(&format!("kill {pid} 9"))?;
        self.cmd(&format!("wait {pid}"))?;
        self.owners.retain(|&p| p != pid);
        Ok(())
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        for &pid in &self.owners {
            // SAFETY: kill(2) on an owner process this host started and has not reaped (so
            // the pid cannot have been reused).
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        self.stdin = None; // EOF: the host exits
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(2) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            thread::sleep(Duration::from_millis(5));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// CPU time so far, in nanoseconds, of every thread of `pids` (`/proc/PID/task/TID/schedstat`,
/// first field: time spent on a CPU).
fn cpu_ns(pids: &[u32]) -> u64 {
    let mut total = 0;
    for pid in pids {
        let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
            continue;
        };
        for t in tasks.flatten() {
            let Ok(text) = fs::read_to_string(t.path().join("schedstat")) else {
                continue;
            };
            total += text
                .split_whitespace()
                .next()
                .and_then(|n| n.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    total
}

/// Wait until the processes `pids` have used no CPU for 300 us in a row, at most 20 ms.
///
/// Why: the latency rows interleave the two sides sample by sample, and a daemon may go on
/// working after it answered (virtlockd re-scans its handles, lockwardend's keeper files the
/// descriptors it was sent). On two cores that work competes with the other side's next sample
/// and made it slower by an amount that grew with the *other* daemon's load (docs/benchmarks.md,
/// issue 17). Each sample therefore starts once the other side is quiet; a side's own
/// after-work still counts against it (it is never waited for).
pub fn settle(pids: &[u32]) {
    let end = Instant::now() + Duration::from_millis(20);
    let mut last = cpu_ns(pids);
    while Instant::now() < end {
        thread::sleep(Duration::from_micros(300));
        let now = cpu_ns(pids);
        if now == last {
            return;
        }
        last = now;
    }
    UNSETTLED.fetch_add(1, Ordering::Relaxed);
}

/// How many times [`settle`] gave up (the other side stayed busy for 20 ms): printed with the
/// latency rows, since such a sample ran next to a busy daemon.
pub static UNSETTLED: AtomicU32 = AtomicU32::new(0);
