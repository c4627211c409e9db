//! The per-operation context behind `man->privateData`, and the safe logic of `drvNew`,
//! `drvAcquire` and `drvRelease`.
//!
//! libvirt builds a fresh manager for every operation (New → AddResource* → one of
//! Acquire/Release/Inquire → Free), so nothing here lives longer than one operation: the daemon
//! is the source of truth about what is held.

use super::error::PluginError;
use super::params::{self, Param, show};
use crate::abi;
use crate::client::Client;
use crate::plugin_conf::Settings;
use crate::protocol::{FailureAction, LeaseSpec, Owner, Request, ResourceKind};
use std::os::fd::OwnedFd;

const OBJECT_DOMAIN: u32 = abi::virLockManagerObjectType_VIR_LOCK_MANAGER_OBJECT_TYPE_DOMAIN;
const NEW_STARTED: u32 = abi::virLockManagerNewFlags_VIR_LOCK_MANAGER_NEW_STARTED;
const REGISTER_ONLY: u32 = abi::virLockManagerAcquireFlags_VIR_LOCK_MANAGER_ACQUIRE_REGISTER_ONLY;
const RESTRICT: u32 = abi::virLockManagerAcquireFlags_VIR_LOCK_MANAGER_ACQUIRE_RESTRICT;

/// What `man->privateData` points to.
#[derive(Debug)]
pub struct Manager {
    pub owner: Owner,
    /// The leases to acquire or release, in libvirt's order.
    pub leases: Vec<LeaseSpec>,
    /// Read/write exclusive disks seen (recorded or not), for `require_lease_for_disks`.
    pub rw_disks: usize,
    /// "'name' (uuid)", escaped once here rather than on every AddResource.
    label: String,
}

impl Manager {
    pub fn new(owner: Owner) -> Manager {
        let label = format!("{} ({})", show(owner.name.as_bytes()), owner.uuid);
        Manager {
            owner,
            leases: Vec::new(),
            rw_disks: 0,
            label,
        }
    }

    /// `drvNew`: check the object type and flags, decode the owner.
    pub fn from_new(
        object_type: u32,
        params: &[Param],
        flags: u32,
    ) -> Result<Manager, PluginError> {
        if object_type != OBJECT_DOMAIN {
            return Err(PluginError::invalid(format!(
                "drvNew: unknown lock manager object type {object_type} (this plugin knows \
                 domain = {OBJECT_DOMAIN}); upgrade lockwarden to match libvirt"
            )));
        }
        let unknown = flags & !NEW_STARTED;
        if unknown != 0 {
            return Err(PluginError::invalid(format!(
                "drvNew: unsupported flags 0x{unknown:x}; upgrade lockwarden to match libvirt"
            )));
        }
        Ok(Manager::new(params::owner_from_params(params)?))
    }

    /// "'name' (uuid)" for messages, escaped.
    pub fn vm_label(&self) -> String {
        self.label.clone()
    }

    /// `drvAcquire`. `want_fd`: keep the connection open and inheritable and return it (the
    /// owner's lifetime handle in the forked child).
    pub fn acquire(
        &self,
        settings: &Settings,
        flags: u32,
        action: u32,
        want_fd: bool,
    ) -> Result<Option<OwnedFd>, PluginError> {
        let vm = self.vm_label();
        let unknown = flags & !(REGISTER_ONLY | RESTRICT);
        if unknown != 0 {
            return Err(PluginError::invalid(format!(
                "drvAcquire for VM {vm}: unsupported flags 0x{unknown:x}; upgrade lockwarden to \
                 match libvirt"
            )));
        }
        let action = failure_action(action).ok_or_else(|| {
            PluginError::invalid(format!(
                "drvAcquire for VM {vm}: unknown on_lockfailure action {action} (known: 0..=4)"
            ))
        })?;
        let restrict = flags & RESTRICT != 0;
        let register = flags & REGISTER_ONLY != 0;
        let req = if register {
            Request::Register {
                owner: self.owner.clone(),
                restrict,
            }
        } else {
            if settings.require_lease_for_disks && self.leases.is_empty() && self.rw_disks > 0 {
                return Err(PluginError::config(format!(
                    "Read/write, exclusive access, disks were present, but no leases specified \
                     (VM {vm}, {} read/write disk(s); {} has require_lease_for_disks = 1 and \
                     auto_disk_leases = {}); add <lease> elements to the domain, set \
                     auto_disk_leases = 1, or set require_lease_for_disks = 0",
                    self.rw_disks,
                    settings.source_display(),
                    u8::from(settings.auto_disk_leases),
                )));
            }
            Request::Acquire {
                owner: self.owner.clone(),
                leases: self.leases.clone(),
                action,
                restrict,
            }
        };
        let context = || {
            if register {
                format!("cannot register VM {vm} with lockwardend")
            } else {
                format!(
                    "cannot acquire the {} lease(s) of VM {vm}{}",
                    self.leases.len(),
                    first_names(&self.leases)
                )
            }
        };
        let mut client = Client::connect(
            &settings.daemon_socket,
            settings.request_timeout_ms,
            &context,
        )?;
        client.call(&req)?;
        if want_fd {
            Ok(Some(client.into_inheritable_fd()?))
        } else {
            Ok(None)
        }
    }

