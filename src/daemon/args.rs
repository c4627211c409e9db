//! The command line (docs/interfaces.md §1), parsed by hand.
//!
//! Why by hand: five options need no parser crate, and owning the parser means the usage errors
//! say exactly what was wrong. Paths stay `OsString`s so any byte sequence the kernel accepts
//! as a path works.

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::path::PathBuf;

/// The usage text printed by `--help`.
pub const USAGE: &str = "\
Usage: lockwardend [OPTION]...
Hold libvirt's disk locks (OFD locks) for running VMs, in the foreground.

  --config FILE        configuration file (default /etc/libvirt/lockwardend.conf for root,
                       $XDG_CONFIG_HOME/libvirt/lockwardend.conf otherwise; missing = defaults)
  --socket PATH        main socket for the lockwarden plugin (overrides the config file)
  --admin-socket PATH  admin socket for the lockwarden CLI (overrides the config file)
  --pid-file FILE      pid file; a second daemon on the same pid file refuses to start
  -v, --verbose        log debug messages
  -h, --help           show this help and exit
  -V, --version        show the version and exit

Under systemd the sockets may be passed with LISTEN_FDS (names lockwardend.socket and
lockwardend-admin.socket); READY=1 is sent to NOTIFY_SOCKET once the daemon serves.
";

/// Options for a daemon run.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Args {
    pub config: Option<PathBuf>,
    pub socket: Option<PathBuf>,
    pub admin_socket: Option<PathBuf>,
    pub pid_file: Option<PathBuf>,
    pub verbose: bool,
}

/// What the command line asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    Run(Args),
    Help,
    Version,
}

/// A command line that cannot be understood; the text says which argument and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UsageError(pub String);

impl fmt::Display for UsageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Parse the arguments after the program name. `--opt VALUE` and `--opt=VALUE` both work.
pub fn parse<I: IntoIterator<Item = OsString>>(args: I) -> Result<Command, UsageError> {
    let mut out = Args::default();
    let mut it = args.into_iter();
    while let Some(arg) = it.next() {
        let (name, inline) = split_inline(&arg);
        let slot = match name.as_str() {
            "-h" | "--help" => return Ok(Command::Help),
            "-V" | "--version" => return Ok(Command::Version),
            "-v" | "--verbose" => {
                if inline.is_some() {
                    return Err(UsageError(format!("option '{name}' takes no value")));
                }
                out.verbose = true;
                continue;
            }
            "--config" => &mut out.config,
            "--socket" => &mut out.socket,
            "--admin-socket" => &mut out.admin_socket,
            "--pid-file" => &mut out.pid_file,
            _ => {
                return Err(UsageError(format!(
                    "unknown argument '{}'",
                    arg.to_string_lossy().escape_debug()
                )));
            }
        };
        let value = match inline {
            Some(v) => v,
            None => it
                .next()
                .ok_or_else(|| UsageError(format!("option '{name}' needs a value")))?,
        };
        if value.is_empty() {
            return Err(UsageError(format!(
                "option '{name}' needs a non-empty value"
            )));
        }
        if slot.is_some() {
            return Err(UsageError(format!("option '{name}' given twice")));
        }
        *slot = Some(PathBuf::from(value));
    }
    Ok(Command::Run(out))
}

/// Split `--name=value` into the name and the value; other arguments have no inline value.
fn split_inline(arg: &OsStr) -> (String, Option<OsString>) {
    use std::os::unix::ffi::OsStrExt;
    let bytes = arg.as_bytes();
    let eq = bytes.iter().position(|b| *b == b'=');
    if let (true, Some(eq)) = (bytes.starts_with(b"--"), eq) {
        let (name, value) = bytes.split_at(eq);
        let value = value.get(1..).unwrap_or_default();
        return (
            String::from_utf8_lossy(name).into_owned(),
            Some(OsStr::from_bytes(value).to_os_string()),
        );
    }
    (arg.to_string_lossy().into_owned(), None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(args: &[&str]) -> Result<Command, UsageError> {
        parse(args.iter().map(OsString::from))
    }

    #[test]
    fn all_options() {
        let c = p(&[
            "--config",
            "/a.conf",
            "--socket=/s",
            "--admin-socket",
            "/as",
            "--pid-file",
            "/p",
            "-v",
        ])
        .unwrap();
        assert_eq!(
            c,
            Command::Run(Args {
                config: Some("/a.conf".into()),
                socket: Some("/s".into()),
                admin_socket: Some("/as".into()),
                pid_file: Some("/p".into()),
                verbose: true,
            })
        );
        assert_eq!(p(&[]).unwrap(), Command::Run(Args::default()));
        assert_eq!(p(&["--help"]).unwrap(), Command::Help);
        assert_eq!(p(&["-V"]).unwrap(), Command::Version);
    }

    #[test]
    fn usage_errors_name_the_argument() {
        assert!(p(&["--sockt", "/x"]).unwrap_err().0.contains("'--sockt'"));
        assert!(p(&["--socket"]).unwrap_err().0.contains("needs a value"));
        assert!(p(&["--socket="]).unwrap_err().0.contains("non-empty"));
        assert!(
            p(&["--socket", "/a", "--socket", "/b"])
                .unwrap_err()
                .0
                .contains("twice")
        );
        assert!(
            p(&["--verbose=1"])
                .unwrap_err()
                .0
                .contains("takes no value")
        );
    }
}
