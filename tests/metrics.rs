//! `lockwarden metrics` (issue 18, docs/operators.md §11) against a real lockwardend: a scripted
//! session on the FUSE test file system mounted at a hostile mount point (quote, backslash,
//! newline, escape character) moves every counter to an exact value; the output is read by real
//! parsers — the Prometheus client library's strict OpenMetrics parser, `promtool check
//! metrics`, and node_exporter's textfile collector itself; counters survive a live re-exec;
//! the example alert rules pass `promtool check rules`; the plugin does not carry the journal
//! client. Needs root, /dev/fuse and the Debian packages python3-prometheus-client, prometheus
//! (promtool) and prometheus-node-exporter (.ci/install-deps); fails loudly without them.

mod common;

use common::daemon::TestDaemon;
use common::fuse::Testfs;
use common::proto::{Client, Proc, excl as disk, owner_for, sleeper};
use common::wait::wait_until;
use lockwarden::protocol::{self, ErrorKind, FailureAction, Owner, Request, Response};
use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const CLI: &str = env!("CARGO_BIN_EXE_lockwarden");
const PYTHON: &str = "/usr/bin/python3";
const PROMTOOL: &str = "/usr/bin/promtool";
const NODE_EXPORTER: &str = "/usr/bin/prometheus-node-exporter";

/// The tool at `path` must exist: say which Debian package brings it.
fn need(path: &str, package: &str) {
    assert!(
        Path::new(path).exists(),
        "{path} is missing: apt-get install {package} (.ci/install-deps installs it)"
    );
}

fn need_python_client() {
    need(PYTHON, "python3");
    let ok = Command::new(PYTHON)
        .args(["-c", "import prometheus_client.openmetrics.parser"])
        .status()
        .expect("run python3")
        .success();
    assert!(
        ok,
        "python3's prometheus_client is missing: apt-get install python3-prometheus-client \
         (.ci/install-deps installs it)"
    );
}

/// One sample as a parser read it: name, labels, value.
type Sample = (String, BTreeMap<String, String>, f64);

/// Parse `text` with the Prometheus client library's OpenMetrics parser (strict: it rejects a
/// missing `# EOF`, a counter sample without `_total`, a bad escape, a label value spread over
/// two lines...). Returns the samples and, per family, its type and unit.
fn parse_openmetrics(text: &str) -> (Vec<Sample>, BTreeMap<String, (String, String)>) {
    const SCRIPT: &str = r#"
import json, sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families
text = sys.stdin.buffer.read().decode("utf-8")
fams, samples = {}, []
for f in text_string_to_metric_families(text):
    fams[f.name] = [f.type, f.unit]
    for s in f.samples:
        samples.append([s.name, s.labels, s.value])
json.dump({"families": fams, "samples": samples}, sys.stdout)
"#;
    let mut child = Command::new(PYTHON)
        .args(["-c", SCRIPT])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run python3");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the OpenMetrics parser refused the output: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let samples = v["samples"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            let labels = s[1]
                .as_object()
                .unwrap()
                .iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
                .collect();
            (
                s[0].as_str().unwrap().to_string(),
                labels,
                s[2].as_f64().unwrap(),
            )
        })
        .collect();
    let fams = v["families"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| {
            (
                k.clone(),
                (
                    v[0].as_str().unwrap().to_string(),
                    v[1].as_str().unwrap_or("").to_string(),
                ),
            )
        })
        .collect();
    (samples, fams)
}

/// The value of the one sample `name{labels}` (labels given must match exactly).
fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    let want: BTreeMap<String, String> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let found: Vec<f64> = samples
        .iter()
        .filter(|(n, l, _)| n == name && *l == want)
        .map(|(_, _, v)| *v)
        .collect();
    assert_eq!(
        found.len(),
        1,
        "{name}{want:?}: {found:?} among {samples:#?}"
    );
    found[0]
}

/// `lockwarden --admin-socket ADMIN metrics ARGS...`: stdout, exit code.
fn cli_metrics(d: &TestDaemon, args: &[&str]) -> (String, i32) {
    let out = Command::new(CLI)
        .arg("--admin-socket")
        .arg(&d.admin)
        .arg("metrics")
        .args(args)
        .output()
        .expect("run lockwarden");
    (
        String::from_utf8(out.stdout).expect("the output is UTF-8"),
        out.status.code().unwrap_or(-1),
    )
}

