//! The holder-record names every part agrees on: the record format version, the directory the
//! side files live in and how a host name appears in a side file name. The daemon writes
//! records (`daemon::holder`); `lockwarden doctor` and `who` read them, so these live below both.

/// Value of the `lockwarden_holder` field: the record format version.
pub const FORMAT: u32 = 1;
/// The hidden directory holding side files, next to the locked file.
pub const RECORD_DIR: &str = ".lockwarden";

/// A host name as it may appear in a file name: `[A-Za-z0-9._-]`, at most 64 bytes.
pub fn host_label(host: &str) -> String {
    let label: String = host
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .take(64)
        .collect();
    if label.is_empty() || label == "." || label == ".." {
        "unknown".into()
    } else {
        label
    }
}
