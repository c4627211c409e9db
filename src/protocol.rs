//! The wire protocol between the plugin (or the admin CLI) and lockwardend.
//!
//! Why this shape: every plugin call must be exactly one request and one response, however many
//! disks it names, and must never hang on a peer that speaks another version. So a frame is a
//! fixed 12-byte header followed by a JSON body:
//!
//! ```text
//! offset 0  magic    4 bytes  "LKWD"
//! offset 4  version  u16 BE   PROTOCOL_VERSION of the sender
//! offset 6  reserved u16 BE   0
//! offset 8  length   u32 BE   body length in bytes, at most MAX_BODY
//! offset 12 body     JSON     a `Request` (client to daemon) or a `Response` (daemon to client)
//! ```
//!
//! A peer that receives a frame of another version answers (or reports) a clear error instead of
//! guessing. The full description for operators is `docs/protocol.md`.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::io::{self, Read, Write};

/// Frame magic: the first four bytes of every frame in both directions.
pub const MAGIC: [u8; 4] = *b"LKWD";
/// Version of this protocol. Bump on any incompatible change of the body.
pub const PROTOCOL_VERSION: u16 = 1;
/// Size of the fixed frame header.
pub const HEADER_LEN: usize = 12;
/// Largest body accepted, in bytes: enough for thousands of disks, small enough that a hostile
/// peer cannot make anyone allocate much.
pub const MAX_BODY: usize = 1 << 20;

/// Who a lease is held for: the domain as libvirt describes it in `drvNew`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    /// Domain UUID in canonical text form (`xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`).
    pub uuid: String,
    /// Domain name.
    pub name: String,
    /// Domain id (≥ 1 for running domains).
    pub id: u32,
    /// QEMU pid (in the forked child this is the child's own pid, the future QEMU).
    pub pid: u32,
}

/// Lease mode: exclusive takes `F_WRLCK` on byte 0, shared takes `F_RDLCK`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LeaseMode {
    Exclusive,
    Shared,
}

/// What libvirt asked for: a `<disk>` or a `<lease>`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResourceKind {
    Disk,
    Lease,
}

/// Which file the daemon locks for a lease.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", try_from = "flat::Target")]
pub enum LockTarget {
    /// Direct mode: the image itself (must exist; never created, truncated or written).
    File { path: String },
    /// A lock file `file` inside directory `dir`, created 0600 if missing (never following a
    /// symlink). `create_dir`: create `dir` (mode 0700, like lockd) when it does not exist;
    /// when false a missing directory is an error that names it.
    Lockspace {
        dir: String,
        file: String,
        create_dir: bool,
    },
}

/// One lease in a request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseSpec {
    /// What libvirt called it (disk path or lease key): used in every message.
    pub name: String,
    pub kind: ResourceKind,
    pub mode: LeaseMode,
    pub target: LockTarget,
}

/// The domain's `<on_lockfailure>` policy, as libvirt passes it to Acquire.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureAction {
    #[default]
    Default,
    Poweroff,
    Restart,
    Pause,
    Ignore,
}

impl FailureAction {
    /// The word libvirt's domain XML uses (`<on_lockfailure>`), also the wire name.
    pub fn word(self) -> &'static str {
        match self {
            FailureAction::Default => "default",
            FailureAction::Poweroff => "poweroff",
            FailureAction::Restart => "restart",
            FailureAction::Pause => "pause",
            FailureAction::Ignore => "ignore",
        }
    }
}

/// A request sent on the main socket (plugin) or the admin socket (CLI).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", try_from = "flat::Request")]
pub enum Request {
    /// Record the owner. If the peer's pid (SO_PEERCRED) is the owner's pid, this connection
    /// becomes the owner's lifetime handle: when it closes, every lease of the owner goes.
    /// `restrict`: refuse every later request on this connection.
    Register { owner: Owner, restrict: bool },
    /// Take every listed lease for `owner`, all or nothing. Leases the owner already holds in the
    /// same mode succeed again.
    Acquire {
        owner: Owner,
        leases: Vec<LeaseSpec>,
        action: FailureAction,
        restrict: bool,
    },
    /// Give up the listed leases of `owner`. A lease not held is not an error.
    Release {
        owner: Owner,
        leases: Vec<LeaseSpec>,
    },
    /// The leases `owner` holds now.
    Inquire { owner: Owner },
    /// Admin: daemon health and counts.
    Status,
    /// Admin: every lease this daemon holds.
    List,
    /// Admin: the leases this daemon found lost since it started (docs/storage.md), oldest
    /// first, at most 256; each entry's `since` is the time of the detection and `owners` the
    /// VMs that held it. Answered with `Response::Ok`. Added after version 1 shipped: an older
    /// daemon answers it with an `invalid` error.
    Lost,
    /// Admin socket only (see the "Fencing" block below): resume VM `vm` (name or UUID), fenced
    /// for a storage outage, after re-verifying each of its fenced leases' locks on the storage.
    Thaw { vm: String },
    // -- metrics (issue 18) --
    /// Admin: counters and gauges for monitoring (docs/operators.md §11), answered with
    /// `Response::Metrics`. Added after version 1 shipped: an older daemon answers it with an
    /// `invalid` error.
    Metrics,
}

