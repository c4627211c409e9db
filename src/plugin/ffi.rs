//! The only `extern "C"` code of the plugin: the exported driver table and its eight shells.
//!
//! `virLockDriverImpl` is the one exported dynamic symbol (libvirt `dlsym`s it and reads the
//! struct directly, so it is exactly `abi::virLockDriver`, 72 bytes; it holds only integers and
//! function pointers and is therefore `Sync` without a wrapper). The `drv_*` functions are
//! `extern "C"` but not `no_mangle`: they are reached only through the table and stay local.
//!
//! Every shell: catches panics (a panic becomes `-1` with a libvirt error, never an abort of
//! libvirtd), checks pointers, decodes C data into owned Rust values, calls the safe logic in
//! the sibling modules and maps its error to a libvirt error.
//!
//! This is the only module of the plugin that names `abi::` items: libvirt's integers (object
//! types, resource types, flags, the failure action, parameter types, error codes) are decoded
//! here into Rust types ([`ResourceType`], [`ResourceFlags`], [`AcquireFlags`],
//! [`FailureAction`], [`Value`]) and unknown values are refused here, so the safe logic behind
//! it never sees a raw libvirt number (`scripts/module-graph.py --check-layers` checks it).

use super::error::{self, Code, PluginError};
use super::manager::{AcquireFlags, Manager};
use super::params::{Param, Value};
use super::resources::{self, ResourceFlags, ResourceType};
use super::{EntryPoint, globals};
use crate::abi;
use crate::protocol::FailureAction;
use std::ffi::{CStr, OsStr, c_char, c_int, c_uint};
use std::os::fd::IntoRawFd;
use std::os::unix::ffi::OsStrExt;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::PathBuf;
use std::ptr;

/// The driver table libvirt's loader looks up with `dlsym(handle, "virLockDriverImpl")`.
#[allow(non_upper_case_globals)]
#[unsafe(no_mangle)]
pub static virLockDriverImpl: abi::virLockDriver = abi::virLockDriver {
    version: abi::VIR_LOCK_MANAGER_VERSION,
    // No USES_STATE: like lockd, the plugin returns no state strings.
    flags: 0,
    drvInit: Some(drv_init),
    drvDeinit: Some(drv_deinit),
    drvNew: Some(drv_new),
    drvFree: Some(drv_free),
    drvAddResource: Some(drv_add_resource),
    drvAcquire: Some(drv_acquire),
    drvRelease: Some(drv_release),
    drvInquire: Some(drv_inquire),
};

const _: () = assert!(std::mem::size_of::<abi::virLockDriver>() == 72);

/// More parameters than this is not libvirt talking (it passes at most 5).
const MAX_PARAMS: usize = 4096;

const T_STRING: u32 = abi::virLockManagerParamType_VIR_LOCK_MANAGER_PARAM_TYPE_STRING;
const T_CSTRING: u32 = abi::virLockManagerParamType_VIR_LOCK_MANAGER_PARAM_TYPE_CSTRING;
const T_INT: u32 = abi::virLockManagerParamType_VIR_LOCK_MANAGER_PARAM_TYPE_INT;
const T_LONG: u32 = abi::virLockManagerParamType_VIR_LOCK_MANAGER_PARAM_TYPE_LONG;
const T_UINT: u32 = abi::virLockManagerParamType_VIR_LOCK_MANAGER_PARAM_TYPE_UINT;
const T_ULONG: u32 = abi::virLockManagerParamType_VIR_LOCK_MANAGER_PARAM_TYPE_ULONG;
const T_DOUBLE: u32 = abi::virLockManagerParamType_VIR_LOCK_MANAGER_PARAM_TYPE_DOUBLE;
const T_UUID: u32 = abi::virLockManagerParamType_VIR_LOCK_MANAGER_PARAM_TYPE_UUID;

