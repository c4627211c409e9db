//! lockwarden.so + lockwardend against Debian's lockd.so + virtlockd, side by side (issue 8).
//!
//! `cargo bench --bench lockcycle` (as root). Both plugins are driven by the same C test host
//! (tests/c/host.c), interleaved sample by sample, each daemon in its own mount namespace; see
//! docs/benchmarks.md for what every number means. Iteration counts come from environment
//! variables (`LW_BENCH_*`, listed in `Config::from_env`).

#[path = "lockcycle/procs.rs"]
mod procs;
#[path = "lockcycle/scale.rs"]
mod scale;
#[path = "lockcycle/slowfs.rs"]
mod slowfs;
#[path = "lockcycle/stats.rs"]
mod stats;

use lockwarden::protocol::{
    self, FailureAction, LeaseInfo, LeaseMode, LeaseSpec, LockTarget, Owner, Request, ResourceKind,
    Response,
};
use procs::{Artefacts, Daemon, Host, Side, Vm, disk_token};
use serde_json::{Value, json};
use stats::{Echo, Stats, fmt_us, r1, us_since};
use std::collections::BTreeMap;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

/// Run-size knobs, all from the environment.
struct Config {
    /// Full cycles per side and disk count (LW_BENCH_ITERS, default 100).
    iters: usize,
    /// Seconds per side and concurrency level for throughput (LW_BENCH_TPUT_SECS, default 2).
    tput_secs: f64,
    /// Concurrency levels (LW_BENCH_CONC, default "1,8,64").
    conc: Vec<usize>,
    /// Held-lease levels for RSS, descriptors and latency (LW_BENCH_HELD, default
    /// "5000,15000"; 0 is always measured first).
    held: Vec<usize>,
    /// Disks per holder owner (LW_BENCH_HOLD_PER_OWNER, default 10: 1,500 VMs at 15,000).
    hold_per_owner: usize,
    /// Disk counts of the held-lease acquire probes (LW_BENCH_SCALE_DISKS, default "1,10").
    scale_disks: Vec<usize>,
    /// Acquire samples per side and held level (LW_BENCH_LAT_ITERS, default 200).
    lat_iters: usize,
    /// Directory on a mount whose lock calls take ~2 ms (LW_BENCH_SLOW_DIR; unset = pending).
    slow_dir: Option<PathBuf>,
    /// Result file (LW_BENCH_OUT, default target/bench/lockcycle.json).
    out: PathBuf,
    /// Abort (kill both daemons) after this many seconds (LW_BENCH_TIMEOUT, default 900).
    timeout: u64,
}

fn env_num<T: std::str::FromStr>(k: &str, d: T) -> Result<T, String> {
    match std::env::var(k) {
        Ok(v) => v
            .trim()
            .parse()
            .map_err(|_| format!("{k}={v:?} is not a number")),
        Err(_) => Ok(d),
    }
}

fn env_list(k: &str, d: &str) -> Result<Vec<usize>, String> {
    let v = std::env::var(k).unwrap_or_else(|_| d.to_string());
    v.split(',')
        .map(|x| {
            x.trim()
                .parse()
                .map_err(|_| format!("{k}={v:?}: {x:?} is not a number"))
        })
        .collect()
}

impl Config {
    fn from_env() -> Result<Config, String> {
        let out = match std::env::var_os("LW_BENCH_OUT") {
            Some(p) => PathBuf::from(p),
            None => {
                // target/<profile>/deps/lockcycle-HASH -> target/bench/lockcycle.json
                let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
                let target = exe
                    .ancestors()
                    .nth(3)
                    .ok_or("cannot find the target directory")?;
                target.join("bench").join("lockcycle.json")
            }
        };
        Ok(Config {
            iters: env_num("LW_BENCH_ITERS", 100)?,
            tput_secs: env_num("LW_BENCH_TPUT_SECS", 2.0)?,
            conc: env_list("LW_BENCH_CONC", "1,8,64")?,
            held: env_list("LW_BENCH_HELD", "5000,15000")?,
            hold_per_owner: env_num("LW_BENCH_HOLD_PER_OWNER", 10)?,
            scale_disks: env_list("LW_BENCH_SCALE_DISKS", "1,10")?,
            lat_iters: env_num("LW_BENCH_LAT_ITERS", 200)?,
            slow_dir: std::env::var_os("LW_BENCH_SLOW_DIR").map(PathBuf::from),
            out,
            timeout: env_num("LW_BENCH_TIMEOUT", 900)?,
        })
    }
}

/// Per-side state: the daemon, one host for latency work, and a directory for disk files.
struct Bed {
    side: Side,
    daemon: Daemon,
    host: Host,
    files: PathBuf,
    /// (daemon, helper processes) VmRSS in KiB right after start.
    idle_rss: (u64, u64),
}

