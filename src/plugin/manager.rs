//! The per-operation context behind `man->privateData`, and the safe logic of `drvNew`,
//! `drvAcquire` and `drvRelease`.
//!
//! libvirt builds a fresh manager for every operation (New → AddResource* → one of
//! Acquire/Release/Inquire → Free), so nothing here lives longer than one operation: the daemon
//! is the source of truth about what is held.
//!
//! The ABI's integers (object type, flags, the failure action) arrive decoded by `ffi.rs`,
//! which refuses unknown values.

use super::error::PluginError;
use super::params::{self, Param, show};
use crate::client::Client;
use crate::plugin_conf::Settings;
use crate::protocol::{FailureAction, LeaseSpec, Owner, Request, ResourceKind};
use std::os::fd::OwnedFd;

/// `virLockManagerAcquireFlags`, decoded by `ffi.rs` (unknown bits are refused there).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AcquireFlags {
    /// `VIR_LOCK_MANAGER_ACQUIRE_REGISTER_ONLY`: register the VM, lock nothing.
    pub register_only: bool,
    /// `VIR_LOCK_MANAGER_ACQUIRE_RESTRICT`: the calling process is the VM's QEMU child.
    pub restrict: bool,
}

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

    /// `drvNew` for a domain (`ffi.rs` checked the object type and flags): decode the owner.
    pub fn from_new(params: &[Param]) -> Result<Manager, PluginError> {
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
        flags: AcquireFlags,
        action: FailureAction,
        want_fd: bool,
    ) -> Result<Option<OwnedFd>, PluginError> {
        let vm = self.vm_label();
        let restrict = flags.restrict;
        let register = flags.register_only;
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

    /// `drvRelease` (`ffi.rs` refused any flag).
    pub fn release(&self, settings: &Settings) -> Result<(), PluginError> {
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

    // Object types, flags and actions are decoded and checked in ffi.rs (its unit tests).

    #[test]
    fn acquire_checks_before_connecting() {
        let mut s = Settings::defaults(PathBuf::from("/nonexistent/sock"));
        let mut m = Manager::from_new(&params()).unwrap();
        s.auto_disk_leases = false;
        s.require_lease_for_disks = true;
        m.rw_disks = 2;
        let none = AcquireFlags::default();
        let e = m
            .acquire(&s, none, FailureAction::Default, false)
            .unwrap_err();
        assert_eq!(e.code, Code::Config);
        assert!(
            e.message.starts_with(
                "Read/write, exclusive access, disks were present, but no leases specified (VM \
             'web\\'1' (01020304-0506-0708-090a-0b0c0d0e0f10)"
            ),
            "{e}"
        );
        // Register does not check (the check belongs to the acquire at CPU start).
        let register = AcquireFlags {
            register_only: true,
            restrict: true,
        };
        let e = m
            .acquire(&s, register, FailureAction::Default, true)
            .unwrap_err();
        assert!(e.message.contains("cannot connect to lockwardend"), "{e}");
    }
}
