//! The plugin's ABI edge, driven the way libvirt drives it: `virLockManagerParam` arrays built
//! from the fuzz input and passed through the exported `virLockDriverImpl` table (drvInit once,
//! then sequences of drvNew / drvAddResource / drvAcquire / drvRelease / drvInquire / drvFree,
//! NULL managers and NULL parameter arrays included).
//!
//! Alongside, the same parameters decoded by hand go through the functions the shells call
//! (`ffi::decode_new` + `Manager::from_new`, `ffi::decode_resource` + `resources::add`), and
//! the two must agree: same success, same owner,
//! same lease specs. That checks `decode_params` (the unsafe part) against its documented
//! meaning. The safe functions are also run under other settings (direct mode, no automatic
//! disk leases, ignored read-only disks).
//!
//! No daemon runs: `daemon_socket` names a path that does not exist, so Acquire and Release
//! must fail cleanly (rc -1, `*fd` stays -1, `*state` stays NULL). A panic anywhere aborts (the
//! plugin's own panic hook is replaced): the plugin's lint wall says it never panics, and its
//! panic boundary would otherwise hide one.
#![no_main]

use libfuzzer_sys::fuzz_target;
use lockwarden::abi;
use lockwarden::plugin::ffi::{decode_new, decode_resource, virLockDriverImpl};
use lockwarden::plugin::manager::Manager;
use lockwarden::plugin::params::{Param, Value};
use lockwarden::plugin::resources;
use lockwarden::plugin_conf::{ReadonlyDisks, Settings};
use std::ffi::{CString, c_char, c_int};
use std::ptr;
use std::sync::OnceLock;

const KEYS: [&str; 8] = [
    "uuid",
    "name",
    "id",
    "pid",
    "uri",
    "path",
    "offset",
    "lockspace",
];
/// decode_params refuses more than this many parameters.
const MAX_PARAMS: usize = 4096;

struct Fixture {
    conf: CString,
    settings: Settings,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let path = std::env::temp_dir().join(format!(
            "lockwarden-fuzz-{}-qemu-lockwarden.conf",
            std::process::id()
        ));
        std::fs::write(
            &path,
            "daemon_socket = \"/nonexistent/lockwarden-fuzz/lockwardend.sock\"\n\
             file_lockspace_dir = \"/nonexistent/lockwarden-fuzz/files\"\n\
             request_timeout_ms = 1000\n",
        )
        .expect("writing the fuzz plugin config");
        let conf = CString::new(path.to_str().expect("utf-8 temp path")).expect("no NUL");
        let init = virLockDriverImpl.drvInit.expect("drvInit");
        // SAFETY: a valid version, a NUL-terminated path, flags 0.
        let rc = unsafe { init(1_000_000, conf.as_ptr(), 0) };
        assert_eq!(rc, 0, "drvInit with the fuzz config failed");
        let settings = Settings::load(Some(&path), lockwarden::paths::default_socket())
            .expect("the fuzz config loads");
        let _ = std::fs::remove_file(&path);
        // drvInit installed the plugin's panic hook; a panic must be a finding, not a log line.
        std::panic::set_hook(Box::new(|info| {
            eprintln!("panic inside the plugin: {info}");
            std::process::abort();
        }));
        Fixture { conf, settings }
    })
}

/// Reads the fuzz input; past its end every read is zero.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn byte(&mut self) -> u8 {
        match self.0.split_first() {
            Some((b, rest)) => {
                self.0 = rest;
                *b
            }
            None => 0,
        }
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.byte(), self.byte(), self.byte(), self.byte()])
    }
    fn u64(&mut self) -> u64 {
        u64::from(self.u32()) | (u64::from(self.u32()) << 32)
    }
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    /// A string without NUL: a length byte, then that many bytes (NULs dropped).
    fn text(&mut self) -> Vec<u8> {
        let n = usize::from(self.byte());
        let n = n.min(self.0.len());
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        head.iter().copied().filter(|&b| b != 0).collect()
    }
    /// A small flags word: usually one of the meaningful bits, sometimes anything.
    fn flags(&mut self) -> u32 {
        match self.byte() % 4 {
            0 => 0,
            1 => u32::from(self.byte() % 8),
            2 => 1 << (self.byte() % 32),
            _ => self.u32(),
        }
    }
}

/// One parameter array, its C strings, and what decode_params should make of it.
struct Params {
    _strings: Vec<CString>,
    raw: Vec<abi::virLockManagerParam>,
    /// None: the array is invalid for decode_params (a NULL key).
    decoded: Option<Vec<Param>>,
    /// Pass a NULL array pointer (with `raw.len()` as nparams).
    null_array: bool,
}

