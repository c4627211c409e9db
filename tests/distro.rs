//! The product as distributions run it (issue 14): builds the Debian package once
//! (`scripts/build-deb.sh`, dh + meson + cargo --offline from the vendored crates) and runs
//! `tests/distro/run.sh SUITE` for Debian 12 (bookworm: libvirt 9.0, QEMU 7.2, systemd 252) and
//! Debian 13 (trixie: libvirt 11.3, QEMU 10, systemd 257): two booted containers with systemd as
//! PID 1, the .deb installed with apt, lockwardend driven with systemctl while a sampler reads
//! /proc/locks every 5 ms. A test fails if any check prints FAIL.
//!
//! Needs root, network access to the Debian mirror (the root file systems are cached in
//! /var/cache/lockwarden-distro after the first run) and Debian's debootstrap, systemd-container,
//! debhelper, dpkg-dev, fakeroot, lintian (`.ci/install-deps` installs them). A missing
//! prerequisite is a failure that names the package, never a skip.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::Instant;

/// (command, Debian package that provides it)
const PREREQUISITES: &[(&str, &str)] = &[
    ("debootstrap", "debootstrap"),
    ("systemd-nspawn", "systemd-container"),
    ("nsenter", "util-linux"),
    ("dpkg-buildpackage", "dpkg-dev"),
    ("dh", "debhelper"),
    ("fakeroot", "fakeroot"),
    ("lintian", "lintian"),
    ("meson", "meson"),
    ("ninja", "ninja-build"),
    ("python3", "python3"),
];

/// One suite at a time (two pairs of booted containers on a 2-core machine are too many), and
/// the package is built once for both.
static SERIAL: Mutex<Option<PathBuf>> = Mutex::new(None);

fn find_in_path(cmd: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|dir| dir.join(cmd))
        .find(|p| p.is_file())
}

fn check_prerequisites() {
    let missing: Vec<String> = PREREQUISITES
        .iter()
        .filter(|(cmd, _)| find_in_path(cmd).is_none())
        .map(|(cmd, pkg)| format!("{cmd} (install Debian package {pkg})"))
        .collect();
    assert!(
        missing.is_empty(),
        "the distribution suite cannot run, missing: {}; run .ci/install-deps as root",
        missing.join(", ")
    );
    assert!(
        nix::unistd::geteuid().is_root(),
        "the distribution suite must run as root (debootstrap, systemd-nspawn, apt in the \
         containers); run `cargo test --test distro` as root"
    );
}

/// Runs a command, copying its stdout lines to stderr as they come; returns (success, lines).
fn run_streaming(cmd: &mut Command) -> (bool, Vec<String>) {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let mut lines = Vec::new();
    let stdout = child.stdout.take().expect("piped stdout");
    for line in BufReader::new(stdout).lines() {
        let line = line.expect("reading the command's output");
        let _ = writeln!(std::io::stderr(), "{line}");
        lines.push(line);
    }
    let status = child.wait().expect("waiting for the command");
    (status.success(), lines)
}

/// Builds target/debian/lockwarden_*.deb from this work tree (once per test binary).
fn package(built: &mut Option<PathBuf>) -> PathBuf {
    if let Some(deb) = built {
        return deb.clone();
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let started = Instant::now();
    let (ok, lines) = run_streaming(Command::new("bash").arg(root.join("scripts/build-deb.sh")));
    let deb = lines.last().map(PathBuf::from).unwrap_or_default();
    assert!(
        ok && deb.is_file(),
        "scripts/build-deb.sh failed after {:.0} s:\n{}",
        started.elapsed().as_secs_f64(),
        lines.join("\n")
    );
    *built = Some(deb.clone());
    deb
}

fn suite(name: &str) {
    check_prerequisites();
    let mut guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let deb = package(&mut guard);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/distro/run.sh");
    let started = Instant::now();
    let (ok, lines) = run_streaming(
        Command::new("bash")
            .arg(&script)
            .arg(name)
            .arg("--deb")
            .arg(&deb),
    );
    let failures: Vec<&str> = lines
        .iter()
        .filter(|l| l.starts_with("FAIL "))
        .map(String::as_str)
        .collect();
    let passes = lines.iter().filter(|l| l.starts_with("PASS ")).count();
    let table = lines
        .iter()
        .any(|l| l.starts_with(&format!("--- end of {name} table")));
    assert!(
        ok && failures.is_empty() && table && passes > 0,
        "distribution suite {name} failed after {:.0} s ({passes} passed, table printed: \
         {table}):\n{}\n\nfull output:\n{}",
        started.elapsed().as_secs_f64(),
        failures.join("\n"),
        lines.join("\n")
    );
}

#[test]
fn debian_12_bookworm() {
    suite("bookworm");
}

#[test]
fn debian_13_trixie() {
    suite("trixie");
}
