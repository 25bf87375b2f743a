//! The JWT verifier (`web::auth::verify`): the `Authorization: Bearer` text of every call.
//! The first byte picks a mode: 0, raw token text, which never panics and never passes
//! without our signature; 1, header and payload (split at the first 0xff byte, never in
//! UTF-8) signed with the secret, which pass only as HS256, unexpired, with a valid subject;
//! 2, claims (`exp` as 8 bytes, `svc`, then `sub`) minted and verified back to themselves.
#![no_main]

use std::collections::BTreeMap;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use griddle_fuzz::{NOW_SECS, SECRET};
use hmac::{Hmac, Mac};
use libfuzzer_sys::fuzz_target;
use node_core::social::valid_user;
use serde_json::value::RawValue;
use sha2::Sha256;
use web::auth::{mint, verify, AuthError, Claims, TOKEN_LEN_MAX};

fn sign(header: &[u8], payload: &[u8]) -> String {
    let input = format!("{}.{}", URL_SAFE_NO_PAD.encode(header), URL_SAFE_NO_PAD.encode(payload));
    let mut mac = Hmac::<Sha256>::new_from_slice(SECRET).expect("any key length");
    mac.update(input.as_bytes());
    format!("{input}.{}", URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes()))
}

fn check_accepted(result: &Result<Claims, AuthError>) {
    if let Ok(claims) = result {
        assert!(claims.exp > NOW_SECS && valid_user(&claims.sub), "{claims:?}");
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((mode, rest)) = data.split_first() else { return };
    match mode % 3 {
        0 => {
            let Ok(token) = std::str::from_utf8(rest) else { return };
            let result = verify(SECRET, token, NOW_SECS);
            check_accepted(&result);
            if result.is_ok() {
                assert!(verify(b"another secret", token, NOW_SECS).is_err(), "only our secret signs");
            }
        }
        1 => {
            let split = rest.iter().position(|b| *b == 0xff).unwrap_or(rest.len());
            let (header, payload) = (&rest[..split], rest.get(split + 1..).unwrap_or_default());
            let result = verify(SECRET, &sign(header, payload), NOW_SECS);
            check_accepted(&result);
            if result.is_ok() {
                // JSON's grammar puts no bound on numbers, so parse the header as raw values
                // (serde_json's `Value` refuses numbers beyond f64's range, which verify,
                // like RFC 8259, may ignore).
                let text = std::str::from_utf8(header).expect("an accepted header is UTF-8");
                let fields: BTreeMap<String, &RawValue> =
                    serde_json::from_str(text).expect("an accepted header is JSON");
                assert_eq!(fields.get("alg").map(|alg| alg.get()), Some(r#""HS256""#), "only HS256 is accepted");
            }
        }
        _ => {
            let Some((exp, rest)) = rest.split_first_chunk::<8>() else { return };
            let Some((svc, sub)) = rest.split_first() else { return };
            // `exp` travels as a JSON number and is read as f64: exact below 2^53, as JWT
            // dates are.
            let exp = u64::from_be_bytes(*exp) % (1 << 53);
            let claims = Claims { sub: String::from_utf8_lossy(sub).into_owned(), exp, svc: svc % 2 == 1 };
            let token = mint(SECRET, &claims);
            let expected = if token.len() > TOKEN_LEN_MAX {
                Err(AuthError::Malformed)
            } else if exp <= NOW_SECS {
                Err(AuthError::Expired)
            } else if !valid_user(&claims.sub) {
                Err(AuthError::BadSubject)
            } else {
                Ok(claims)
            };
            assert_eq!(verify(SECRET, &token, NOW_SECS), expected);
        }
    }
});