/// Error classes; the plugin maps each to a libvirt error code.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// Somebody else holds a lease (libvirt: resource busy).
    Busy,
    /// The request is malformed or names something that cannot be locked.
    Invalid,
    /// The peer may not do this (restricted connection, wrong uid).
    Denied,
    /// A file or directory operation failed (the message carries errno text).
    Io,
    /// Storage did not answer in time.
    Timeout,
    /// The peers speak different protocol versions.
    Version,
    /// A bug or an exhausted limit.
    Internal,
}

/// Who holds a lease, as far as the daemon knows.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    /// VM name and UUID when a lockwarden owner holds it.
    pub vm_name: Option<String>,
    pub vm_uuid: Option<String>,
    /// Host name of the holder when known.
    pub host: Option<String>,
    /// Local pid of the holding process when the kernel can tell it.
    pub pid: Option<i32>,
    /// Seconds since the Unix epoch at which the lease was taken, when known.
    pub since: Option<u64>,
    pub mode: Option<LeaseMode>,
}

/// A failed request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorReply {
    pub kind: ErrorKind,
    /// A complete sentence for the operator: what failed, on which disk/VM, what to do.
    pub message: String,
    /// The disk or lease the error is about, when there is one.
    pub resource: Option<String>,
    pub holder: Option<Holder>,
}

/// One lease as reported by Inquire and List.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseInfo {
    pub name: String,
    pub kind: ResourceKind,
    pub mode: LeaseMode,
    /// The file actually locked (image or lock file).
    pub lock_path: String,
    pub owners: Vec<Owner>,
    /// Seconds since the Unix epoch.
    pub since: u64,
    /// Set while the lease is fenced (see the "Fencing" block below); absent otherwise, and
    /// from daemons that predate fencing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fence: Option<FenceInfo>,
}

/// Daemon status for `lockwarden status`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusInfo {
    pub version: String,
    pub protocol: u16,
    pub pid: u32,
    /// The daemon's `watchdog_device` while it holds one open (docs/storage.md, "Watchdog"),
    /// for `lockwarden doctor`; absent when unset, and from daemons that predate it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub watchdog_device: Option<String>,
    pub owners: usize,
    pub leases: usize,
    pub clients: usize,
    pub started: u64,
    /// The daemon's `heartbeat_interval_ms` (0: fencing off) and `fence_after_ms`, for
    /// `lockwarden doctor`; absent from daemons that predate fencing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heartbeat_interval_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fence_after_ms: Option<u64>,
}

// ---------------------------------------------------------------------------------------------
// Fencing (docs/storage.md "Partitions", docs/protocol.md "thaw"): what `list` reports about a
// fenced lease, and the `thaw` request above. Added compatibly after version 1 shipped: the new
// fields are optional, and an older daemon answers `thaw` with an `invalid` error.

/// Where a fenced lease stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FenceStage {
    /// Its VMs were stopped; the storage has not answered since.
    Fenced,
    /// The storage answers again; the lock is being re-checked.
    Checking,
    /// The lock was found still ours: its VMs stay stopped until `lockwarden thaw`.
    HeldAwaitingThaw,
    /// The lock was lost meanwhile: its VMs were killed.
    Lost,
}

impl FenceStage {
    /// The name `list`, `status` and `--json` show.
    pub fn name(self) -> &'static str {
        match self {
            FenceStage::Fenced => "fenced",
            FenceStage::Checking => "checking",
            FenceStage::HeldAwaitingThaw => "held-awaiting-thaw",
            FenceStage::Lost => "lost",
        }
    }
}