    /// `drvRelease`.
    pub fn release(&self, settings: &Settings, flags: u32) -> Result<(), PluginError> {
        if flags != 0 {
            return Err(PluginError::invalid(format!(
                "drvRelease for VM {}: unsupported flags 0x{flags:x}; upgrade lockwarden to match \
                 libvirt",
                self.vm_label()
            )));
        }
        let context = || {
            format!(
                "cannot release the {} lease(s) of VM {}{}",
                self.leases.len(),
                self.vm_label(),
                first_names(&self.leases)
            )
        };
        let mut client = Client::connect(
            &settings.daemon_socket,
            settings.request_timeout_ms,
            &context,
        )?;
        client.call(&Request::Release {
            owner: self.owner.clone(),
            leases: self.leases.clone(),
        })?;
        Ok(())
    }

    /// `drvInquire`: lockd-style empty state, no round trip.
    pub fn inquire(&self, flags: u32) -> Result<(), PluginError> {
        if flags != 0 {
            return Err(PluginError::invalid(format!(
                "drvInquire for VM {}: unsupported flags 0x{flags:x}; upgrade lockwarden to match \
                 libvirt",
                self.vm_label()
            )));
        }
        Ok(())
    }
}

/// " (disk '/a', disk '/b', ...)" naming the first few resources, for messages.
fn first_names(leases: &[LeaseSpec]) -> String {
    const SHOWN: usize = 3;
    if leases.is_empty() {
        return String::new();
    }
    let mut names: Vec<String> = leases
        .iter()
        .take(SHOWN)
        .map(|l| {
            let kind = match l.kind {
                ResourceKind::Disk => "disk",
                ResourceKind::Lease => "lease",
            };
            format!("{kind} {}", show(l.name.as_bytes()))
        })
        .collect();
    if leases.len() > SHOWN {
        names.push(format!("and {} more", leases.len() - SHOWN));
    }
    format!(" ({})", names.join(", "))
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plugin::error::Code;
    use crate::plugin::params::Value;
    use std::path::PathBuf;

    fn params() -> Vec<Param> {
        vec![
            Param::new(
                "uuid",
                Value::Uuid([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]),
            ),
            Param::new("name", Value::Str(Some(b"web'1".to_vec()))),
        ]
    }

    #[test]
    fn new_checks_type_and_flags() {
        assert!(Manager::from_new(0, &params(), NEW_STARTED).is_ok());
        let e = Manager::from_new(1, &params(), 0).unwrap_err();
        assert!(e.message.contains("unknown lock manager object type 1"));
        let e = Manager::from_new(0, &params(), 6).unwrap_err();
        assert!(e.message.contains("unsupported flags 0x6"));
        assert_eq!(e.code, Code::Invalid);
    }

    #[test]
    fn acquire_checks_before_connecting() {
        let mut s = Settings::defaults(PathBuf::from("/nonexistent/sock"));
        let mut m = Manager::from_new(0, &params(), 0).unwrap();
        let e = m.acquire(&s, 4, 0, false).unwrap_err();
        assert!(e.message.contains("unsupported flags 0x4"), "{e}");
        let e = m.acquire(&s, 0, 5, false).unwrap_err();
        assert!(e.message.contains("unknown on_lockfailure action 5"), "{e}");
        s.auto_disk_leases = false;
        s.require_lease_for_disks = true;
        m.rw_disks = 2;
        let e = m.acquire(&s, 0, 0, false).unwrap_err();
        assert_eq!(e.code, Code::Config);
        assert!(
            e.message.starts_with(
                "Read/write, exclusive access, disks were present, but no leases specified (VM \
             'web\\'1' (01020304-0506-0708-090a-0b0c0d0e0f10)"
            ),
            "{e}"
        );
        // Register does not check (the check belongs to the acquire at CPU start).
        let e = m
            .acquire(&s, REGISTER_ONLY | RESTRICT, 0, true)
            .unwrap_err();
        assert!(e.message.contains("cannot connect to lockwardend"), "{e}");
    }

    #[test]
    fn actions() {
        assert_eq!(failure_action(0), Some(FailureAction::Default));
        assert_eq!(failure_action(3), Some(FailureAction::Pause));
        assert_eq!(failure_action(4), Some(FailureAction::Ignore));
        assert_eq!(failure_action(5), None);
    }
}