impl Bed {
    fn new(a: &Artefacts, root: &Path, side: Side) -> Result<Bed, String> {
        let dir = root.join(side.name());
        let daemon = match side {
            Side::Lockwarden => Daemon::lockwardend(a, &dir)?,
            Side::Lockd => Daemon::virtlockd(&dir)?,
            Side::Noop => return Err("the no-op plugin has no daemon to test".into()),
        };
        // Let the daemon settle, then read its idle footprint before any client appears.
        thread::sleep(Duration::from_millis(200));
        let idle_rss = daemon.rss_kib()?;
        let host = Host::spawn(a, &daemon, &dir.join("host.log"))?;
        let files = dir.join("disks");
        fs::create_dir_all(&files).map_err(|e| format!("mkdir {files:?}: {e}"))?;
        Ok(Bed {
            side,
            daemon,
            host,
            files,
            idle_rss,
        })
    }

    /// `n` empty disk images named `label-i`; returns (paths, host tokens joined).
    fn disks(&self, label: &str, n: usize) -> Result<(Vec<PathBuf>, String), String> {
        let mut paths = Vec::with_capacity(n);
        for i in 0..n {
            let p = self.files.join(format!("{label}-{i:05}.img"));
            if !p.exists() {
                File::create(&p).map_err(|e| format!("create {p:?}: {e}"))?;
            }
            paths.push(p);
        }
        let toks = paths
            .iter()
            .map(|p| disk_token(p))
            .collect::<Vec<_>>()
            .join(" ");
        Ok((paths, toks))
    }
}

/// Open handles on a VM's disks, to see when the daemon has dropped its kernel locks.
struct Watch(Vec<File>);

