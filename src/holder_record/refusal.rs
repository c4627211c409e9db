//! The refusal text and holder of a busy lease.

use super::read::MAX_SIDE_FILES;
use super::*;
use crate::protocol::{Holder, ResourceKind};
use crate::text::{esc, mode_word, subject, utc, what};

/// The busy message and holder for a refused acquire of `name`, whose lock target is open as
/// `target.fd` (not locked by this descriptor): reads the records and the kernel's view.
pub struct Refusal {
    pub message: String,
    pub holder: Holder,
    pub found: Found,
}

/// Call when `F_OFD_SETLK` on `target.fd` failed with EAGAIN/EACCES.
pub fn read_for_refusal(target: Target<'_>, name: &str) -> Refusal {
    let found = read(target);
    let records = found.records();
    let mut message = describe_refusal(
        target.kind,
        name,
        Some(target.lock_path),
        &records,
        found.lock.as_ref(),
    );
    if found.unread > 0 {
        message.push_str(&format!(
            " ({} more holder records next to it were not read: at most {MAX_SIDE_FILES} are \
             read per refusal; remove stale ones from its {RECORD_DIR} directory)",
            found.unread
        ));
    }
    // Dead-host visibility (seen.rs): when the holder's host last wrote its heartbeat here.
    for seen in &found.seen {
        message.push_str(&format!(" ({})", seen.sentence()));
    }
    let holder = holder_of(&records, found.lock.as_ref());
    Refusal {
        message,
        holder,
        found,
    }
}

/// The protocol `Holder` for the first believed record (or the kernel's lock alone).
pub fn holder_of(records: &[Record], lock: Option<&KernelLock>) -> Holder {
    let here = boot_id();
    let first = records.iter().find_map(|r| r.vms.first().map(|v| (r, v)));
    match first {
        Some((r, v)) => Holder {
            vm_name: Some(v.name.clone()),
            vm_uuid: Some(v.uuid.clone()),
            host: Some(r.host.clone()),
            pid: (!here.is_empty() && r.boot_id == here)
                .then(|| i32::try_from(v.pid).ok())
                .flatten(),
            since: Some(v.since),
            mode: Some(r.mode),
        },
        None => Holder {
            vm_name: None,
            vm_uuid: None,
            host: None,
            pid: lock.and_then(|l| l.pid),
            since: None,
            mode: lock.map(|l| l.mode),
        },
    }
}

/// How many holders a refusal names before "and N more".
const NAMED: usize = 4;

