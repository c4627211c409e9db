//! Every promise the README, docs/, the man pages, the shipped configuration files and the augeas
//! lenses make is true: each test here holds one claim (or one family of claims) against the
//! real code — the config parsers, the real `lockwardend` and `lockwarden` binaries, the real
//! plugin through the C test host, `augparse` over the real lenses — or, where the claim is
//! about the documents themselves (which keys, which values, which texts), compares the
//! documents with what the code accepts or produces.
//!
//! Run as root (the root_squash test chowns a directory). `augparse` (augeas-tools) must be
//! installed; the lens test fails, never skips, without it.

mod common;

use common::daemon::TestDaemon;
use common::locks::hold_byte0;
use common::proto::acquire_request as acquire;
use common::proto::{Client, Proc, err, eventually, excl, ok, owner_for, sleeper};
use common::{image, tempdir};
use lockwarden::config::ConfFile;
use lockwarden::plugin_conf::Settings as PluginSettings;
use lockwarden::protocol::{
    ErrorKind, LeaseMode, LeaseSpec, LockTarget, Owner, Request, ResourceKind, Response,
};
use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

// ---------------------------------------------------------------------------------------------
// The documents

fn repo(rel: &str) -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join(rel);
    fs::read_to_string(&p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()))
}

const DAEMON_MAN: &str = "meson-install/man/lockwardend.8.in";
const PLUGIN_MAN: &str = "meson-install/man/qemu-lockwarden.conf.5.in";
const CLI_MAN: &str = "meson-install/man/lockwarden.1.in";
const PROTO_MAN: &str = "meson-install/man/lockwarden-protocol.7.in";
const DAEMON_CONF: &str = "meson-install/conf/lockwardend.conf.in";
const PLUGIN_CONF: &str = "meson-install/conf/driver-lockwarden.conf.in";
const DAEMON_LENS: &str = "meson-install/augeas/libvirt_lockwardend.aug";
const PLUGIN_LENS: &str = "meson-install/augeas/libvirt_lockwarden.aug";
const UNIT: &str = "meson-install/systemd/lockwardend.service.in";

/// Every document an operator reads: README, docs/ (but docs/hardening.md, which the
/// coordinator of the hardening work keeps, and docs/benchmarks.md, a dated measurement log),
/// the man pages and the shipped config files.
fn operator_documents() -> Vec<(String, String)> {
    let mut names = vec!["README.md".to_string()];
    for dir in ["docs", "meson-install/man", "meson-install/conf"] {
        let abs = Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
        let mut entries: Vec<String> = fs::read_dir(&abs)
            .unwrap_or_else(|e| panic!("listing {}: {e}", abs.display()))
            .map(|e| {
                e.expect("dir entry")
                    .file_name()
                    .to_string_lossy()
                    .into_owned()
            })
            .filter(|n| n.ends_with(".md") || n.ends_with(".in"))
            .filter(|n| n != "hardening.md" && n != "benchmarks.md")
            .map(|n| format!("{dir}/{n}"))
            .collect();
        entries.sort();
        names.extend(entries);
    }
    names
        .into_iter()
        .map(|n| {
            let text = repo(&n);
            (n, text)
        })
        .collect()
}

/// Lower case, every run of white space one blank: a phrase is found across line breaks.
fn flat(text: &str) -> String {
    text.replace("\\-", "-")
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .to_lowercase()
}

/// The string literal that follows `from` in `text` (`... ("key" ...`).
fn next_literal(text: &str) -> Option<&str> {
    let open = text.find('"')?;
    let rest = &text[open + 1..];
    let close = rest.find('"')?;
    Some(&rest[..close])
}

/// The keys a parser takes, read from its source: every `.take_*("key", ...)` and
/// `lockspace_dir(&mut conf, "key")` in the body of `func`. Every other way of reaching the
/// configuration (`&mut conf` passed elsewhere, a take without a literal key) fails the test,
/// so the list cannot silently miss a key; each key found is then confirmed against the real
/// parser by the callers.
fn parser_keys(src_rel: &str, func: &str) -> BTreeSet<String> {
    let src = repo(src_rel);
    let start = src
        .find(func)
        .unwrap_or_else(|| panic!("{src_rel}: no `{func}`"));
    let body = &src[start..];
    let body = &body[..body.find("\n}\n").expect("end of the function")];
    let mut keys = BTreeSet::new();
    for (i, _) in body.match_indices(".take_") {
        let call = &body[i..];
        let paren = call.find('(').expect("a take call");
        assert!(
            call[paren + 1..].starts_with('"'),
            "{src_rel}: a take call without a literal key: {}; update tests/claims.rs",
            &call[..call.len().min(60)]
        );
        keys.insert(next_literal(&call[paren..]).expect("key").to_string());
    }
    let mut helper_calls = 0;
    for (i, _) in body.match_indices("&mut conf") {
        let before = &body[..i];
        assert!(
            before.ends_with("lockspace_dir("),
            "{src_rel}: the configuration is passed to something this test does not know: {}",
            &body[i.saturating_sub(40)..i + 9]
        );
        keys.insert(next_literal(&body[i..]).expect("key").to_string());
        helper_calls += 1;
    }
    if src_rel.contains("plugin") {
        assert_eq!(helper_calls, 3, "three lockspace directories");
    }
    assert!(keys.len() >= 8, "{src_rel}: only {keys:?}");
    keys
}

fn daemon_parser_keys() -> BTreeSet<String> {
    parser_keys("src/daemon/settings.rs", "pub fn resolve(")
}

fn plugin_parser_keys() -> BTreeSet<String> {
    parser_keys("src/plugin_conf.rs", "pub fn from_conf(")
}