/// The session's numbers as the strict parser reads them.
fn scrape(d: &TestDaemon) -> Vec<Sample> {
    let (text, code) = cli_metrics(d, &[]);
    assert_eq!(code, 0, "{text}");
    assert!(text.ends_with("# EOF\n"), "{text}");
    parse_openmetrics(&text).0
}

/// The owner a sleeping stand-in for QEMU is.
fn owner_for_proc(q: &Proc, name: &str) -> Owner {
    owner_for(q.pid(), name)
}

fn call(sock: &Path, req: &Request) -> Response {
    Client::connect(sock).call(req)
}

fn acquire(d: &TestDaemon, o: &Owner, img: &Path, action: FailureAction) -> Response {
    call(
        &d.socket,
        &Request::Acquire {
            owner: o.clone(),
            leases: vec![disk(img)],
            action,
            restrict: false,
        },
    )
}

fn snapshot(d: &TestDaemon) -> lockwarden::metrics::Snapshot {
    match call(&d.admin, &Request::Metrics) {
        Response::Metrics(s) => *s,
        other => panic!("metrics: {other:?}"),
    }
}

/// The FUSE test file system mounted where a hostile name puts it: a double quote, a
/// backslash, a newline, an escape sequence and a non-ASCII letter in the mount point.
struct HostileMount {
    tfs: Testfs,
    backing: PathBuf,
    _dir: tempfile::TempDir,
}

const HOSTILE: &str = "m \"q\\ x\nline\u{1b}[2J é";

fn hostile_mount() -> HostileMount {
    common::fuse::prerequisites("tests/metrics.rs");
    let dir = tempfile::Builder::new()
        .prefix("lw-metrics")
        .tempdir()
        .unwrap();
    let backing = dir.path().join("export");
    let mnt = dir.path().join(HOSTILE);
    fs::create_dir(&backing).unwrap();
    fs::create_dir(&mnt).unwrap();
    let tfs = Testfs::mount(
        &backing,
        &mnt,
        &dir.path().join("control"),
        &dir.path().join("events"),
        Duration::from_secs(20),
    );
    HostileMount {
        tfs,
        backing,
        _dir: dir,
    }
}

impl HostileMount {
    fn image(&self, name: &str) -> PathBuf {
        fs::write(self.backing.join(name), vec![0u8; 4096]).unwrap();
        self.tfs.mnt.join(name)
    }
}

/// A tmpfs mounted at a directory whose name is not UTF-8 (byte 0xff), unmounted on drop: its
/// line in /proc/self/mountinfo must not keep lockwardend from reading the others.
struct NonUtf8Mount(PathBuf);

impl NonUtf8Mount {
    fn new(dir: &Path) -> NonUtf8Mount {
        use std::os::unix::ffi::OsStrExt;
        let p = dir.join(std::ffi::OsStr::from_bytes(b"not-utf8-\xff"));
        fs::create_dir(&p).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=64k", "lw-metrics-nonutf8"])
            .arg(&p)
            .status()
            .unwrap()
            .success();
        assert!(ok, "mount -t tmpfs at {p:?}");
        NonUtf8Mount(p)
    }
}

impl Drop for NonUtf8Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn a_scripted_session_moves_every_counter_exactly_and_reexec_keeps_them() {
    need_python_client();
    let m = hostile_mount();
    let mount = m.tfs.mnt.to_string_lossy().into_owned();
    // The label shows the mount point as lockwarden shows untrusted names (control characters
    // as \u{..} text), and the strict parser gives back exactly that text.
    let label = lockwarden::untrusted::escape(&mount);
    assert!(label.contains("\\n") && label.contains("\\u{1b}") && label.contains('"'));
    let other = tempfile::tempdir().unwrap();
    let _non_utf8 = NonUtf8Mount::new(other.path());
    let d = TestDaemon::verbose("lease_check_interval_ms = 200\n");
    let before = scrape(&d);
    assert_eq!(value(&before, "lockwarden_up", &[]), 1.0);
    assert_eq!(value(&before, "lockwarden_acquires_total", &[]), 0.0);