const OBJECT_DOMAIN: u32 = abi::virLockManagerObjectType_VIR_LOCK_MANAGER_OBJECT_TYPE_DOMAIN;
const NEW_STARTED: u32 = abi::virLockManagerNewFlags_VIR_LOCK_MANAGER_NEW_STARTED;
const REGISTER_ONLY: u32 = abi::virLockManagerAcquireFlags_VIR_LOCK_MANAGER_ACQUIRE_REGISTER_ONLY;
const RESTRICT: u32 = abi::virLockManagerAcquireFlags_VIR_LOCK_MANAGER_ACQUIRE_RESTRICT;
const DISK: u32 = abi::virLockManagerResourceType_VIR_LOCK_MANAGER_RESOURCE_TYPE_DISK;
const LEASE: u32 = abi::virLockManagerResourceType_VIR_LOCK_MANAGER_RESOURCE_TYPE_LEASE;
const READONLY: u32 = abi::virLockManagerResourceFlags_VIR_LOCK_MANAGER_RESOURCE_READONLY;
const SHARED: u32 = abi::virLockManagerResourceFlags_VIR_LOCK_MANAGER_RESOURCE_SHARED;

/// `virErrorDomain` of every error the plugin raises.
pub(super) const FROM_LOCKING: c_int = abi::VIR_FROM_LOCKING as c_int;

/// The numeric libvirt error code of `code` (values from `virerror.h`, via our ABI header).
pub fn error_number(code: Code) -> c_int {
    let n = match code {
        Code::Internal => abi::VIR_ERR_INTERNAL_ERROR,
        Code::Denied => abi::VIR_ERR_OPERATION_DENIED,
        Code::Invalid => abi::VIR_ERR_OPERATION_INVALID,
        Code::Config => abi::VIR_ERR_CONFIG_UNSUPPORTED,
        Code::Busy => abi::VIR_ERR_RESOURCE_BUSY,
    };
    // All values are small positive constants from virerror.h.
    n as c_int
}

/// `drvNew`'s object type and flags: only domains, and no flag but `NEW_STARTED` (which changes
/// nothing for this plugin).
pub fn decode_new(object_type: u32, flags: u32) -> Result<(), PluginError> {
    if object_type != OBJECT_DOMAIN {
        return Err(PluginError::invalid(format!(
            "drvNew: unknown lock manager object type {object_type} (this plugin knows domain = \
             {OBJECT_DOMAIN}); upgrade lockwarden to match libvirt"
        )));
    }
    let unknown = flags & !NEW_STARTED;
    if unknown != 0 {
        return Err(PluginError::invalid(format!(
            "drvNew: unsupported flags 0x{unknown:x}; upgrade lockwarden to match libvirt"
        )));
    }
    Ok(())
}

/// `drvAddResource`'s resource type and flags, for VM `vm` (its label for messages).
pub fn decode_resource(
    vm: &str,
    rtype: u32,
    flags: u32,
) -> Result<(ResourceType, ResourceFlags), PluginError> {
    let (rtype, what) = match rtype {
        DISK => (ResourceType::Disk, "a disk"),
        LEASE => (ResourceType::Lease, "a lease"),
        other => {
            return Err(PluginError::invalid(format!(
                "drvAddResource for VM {vm}: unknown resource type {other} (this plugin knows \
                 disk = {DISK} and lease = {LEASE}); upgrade lockwarden to match libvirt"
            )));
        }
    };
    let unknown = flags & !(READONLY | SHARED);
    if unknown != 0 {
        return Err(PluginError::invalid(format!(
            "drvAddResource for VM {vm}: unsupported flags 0x{unknown:x} for {what}; upgrade \
             lockwarden to match libvirt"
        )));
    }
    let flags = ResourceFlags {
        readonly: flags & READONLY != 0,
        shared: flags & SHARED != 0,
    };
    Ok((rtype, flags))
}

/// `drvAcquire`'s flags and `on_lockfailure` action, for VM `vm`.
pub fn decode_acquire(
    vm: &str,
    flags: u32,
    action: u32,
) -> Result<(AcquireFlags, FailureAction), PluginError> {
    let unknown = flags & !(REGISTER_ONLY | RESTRICT);
    if unknown != 0 {
        return Err(PluginError::invalid(format!(
            "drvAcquire for VM {vm}: unsupported flags 0x{unknown:x}; upgrade lockwarden to match \
             libvirt"
        )));
    }
    let action = failure_action(action).ok_or_else(|| {
        PluginError::invalid(format!(
            "drvAcquire for VM {vm}: unknown on_lockfailure action {action} (known: 0..=4)"
        ))
    })?;
    let flags = AcquireFlags {
        register_only: flags & REGISTER_ONLY != 0,
        restrict: flags & RESTRICT != 0,
    };
    Ok((flags, action))
}

