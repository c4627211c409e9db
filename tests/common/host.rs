//! The one C-host wrapper of the suites: `tests/c/host.c` loading the real plugin through
//! dlopen, driven line by line over its stdin and stdout.

use super::wait::poll;
use super::{
    CMD_TIMEOUT, Reply, Vm, chmod, dump_log, esc_path, host_path, plugin_path, run_as, tempdir,
};
use std::ffi::OsStr;
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::thread;
use std::time::Duration;

/// How to start a [`Host`] beyond the defaults.
#[derive(Default)]
pub struct HostOpts<'a> {
    /// The config argument as given (a path that need not exist, or a token such as `@null`)
    /// instead of the config text written to `DIR/qemu-lockwarden.conf`.
    pub conf_arg: Option<&'a OsStr>,
    /// Run as this uid and gid (the host's directory, config and log are made reachable).
    pub uid: Option<u32>,
    /// `(source dir, target dir)` bind mounts in a mount namespace of the host's own.
    pub binds: &'a [(&'a Path, &'a Path)],
    /// Extra environment variables.
    pub env: &'a [(&'a str, &'a str)],
    /// `--no-init`: load the plugin without calling its drvInit.
    pub no_init: bool,
    /// How long one command may take before the harness declares a hang (default
    /// [`CMD_TIMEOUT`]).
    pub reply_timeout: Option<Duration>,
}

/// The C test host driving the real plugin.
pub struct Host {
    pub dir: tempfile::TempDir,
    pub conf: PathBuf,
    pub log: PathBuf,
    child: Option<Child>,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    /// Owner pids started by this host and not reaped yet (the host is their parent, so the pid
    /// cannot be reused while they are listed here).
    owners: Vec<i32>,
    pub ready_line: String,
    reply_timeout: Duration,
}

impl Host {
    /// Spawn a host with `conf_text` as the plugin config; panics unless it prints READY.
    pub fn spawn(conf_text: &str) -> Host {
        let h = Host::spawn_as(conf_text, None);
        assert_eq!(
            h.ready_line, "READY",
            "host did not initialise the plugin: {}",
            h.ready_line
        );
        h
    }

    /// Spawn a host, optionally as another uid/gid; returns whatever its first line was.
    pub fn spawn_as(conf_text: &str, uid: Option<u32>) -> Host {
        Host::launch(
            conf_text,
            HostOpts {
                uid,
                ..HostOpts::default()
            },
        )
    }

    /// Spawn a host in its own mount namespace where each `(source dir, target dir)` is
    /// bind-mounted over the target (read-only as far as the host can tell): the plugin runs
    /// the tools it finds at fixed paths (`/sbin/lvs`, `/lib/udev/scsi_id`), so this is how a
    /// test gives it fakes without touching the machine. Needs root. Panics unless READY.
    pub fn spawn_with_binds(conf_text: &str, binds: &[(&Path, &Path)]) -> Host {
        let h = Host::launch(
            conf_text,
            HostOpts {
                binds,
                ..HostOpts::default()
            },
        );
        assert_eq!(
            h.ready_line, "READY",
            "host did not initialise the plugin: {}",
            h.ready_line
        );
        h
    }