impl Watch {
    fn new(paths: &[PathBuf]) -> Result<Watch, String> {
        paths
            .iter()
            .map(|p| {
                File::options()
                    .read(true)
                    .write(true)
                    .open(p)
                    .map_err(|e| format!("open {p:?}: {e}"))
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Watch)
    }

    /// Spin (yielding), then sleep briefly, until no lock is left on byte 0 of any disk.
    fn wait_free(&self) -> Result<(), String> {
        let t0 = Instant::now();
        for f in &self.0 {
            while stats::byte0_locked(f)? {
                let e = t0.elapsed();
                if e > Duration::from_secs(20) {
                    return Err("a disk was still locked 20 s after its owner died".into());
                }
                if e < Duration::from_millis(5) {
                    thread::yield_now();
                } else {
                    thread::sleep(Duration::from_micros(100));
                }
            }
        }
        Ok(())
    }
}

const PHASES: [&str; 6] = ["start", "acquire", "release", "resume", "exit", "total"];

/// One VM lock cycle as libvirt drives it: start (registration in the forked child, which
/// execs), CPU-start acquire, pause release, resume acquire, destroy (SIGKILL, reap) until the
/// leases are free. Returns the phase times in microseconds.
fn cycle(h: &mut Host, side: Side, toks: &str, watch: &Watch) -> Result<[f64; 6], String> {
    let vm = Vm::new(side, "cyc");
    let t0 = Instant::now();
    let pid = h.start(&vm, "")?;
    let t1 = Instant::now();
    h.acquire(&vm, pid, toks)?;
    let t2 = Instant::now();
    h.release(&vm, pid, toks)?;
    let t3 = Instant::now();
    h.acquire(&vm, pid, toks)?;
    let t4 = Instant::now();
    h.kill_owner(pid)?;
    watch.wait_free()?;
    let t5 = Instant::now();
    let d = |a: Instant, b: Instant| (b - a).as_secs_f64() * 1e6;
    Ok([
        d(t0, t1),
        d(t1, t2),
        d(t2, t3),
        d(t3, t4),
        d(t4, t5),
        d(t0, t5),
    ])
}

/// Per side: phase name -> stats.
type PhaseStats = BTreeMap<&'static str, Stats>;

/// Section 1: full cycles with 1 and 16 disks, interleaved sample by sample.
fn bench_cycles(beds: &mut [Bed], ndisks: usize, iters: usize) -> Result<Vec<PhaseStats>, String> {
    let mut prep = Vec::new();
    for b in beds.iter() {
        let (paths, toks) = b.disks(&format!("cycle{ndisks}"), ndisks)?;
        prep.push((Watch::new(&paths)?, toks));
    }
    let mut samples: Vec<Vec<[f64; 6]>> = vec![Vec::new(); beds.len()];
    let warm = (iters / 10).max(3);
    for i in 0..warm + iters {
        for k in 0..beds.len() {
            // Alternate which side goes first.
            let j = if i % 2 == 0 { k } else { beds.len() - 1 - k };
            let (b, (w, toks)) = (&mut beds[j], &prep[j]);
            let s = cycle(&mut b.host, b.side, toks, w)?;
            if i >= warm {
                samples[j].push(s);
            }
        }
    }
    Ok(samples
        .iter()
        .map(|ss| {
            PHASES
                .iter()
                .enumerate()
                .map(|(p, name)| {
                    let v: Vec<f64> = ss.iter().map(|s| s[p]).collect();
                    (*name, Stats::of(&v))
                })
                .collect()
        })
        .collect())
}

/// The host's own command round trip (`alive 1`: kill(1, 0) in the host) per side.
fn bench_host_overhead(beds: &mut [Bed], iters: usize) -> Result<Vec<Stats>, String> {
    let mut s = vec![Vec::new(); beds.len()];
    for _ in 0..iters {
        for (j, b) in beds.iter_mut().enumerate() {
            let t = Instant::now();
            b.host.cmd("alive 1")?;
            s[j].push(us_since(t));
        }
    }
    Ok(s.iter().map(|v| Stats::of(v)).collect())
}

/// The floor for N disks: connect + one round trip of an N-disk Acquire frame (to an echo
/// thread that answers with an N-lease reply) + N x (open + OFD lock + close), measured here.
fn bench_floor(dir: &Path, ndisks: usize, iters: usize) -> Result<(Stats, Stats, Stats), String> {
    let paths: Vec<PathBuf> = (0..ndisks)
        .map(|i| dir.join(format!("floor-{ndisks}-{i}.img")))
        .collect();
    for p in &paths {
        File::create(p).map_err(|e| format!("create {p:?}: {e}"))?;
    }
    let owner = Owner {
        uuid: "11111111-0000-4000-8000-000000000001".into(),
        name: "bench-floor".into(),
        id: 1,
        pid: std::process::id(),
    };
    let leases: Vec<LeaseSpec> = paths
        .iter()
        .map(|p| LeaseSpec {
            name: p.display().to_string(),
            kind: ResourceKind::Disk,
            mode: LeaseMode::Exclusive,
            target: LockTarget::File {
                path: p.display().to_string(),
            },
        })
        .collect();
    let infos: Vec<LeaseInfo> = paths
        .iter()
        .map(|p| LeaseInfo {
            name: p.display().to_string(),
            kind: ResourceKind::Disk,
            mode: LeaseMode::Exclusive,
            lock_path: p.display().to_string(),
            owners: vec![owner.clone()],
            since: 0,
            fence: None,
        })
        .collect();
    let mut req = Vec::new();
    protocol::write_message(
        &mut req,
        &Request::Acquire {
            owner: owner.clone(),
            leases,
            action: FailureAction::Default,
            restrict: false,
        },
    )
    .map_err(|e| format!("encode: {e}"))?;
    let mut rep = Vec::new();
    protocol::write_message(&mut rep, &Response::Ok { leases: infos })
        .map_err(|e| format!("encode: {e}"))?;
    let echo = Echo::start(dir.join(format!("echo-{ndisks}.sock")), rep.len())?;
    let (mut rt, mut lk, mut tot) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..iters + 20 {
        let t0 = Instant::now();
        echo.roundtrip(&req, rep.len())?;
        let t1 = Instant::now();
        for p in &paths {
            stats::lock_once(p)?;
        }
        if i >= 20 {
            let a = (t1 - t0).as_secs_f64() * 1e6;
            let b = us_since(t1);
            rt.push(a);
            lk.push(b);
            tot.push(a + b);
        }
    }
    Ok((Stats::of(&rt), Stats::of(&lk), Stats::of(&tot)))
}

/// One side's throughput workers: a host and a one-disk VM (watch handle, host tokens) each.
type Pool = (Side, Vec<Host>, Vec<(Watch, String)>);

/// Section 2: cycles per second with `conc` owners cycling at once (one host per worker).
fn bench_throughput(pools: &mut [Pool], conc: usize, secs: f64) -> Result<Vec<f64>, String> {
    let mut cycles = vec![0usize; pools.len()];
    let mut elapsed = vec![0f64; pools.len()];
    // Two rounds, ABBA, to cancel drift on a shared machine.
    for round in 0..2 {
        for k in 0..pools.len() {
            let j = if round == 0 { k } else { pools.len() - 1 - k };
            let (side, hosts, disks) = &mut pools[j];
            let side = *side;
            let stop = Instant::now() + Duration::from_secs_f64(secs / 2.0);
            let t0 = Instant::now();
            let results: Vec<Result<usize, String>> = thread::scope(|s| {
                let hs: Vec<_> = hosts
                    .iter_mut()
                    .zip(disks.iter())
                    .take(conc)
                    .map(|(h, (w, toks))| {
                        s.spawn(move || {
                            let mut n = 0;
                            while Instant::now() < stop {
                                cycle(h, side, toks, w)?;
                                n += 1;
                            }
                            Ok(n)
                        })
                    })
                    .collect();
                hs.into_iter()
                    .map(|h| h.join().unwrap_or_else(|_| Err("worker panicked".into())))
                    .collect()
            });
            elapsed[j] += t0.elapsed().as_secs_f64();
            for r in results {
                cycles[j] += r?;
            }
        }
    }
    Ok(cycles
        .iter()
        .zip(&elapsed)
        .map(|(c, e)| *c as f64 / e)
        .collect())
}

/// Acquire latency (1 disk, for an owner other than the holder), acquire timed, release not.
fn bench_acquire_latency(
    beds: &mut [Bed],
    probes: &[(Vm, i32, String)],
    iters: usize,
) -> Result<Vec<Stats>, String> {
    let mut s = vec![Vec::new(); beds.len()];
    let pids: Vec<Vec<u32>> = beds.iter().map(|b| b.daemon.pids()).collect();
    for i in 0..iters + 10 {
        for k in 0..beds.len() {
            let j = if i % 2 == 0 { k } else { beds.len() - 1 - k };
            // The other sides' daemons quiet first (procs.rs `settle`).
            for (o, p) in pids.iter().enumerate() {
                if o != j {
                    procs::settle(p);
                }
            }
            let (vm, pid, toks) = &probes[j];
            let h = &mut beds[j].host;
            let t = Instant::now();
            h.acquire(vm, *pid, toks)?;
            let dt = us_since(t);
            h.release(vm, *pid, toks)?;
            if i >= 10 {
                s[j].push(dt);
            }
        }
    }
    Ok(s.iter().map(|v| Stats::of(v)).collect())
}

/// The source revision measured: `git rev-parse --short HEAD`, plus `+dirty` when src/ has
/// uncommitted changes (the daemon and plugin are built from the working tree).
fn revision() -> String {
    let dir = env!("CARGO_MANIFEST_DIR");
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .arg("-C")
            .arg(dir)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    match git(&["rev-parse", "--short", "HEAD"]) {
        Some(rev) => match git(&["status", "--porcelain", "--", "src"]) {
            Some(s) if !s.is_empty() => format!("{rev}+dirty"),
            _ => rev,
        },
        None => "unknown (not a git checkout)".to_string(),
    }
}

fn ratio(lw: f64, lockd: f64) -> f64 {
    if lockd > 0.0 { lw / lockd } else { f64::NAN }
}

struct Table(Vec<[String; 5]>);

impl Table {
    fn row(&mut self, what: &str, lw: String, lockd: String, ratio: String, note: &str) {
        self.0.push([what.into(), lw, lockd, ratio, note.into()]);
    }

