//! The admin CLI `lockwarden`: who holds what, here and across the shared lockspace.
//!
//! Thin `main` (src/bin/lockwarden.rs) calls [`run`]; each subcommand is a module. Exit codes
//! are part of the interface (documented in lockwarden(1) and docs/holders.md):
//! 0 success (`who`: it named holders), 1 a check failed (`who`: the disk is free),
//! 2 usage error, 3 the daemon cannot be reached or answered with an error (`who`: the disk
//! could not be examined). `audit` and `adopt`: 0 every running VM is (now) protected, 1 at
//! least one is exposed or was refused, 2 usage, 3 lockwardend or libvirt's status files could
//! not be read.

mod adopt;
mod audit;
mod doctor;
mod fenced;
// metrics (issue 18)
mod metrics;
mod running;
mod table;
mod who;

use crate::protocol::{self, LeaseInfo, Request, Response, StatusInfo};
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

/// Exit code: all good.
pub const EXIT_OK: u8 = 0;
/// Exit code: a check failed / something is held.
pub const EXIT_PROBLEM: u8 = 1;
/// Exit code: bad command line.
pub const EXIT_USAGE: u8 = 2;
/// Exit code: daemon unreachable or failing.
pub const EXIT_DAEMON: u8 = 3;
/// Exit code: `status` reached the daemon but could not learn whether leases were lost (the
/// `lost` query failed): never reported as "all is well".
pub const EXIT_UNKNOWN: u8 = 4;

const USAGE: &str = "\
usage: lockwarden [--admin-socket PATH] [--timeout-ms N] COMMAND [ARG] [--json]

commands:
  status            is lockwardend up; version, owners, leases, clients
  list              every lease this host's lockwardend holds
  who PATH          who holds the disk PATH, on any host sharing the storage (reads the
                    holder records on the storage; works without lockwardend)
  doctor            checks that catch real outages (daemon, libvirt config, lockspaces, NFS,
                    plugin config differing between hosts)
  audit             is every running VM on this host protected: each VM's disks and leases as
                    the plugin would lock them, and who holds each (exit 1: some VM is exposed)
  adopt VM...|--all take the leases of running VMs that hold none (VMs started before
                    lockwarden was enabled, or under lockd), on behalf of their QEMU pid;
                    --dry-run shows what would be taken
  thaw VM           resume a VM (name or UUID) lockwardend stopped for a storage outage,
                    after re-verifying its locks on the storage (see docs/storage.md)
  version           print the version of this tool
  metrics           lockwardend's counters in the OpenMetrics text format, or with --format
                    prometheus in the Prometheus text format 0.0.4; --textfile DIR writes them
                    atomically to DIR/lockwarden.prom for node_exporter's textfile collector

options:
  --admin-socket PATH   lockwardend's admin socket (default /run/lockwarden/lockwardend-admin.sock
                        for root, $XDG_RUNTIME_DIR/lockwarden/lockwardend-admin.sock otherwise)
  --config PATH         the plugin config doctor checks and who uses to find a disk's lock
                        (default /etc/libvirt/qemu-lockwarden.conf)
  --mounts PATH         mount table doctor reads (default $LOCKWARDEN_MOUNTS_FILE, else
                        /proc/self/mounts)
  --no-publish          doctor: do not record this host's plugin config in the lockspaces
  --qemu-conf PATH      libvirt's qemu.conf doctor checks (default /etc/libvirt/qemu.conf)
  --status-dir PATH     audit/adopt: libvirt's QEMU status files (default /run/libvirt/qemu)
  --all                 adopt: every running VM
  --dry-run             adopt: only show what would be taken
  --timeout-ms N        how long to wait for the daemon (default 5000)
  --format FORMAT       metrics: openmetrics, the default on stdout, or prometheus, the
                        default with --textfile
  --textfile DIR        metrics: write DIR/lockwarden.prom (temporary file + rename) instead of
                        printing; written with lockwarden_up 0 when lockwardend is down
  --json                machine-readable output (stable field names)
";

/// Parsed command line.
#[derive(Debug)]
struct Cli {
    admin_socket: PathBuf,
    plugin_conf: PathBuf,
    qemu_conf: PathBuf,
    timeout: Duration,
    json: bool,
    /// `--mounts`: the mount table doctor reads instead of /proc/self/mounts.
    mounts: Option<PathBuf>,
    /// `--no-publish`: doctor only reads other hosts' published configs.
    no_publish: bool,
    command: String,
    /// Positional arguments after the command (`who PATH`, `adopt VM...`).
    operands: Vec<String>,
    /// `--status-dir`: libvirt's QEMU status files (audit, adopt).
    status_dir: PathBuf,
    /// `adopt --all`.
    all: bool,
    /// `adopt --dry-run`.
    dry_run: bool,
    // -- metrics (issue 18) --
    /// `metrics --format`.
    format: Option<crate::metrics::Format>,
    /// `metrics --textfile DIR`.
    textfile: Option<PathBuf>,
}

