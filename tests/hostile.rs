//! Hostile clients against the real lockwardend (issue 9).
//!
//! The daemon's trust model, which these tests pin down:
//! - The door is the uid: the main socket is 0600 and every peer's SO_PEERCRED uid must be the
//!   daemon's own. A peer of another uid is refused everything.
//! - A peer of the daemon's uid is libvirtd (or acts with libvirtd's powers: it could open the
//!   images itself). Requests act for the owner they *name* — libvirtd asks for QEMU's pid on
//!   a fresh connection at CPU start and hot-plug — so a connection need not Register before it
//!   acquires. What a request can never do is touch the leases of an owner it does not name:
//!   Release and Inquire are scoped to the named owner, and another owner's lease is Busy.
//! - Leases are tied to the owner *process* (pidfd), not to the connection that asked: an
//!   Acquire for a pid that is not running is refused, and a connection that is not the owner's
//!   own (peer pid ≠ owner pid) never becomes its lifetime handle.
//! - A restricted connection is refused everything afterwards.
//! - The event loop never waits for one client: with idle, stalled (half a frame) and flooding
//!   clients around, a legitimate acquire still succeeds. "Not starved" is asserted in the
//!   loop's own unit, not in time: the bytes of answers a flooder gets while one legitimate
//!   request waits stay within a few rounds' budget (`starvation_bound_bytes`), and the read and
//!   idle clocks are set beyond the client timeout where waiting on a staller would hide. The
//!   acquire latencies are printed (`--nocapture`), never asserted: timing belongs to benchmarks.

mod common;

use common::wait::poll_every;

use common::daemon::{Lockwardend, Opts, TestDaemon};
use common::image;
use common::proto::{
    Client, Proc, after_pending_kills, byte0, call_as, err, eventually, excl, ok, owner_for,
    running as proc_running, sleeper,
};
use common::proto::{acquire_request as acquire, release_request as release};
use lockwarden::protocol::{
    self, ErrorKind, FailureAction, HEADER_LEN, LeaseInfo, LeaseMode, LeaseSpec, LockTarget,
    MAX_BODY, Owner, Request, ResourceKind, Response,
};
use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

/// Bound for anything asynchronous on a busy machine (not a performance assertion).
const BOUND: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------------
// Processes and the daemon

fn owner_of(p: &Proc, name: &str) -> Owner {
    let mut o = owner_for(p.pid(), name);
    o.name = format!("{name}-{}", o.id);
    o
}

/// A daemon with `config`, and with RLIMIT_NOFILE (soft, hard) when given; the test process's
/// own limit is raised first (the hostile clients need many descriptors).
fn start_limited(config: &str, nofile: Option<(u64, u64)>) -> TestDaemon {
    raise_fd_limit();
    TestDaemon::with(Opts {
        config,
        nofile,
        ..Opts::default()
    })
}

fn start_with(config: &str) -> TestDaemon {
    start_limited(config, None)
}

/// The descriptor soft limit up to the hard limit, for this process and the daemons it starts
/// (they inherit it): the 1,000-connection tests need more than the usual 1,024.
fn raise_fd_limit() {
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local rlimit.
    unsafe {
        let mut r: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 && r.rlim_cur < r.rlim_max {
            r.rlim_cur = r.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        }
    }
}

fn fd_limit() -> u64 {
    // SAFETY: as above.
    unsafe {
        let mut r: libc::rlimit = std::mem::zeroed();
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut r), 0);
        r.rlim_cur
    }
}

/// Acquire and release as the tests here check them (the connection itself: common::proto).
impl Client {
    /// Acquire, check the answer is Ok with an empty lease list, and return what `owner`
    /// holds afterwards (asked on the same connection).
    fn acquired(&mut self, owner: &Owner, leases: Vec<LeaseSpec>) -> Vec<LeaseInfo> {
        let answer = ok(self.call(&acquire(owner, leases)));
        assert!(
            answer.is_empty(),
            "acquire answers carry no leases: {answer:?}"
        );
        self.held(owner)
    }

    /// Release, check the answer is Ok with an empty lease list, and return what `owner`
    /// still holds (asked on the same connection).
    fn released(&mut self, owner: &Owner, leases: Vec<LeaseSpec>) -> Vec<LeaseInfo> {
        let answer = ok(self.call(&release(owner, leases)));
        assert!(
            answer.is_empty(),
            "release answers carry no leases: {answer:?}"
        );
        self.held(owner)
    }
}

/// Who holds `path` according to the daemon's List.
fn holders(d: &TestDaemon, path: &Path) -> Vec<u32> {
    let p = path.to_str().expect("utf-8 path");
    d.list()
        .into_iter()
        .filter(|l| l.name == p)
        .flat_map(|l| l.owners.into_iter().map(|o| o.pid))
        .collect()
}

/// Latency summary of `samples` for the report: median, 95th percentile, max (ms).
fn summary(samples: &mut [Duration]) -> String {
    samples.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
    format!(
        "n={} median={:.2}ms p95={:.2}ms max={:.2}ms",
        samples.len(),
        ms(at(0.5)),
        ms(at(0.95)),
        ms(at(1.0))
    )
}

/// `rounds` acquire/release cycles of one disk for `owner`, each on a fresh connection (as the
/// plugin does); returns the acquire latencies.
fn acquire_cycles(d: &TestDaemon, owner: &Owner, img: &Path, rounds: usize) -> Vec<Duration> {
    let mut lat = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let t0 = Instant::now();
        let held = d.client().acquired(owner, vec![excl(img)]);
        lat.push(t0.elapsed());
        assert_eq!(held.len(), 1, "the acquire did not take the disk");
        assert_eq!(byte0(img), libc::F_WRLCK);
        d.client().released(owner, vec![excl(img)]);
    }
    lat
}

// ---------------------------------------------------------------------------------------------
// Who may do what

