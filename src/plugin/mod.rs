//! The lock-driver plugin: the cdylib libvirtd dlopens as `lockwarden.so`.
//!
//! - [`ffi`] is the only `extern "C"` code and the only module naming `abi::` items: the
//!   exported `virLockDriverImpl` and the eight entry-point shells (panic boundary, pointer
//!   checks, decoding C data and libvirt's integers into Rust types).
//! - Everything else is safe Rust: [`params`] (drvNew's object parameters), [`resources`]
//!   (disks and leases → lease specs, named by [`crate::naming`]), [`manager`] (the
//!   per-operation context and the acquire/release logic, one round trip to lockwardend through
//!   [`crate::client`]), [`error`] (raising libvirt errors); settings are
//!   [`crate::plugin_conf`].
//!
//! Fork safety (docs/interfaces.md §3): `drvNew`, `drvAddResource`, `drvAcquire` and `drvFree` run in the
//! forked child of a multithreaded libvirtd during a domain start. On that path the plugin takes
//! no lock (no Mutex/RwLock, no lazy initialisation, no `std::env`, no logging framework, no
//! `std::io::stderr`), starts no thread, and only reads what `drvInit` stored once in a
//! `OnceLock` and an atomic.

pub mod error;
pub mod ffi;
pub mod manager;
pub mod params;
pub mod resources;

use crate::plugin_conf::Settings;
use error::PluginError;
use std::path::Path;
use std::sync::OnceLock;

/// The plugin's entry points, for messages and the panic test hook.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryPoint {
    Init,
    Deinit,
    New,
    AddResource,
    Acquire,
    Release,
    Inquire,
    Free,
}

impl EntryPoint {
    #[cfg(debug_assertions)]
    const ALL: [EntryPoint; 8] = [
        EntryPoint::Init,
        EntryPoint::Deinit,
        EntryPoint::New,
        EntryPoint::AddResource,
        EntryPoint::Acquire,
        EntryPoint::Release,
        EntryPoint::Inquire,
        EntryPoint::Free,
    ];

    /// The libvirt field name, e.g. `drvAcquire`.
    pub fn c_name(self) -> &'static std::ffi::CStr {
        match self {
            EntryPoint::Init => c"drvInit",
            EntryPoint::Deinit => c"drvDeinit",
            EntryPoint::New => c"drvNew",
            EntryPoint::AddResource => c"drvAddResource",
            EntryPoint::Acquire => c"drvAcquire",
            EntryPoint::Release => c"drvRelease",
            EntryPoint::Inquire => c"drvInquire",
            EntryPoint::Free => c"drvFree",
        }
    }

    /// The name used by `LOCKWARDEN_TEST_PANIC`, e.g. `add_resource`.
    pub fn hook_name(self) -> &'static str {
        match self {
            EntryPoint::Init => "init",
            EntryPoint::Deinit => "deinit",
            EntryPoint::New => "new",
            EntryPoint::AddResource => "add_resource",
            EntryPoint::Acquire => "acquire",
            EntryPoint::Release => "release",
            EntryPoint::Inquire => "inquire",
            EntryPoint::Free => "free",
        }
    }

    #[cfg(debug_assertions)]
    fn from_hook_name(s: &str) -> Option<EntryPoint> {
        EntryPoint::ALL.into_iter().find(|e| e.hook_name() == s)
    }
}

/// What `drvInit` stores once for every later call.
#[derive(Debug)]
pub struct Globals {
    pub settings: Settings,
    /// Test hook: the entry point that panics deliberately (see [`TEST_PANIC_ENV`]).
    pub panic_at: Option<EntryPoint>,
}

static GLOBALS: OnceLock<Globals> = OnceLock::new();

