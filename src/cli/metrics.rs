//! `lockwarden metrics` (issue 18, docs/operators.md §11): lockwardend's counters as text for
//! Prometheus, on stdout or atomically into node_exporter's textfile collector directory.
//!
//! Why a file and no port: lockwarden, like virtlockd, listens on no TCP port. The packaged
//! `lockwarden-metrics.timer` runs `lockwarden metrics --textfile DIR` every 30 s, and
//! node_exporter (which already serves the host's metrics) publishes the file. Its textfile
//! collector reads the Prometheus text format 0.0.4, not OpenMetrics, so `--textfile` writes
//! that format unless `--format` says otherwise.

use super::{Cli, EXIT_DAEMON, EXIT_OK, EXIT_PROBLEM, ask};
use crate::metrics::{Format, render, render_down};
use crate::protocol::{Request, Response};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// The file `--textfile DIR` writes (node_exporter reads `*.prom`).
pub const TEXTFILE: &str = "lockwarden.prom";

/// `--format` text to a format.
pub fn parse_format(s: &str) -> Result<Format, String> {
    match s {
        "openmetrics" => Ok(Format::OpenMetrics),
        "prometheus" => Ok(Format::Prometheus),
        other => Err(format!(
            "--format: '{other}' is not a format; use openmetrics or prometheus"
        )),
    }
}

fn fetch(cli: &Cli) -> Result<crate::metrics::Snapshot, String> {
    match ask(cli, &Request::Metrics)? {
        Response::Metrics(s) => Ok(*s),
        Response::Error(e) => Err(e.message),
        other => Err(format!("unexpected answer to metrics: {other:?}")),
    }
}

/// Print the metrics, or write them into `--textfile DIR`. Exit 0 when written; 3 when the
/// daemon cannot be reached (with `--textfile`, `lockwarden_up 0` is written all the same, so
/// an alert on it fires); 1 when the file cannot be written.
pub fn run(cli: &Cli) -> u8 {
    let format = cli.format.unwrap_or(if cli.textfile.is_some() {
        Format::Prometheus
    } else {
        Format::OpenMetrics
    });
    let (text, code) = match fetch(cli) {
        Ok(s) => (render(&s, format), EXIT_OK),
        Err(e) => {
            eprintln!("lockwarden: {e}");
            if cli.textfile.is_none() {
                return EXIT_DAEMON;
            }
            (render_down(format), EXIT_DAEMON)
        }
    };
    match &cli.textfile {
        None => {
            let mut out = std::io::stdout().lock();
            if out
                .write_all(text.as_bytes())
                .and_then(|()| out.flush())
                .is_err()
            {
                return EXIT_PROBLEM;
            }
            code
        }
        Some(dir) => match write_atomically(dir, TEXTFILE, text.as_bytes()) {
            Ok(()) => code,
            Err(e) => {
                eprintln!("lockwarden: {e}");
                EXIT_PROBLEM
            }
        },
    }
}

/// Write `bytes` to `dir/name` so that a reader sees the old file or the new one, never a
/// part: a temporary file in the same directory (its name does not end in `.prom`, so
/// node_exporter skips it), written, flushed to disk, mode 0644, then renamed over `name`.
pub fn write_atomically(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), String> {
    let meta = std::fs::metadata(dir).map_err(|e| {
        format!(
            "the textfile directory {} cannot be used: {e}; install prometheus-node-exporter \
             (Debian creates /var/lib/prometheus/node-exporter) or point --textfile at the \
             directory node_exporter's --collector.textfile.directory names",
            dir.display()
        )
    })?;
    if !meta.is_dir() {
        return Err(format!("{} is not a directory", dir.display()));
    }
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let target = dir.join(name);
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &target)
    })();
    result.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        format!("cannot write {}: {e}", target.display())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn textfile_is_replaced_whole_and_leaves_no_temporary_file() {
        let d = tempfile::tempdir().unwrap();
        write_atomically(d.path(), TEXTFILE, b"a 1\n").unwrap();
        write_atomically(d.path(), TEXTFILE, b"a 2\n").unwrap();
        assert_eq!(
            std::fs::read_to_string(d.path().join(TEXTFILE)).unwrap(),
            "a 2\n"
        );
        let names: Vec<_> = std::fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from(TEXTFILE)]);
        let e = write_atomically(&d.path().join("missing"), TEXTFILE, b"").unwrap_err();
        assert!(e.contains("prometheus-node-exporter"), "{e}");
    }
}