/// `drvRelease` and `drvInquire` take no flags.
pub fn decode_no_flags(func: &str, vm: &str, flags: u32) -> Result<(), PluginError> {
    if flags != 0 {
        return Err(PluginError::invalid(format!(
            "{func} for VM {vm}: unsupported flags 0x{flags:x}; upgrade lockwarden to match \
             libvirt"
        )));
    }
    Ok(())
}

/// libvirt's `virDomainLockFailureAction` → the protocol's.
pub fn failure_action(action: u32) -> Option<FailureAction> {
    Some(match action {
        abi::virDomainLockFailureAction_VIR_DOMAIN_LOCK_FAILURE_DEFAULT => FailureAction::Default,
        abi::virDomainLockFailureAction_VIR_DOMAIN_LOCK_FAILURE_POWEROFF => FailureAction::Poweroff,
        abi::virDomainLockFailureAction_VIR_DOMAIN_LOCK_FAILURE_RESTART => FailureAction::Restart,
        abi::virDomainLockFailureAction_VIR_DOMAIN_LOCK_FAILURE_PAUSE => FailureAction::Pause,
        abi::virDomainLockFailureAction_VIR_DOMAIN_LOCK_FAILURE_IGNORE => FailureAction::Ignore,
        _ => return None,
    })
}

/// The panic boundary: run `f`, turn an error or a panic into a libvirt error.
fn boundary<R>(at: EntryPoint, f: impl FnOnce() -> Result<R, PluginError>) -> Option<R> {
    let outcome = catch_unwind(AssertUnwindSafe(|| {
        super::maybe_test_panic(at);
        f()
    }));
    let err = match outcome {
        Ok(Ok(v)) => return Some(v),
        Ok(Err(e)) => e,
        Err(payload) => PluginError::internal(format!(
            "internal error in lockwarden {}: panic: {}; this is a bug in lockwarden, please \
             report it",
            at.c_name().to_string_lossy(),
            super::panic_message(&*payload)
        )),
    };
    // Reporting cannot panic, but the boundary must hold even if it did.
    let _ = catch_unwind(AssertUnwindSafe(|| error::report(at.c_name(), &err)));
    None
}

fn rc(outcome: Option<()>) -> c_int {
    match outcome {
        Some(()) => 0,
        None => -1,
    }
}

/// Copy a C string (NULL → None).
///
/// # Safety
/// `p` is NULL or points to a NUL-terminated string valid for the duration of the call.
unsafe fn c_bytes(p: *const c_char) -> Option<Vec<u8>> {
    if p.is_null() {
        None
    } else {
        // SAFETY: non-NULL and NUL-terminated per this function's contract.
        Some(unsafe { CStr::from_ptr(p) }.to_bytes().to_vec())
    }
}

/// Decode a parameter array into owned values.
///
/// # Safety
/// If `nparams > 0` and `params` is non-NULL, `params` points to `nparams` initialised
/// `virLockManagerParam`s whose keys are NULL or NUL-terminated and whose string members (for
/// the STRING and CSTRING types) are NULL or NUL-terminated.
unsafe fn decode_params(
    ctx: &str,
    params: *const abi::virLockManagerParam,
    nparams: usize,
) -> Result<Vec<Param>, PluginError> {
    if nparams == 0 {
        return Ok(Vec::new());
    }
    if params.is_null() {
        return Err(PluginError::invalid(format!(
            "{ctx}: {nparams} parameter(s) announced but the parameter array is NULL"
        )));
    }
    if nparams > MAX_PARAMS {
        return Err(PluginError::invalid(format!(
            "{ctx}: {nparams} parameters announced; at most {MAX_PARAMS} are accepted"
        )));
    }
    // SAFETY: non-NULL, and per the contract it points to `nparams` initialised elements.
    let raw = unsafe { std::slice::from_raw_parts(params, nparams) };
    let mut out = Vec::with_capacity(nparams);
    for (i, p) in raw.iter().enumerate() {
        if p.key.is_null() {
            return Err(PluginError::invalid(format!(
                "{ctx}: parameter #{i} has a NULL key"
            )));
        }
        // SAFETY: non-NULL and NUL-terminated per the contract.
        let key = unsafe { CStr::from_ptr(p.key) }
            .to_string_lossy()
            .into_owned();
        let tag = u32::try_from(p.type_).unwrap_or(u32::MAX);
        // SAFETY: the type tag says which union member libvirt wrote, and only that member is
        // read (an unknown tag reads nothing); string members are NULL or NUL-terminated per
        // the contract. The integer members share the union's first bytes, so reading `ui`
        // where libvirt wrote `iv` (it does, for id and pid) is defined.
        let value = unsafe {
            match tag {
                T_STRING => Value::Str(c_bytes(p.value.str_)),
                T_CSTRING => Value::CStr(c_bytes(p.value.cstr)),
                T_INT => Value::Int(p.value.iv),
                T_LONG => Value::Long(p.value.l),
                T_UINT => Value::UInt(p.value.ui),
                T_ULONG => Value::ULong(p.value.ul),
                T_DOUBLE => Value::Double(p.value.d),
                T_UUID => Value::Uuid(p.value.uuid),
                _ => Value::Unknown(p.type_),
            }
        };
        out.push(Param { key, value });
    }
    Ok(out)
}