/// Lines of `text` from the one starting with `from` up to (not including) the next line
/// starting with `until`.
fn section<'a>(text: &'a str, from: &str, until: &str) -> Vec<&'a str> {
    let mut lines = text.lines().skip_while(|l| !l.starts_with(from));
    let first = lines
        .next()
        .unwrap_or_else(|| panic!("no section {from:?}"));
    std::iter::once(first)
        .chain(lines.take_while(|l| !l.starts_with(until)))
        .collect()
}

/// The keys a man page documents in a section: `.BR key " (type, default ...)"` items.
fn man_keys(man_rel: &str, from: &str, until: &str) -> BTreeSet<String> {
    let text = repo(man_rel);
    section(&text, from, until)
        .into_iter()
        .filter_map(|l| l.strip_prefix(".BR "))
        .filter(|l| l.contains(" \" ("))
        .map(|l| {
            l.split_whitespace()
                .next()
                .expect("key")
                .replace("\\-", "-")
        })
        .collect()
}

fn daemon_man_keys() -> BTreeSet<String> {
    man_keys(DAEMON_MAN, ".SH CONFIGURATION", ".SH SYSTEMD")
}

fn plugin_man_keys() -> BTreeSet<String> {
    man_keys(PLUGIN_MAN, ".SH KEYS SHARED WITH LOCKD", ".SH LEASES")
}

