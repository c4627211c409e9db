//! Lock-target naming shared by the plugin, the daemon and the CLI: the names lockd gives
//! lock files, so one disk maps to the same file whichever part computes it.

use sha2::{Digest, Sha256};

/// The lower-case hex SHA-256 of the exact path bytes (lockd's lock file name).
pub fn sha256_hex(path: &str) -> String {
    let digest = Sha256::digest(path.as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}
