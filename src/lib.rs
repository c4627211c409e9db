//! lockwarden: a lock manager for libvirt.
//!
//! One crate, three faces:
//! - the plugin (`plugin`), built as the cdylib `lockwarden.so` that libvirtd dlopens;
//! - the daemon (`daemon`), `lockwardend`, which owns the OFD locks so libvirtd can restart
//!   without dropping any;
//! - the admin CLI `lockwarden`.
//!
//! They share the wire `protocol`, the libvirt-syntax `config` parser and the `paths` of the
//! sockets. `abi` holds the bindgen output of `include/lockwarden/lock_driver.h`.

// The lint wall: library code never unwraps, panics or indexes unchecked. Tests may.
#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing
    )
)]
#![deny(unsafe_op_in_unsafe_fn)]

pub mod abi;
pub mod cli;
pub mod client;
pub mod config;
pub mod daemon;
pub mod holder_record;
// metrics (issue 18): the snapshot and its text formats, shared by lockwardend and lockwarden.
pub mod metrics;
pub mod naming;
pub mod paths;
pub mod plugin;
pub mod plugin_conf;
pub mod protocol;
pub mod text;
pub mod untrusted;