/// The `#key = value` lines of a shipped config file, in order.
fn conf_settings(conf_rel: &str) -> Vec<(String, String)> {
    repo(conf_rel)
        .lines()
        .filter_map(|l| l.strip_prefix('#'))
        .filter_map(|l| l.split_once(" = "))
        .filter(|(k, _)| !k.is_empty() && k.chars().all(|c| c.is_ascii_lowercase() || c == '_'))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn conf_keys(conf_rel: &str) -> BTreeSet<String> {
    let settings = conf_settings(conf_rel);
    let keys: BTreeSet<String> = settings.iter().map(|(k, _)| k.clone()).collect();
    assert_eq!(keys.len(), settings.len(), "{conf_rel}: a key shown twice");
    keys
}

/// The keys a lens accepts: its `*_entry "key"` uses.
fn lens_keys(lens_rel: &str) -> BTreeSet<String> {
    let text = repo(lens_rel);
    text.match_indices("_entry \"")
        .map(|(i, _)| next_literal(&text[i..]).expect("key").to_string())
        .collect()
}

/// The keys README's Configuration section lists in its bullet starting with `bullet`.
fn readme_keys(bullet: &str) -> BTreeSet<String> {
    let text = repo("README.md");
    let sec = section(&text, "## Configuration", "## ");
    let mut out = BTreeSet::new();
    let mut inside = false;
    for l in sec {
        if l.starts_with("- ") {
            inside = l.starts_with(bullet);
        } else if l.trim().is_empty() {
            inside = false;
        }
        if inside {
            for (n, part) in l.split('`').enumerate() {
                if n % 2 == 1 && part.chars().all(|c| c.is_ascii_lowercase() || c == '_') {
                    out.insert(part.to_string());
                }
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// The parsers, run for real

/// The plugin's parser (the code `drvInit` runs), on `text` as a whole file.
fn plugin_parse(text: &str) -> Result<PluginSettings, String> {
    let path = Path::new("/etc/libvirt/qemu-lockwarden.conf");
    let conf = ConfFile::parse(path, text).map_err(|e| e.to_string())?;
    PluginSettings::from_conf(conf, PathBuf::from("/run/lockwarden/lockwardend.sock"))
        .map_err(|e| e.to_string())
}

/// The real `lockwardend` binary's verdict on the setting `line` (for `key`): Ok when it
/// accepts it. A second, unknown key `zz_sentinel` follows, so the daemon always stops at its
/// configuration and starts nothing: it names `zz_sentinel` when `line` was fine, `key` when not.
fn daemon_accepts(key: &str, line: &str) -> Result<(), String> {
    let dir = tempdir();
    let conf = dir.path().join("lockwardend.conf");
    fs::write(&conf, format!("{line}\nzz_sentinel = 1\n")).expect("write conf");
    let out = Command::new(env!("CARGO_BIN_EXE_lockwardend"))
        .arg("--config")
        .arg(&conf)
        .arg("--socket")
        .arg(dir.path().join("s.sock"))
        .arg("--admin-socket")
        .arg(dir.path().join("a.sock"))
        .arg("--pid-file")
        .arg(dir.path().join("p.pid"))
        .env_remove("LISTEN_FDS")
        .env_remove("LISTEN_PID")
        .env_remove("NOTIFY_SOCKET")
        .stdin(Stdio::null())
        .output()
        .expect("running lockwardend");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{line:?}: {stderr}");
    assert!(stderr.contains("configuration error"), "{line:?}: {stderr}");
    if stderr.contains("key 'zz_sentinel': unknown key") {
        Ok(())
    } else if stderr.contains(&format!("key '{key}'")) {
        Err(stderr)
    } else {
        panic!("{line:?}: the daemon's error names neither {key} nor the sentinel: {stderr}")
    }
}

// ---------------------------------------------------------------------------------------------
// Keys: parser == man page == shipped file == lens == README, both ways, both files

fn assert_same(what: &str, parser: &BTreeSet<String>, documented: &BTreeSet<String>) {
    let missing: Vec<&String> = parser.difference(documented).collect();
    let extra: Vec<&String> = documented.difference(parser).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "{what}: parsed but not documented {missing:?}; documented but not parsed {extra:?}"
    );
}

#[test]
fn lockwardend_conf_keys_are_the_same_in_the_parser_the_man_page_the_shipped_file_the_lens_and_the_readme()
 {
    let parser = daemon_parser_keys();
    assert_eq!(parser.len(), 16, "{parser:?}");
    assert_same("lockwardend(8)", &parser, &daemon_man_keys());
    assert_same(DAEMON_CONF, &parser, &conf_keys(DAEMON_CONF));
    assert_same(DAEMON_LENS, &parser, &lens_keys(DAEMON_LENS));
    assert_same("README.md, Daemon", &parser, &readme_keys("- Daemon:"));
    // The real daemon knows every one of them (with the value the shipped file shows) and
    // refuses a key it does not know.
    for (key, value) in conf_settings(DAEMON_CONF) {
        daemon_accepts(&key, &format!("{key} = {value}"))
            .unwrap_or_else(|e| panic!("{DAEMON_CONF} shows {key} = {value}, refused: {e}"));
    }
    let e = daemon_accepts("socket_path", "socket_path = \"/x\"").unwrap_err();
    assert!(e.contains("unknown key"), "{e}");
}

#[test]
fn plugin_conf_keys_are_the_same_in_the_parser_the_man_page_the_shipped_file_the_lens_and_the_readme()
 {
    let parser = plugin_parser_keys();
    assert_eq!(parser.len(), 8, "{parser:?}");
    assert_same("qemu-lockwarden.conf(5)", &parser, &plugin_man_keys());
    assert_same(PLUGIN_CONF, &parser, &conf_keys(PLUGIN_CONF));
    assert_same(PLUGIN_LENS, &parser, &lens_keys(PLUGIN_LENS));
    assert_same("README.md, Plugin", &parser, &readme_keys("- Plugin:"));
    for (key, value) in conf_settings(PLUGIN_CONF) {
        plugin_parse(&format!("{key} = {value}\n"))
            .unwrap_or_else(|e| panic!("{PLUGIN_CONF} shows {key} = {value}, refused: {e}"));
    }
    let e = plugin_parse("file_lockspace_dri = \"/x\"\n").unwrap_err();
    assert!(e.contains("unknown key"), "{e}");
}

/// "Every setting is shown commented out with its default" (the shipped plugin file): each
/// shown value is the parser's default, except the three lockspace directories, which are unset
/// by default and must say so right above their example.
#[test]
fn the_shipped_plugin_file_shows_the_defaults_and_labels_the_lockspace_examples() {
    let defaults = plugin_parse("").expect("an empty file is all defaults");
    let text = repo(PLUGIN_CONF);
    let lines: Vec<&str> = text.lines().collect();
    for (key, value) in conf_settings(PLUGIN_CONF) {
        let line = format!("#{key} = {value}");
        let at = lines.iter().position(|l| *l == line).expect("the line");
        if key.ends_with("_lockspace_dir") {
            let above = lines[at - 1];
            assert!(
                above.starts_with("# Default: unset") && above.contains("Example"),
                "{PLUGIN_CONF}: the example {line:?} must be labelled as such, found {above:?}"
            );
            let set = plugin_parse(&format!("{key} = {value}\n")).expect("example parses");
            assert_ne!(set, defaults, "{key}: an example path is not the default");
            continue;
        }
        let shown = plugin_parse(&format!("{key} = {value}\n")).expect("shown value parses");
        assert_eq!(
            shown, defaults,
            "{PLUGIN_CONF}: `{key} = {value}` is not the default"
        );
    }
}

/// The `(integer A to B, default D)` a man page gives for `key`.
fn man_range(man_rel: &str, key: &str) -> Option<(i64, i64, i64)> {
    let text = repo(man_rel);
    let line = text
        .lines()
        .find(|l| l.starts_with(&format!(".BR {key} \"")))?;
    let rest = &line[line.find("(integer ")? + "(integer ".len()..];
    let (a, rest) = rest.split_once(" to ")?;
    let (b, rest) = rest.split_once(", default ")?;
    let d = rest.trim_end_matches(")\"").trim_end_matches(')');
    Some((a.parse().ok()?, b.parse().ok()?, d.parse().ok()?))
}

/// The integer ranges and defaults lockwardend(8) and qemu-lockwarden.conf(5) state are the
/// ones the real parsers apply, and the shipped files show the same defaults.
#[test]
fn man_page_ranges_and_defaults_are_the_parsers() {
    let mut checked = 0;
    for key in daemon_parser_keys() {
        let Some((lo, hi, default)) = man_range(DAEMON_MAN, &key) else {
            continue;
        };
        checked += 1;
        for n in [lo, hi, default] {
            daemon_accepts(&key, &format!("{key} = {n}"))
                .unwrap_or_else(|e| panic!("lockwardend(8) allows {key} = {n}: {e}"));
        }
        for n in [lo - 1, hi + 1] {
            assert!(
                daemon_accepts(&key, &format!("{key} = {n}")).is_err(),
                "lockwardend(8) says {key} is {lo} to {hi}, but {n} is accepted"
            );
        }
        let shown = conf_settings(DAEMON_CONF)
            .into_iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v);
        assert_eq!(shown, Some(default.to_string()), "{DAEMON_CONF}: {key}");
    }
    assert_eq!(
        checked, 10,
        "lockwardend(8) gives a range for each integer key"
    );
    let (lo, hi, default) = man_range(PLUGIN_MAN, "request_timeout_ms").expect("man(5) range");
    for n in [lo, hi, default] {
        plugin_parse(&format!("request_timeout_ms = {n}\n")).expect("in range");
    }
    for n in [lo - 1, hi + 1] {
        plugin_parse(&format!("request_timeout_ms = {n}\n")).expect_err("out of range");
    }
    assert_eq!(
        plugin_parse("").expect("defaults").request_timeout_ms as i64,
        default
    );
}

// ---------------------------------------------------------------------------------------------
// Values: the lenses against the parsers

#[derive(Clone, Copy, PartialEq, Eq)]
enum Rule {
    Int,
    Bool,
    Path,
    Choice(&'static [&'static str]),
}

/// How each key's value is written and checked (from the parsers' `take_*` calls).
fn rule(key: &str) -> Rule {
    match key {
        "socket" | "admin_socket" | "pid_file" | "file_lockspace_dir" | "lvm_lockspace_dir"
        | "scsi_lockspace_dir" | "daemon_socket" | "lease_dir" | "watchdog_device" => Rule::Path,
        "auto_disk_leases" | "require_lease_for_disks" => Rule::Bool,
        "log_level" => Rule::Choice(&["error", "warn", "info", "debug"]),
        "readonly_disks" => Rule::Choice(&["shared", "ignore"]),
        _ => Rule::Int,
    }
}

/// One value to try: its text after `key = `, what the lens stores for it, and whether it is
/// written in the canonical form (double quotes; decimal, no sign, no leading zero).
struct Candidate {
    text: String,
    stored: String,
    canonical: bool,
}

fn canon_str(s: &str) -> Candidate {
    Candidate {
        text: format!("\"{s}\""),
        stored: s.to_string(),
        canonical: true,
    }
}

fn other_form(text: &str) -> Candidate {
    Candidate {
        text: text.to_string(),
        stored: String::new(),
        canonical: false,
    }
}

fn candidates(key: &str, man_rel: &str) -> Vec<Candidate> {
    let mut out = Vec::new();
    match rule(key) {
        Rule::Int | Rule::Bool => {
            let mut ns: BTreeSet<i64> = [0, 1, 2, 5, 50, 99, 100, 101, 65535, 65536, 65537]
                .into_iter()
                .collect();
            let mut p = 1i64;
            for _ in 0..10 {
                ns.extend([p - 1, p, p + 1, 2 * p, 3 * p, 6 * p, 9 * p]);
                p *= 10;
            }
            ns.extend([
                599_999, 600_000, 600_001, 3_599_999, 3_600_000, 3_600_001, 3_700_000, 86_399_999,
                86_400_000, 86_400_001, 86_500_000, 87_000_000, 99_999_999,
            ]);
            if let Some((lo, hi, d)) = man_range(man_rel, key) {
                ns.extend([lo - 1, lo, lo + 1, hi - 1, hi, hi + 1, d]);
            }
            for n in ns.into_iter().filter(|n| *n >= 0) {
                out.push(Candidate {
                    text: n.to_string(),
                    stored: n.to_string(),
                    canonical: true,
                });
            }
            for t in [
                "-1", "+5", "+1", "007", "00", "01", "5;", "1;", "\"5\"", "'1'", "[1]",
            ] {
                out.push(other_form(t));
            }
            out.push(other_form("0x10"));
        }
        Rule::Path => {
            for s in [
                "/var/lib/libvirt/lockwarden/files",
                "/",
                "/with space/x",
                "/has#hash",
                "relative/dir",
                "",
                "./x",
            ] {
                out.push(canon_str(s));
            }
            // Around the 107-byte limit of a socket path, in ASCII and in two-byte characters.
            for n in [105, 106, 107, 200] {
                out.push(canon_str(&format!("/{}", "a".repeat(n))));
            }
            out.push(canon_str(&format!("/{}é", "a".repeat(104))));
            out.push(canon_str(&format!("/{}é", "a".repeat(105))));
            out.push(canon_str(&format!("/{}", "é".repeat(53))));
            for t in [
                "'/srv/locks'",
                "\"\"\"/srv/locks\"\"\"",
                "5",
                "[\"/a\"]",
                "\"/a\";",
            ] {
                out.push(other_form(t));
            }
        }
        Rule::Choice(choices) => {
            for c in choices {
                out.push(canon_str(c));
                out.push(canon_str(&c.to_uppercase()));
                out.push(canon_str(&format!("{c} ")));
                out.push(other_form(&format!("'{c}'")));
            }
            for s in ["", "maybe", "verbose"] {
                out.push(canon_str(s));
            }
            out.push(other_form("1"));
        }
    }
    out
}

/// A string literal for an augeas test file.
fn aug_literal(s: &str) -> String {
    let mut o = String::from("\"");
    for c in s.chars() {
        match c {
            '\\' => o.push_str("\\\\"),
            '"' => o.push_str("\\\""),
            '\n' => o.push_str("\\n"),
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

/// Try every candidate value of every key on the lens (one augparse run, one test per value)
/// and on the real parser: a canonical value is accepted by the lens exactly when the parser
/// accepts it, and stored unchanged; any other form is refused by the lens. So a value the
/// lens accepts is always one the parser accepts.
fn lens_matches_parser(
    lens_rel: &str,
    module: &str,
    man_rel: &str,
    keys: &BTreeSet<String>,
    parser: &dyn Fn(&str, &str) -> bool,
) {
    let mut tests = vec![format!("module Test_claims_{} =", module.to_lowercase())];
    let mut what = Vec::new();
    let mut canonical_accepted = 0;
    for key in keys {
        for c in candidates(key, man_rel) {
            let line = format!("{key} = {}\n", c.text);
            let parser_ok = parser(key, &line);
            let lens_ok = c.canonical && parser_ok;
            if lens_ok {
                canonical_accepted += 1;
                tests.push(format!(
                    "   test {module}.lns get {} = {{ {} = {} }}",
                    aug_literal(&line),
                    aug_literal(key),
                    aug_literal(&c.stored)
                ));
            } else {
                tests.push(format!(
                    "   test {module}.lns get {} = *",
                    aug_literal(&line)
                ));
            }
            what.push(format!(
                "{line:?}: the parser {}, so the lens must {}",
                if parser_ok {
                    "accepts it"
                } else {
                    "refuses it"
                },
                if lens_ok {
                    "accept it unchanged"
                } else if parser_ok {
                    "refuse this non-canonical form"
                } else {
                    "refuse it"
                }
            ));
        }
    }
    assert!(canonical_accepted > 50, "too few accepted values tried");
    let dir = tempdir();
    let file = dir
        .path()
        .join(format!("test_claims_{}.aug", module.to_lowercase()));
    fs::write(&file, tests.join("\n") + "\n").expect("write augeas test");
    let lens_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(lens_rel);
    let out = Command::new("augparse")
        .arg("-I")
        .arg(lens_dir.parent().expect("lens dir"))
        .arg(&file)
        .output()
        .unwrap_or_else(|e| panic!("running augparse (install augeas-tools): {e}"));
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let stdout = String::from_utf8_lossy(&out.stdout);
        // "file.aug:LINE.COL-...": line 1 is the module line, so test N is on line N + 1.
        let failing = format!("{stdout}{stderr}")
            .split(&format!("{}:", file.display()))
            .nth(1)
            .and_then(|r| r.split('.').next())
            .and_then(|n| n.parse::<usize>().ok())
            .and_then(|n| what.get(n.wrapping_sub(2)).cloned())
            .unwrap_or_default();
        panic!("{lens_rel} and the parser disagree: {failing}\n{stdout}{stderr}");
    }
}

#[test]
fn the_daemon_lens_accepts_only_values_lockwardend_accepts() {
    let keys = daemon_parser_keys();
    lens_matches_parser(
        DAEMON_LENS,
        "Libvirt_lockwardend",
        DAEMON_MAN,
        &keys,
        &|key, line| daemon_accepts(key, line.trim_end()).is_ok(),
    );
}

#[test]
fn the_plugin_lens_accepts_only_values_the_plugin_accepts() {
    let keys = plugin_parser_keys();
    lens_matches_parser(
        PLUGIN_LENS,
        "Libvirt_lockwarden",
        PLUGIN_MAN,
        &keys,
        &|_, line| plugin_parse(line).is_ok(),
    );
}

/// "daemon_socket: an absolute path of at most 107 bytes" (man 5, the shipped file, README):
/// the 107-byte path is taken, the 108-byte one refused with the reason, counted in bytes.
#[test]
fn daemon_socket_is_limited_to_107_bytes_as_documented() {
    let ok107 = format!("/{}", "s".repeat(106));
    let long = format!("/{}", "s".repeat(107));
    assert_eq!(
        plugin_parse(&format!("daemon_socket = \"{ok107}\"\n"))
            .expect("107 bytes")
            .daemon_socket,
        PathBuf::from(&ok107)
    );
    let e = plugin_parse(&format!("daemon_socket = \"{long}\"\n")).unwrap_err();
    assert!(e.contains("108 bytes") && e.contains("at most 107"), "{e}");
    let wide = format!("/{}é", "s".repeat(105));
    assert_eq!(wide.len(), 108);
    plugin_parse(&format!("daemon_socket = \"{wide}\"\n")).expect_err("bytes, not characters");
    for doc in [PLUGIN_MAN, PLUGIN_CONF, "README.md"] {
        assert!(
            flat(&repo(doc)).contains("107 bytes"),
            "{doc} does not state the 107-byte limit of daemon_socket"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// The refusal texts in docs/protocol.md are the daemon's own

/// `text` with the variable parts (disk, uuid, host, time) replaced by placeholders.
fn normalise(text: &str, disk: &str, uuid: Option<&str>, host: Option<&str>) -> String {
    let mut t = text.replace(disk, "<disk>");
    if let Some(u) = uuid {
        t = t.replace(u, "<uuid>");
    }
    if let Some(h) = host {
        t = t.replace(&format!("on host {h} "), "on host <host> ");
    }
    // "since YYYY-MM-DD HH:MM:SS UTC"
    if let Some(i) = t.find("since ") {
        let start = i + "since ".len();
        let end = start + "2026-11-26 10:04:05 UTC".len();
        if t.get(start..end).is_some_and(|s| s.ends_with(" UTC")) {
            t.replace_range(start..end, "<time>");
        }
    }
    t
}

/// The error responses in docs/protocol.md's ```json response blocks.
fn protocol_doc_errors() -> Vec<lockwarden::protocol::ErrorReply> {
    let doc = repo("docs/protocol.md");
    let mut out = Vec::new();
    let mut lines = doc.lines();
    while let Some(line) = lines.next() {
        if line.trim() != "```json response" {
            continue;
        }
        let block: String = lines
            .by_ref()
            .take_while(|l| l.trim() != "```")
            .collect::<Vec<_>>()
            .join("\n");
        if let Response::Error(e) =
            serde_json::from_str::<Response>(&block).expect("example parses")
        {
            out.push(e);
        }
    }
    out
}

fn named_owner(p: &Proc, name: &str) -> Owner {
    let mut o = owner_for(p.pid(), name);
    o.name = name.to_string();
    o
}

#[test]
fn the_refusal_examples_in_protocol_md_are_the_texts_the_daemon_sends() {
    let examples = protocol_doc_errors();
    let d = TestDaemon::verbose("");
    let dir = tempdir();
    let host = common::proto::hostname();

    // 1. Busy, held by a VM of this daemon.
    let doc = examples
        .iter()
        .find(|e| {
            e.kind == ErrorKind::Busy && e.holder.as_ref().is_some_and(|h| h.vm_name.is_some())
        })
        .expect("protocol.md: a busy example naming a VM");
    let dh = doc.holder.as_ref().expect("holder");
    let vm_name = dh.vm_name.as_deref().expect("vm name");
    let img = image(dir.path(), "web1.qcow2");
    let (a, b) = (sleeper(), sleeper());
    let holder = named_owner(&a, vm_name);
    let other = named_owner(&b, "other");
    let mut c = Client::connect(&d.socket);
    ok(c.call(&acquire(&holder, vec![excl(&img)])));
    let real = err(c.call(&acquire(&other, vec![excl(&img)])), ErrorKind::Busy);
    let img_s = img.to_str().expect("utf-8");
    assert_eq!(
        normalise(
            &doc.message,
            doc.resource.as_deref().expect("resource"),
            dh.vm_uuid.as_deref(),
            dh.host.as_deref()
        ),
        normalise(&real.message, img_s, Some(&holder.uuid), Some(&host)),
        "docs/protocol.md's busy example is not the daemon's text"
    );

    // 2. Busy, locked by something that published no holder record (an OFD lock of ours).
    let doc = examples
        .iter()
        .find(|e| {
            e.kind == ErrorKind::Busy && e.holder.as_ref().is_some_and(|h| h.vm_name.is_none())
        })
        .expect("protocol.md: a busy example without a VM");
    let foreign = image(dir.path(), "db.raw");
    let f = hold_byte0(&foreign);
    let real = err(
        c.call(&acquire(&other, vec![excl(&foreign)])),
        ErrorKind::Busy,
    );
    assert_eq!(
        normalise(
            &doc.message,
            doc.resource.as_deref().expect("resource"),
            None,
            None
        ),
        normalise(&real.message, foreign.to_str().expect("utf-8"), None, None),
        "docs/protocol.md's busy example for a foreign lock is not the daemon's text"
    );
    assert_eq!(
        real.holder.as_ref().and_then(|h| h.mode),
        doc.holder.as_ref().and_then(|h| h.mode)
    );
    drop(f);

    // 3. Denied on a restricted lifetime handle. The owner is this test process itself (its
    // register comes from its own pid, which makes the connection its lifetime handle); it
    // holds no lease, so closing that connection leaves it alone.
    let doc = examples
        .iter()
        .find(|e| e.kind == ErrorKind::Denied)
        .expect("protocol.md: a denied example");
    let me = Owner {
        name: vm_name.to_string(),
        ..owner_for(std::process::id(), vm_name)
    };
    let mut h = Client::connect(&d.socket);
    ok(h.call(&Request::Register {
        owner: me,
        restrict: true,
    }));
    let real = err(h.call(&Request::Status), ErrorKind::Denied);
    assert_eq!(doc.message, real.message);
}

// ---------------------------------------------------------------------------------------------
// root_squash: the documented rule is the daemon's

/// The phrase the documents quote from the daemon's refusal of a squashed lockspace directory.
const SQUASHED: &str = "is owned by uid 65534, not by lockwardend's user (uid 0) or root";

#[test]
fn root_squash_advice_is_no_root_squash_for_the_lockspace_and_a_nobody_owned_directory_is_refused()
{
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "run as root: this test chowns"
    );
    let d = TestDaemon::verbose("");
    let base = tempdir();
    let p = sleeper();
    let o = named_owner(&p, "squashed");
    let dir = base.path().join("lockspace");
    fs::create_dir(&dir).expect("mkdir");
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).expect("chmod");
    // What a root_squash export makes of a directory root created: owned by nobody.
    std::os::unix::fs::chown(&dir, Some(65534), Some(65534)).expect("chown");
    let spec = |file: &str| LeaseSpec {
        name: format!("/images/{file}"),
        kind: ResourceKind::Disk,
        mode: LeaseMode::Exclusive,
        target: LockTarget::Lockspace {
            dir: dir.to_str().expect("utf-8").to_string(),
            file: file.to_string(),
            create_dir: false,
        },
    };
    let mut c = Client::connect(&d.socket);
    let e = err(c.call(&acquire(&o, vec![spec("a")])), ErrorKind::Invalid);
    assert!(e.message.contains(SQUASHED), "{}", e.message);
    // The documented rule: owned by root (on a no_root_squash export) works.
    std::os::unix::fs::chown(&dir, Some(0), Some(0)).expect("chown root");
    ok(c.call(&acquire(&o, vec![spec("a")])));

    for doc in ["README.md", "docs/operators.md", PLUGIN_MAN, PLUGIN_CONF] {
        let text = flat(&repo(doc));
        assert!(
            text.contains("no_root_squash"),
            "{doc}: no no_root_squash rule"
        );
        for stale in [
            "anonymous user can write",
            "writable by the anonymous user",
            ") can write",
        ] {
            assert!(!text.contains(stale), "{doc} still advises {stale:?}");
        }
    }
    for doc in ["README.md", "docs/operators.md", PLUGIN_MAN] {
        assert!(
            flat(&repo(doc)).contains(&flat(SQUASHED)),
            "{doc} must quote the daemon's refusal {SQUASHED:?}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// The plugin: the first successful drvInit wins (libxl-lockwarden.conf ignored after QEMU's)

#[test]
fn a_later_driver_init_keeps_the_first_config_and_does_not_read_its_own_file() {
    let d = TestDaemon::verbose("");
    let dir = tempdir();
    // The QEMU driver initialised first with a config pointing at `d`.
    let mut h = d.host();
    // Then the libxl driver, whose file names another socket and even has an error.
    let libxl = dir.path().join("libxl-lockwarden.conf");
    fs::write(
        &libxl,
        "daemon_socket = \"/nonexistent/libxl.sock\"\nno_such_key = 1\n",
    )
    .expect("write");
    h.cmd(&format!(
        "raw-init 1000000 0 {}",
        common::esc(libxl.to_str().expect("utf-8"))
    ))
    .expect_ok("second drvInit");
    let img = image(dir.path(), "xen.img");
    let vm = h.start("libxl");
    h.acquire(&vm, &[common::disk(&img)])
        .expect_ok("acquire through the first config");
    let mut c = Client::connect(&d.admin);
    let listed = ok(c.call(&Request::List));
    assert!(
        listed
            .iter()
            .any(|l| l.name == img.to_str().expect("utf-8")),
        "the lease went to the first config's daemon: {listed:?}"
    );
    for doc in [PLUGIN_MAN, PLUGIN_CONF, "README.md"] {
        let text = flat(&repo(doc));
        assert!(
            text.contains("libxl-lockwarden.conf") && text.contains("first"),
            "{doc} does not document the first-Init-wins rule"
        );
        assert!(
            text.contains("is ignored")
                || text.contains("is not read")
                || text.contains("not read at all"),
            "{doc} does not say libxl-lockwarden.conf is then ignored"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// The admin socket serves `lost`, and `lockwarden status` shows detections

#[test]
fn the_admin_socket_serves_lost_and_status_shows_lost_leases() {
    let d = TestDaemon::verbose("");
    let mut c = Client::connect(&d.admin);
    assert_eq!(ok(c.call(&Request::Lost)), vec![]);
    let proto = flat(&repo("docs/protocol.md"));
    assert!(
        proto.contains("accepts `status`, `list`, `lost`, `thaw` and `metrics` only"),
        "docs/protocol.md: the admin socket's requests"
    );
    let man7 = flat(&repo(PROTO_MAN));
    assert!(
        man7.contains(".b lost"),
        "lockwarden-protocol(7) does not list lost"
    );

    let out = Command::new(env!("CARGO_BIN_EXE_lockwarden"))
        .arg("status")
        .arg("--admin-socket")
        .arg(&d.admin)
        .output()
        .expect("lockwarden status");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("lost leases") && l.trim_end().ends_with(" 0")),
        "status shows its lost-lease count: {stdout}"
    );
    let storage = flat(&repo("docs/storage.md"));
    assert!(storage.contains("`lockwarden status` shows the detections"));
}

// ---------------------------------------------------------------------------------------------
// lockwarden(1) is the CLI

fn cli(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_lockwarden"))
        .args(args)
        .env_remove("LOCKWARDEN_MOUNTS_FILE")
        .output()
        .expect("running lockwarden")
}

#[test]
fn lockwarden_1_documents_every_command_and_option_of_the_cli() {
    let usage = String::from_utf8(cli(&["--help"]).stdout).expect("utf-8");
    let man = repo(CLI_MAN);
    let synopsis = section(&man, ".SH SYNOPSIS", ".SH ").join("\n");
    let commands: Vec<&str> = usage
        .lines()
        .skip_while(|l| !l.starts_with("commands:"))
        .skip(1)
        .take_while(|l| !l.is_empty())
        .filter(|l| l.starts_with("  ") && !l.starts_with("   "))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert!(commands.len() >= 5, "{commands:?}");
    for cmd in &commands {
        assert!(
            synopsis.contains(&format!(".B {cmd}"))
                || synopsis.contains(&format!(".B lockwarden {cmd}")),
            "lockwarden(1) SYNOPSIS lacks `{cmd}`"
        );
    }
    let options: BTreeSet<&str> = usage
        .split(|c: char| c.is_whitespace() || c == '[' || c == ']')
        .filter(|w| w.starts_with("--"))
        .collect();
    assert!(options.len() >= 7, "{options:?}");
    let options_section = section(&man, ".SH OPTIONS", ".SH ").join("\n");
    for opt in options {
        let roff = opt.replace('-', "\\-");
        assert!(
            options_section.contains(&roff),
            "lockwarden(1) OPTIONS lacks {opt}"
        );
    }
    for opt in ["--mounts", "--no-publish"] {
        assert!(
            synopsis.contains(&opt.replace('-', "\\-")),
            "SYNOPSIS lacks {opt}"
        );
    }
}

#[test]
fn who_exits_3_when_the_disk_cannot_be_examined_as_lockwarden_1_says() {
    let dir = tempdir();
    let conf = dir.path().join("qemu-lockwarden.conf");
    fs::write(&conf, "").expect("write");
    let missing = dir.path().join("no-such-image.img");
    let out = cli(&[
        "who",
        missing.to_str().expect("utf-8"),
        "--config",
        conf.to_str().expect("utf-8"),
        "--admin-socket",
        "/nonexistent/admin.sock",
    ]);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert!(!out.stderr.is_empty(), "who prints the reason");
    let man = repo(CLI_MAN);
    let exit = section(&man, ".SH EXIT STATUS", ".SH FILES").join("\n");
    let three = exit
        .split(".TP\n")
        .find(|item| item.starts_with(".B 3"))
        .expect("exit status 3");
    assert!(
        three.contains("who") && three.contains("could not be examined"),
        "lockwarden(1) exit 3 must describe who's meaning: {three}"
    );
    assert!(
        exit.contains(".B 4"),
        "exit status 4 (status: lost query failed) stays documented"
    );
}

#[test]
fn doctor_writes_this_hosts_config_to_the_lockspace_unless_no_publish_as_documented() {
    let dir = tempdir();
    let mounts = dir.path().join("mounts");
    fs::write(&mounts, "").expect("write");
    let run = |ls: &Path, extra: &[&str]| {
        let conf = dir.path().join("qemu-lockwarden.conf");
        fs::write(
            &conf,
            format!("file_lockspace_dir = \"{}\"\n", ls.display()),
        )
        .expect("write");
        let mut args = vec![
            "doctor",
            "--config",
            conf.to_str().expect("utf-8"),
            "--qemu-conf",
            "/nonexistent/qemu.conf",
            "--mounts",
            mounts.to_str().expect("utf-8"),
            "--admin-socket",
            "/nonexistent/admin.sock",
        ];
        args.extend_from_slice(extra);
        cli(&args)
    };
    let label = lockwarden::holder_record::host_label(&common::proto::hostname());
    let published = dir.path().join("published");
    fs::create_dir(&published).expect("mkdir");
    run(&published, &[]);
    let record = published
        .join(".lockwarden/config")
        .join(format!("{label}.json"));
    assert!(
        record.is_file(),
        "doctor did not write {}",
        record.display()
    );
    let quiet = dir.path().join("quiet");
    fs::create_dir(&quiet).expect("mkdir");
    run(&quiet, &["--no-publish"]);
    assert!(
        !quiet.join(".lockwarden").exists(),
        "--no-publish still wrote to the lockspace"
    );
    let man = flat(&repo(CLI_MAN));
    assert!(man.contains("doctor writes to the shared storage"));
    assert!(man.contains(".lockwarden/config/<host>.json"));
}

// ---------------------------------------------------------------------------------------------
// The keeper has threads: one closer thread per device

fn keeper_pid(d: &TestDaemon) -> u32 {
    let mut pid = None;
    eventually("the daemon logs its keeper's pid", || {
        let log = fs::read_to_string(&d.log).unwrap_or_default();
        pid = log
            .split("keeper pid ")
            .nth(1)
            .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|n| n.parse().ok());
        pid.is_some()
    });
    pid.expect("keeper pid")
}

fn thread_names(pid: u32) -> Vec<String> {
    fs::read_dir(format!("/proc/{pid}/task"))
        .map(|it| {
            it.filter_map(Result::ok)
                .filter_map(|t| fs::read_to_string(t.path().join("comm")).ok())
                .map(|s| s.trim().to_string())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn the_keeper_closes_released_descriptors_on_a_closer_thread_as_reliability_md_says() {
    let d = TestDaemon::verbose("");
    let keeper = keeper_pid(&d);
    let dir = tempdir();
    let img = image(dir.path(), "k.img");
    let p = sleeper();
    let o = named_owner(&p, "kpc");
    let mut c = Client::connect(&d.socket);
    ok(c.call(&acquire(&o, vec![excl(&img)])));
    ok(c.call(&Request::Release {
        owner: o.clone(),
        leases: vec![excl(&img)],
    }));
    eventually("the keeper has a lockwardend-kpc closer thread", || {
        thread_names(keeper).iter().any(|n| n == "lockwardend-kpc")
    });
    let rel = flat(&repo("docs/reliability.md"));
    assert!(rel.contains("closer thread (`lockwardend-kpc`) per device"));
}

// ---------------------------------------------------------------------------------------------
// The unit and what the documents say about it

#[test]
fn the_documents_describe_the_shipped_unit() {
    let unit = repo(UNIT);
    for line in [
        "KillMode=process",
        "Restart=on-failure",
        "RestartSec=1s",
        "ExecReload=/bin/kill -USR1 $MAINPID",
    ] {
        assert!(unit.lines().any(|l| l == line), "{UNIT} lacks {line}");
    }
    for doc in [
        "README.md",
        "docs/operators.md",
        "docs/reliability.md",
        DAEMON_MAN,
    ] {
        let text = repo(doc).replace('\n', " ");
        for needed in ["KillMode=process", "Restart=on-failure"] {
            assert!(text.contains(needed), "{doc} does not mention {needed}");
        }
        assert!(text.contains("SIGUSR1"), "{doc}: reload sends SIGUSR1");
    }
    // Whatever ExecReload line a document quotes is the unit's.
    for (name, text) in operator_documents() {
        for (i, _) in text.match_indices("ExecReload=") {
            let quoted: String = text[i..]
                .chars()
                .take_while(|c| *c != '`' && *c != '\n')
                .collect();
            assert!(
                unit.contains(quoted.trim()),
                "{name} quotes {quoted:?}, not the unit's ExecReload"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// No stale statement is left

#[test]
fn no_document_repeats_a_claim_the_audit_found_false_or_stale() {
    let stale = [
        // root_squash advice that makes every VM start fail
        "anonymous user can write",
        "writable by the anonymous user",
        // the daemon is no longer single-threaded
        "the daemon is single-threaded",
        "version is single-threaded",
        "single-threaded, so other requests wait",
        // the unit sends SIGUSR1
        "kill -hup",
        // release and holder records run on storage threads
        "still on the event loop: `release`",
        // the admin socket also serves `lost`
        "accepts `status` and `list` only",
        "accepts `status`, `list` and `lost` only",
        "accepts only .b status and .br list",
        // the daemon sends `timeout` too
        "(plugin side)",
        "is the plugin's own",
        // the refusal text
        "not this lockwardend",
        // status shows detections
        "does not show detections yet",
        // the keeper has closer threads
        "no threads",
        // a hung exclusive record write is a timeout, not "taken"
        "the acquire is then answered as taken. ",
        // the lens is exact in the canonical form only
        "accept exactly the keys and values",
        // owners with a lifetime connection hold no pidfd (docs/reliability.md §3)
        "every owner is watched by a pidfd",
        "opens for every owner anyway",
        "watches every owner's process through a pidfd",
        "watches each machine's process through a pidfd",
        // documents that are not in the repository
        "libvirt-lock-driver.md",
        "design §",
    ];
    let mut found = Vec::new();
    for (name, text) in operator_documents() {
        let text = flat(&text);
        for s in stale {
            if text.contains(s) {
                found.push(format!("{name}: {s:?}"));
            }
        }
    }
    assert!(
        found.is_empty(),
        "stale statements remain:\n{}",
        found.join("\n")
    );
}