/// How many positional arguments each command takes.
fn operand_count(command: &str) -> usize {
    match command {
        "who" | "thaw" => 1,
        "adopt" => usize::MAX,
        _ => 0,
    }
}

fn parse(args: &[String]) -> Result<Option<Cli>, String> {
    let mut cli = Cli {
        admin_socket: crate::paths::default_admin_socket(),
        plugin_conf: PathBuf::from("/etc/libvirt/qemu-lockwarden.conf"),
        qemu_conf: PathBuf::from("/etc/libvirt/qemu.conf"),
        timeout: Duration::from_millis(5000),
        json: false,
        mounts: None,
        no_publish: false,
        command: String::new(),
        operands: Vec::new(),
        status_dir: PathBuf::from(running::STATUS_DIR),
        all: false,
        dry_run: false,
        format: None,
        textfile: None,
    };
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let mut value = |name: &str| {
            it.next()
                .cloned()
                .ok_or_else(|| format!("{name} needs a value"))
        };
        match arg.as_str() {
            "-h" | "--help" | "help" => return Ok(None),
            "--json" => cli.json = true,
            "--admin-socket" => cli.admin_socket = PathBuf::from(value(arg)?),
            "--config" => cli.plugin_conf = PathBuf::from(value(arg)?),
            "--qemu-conf" => cli.qemu_conf = PathBuf::from(value(arg)?),
            "--mounts" => cli.mounts = Some(PathBuf::from(value(arg)?)),
            "--no-publish" => cli.no_publish = true,
            "--status-dir" => cli.status_dir = PathBuf::from(value(arg)?),
            "--all" => cli.all = true,
            "--dry-run" => cli.dry_run = true,
            // metrics (issue 18)
            "--format" => cli.format = Some(metrics::parse_format(&value(arg)?)?),
            "--textfile" => cli.textfile = Some(PathBuf::from(value(arg)?)),
            "--timeout-ms" => {
                let v = value(arg)?;
                let ms: u64 = v
                    .parse()
                    .map_err(|_| format!("--timeout-ms: '{v}' is not a number of milliseconds"))?;
                cli.timeout = Duration::from_millis(ms.max(1));
            }
            s if s.starts_with('-') => return Err(format!("unknown option '{s}'")),
            s if cli.command.is_empty() => cli.command = s.to_string(),
            s if cli.operands.len() < operand_count(&cli.command) => {
                cli.operands.push(s.to_string())
            }
            s => return Err(format!("unexpected argument '{s}'")),
        }
    }
    if cli.command.is_empty() {
        return Err("no command given".into());
    }
    if cli.operands.len() < operand_count(&cli.command) && cli.command != "adopt" {
        if cli.command == "thaw" {
            return Err("'thaw' needs a VM name or UUID".into());
        }
        return Err(format!("'{}' needs a disk path", cli.command));
    }
    Ok(Some(cli))
}

/// Run the CLI with `args` (without the program name); returns the exit code.
pub fn run(args: &[String]) -> u8 {
    let cli = match parse(args) {
        Ok(Some(cli)) => cli,
        Ok(None) => {
            print!("{USAGE}");
            return EXIT_OK;
        }
        Err(e) => {
            eprintln!("lockwarden: {e}\n\n{USAGE}");
            return EXIT_USAGE;
        }
    };
    match cli.command.as_str() {
        "status" => status(&cli),
        "list" => list(&cli),
        "doctor" => doctor::run(&cli),
        "who" => who::run(&cli),
        "audit" => audit::run(&cli),
        "adopt" => adopt::run(&cli),
        "thaw" => fenced::thaw(&cli),
        // metrics (issue 18)
        "metrics" => metrics::run(&cli),
        "version" => {
            println!("lockwarden {}", env!("CARGO_PKG_VERSION"));
            EXIT_OK
        }
        other => {
            eprintln!("lockwarden: unknown command '{other}'\n\n{USAGE}");
            EXIT_USAGE
        }
    }
}

/// One request/response round trip on the admin socket.
fn ask(cli: &Cli, req: &Request) -> Result<Response, String> {
    ask_within(cli, req, cli.timeout)
}

