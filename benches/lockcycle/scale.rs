//! Issue 17's scale rows (docs/benchmarks.md, "Issue 17: flat at scale"): acquire latency,
//! open descriptors and memory of each daemon with 0, then `LW_BENCH_HELD` leases held by
//! owners of `LW_BENCH_HOLD_PER_OWNER` disks each. A side that cannot take more leases (EMFILE
//! at the 20,000-descriptor limit of these machines) is recorded as failed at the count it
//! reached, with the error, and the run goes on with the other side and the other rows.

use crate::procs::{Vm, disk_token};
use crate::stats::{Stats, fmt_us, r1, us_since};
use crate::{Bed, Goal, Table, ratio, xr};
use serde_json::{Value, json};
use std::fs::File;
use std::thread;
use std::time::{Duration, Instant};

/// Run-size knobs of this section.
pub struct Knobs {
    /// Held-lease levels after 0 (LW_BENCH_HELD).
    pub levels: Vec<usize>,
    /// Disks per holder owner (LW_BENCH_HOLD_PER_OWNER).
    pub per_owner: usize,
    /// Disk counts of the probe acquires (LW_BENCH_SCALE_DISKS).
    pub probe_disks: Vec<usize>,
    /// Acquire samples per side, level and probe (LW_BENCH_LAT_ITERS).
    pub lat_iters: usize,
}

/// One side's progress: leases held, holder owner pids, and the first failure.
#[derive(Default)]
struct Progress {
    held: usize,
    holders: Vec<i32>,
    failed: Option<(usize, String)>,
}

impl Progress {
    fn fail(&mut self, e: &str) {
        if self.failed.is_none() {
            self.failed = Some((self.held, short(e)));
        }
    }

    /// `failed at N leases: CAUSE` with only the last clause of the error (the system's
    /// words, "Too many open files"), for the final table; `failure` has all of it.
    fn brief(&self) -> String {
        match &self.failed {
            Some((n, e)) => {
                let cause = e.split(';').next().unwrap_or(e);
                let cause = cause.rsplit(": ").next().unwrap_or(cause).trim();
                format!("failed at {n} leases: {cause}")
            }
            None => String::new(),
        }
    }

    fn failure(&self) -> String {
        match &self.failed {
            Some((n, e)) => format!("failed at {n} leases: {e}"),
            None => String::new(),
        }
    }
}

/// The reply part of a host error (`side host: \`COMMAND\` -> ERR ...`), without the command
/// line and its hundreds of disk paths.
fn short(e: &str) -> String {
    let tail = e.rsplit("` -> ").next().unwrap_or(e);
    tail.chars().take(200).collect()
}

/// Measurements at one level.
struct Point {
    level: usize,
    held: [usize; 2],
    rss: [(u64, u64); 2],
    fds: [(usize, usize); 2],
    /// lockwarden's Pss (daemon + keeper: their shared pages counted once).
    pss: u64,
    /// Per probe disk count, per side; None when the side had failed.
    lat: Vec<[Option<Stats>; 2]>,
}

/// A memory row: (name, RSS per side, leases held per side, level, whether it is a target).
type MemRow = (String, [(u64, u64); 2], [usize; 2], usize, bool);

/// A probe owner per side and disk count: (vm, pid, tokens).
type Probe = (Vm, i32, String);

/// Acquire latency of `probes[side]`, interleaved, for the sides that have not failed; an
/// error fails that side (recorded in `prog`) and leaves its result None.
fn latency(
    beds: &mut [Bed],
    probes: &[Probe],
    iters: usize,
    prog: &mut [Progress],
) -> [Option<Stats>; 2] {
    let mut s: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    let pids: Vec<Vec<u32>> = beds.iter().map(|b| b.daemon.pids()).collect();
    for i in 0..iters + 10 {
        for k in 0..2 {
            let j = if i % 2 == 0 { k } else { 1 - k };
            if prog[j].failed.is_some() {
                continue;
            }
            crate::procs::settle(&pids[1 - j]);
            let (vm, pid, toks) = &probes[j];
            let h = &mut beds[j].host;
            let t = Instant::now();
            let r = h.acquire(vm, *pid, toks);
            let dt = us_since(t);
            if let Err(e) = r.and_then(|_| h.release(vm, *pid, toks)) {
                prog[j].fail(&format!("probe acquire: {e}"));
                continue;
            }
            if i >= 10 {
                s[j].push(dt);
            }
        }
    }
    let unsettled = crate::procs::UNSETTLED.swap(0, std::sync::atomic::Ordering::Relaxed);
    if unsettled > 0 {
        eprintln!(
            "lockcycle: scale: {unsettled} sample(s) started while the other daemon was still busy \
             after 20 ms"
        );
    }
    [0, 1].map(|j| (prog[j].failed.is_none() && !s[j].is_empty()).then(|| Stats::of(&s[j])))
}

