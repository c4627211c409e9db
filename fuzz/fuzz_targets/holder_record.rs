//! Holder records as another host on the shared storage writes them (side files and the
//! record inside a lockspace lock file): the bytes go through the daemon's own parser, and a
//! parsed record through the sentence a refused acquire shows (`describe_refusal`).
//!
//! Invariants: no panic; a parsed record keeps the fields it was given; the refusal text that
//! names its host and VMs carries no control or bidi-override character (docs/hardening.md,
//! section 6: storage-derived text is escaped before anyone sees it).
#![no_main]

use libfuzzer_sys::fuzz_target;
use lockwarden::daemon::holder::{self, KernelLock};
use lockwarden::protocol::LeaseMode;

fn inert(s: &str) -> bool {
    !s.chars().any(|c| {
        c.is_control() || matches!(c, '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}')
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(record) = holder::parse_record(data) else {
        return;
    };
    let text = holder::describe_refusal(
        record.kind,
        &record.name,
        Some(&record.lock_path),
        std::slice::from_ref(&record),
        Some(&KernelLock {
            mode: LeaseMode::Exclusive,
            pid: i32::try_from(record.daemon_pid).ok(),
            comm: Some(record.host.clone()),
            nfs: false,
        }),
    );
    assert!(inert(&text), "refusal text not escaped: {text:?}");
});
