//! Fuzzes the control protocol decoder (what a hostile client or server reaches): any bytes as a
//! whole frame, and as a payload for a command chosen by the first two bytes.
#![no_main]

use kmod::proto::{self, parse_frame, Reply, Request};
use libfuzzer_sys::fuzz_target;

/// Whatever decodes re-encodes to exactly the same bytes (the encoding is canonical).
fn check(command: u16, payload: &[u8]) {
    match Request::decode(command, payload) {
        Ok(req) => {
            assert_eq!(req.command() as u16, command);
            let again = req.encode().expect("a decoded request encodes");
            assert_eq!(again, payload);
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
    match Reply::decode(command, payload) {
        Ok(reply) => {
            let again = reply.encode().expect("a decoded reply encodes");
            assert_eq!(again, payload);
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok((header, payload)) = parse_frame(data) {
        assert_eq!(usize::try_from(header.length).ok(), Some(payload.len()));
        if header.check_request(proto::MAX_PAYLOAD).is_ok() {
            assert!(header.length <= proto::MAX_PAYLOAD);
            assert_eq!(header.version, proto::VERSION);
            assert_eq!(header.flags & proto::FLAG_REPLY, 0);
        }
        if header.check_reply().is_ok() {
            assert!(header.length <= proto::MAX_REPLY_PAYLOAD);
        }
        check(header.command, payload);
    }
    if let Some((command, payload)) = data.split_first_chunk::<2>() {
        check(u16::from_le_bytes(*command), payload);
    }
});