/// The plugin context behind `man`.
///
/// # Safety
/// `man` is NULL or points to a live `virLockManager` whose `privateData` is NULL or was set by
/// `drv_new` (and not yet freed by `drv_free`, which resets it to NULL).
unsafe fn manager_mut<'a>(
    func: &str,
    man: *mut abi::virLockManager,
) -> Result<&'a mut Manager, PluginError> {
    if man.is_null() {
        return Err(PluginError::invalid(format!(
            "{func}: the lock manager pointer is NULL"
        )));
    }
    // SAFETY: non-NULL and live per the contract.
    let private = unsafe { (*man).privateData };
    if private.is_null() {
        return Err(PluginError::invalid(format!(
            "{func}: the lock manager has no lockwarden context (drvNew was not called or failed)"
        )));
    }
    // SAFETY: privateData came from Box::<Manager>::into_raw in drv_new and is still owned by
    // this manager; libvirt uses one manager from one thread at a time.
    Ok(unsafe { &mut *private.cast::<Manager>() })
}

unsafe extern "C" fn drv_init(version: c_uint, config_file: *const c_char, flags: c_uint) -> c_int {
    // First, so that even a refused Init can raise its error through libvirt.
    error::resolve_helper();
    rc(boundary(EntryPoint::Init, || {
        if flags != 0 {
            return Err(PluginError::invalid(format!(
                "drvInit: unsupported flags 0x{flags:x}; upgrade lockwarden to match libvirt"
            )));
        }
        if version / 1_000_000 != abi::VIR_LOCK_MANAGER_VERSION_MAJOR {
            return Err(PluginError::invalid(format!(
                "drvInit: libvirt asks for lock driver ABI version {version}, this plugin \
                 implements major version {}; install a lockwarden built for this libvirt",
                abi::VIR_LOCK_MANAGER_VERSION_MAJOR
            )));
        }
        // SAFETY: libvirt passes NULL or a NUL-terminated path valid for the call.
        let config = unsafe { c_bytes(config_file) }.map(|b| PathBuf::from(OsStr::from_bytes(&b)));
        super::init(config.as_deref())
    }))
}

unsafe extern "C" fn drv_deinit() -> c_int {
    // Linked -z nodelete and no threads were started: nothing to tear down.
    rc(boundary(EntryPoint::Deinit, || Ok(())))
}

unsafe extern "C" fn drv_new(
    man: *mut abi::virLockManager,
    object_type: c_uint,
    nparams: usize,
    params: *mut abi::virLockManagerParam,
    flags: c_uint,
) -> c_int {
    rc(boundary(EntryPoint::New, || {
        globals()?;
        if man.is_null() {
            return Err(PluginError::invalid(
                "drvNew: the lock manager pointer is NULL",
            ));
        }
        // SAFETY: non-NULL; libvirt allocated it for this operation and reads nothing of it
        // while the call runs.
        let man = unsafe { &mut *man };
        if !man.privateData.is_null() {
            return Err(PluginError::invalid(
                "drvNew: the lock manager already has private data; drvNew was called twice",
            ));
        }
        // SAFETY: libvirt passes `nparams` initialised parameters (NULL is checked inside).
        let params = unsafe { decode_params("drvNew", params, nparams) }?;
        decode_new(object_type, flags)?;
        let manager = Manager::from_new(&params)?;
        // Nothing can fail after this point: a failed drvNew must leave nothing allocated,
        // because libvirt then frees `man` without calling drvFree.
        man.privateData = Box::into_raw(Box::new(manager)).cast();
        Ok(())
    }))
}

