//! The daemon's error: why a request is refused, in the daemon's own type.
//!
//! Why not the wire struct: `ErrorReply` is what a client reads (docs/protocol.md); inside the
//! daemon a refusal is built by named constructors that say what kind it is, gain the disk they
//! are about and the holder they name as they travel up, and become the wire format in exactly
//! one place (`into_reply`). Every message is a complete sentence for the operator: what
//! failed, on which disk or VM, and what to do (docs/hardening.md).

use crate::protocol::{ErrorKind, ErrorReply, Holder, LeaseSpec, Response};
use std::fmt;

/// A refused request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DaemonError {
    kind: ErrorKind,
    message: String,
    resource: Option<String>,
    holder: Option<Holder>,
}

impl DaemonError {
    fn new(kind: ErrorKind, message: String) -> DaemonError {
        DaemonError {
            kind,
            message,
            resource: None,
            holder: None,
        }
    }

    /// The request itself cannot be carried out as asked (libvirt: a configuration problem).
    pub fn invalid(message: String) -> DaemonError {
        Self::new(ErrorKind::Invalid, message)
    }

    /// Another VM holds the disk (`holder` names it when its record could be read).
    pub fn busy(message: String, holder: Option<Holder>) -> DaemonError {
        DaemonError {
            holder,
            ..Self::new(ErrorKind::Busy, message)
        }
    }

    /// The storage (or the daemon, during a live re-exec) did not answer in time.
    pub fn timeout(message: String) -> DaemonError {
        Self::new(ErrorKind::Timeout, message)
    }

    /// The client may not do this (peer credentials, admin-only requests).
    pub fn denied(message: String) -> DaemonError {
        Self::new(ErrorKind::Denied, message)
    }

    /// The daemon itself failed (a keeper hand-over, an exhausted limit).
    pub fn internal(message: String) -> DaemonError {
        Self::new(ErrorKind::Internal, message)
    }

    /// Of a kind decided elsewhere (e.g. from an `errno` classification).
    pub fn of(kind: ErrorKind, message: String) -> DaemonError {
        Self::new(kind, message)
    }

    /// A refusal about disk `spec`, boxed as it travels up (`Failure`).
    pub fn on(kind: ErrorKind, spec: &LeaseSpec, message: String) -> Box<DaemonError> {
        Box::new(Self::new(kind, message).about(&spec.name))
    }

    /// The disk or lease this refusal is about.
    pub fn about(mut self, resource: &str) -> DaemonError {
        self.resource = Some(resource.to_string());
        self
    }

    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    pub fn message(&self) -> &str {
        &self.message
    }

    pub fn resource(&self) -> Option<&str> {
        self.resource.as_deref()
    }

    pub fn holder(&self) -> Option<&Holder> {
        self.holder.as_ref()
    }

    /// The wire format (docs/protocol.md): the one place a refusal becomes an `ErrorReply`.
    pub fn into_reply(self) -> ErrorReply {
        ErrorReply {
            kind: self.kind,
            message: self.message,
            resource: self.resource,
            holder: self.holder,
        }
    }

    /// The answer to send.
    pub fn into_response(self) -> Response {
        Response::Error(self.into_reply())
    }
}

impl fmt::Display for DaemonError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wire_reply_carries_kind_message_resource_and_holder() {
        let e = DaemonError::invalid("bad path".into()).about("/vm/a.img");
        assert_eq!(
            e.clone().into_reply(),
            ErrorReply {
                kind: ErrorKind::Invalid,
                message: "bad path".into(),
                resource: Some("/vm/a.img".into()),
                holder: None,
            }
        );
        assert_eq!(e.to_string(), "bad path");
        let t = DaemonError::timeout("slow".into());
        assert_eq!(t.kind(), ErrorKind::Timeout);
        assert_eq!(t.resource(), None);
        assert!(matches!(t.into_response(), Response::Error(r) if r.kind == ErrorKind::Timeout));
    }
}
