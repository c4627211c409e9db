//! Responses as the plugin and the CLI receive them: frame headers, frame streams and bodies.
#![no_main]

mod frames;

use libfuzzer_sys::fuzz_target;
use lockwarden::protocol::Response;

fuzz_target!(|data: &[u8]| frames::check::<Response>(data));