    fn print(&self) {
        let mut w = [0usize; 5];
        for r in &self.0 {
            for (i, c) in r.iter().enumerate() {
                w[i] = w[i].max(c.chars().count());
            }
        }
        for (n, r) in self.0.iter().enumerate() {
            let line = format!(
                "{:<a$}  {:>b$}  {:>c$}  {:>d$}  {}",
                r[0],
                r[1],
                r[2],
                r[3],
                r[4],
                a = w[0],
                b = w[1],
                c = w[2],
                d = w[3]
            );
            println!("{}", line.trim_end());
            if n == 0 {
                println!("{}", "-".repeat(w.iter().sum::<usize>() + 8));
            }
        }
    }
}

fn xr(r: f64) -> String {
    if r.is_finite() {
        format!("{r:.2}x")
    } else {
        "-".into()
    }
}

fn verdict(ok: bool) -> &'static str {
    if ok { "MET" } else { "MISSED" }
}

/// One row of the final "issue 17 targets" table: `ratio` is the figure the target compares.
struct Goal {
    row: String,
    lw: String,
    lockd: String,
    ratio: String,
    target: String,
    verdict: &'static str,
}

/// Left-aligned first column, the others right-aligned, a rule under the header.
fn print_grid(rows: &[Vec<String>]) {
    let cols = rows.iter().map(|r| r.len()).max().unwrap_or(0);
    let mut w = vec![0usize; cols];
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.chars().count());
        }
    }
    for (n, r) in rows.iter().enumerate() {
        let mut line = String::new();
        for (i, c) in r.iter().enumerate() {
            if i == 0 {
                line.push_str(&format!("{c:<width$}", width = w[i]));
            } else {
                line.push_str(&format!("  {c:>width$}", width = w[i]));
            }
        }
        println!("{}", line.trim_end());
        if n == 0 {
            println!(
                "{}",
                "-".repeat(w.iter().sum::<usize>() + 2 * cols.saturating_sub(1))
            );
        }
    }
}