    let (a, b, c) = (m.image("a.img"), m.image("b.img"), m.image("c.img"));
    let (q1, q2, q3) = (sleeper(), sleeper(), sleeper());
    let (one, two, three) = (
        owner_for_proc(&q1, "vm-one"),
        owner_for_proc(&q2, "vm-two"),
        owner_for_proc(&q3, "vm-three"),
    );
    // Three VMs start: one, two (on b) and three (on c, on_lockfailure=ignore so that it keeps
    // its lease when the lock is lost).
    for (o, img, action) in [
        (&one, &a, FailureAction::Default),
        (&two, &b, FailureAction::Default),
        (&three, &c, FailureAction::Ignore),
    ] {
        let r = acquire(&d, o, img, action);
        assert!(matches!(r, Response::Ok { .. }), "{r:?}");
    }
    // A refusal: two asks for one's disk.
    match acquire(&d, &two, &a, FailureAction::Default) {
        Response::Error(e) => assert_eq!(e.kind, ErrorKind::Busy, "{e:?}"),
        other => panic!("expected busy: {other:?}"),
    }
    // A release: two gives b back.
    let r = call(
        &d.socket,
        &Request::Release {
            owner: two.clone(),
            leases: vec![disk(&b)],
        },
    );
    assert!(matches!(r, Response::Ok { .. }), "{r:?}");
    // A lost lock: the storage drops c's lock; the probe (every 200 ms) finds it.
    m.tfs.set("lost c.img\n");
    wait_until("the lost lock's detection", Duration::from_secs(10), || {
        snapshot(&d).counters.lost == 1
    });

    let s = scrape(&d);
    assert_eq!(value(&s, "lockwarden_acquires_total", &[]), 3.0);
    for reason in lockwarden::metrics::REFUSAL_REASONS {
        let want = if reason == "busy" { 1.0 } else { 0.0 };
        assert_eq!(
            value(&s, "lockwarden_refusals_total", &[("reason", reason)]),
            want,
            "{reason}"
        );
    }
    assert_eq!(
        value(
            &s,
            "lockwarden_acquire_duration_seconds_bucket",
            &[("le", "+Inf")]
        ),
        4.0
    );
    assert_eq!(
        value(&s, "lockwarden_acquire_duration_seconds_count", &[]),
        4.0
    );
    assert!(value(&s, "lockwarden_acquire_duration_seconds_sum", &[]) > 0.0);
    assert_eq!(value(&s, "lockwarden_releases_total", &[]), 1.0);
    assert_eq!(value(&s, "lockwarden_leases_lost_total", &[]), 1.0);
    assert_eq!(
        value(
            &s,
            "lockwarden_leases",
            &[("mode", "exclusive"), ("mount", &label)]
        ),
        2.0,
        "a and c are held on the hostile mount"
    );
    // one and three hold leases; two, which released its only one, is still known (its
    // process runs).
    assert_eq!(value(&s, "lockwarden_owners", &[]), 3.0);
    assert_eq!(value(&s, "lockwarden_fences_total", &[]), 0.0);
    assert_eq!(value(&s, "lockwarden_fenced_vms", &[]), 0.0);
    assert_eq!(value(&s, "lockwarden_keeper_up", &[]), 1.0);
    assert_eq!(value(&s, "lockwarden_keeper_restarts_total", &[]), 0.0);
    assert_eq!(value(&s, "lockwarden_reexecs_total", &[]), 0.0);
    assert_eq!(
        value(
            &s,
            "lockwarden_build_info",
            &[
                ("version", env!("CARGO_PKG_VERSION")),
                ("protocol", &protocol::PROTOCOL_VERSION.to_string())
            ]
        ),
        1.0
    );
    // The hostile mount has leases: its heartbeat age is reported under the same label.
    wait_until(
        "the mount's first heartbeat",
        Duration::from_secs(10),
        || !snapshot(&d).mounts.is_empty(),
    );
    let s = scrape(&d);
    let age = value(&s, "lockwarden_heartbeat_age_seconds", &[("mount", &label)]);
    assert!((0.0..60.0).contains(&age), "{age}");
    assert_eq!(
        value(&s, "lockwarden_mount_fenced", &[("mount", &label)]),
        0.0
    );
    let started = value(&s, "lockwarden_start_time_seconds", &[]);

