//! Any bytes as a sync request body: decoding, validation and the reference
//! model's exchange must never panic, and a body that decodes re-encodes to
//! a request that decodes to the same value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tide_core::{Limits, Model, SyncRequest};

fuzz_target!(|body: &[u8]| {
    let Ok(request) = SyncRequest::from_json(body) else { return };
    let again = SyncRequest::from_json(&serde_json::to_vec(&request).expect("requests serialize")).expect("re-decodes");
    assert_eq!(again, request);
    let limits = Limits::default();
    if limits.check_request(&request).is_ok() {
        let _ = Model::new(limits).exchange(&request);
    }
});
