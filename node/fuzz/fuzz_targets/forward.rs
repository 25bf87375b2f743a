//! Mesh-forwarded requests and their replies (`TAG_FORWARD`: `node_core::api::Request` and
//! `Reply` as JSON, decoded by `node::driver`): never a panic, and whatever decodes encodes
//! back to the same value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use node_core::api::{Reply, Request};

fuzz_target!(|data: &[u8]| {
    let Some((which, json)) = data.split_first() else { return };
    if which % 2 == 0 {
        if let Ok(request) = serde_json::from_slice::<Request>(json) {
            let again = serde_json::to_vec(&request).expect("requests serialize");
            assert_eq!(serde_json::from_slice::<Request>(&again).expect("own output decodes"), request);
            let _ = (request.route(), request.holds());
        }
    } else if let Ok(reply) = serde_json::from_slice::<Reply>(json) {
        let again = serde_json::to_vec(&reply).expect("replies serialize");
        assert_eq!(serde_json::from_slice::<Reply>(&again).expect("own output decodes"), reply);
    }
});