#[test]
fn a_connection_that_never_registers_acquires_only_for_a_live_owner_it_names() {
    let d = start_with("");
    let images = tempfile::tempdir().expect("temp dir");
    let img = image(images.path(), "unregistered.img");

    // Not a running process: refused, nothing locked (nothing could ever release it).
    let ghost = {
        let p = sleeper();
        let o = owner_of(&p, "ghost");
        drop(p);
        o
    };
    let e = err(
        d.client().call(&acquire(&ghost, vec![excl(&img)])),
        ErrorKind::Invalid,
    );
    assert!(e.message.contains("not running"), "{}", e.message);
    // Unusable owner descriptions: refused.
    let q = sleeper();
    let good = owner_of(&q, "vm");
    for bad in [
        Owner {
            pid: 0,
            ..good.clone()
        },
        Owner {
            pid: u32::MAX,
            ..good.clone()
        },
        Owner {
            name: String::new(),
            ..good.clone()
        },
        Owner {
            uuid: String::new(),
            ..good.clone()
        },
    ] {
        err(
            d.client().call(&acquire(&bad, vec![excl(&img)])),
            ErrorKind::Invalid,
        );
    }
    assert_eq!(
        byte0(&img),
        libc::F_UNLCK,
        "a refused acquire locked something"
    );

    // libvirtd's CPU-start pattern: a fresh, unregistered connection acquires for QEMU's pid.
    let mut c = d.client();
    let held = c.acquired(&good, vec![excl(&img)]);
    assert_eq!(held.len(), 1);
    assert_eq!(held[0].owners, vec![good.clone()]);
    // That connection is not the owner's lifetime handle: closing it keeps the lease...
    // (The daemon decides what a closed connection means when it sees the hang-up, in the same
    // step that drops it from its client count: once the count fell, the decision is made.)
    let before = d.status().clients;
    drop(c);
    eventually("the daemon saw the connection close", || {
        d.status().clients < before
    });
    assert_eq!(byte0(&img), libc::F_WRLCK, "closing a non-handle released");
    assert_eq!(holders(&d, &img), vec![good.pid]);
    // ...and so is a Register sent from a pid that is not the owner's.
    let mut c = d.client();
    ok(c.call(&Request::Register {
        owner: good.clone(),
        restrict: false,
    }));
    let before = d.status().clients;
    drop(c);
    eventually("the daemon saw the connection close", || {
        d.status().clients < before
    });
    assert_eq!(byte0(&img), libc::F_WRLCK, "closing a non-handle released");
    assert_eq!(holders(&d, &img), vec![good.pid]);
    // Nor did either close start a kill sequence (it would SIGTERM the owner after a settle
    // time): a later sequence has already sent its SIGTERM, and the owner still runs.
    after_pending_kills(&d.socket, &image(images.path(), "witness.img"), || d.log());
    assert!(
        proc_running(q.pid()),
        "the owner was signalled after a non-handle closed"
    );
    assert!(
        !d.log().contains(&format!("(pid {}) still runs", good.pid)),
        "{}",
        d.log()
    );
    // The lease belongs to the owner process: it goes when that process goes.
    drop(q);
    eventually("the dead owner's lease is dropped", || {
        byte0(&img) == libc::F_UNLCK
    });
    assert!(d.list().is_empty());
}

#[test]
fn an_owner_cannot_release_inquire_or_take_another_owners_leases() {
    let d = start_with("");
    let images = tempfile::tempdir().expect("temp dir");
    let (img_a, img_b) = (image(images.path(), "a.img"), image(images.path(), "b.img"));
    let (qa, qb) = (sleeper(), sleeper());
    let (a, b) = (owner_of(&qa, "a"), owner_of(&qb, "b"));
    d.client().acquired(&a, vec![excl(&img_a)]);
    d.client().acquired(&b, vec![excl(&img_b)]);

    // A names B's disk in a Release: not A's lease, so nothing happens (and no error: libvirt
    // releases leases it does not hold).
    let left = d.client().released(&a, vec![excl(&img_b)]);
    assert_eq!(left.len(), 1, "A's own lease is untouched");
    assert_eq!(left[0].name, img_a.to_str().expect("utf-8"));
    assert_eq!(holders(&d, &img_b), vec![b.pid], "B's lease survived");
    assert_eq!(byte0(&img_b), libc::F_WRLCK);

    // Inquire answers for the named owner only.
    let seen = ok(d.client().call(&Request::Inquire { owner: a.clone() }));
    assert_eq!(seen.len(), 1);
    assert!(seen.iter().all(|l| l.owners.iter().all(|o| o.pid == a.pid)));

    // Taking B's disk is Busy and names B.
    let e = err(
        d.client().call(&acquire(&a, vec![excl(&img_b)])),
        ErrorKind::Busy,
    );
    let h = e.holder.expect("a busy error names the holder");
    assert_eq!(h.vm_uuid.as_deref(), Some(b.uuid.as_str()));
    assert_eq!(holders(&d, &img_b), vec![b.pid]);

    // A request naming an owner that holds nothing leaves everything alone.
    let (qc, lease_count) = (sleeper(), d.list().len());
    let c = owner_of(&qc, "c");
    d.client().released(&c, vec![excl(&img_a), excl(&img_b)]);
    assert!(ok(d.client().call(&Request::Inquire { owner: c })).is_empty());
    assert_eq!(d.list().len(), lease_count);
    assert_eq!(
        (byte0(&img_a), byte0(&img_b)),
        (libc::F_WRLCK, libc::F_WRLCK)
    );
}

