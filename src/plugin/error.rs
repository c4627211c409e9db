//! Raising libvirt errors from the plugin.
//!
//! libvirt's own plugins call `virReportErrorHelper`, which lives in a release-pinned private
//! symbol node of libvirt.so. Linking against it would tie the plugin to one libvirt release, so
//! `drvInit` looks it up once with `dlsym(RTLD_DEFAULT, ...)` (an unversioned lookup returns the
//! default version) and stores the address in an atomic. Every failing entry point then raises
//! its error with domain `VIR_FROM_LOCKING` (42), the mapped code, the format `"%s"` and the
//! message, so the message is never interpreted as a format string.
//!
//! When the symbol is absent (the plugin loaded by something that is not libvirt), the error is
//! written as one line to fd 2 with `write(2)`: no `std::io::stderr()` (its lock must not be
//! touched in the forked child of a multithreaded libvirtd), no logging framework.

use crate::protocol::ErrorKind;
use std::ffi::{CString, c_char, c_int};
use std::sync::atomic::{AtomicUsize, Ordering};

/// The libvirt error codes the plugin raises (values from `virerror.h`, via our ABI header).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Code {
    /// `VIR_ERR_INTERNAL_ERROR` (1): I/O trouble, timeouts, version mismatch, bugs.
    Internal,
    /// `VIR_ERR_OPERATION_DENIED` (29).
    Denied,
    /// `VIR_ERR_OPERATION_INVALID` (55): bad arguments at the ABI.
    Invalid,
    /// `VIR_ERR_CONFIG_UNSUPPORTED` (67): configuration problems (plugin config, domain XML).
    Config,
    /// `VIR_ERR_RESOURCE_BUSY` (87): somebody else holds the disk.
    Busy,
}

impl Code {
    /// The numeric libvirt error code (encoded at the ABI edge, `ffi.rs`).
    pub fn number(self) -> c_int {
        super::ffi::error_number(self)
    }

    /// The code libvirt sees for a daemon error of `kind`.
    pub fn from_kind(kind: ErrorKind) -> Code {
        match kind {
            ErrorKind::Busy => Code::Busy,
            ErrorKind::Denied => Code::Denied,
            ErrorKind::Invalid => Code::Invalid,
            ErrorKind::Io | ErrorKind::Timeout | ErrorKind::Version | ErrorKind::Internal => {
                Code::Internal
            }
        }
    }
}

/// An error on its way to libvirt: a code and a complete sentence for the operator.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PluginError {
    pub code: Code,
    pub message: String,
}

impl PluginError {
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        PluginError {
            code,
            message: message.into(),
        }
    }

    /// Bad arguments at the ABI (NULL pointers, unknown flags or types, wrong parameter types).
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(Code::Invalid, message)
    }

    /// A configuration problem: plugin config file or the domain's disks and leases.
    pub fn config(message: impl Into<String>) -> Self {
        Self::new(Code::Config, message)
    }

    /// I/O trouble, timeouts, bugs.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(Code::Internal, message)
    }
}

impl std::fmt::Display for PluginError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for PluginError {}

impl From<crate::client::ClientError> for PluginError {
    fn from(e: crate::client::ClientError) -> Self {
        match e.kind {
            Some(kind) => Self::new(Code::from_kind(kind), e.message),
            None => Self::internal(e.message),
        }
    }
}

impl From<crate::plugin_conf::SettingsError> for PluginError {
    fn from(e: crate::plugin_conf::SettingsError) -> Self {
        Self::config(e.message)
    }
}

/// Address of libvirt's `virReportErrorHelper`, 0 when unresolved or absent.
static REPORT_HELPER: AtomicUsize = AtomicUsize::new(0);

/// Look up `virReportErrorHelper` in the global symbol scope (called from `drvInit`).
pub fn resolve_helper() {
    // SAFETY: dlsym with RTLD_DEFAULT and a NUL-terminated name has no preconditions; it only
    // returns an address (or NULL) and we do not dereference it here.
    let sym = unsafe { libc::dlsym(libc::RTLD_DEFAULT, c"virReportErrorHelper".as_ptr()) };
    REPORT_HELPER.store(sym as usize, Ordering::Release);
}

