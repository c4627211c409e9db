//! The layering rules of docs/architecture.md section 5, as CI checks them:
//! `scripts/module-graph.py --check-layers` passes on this tree, and fails (exit 1, naming the
//! edge or the line) when a module crosses a layer or names libvirt's ABI outside
//! `plugin/ffi.rs`. The failing cases run the script on a scratch copy of `src/` with one
//! planted import, so the check is shown to be able to fail.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Run the script under `root` (its `src/` is read relative to the script): (exit code, stdout).
fn check(root: &Path) -> (i32, String) {
    let out = Command::new("python3")
        .arg(root.join("scripts/module-graph.py"))
        .arg("--check-layers")
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run python3 ({e}); install it (Debian: apt-get install python3)")
        });
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.stderr.is_empty(),
        "module-graph.py wrote to stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().expect("exit code"), stdout)
}

fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for e in fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            fs::copy(e.path(), &target).unwrap();
        }
    }
}

/// A scratch copy of src/ and the script, with `line` added at the top of `file` (under src/;
/// a new file when there is none).
fn planted(file: &str, line: &str) -> (tempfile::TempDir, (i32, String)) {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&repo().join("src"), &dir.path().join("src"));
    fs::create_dir(dir.path().join("scripts")).unwrap();
    fs::copy(
        repo().join("scripts/module-graph.py"),
        dir.path().join("scripts/module-graph.py"),
    )
    .unwrap();
    let path = dir.path().join("src").join(file);
    let text = fs::read_to_string(&path).unwrap_or_default();
    fs::write(&path, format!("{line}\n{text}")).unwrap();
    let result = check(dir.path());
    (dir, result)
}

#[test]
fn this_tree_keeps_its_layers() {
    let (code, out) = check(&repo());
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains(
            "layer violations (an import of plugin, daemon or cli from another module): 0"
        ),
        "{out}"
    );
    assert!(
        out.contains("ABI leaks (libvirt's abi named outside plugin::ffi): 0"),
        "{out}"
    );
    assert!(
        out.contains("daemon import cycles (strongly connected components): 0"),
        "{out}"
    );
    assert!(
        out.contains("daemon level violations (an import of a higher level): 0"),
        "{out}"
    );
}

/// docs/architecture.md section 5: the storage executor never calls up into the operations
/// (it once asked `acquire` for a refusal's wording), and a new daemon module must be placed
/// in a level.
#[test]
fn a_daemon_import_of_a_higher_level_fails_the_check() {
    let (_d, (code, out)) = planted("daemon/storage.rs", "use super::acquire as _a;");
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("  daemon::storage (level 1) -> daemon::acquire (level 4)\n"),
        "{out}"
    );
    assert!(
        out.contains("daemon import cycles (strongly connected components): 1"),
        "{out}"
    );
    let (_d, (code, out)) = planted("daemon/unplaced.rs", "use super::state as _s;");
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("  daemon::unplaced is in no level of DAEMON_LEVELS\n"),
        "{out}"
    );
    let (_d, (code, out)) = planted("daemon/state.rs", "use super::route as _r;");
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("  daemon::state (level 3) -> daemon::route (level 5)\n"),
        "{out}"
    );
}

#[test]
fn a_cli_import_of_the_daemon_fails_the_check() {
    let (_d, (code, out)) = planted("cli/who.rs", "use crate::daemon::holder::Record as _R;");
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("  cli::who -> daemon::holder\n"), "{out}");
}

#[test]
fn a_shared_module_importing_the_plugin_fails_the_check() {
    let (_d, (code, out)) = planted("naming/mod.rs", "use crate::{plugin::params as _p};");
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("  naming -> plugin::params\n"), "{out}");
}

#[test]
fn abi_outside_ffi_fails_the_check() {
    let (_d, (code, out)) = planted(
        "plugin/resources.rs",
        "const _T: u32 = crate::abi::virLockManagerResourceType_VIR_LOCK_MANAGER_RESOURCE_TYPE_DISK;",
    );
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("  plugin::resources -> abi\n"), "{out}");
    assert!(out.contains("src/plugin/resources.rs:1: const _T"), "{out}");
    // The daemon and the CLI may not name it either.
    let (_d, (code, out)) = planted("cli/audit.rs", "use crate::abi as _a;");
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("  cli::audit -> abi\n"), "{out}");
}
