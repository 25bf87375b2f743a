//! The on-disk event codec (`store::decode_event`): what RocksDB and the replication log
//! hand back. Never panics; the encoding is canonical (decode then encode gives the bytes).
#![no_main]

use libfuzzer_sys::fuzz_target;
use store::{decode_event, encode_event, StreamName};

fuzz_target!(|data: &[u8]| {
    let stream = StreamName::new("chat:alice:bob").expect("valid");
    if let Ok(event) = decode_event(&stream, data) {
        assert_eq!(encode_event(&event), data, "the event encoding is canonical");
    }
});