/// **Test hook.** When this environment variable is set at `drvInit` to an entry-point name
/// (`init`, `deinit`, `new`, `add_resource`, `acquire`, `release`, `inquire`, `free`), that entry
/// point panics deliberately, so tests can prove that a panic inside the plugin becomes a
/// libvirt error and `-1` instead of aborting libvirtd. It is read once, in `drvInit`. It
/// exists only in debug builds (`cfg(debug_assertions)`, what `cargo test` builds): the release
/// build that meson and the packages install has no hook, so an environment variable in
/// libvirtd's environment can never make the plugin panic (scripts/check-install.sh checks the
/// installed .so).
pub const TEST_PANIC_ENV: &str = "LOCKWARDEN_TEST_PANIC";

/// The stored state, or an error if `drvInit` has not succeeded (libvirt never does that).
pub fn globals() -> Result<&'static Globals, PluginError> {
    GLOBALS.get().ok_or_else(|| {
        PluginError::internal(
            "the lockwarden plugin was used before drvInit succeeded; this is a bug in the caller",
        )
    })
}

/// `drvInit`'s logic: read the test hook, load `config` (None = defaults) and store both.
///
/// libvirt calls `drvInit` once per driver that selects the plugin (qemu, libxl), each time with
/// its own config file. Like lockd, the first successful Init wins: later calls keep the first
/// configuration and succeed. (A first Init that failed stored nothing, so a later one may still
/// succeed.) Because the plugin is linked `-z nodelete`, this also holds across dlclose/dlopen
/// within one process.
pub fn init(config: Option<&Path>) -> Result<(), PluginError> {
    let panic_at = test_hook_from_env()?;
    if panic_at == Some(EntryPoint::Init) {
        test_panic(EntryPoint::Init);
    }
    if GLOBALS.get().is_some() {
        return Ok(());
    }
    let settings = Settings::load(config, crate::paths::default_socket())?;
    // sha2 detects CPU features once and caches the answer in an atomic; do that here rather
    // than for the first disk in a forked child.
    let _ = crate::naming::sha256_hex("");
    if GLOBALS.set(Globals { settings, panic_at }).is_ok() {
        install_panic_hook();
    }
    Ok(())
}

/// The entry point the test hook names (debug builds only; see [`TEST_PANIC_ENV`]).
#[cfg(debug_assertions)]
fn test_hook_from_env() -> Result<Option<EntryPoint>, PluginError> {
    match std::env::var(TEST_PANIC_ENV) {
        Ok(name) => Some(EntryPoint::from_hook_name(&name).ok_or_else(|| {
            PluginError::invalid(format!(
                "{TEST_PANIC_ENV}={name:?} (a test hook) names no entry point; use one of init, \
                 deinit, new, add_resource, acquire, release, inquire, free"
            ))
        }))
        .transpose(),
        Err(_) => Ok(None),
    }
}

/// Release builds have no test hook.
#[cfg(not(debug_assertions))]
fn test_hook_from_env() -> Result<Option<EntryPoint>, PluginError> {
    Ok(None)
}

/// The deliberate panic of the test hook.
#[allow(clippy::panic)] // the whole point of the hook: prove the panic boundary in ffi holds
pub fn test_panic(at: EntryPoint) {
    #[cfg(debug_assertions)]
    panic!(
        "deliberate panic in {} ({TEST_PANIC_ENV} test hook)",
        at.c_name().to_string_lossy()
    );
    #[cfg(not(debug_assertions))]
    let _ = at;
}

/// Panic if the test hook names `at`.
pub fn maybe_test_panic(at: EntryPoint) {
    if GLOBALS.get().is_some_and(|g| g.panic_at == Some(at)) {
        test_panic(at);
    }
}

/// Report panics as one line on fd 2 with `write(2)` instead of std's default hook, which takes
/// the stderr lock and reads `RUST_BACKTRACE` from the environment (neither is allowed in the
/// forked child). The panic itself still becomes a libvirt error in `ffi`.
fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let location = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        let line = format!(
            "lockwarden: internal error: panic{location}: {}\n",
            panic_message(info.payload()).escape_debug()
        );
        error::write_fd2(line.as_bytes());
    }));
}

/// The text of a panic payload.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".into()
    }
}
