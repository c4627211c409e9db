//! sd_notify(3) without libsystemd: one datagram to `$NOTIFY_SOCKET`.
//!
//! Why: `Type=notify` lets systemd (and libvirtd ordered after us) know the socket serves before
//! anything connects, and `STOPPING=1` tells it the stop is ours. A name starting with `@` is an
//! abstract socket address, as sd_notify defines.

use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};

/// Send `state` (e.g. `READY=1`) if `NOTIFY_SOCKET` is set. Returns whether a message was sent.
pub fn notify(state: &str) -> io::Result<bool> {
    let Some(target) = std::env::var_os("NOTIFY_SOCKET") else {
        return Ok(false);
    };
    use std::os::unix::ffi::OsStrExt;
    let bytes = target.as_bytes();
    let addr = match bytes.split_first() {
        None => return Ok(false),
        Some((b'@', name)) => SocketAddr::from_abstract_name(name)?,
        Some((b'/', _)) => SocketAddr::from_pathname(&target)?,
        Some(_) => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "NOTIFY_SOCKET is neither an absolute path nor an @abstract name",
            ));
        }
    };
    let sock = UnixDatagram::unbound()?;
    sock.send_to_addr(state.as_bytes(), &addr)?;
    Ok(true)
}