#[test]
fn a_restricted_connection_is_refused_everything() {
    let d = start_with("");
    let images = tempfile::tempdir().expect("temp dir");
    let (img, other) = (image(images.path(), "r.img"), image(images.path(), "o.img"));
    let q = sleeper();
    let o = owner_of(&q, "restricted");
    d.client().acquired(&o, vec![excl(&img)]);

    // Restricted by Register, and by an Acquire with restrict set.
    let mut by_register = d.client();
    ok(by_register.call(&Request::Register {
        owner: o.clone(),
        restrict: true,
    }));
    let mut by_acquire = d.client();
    ok(by_acquire.call(&Request::Acquire {
        owner: o.clone(),
        leases: vec![],
        action: FailureAction::Default,
        restrict: true,
    }));
    for c in [&mut by_register, &mut by_acquire] {
        for req in [
            release(&o, vec![excl(&img)]),
            acquire(&o, vec![excl(&other)]),
            Request::Inquire { owner: o.clone() },
            Request::Register {
                owner: o.clone(),
                restrict: false,
            },
            Request::Status,
            Request::List,
        ] {
            let e = err(c.call(&req), ErrorKind::Denied);
            assert!(e.message.contains("restricted"), "{}", e.message);
        }
        // Garbage on a restricted connection is not a way around it either.
        protocol::write_message(&mut c.0, &Request::Status).expect("write");
        let e = err(
            protocol::read_message(&mut c.0).expect("read"),
            ErrorKind::Denied,
        );
        assert!(e.message.contains("restricted"), "{}", e.message);
    }
    assert_eq!(byte0(&img), libc::F_WRLCK, "the refused release released");
    assert_eq!(byte0(&other), libc::F_UNLCK, "the refused acquire locked");
    assert_eq!(holders(&d, &img), vec![o.pid]);
}

#[test]
fn a_peer_of_another_uid_is_refused_everything() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "this test runs a client as uid 65534: run the suite as root"
    );
    let d = start_with("");
    // Let uid 65534 reach the socket, so the daemon's own SO_PEERCRED check is what refuses.
    d.open_to_others();
    let images = tempfile::tempdir().expect("temp dir");
    let img = image(images.path(), "victim.img");
    let q = sleeper();
    let victim = owner_of(&q, "victim");
    d.client().acquired(&victim, vec![excl(&img)]);
    let theirs = image(images.path(), "theirs.img");

    for req in [
        release(&victim, vec![excl(&img)]),
        acquire(&victim, vec![excl(&theirs)]),
        Request::Inquire {
            owner: victim.clone(),
        },
        Request::Register {
            owner: victim.clone(),
            restrict: false,
        },
        Request::Status,
    ] {
        let resp = call_as(65534, &d.socket, &req);
        let e = err(resp, ErrorKind::Denied);
        assert!(e.message.contains("uid 65534"), "{}", e.message);
    }
    assert_eq!(byte0(&img), libc::F_WRLCK, "a foreign uid released a lease");
    assert_eq!(byte0(&theirs), libc::F_UNLCK, "a foreign uid took a lease");
    assert_eq!(holders(&d, &img), vec![victim.pid]);
}

// ---------------------------------------------------------------------------------------------
// Nobody is held up

#[test]
fn a_thousand_idle_and_stalled_connections_do_not_block_a_legitimate_acquire() {
    const IDLE: usize = 1000;
    assert!(
        fd_limit() > (IDLE as u64) + 200,
        "RLIMIT_NOFILE {} is too low for {IDLE} connections; raise it (ulimit -n)",
        fd_limit()
    );
    // The read and idle clocks are set far beyond the 30 s client timeout: a loop that waited
    // on any of these connections would wait until its clock closed it (10 s and 300 s by
    // default, which a stall shorter than 30 s would hide) and fails the acquire outright.
    let mut d = start_with("request_read_timeout_ms = 600000\nidle_timeout_ms = 600000\n");
    let images = tempfile::tempdir().expect("temp dir");
    let img = image(images.path(), "busy-host.img");
    let q = sleeper();
    let o = owner_of(&q, "legit");
    let mut quiet = acquire_cycles(&d, &o, &img, 30);

    // A third say nothing, a third stall inside a header, a third announce the largest body
    // and stall inside it.
    let big_header = protocol::header(MAX_BODY).expect("header");
    let mut idle = Vec::with_capacity(IDLE);
    for i in 0..IDLE {
        let mut s = UnixStream::connect(&d.socket).expect("idle connect");
        match i % 3 {
            0 => {}
            1 => s.write_all(&big_header[..7]).expect("partial header"),
            _ => {
                s.write_all(&big_header).expect("header");
                s.write_all(b"{\"op\":\"sta").expect("partial body");
            }
        }
        idle.push(s);
    }
    eventually("the daemon accepted every idle connection", || {
        d.status().clients > IDLE
    });
    let rss = daemon_memory(&d);

    let mut busy = acquire_cycles(&d, &o, &img, 30);
    eprintln!(
        "acquire latency, quiet daemon: {}\nacquire latency, {IDLE} idle/stalled connections: {}\n\
         daemon memory with them: {rss}",
        summary(&mut quiet),
        summary(&mut busy)
    );
    d.assert_alive();
    // The stalled clients are still served once they finish their frames.
    // Connection 998 (998 % 3 == 2) stalled inside the body of a maximal Status frame.
    let mut staller = idle.swap_remove(IDLE - 2);
    let mut body = b"{\"op\":\"status\"}".to_vec();
    body.resize(MAX_BODY, b' ');
    staller.write_all(&body[10..]).expect("rest of the body");
    staller.set_read_timeout(Some(BOUND)).expect("timeout");
    let resp: Response = protocol::read_message(&mut staller).expect("a late frame is answered");
    assert!(matches!(resp, Response::Status(_)), "{resp:?}");
    drop(idle);
    eventually("the idle connections are gone", || d.status().clients <= 2);
}