    // A live re-exec keeps every counter and the start time, and counts itself.
    let kill = Command::new("kill")
        .args(["-HUP", &d.pid().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    d.wait_log("live re-exec #1 complete");
    let after = scrape(&d);
    assert_eq!(value(&after, "lockwarden_reexecs_total", &[]), 1.0);
    for name in [
        "lockwarden_acquires_total",
        "lockwarden_releases_total",
        "lockwarden_leases_lost_total",
        "lockwarden_acquire_duration_seconds_count",
        "lockwarden_start_time_seconds",
    ] {
        assert_eq!(value(&after, name, &[]), value(&s, name, &[]), "{name}");
    }
    assert_eq!(
        value(&after, "lockwarden_refusals_total", &[("reason", "busy")]),
        1.0
    );
    assert_eq!(value(&after, "lockwarden_start_time_seconds", &[]), started);
    assert!(
        value(&after, "lockwarden_uptime_seconds", &[])
            >= value(&s, "lockwarden_uptime_seconds", &[])
    );

    // The keeper is killed: lockwardend starts a new one and counts it.
    let keeper = snapshot(&d).keeper_pid;
    assert!(keeper > 0);
    Command::new("kill")
        .args(["-KILL", &keeper.to_string()])
        .status()
        .unwrap();
    wait_until("a new keeper", Duration::from_secs(10), || {
        let s = snapshot(&d);
        s.keeper_up && s.keeper_pid != keeper && s.counters.keeper_restarts == 1
    });
    let s = scrape(&d);
    assert_eq!(value(&s, "lockwarden_keeper_restarts_total", &[]), 1.0);
    assert_eq!(value(&s, "lockwarden_keeper_up", &[]), 1.0);
    m.tfs.set("");
}

/// A free TCP port on the loopback address.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// GET /metrics from a node_exporter on 127.0.0.1:`port`.
fn get_metrics(port: u16) -> Option<String> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    out.split_once("\r\n\r\n").map(|(_, body)| body.to_string())
}

struct Exporter(Child);

impl Drop for Exporter {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn the_textfile_is_what_node_exporter_and_promtool_accept() {
    need(NODE_EXPORTER, "prometheus-node-exporter");
    need(PROMTOOL, "prometheus");
    let d = TestDaemon::verbose("");
    let dir = tempfile::tempdir().unwrap();
    let (out, code) = cli_metrics(&d, &["--textfile", dir.path().to_str().unwrap()]);
    assert_eq!((out.as_str(), code), ("", 0));
    let file = dir.path().join("lockwarden.prom");
    let text = fs::read_to_string(&file).unwrap();
    assert!(
        !text.contains("# EOF") && !text.contains("# UNIT"),
        "{text}"
    );
    assert!(text.contains("# TYPE lockwarden_acquires_total counter\n"));
    let names: Vec<_> = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 1, "no temporary file left: {names:?}");

