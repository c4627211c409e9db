//! Requests as the daemon receives them: frame headers, frame streams and bodies.
#![no_main]

mod frames;

use libfuzzer_sys::fuzz_target;
use lockwarden::protocol::Request;

fuzz_target!(|data: &[u8]| frames::check::<Request>(data));