/// VmRSS and VmSize of the daemon, for the report.
fn daemon_memory(d: &TestDaemon) -> String {
    let status = fs::read_to_string(format!("/proc/{}/status", d.proc.pid())).unwrap_or_default();
    status
        .lines()
        .filter(|l| l.starts_with("VmRSS") || l.starts_with("VmSize"))
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Hammer the daemon with pipelined requests on one connection until `stop`; a reader thread
/// drains the answers (`read_answers`), or nobody does (the flooder's socket fills up).
fn flooder(
    socket: PathBuf,
    req: Request,
    read_answers: bool,
    stop: Arc<AtomicBool>,
) -> (thread::JoinHandle<u64>, Arc<AtomicU64>) {
    let answered = Arc::new(AtomicU64::new(0));
    let frame = protocol::encode(&req).expect("encode");
    let mut batch = Vec::new();
    for _ in 0..64 {
        batch.extend_from_slice(&frame);
    }
    let s = UnixStream::connect(&socket).expect("flooder connect");
    s.set_write_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    if read_answers {
        let mut r = s.try_clone().expect("clone");
        r.set_read_timeout(Some(Duration::from_millis(500)))
            .expect("timeout");
        let (stop, answered) = (stop.clone(), answered.clone());
        thread::spawn(move || {
            let mut buf = vec![0u8; 256 * 1024];
            while !stop.load(Ordering::Relaxed) {
                match r.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        answered.fetch_add(n as u64, Ordering::Relaxed);
                    }
                    Err(_) => {}
                }
            }
        });
    }
    let writer = thread::spawn(move || {
        let mut s = s;
        let mut sent = 0u64;
        while !stop.load(Ordering::Relaxed) {
            match s.write(&batch) {
                Ok(n) => sent += n as u64,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(_) => break,
            }
        }
        sent
    });
    (writer, answered)
}

/// "Not starved", measured in the daemon's own unit instead of in time: while one legitimate
/// request (answered on the event loop, no storage) waits for its answer, how many bytes of
/// answers does a flooder that pipelines without pause receive? A fair loop answers at most
/// FRAMES_PER_ROUND (16, limits.rs) of the flooder's frames per round and serves the newcomer
/// within a round or two, so the flooder gets a few rounds' worth of answers, plus what was
/// already queued for it before the request was sent: the daemon's socket send buffer
/// (net.core.wmem_default; the daemon does not change it) and one round of answers it holds
/// itself. A loop that served the flooder until it ran dry (it never does) would let the count
/// grow without end, and this bound fails it at once, where the 30 s client timeout alone
/// would have let a stall of up to 30 s pass.
fn starvation_bound_bytes() -> u64 {
    let frame = protocol::encode(&Response::Ok { leases: Vec::new() })
        .expect("encode")
        .len() as u64;
    let wmem: u64 = fs::read_to_string("/proc/sys/net/core/wmem_default")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .expect("read /proc/sys/net/core/wmem_default");
    const FRAMES_PER_ROUND: u64 = 16;
    const ROUNDS: u64 = 8;
    wmem + (ROUNDS + 1) * FRAMES_PER_ROUND * frame
}

/// Legitimate Inquire round trips (each on a fresh connection) while the flooder that counts
/// its answers in `answered` runs; returns the most flood-answer bytes seen during one.
fn flood_answers_during_requests(d: &TestDaemon, owner: &Owner, answered: &AtomicU64) -> u64 {
    (0..20)
        .map(|_| {
            let mut c = d.client();
            let before = answered.load(Ordering::SeqCst);
            ok(c.call(&Request::Inquire {
                owner: owner.clone(),
            }));
            answered.load(Ordering::SeqCst) - before
        })
        .max()
        .unwrap_or(0)
}

#[test]
fn flooding_clients_do_not_starve_a_legitimate_acquire() {
    let mut d = start_with("");
    let images = tempfile::tempdir().expect("temp dir");
    let img = image(images.path(), "flooded.img");
    let q = sleeper();
    let o = owner_of(&q, "legit");
    let flood_owner = {
        let f = sleeper();
        (owner_of(&f, "flood"), f)
    };
    let mut quiet = acquire_cycles(&d, &o, &img, 30);

    let stop = Arc::new(AtomicBool::new(false));
    // One flooder that reads its answers (pipelined Inquire), one that never reads them
    // (Status: its socket fills up and the daemon stops reading it).
    let (reader_flood, answered) = flooder(
        d.socket.clone(),
        Request::Inquire {
            owner: flood_owner.0.clone(),
        },
        true,
        stop.clone(),
    );
    let (deaf_flood, _) = flooder(d.socket.clone(), Request::Status, false, stop.clone());
    eventually("the reading flooder is being answered", || {
        answered.load(Ordering::SeqCst) > 0
    });
    let mut flooded = acquire_cycles(&d, &o, &img, 10);
    let worst = flood_answers_during_requests(&d, &o, &answered);
    let bound = starvation_bound_bytes();
    assert!(
        worst <= bound,
        "a legitimate request waited while the flooder got {worst} bytes of answers (bound \
         {bound}): the flooder is served ahead of others"
    );
    assert!(
        !reader_flood.is_finished() && !deaf_flood.is_finished(),
        "the flood stopped before the legitimate requests were answered"
    );
    stop.store(true, Ordering::Relaxed);
    let sent_reader = reader_flood.join().expect("flooder");
    let sent_deaf = deaf_flood.join().expect("flooder");
    eprintln!(
        "acquire latency, quiet daemon: {}\nacquire latency under 2 flooders: {} \
         (pipelined inquire: {sent_reader} bytes sent, {} bytes answered; deaf status flooder: \
         {sent_deaf} bytes sent); at most {worst} bytes of flood answers during one legitimate \
         inquire (bound {bound})",
        summary(&mut quiet),
        summary(&mut flooded),
        answered.load(Ordering::Relaxed)
    );
    assert!(
        answered.load(Ordering::Relaxed) > 0,
        "the reading flooder was never answered"
    );
    d.assert_alive();
    assert_eq!(byte0(&img), libc::F_UNLCK);
    eventually("the flooders' connections are gone", || {
        d.status().clients <= 2
    });
}