/// A fenced lease: why, since when, what was done.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FenceInfo {
    pub stage: FenceStage,
    /// The mount whose storage stopped confirming heartbeats.
    pub mount: String,
    /// Seconds since the Unix epoch at which the lease was fenced.
    pub since: u64,
    /// Milliseconds from the fence to the answer.
    pub age_ms: u64,
    /// What was done to each VM holding it, e.g. `VM 'web1': SIGSTOP (on_lockfailure=pause)`.
    pub action: String,
}

// ---------------------------------------------------------------------------------------------

/// The daemon's answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Response {
    /// Success; `leases` is what the owner holds (Inquire), every lease (List) or every lease
    /// found lost (Lost); empty for Register, Acquire and Release (a success means every listed
    /// lease is held, or released: nobody needs the list on the hot path).
    Ok {
        leases: Vec<LeaseInfo>,
    },
    Status(StatusInfo),
    Error(ErrorReply),
    // -- metrics (issue 18) --
    /// The answer to `Request::Metrics`.
    Metrics(Box<crate::metrics::Snapshot>),
}

impl Response {
    /// An error response.
    pub fn error(kind: ErrorKind, message: impl Into<String>) -> Self {
        Response::Error(ErrorReply {
            kind,
            message: message.into(),
            resource: None,
            holder: None,
        })
    }
}

/// Why a frame could not be read.
#[derive(Debug)]
pub enum FrameError {
    /// The peer closed the connection before a whole frame arrived (`Eof` at a frame boundary).
    Eof,
    /// Not a lockwarden frame at all.
    BadMagic([u8; 4]),
    /// A lockwarden frame of another protocol version; the body was skipped.
    Version(u16),
    /// Declared body larger than `MAX_BODY`.
    TooLarge(usize),
    /// The body is not a valid message.
    Decode(String),
    /// The socket failed (including timeouts: `WouldBlock`/`TimedOut`).
    Io(io::Error),
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FrameError::Eof => write!(f, "connection closed by peer"),
            FrameError::BadMagic(m) => write!(f, "not a lockwarden frame (magic {m:02x?})"),
            FrameError::Version(v) => write!(
                f,
                "peer speaks lockwarden protocol version {v}, this side speaks {PROTOCOL_VERSION}; \
                 install matching versions of lockwarden.so and lockwardend"
            ),
            FrameError::TooLarge(n) => {
                write!(
                    f,
                    "frame body of {n} bytes exceeds the limit of {MAX_BODY} bytes"
                )
            }
            FrameError::Decode(e) => write!(f, "malformed message: {e}"),
            FrameError::Io(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for FrameError {}

impl From<io::Error> for FrameError {
    fn from(e: io::Error) -> Self {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            FrameError::Eof
        } else {
            FrameError::Io(e)
        }
    }
}

/// Build the 12-byte header for a body of `len` bytes.
pub fn header(len: usize) -> Result<[u8; HEADER_LEN], FrameError> {
    if len > MAX_BODY {
        return Err(FrameError::TooLarge(len));
    }
    let mut h = [0u8; HEADER_LEN];
    let (magic, rest) = h.split_at_mut(4);
    magic.copy_from_slice(&MAGIC);
    let (version, rest) = rest.split_at_mut(2);
    version.copy_from_slice(&PROTOCOL_VERSION.to_be_bytes());
    let (_reserved, length) = rest.split_at_mut(2);
    // len <= MAX_BODY < u32::MAX, checked above.
    length.copy_from_slice(&(len as u32).to_be_bytes());
    Ok(h)
}

/// Parse a header: returns (version, body length). Checks magic and size, not the version.
pub fn parse_header(h: &[u8; HEADER_LEN]) -> Result<(u16, usize), FrameError> {
    let [m0, m1, m2, m3, v0, v1, _, _, l0, l1, l2, l3] = *h;
    let magic = [m0, m1, m2, m3];
    if magic != MAGIC {
        return Err(FrameError::BadMagic(magic));
    }
    let version = u16::from_be_bytes([v0, v1]);
    let len = u32::from_be_bytes([l0, l1, l2, l3]) as usize;
    if len > MAX_BODY {
        return Err(FrameError::TooLarge(len));
    }
    Ok((version, len))
}

/// Serialise a message into one complete frame (header + body), ready for a single write.
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, FrameError> {
    let body = serde_json::to_vec(msg).map_err(|e| FrameError::Decode(e.to_string()))?;
    let h = header(body.len())?;
    let mut frame = Vec::with_capacity(HEADER_LEN + body.len());
    frame.extend_from_slice(&h);
    frame.extend_from_slice(&body);
    Ok(frame)
}

/// Decode a body (without header).
pub fn decode<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, FrameError> {
    serde_json::from_slice(body).map_err(|e| FrameError::Decode(e.to_string()))
}

/// Write one message as a frame.
pub fn write_message<W: Write, T: Serialize>(w: &mut W, msg: &T) -> Result<(), FrameError> {
    let frame = encode(msg)?;
    w.write_all(&frame)?;
    w.flush()?;
    Ok(())
}

/// Read one frame's body from a blocking reader. A frame of another version is consumed whole
/// (so the stream stays in sync) and reported as `FrameError::Version`.
pub fn read_body<R: Read>(r: &mut R) -> Result<Vec<u8>, FrameError> {
    let mut h = [0u8; HEADER_LEN];
    r.read_exact(&mut h)?;
    let (version, len) = parse_header(&h)?;
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    if version != PROTOCOL_VERSION {
        return Err(FrameError::Version(version));
    }
    Ok(body)
}

/// Read and decode one message from a blocking reader.
pub fn read_message<R: Read, T: for<'de> Deserialize<'de>>(r: &mut R) -> Result<T, FrameError> {
    decode(&read_body(r)?)
}

/// Decoding of the internally tagged enums through flat structs: the same wire format as the
/// derived `tag = ...` decoding, without serde buffering every object into an intermediate tree
/// and walking it again (that was ~40% of the daemon's instructions per request).
mod flat {
    use super::{FailureAction, LeaseSpec, Owner};
    use serde::Deserialize;