unsafe extern "C" fn drv_add_resource(
    man: *mut abi::virLockManager,
    resource_type: c_uint,
    name: *const c_char,
    nparams: usize,
    params: *mut abi::virLockManagerParam,
    flags: c_uint,
) -> c_int {
    rc(boundary(EntryPoint::AddResource, || {
        let g = globals()?;
        // SAFETY: `man` comes from libvirt after a successful drv_new.
        let manager = unsafe { manager_mut("drvAddResource", man) }?;
        // SAFETY: libvirt passes NULL or a NUL-terminated name valid for the call.
        let name = unsafe { c_bytes(name) };
        let ctx = format!("drvAddResource for VM {}", manager.vm_label());
        // SAFETY: libvirt passes `nparams` initialised parameters (NULL is checked inside).
        let params = unsafe { decode_params(&ctx, params, nparams) }?;
        let (rtype, flags) = decode_resource(&manager.vm_label(), resource_type, flags)?;
        resources::add(&g.settings, manager, rtype, name.as_deref(), &params, flags)
    }))
}

unsafe extern "C" fn drv_acquire(
    man: *mut abi::virLockManager,
    _state: *const c_char,
    flags: c_uint,
    action: abi::virDomainLockFailureAction,
    fd: *mut c_int,
) -> c_int {
    // `state` is ignored: like lockd, the daemon is the source of truth, not a state string.
    if !fd.is_null() {
        // SAFETY: non-NULL; libvirt passes the address of an int it owns.
        unsafe { fd.write(-1) };
    }
    rc(boundary(EntryPoint::Acquire, || {
        let g = globals()?;
        // SAFETY: `man` comes from libvirt after a successful drv_new.
        let manager = unsafe { manager_mut("drvAcquire", man) }?;
        let (flags, action) = decode_acquire(&manager.vm_label(), flags, action)?;
        let handle = manager.acquire(&g.settings, flags, action, !fd.is_null())?;
        if let Some(handle) = handle {
            // SAFETY: `handle` is only Some when `fd` is non-NULL (checked above).
            unsafe { fd.write(handle.into_raw_fd()) };
        }
        Ok(())
    }))
}

unsafe extern "C" fn drv_release(
    man: *mut abi::virLockManager,
    state: *mut *mut c_char,
    flags: c_uint,
) -> c_int {
    if !state.is_null() {
        // SAFETY: non-NULL; libvirt passes the address of a `char *` it owns. We never return
        // a state string (no USES_STATE).
        unsafe { state.write(ptr::null_mut()) };
    }
    rc(boundary(EntryPoint::Release, || {
        let g = globals()?;
        // SAFETY: `man` comes from libvirt after a successful drv_new.
        let manager = unsafe { manager_mut("drvRelease", man) }?;
        decode_no_flags("drvRelease", &manager.vm_label(), flags)?;
        manager.release(&g.settings)
    }))
}

unsafe extern "C" fn drv_inquire(
    man: *mut abi::virLockManager,
    state: *mut *mut c_char,
    flags: c_uint,
) -> c_int {
    if !state.is_null() {
        // SAFETY: non-NULL; libvirt passes the address of a `char *` it owns.
        unsafe { state.write(ptr::null_mut()) };
    }
    rc(boundary(EntryPoint::Inquire, || {
        globals()?;
        // SAFETY: `man` comes from libvirt after a successful drv_new.
        let manager = unsafe { manager_mut("drvInquire", man) }?;
        if state.is_null() {
            return Err(PluginError::invalid(format!(
                "drvInquire for VM {}: the state pointer is NULL",
                manager.vm_label()
            )));
        }
        // lockd-style empty state: no round trip, *state stays NULL.
        decode_no_flags("drvInquire", &manager.vm_label(), flags)
    }))
}

