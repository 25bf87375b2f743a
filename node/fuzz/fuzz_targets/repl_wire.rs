//! The replication wire decoder (`node_core::repl::decode_msgs`): what a peer's `TAG_REPL`
//! frame carries. Never panics; whatever decodes encodes back to the same messages.
#![no_main]

use libfuzzer_sys::fuzz_target;
use node_core::repl::{decode_msgs, encode_msgs};

fuzz_target!(|data: &[u8]| {
    if let Ok(msgs) = decode_msgs(data) {
        let again = encode_msgs(&msgs);
        assert_eq!(decode_msgs(&again).as_ref(), Ok(&msgs), "encode then decode changes the messages");
        // Canonical bytes are a fixed point.
        assert_eq!(encode_msgs(&decode_msgs(&again).expect("decoded once")), again);
    }
});