    #[derive(Deserialize)]
    pub struct Target {
        #[serde(rename = "type")]
        kind: String,
        path: Option<String>,
        dir: Option<String>,
        file: Option<String>,
        create_dir: Option<bool>,
    }

    fn need<T>(v: Option<T>, field: &str, what: &str) -> Result<T, String> {
        v.ok_or_else(|| format!("missing field `{field}` in {what}"))
    }

    impl TryFrom<Target> for super::LockTarget {
        type Error = String;
        fn try_from(t: Target) -> Result<Self, String> {
            match t.kind.as_str() {
                "file" => Ok(super::LockTarget::File {
                    path: need(t.path, "path", "a file target")?,
                }),
                "lockspace" => Ok(super::LockTarget::Lockspace {
                    dir: need(t.dir, "dir", "a lockspace target")?,
                    file: need(t.file, "file", "a lockspace target")?,
                    create_dir: need(t.create_dir, "create_dir", "a lockspace target")?,
                }),
                other => Err(format!(
                    "unknown variant `{other}`, expected `file` or `lockspace`"
                )),
            }
        }
    }

    #[derive(Deserialize)]
    pub struct Request {
        op: String,
        owner: Option<Owner>,
        restrict: Option<bool>,
        leases: Option<Vec<LeaseSpec>>,
        action: Option<FailureAction>,
        vm: Option<String>,
    }