    // promtool's parser and linter (naming conventions: _total, units, ...).
    for t in [text.clone(), cli_metrics(&d, &["--format", "prometheus"]).0] {
        let mut p = Command::new(PROMTOOL)
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        p.stdin.take().unwrap().write_all(t.as_bytes()).unwrap();
        let o = p.wait_with_output().unwrap();
        assert!(
            o.status.success(),
            "promtool check metrics: {}{}\n{t}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    }

    // node_exporter's textfile collector reads it, typed and without a scrape error.
    let port = free_port();
    let _exporter = Exporter(
        Command::new(NODE_EXPORTER)
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--collector.disable-defaults")
            .arg("--collector.textfile")
            .arg(format!(
                "--collector.textfile.directory={}",
                dir.path().display()
            ))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start node_exporter"),
    );
    let mut body = None;
    wait_until("node_exporter serving", Duration::from_secs(15), || {
        body = get_metrics(port);
        body.is_some()
    });
    let body = body.unwrap();
    for line in [
        "node_textfile_scrape_error 0",
        "# TYPE lockwarden_acquires_total counter",
        "lockwarden_acquires_total 0",
        "lockwarden_up 1",
        "# TYPE lockwarden_acquire_duration_seconds histogram",
        "lockwarden_acquire_duration_seconds_bucket{le=\"+Inf\"} 0",
        "lockwarden_refusals_total{reason=\"busy\"} 0",
    ] {
        assert!(
            body.lines().any(|l| l == line),
            "node_exporter does not publish {line:?}:\n{body}"
        );
    }
    // node_exporter 1.5 names the file by its full path.
    let mtime = format!("node_textfile_mtime_seconds{{file=\"{}\"}}", file.display());
    assert!(body.contains(&mtime), "{body}");

    // The OpenMetrics text, by contrast, loses its counters' types there (docs/operators.md).
    fs::write(dir.path().join("lockwarden.prom"), cli_metrics(&d, &[]).0).unwrap();
    let body = get_metrics(port).unwrap();
    assert!(
        body.contains("# TYPE lockwarden_acquires_total untyped"),
        "{body}"
    );

    // The daemon down: the file says lockwarden_up 0 and the command exits 3.
    drop(d);
    let out = Command::new(CLI)
        .args(["--admin-socket", "/nonexistent/lockwardend-admin.sock"])
        .args(["metrics", "--textfile"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    let text = fs::read_to_string(&file).unwrap();
    assert!(text.lines().any(|l| l == "lockwarden_up 0"), "{text}");
    let body = get_metrics(port).unwrap();
    assert!(body.lines().any(|l| l == "lockwarden_up 0"), "{body}");
    assert!(body.lines().any(|l| l == "node_textfile_scrape_error 0"));
}

#[test]
fn the_openmetrics_output_declares_types_units_and_help() {
    need_python_client();
    let d = TestDaemon::verbose("");
    let (text, _) = cli_metrics(&d, &[]);
    let (_, fams) = parse_openmetrics(&text);
    let want = [
        ("lockwarden_acquires", "counter", ""),
        ("lockwarden_refusals", "counter", ""),
        (
            "lockwarden_acquire_duration_seconds",
            "histogram",
            "seconds",
        ),
        ("lockwarden_uptime_seconds", "gauge", "seconds"),
        ("lockwarden_leases", "gauge", ""),
        ("lockwarden_keeper_restarts", "counter", ""),
        ("lockwarden_build_info", "gauge", ""),
    ];
    for (name, kind, unit) in want {
        assert_eq!(
            fams.get(name),
            Some(&(kind.to_string(), unit.to_string())),
            "{name}"
        );
    }
    for name in fams.keys() {
        assert!(name.starts_with("lockwarden_"), "{name}");
    }
    // Every family has its HELP line.
    for l in text.lines().filter(|l| l.starts_with("# TYPE ")) {
        let name = l.split(' ').nth(2).unwrap();
        assert!(
            text.contains(&format!("# HELP {name} ")),
            "{name} has no HELP"
        );
    }
}

/// The ```yaml block under "### Alert rules" in docs/operators.md.
fn alert_rules() -> String {
    let doc =
        fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/operators.md")).unwrap();
    let (_, after) = doc.split_once("### Alert rules").expect("the section");
    let (_, block) = after.split_once("```yaml\n").expect("a yaml block");
    block.split_once("```").unwrap().0.to_string()
}

#[test]
fn the_example_alert_rules_pass_promtool_check_rules() {
    need(PROMTOOL, "prometheus");
    let rules = alert_rules();
    for alert in [
        "LockwardenLeaseLost",
        "LockwardenVMFenced",
        "LockwardenMountStalled",
        "LockwardenKeeperMissing",
        "LockwardenDown",
    ] {
        assert!(rules.contains(&format!("alert: {alert}\n")), "{alert}");
    }
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("lockwarden-rules.yml");
    fs::write(&f, &rules).unwrap();
    let o = Command::new(PROMTOOL)
        .args(["check", "rules"])
        .arg(&f)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "promtool check rules: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    // Every metric the rules use is one lockwarden writes (or node_exporter's own).
    let d = TestDaemon::verbose("heartbeat_interval_ms = 5000\n");
    let (text, _) = cli_metrics(&d, &["--format", "prometheus"]);
    for word in rules.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
        if word.starts_with("lockwarden_") {
            assert!(
                text.contains(&format!("# TYPE {word} ")),
                "the rules use {word}, which lockwarden metrics does not write"
            );
        }
    }
}

/// The plugin libvirtd loads does not carry the journal client: only lockwardend uses it.
#[test]
fn the_plugin_does_not_contain_the_journal_client() {
    let exe = std::env::current_exe().unwrap();
    let profile = exe.parent().and_then(Path::parent).unwrap();
    let fresh = profile.join("deps/liblockwarden.so");
    let so = if fresh.is_file() {
        fresh
    } else {
        profile.join("liblockwarden.so")
    };
    let needle = b"/run/systemd/journal/socket";
    let has = |p: &Path| {
        let bytes = fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        bytes.windows(needle.len()).any(|w| w == needle)
    };
    assert!(
        has(Path::new(env!("CARGO_BIN_EXE_lockwardend"))),
        "lockwardend uses the journal client"
    );
    assert!(!has(&so), "{} contains the journal client", so.display());
}

/// docs/operators.md §11's table lists exactly the families `lockwarden metrics` writes.
#[test]
fn the_metrics_table_of_operators_md_is_what_lockwarden_metrics_writes() {
    let doc =
        fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/operators.md")).unwrap();
    let (_, section) = doc.split_once("### Metrics").unwrap();
    let (section, _) = section.split_once("### The textfile timer").unwrap();
    let mut documented: Vec<String> = section
        .lines()
        .filter(|l| l.starts_with("| `lockwarden_"))
        .flat_map(|l| {
            let first = l.split('|').nth(1).unwrap();
            first
                .split('`')
                .filter(|w| w.starts_with("lockwarden_"))
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .collect();
    documented.sort();
    let d = TestDaemon::verbose("heartbeat_interval_ms = 5000\n");
    let (text, _) = cli_metrics(&d, &["--format", "prometheus"]);
    let mut written: Vec<String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .map(|l| l.split(' ').next().unwrap().to_string())
        .collect();
    written.sort();
    assert_eq!(documented, written);
}

/// The shipped units say what docs/operators.md says: the timer every 30 s, the service
/// writing the textfile into Debian's node_exporter directory unless a drop-in says otherwise,
/// and nothing enabled by the units themselves (the service has no [Install]).
#[test]
fn the_metrics_units_match_the_operator_guide() {
    let root = env!("CARGO_MANIFEST_DIR");
    let service = fs::read_to_string(format!(
        "{root}/meson-install/systemd/lockwarden-metrics.service.in"
    ))
    .unwrap();
    let timer = fs::read_to_string(format!(
        "{root}/meson-install/systemd/lockwarden-metrics.timer.in"
    ))
    .unwrap();
    let has = |text: &str, line: &str| text.lines().any(|l| l == line);
    assert!(has(
        &service,
        "Environment=LOCKWARDEN_TEXTFILE_DIR=/var/lib/prometheus/node-exporter"
    ));
    assert!(has(
        &service,
        "ExecStart=@bindir@/lockwarden metrics --textfile ${LOCKWARDEN_TEXTFILE_DIR}"
    ));
    assert!(has(&service, "Type=oneshot") && !service.contains("[Install]"));
    assert!(has(&timer, "OnUnitActiveSec=30s") && has(&timer, "WantedBy=timers.target"));
    let guide = fs::read_to_string(format!("{root}/docs/operators.md")).unwrap();
    for claim in [
        "runs the service every 30 s",
        "`lockwarden metrics --textfile $LOCKWARDEN_TEXTFILE_DIR`",
        "`/var/lib/prometheus/node-exporter`",
        "Environment=LOCKWARDEN_TEXTFILE_DIR=",
    ] {
        assert!(guide.contains(claim), "docs/operators.md: {claim}");
    }
    let rules = fs::read_to_string(format!("{root}/packaging/debian/rules")).unwrap();
    assert!(rules.contains("dh_installsystemd --no-enable lockwarden-metrics.timer"));
}

/// A partition of the hostile mount: the paused VM is fenced, and the metrics say so —
/// `lockwarden_fences_total` 1, `lockwarden_fenced_vms` 1, the mount fenced, one heartbeat stall,
/// its heartbeat age past `fence_after_ms`; after the heal the mount is no longer fenced, while
/// the VM (its lock still ours, waiting for the operator) still counts as fenced.
#[test]
fn a_partition_shows_as_a_fenced_vm_a_fenced_mount_and_a_heartbeat_stall() {
    need_python_client();
    let m = hostile_mount();
    let label = lockwarden::untrusted::escape(&m.tfs.mnt.to_string_lossy());
    let d = TestDaemon::verbose(
        "heartbeat_interval_ms = 100\nfence_after_ms = 1000\nlease_check_interval_ms = 0\n\
         storage_timeout_ms = 2000\n",
    );
    let img = m.image("p.img");
    let q = sleeper();
    let o = owner_for_proc(&q, "vm-pause");
    let r = acquire(&d, &o, &img, FailureAction::Pause);
    assert!(matches!(r, Response::Ok { .. }), "{r:?}");
    wait_until("the mount's heartbeats", Duration::from_secs(10), || {
        snapshot(&d).mounts.iter().any(|h| h.heartbeat_age_ms < 500)
    });
    let s = scrape(&d);
    assert_eq!(value(&s, "lockwarden_fence_after_seconds", &[]), 1.0);
    assert_eq!(value(&s, "lockwarden_heartbeat_interval_seconds", &[]), 0.1);
    assert_eq!(value(&s, "lockwarden_fences_total", &[]), 0.0);
    assert_eq!(
        value(&s, "lockwarden_mount_fenced", &[("mount", &label)]),
        0.0
    );

    m.tfs.set("hang 1\n");
    wait_until("the fence", Duration::from_secs(15), || {
        snapshot(&d).counters.fences == 1
    });
    let s = scrape(&d);
    assert_eq!(value(&s, "lockwarden_fences_total", &[]), 1.0);
    assert_eq!(value(&s, "lockwarden_fenced_vms", &[]), 1.0);
    assert_eq!(
        value(&s, "lockwarden_mount_fenced", &[("mount", &label)]),
        1.0
    );
    assert_eq!(
        value(
            &s,
            "lockwarden_storage_stalls_total",
            &[("kind", "heartbeat"), ("mount", &label)]
        ),
        1.0
    );
    assert!(value(&s, "lockwarden_heartbeat_age_seconds", &[("mount", &label)]) >= 1.0);
    // A VM starting meanwhile on the hung mount: its acquire times out (storage_timeout_ms),
    // a request stall of that mount.
    let q2 = sleeper();
    match acquire(
        &d,
        &owner_for_proc(&q2, "vm-late"),
        &m.tfs.mnt.join("late.img"),
        FailureAction::Default,
    ) {
        Response::Error(e) => assert_eq!(e.kind, ErrorKind::Timeout, "{e:?}"),
        other => panic!("expected a timeout: {other:?}"),
    }
    let s = scrape(&d);
    assert_eq!(
        value(
            &s,
            "lockwarden_storage_stalls_total",
            &[("kind", "request"), ("mount", &label)]
        ),
        1.0
    );
    assert_eq!(
        value(&s, "lockwarden_refusals_total", &[("reason", "timeout")]),
        1.0
    );

    m.tfs.set("");
    wait_until("the heal", Duration::from_secs(15), || {
        snapshot(&d).mounts.iter().all(|h| !h.fenced)
    });
    d.wait_log("is still held after the storage behind mount");
    let s = scrape(&d);
    assert_eq!(
        value(&s, "lockwarden_mount_fenced", &[("mount", &label)]),
        0.0
    );
    assert_eq!(value(&s, "lockwarden_fences_total", &[]), 1.0);
    assert_eq!(
        value(&s, "lockwarden_fenced_vms", &[]),
        1.0,
        "stopped, waiting for the operator"
    );
    assert_eq!(value(&s, "lockwarden_leases_lost_total", &[]), 0.0);
}