#[test]
fn half_a_frame_and_a_stall_hold_nothing_up() {
    let mut d = start_with("");
    let images = tempfile::tempdir().expect("temp dir");
    let img = image(images.path(), "stall.img");
    let q = sleeper();
    let o = owner_of(&q, "legit");
    let frame = protocol::encode(&acquire(&o, vec![excl(&img)])).expect("encode");

    // Every split point of a real request: header bytes only, header plus part of the body.
    let mut stalled = Vec::new();
    for cut in [
        1,
        4,
        6,
        HEADER_LEN - 1,
        HEADER_LEN,
        HEADER_LEN + 1,
        frame.len() - 1,
    ] {
        let mut s = UnixStream::connect(&d.socket).expect("connect");
        s.write_all(&frame[..cut]).expect("partial frame");
        stalled.push((s, cut));
    }
    // Meanwhile, the same request from somebody else goes through at once.
    let other = image(images.path(), "other.img");
    let held = d.client().acquired(&o, vec![excl(&other)]);
    assert_eq!(held.len(), 1);
    assert_eq!(byte0(&img), libc::F_UNLCK, "a half request took the lease");
    d.assert_alive();
    // A stalled client that finishes its frame is answered normally.
    for (s, cut) in &mut stalled {
        s.write_all(&frame[*cut..]).expect("rest of the frame");
        s.set_read_timeout(Some(BOUND)).expect("timeout");
        let answer = ok(protocol::read_message(s).expect("answer to the completed frame"));
        assert!(
            answer.is_empty(),
            "split at {cut}: acquire answers carry no leases"
        );
        assert_eq!(d.client().held(&o).len(), 2, "split at {cut}");
    }
    assert_eq!(byte0(&img), libc::F_WRLCK);
}

// ---------------------------------------------------------------------------------------------
// Bounded resources (part B: docs/hardening.md)

/// A connection storm: `threads` threads connecting, sending a Status, reading the answer (or
/// not) and hanging up as fast as they can until `stop`. Returns the number of connects.
fn connect_storm(
    socket: PathBuf,
    threads: usize,
    stop: Arc<AtomicBool>,
) -> Vec<thread::JoinHandle<u64>> {
    let frame = protocol::encode(&Request::Status).expect("encode");
    (0..threads)
        .map(|t| {
            let (socket, stop, frame) = (socket.clone(), stop.clone(), frame.clone());
            thread::spawn(move || {
                let mut n = 0u64;
                let mut held = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let Ok(mut s) = UnixStream::connect(&socket) else {
                        continue;
                    };
                    n += 1;
                    let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
                    match n % 4 {
                        // Ask and read the answer.
                        0 => {
                            let _ = s.write_all(&frame);
                            let mut buf = [0u8; 512];
                            let _ = s.read(&mut buf);
                        }
                        // Ask and hang up without reading.
                        1 => {
                            let _ = s.write_all(&frame);
                        }
                        // Connect and hang up at once.
                        2 => {}
                        // Connect and stay (a few per thread), saying nothing.
                        _ if t % 2 == 0 && held.len() < 50 => held.push(s),
                        _ => {}
                    }
                }
                n
            })
        })
        .collect()
}

#[test]
fn a_pipelining_flooder_and_a_connect_storm_do_not_starve_a_legitimate_acquire() {
    let mut d = start_with("");
    let images = tempfile::tempdir().expect("temp dir");
    let img = image(images.path(), "stormy.img");
    let q = sleeper();
    let o = owner_of(&q, "legit");
    let f = sleeper();
    let flood_owner = owner_of(&f, "flood");
    let mut quiet = acquire_cycles(&d, &o, &img, 20);

    let stop = Arc::new(AtomicBool::new(false));
    let (flood, answered) = flooder(
        d.socket.clone(),
        Request::Inquire {
            owner: flood_owner.clone(),
        },
        true,
        stop.clone(),
    );
    let storm = connect_storm(d.socket.clone(), 4, stop.clone());
    eventually("the flooder is being answered", || {
        answered.load(Ordering::SeqCst) > 0
    });
    let t0 = Instant::now();
    let mut stormy = acquire_cycles(&d, &o, &img, 20);
    let during = t0.elapsed();
    let worst = flood_answers_during_requests(&d, &o, &answered);
    let bound = starvation_bound_bytes();
    assert!(
        worst <= bound,
        "a legitimate request waited while the flooder got {worst} bytes of answers (bound \
         {bound}): the flooder is served ahead of others"
    );
    assert!(
        !flood.is_finished() && storm.iter().all(|h| !h.is_finished()),
        "the flood stopped before the legitimate requests were answered"
    );
    // The admin socket is served as well (a separate listener with its own accept budget).
    let clients_then = d.status().clients;
    stop.store(true, Ordering::Relaxed);
    let sent = flood.join().expect("flooder");
    let connects: u64 = storm.into_iter().map(|h| h.join().expect("storm")).sum();
    eprintln!(
        "acquire latency, quiet daemon: {}\nacquire latency under a pipelining flooder and a \
         connect storm: {} (20 cycles in {:.0} ms; flooder sent {sent} bytes, got {} bytes of \
         answers; {connects} storm connects; {clients_then} clients at the end); at most \
         {worst} bytes of flood answers during one legitimate inquire (bound {bound})",
        summary(&mut quiet),
        summary(&mut stormy),
        during.as_secs_f64() * 1000.0,
        answered.load(Ordering::Relaxed)
    );
    assert!(
        answered.load(Ordering::Relaxed) > 0,
        "the flooder was never answered"
    );
    assert!(connects > 20, "the storm did not run ({connects} connects)");
    d.assert_alive();
    assert_eq!(byte0(&img), libc::F_UNLCK);
    eventually("the storm's connections are gone", || {
        d.status().clients <= 2
    });
}