/// The sentence a refused acquire carries: who holds `name` according to the believed
/// `records`, or, when none, what the kernel says (`lock`). `lock_path`: the locked file, named
/// as "(lock file ...)" when it is not the disk itself (lockspace mode).
pub fn describe_refusal(
    kind: ResourceKind,
    name: &str,
    lock_path: Option<&str>,
    records: &[Record],
    lock: Option<&KernelLock>,
) -> String {
    let w = what(kind);
    let subject = subject(kind, name, lock_path.unwrap_or(name));
    let holders: Vec<(&Record, &Vm)> = records
        .iter()
        .flat_map(|r| r.vms.iter().map(move |v| (r, v)))
        .collect();
    if !holders.is_empty() {
        let mut parts: Vec<String> = holders
            .iter()
            .take(NAMED)
            .map(|(r, v)| {
                format!(
                    "VM '{}' (uuid {}) on host {} since {} ({})",
                    esc(&v.name),
                    esc(&v.uuid),
                    esc(&r.host),
                    utc(v.since),
                    mode_word(r.mode)
                )
            })
            .collect();
        if holders.len() > NAMED {
            parts.push(format!("{} more", holders.len() - NAMED));
        }
        let (them, it) = if holders.len() == 1 {
            ("that VM", "it")
        } else {
            ("those VMs", "them")
        };
        return format!(
            "{subject} is in use by {}; shut {them} down or detach the {w} from {it} first",
            parts.join(", and by ")
        );
    }
    let foreign = "a process that is not lockwarden (virtlockd or another tool)";
    match lock {
        Some(KernelLock {
            pid: Some(p),
            nfs: false,
            comm,
            mode,
        }) => format!(
            "{subject} is locked ({}) by {foreign}: local process {p} ({}); stop that process \
             or make it release the {w} first",
            mode_word(*mode),
            esc(comm.as_deref().unwrap_or("exited"))
        ),
        Some(KernelLock {
            pid: Some(p),
            nfs: true,
            mode,
            ..
        }) => format!(
            "{subject} is locked ({}) by {foreign}: process {p} on this host or another NFS \
             client; if a VM or lock manager there uses it, stop it there first",
            mode_word(*mode)
        ),
        Some(KernelLock { mode, .. }) => format!(
            "{subject} is locked ({}) by another process or host and no lockwarden holder \
             record describes it: {foreign}, or a lockwarden host that published no record; if \
             a VM on another host uses it, stop it there first",
            mode_word(*mode)
        ),
        None => format!(
            "{subject} was locked by another process or host a moment ago and is free now; \
             retry"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::LeaseMode;

    fn vm(name: &str) -> Vm {
        Vm {
            name: name.into(),
            uuid: format!("uuid-{name}"),
            pid: 42,
            since: 0,
        }
    }

    #[test]
    fn the_busy_sentence_names_holders_or_the_kernels_lock() {
        let mut r = Record::new(
            "node\u{1b}[2Ja",
            ResourceKind::Disk,
            "/img/a",
            LeaseMode::Exclusive,
            "/img/a",
            0,
            vec![vm("web1")],
        );
        r.boot_id = "another boot".into();
        let one = describe_refusal(ResourceKind::Disk, "/img/a", None, &[r.clone()], None);
        assert!(
            one.contains("is in use by VM 'web1' (uuid uuid-web1) on host node"),
            "{one}"
        );
        assert!(one.contains("1970-01-01 00:00:00 UTC (exclusive)"), "{one}");
        assert!(
            one.ends_with("shut that VM down or detach the disk from it first"),
            "{one}"
        );
        assert!(!one.contains('\u{1b}'), "host name not escaped: {one:?}");
        r.vms = (0..6).map(|i| vm(&format!("v{i}"))).collect();
        let many = describe_refusal(ResourceKind::Disk, "/img/a", None, &[r.clone()], None);
        assert!(
            many.contains(", and by 2 more; shut those VMs down"),
            "{many}"
        );
        // The protocol holder: the first VM; its pid only for a record of this very boot.
        let h = holder_of(&[r.clone()], None);
        assert_eq!(h.vm_name.as_deref(), Some("v0"));
        assert_eq!(h.pid, None);
        r.boot_id = boot_id();
        assert!(
            !r.boot_id.is_empty(),
            "/proc/sys/kernel/random/boot_id unreadable"
        );
        assert_eq!(holder_of(&[r], None).pid, Some(42));

        let posix = KernelLock {
            mode: LeaseMode::Shared,
            pid: Some(7),
            comm: Some("virtlockd".into()),
            nfs: false,
        };
        let m = describe_refusal(ResourceKind::Disk, "/img/a", None, &[], Some(&posix));
        assert!(m.contains("locked (shared) by a process that is not lockwarden (virtlockd or another tool): local process 7 (virtlockd)"), "{m}");
        let h = holder_of(&[], Some(&posix));
        assert_eq!(
            (h.pid, h.mode, h.host),
            (Some(7), Some(LeaseMode::Shared), None)
        );
        let nfs = KernelLock { nfs: true, ..posix };
        let m = describe_refusal(ResourceKind::Disk, "/img/a", None, &[], Some(&nfs));
        assert!(
            m.contains("process 7 on this host or another NFS client"),
            "{m}"
        );
        let ofd = KernelLock {
            pid: None,
            comm: None,
            ..nfs
        };
        let m = describe_refusal(ResourceKind::Disk, "/img/a", None, &[], Some(&ofd));
        assert!(
            m.contains("no lockwarden holder record describes it"),
            "{m}"
        );
        let m = describe_refusal(ResourceKind::Disk, "/img/a", None, &[], None);
        assert!(m.ends_with("is free now; retry"), "{m}");
    }
}
