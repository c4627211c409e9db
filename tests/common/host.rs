//! The one C-host wrapper of the suites: `tests/c/host.c` loading the real plugin through
//! dlopen, driven line by line over its stdin and stdout.

use super::wait::poll;
use super::{
    CMD_TIMEOUT, Reply, Vm, chmod, dump_log, esc_path, host_path, plugin_path, run_as, tempdir,
};
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::thread;
use std::time::Duration;

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
        Host::spawn_prepared(conf_text, uid, &[])
    }

    /// Spawn a host in its own mount namespace where each `(source dir, target dir)` is
    /// bind-mounted over the target (read-only as far as the host can tell): the plugin runs
    /// the tools it finds at fixed paths (`/sbin/lvs`, `/lib/udev/scsi_id`), so this is how a
    /// test gives it fakes without touching the machine. Needs root. Panics unless READY.
    pub fn spawn_with_binds(conf_text: &str, binds: &[(&Path, &Path)]) -> Host {
        let h = Host::spawn_prepared(conf_text, None, binds);
        assert_eq!(
            h.ready_line, "READY",
            "host did not initialise the plugin: {}",
            h.ready_line
        );
        h
    }

    fn spawn_prepared(conf_text: &str, uid: Option<u32>, binds: &[(&Path, &Path)]) -> Host {
        use std::ffi::CString;
        use std::os::unix::ffi::OsStrExt;
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
            .arg(&conf)
            .stdin(Stdio::piped())
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
        };
        h.ready_line = h.read_line("READY");
        h
    }

    fn read_line(&mut self, what: &str) -> String {
        match self.lines.recv_timeout(CMD_TIMEOUT) {
            Ok(l) => l,
            Err(RecvTimeoutError::Timeout) => {
                panic!("host gave no answer to {what:?} within {CMD_TIMEOUT:?} (hang)")
            }
            Err(RecvTimeoutError::Disconnected) => {
                let st = self
                    .child
                    .as_mut()
                    .and_then(|c| c.try_wait().ok().flatten());
                panic!("host closed its stdout while answering {what:?} (exit status {st:?})")
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