impl Params {
    fn ptr(&mut self) -> *mut abi::virLockManagerParam {
        if self.null_array || self.raw.is_empty() {
            ptr::null_mut()
        } else {
            self.raw.as_mut_ptr()
        }
    }
    /// What decode_params returns: Some(params) or None for an error.
    fn expected(&self) -> Option<&[Param]> {
        if self.raw.is_empty() {
            return Some(&[]);
        }
        if self.null_array || self.raw.len() > MAX_PARAMS {
            return None;
        }
        self.decoded.as_deref()
    }
}

fn cstring(bytes: Vec<u8>, keep: &mut Vec<CString>) -> *const c_char {
    let c = CString::new(bytes).expect("NULs were dropped");
    let p = c.as_ptr();
    keep.push(c);
    p
}

fn params(inp: &mut Input<'_>) -> Params {
    let n = usize::from(inp.byte() % 8);
    let null_array = n > 0 && inp.byte() == 0xff;
    let mut strings = Vec::new();
    let mut raw = Vec::with_capacity(n);
    let mut decoded = Some(Vec::with_capacity(n));
    for _ in 0..n {
        // SAFETY: virLockManagerParam is plain data; all-zero is a valid value.
        let mut p: abi::virLockManagerParam = unsafe { std::mem::zeroed() };
        let key: Option<Vec<u8>> = match inp.byte() % 12 {
            8 => Some(inp.text()),
            9 => None,
            k => KEYS.get(usize::from(k % 8)).map(|k| k.as_bytes().to_vec()),
        };
        p.key = match &key {
            Some(k) => cstring(k.clone(), &mut strings),
            None => ptr::null(),
        };
        let tag = inp.byte() % 10;
        let value = match tag {
            0 | 1 => {
                let s = if inp.byte() % 8 == 0 {
                    None
                } else {
                    Some(inp.text())
                };
                let cp = match &s {
                    Some(b) => cstring(b.clone(), &mut strings),
                    None => ptr::null(),
                };
                if tag == 0 {
                    p.value.str_ = cp.cast_mut();
                    Value::Str(s)
                } else {
                    p.value.cstr = cp;
                    Value::CStr(s)
                }
            }
            2 => {
                let v = inp.u32() as i32;
                p.value.iv = v;
                Value::Int(v)
            }
            3 => {
                let v = inp.u64() as i64;
                p.value.l = v;
                Value::Long(v)
            }
            4 => {
                let v = inp.u32();
                p.value.ui = v;
                Value::UInt(v)
            }
            5 => {
                let v = inp.u64();
                p.value.ul = v;
                Value::ULong(v)
            }
            6 => {
                let v = f64::from_bits(inp.u64());
                p.value.d = v;
                Value::Double(v)
            }
            7 => {
                let mut u = [0u8; 16];
                for b in &mut u {
                    *b = inp.byte();
                }
                p.value.uuid = u;
                Value::Uuid(u)
            }
            _ => {
                // An unknown type tag: the union is left zeroed and must not be read.
                let t = 8 + (inp.u32() % 1000) as c_int;
                let t = if inp.byte() % 2 == 0 { t } else { -t };
                p.value.ul = 0;
                Value::Unknown(t)
            }
        };
        p.type_ = match value {
            Value::Unknown(t) => t,
            _ => c_int::from(tag),
        };
        raw.push(p);
        match (&mut decoded, key) {
            (Some(d), Some(k)) => d.push(Param {
                key: String::from_utf8_lossy(&k).into_owned(),
                value,
            }),
            (d, _) => *d = None,
        }
    }
    Params {
        _strings: strings,
        raw,
        decoded,
        null_array,
    }
}

/// NaN-tolerant comparison of decoded parameters (a DOUBLE NaN never equals itself).
fn same_params(a: &[Param], b: &[Param]) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|(x, y)| {
            x.key == y.key
                && match (&x.value, &y.value) {
                    (Value::Double(p), Value::Double(q)) => p.to_bits() == q.to_bits(),
                    (p, q) => p == q,
                }
        })
}

/// The settings variants the safe path also runs under.
fn variant(base: &Settings, which: u8) -> Settings {
    let mut s = base.clone();
    match which % 4 {
        0 => {}
        1 => s.file_lockspace_dir = None,
        2 => {
            s.auto_disk_leases = false;
            s.require_lease_for_disks = true;
        }
        _ => s.readonly_disks = ReadonlyDisks::Ignore,
    }
    s
}