/// Does the daemon still hold this connection open (no EOF, no error)?
fn still_open(s: &UnixStream) -> bool {
    s.set_nonblocking(true).expect("nonblocking");
    let mut buf = [0u8; 64];
    let open = match (&*s).read(&mut buf) {
        Ok(0) => false,
        Ok(_) => true,
        Err(e) => e.kind() == std::io::ErrorKind::WouldBlock,
    };
    s.set_nonblocking(false).expect("blocking");
    open
}

#[test]
fn stalled_connections_lose_their_client_slots_after_the_read_timeout() {
    const MAX: usize = 20;
    let mut d = start_with(&format!(
        "max_clients = {MAX}\nrequest_read_timeout_ms = 1000\n"
    ));
    let images = tempfile::tempdir().expect("temp dir");
    let img = image(images.path(), "slot.img");
    let q = sleeper();
    let o = owner_of(&q, "legit");

    // Every slot taken by a client that sent 3 bytes of a header and stalled.
    let t0 = Instant::now();
    let stallers: Vec<UnixStream> = (0..MAX)
        .map(|_| {
            let mut s = UnixStream::connect(&d.socket).expect("staller connect");
            s.write_all(&protocol::MAGIC[..3]).expect("3 bytes");
            s
        })
        .collect();
    // They were accepted first (one listener, in order): a legitimate client is refused now,
    // with the limit and the key named.
    let e = err(
        d.client().call(&acquire(&o, vec![excl(&img)])),
        ErrorKind::Internal,
    );
    assert!(
        e.message.contains("max_clients") && e.message.contains(&format!("{MAX} clients")),
        "{}",
        e.message
    );
    assert_eq!(byte0(&img), libc::F_UNLCK);

    // After request_read_timeout_ms the stallers are closed and the acquire goes through.
    let bound = BOUND.saturating_sub(t0.elapsed());
    let held = poll_every(Duration::from_millis(50), bound, || {
        match d.client().call(&acquire(&o, vec![excl(&img)])) {
            Response::Ok { leases } => {
                assert!(
                    leases.is_empty(),
                    "acquire answers carry no leases: {leases:?}"
                );
                Some(d.client().held(&o))
            }
            Response::Error(e) if e.message.contains("max_clients") => None,
            other => panic!("unexpected answer {other:?}"),
        }
    })
    .map(|(held, _)| held)
    .unwrap_or_else(|| panic!("the stallers were never closed"));
    let waited = t0.elapsed();
    eprintln!(
        "{MAX} stalled clients (max_clients = {MAX}, request_read_timeout_ms = 1000): a \
         legitimate acquire succeeded {:.0} ms after they connected",
        waited.as_secs_f64() * 1000.0
    );
    assert_eq!(held.len(), 1);
    assert_eq!(byte0(&img), libc::F_WRLCK);
    assert!(
        waited >= Duration::from_millis(900),
        "stallers closed before their timeout"
    );
    eventually("every staller is closed", || {
        stallers.iter().all(|s| !still_open(s))
    });
    let log = d.log();
    assert!(
        log.contains("request_read_timeout_ms") && log.contains("sent 3 bytes of a request"),
        "the closing is logged:\n{log}"
    );
    d.assert_alive();
}

#[test]
fn idle_connections_are_closed_but_never_a_lifetime_handle() {
    let d = start_with("idle_timeout_ms = 300\nrequest_read_timeout_ms = 300\n");
    // This test process is the owner: its own connection becomes the lifetime handle.
    let me = Owner {
        uuid: format!("1d1e0000-0000-4000-8000-{:012x}", std::process::id()),
        name: "handle-holder".into(),
        id: 1,
        pid: std::process::id(),
    };
    let mut handle = d.client();
    ok(handle.call(&Request::Register {
        owner: me.clone(),
        restrict: false,
    }));
    let idle = UnixStream::connect(&d.socket).expect("idle connect");
    // A client that used its connection once and then went quiet.
    let mut used = d.client();
    ok(used.call(&Request::Inquire { owner: me.clone() }));
    // Once both are closed (an event, bounded), the handle, idle just as long, is still open.
    eventually("the idle and the quiet connection are closed", || {
        !still_open(&idle) && !still_open(&used.0)
    });
    assert!(still_open(&handle.0), "a lifetime handle was closed");
    // The handle still works, and is still the handle (the daemon counts it).
    assert!(ok(handle.call(&Request::Inquire { owner: me })).is_empty());
    assert!(d.status().clients >= 2, "handle and this status call");
    // idle_timeout_ms = 0 disables the idle clock. A witness daemon with a 1000 ms idle clock
    // gets an idle connection opened after d0's; once the witness has closed its own (an
    // event, not a sleep), d0's connection has been idle longer, and must still be open. This
    // catches 0 read as "0 ms" or as any clock up to 1000 ms; that 0 maps to no clock at all
    // (and not, say, to the 300 s default) is pinned by the settings unit test.
    let d0 = start_with("idle_timeout_ms = 0\n");
    let witness = start_with("idle_timeout_ms = 1000\n");
    let idle = UnixStream::connect(&d0.socket).expect("idle connect");
    let watched = UnixStream::connect(&witness.socket).expect("witness connect");
    assert!(still_open(&idle) && still_open(&watched));
    eventually("the witness closes its idle connection", || {
        !still_open(&watched)
    });
    assert!(still_open(&idle), "idle_timeout_ms = 0 closed a connection");
}