/// Kill both daemons if the run exceeds its time budget, so every blocked host call fails and
/// the guards clean up.
fn watchdog(pids: Vec<u32>, secs: u64, done: Arc<AtomicBool>) {
    thread::spawn(move || {
        let t0 = Instant::now();
        while !done.load(Ordering::Relaxed) {
            if t0.elapsed() > Duration::from_secs(secs) {
                eprintln!("lockcycle: run exceeded LW_BENCH_TIMEOUT={secs}s; killing the daemons");
                for p in &pids {
                    // SAFETY: kill(2) on the pids of daemons this process started and still owns.
                    unsafe { libc::kill(*p as i32, libc::SIGKILL) };
                }
                return;
            }
            thread::sleep(Duration::from_millis(200));
        }
    });
}

fn run() -> Result<(), String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(
            "run as root: each daemon needs a private mount namespace (unshare -m) and \
                    lockd.so only looks for virtlockd at /run/libvirt/virtlockd-sock as root"
                .into(),
        );
    }
    let cfg = Config::from_env()?;
    let tmp = tempfile::Builder::new()
        .prefix("lw-bench-")
        .tempdir()
        .map_err(|e| format!("temp dir: {e}"))?;
    let root = tmp.path();
    let a = Artefacts::find(root)?;
    let noop_so = procs::build_noop(root)?;
    // The slow mount must exist before the daemons' private mount namespaces are made.
    let mut cfg = cfg;
    let _slow = if cfg.slow_dir.is_none() {
        let dirs: Vec<String> = Side::BOTH
            .iter()
            .flat_map(|s| [1, 16].map(|n| format!("{}-{n}", s.name())))
            .collect();
        let slow = slowfs::SlowFs::mount(root, &dirs)?;
        cfg.slow_dir = slow.as_ref().map(|s| s.mnt.clone());
        slow
    } else {
        None
    };
    let run_t0 = Instant::now();
    eprintln!(
        "lockcycle: lockwarden {:?} vs lockd {:?}",
        a.plugin,
        procs::LOCKD_SO
    );

    let mut beds = Vec::new();
    for side in Side::BOTH {
        beds.push(Bed::new(&a, root, side)?);
    }
    let done = Arc::new(AtomicBool::new(false));
    watchdog(
        beds.iter().map(|b| b.daemon.pid()).collect(),
        cfg.timeout,
        done.clone(),
    );
    let mut table = Table(Vec::new());
    table.row(
        "measurement",
        "lockwarden".into(),
        "lockd".into(),
        "lw/lockd".into(),
        "",
    );
    let mut j = serde_json::Map::new();
    j.insert(
        "config".into(),
        json!({ "revision": revision(), "iters": cfg.iters, "tput_secs": cfg.tput_secs, "conc": cfg.conc,
                "held": cfg.held, "hold_per_owner": cfg.hold_per_owner,
                "scale_disks": cfg.scale_disks, "lat_iters": cfg.lat_iters,
                "cpus": thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
                "note": "times in microseconds; every host command includes one stdin/stdout \
                         pipe round trip to the C test host, equally for both sides" }),
    );

    // Host protocol overhead and the floor.
    eprintln!("lockcycle: host overhead and floor");
    let ovh = bench_host_overhead(&mut beds, 300)?;
    table.row(
        "host command overhead (alive)",
        ovh[0].cell(),
        ovh[1].cell(),
        xr(ratio(ovh[0].median, ovh[1].median)),
        "pipe round trip, in every step",
    );
    let mut floors = BTreeMap::new();
    let mut jfloor = serde_json::Map::new();
    for n in [1usize, 16] {
        let (rt, lk, tot) = bench_floor(root, n, 500)?;
        table.row(
            &format!("floor {n} disk(s)"),
            tot.cell(),
            String::new(),
            String::new(),
            &format!(
                "connect+1 RT {} + {n} locks {}",
                fmt_us(rt.median),
                fmt_us(lk.median)
            ),
        );
        jfloor.insert(
            n.to_string(),
            json!({ "connect_roundtrip": rt.json(), "locks": lk.json(), "total": tot.json() }),
        );
        floors.insert(n, tot);
    }
    j.insert(
        "host_overhead".into(),
        json!({"lockwarden": ovh[0].json(), "lockd": ovh[1].json()}),
    );
    j.insert("floor".into(), Value::Object(jfloor));

    // 1. Full cycles.
    let mut jcyc = serde_json::Map::new();
    let mut targets: Vec<(String, bool, String)> = Vec::new();
    let mut goals: Vec<Goal> = Vec::new();
    for n in [1usize, 16] {
        eprintln!(
            "lockcycle: full cycle, {n} disk(s), {} iterations",
            cfg.iters
        );
        let st = bench_cycles(&mut beds, n, cfg.iters)?;
        let mut per = serde_json::Map::new();
        for (k, b) in beds.iter().enumerate() {
            per.insert(
                b.side.name().into(),
                Value::Object(
                    st[k]
                        .iter()
                        .map(|(p, s)| ((*p).to_string(), s.json()))
                        .collect(),
                ),
            );
        }
        let get = |k: usize, p: &str| st[k].get(p).copied().unwrap_or_default();
        let mut rj = serde_json::Map::new();
        for p in PHASES {
            let (l, d) = (get(0, p), get(1, p));
            let r = ratio(l.median, d.median);
            rj.insert(p.into(), json!(r1(r * 100.0) / 100.0));
            table.row(
                &format!("cycle {n:>2} disk(s): {p}"),
                l.cell(),
                d.cell(),
                xr(r),
                "",
            );
        }
        per.insert("ratio_lw_over_lockd".into(), Value::Object(rj));
        if n == 16 {
            let total = ratio(get(0, "total").median, get(1, "total").median);
            let lockpart = |k: usize| {
                get(k, "acquire").median + get(k, "release").median + get(k, "resume").median
            };
            let lr = ratio(lockpart(0), lockpart(1));
            targets.push((
                "cycle 16 disks >= 3x faster than lockd (full cycle incl. fork/exec)".into(),
                total <= 1.0 / 3.0,
                format!("lw/lockd = {}", xr(total)),
            ));
            targets.push((
                "cycle 16 disks >= 3x faster than lockd (acquire+release+resume steps)".into(),
                lr <= 1.0 / 3.0,
                format!("lw/lockd = {}", xr(lr)),
            ));
        }
        jcyc.insert(n.to_string(), Value::Object(per));
    }
    j.insert("cycle".into(), Value::Object(jcyc));

    // 1b. Steady-state acquire (no fork/exec running next to it) against the floor.
    let mut jst = serde_json::Map::new();
    for n in [1usize, 16] {
        eprintln!("lockcycle: steady acquire, {n} disk(s)");
        let mut probes = Vec::new();
        for b in beds.iter_mut() {
            let vm = Vm::new(b.side, "steady");
            let pid = b.host.start(&vm, "")?;
            let (_, toks) = b.disks(&format!("steady{n}"), n)?;
            probes.push((vm, pid, toks));
        }
        let st = bench_acquire_latency(&mut beds, &probes, cfg.lat_iters)?;
        for (k, b) in beds.iter_mut().enumerate() {
            b.host.kill_owner(probes[k].1)?;
        }
        table.row(
            &format!("acquire {n:>2} disk(s), steady"),
            st[0].cell(),
            st[1].cell(),
            xr(ratio(st[0].median, st[1].median)),
            "acquire alone, release untimed",
        );
        let floor = floors.get(&n).map(|f| f.median).unwrap_or(f64::NAN);
        let net = st[0].median - ovh[0].median;
        table.row(
            &format!("acquire {n:>2} disk(s) vs floor"),
            format!("{} / {}", fmt_us(net), fmt_us(floor)),
            String::new(),
            xr(net / floor),
            "lw steady acquire minus host overhead, over floor",
        );
        jst.insert(
            n.to_string(),
            json!({ "lockwarden": st[0].json(), "lockd": st[1].json(),
                    "lockwarden_minus_host_overhead_us": r1(net), "floor_us": r1(floor),
                    "over_floor": r1(net / floor * 100.0) / 100.0 }),
        );
        if n == 16 {
            let r = ratio(st[0].median, st[1].median);
            goals.push(Goal {
                row: "in-plugin acquire 16 disks vs lockd".into(),
                lw: fmt_us(st[0].median),
                lockd: fmt_us(st[1].median),
                ratio: xr(r),
                target: "<= 0.33x (3x faster)".into(),
                verdict: verdict(r <= 1.0 / 3.0),
            });
            goals.push(Goal {
                row: "in-plugin acquire 16 disks vs floor".into(),
                lw: format!("{} (minus host {})", fmt_us(net), fmt_us(ovh[0].median)),
                lockd: format!("floor {}", fmt_us(floor)),
                ratio: xr(net / floor),
                target: "<= 2.00x".into(),
                verdict: verdict(net / floor <= 2.0),
            });
            targets.push((
                "16-disk acquire within 1.5x of the floor".into(),
                net / floor <= 1.5,
                format!(
                    "{} vs floor {} = {}",
                    fmt_us(net),
                    fmt_us(floor),
                    xr(net / floor)
                ),
            ));
        }
    }
    j.insert("steady_acquire".into(), Value::Object(jst));

    // 2. Throughput.
    let maxc = cfg.conc.iter().copied().max().unwrap_or(1);
    eprintln!("lockcycle: throughput, up to {maxc} concurrent owners");
    let mut pools = Vec::new();
    for b in &beds {
        let mut hosts = Vec::new();
        for _ in 0..maxc {
            hosts.push(Host::spawn(&a, &b.daemon, &b.daemon.dir.join("host.log"))?);
        }
        let mut disks = Vec::new();
        for i in 0..maxc {
            let (paths, toks) = b.disks(&format!("tput{i}"), 1)?;
            disks.push((Watch::new(&paths)?, toks));
        }
        pools.push((b.side, hosts, disks));
    }
    // The no-op plugin's pool: the ceiling of the host program itself (fork, exec, kill,
    // reap and the command pipe, with no locking at all).
    {
        let dir = root.join("noop");
        fs::create_dir_all(&dir).map_err(|e| format!("mkdir {dir:?}: {e}"))?;
        let log = dir.join("host.log");
        let mut hosts = Vec::new();
        let mut disks = Vec::new();
        for i in 0..maxc {
            hosts.push(Host::noop(&a, &noop_so, &log)?);
            let p = dir.join(format!("tput{i}.img"));
            File::create(&p).map_err(|e| format!("create {p:?}: {e}"))?;
            let toks = disk_token(&p);
            disks.push((Watch::new(&[p])?, toks));
        }
        pools.push((Side::Noop, hosts, disks));
    }
    let mut jt = serde_json::Map::new();
    for &c in &cfg.conc {
        let r = bench_throughput(&mut pools, c, cfg.tput_secs)?;
        let rr = ratio(r[0], r[1]);
        table.row(
            &format!("cycles/s, {c:>2} concurrent owners"),
            format!("{:.0}", r[0]),
            format!("{:.0}", r[1]),
            xr(rr),
            &format!("1 disk each; higher is better; no-op plugin {:.0}", r[2]),
        );
        // Cost per cycle above the no-op plugin, in microseconds of wall time per cycle.
        let above = |x: f64| (1.0 / x - 1.0 / r[2]) * 1e6;
        let (cl, cd) = (above(r[0]), above(r[1]));
        let cr = ratio(cl, cd);
        table.row(
            &format!("cost/cycle above no-op, {c:>2} owners"),
            fmt_us(cl),
            fmt_us(cd),
            xr(cr),
            "1/rate - 1/rate(no-op)",
        );
        goals.push(Goal {
            row: format!("cost per cycle above no-op, {c} owners"),
            lw: format!("{} ({:.0}/s)", fmt_us(cl), r[0]),
            lockd: format!("{} ({:.0}/s)", fmt_us(cd), r[1]),
            ratio: xr(cr),
            target: format!("<= 0.33x (no-op {:.0}/s)", r[2]),
            verdict: verdict(cl.is_finite() && cr <= 1.0 / 3.0),
        });
        jt.insert(
            c.to_string(),
            json!({ "lockwarden": r1(r[0]), "lockd": r1(r[1]), "noop": r1(r[2]),
                    "ratio_lw_over_lockd": r1(rr * 100.0) / 100.0,
                    "above_noop_us": { "lockwarden": r1(cl), "lockd": r1(cd),
                                       "ratio_lw_over_lockd": r1(cr * 100.0) / 100.0 } }),
        );
        if c == 64 {
            targets.push((
                "throughput at 64 owners >= 3x lockd".into(),
                rr >= 3.0,
                format!("lw/lockd = {}", xr(rr)),
            ));
        }
    }
    drop(pools);
    j.insert("throughput_cycles_per_s".into(), Value::Object(jt));

    // 4. Slow storage.
    match &cfg.slow_dir {
        None => {
            table.row(
                "16 vs 1 disk acquire, 2 ms locks",
                "pending".into(),
                "pending".into(),
                "-".into(),
                "build the FUSE stand-in first: cargo build --release --example testfs",
            );
            j.insert("slow_storage".into(), json!("pending issue 7"));
            targets.push((
                "slow storage: 16-disk acquire within 2x of 1-disk".into(),
                false,
                "not measured: the testfs example is not built".into(),
            ));
        }
        Some(dir) => {
            eprintln!("lockcycle: slow storage in {dir:?}");
            let mut res = Vec::new();
            for b in beds.iter_mut() {
                let vm = Vm::new(b.side, "slow");
                let pid = b.host.start(&vm, "")?;
                let mut per = Vec::new();
                for n in [1usize, 16] {
                    let sub = dir.join(format!("{}-{n}", b.side.name()));
                    fs::create_dir_all(&sub).map_err(|e| format!("mkdir {sub:?}: {e}"))?;
                    let toks: Vec<String> = (0..n)
                        .map(|i| sub.join(format!("d{i}.img")))
                        .map(|p| {
                            File::create(&p)
                                .map(|_| disk_token(&p))
                                .map_err(|e| format!("create {p:?}: {e}"))
                        })
                        .collect::<Result<_, _>>()?;
                    let toks = toks.join(" ");
                    let mut s = Vec::new();
                    for _ in 0..(cfg.iters / 5).max(10) {
                        let t = Instant::now();
                        b.host.acquire(&vm, pid, &toks)?;
                        s.push(us_since(t));
                        b.host.release(&vm, pid, &toks)?;
                    }
                    per.push(Stats::of(&s));
                }
                b.host.kill_owner(pid)?;
                res.push(per);
            }
            let mut js = serde_json::Map::new();
            for n in 0..2 {
                let disks = [1, 16][n];
                table.row(
                    &format!("acquire {disks:>2} disk(s), slow locks"),
                    res[0][n].cell(),
                    res[1][n].cell(),
                    xr(ratio(res[0][n].median, res[1][n].median)),
                    "",
                );
                js.insert(
                    disks.to_string(),
                    json!({ "lockwarden": res[0][n].json(), "lockd": res[1][n].json() }),
                );
            }
            let g = res[0][1].median / res[0][0].median;
            targets.push((
                "slow storage: 16-disk acquire within 2x of 1-disk".into(),
                g <= 2.0,
                format!("16/1 = {}", xr(g)),
            ));
            j.insert("slow_storage".into(), Value::Object(js));
        }
    }

    // 5. Issue 17: scale (last: a side may end it out of descriptors).
    eprintln!("lockcycle: scale rows (issue 17)");
    let kn = scale::Knobs {
        levels: cfg.held.clone(),
        per_owner: cfg.hold_per_owner,
        probe_disks: cfg.scale_disks.clone(),
        lat_iters: cfg.lat_iters,
    };
    let js = scale::run(&mut beds, &kn, &mut table, &mut goals, &mut targets)?;
    j.insert("scale".into(), js);

    done.store(true, Ordering::Relaxed);
    let secs = run_t0.elapsed().as_secs_f64();
    println!();
    println!(
        "lockcycle: lockwarden.so+lockwardend ({}) vs lockd.so+virtlockd, medians [p10-p90], \
         {secs:.0} s",
        revision()
    );
    table.print();
    println!();
    println!("targets (issue 8):");
    let mut jtargets = Vec::new();
    for (what, ok, fig) in &targets {
        let v = if fig.starts_with("pending") {
            "PENDING"
        } else {
            verdict(*ok)
        };
        println!("  {v:<7} {what}: {fig}");
        jtargets.push(json!({ "target": what, "status": v, "figures": fig }));
    }
    j.insert("targets".into(), Value::Array(jtargets));
    println!();
    println!("issue 17 targets:");
    let mut grid = vec![
        ["row", "lockwarden", "lockd", "ratio", "target", "verdict"]
            .map(String::from)
            .to_vec(),
    ];
    // In the order: latency (and its model), descriptors, memory, in-plugin acquire,
    // cost above the no-op plugin.
    let order = |g: &Goal| {
        [
            "acquire",
            "model",
            "descriptors",
            "RSS",
            "in-plugin",
            "cost",
        ]
        .iter()
        .position(|p| g.row.starts_with(p))
        .map(|i| i.max(1) - 1)
        .unwrap_or(9)
    };
    goals.sort_by_key(order);
    let mut jgoals = Vec::new();
    for g in &goals {
        grid.push(vec![
            g.row.clone(),
            g.lw.clone(),
            g.lockd.clone(),
            g.ratio.clone(),
            g.target.clone(),
            g.verdict.to_string(),
        ]);
        jgoals.push(json!({ "row": g.row, "lockwarden": g.lw, "lockd": g.lockd,
                            "ratio": g.ratio, "target": g.target, "verdict": g.verdict }));
    }
    print_grid(&grid);
    if let Some(f) = j.get("scale").and_then(|s| s.get("failed")) {
        for side in ["lockwarden", "lockd"] {
            if let Some(e) = f
                .get(side)
                .and_then(Value::as_str)
                .filter(|e| !e.is_empty())
            {
                println!("{side} {e}");
            }
        }
    }
    j.insert("issue17".into(), Value::Array(jgoals));
    j.insert("run_seconds".into(), json!(r1(secs)));
    if let Some(parent) = cfg.out.parent() {
        fs::create_dir_all(parent).map_err(|e| format!("mkdir {parent:?}: {e}"))?;
    }
    let text = serde_json::to_string_pretty(&Value::Object(j)).map_err(|e| e.to_string())?;
    fs::write(&cfg.out, text + "\n").map_err(|e| format!("write {:?}: {e}", cfg.out))?;
    println!("results written to {}", cfg.out.display());
    Ok(())
}

fn main() {
    if let Err(e) = run() {
        eprintln!("lockcycle: {e}");
        std::process::exit(1);
    }
}