/// Start holder owners on `b` until it holds `level` leases or fails.
fn grow(b: &mut Bed, p: &mut Progress, level: usize, per_owner: usize) {
    while p.held < level && p.failed.is_none() {
        let n = (level - p.held).min(per_owner.max(1));
        let toks: Result<Vec<String>, String> = (p.held..p.held + n)
            .map(|i| b.files.join(format!("held-{i:05}.img")))
            .map(|f| {
                File::create(&f)
                    .map(|_| disk_token(&f))
                    .map_err(|e| format!("create {f:?}: {e}"))
            })
            .collect();
        let toks = match toks {
            Ok(t) => t.join(" "),
            Err(e) => return p.fail(&e),
        };
        let vm = Vm::new(b.side, "holder");
        let pid = match b.host.start(&vm, "") {
            Ok(pid) => pid,
            Err(e) => return p.fail(&format!("start: {e}")),
        };
        p.holders.push(pid);
        if let Err(e) = b.host.acquire(&vm, pid, &toks) {
            return p.fail(&format!("acquire: {e}"));
        }
        p.held += n;
    }
}

fn measure(beds: &[Bed], level: usize, prog: &[Progress]) -> Result<Point, String> {
    let mut rss = [(0, 0); 2];
    let mut fds = [(0, 0); 2];
    for k in 0..2 {
        rss[k] = beds[k].daemon.rss_kib()?;
        fds[k] = beds[k].daemon.fd_count()?;
    }
    Ok(Point {
        level,
        held: [prog[0].held, prog[1].held],
        rss,
        fds,
        pss: beds[0].daemon.pss_kib()?,
        lat: Vec::new(),
    })
}

/// Least-squares line through (leases, median us): (intercept us, us per 1,000 leases).
fn fit(pts: &[(f64, f64)]) -> Option<(f64, f64)> {
    let n = pts.len() as f64;
    if pts.len() < 2 {
        return None;
    }
    let (sx, sy) = pts.iter().fold((0.0, 0.0), |(a, b), (x, y)| (a + x, b + y));
    let (mx, my) = (sx / n, sy / n);
    let sxx: f64 = pts.iter().map(|(x, _)| (x - mx).powi(2)).sum();
    let sxy: f64 = pts.iter().map(|(x, y)| (x - mx) * (y - my)).sum();
    if sxx <= 0.0 {
        return None;
    }
    let b = sxy / sxx;
    Some((my - b * mx, b * 1000.0))
}

fn kib(k: (u64, u64)) -> u64 {
    k.0 + k.1
}