#[test]
fn a_request_naming_a_registered_pid_with_another_uuid_is_refused() {
    let d = start_with("");
    let images = tempfile::tempdir().expect("temp dir");
    let (img, other) = (
        image(images.path(), "id.img"),
        image(images.path(), "id2.img"),
    );
    let q = sleeper();
    let a = owner_of(&q, "real");
    d.client().acquired(&a, vec![excl(&img)]);
    let impostor = Owner {
        uuid: "0bad1d00-0000-4000-8000-000000000001".into(),
        name: "impostor".into(),
        ..a.clone()
    };
    for req in [
        acquire(&impostor, vec![excl(&other)]),
        release(&impostor, vec![excl(&img)]),
        Request::Inquire {
            owner: impostor.clone(),
        },
        Request::Register {
            owner: impostor.clone(),
            restrict: false,
        },
    ] {
        let e = err(d.client().call(&req), ErrorKind::Invalid);
        let want = format!(
            "pid {} is registered for VM '{}' (uuid {}); this request names uuid {}",
            a.pid, a.name, a.uuid, impostor.uuid
        );
        assert!(e.message.contains(&want), "{}", e.message);
    }
    assert_eq!(byte0(&img), libc::F_WRLCK, "the impostor released");
    assert_eq!(byte0(&other), libc::F_UNLCK, "the impostor acquired");
    let infos = d.list();
    assert_eq!(infos.len(), 1);
    assert_eq!(infos[0].owners, vec![a.clone()]);

    // Same uuid, new name: a renamed domain. Accepted, and the name is updated.
    let renamed = Owner {
        name: format!("{}-renamed", a.name),
        ..a.clone()
    };
    ok(d.client().call(&Request::Register {
        owner: renamed.clone(),
        restrict: false,
    }));
    assert_eq!(d.list()[0].owners, vec![renamed.clone()]);
    d.client().released(&renamed, vec![excl(&img)]);
    eventually("the renamed owner's release dropped the lock", || {
        byte0(&img) == libc::F_UNLCK
    });
}

#[test]
fn owner_and_lease_limits_refuse_with_the_key_to_raise() {
    let d = start_with("max_owners = 2\nmax_leases_per_request = 3\n");
    let images = tempfile::tempdir().expect("temp dir");
    let imgs: Vec<PathBuf> = (0..6)
        .map(|i| image(images.path(), &format!("l{i}.img")))
        .collect();
    let (qa, qb, qc) = (sleeper(), sleeper(), sleeper());
    let (a, b, c) = (owner_of(&qa, "a"), owner_of(&qb, "b"), owner_of(&qc, "c"));

    // Four disks in one request: over max_leases_per_request, nothing taken.
    let e = err(
        d.client()
            .call(&acquire(&a, imgs[..4].iter().map(|p| excl(p)).collect())),
        ErrorKind::Invalid,
    );
    common::assert_mentions(
        &e.message,
        &[
            "4 leases",
            "limit of 3",
            "max_leases_per_request",
            "lockwardend.conf",
        ],
    );
    assert!(imgs[..4].iter().all(|p| byte0(p) == libc::F_UNLCK));
    let e = err(
        d.client()
            .call(&release(&a, imgs[..4].iter().map(|p| excl(p)).collect())),
        ErrorKind::Invalid,
    );
    assert!(
        e.message.contains("max_leases_per_request"),
        "{}",
        e.message
    );
    // Three is fine.
    assert_eq!(
        d.client()
            .acquired(&a, imgs[..3].iter().map(|p| excl(p)).collect())
            .len(),
        3
    );

    // Two owners fit, a third does not; a known owner still may act.
    d.client().acquired(&b, vec![excl(&imgs[3])]);
    let e = err(
        d.client().call(&acquire(&c, vec![excl(&imgs[4])])),
        ErrorKind::Internal,
    );
    common::assert_mentions(
        &e.message,
        &[
            "maximum of 2 VMs",
            "max_owners",
            "lockwardend.conf",
            &c.name,
        ],
    );
    assert_eq!(byte0(&imgs[4]), libc::F_UNLCK);
    d.client().acquired(&b, vec![excl(&imgs[5])]);
    // When an owner goes, the third one fits.
    drop(qb);
    eventually("the exited owner is forgotten", || {
        matches!(
            d.client().call(&acquire(&c, vec![excl(&imgs[4])])),
            Response::Ok { .. }
        )
    });
    assert_eq!(holders(&d, &imgs[4]), vec![c.pid]);
}