/// The plugin's manager behind `man`, if drvNew succeeded on it.
fn private(man: &abi::virLockManager) -> Option<&Manager> {
    // SAFETY: privateData is NULL or the Box<Manager> drv_new stored (the harness never writes
    // it), and the manager is not used concurrently.
    unsafe { man.privateData.cast::<Manager>().as_ref() }
}

fn run(data: &[u8]) {
    let fx = fixture();
    let d = &virLockDriverImpl;
    let (new, add, acquire, release, inquire, free) = (
        d.drvNew.expect("drvNew"),
        d.drvAddResource.expect("drvAddResource"),
        d.drvAcquire.expect("drvAcquire"),
        d.drvRelease.expect("drvRelease"),
        d.drvInquire.expect("drvInquire"),
        d.drvFree.expect("drvFree"),
    );
    let mut inp = Input(data);
    // SAFETY: virLockManager is plain data; zeroed = no driver, no private data (as libvirt
    // allocates it).
    let mut man: Box<abi::virLockManager> = Box::new(unsafe { std::mem::zeroed() });
    // The safe-path mirror of the current manager.
    let mut mirror: Option<Manager> = None;
    let mut steps = 0;
    while !inp.is_empty() && steps < 32 {
        steps += 1;
        match inp.byte() % 9 {
            0 => {
                let object_type = if inp.byte() % 4 == 0 { inp.u32() } else { 0 };
                let flags = inp.flags();
                let mut p = params(&mut inp);
                let had = !man.privateData.is_null();
                let n = p.raw.len();
                let arr = p.ptr();
                // SAFETY: man is live; arr is NULL or points to n initialised params whose
                // strings are NUL-terminated and outlive the call.
                let rc = unsafe { new(&mut *man, object_type, n, arr, flags) };
                let want = match (had, p.expected()) {
                    (true, _) | (false, None) => None,
                    (false, Some(ps)) => decode_new(object_type, flags)
                        .and_then(|()| Manager::from_new(ps))
                        .ok(),
                };
                match (rc, want) {
                    (0, Some(m)) => {
                        let got = private(&man).expect("drvNew succeeded without private data");
                        assert_eq!(got.owner, m.owner, "drvNew decoded another owner");
                        mirror = Some(m);
                    }
                    (-1, None) => {
                        if !had {
                            assert!(man.privateData.is_null(), "failed drvNew left private data");
                        }
                    }
                    (rc, want) => panic!("drvNew rc {rc}, safe path says {want:?}"),
                }
            }
            1 => {
                let rtype = match inp.byte() % 5 {
                    0 | 1 => 0,
                    2 | 3 => 1,
                    _ => inp.u32(),
                };
                let flags = inp.flags();
                let name = match inp.byte() % 8 {
                    0 => None,
                    1 => Some(b"/dev/vg/lv".to_vec()),
                    2 => Some(b"/var/lib/libvirt/images/a.qcow2".to_vec()),
                    _ => Some(inp.text()),
                };
                let which = inp.byte();
                let mut p = params(&mut inp);
                let mut keep = Vec::new();
                let cname = match &name {
                    Some(b) => cstring(b.clone(), &mut keep),
                    None => ptr::null(),
                };
                let n = p.raw.len();
                let arr = p.ptr();
                // SAFETY: as for drvNew; cname is NULL or NUL-terminated and outlives the call.
                let rc = unsafe { add(&mut *man, rtype, cname, n, arr, flags) };
                let expected = p.expected().map(<[Param]>::to_vec);
                match (&mut mirror, expected) {
                    (Some(m), Some(ps)) => {
                        let before = (m.leases.clone(), m.rw_disks);
                        let decoded = decode_resource(&m.vm_label(), rtype, flags);
                        let ok = decoded.clone().is_ok_and(|(t, f)| {
                            resources::add(&fx.settings, m, t, name.as_deref(), &ps, f).is_ok()
                        });
                        assert_eq!(rc == 0, ok, "drvAddResource rc {rc}, safe path ok={ok}");
                        if !ok {
                            assert_eq!((m.leases.clone(), m.rw_disks), before, "error changed it");
                        }
                        let got = private(&man).expect("manager vanished");
                        assert_eq!(got.leases, m.leases, "lease specs differ");
                        assert_eq!(got.rw_disks, m.rw_disks);
                        // The same resource under other settings: no panic, no tool run for
                        // /dev paths (lvm/scsi dirs stay unset).
                        let s = variant(&fx.settings, which);
                        let mut other = Manager::new(m.owner.clone());
                        if let Ok((t, f)) = decoded {
                            let _ = resources::add(&s, &mut other, t, name.as_deref(), &ps, f);
                        }
                    }
                    (Some(_), None) | (None, _) => assert_eq!(rc, -1, "drvAddResource rc {rc}"),
                }
                // Decoding itself must agree with the hand-made list.
                if let (Some(ps), Some(expected)) = (p.decoded.as_deref(), p.expected()) {
                    assert!(same_params(ps, expected));
                }
            }
            2 => {
                let flags = inp.flags();
                let action = if inp.byte() % 4 == 0 {
                    inp.u32()
                } else {
                    u32::from(inp.byte() % 5)
                };
                let want_fd = inp.byte() % 2 == 0;
                let state = if inp.byte() % 4 == 0 {
                    c"ignored".as_ptr()
                } else {
                    ptr::null()
                };
                let mut fd: c_int = 12345;
                let fdp = if want_fd {
                    &raw mut fd
                } else {
                    ptr::null_mut()
                };
                // SAFETY: man is live; state is NULL or NUL-terminated; fdp NULL or valid.
                let rc = unsafe { acquire(&mut *man, state, flags, action, fdp) };
                assert_eq!(rc, -1, "drvAcquire succeeded without a daemon");
                if want_fd {
                    assert_eq!(fd, -1, "a failed drvAcquire left *fd set");
                }
            }
            3 => {
                let flags = inp.flags();
                let mut state: *mut c_char = c"garbage".as_ptr().cast_mut();
                let sp = if inp.byte() % 3 == 0 {
                    ptr::null_mut()
                } else {
                    &raw mut state
                };
                // SAFETY: man is live; sp NULL or a valid char** we own.
                let rc = unsafe { release(&mut *man, sp, flags) };
                assert_eq!(rc, -1, "drvRelease succeeded without a daemon");
                if !sp.is_null() {
                    assert!(state.is_null(), "drvRelease returned a state string");
                }
            }
            4 => {
                let flags = inp.flags();
                let mut state: *mut c_char = c"garbage".as_ptr().cast_mut();
                let null_state = inp.byte() % 3 == 0;
                let sp = if null_state {
                    ptr::null_mut()
                } else {
                    &raw mut state
                };
                // SAFETY: as above.
                let rc = unsafe { inquire(&mut *man, sp, flags) };
                let ok = mirror.is_some() && !null_state && flags == 0;
                assert_eq!(rc == 0, ok, "drvInquire rc {rc}");
                if !null_state {
                    assert!(state.is_null(), "drvInquire returned a state string");
                }
            }
            5 => {
                // SAFETY: man is live; drvFree frees the private data once and resets it.
                unsafe { free(&mut *man) };
                assert!(man.privateData.is_null());
                mirror = None;
            }
            6 => {
                // Every entry point with a NULL manager.
                let mut p = params(&mut inp);
                let n = p.raw.len();
                let arr = p.ptr();
                let mut fd: c_int = 7;
                let mut state: *mut c_char = ptr::null_mut();
                // SAFETY: NULL managers are what is being tested; other pointers are valid.
                unsafe {
                    assert_eq!(new(ptr::null_mut(), 0, n, arr, 0), -1);
                    assert_eq!(add(ptr::null_mut(), 0, c"/a".as_ptr(), n, arr, 0), -1);
                    assert_eq!(acquire(ptr::null_mut(), ptr::null(), 0, 0, &mut fd), -1);
                    assert_eq!(fd, -1);
                    assert_eq!(release(ptr::null_mut(), &mut state, 0), -1);
                    assert_eq!(inquire(ptr::null_mut(), &mut state, 0), -1);
                    free(ptr::null_mut());
                }
            }
            7 => {
                // A second drvInit: the first configuration stays; bad versions and flags fail.
                let version = if inp.byte() % 2 == 0 {
                    1_000_000
                } else {
                    inp.u32()
                };
                let flags = if inp.byte() % 2 == 0 { 0 } else { inp.u32() };
                let conf = if inp.byte() % 2 == 0 {
                    fx.conf.as_ptr()
                } else {
                    ptr::null()
                };
                let init = d.drvInit.expect("drvInit");
                // SAFETY: conf is NULL or NUL-terminated.
                let rc = unsafe { init(version, conf, flags) };
                let ok = flags == 0 && version / 1_000_000 == 1;
                assert_eq!(rc == 0, ok, "drvInit({version}, _, {flags:#x}) rc {rc}");
            }
            _ => {
                let deinit = d.drvDeinit.expect("drvDeinit");
                // SAFETY: no preconditions.
                assert_eq!(unsafe { deinit() }, 0);
            }
        }
    }
    // libvirt always frees the manager at the end of an operation.
    // SAFETY: as above.
    unsafe { free(&mut *man) };
    assert!(man.privateData.is_null());
}

fuzz_target!(|data: &[u8]| run(data));