unsafe extern "C" fn drv_free(man: *mut abi::virLockManager) {
    let _ = boundary(EntryPoint::Free, || {
        if man.is_null() {
            return Ok(());
        }
        // SAFETY: non-NULL; libvirt passes the manager it is about to free.
        let private = unsafe { ptr::replace(&raw mut (*man).privateData, ptr::null_mut()) };
        if !private.is_null() {
            // SAFETY: privateData came from Box::<Manager>::into_raw in drv_new; it was reset
            // to NULL above, so it is freed exactly once.
            drop(unsafe { Box::from_raw(private.cast::<Manager>()) });
        }
        Ok(())
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_is_complete() {
        let t = &virLockDriverImpl;
        assert_eq!(t.version, 1_000_000);
        assert_eq!(t.flags, 0);
        assert!(t.drvInit.is_some() && t.drvDeinit.is_some() && t.drvNew.is_some());
        assert!(t.drvFree.is_some() && t.drvAddResource.is_some() && t.drvAcquire.is_some());
        assert!(t.drvRelease.is_some() && t.drvInquire.is_some());
    }

    const VM: &str = "'web1' (c7a5fdbd-cdaf-9455-926a-d65c16db1809)";

    #[test]
    fn new_checks_type_and_flags() {
        assert!(decode_new(0, NEW_STARTED).is_ok());
        assert!(decode_new(0, 0).is_ok());
        let e = decode_new(1, 0).unwrap_err();
        assert!(e.message.contains("unknown lock manager object type 1"));
        let e = decode_new(0, 6).unwrap_err();
        assert!(e.message.contains("unsupported flags 0x6"));
        assert_eq!(e.code, Code::Invalid);
    }

    #[test]
    fn resources_decode() {
        assert_eq!(
            decode_resource(VM, 0, 0).unwrap(),
            (ResourceType::Disk, ResourceFlags::default())
        );
        assert_eq!(
            decode_resource(VM, 0, 3).unwrap(),
            (
                ResourceType::Disk,
                ResourceFlags {
                    readonly: true,
                    shared: true
                }
            )
        );
        assert_eq!(
            decode_resource(VM, 1, 2).unwrap(),
            (
                ResourceType::Lease,
                ResourceFlags {
                    readonly: false,
                    shared: true
                }
            )
        );
        let e = decode_resource(VM, 0, 4).unwrap_err();
        assert!(
            e.message.contains("unsupported flags 0x4 for a disk"),
            "{e}"
        );
        assert!(e.message.contains("'web1'"), "{e}");
        let e = decode_resource(VM, 1, 8).unwrap_err();
        assert!(
            e.message.contains("unsupported flags 0x8 for a lease"),
            "{e}"
        );
        // The type is judged before the flags.
        let e = decode_resource(VM, 7, 4).unwrap_err();
        assert!(e.message.contains("unknown resource type 7"), "{e}");
        assert_eq!(e.code, Code::Invalid);
    }

    #[test]
    fn acquire_flags_and_actions() {
        let (f, a) = decode_acquire(VM, 0, 3).unwrap();
        assert_eq!(f, AcquireFlags::default());
        assert_eq!(a, FailureAction::Pause);
        let (f, _) = decode_acquire(VM, REGISTER_ONLY | RESTRICT, 0).unwrap();
        assert!(f.register_only && f.restrict);
        let e = decode_acquire(VM, 4, 0).unwrap_err();
        assert!(e.message.contains("unsupported flags 0x4"), "{e}");
        // Flags are judged before the action.
        let e = decode_acquire(VM, 4, 5).unwrap_err();
        assert!(e.message.contains("unsupported flags 0x4"), "{e}");
        let e = decode_acquire(VM, 0, 5).unwrap_err();
        assert!(e.message.contains("unknown on_lockfailure action 5"), "{e}");
        assert_eq!(failure_action(0), Some(FailureAction::Default));
        assert_eq!(failure_action(1), Some(FailureAction::Poweroff));
        assert_eq!(failure_action(2), Some(FailureAction::Restart));
        assert_eq!(failure_action(4), Some(FailureAction::Ignore));
        assert_eq!(failure_action(5), None);
        assert!(decode_no_flags("drvRelease", VM, 0).is_ok());
        let e = decode_no_flags("drvInquire", VM, 1).unwrap_err();
        assert!(e.message.starts_with("drvInquire for VM 'web1'"), "{e}");
        assert!(e.message.contains("unsupported flags 0x1"), "{e}");
    }
}