fn proc_limits_nofile(pid: u32) -> String {
    fs::read_to_string(format!("/proc/{pid}/limits"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

#[test]
fn the_descriptor_limit_is_raised_and_checked_at_start() {
    // A soft limit below the hard one is raised; a hard limit too low for the maximums warns.
    let d = start_limited("max_clients = 4096\n", Some((256, 2048)));
    assert_eq!(
        proc_limits_nofile(d.proc.pid()),
        "Max open files 2048 2048 files"
    );
    let log = d.log();
    assert!(
        log.contains("open-file limit (RLIMIT_NOFILE) is 2048, below the")
            && log.contains("LimitNOFILE="),
        "no warning:\n{log}"
    );
    // Enough for small maximums: no warning.
    let d = start_limited("max_clients = 10\nmax_owners = 10\n", Some((256, 2048)));
    let log = d.log();
    assert!(!log.contains("below the"), "spurious warning:\n{log}");
    assert!(log.contains("open-file limit 2048"), "{log}");
}

fn vm_size_kib(d: &TestDaemon) -> u64 {
    fs::read_to_string(format!("/proc/{}/status", d.proc.pid()))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmSize:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmSize")
}

#[test]
fn a_header_announcing_a_maximal_body_reserves_no_memory() {
    const N: usize = 200;
    let d = start_with("");
    // Warm up (first requests allocate the daemon's steady-state buffers).
    assert!(d.list().is_empty());
    let before = vm_size_kib(&d);
    let header = protocol::header(MAX_BODY).expect("header");
    let conns: Vec<UnixStream> = (0..N)
        .map(|_| {
            let mut s = UnixStream::connect(&d.socket).expect("connect");
            s.write_all(&header).expect("header");
            s.write_all(b"{\"op\"").expect("a few body bytes");
            s
        })
        .collect();
    eventually("every connection is accepted", || d.status().clients > N);
    // Every poll round reads every readable connection; two more status round trips, sent
    // after all the bytes above, end only after a round that had them all readable (an event
    // the daemon answers, not a guessed sleep).
    d.status();
    d.status();
    let after = vm_size_kib(&d);
    eprintln!(
        "{N} connections announcing {MAX_BODY}-byte bodies: daemon VmSize {before} KiB -> \
         {after} KiB"
    );
    // Reserving the announced body would map N MiB.
    assert!(
        after.saturating_sub(before) < (N as u64) * 1024 / 4,
        "VmSize grew from {before} KiB to {after} KiB for {N} bare headers"
    );
    drop(conns);
}

// ---------------------------------------------------------------------------------------------
// File safety

fn lockspace(dir: &Path, file: &str, create_dir: bool) -> LeaseSpec {
    LeaseSpec {
        name: format!("/images/{file}.qcow2"),
        kind: ResourceKind::Disk,
        mode: LeaseMode::Exclusive,
        target: LockTarget::Lockspace {
            dir: dir.to_str().expect("utf-8").to_string(),
            file: file.to_string(),
            create_dir,
        },
    }
}

#[test]
fn unsafe_lockspace_directories_are_refused() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "this test chowns a directory: run the suite as root"
    );
    let d = start_with("");
    let base = tempfile::tempdir().expect("temp dir");
    let q = sleeper();
    let o = owner_of(&q, "ls");
    let mk = |name: &str, mode: u32| {
        let p = base.path().join(name);
        fs::create_dir(&p).expect("mkdir");
        fs::set_permissions(&p, fs::Permissions::from_mode(mode)).expect("chmod");
        p
    };

    // World-writable, not sticky.
    let open = mk("open", 0o777);
    let e = err(
        d.client()
            .call(&acquire(&o, vec![lockspace(&open, "a", false)])),
        ErrorKind::Invalid,
    );
    common::assert_mentions(
        &e.message,
        &[
            open.to_str().expect("utf-8"),
            "writable by every user",
            "0777",
            "chmod",
        ],
    );
    assert!(!open.join("a").exists(), "a lock file was created in it");

    // Owned by another user.
    let theirs = mk("theirs", 0o755);
    std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)).expect("chown");
    let e = err(
        d.client()
            .call(&acquire(&o, vec![lockspace(&theirs, "b", false)])),
        ErrorKind::Invalid,
    );
    common::assert_mentions(
        &e.message,
        &[theirs.to_str().expect("utf-8"), "uid 65534", "chown"],
    );
    assert!(!theirs.join("b").exists());

    // Sticky world-writable (like /tmp) and private directories are fine; a created one is
    // private; lock files are created 0600.
    let sticky = mk("sticky", 0o1777);
    let private = mk("private", 0o700);
    let created = base.path().join("new/lockspace");
    let held = d.client().acquired(
        &o,
        vec![
            lockspace(&sticky, "c", false),
            lockspace(&private, "d", false),
            lockspace(&created, "e", true),
        ],
    );
    assert_eq!(held.len(), 3);
    let mode = |p: &Path| fs::metadata(p).expect("stat").permissions().mode() & 0o7777;
    assert_eq!(mode(&created), 0o700);
    for f in [sticky.join("c"), private.join("d"), created.join("e")] {
        assert_eq!(mode(&f), 0o600, "{f:?}");
        assert_eq!(byte0(&f), libc::F_WRLCK, "{f:?}");
    }

    // A planted symlink as the lock file is never followed.
    let target = image(base.path(), "victim");
    std::os::unix::fs::symlink(&target, private.join("f")).expect("symlink");
    let e = err(
        d.client()
            .call(&acquire(&o, vec![lockspace(&private, "f", false)])),
        ErrorKind::Invalid,
    );
    assert!(e.message.contains("symbolic link"), "{}", e.message);
    assert_eq!(byte0(&target), libc::F_UNLCK);
    assert_eq!(fs::read(&target).expect("read"), vec![0u8; 4096]);
}

#[test]
fn direct_mode_never_writes_an_image() {
    use std::os::unix::fs::MetadataExt;
    let d = start_with("");
    let images = tempfile::tempdir().expect("temp dir");
    let content: Vec<u8> = (0..65536u32).map(|i| (i * 7 + 3) as u8).collect();
    let (rw, ro_img) = (images.path().join("rw.img"), images.path().join("ro.img"));
    for p in [&rw, &ro_img] {
        fs::write(p, &content).expect("write image");
        // An old mtime, so any write would show.
        let old = std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
        File::options()
            .write(true)
            .open(p)
            .expect("open")
            .set_modified(old)
            .expect("set mtime");
    }
    let stamp = |p: &Path| {
        let m = fs::metadata(p).expect("stat");
        (
            m.len(),
            m.mtime(),
            m.mtime_nsec(),
            m.ctime(),
            m.ctime_nsec(),
            m.mode(),
        )
    };
    let (before_x, before_s) = (stamp(&rw), stamp(&ro_img));
    thread::sleep(Duration::from_millis(20));
    let q = sleeper();
    let o = owner_of(&q, "direct");
    let ro = common::proto::shared(&ro_img);
    let held = d.client().acquired(&o, vec![excl(&rw), ro.clone()]);
    assert_eq!(held.len(), 2);
    assert_eq!(byte0(&rw), libc::F_WRLCK);
    d.client().released(&o, vec![excl(&rw), ro]);
    eventually("the release dropped the lock", || {
        byte0(&rw) == libc::F_UNLCK
    });
    for (p, before) in [(&rw, before_x), (&ro_img, before_s)] {
        assert_eq!(fs::read(p).expect("read"), content, "{p:?} content changed");
        assert_eq!(stamp(p), before, "{p:?} size/mtime/ctime/mode changed");
    }
}