    impl TryFrom<Request> for super::Request {
        type Error = String;
        fn try_from(r: Request) -> Result<Self, String> {
            use super::Request as R;
            let what = format!("a {:?} request", r.op);
            let owner = |o: Option<Owner>| need(o, "owner", &what);
            Ok(match r.op.as_str() {
                "register" => R::Register {
                    owner: owner(r.owner)?,
                    restrict: need(r.restrict, "restrict", &what)?,
                },
                "acquire" => R::Acquire {
                    owner: owner(r.owner)?,
                    leases: need(r.leases, "leases", &what)?,
                    action: need(r.action, "action", &what)?,
                    restrict: need(r.restrict, "restrict", &what)?,
                },
                "release" => R::Release {
                    owner: owner(r.owner)?,
                    leases: need(r.leases, "leases", &what)?,
                },
                "inquire" => R::Inquire {
                    owner: owner(r.owner)?,
                },
                "status" => R::Status,
                "list" => R::List,
                "lost" => R::Lost,
                "thaw" => R::Thaw {
                    vm: need(r.vm, "vm", &what)?,
                },
                // -- metrics (issue 18) --
                "metrics" => R::Metrics,
                other => {
                    return Err(format!(
                        "unknown variant `{other}`, expected one of `register`, `acquire`, \
                         `release`, `inquire`, `status`, `list`, `lost`, `thaw`, `metrics`"
                    ));
                }
            })
        }
    }
}

/// A VM as unit tests of the wire format and its clients use it.
#[cfg(test)]
pub(crate) fn sample_owner(pid: u32) -> Owner {
    Owner {
        uuid: "c7a5fdbd-cdaf-9455-926a-d65c16db1809".into(),
        name: "web1".into(),
        id: 1,
        pid,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner() -> Owner {
        sample_owner(4242)
    }

    #[test]
    fn round_trip_request() {
        let req = Request::Acquire {
            owner: owner(),
            leases: vec![LeaseSpec {
                name: "/images/a b\n.qcow2".into(),
                kind: ResourceKind::Disk,
                mode: LeaseMode::Exclusive,
                target: LockTarget::File {
                    path: "/images/a b\n.qcow2".into(),
                },
            }],
            action: FailureAction::Poweroff,
            restrict: false,
        };
        let frame = encode(&req).unwrap();
        let got: Request = read_message(&mut &frame[..]).unwrap();
        assert_eq!(got, req);
    }

    #[test]
    fn flat_decoding_reads_every_variant_and_names_what_is_missing() {
        let spec = |target| LeaseSpec {
            name: "/v/a.img".into(),
            kind: ResourceKind::Disk,
            mode: LeaseMode::Shared,
            target,
        };
        let all = [
            Request::Register {
                owner: owner(),
                restrict: true,
            },
            Request::Acquire {
                owner: owner(),
                leases: vec![
                    spec(LockTarget::File {
                        path: "/v/a.img".into(),
                    }),
                    spec(LockTarget::Lockspace {
                        dir: "/ls".into(),
                        file: "abc".into(),
                        create_dir: true,
                    }),
                ],
                action: FailureAction::Pause,
                restrict: false,
            },
            Request::Release {
                owner: owner(),
                leases: vec![],
            },
            Request::Inquire { owner: owner() },
            Request::Status,
            Request::List,
            Request::Lost,
            Request::Thaw { vm: "web1".into() },
            Request::Metrics,
        ];
        for r in all {
            let body = serde_json::to_vec(&r).unwrap();
            assert_eq!(decode::<Request>(&body).unwrap(), r);
        }
        // Unknown fields are ignored, as the derived decoding did.
        assert_eq!(
            decode::<Request>(br#"{"op":"status","extra":1}"#).unwrap(),
            Request::Status
        );
        let err = |body: &[u8]| match decode::<Request>(body) {
            Err(FrameError::Decode(m)) => m,
            other => panic!("{other:?}"),
        };
        assert!(err(br#"{"op":"inquire"}"#).contains("missing field `owner`"));
        assert!(err(br#"{"op":"fly"}"#).contains("unknown variant `fly`"));
        assert!(err(br#"{"restrict":true}"#).contains("missing field `op`"));
        let o = serde_json::to_string(&owner()).unwrap();
        let bad_target = format!(
            r#"{{"op":"release","owner":{o},"leases":[{{"name":"x","kind":"disk","mode":"shared","target":{{"type":"lockspace","dir":"/d"}}}}]}}"#
        );
        assert!(err(bad_target.as_bytes()).contains("missing field `file`"));
    }

    #[test]
    fn version_mismatch_is_reported_and_consumed() {
        let mut frame = encode(&Request::Status).unwrap();
        frame[5] = 9; // version 9
        frame.extend_from_slice(&encode(&Request::List).unwrap());
        let mut r = &frame[..];
        assert!(matches!(
            read_message::<_, Request>(&mut r),
            Err(FrameError::Version(9))
        ));
        // The next frame is still readable: the stream stayed in sync.
        assert_eq!(read_message::<_, Request>(&mut r).unwrap(), Request::List);
    }

    #[test]
    fn oversized_frame_refused_before_allocation() {
        let mut h = header(0).unwrap();
        h[8..12].copy_from_slice(&((MAX_BODY as u32) + 1).to_be_bytes());
        assert!(matches!(
            read_body(&mut &h[..]),
            Err(FrameError::TooLarge(_))
        ));
    }

    #[test]
    fn bad_magic() {
        let h = *b"GET / HTTP/1";
        assert!(matches!(
            read_body(&mut &h[..]),
            Err(FrameError::BadMagic(_))
        ));
    }

    #[test]
    fn truncated_is_eof() {
        let frame = encode(&Request::Status).unwrap();
        assert!(matches!(
            read_body(&mut &frame[..frame.len() - 1]),
            Err(FrameError::Eof)
        ));
    }
}