/// Whether libvirt's error helper was found (for tests and diagnostics).
pub fn helper_resolved() -> bool {
    REPORT_HELPER.load(Ordering::Acquire) != 0
}

/// Raise `err` in libvirt, on behalf of the entry point `func` (e.g. `"drvAcquire"`).
/// Fork-safe: an atomic load, one allocation, one call or `write(2)`.
pub fn report(func: &'static std::ffi::CStr, err: &PluginError) {
    // Interior NULs cannot cross a C string; they can only come from a buggy daemon.
    let text = err.message.replace('\0', "\\0");
    let msg = CString::new(text).unwrap_or_default();
    let helper = REPORT_HELPER.load(Ordering::Acquire);
    if helper != 0 {
        // SAFETY: `helper` is the non-NULL address dlsym returned for virReportErrorHelper,
        // whose C signature is exactly `virReportErrorHelperFn` (docs/interfaces.md §5).
        let f: unsafe extern "C" fn(
            c_int,
            c_int,
            *const c_char,
            *const c_char,
            usize,
            *const c_char,
            ...
        ) = unsafe { std::mem::transmute::<usize, _>(helper) };
        // SAFETY: every pointer is a valid NUL-terminated string that outlives the call, and
        // the format "%s" consumes exactly the one `char *` vararg we pass.
        unsafe {
            f(
                super::ffi::FROM_LOCKING,
                err.code.number(),
                c"src/plugin/error.rs".as_ptr(),
                func.as_ptr(),
                0,
                c"%s".as_ptr(),
                msg.as_ptr(),
            )
        };
        return;
    }
    let line = fallback_line(func, err);
    write_fd2(line.as_bytes());
}

/// The one line written to fd 2 when libvirt's helper is absent: newlines escaped, so one error
/// is one line.
pub fn fallback_line(func: &std::ffi::CStr, err: &PluginError) -> String {
    let mut line = format!(
        "lockwarden: {} error {}: ",
        func.to_string_lossy(),
        err.code.number()
    );
    for c in err.message.chars() {
        match c {
            '\n' => line.push_str("\\n"),
            '\r' => line.push_str("\\r"),
            c => line.push(c),
        }
    }
    line.push('\n');
    line
}

/// Write all of `bytes` to fd 2 with raw `write(2)` calls (retrying on EINTR and short writes).
pub fn write_fd2(mut bytes: &[u8]) {
    while !bytes.is_empty() {
        // SAFETY: the pointer and length describe a live byte slice; fd 2 may be closed, in
        // which case write fails with EBADF and we give up.
        let n = unsafe { libc::write(2, bytes.as_ptr().cast(), bytes.len()) };
        if n < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return;
        }
        match usize::try_from(n) {
            Ok(0) | Err(_) => return,
            Ok(n) => bytes = bytes.get(n..).unwrap_or_default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_match_libvirt() {
        assert_eq!(Code::Busy.number(), 87);
        assert_eq!(Code::Denied.number(), 29);
        assert_eq!(Code::Invalid.number(), 55);
        assert_eq!(Code::Config.number(), 67);
        assert_eq!(Code::Internal.number(), 1);
        assert_eq!(Code::from_kind(ErrorKind::Busy), Code::Busy);
        assert_eq!(Code::from_kind(ErrorKind::Timeout), Code::Internal);
        assert_eq!(Code::from_kind(ErrorKind::Version), Code::Internal);
        assert_eq!(Code::from_kind(ErrorKind::Io), Code::Internal);
    }

    #[test]
    fn fallback_is_one_line() {
        let e = PluginError::config("disk '/a\nb' is bad\r\nreally");
        let line = fallback_line(c"drvAddResource", &e);
        assert_eq!(line.matches('\n').count(), 1);
        assert!(line.ends_with('\n'));
        assert!(line.starts_with("lockwarden: drvAddResource error 67: disk '/a\\nb'"));
    }
}
