//! The on-disk event codec (`store::decode_event`): what RocksDB and the replication log
//! hand back. Never panics; what decodes encodes back to an event that decodes the same, and
//! a record of the current format (2, with its checksum) is canonical: decode then encode
//! gives the same bytes. Format 1 (no checksum) is read, never written.
#![no_main]

use libfuzzer_sys::fuzz_target;
use store::{decode_event, encode_event, StreamName};

fuzz_target!(|data: &[u8]| {
    let stream = StreamName::new("chat:alice:bob").expect("valid");
    if let Ok(event) = decode_event(&stream, data) {
        let encoded = encode_event(&event);
        assert_eq!(decode_event(&stream, &encoded).as_ref(), Ok(&event), "what is written reads back");
        if data.first() == Some(&2) {
            assert_eq!(encoded, data, "the event encoding is canonical");
        }
    }
});