/// [`ask`], waiting at most `timeout` for the answer (a request that waits on storage).
fn ask_within(cli: &Cli, req: &Request, timeout: Duration) -> Result<Response, String> {
    let sock = cli.admin_socket.display();
    let mut stream = UnixStream::connect(&cli.admin_socket).map_err(|e| {
        format!(
            "cannot connect to lockwardend's admin socket {sock}: {e}; is lockwardend running \
             (systemctl status lockwardend) and are you root?"
        )
    })?;
    let _ = stream.set_read_timeout(Some(timeout));
    let _ = stream.set_write_timeout(Some(timeout));
    protocol::write_message(&mut stream, req)
        .map_err(|e| format!("sending to lockwardend at {sock}: {e}"))?;
    protocol::read_message(&mut stream).map_err(|e| match e {
        protocol::FrameError::Io(io)
            if matches!(
                io.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            format!(
                "lockwardend at {sock} did not answer within {} ms",
                timeout.as_millis()
            )
        }
        other => format!("reading from lockwardend at {sock}: {other}"),
    })
}

fn fetch_status(cli: &Cli) -> Result<StatusInfo, String> {
    match ask(cli, &Request::Status)? {
        Response::Status(s) => Ok(s),
        Response::Error(e) => Err(e.message),
        other => Err(format!("unexpected answer to status: {other:?}")),
    }
}

fn fetch_leases(cli: &Cli) -> Result<Vec<LeaseInfo>, String> {
    match ask(cli, &Request::List)? {
        Response::Ok { leases } => Ok(leases),
        Response::Error(e) => Err(e.message),
        other => Err(format!("unexpected answer to list: {other:?}")),
    }
}

fn print_json(value: &serde_json::Value) {
    let mut out = std::io::stdout().lock();
    let _ = serde_json::to_writer_pretty(&mut out, value);
    let _ = writeln!(out);
}

fn fetch_lost(cli: &Cli) -> Result<Vec<LeaseInfo>, String> {
    match ask(cli, &Request::Lost)? {
        Response::Ok { leases } => Ok(leases),
        Response::Error(e) => Err(e.message),
        other => Err(format!("unexpected answer to lost: {other:?}")),
    }
}

/// Exit 0 when the daemon runs and has neither lost nor fenced a lease; 1 when it found leases
/// lost or has leases fenced for a storage outage (the operator must look); 3 when it cannot be
/// reached; 4 when the lost or fenced query failed.
fn status(cli: &Cli) -> u8 {
    let s = match fetch_status(cli) {
        Ok(s) => s,
        Err(e) => {
            if cli.json {
                print_json(&serde_json::json!({ "running": false, "error": e }));
            } else {
                eprintln!("lockwarden: {e}");
            }
            return EXIT_DAEMON;
        }
    };
    // A monitoring script acts on this exit status: a failed `lost` query is not "0 lost".
    let lost = match fetch_lost(cli) {
        Ok(lost) => lost,
        Err(e) => {
            let e = format!(
                "lockwardend answered status but the query for lost leases failed: {e}; run \
                 `lockwarden status` again, and check lockwardend's log (journalctl -u \
                 lockwardend) if it keeps failing"
            );
            if cli.json {
                print_json(&serde_json::json!({
                    "running": true, "status": s, "lost": null, "error": e
                }));
            } else {
                eprintln!("lockwarden: {e}");
            }
            return EXIT_UNKNOWN;
        }
    };
    // Fenced leases (docs/storage.md "Partitions"): from `list`; a failed query is not "none".
    let fenced = match fenced::fetch(cli) {
        Ok(f) => f,
        Err(e) => {
            let e = format!(
                "lockwardend answered status but the query for fenced leases failed: {e}; run \
                 `lockwarden status` again"
            );
            if cli.json {
                print_json(&serde_json::json!({
                    "running": true, "status": s, "lost": lost, "fenced": null, "error": e
                }));
            } else {
                eprintln!("lockwarden: {e}");
            }
            return EXIT_UNKNOWN;
        }
    };
    if cli.json {
        print_json(&serde_json::json!({
            "running": true, "status": s, "lost": lost, "fenced": fenced
        }));
    } else {
        let rows = vec![
            vec!["daemon".into(), "running".into()],
            vec!["version".into(), s.version.clone()],
            vec!["protocol".into(), s.protocol.to_string()],
            vec!["pid".into(), s.pid.to_string()],
            vec!["started".into(), table::utc(s.started)],
            vec!["owners".into(), s.owners.to_string()],
            vec!["leases".into(), s.leases.to_string()],
            vec!["clients".into(), s.clients.to_string()],
            vec!["lost leases".into(), lost.len().to_string()],
            vec!["fenced leases".into(), fenced.len().to_string()],
        ];
        print!("{}", table::render(&[], &rows));
        if !lost.is_empty() {
            println!("\nleases found lost (the storage dropped the lock; see docs/storage.md):");
            let rows: Vec<Vec<String>> = lost.iter().flat_map(table::lease_rows).collect();
            print!(
                "{}",
                table::render(&["DISK", "MODE", "VM", "UUID", "PID", "DETECTED"], &rows)
            );
        }
        fenced::print_section(&fenced);
    }
    if lost.is_empty() && fenced.is_empty() {
        EXIT_OK
    } else {
        EXIT_PROBLEM
    }
}

