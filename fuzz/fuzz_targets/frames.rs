//! Shared by the two protocol targets: one input is read three ways.
//!
//! 1. Its first 12 bytes as a frame header (`parse_header`).
//! 2. The whole input as a byte stream of frames (`read_message` until the stream ends or
//!    cannot be resynchronised), exactly as the plugin and the CLI read the daemon's answers.
//! 3. The whole input as one frame body (`decode`), as the daemon decodes a request.
//!
//! Every message that decodes must survive encode → read_message unchanged, and every error
//! must format without panicking.

use lockwarden::protocol::{
    FrameError, HEADER_LEN, MAX_BODY, decode, encode, parse_header, read_message,
};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::fmt::Debug;

/// Frames read from one input at most (each needs at least 12 bytes anyway).
const MAX_FRAMES: usize = 256;

pub fn check<T>(data: &[u8])
where
    T: Serialize + DeserializeOwned + PartialEq + Debug,
{
    if let Some(h) = data.get(..HEADER_LEN) {
        let mut header = [0u8; HEADER_LEN];
        header.copy_from_slice(h);
        match parse_header(&header) {
            Ok((_version, len)) => assert!(len <= MAX_BODY, "parse_header let {len} through"),
            Err(e) => {
                let _ = e.to_string();
            }
        }
    }

    let mut stream = data;
    for _ in 0..MAX_FRAMES {
        match read_message::<_, T>(&mut stream) {
            Ok(msg) => round_trip(&msg),
            // The body was consumed whole: the stream is still in sync.
            Err(e @ (FrameError::Version(_) | FrameError::Decode(_))) => {
                let _ = e.to_string();
            }
            Err(e) => {
                let _ = e.to_string();
                break;
            }
        }
    }

    match decode::<T>(data) {
        Ok(msg) => round_trip(&msg),
        Err(e) => {
            let _ = e.to_string();
        }
    }
}

fn round_trip<T>(msg: &T)
where
    T: Serialize + DeserializeOwned + PartialEq + Debug,
{
    let frame = match encode(msg) {
        Ok(f) => f,
        // Escaping can make a body that fitted MAX_BODY on input exceed it on output; that is
        // reported, not a bug.
        Err(FrameError::TooLarge(_)) => return,
        Err(e) => panic!("encode failed on a message that decoded: {e}: {msg:?}"),
    };
    let back: T = read_message(&mut &frame[..])
        .unwrap_or_else(|e| panic!("own frame does not read back: {e}: {msg:?}"));
    assert_eq!(&back, msg, "round trip changed the message");
}