    /// Spawn a host with `conf_text` as the plugin config (unless `opts.conf_arg` names one);
    /// returns whatever its first line was.
    pub fn launch(conf_text: &str, opts: HostOpts<'_>) -> Host {
        use std::ffi::CString;
        use std::os::unix::ffi::OsStrExt;
        let HostOpts {
            conf_arg,
            uid,
            binds,
            env,
            no_init,
            reply_timeout,
        } = opts;
        let binds: Vec<(CString, CString)> = binds
            .iter()
            .map(|(src, dst)| {
                (
                    CString::new(src.as_os_str().as_bytes()).expect("bind source path"),
                    CString::new(dst.as_os_str().as_bytes()).expect("bind target path"),
                )
            })
            .collect();
        let dir = tempdir();
        let conf = dir.path().join("qemu-lockwarden.conf");
        fs::write(&conf, conf_text).expect("write plugin conf");
        let log = dir.path().join("host.log");
        let logf = fs::File::create(&log).expect("create host log");
        if uid.is_some() {
            chmod(dir.path(), 0o755);
            chmod(&conf, 0o644);
            chmod(&log, 0o666);
        }
        let mut cmd = Command::new(host_path());
        cmd.arg(plugin_path())
            .arg(conf_arg.unwrap_or(conf.as_os_str()));
        if no_init {
            cmd.arg("--no-init");
        }
        cmd.env_remove("LOCKWARDEN_TEST_PANIC");
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(logf);
        if !binds.is_empty() {
            // SAFETY: only async-signal-safe system calls (unshare, mount) between fork and
            // exec, on C strings built before the fork.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::unshare(libc::CLONE_NEWNS) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    // Nothing mounted here propagates back to the machine.
                    if libc::mount(
                        c"none".as_ptr(),
                        c"/".as_ptr(),
                        std::ptr::null(),
                        libc::MS_REC | libc::MS_PRIVATE,
                        std::ptr::null(),
                    ) != 0
                    {
                        return Err(std::io::Error::last_os_error());
                    }
                    for (src, dst) in &binds {
                        if libc::mount(
                            src.as_ptr(),
                            dst.as_ptr(),
                            std::ptr::null(),
                            libc::MS_BIND,
                            std::ptr::null(),
                        ) != 0
                        {
                            return Err(std::io::Error::last_os_error());
                        }
                    }
                    Ok(())
                });
            }
        }
        if let Some(uid) = uid {
            run_as(&mut cmd, uid);
        }
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {}: {e}", host_path().display()));
        let stdout = child.stdout.take().expect("host stdout");
        let stdin = child.stdin.take();
        let (tx, rx) = channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                match line {
                    Ok(l) => {
                        if tx.send(l).is_err() {
                            break;
                        }
                    }
                    Err(_) => break,
                }
            }
        });
        let mut h = Host {
            dir,
            conf,
            log,
            child: Some(child),
            stdin,
            lines: rx,
            owners: Vec::new(),
            ready_line: String::new(),
            reply_timeout: reply_timeout.unwrap_or(CMD_TIMEOUT),
        };
        h.ready_line = h.read_line("READY");
        h
    }

    /// Wait (bounded by the reply timeout) for the host process to exit by itself, as after a
    /// failed drvInit; panics if it does not.
    pub fn wait_exit(&mut self) -> std::process::ExitStatus {
        let child = self.child.as_mut().expect("host process");
        poll(self.reply_timeout, || child.try_wait().expect("try_wait"))
            .map(|(st, _)| st)
            .unwrap_or_else(|| panic!("the host did not exit; stderr: {}", self.stderr_text()))
    }

    /// The host's stderr so far.
    pub fn stderr_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn read_line(&mut self, what: &str) -> String {
        let what: String = what.chars().take(200).collect();
        match self.lines.recv_timeout(self.reply_timeout) {
            Ok(l) => l,
            Err(RecvTimeoutError::Timeout) => panic!(
                "host gave no answer to {what:?} within {:?} (hang); stderr: {}",
                self.reply_timeout,
                self.stderr_text()
            ),
            Err(RecvTimeoutError::Disconnected) => {
                let st = self
                    .child
                    .as_mut()
                    .and_then(|c| c.try_wait().ok().flatten());
                panic!(
                    "host closed its stdout while answering {what:?} (exit status {st:?}); \
                     stderr: {}",
                    self.stderr_text()
                )
            }
        }
    }

    /// Send one command line, return the raw reply line.
    pub fn raw(&mut self, line: &str) -> String {
        let stdin = self.stdin.as_mut().expect("host stdin open");
        writeln!(stdin, "{line}")
            .and_then(|_| stdin.flush())
            .unwrap_or_else(|e| panic!("writing {line:?} to the host: {e}"));
        self.read_line(line)
    }

    /// Run `line`, expect `OK`, return what follows it.
    pub fn ok(&mut self, line: &str) -> String {
        let r = self.raw(line);
        match r.strip_prefix("OK") {
            Some(rest) => rest.trim_start().to_string(),
            None => panic!(
                "`{}` failed: {r}",
                line.chars().take(200).collect::<String>()
            ),
        }
    }

    /// Run `line`, expect `ERR`, return its parts.
    pub fn err(&mut self, line: &str) -> LvError {
        let r = self.raw(line);
        parse_err(&r).unwrap_or_else(|| {
            panic!(
                "`{}` should have failed: {r}",
                line.chars().take(200).collect::<String>()
            )
        })
    }

    /// libvirt's domain start of `vm` at its own pid: a forked child registers and stays alive
    /// as its "QEMU" (killed on drop); returns that pid.
    pub fn start_owner(&mut self, vm: &Vm, res: &[String]) -> i32 {
        let pid = self.ok(format!("start {} {}", vm.head(), res.join(" ")).trim_end());
        let pid: i32 = pid.parse().expect("start replies OK <pid>");
        self.owners.push(pid);
        pid
    }

    /// `acquire` for `vm` as owner pid `pid`; the raw reply line.
    pub fn acquire_as(&mut self, vm: &Vm, pid: i32, res: &[String]) -> String {
        self.raw(format!("acquire {} {pid} {}", vm.head(), res.join(" ")).trim_end())
    }

    /// `release` for `vm` as owner pid `pid`; the raw reply line.
    pub fn release_as(&mut self, vm: &Vm, pid: i32, res: &[String]) -> String {
        self.raw(format!("release {} {pid} {}", vm.head(), res.join(" ")).trim_end())
    }

    /// The host still answers (it did not abort): `layout` gives the driver table it loaded.
    pub fn assert_alive(&mut self) {
        assert_eq!(self.ok("layout"), "size=72 version=1000000 flags=0 fns=8");
    }

    pub fn cmd(&mut self, line: &str) -> Reply {
        let r = self.raw(line);
        Reply::parse(&r)
    }

    /// libvirt's domain start: forks an owner that registers and then sleeps holding its
    /// lifetime handle. Returns the reply; on OK `vm.pid` is set.
    pub fn try_start(&mut self, vm: &mut Vm, res: &[String]) -> Reply {
        let line = format!("start {} {}", vm.head(), res.join(" "));
        let r = self.cmd(line.trim_end());
        if let Reply::Ok(pid) = &r {
            let pid: i32 = pid
                .trim()
                .parse()
                .unwrap_or_else(|_| panic!("start: `OK <pid>` expected, got OK {pid:?}"));
            vm.pid = pid;
            self.owners.push(pid);
        }
        r
    }

    /// libvirt's not-paused start (`start-running`): the forked owner takes `res` itself on
    /// the connection it keeps as its lifetime handle, and closes that handle (while it keeps
    /// running) once the file `gate` is removed. On OK `vm.pid` is set.
    pub fn try_start_running(&mut self, vm: &mut Vm, gate: &Path, res: &[String]) -> Reply {
        let line = format!(
            "start-running {} {} {}",
            vm.head(),
            esc_path(gate),
            res.join(" ")
        );
        let r = self.cmd(line.trim_end());
        if let Reply::Ok(pid) = &r {
            let pid: i32 = pid
                .trim()
                .parse()
                .unwrap_or_else(|_| panic!("start-running: `OK <pid>` expected, got OK {pid:?}"));
            vm.pid = pid;
            self.owners.push(pid);
        }
        r
    }

    /// Start an owner (no resources given at start) and panic on failure.
    pub fn start(&mut self, label: &str) -> Vm {
        let mut vm = Vm::new(label);
        let r = self.try_start(&mut vm, &[]);
        r.expect_ok(&format!("start of {}", vm.name));
        vm
    }

    pub fn acquire(&mut self, vm: &Vm, res: &[String]) -> Reply {
        let line = format!("acquire {} {} {}", vm.head(), vm.pid, res.join(" "));
        self.cmd(line.trim_end())
    }

    pub fn acquire_action(&mut self, action: &str, vm: &Vm, res: &[String]) -> Reply {
        let line = format!(
            "acquire-action {action} {} {} {}",
            vm.head(),
            vm.pid,
            res.join(" ")
        );
        self.cmd(line.trim_end())
    }

    pub fn release(&mut self, vm: &Vm, res: &[String]) -> Reply {
        let line = format!("release {} {} {}", vm.head(), vm.pid, res.join(" "));
        self.cmd(line.trim_end())
    }

    pub fn inquire(&mut self, vm: &Vm, res: &[String]) -> Reply {
        let line = format!("inquire {} {} {}", vm.head(), vm.pid, res.join(" "));
        self.cmd(line.trim_end())
    }

    /// `kill PID SIGNAL`.
    pub fn kill(&mut self, pid: i32, sig: i32) {
        self.cmd(&format!("kill {pid} {sig}"))
            .expect_ok(&format!("kill {pid} {sig}"));
    }

    /// `alive PID`: true while the process runs (the host reaps it once dead).
    pub fn alive(&mut self, pid: i32) -> bool {
        let r = self.cmd(&format!("alive {pid}"));
        let v = r.expect_ok(&format!("alive {pid}")).trim().to_string();
        match v.as_str() {
            "1" => true,
            "0" => {
                self.owners.retain(|&p| p != pid);
                false
            }
            other => panic!("alive {pid}: expected OK 0 or OK 1, got OK {other:?}"),
        }
    }

    /// Poll until `pid` has died; returns how long it took.
    pub fn wait_dead(&mut self, pid: i32, bound: Duration) -> Option<Duration> {
        poll(bound, || (!self.alive(pid)).then_some(())).map(|((), took)| took)
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        if thread::panicking() {
            dump_log("C host stderr", &self.log);
        }
        // Owners first: the host has not reaped them, so these pids are still theirs.
        for &pid in &self.owners {
            // SAFETY: kill(2) on an unreaped child of our child process.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        drop(self.stdin.take()); // EOF: the host exits.
        if let Some(mut child) = self.child.take() {
            let exited = poll(Duration::from_secs(3), || match child.try_wait() {
                Ok(None) => None,
                Ok(Some(_)) => Some(true),
                Err(_) => Some(false),
            });
            if !matches!(exited, Some((true, _))) {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

/// A libvirt error as the host reports it (`ERR <code> <domain> <message>`).
#[derive(Debug)]
pub struct LvError {
    pub code: i32,
    pub domain: i32,
    pub msg: String,
}

/// The parts of an `ERR` reply line; None for any other line.
pub fn parse_err(reply: &str) -> Option<LvError> {
    let rest = reply.strip_prefix("ERR ")?;
    let mut it = rest.splitn(3, ' ');
    Some(LvError {
        code: it.next()?.parse().ok()?,
        domain: it.next()?.parse().ok()?,
        msg: it.next().unwrap_or_default().to_string(),
    })
}

impl LvError {
    /// A lockwarden error: domain VIR_FROM_LOCKING and the given code, its message naming
    /// every one of `needles`.
    #[track_caller]
    pub fn expect(&self, code: i32, needles: &[&str]) {
        assert_eq!(
            (self.code, self.domain),
            (code, super::DOMAIN_LOCKING),
            "wrong libvirt code/domain: {self:?}"
        );
        for n in needles {
            assert!(self.msg.contains(n), "{n:?} not in {:?}", self.msg);
        }
    }
}