fn list(cli: &Cli) -> u8 {
    match fetch_leases(cli) {
        Ok(leases) => {
            if cli.json {
                print_json(&serde_json::json!({ "leases": leases }));
            } else {
                let rows: Vec<Vec<String>> = leases.iter().flat_map(table::lease_rows).collect();
                print!(
                    "{}",
                    table::render(&["DISK", "MODE", "VM", "UUID", "PID", "SINCE"], &rows)
                );
                let fenced: Vec<LeaseInfo> =
                    leases.into_iter().filter(|l| l.fence.is_some()).collect();
                fenced::print_section(&fenced);
            }
            EXIT_OK
        }
        Err(e) => {
            eprintln!("lockwarden: {e}");
            EXIT_DAEMON
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_string).collect()
    }

    #[test]
    fn parses_options_anywhere() {
        let cli = parse(&args("list --json --admin-socket /tmp/a.sock"))
            .unwrap()
            .unwrap();
        assert_eq!(cli.command, "list");
        assert!(cli.json);
        assert_eq!(cli.admin_socket, PathBuf::from("/tmp/a.sock"));
    }

    #[test]
    fn who_takes_one_path() {
        let cli = parse(&args("who /img/a.qcow2 --json --config /tmp/q.conf"))
            .unwrap()
            .unwrap();
        assert_eq!(cli.command, "who");
        assert_eq!(cli.operands, vec!["/img/a.qcow2".to_string()]);
        assert_eq!(cli.plugin_conf, PathBuf::from("/tmp/q.conf"));
        let cli = parse(&args("doctor --mounts /tmp/m --no-publish"))
            .unwrap()
            .unwrap();
        assert_eq!(cli.mounts, Some(PathBuf::from("/tmp/m")));
        assert!(cli.no_publish);
    }

    #[test]
    fn usage_errors() {
        assert!(parse(&args("")).is_err());
        assert!(parse(&args("list --bogus")).is_err());
        assert!(parse(&args("list extra")).is_err());
        assert!(parse(&args("list --timeout-ms soon")).is_err());
        assert!(parse(&args("who")).is_err());
        assert!(parse(&args("who /a /b")).is_err());
        assert!(parse(&args("--help")).unwrap().is_none());
    }

    /// A fake admin socket that answers `status` and fails every other request, the way a
    /// daemon whose `lost` query breaks would.
    fn fake_daemon_failing_lost() -> (tempfile::TempDir, PathBuf, std::thread::JoinHandle<()>) {
        use crate::protocol::{ErrorKind, ErrorReply};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("admin.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let t = std::thread::spawn(move || {
            for _ in 0..2 {
                let (mut c, _) = listener.accept().unwrap();
                let req: Request = protocol::read_message(&mut c).unwrap();
                let resp = match req {
                    Request::Status => Response::Status(StatusInfo {
                        version: "test".into(),
                        protocol: protocol::PROTOCOL_VERSION,
                        pid: 1,
                        watchdog_device: None,
                        started: 0,
                        owners: 0,
                        leases: 0,
                        clients: 0,
                        heartbeat_interval_ms: None,
                        fence_after_ms: None,
                    }),
                    _ => Response::Error(ErrorReply {
                        kind: ErrorKind::Internal,
                        message: "lost table unavailable".into(),
                        resource: None,
                        holder: None,
                    }),
                };
                protocol::write_message(&mut c, &resp).unwrap();
            }
        });
        (dir, path, t)
    }

    #[test]
    fn failed_lost_query_is_exit_4_not_ok() {
        let (_dir, path, t) = fake_daemon_failing_lost();
        let code = run(&args(&format!("status --admin-socket {}", path.display())));
        t.join().unwrap();
        assert_eq!(code, EXIT_UNKNOWN);
    }

    #[test]
    fn unreachable_daemon_is_exit_3() {
        let code = run(&args("status --admin-socket /nonexistent/lw.sock"));
        assert_eq!(code, EXIT_DAEMON);
    }
}