/// The section: rows into `table`, issue 17 goals into `goals`, issue 8 targets into
/// `targets`; returns the JSON of every point.
pub fn run(
    beds: &mut [Bed],
    kn: &Knobs,
    table: &mut Table,
    goals: &mut Vec<Goal>,
    targets: &mut Vec<(String, bool, String)>,
) -> Result<Value, String> {
    let mut prog = [Progress::default(), Progress::default()];
    // Probe owners: one per side and probe disk count.
    let mut probes: Vec<Vec<Probe>> = Vec::new();
    for &n in &kn.probe_disks {
        let mut per = Vec::new();
        for b in beds.iter_mut() {
            let vm = Vm::new(b.side, "probe");
            let pid = b.host.start(&vm, "")?;
            let (_, toks) = b.disks(&format!("probe{n}"), n)?;
            per.push((vm, pid, toks));
        }
        probes.push(per);
    }
    let mut levels = vec![0usize];
    levels.extend(kn.levels.iter().copied().filter(|&l| l > 0));
    let mut points: Vec<Point> = Vec::new();
    for &level in &levels {
        eprintln!("lockcycle: scale: {level} leases held");
        for k in 0..2 {
            let t = Instant::now();
            grow(&mut beds[k], &mut prog[k], level, kn.per_owner);
            if level > 0 {
                eprintln!(
                    "lockcycle: scale: {} holds {} leases ({:.1} s){}",
                    beds[k].side.name(),
                    prog[k].held,
                    t.elapsed().as_secs_f64(),
                    if prog[k].failed.is_some() {
                        format!("; {}", prog[k].failure())
                    } else {
                        String::new()
                    }
                );
            }
        }
        let mut pt = measure(beds, level, &prog)?;
        for pr in &probes {
            pt.lat.push(latency(beds, pr, kn.lat_iters, &mut prog));
        }
        points.push(pt);
    }
    // Let every holder go, then measure at 0 again: the mean of the two 0-held medians is the
    // baseline, which cancels a linear drift of the (shared) machine over this section.
    for (k, b) in beds.iter_mut().enumerate() {
        let t = Instant::now();
        let n = prog[k].holders.len();
        for pid in prog[k].holders.drain(..) {
            if let Err(e) = b.host.kill_owner(pid) {
                eprintln!("lockcycle: scale: ending holder {pid}: {e}");
            }
        }
        eprintln!(
            "lockcycle: scale: {n} {} holders ended ({:.1} s)",
            b.side.name(),
            t.elapsed().as_secs_f64()
        );
    }
    thread::sleep(Duration::from_millis(1000));
    // A side that failed only for lack of descriptors may serve again now.
    let mut after_prog = [Progress::default(), Progress::default()];
    let after: Vec<[Option<Stats>; 2]> = probes
        .iter()
        .map(|pr| latency(beds, pr, kn.lat_iters, &mut after_prog))
        .collect();
    for (k, b) in beds.iter_mut().enumerate() {
        for pr in &probes {
            b.host.kill_owner(pr[k].1)?;
        }
    }

    // The main table: every point.
    for pt in &points {
        for k in 0..2 {
            if pt.held[k] != pt.level {
                table.row(
                    &format!(
                        "{} held {} of {} leases",
                        beds[k].side.name(),
                        pt.held[k],
                        pt.level
                    ),
                    String::new(),
                    String::new(),
                    String::new(),
                    &prog[k].failure(),
                );
            }
        }
        let r = ratio(kib(pt.rss[0]) as f64, kib(pt.rss[1]) as f64);
        table.row(
            &format!("RSS holding {} leases", pt.level),
            format!("{} KiB", kib(pt.rss[0])),
            format!("{} KiB", kib(pt.rss[1])),
            xr(r),
            &format!(
                "VmRSS; lw = daemon {} + keeper {} KiB",
                pt.rss[0].0, pt.rss[0].1
            ),
        );
        // Only lockwarden's: virtlockd's Pss depends on which other processes of the machine
        // map libvirt.so at that moment.
        table.row(
            &format!("PSS holding {} leases", pt.level),
            format!("{} KiB", pt.pss),
            "-".into(),
            "-".into(),
            "Pss of daemon + keeper: their shared pages counted once",
        );
        table.row(
            &format!("open fds holding {} leases", pt.level),
            format!("{}", pt.fds[0].0 + pt.fds[0].1),
            format!("{}", pt.fds[1].0 + pt.fds[1].1),
            xr(ratio(
                (pt.fds[0].0 + pt.fds[0].1) as f64,
                (pt.fds[1].0 + pt.fds[1].1) as f64,
            )),
            &format!(
                "/proc/PID/fd; lw = daemon {} + keeper {}",
                pt.fds[0].0, pt.fds[0].1
            ),
        );
        for (pi, &n) in kn.probe_disks.iter().enumerate() {
            let cell = |k: usize| match &pt.lat[pi][k] {
                Some(s) => s.cell(),
                None => "failed".into(),
            };
            let r = match (&pt.lat[pi][0], &pt.lat[pi][1]) {
                (Some(a), Some(b)) => xr(ratio(a.median, b.median)),
                _ => "-".into(),
            };
            table.row(
                &format!("acquire {n:>2} disk(s), {} held", pt.level),
                cell(0),
                cell(1),
                r,
                "held by other owners",
            );
        }
    }
    for (pi, &n) in kn.probe_disks.iter().enumerate() {
        let cell = |k: usize| match &after[pi][k] {
            Some(s) => s.cell(),
            None => after_prog[k].failure(),
        };
        table.row(
            &format!("acquire {n:>2} disk(s), 0 held (after)"),
            cell(0),
            cell(1),
            match (&after[pi][0], &after[pi][1]) {
                (Some(a), Some(b)) => xr(ratio(a.median, b.median)),
                _ => "-".into(),
            },
            "drift check",
        );
    }

    // Issue 17 goals.
    let first = levels.get(1).copied();
    let med = |pi: usize, li: usize, k: usize| points[li].lat[pi][k].map(|s| s.median);
    // Baseline at 0: mean of before and after when both exist.
    let base = |pi: usize, k: usize| match (med(pi, 0, k), after[pi][k].map(|s| s.median)) {
        (Some(a), Some(b)) => Some((a + b) / 2.0),
        (a, b) => a.or(b),
    };
    let mut jmodel = serde_json::Map::new();
    for (pi, &n) in kn.probe_disks.iter().enumerate() {
        let disks = if n == 1 { "disk" } else { "disks" };
        // Growth of each level over 0, and of the last over the first non-zero level.
        let mut pairs: Vec<(usize, usize, String)> = (1..levels.len())
            .map(|li| (li, 0, "0".to_string()))
            .collect();
        if levels.len() > 2 {
            pairs.push((levels.len() - 1, 1, levels[1].to_string()));
        }
        for (li, bi, bname) in pairs {
            let level = levels[li];
            let mut cells = [String::new(), String::new()];
            let mut g = [f64::NAN; 2];
            for k in 0..2 {
                let at = med(pi, li, k);
                let b = if bi == 0 { base(pi, k) } else { med(pi, bi, k) };
                cells[k] = match (at, b) {
                    (Some(a), Some(b)) => {
                        g[k] = a / b;
                        format!("{} / {} = {}", fmt_us(a), fmt_us(b), xr(g[k]))
                    }
                    _ => {
                        let p = &prog[k];
                        if p.failed.is_some() {
                            p.brief()
                        } else {
                            "not measured".into()
                        }
                    }
                };
            }
            goals.push(Goal {
                row: format!("acquire {n} {disks}: {level} held / {bname} held"),
                lw: cells[0].clone(),
                lockd: cells[1].clone(),
                ratio: xr(g[0]),
                target: "<= 1.20x".into(),
                verdict: crate::verdict(g[0] <= 1.2),
            });
            if n == 1 && bi == 0 && li == levels.len() - 1 {
                targets.push((
                    format!("acquire latency at {level} held <= 1.2x that at 0"),
                    g[0] <= 1.2,
                    format!("lw {}", cells[0]),
                ));
            }
        }
        // The model: a line through every measured (leases, median) point of each side.
        let mut jm = serde_json::Map::new();
        let mut cells = [String::new(), String::new()];
        let mut npts = 0;
        for k in 0..2 {
            let mut pts: Vec<(f64, f64)> = points
                .iter()
                .enumerate()
                .filter_map(|(li, pt)| med(pi, li, k).map(|m| (pt.level as f64, m)))
                .collect();
            if let Some(a) = after[pi][k] {
                pts.push((0.0, a.median));
            }
            npts = npts.max(pts.len());
            if let Some((c, per_k)) = fit(&pts) {
                let at100k = c + per_k * 100.0;
                cells[k] = if per_k < 0.0 {
                    format!("{} flat (slope -{}/1k)", fmt_us(c), fmt_us(-per_k))
                } else {
                    format!(
                        "{} + {}/1k = {} at 100k",
                        fmt_us(c),
                        fmt_us(per_k),
                        fmt_us(at100k)
                    )
                };
                jm.insert(
                    beds[k].side.name().into(),
                    json!({ "intercept_us": r1(c), "us_per_1000_leases": r1(per_k * 100.0) / 100.0,
                            "at_100000_us": r1(at100k), "points": pts }),
                );
            } else {
                cells[k] = "too few points".into();
            }
        }
        table.row(
            &format!("model: acquire {n} {disks} vs leases held"),
            cells[0].clone(),
            cells[1].clone(),
            String::new(),
            &format!("least-squares line through {npts} medians"),
        );
        goals.push(Goal {
            row: format!("model: acquire {n} {disks} at 100,000 held"),
            lw: cells[0].clone(),
            lockd: cells[1].clone(),
            ratio: "-".into(),
            target: "(report)".into(),
            verdict: "REPORT",
        });
        jmodel.insert(n.to_string(), Value::Object(jm));
    }

    // Descriptors per lease (daemon + keeper), over the fds at 0.
    let fd0 = [0, 1].map(|k| (points[0].fds[k].0 + points[0].fds[k].1) as f64);
    for pt in points.iter().skip(1) {
        let mut cells = [String::new(), String::new()];
        let mut per = [f64::NAN; 2];
        for k in 0..2 {
            let tot = (pt.fds[k].0 + pt.fds[k].1) as f64;
            if pt.held[k] > 0 {
                per[k] = (tot - fd0[k]) / pt.held[k] as f64;
            }
            cells[k] = format!("{:.2} ({} fds at {} leases)", per[k], tot, pt.held[k]);
            if pt.held[k] < pt.level {
                cells[k] = format!("{}; {}", prog[k].brief(), cells[k]);
            }
        }
        let ok = per[0] <= 1.2 && pt.held[0] == pt.level;
        goals.push(Goal {
            row: format!("descriptors per lease, daemon + keeper, {} held", pt.level),
            lw: cells[0].clone(),
            lockd: cells[1].clone(),
            ratio: if per[0].is_finite() {
                format!("{:.2}", per[0])
            } else {
                "-".into()
            },
            target: "<= 1.20 per lease".into(),
            verdict: crate::verdict(ok),
        });
    }

    // Memory: idle (fresh daemons), then every level; the first level (issue 17: 5,000) and
    // idle are targets, further levels are reported.
    let idle = [beds[0].idle_rss, beds[1].idle_rss];
    let mut mem: Vec<MemRow> = vec![("RSS daemon + keeper, idle".into(), idle, [0, 0], 0, true)];
    for pt in points.iter().skip(1) {
        mem.push((
            format!("RSS daemon + keeper, {} held", pt.level),
            pt.rss,
            pt.held,
            pt.level,
            Some(pt.level) == first,
        ));
    }
    for (row, rss, held, level, is_target) in mem {
        let r = ratio(kib(rss[0]) as f64, kib(rss[1]) as f64);
        let cell = |k: usize| {
            let c = format!("{} KiB", kib(rss[k]));
            if held[k] < level {
                format!("{}; {c} at {} leases", prog[k].brief(), held[k])
            } else {
                c
            }
        };
        let whole = held[0] == level;
        if is_target {
            if level == 0 || Some(level) == first {
                targets.push((
                    if level == 0 {
                        "RSS idle <= 1/3 of virtlockd".into()
                    } else {
                        format!("RSS at {level} leases <= 1/3 of virtlockd")
                    },
                    r <= 1.0 / 3.0 && whole,
                    format!("lw/lockd = {}", xr(r)),
                ));
            }
            goals.push(Goal {
                row,
                lw: cell(0),
                lockd: cell(1),
                ratio: xr(r),
                target: "<= 0.33x".into(),
                verdict: crate::verdict(r <= 1.0 / 3.0 && whole),
            });
        } else {
            goals.push(Goal {
                row,
                lw: cell(0),
                lockd: cell(1),
                ratio: xr(r),
                target: "(report)".into(),
                verdict: if whole { "REPORT" } else { "MISSED" },
            });
        }
    }

    let jpoints: Vec<Value> = points
        .iter()
        .map(|pt| {
            let lat: serde_json::Map<String, Value> = kn
                .probe_disks
                .iter()
                .enumerate()
                .map(|(pi, n)| {
                    let s = |k: usize| pt.lat[pi][k].map(|s| s.json()).unwrap_or(Value::Null);
                    (n.to_string(), json!({ "lockwarden": s(0), "lockd": s(1) }))
                })
                .collect();
            json!({ "level": pt.level,
                    "held": { "lockwarden": pt.held[0], "lockd": pt.held[1] },
                    "rss_kib": { "lockwarden_daemon": pt.rss[0].0, "lockwarden_keeper": pt.rss[0].1,
                                 "lockd": kib(pt.rss[1]) },
                    "lockwarden_pss_kib": pt.pss,
                    "fds": { "lockwarden_daemon": pt.fds[0].0, "lockwarden_keeper": pt.fds[0].1,
                             "lockd": pt.fds[1].0 + pt.fds[1].1 },
                    "acquire": lat })
        })
        .collect();
    let jafter: serde_json::Map<String, Value> = kn
        .probe_disks
        .iter()
        .enumerate()
        .map(|(pi, n)| {
            let s = |k: usize| after[pi][k].map(|s| s.json()).unwrap_or(Value::Null);
            (n.to_string(), json!({ "lockwarden": s(0), "lockd": s(1) }))
        })
        .collect();
    Ok(json!({
        "per_owner": kn.per_owner,
        "idle_rss_kib": { "lockwarden_daemon": idle[0].0, "lockwarden_keeper": idle[0].1,
                          "lockd": kib(idle[1]) },
        "failed": { "lockwarden": prog[0].failure(), "lockd": prog[1].failure() },
        "points": jpoints,
        "acquire_0_after": jafter,
        "model": jmodel,
    }))
}
