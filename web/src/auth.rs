//! Browser and service tokens: HS256 JWTs with the site's secret, nothing else.
//!
//! We verify by hand rather than through a general JWT library so that exactly one algorithm
//! is ever accepted (`alg` must be `HS256`; `none` and asymmetric algorithms are refused), `exp`
//! is required and checked with no leeway, and `sub` must be a valid user id.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use serde::Deserialize;
use sha2::Sha256;

/// Longest token accepted, in bytes.
pub const TOKEN_LEN_MAX: usize = 2048;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claims {
    /// The user id (or service name).
    pub sub: String,
    /// Expiry, seconds since the Unix epoch.
    pub exp: u64,
    /// A service token may use the generic stream API and set flags.
    pub svc: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("the token is malformed")]
    Malformed,
    #[error("the token's signature or algorithm is not accepted")]
    BadSignature,
    #[error("the token has expired")]
    Expired,
    #[error("the token's subject is not a valid user id")]
    BadSubject,
}

pub fn mint(secret: &[u8], claims: &Claims) -> String {
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
    let mut body = serde_json::json!({ "sub": claims.sub, "exp": claims.exp });
    if claims.svc {
        body["svc"] = true.into();
    }
    let payload = URL_SAFE_NO_PAD.encode(body.to_string());
    let signing_input = format!("{header}.{payload}");
    let signature = URL_SAFE_NO_PAD.encode(sign(secret, signing_input.as_bytes()));
    format!("{signing_input}.{signature}")
}

fn sign(secret: &[u8], input: &[u8]) -> [u8; 32] {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(input);
    mac.finalize().into_bytes().into()
}

#[derive(Deserialize)]
struct Header {
    alg: String,
    crit: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct Body {
    sub: String,
    exp: f64,
    #[serde(default)]
    svc: bool,
}

pub fn verify(secret: &[u8], token: &str, now_secs: u64) -> Result<Claims, AuthError> {
    if token.len() > TOKEN_LEN_MAX {
        return Err(AuthError::Malformed);
    }
    let mut parts = token.split('.');
    let (Some(header), Some(payload), Some(signature), None) = (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(AuthError::Malformed);
    };
    let decode = |part: &str| URL_SAFE_NO_PAD.decode(part).map_err(|_| AuthError::Malformed);
    // Header and claims must be UTF-8 JSON (RFC 7519, 7.2): `serde_json::from_slice` skips
    // the fields it ignores without checking their UTF-8 (found by the `token` fuzz target).
    let json = |bytes: Vec<u8>| String::from_utf8(bytes).map_err(|_| AuthError::Malformed);
    let parsed: Header = serde_json::from_str(&json(decode(header)?)?).map_err(|_| AuthError::Malformed)?;
    if parsed.alg != "HS256" || parsed.crit.is_some() {
        return Err(AuthError::BadSignature);
    }
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(&token.as_bytes()[..header.len() + 1 + payload.len()]);
    mac.verify_slice(&decode(signature)?).map_err(|_| AuthError::BadSignature)?;
    let body: Body = serde_json::from_str(&json(decode(payload)?)?).map_err(|_| AuthError::Malformed)?;
    if !body.exp.is_finite() || body.exp <= now_secs as f64 {
        return Err(AuthError::Expired);
    }
    if !node_core::social::valid_user(&body.sub) {
        return Err(AuthError::BadSubject);
    }
    Ok(Claims { sub: body.sub, exp: body.exp as u64, svc: body.svc })
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_763_776_800;

    fn claims(sub: &str, exp: u64) -> Claims {
        Claims { sub: sub.into(), exp, svc: false }
    }

    fn forge(header: impl AsRef<[u8]>, payload: impl AsRef<[u8]>, secret: &[u8]) -> String {
        let input = format!("{}.{}", URL_SAFE_NO_PAD.encode(header), URL_SAFE_NO_PAD.encode(payload));
        format!("{input}.{}", URL_SAFE_NO_PAD.encode(sign(secret, input.as_bytes())))
    }

    #[test]
    fn verify_table() {
        let good = mint(b"s", &claims("alice", NOW + 60));
        let check = |token: &str, expected: Result<&str, AuthError>| {
            assert_eq!(verify(b"s", token, NOW).map(|c| c.sub), expected.map(String::from), "{token}");
        };
        check(&good, Ok("alice"));
        check(&mint(b"other", &claims("alice", NOW + 60)), Err(AuthError::BadSignature));
        check(&mint(b"s", &claims("alice", NOW)), Err(AuthError::Expired));
        check(&mint(b"s", &claims("al ice", NOW + 60)), Err(AuthError::BadSubject));
        check("", Err(AuthError::Malformed));
        check("a.b", Err(AuthError::Malformed));
        check(&format!("{good}.x"), Err(AuthError::Malformed));
        let unsigned = format!(
            "{}.{}.",
            URL_SAFE_NO_PAD.encode(r#"{"alg":"none"}"#),
            URL_SAFE_NO_PAD.encode(r#"{"sub":"alice","exp":9999999999}"#)
        );
        check(&unsigned, Err(AuthError::BadSignature));
        check(&forge(r#"{"alg":"HS512"}"#, r#"{"sub":"alice","exp":9999999999}"#, b"s"), Err(AuthError::BadSignature));
        check(&forge(r#"{"alg":"HS256"}"#, r#"{"sub":"alice"}"#, b"s"), Err(AuthError::Malformed));
        // The `token` fuzz target's input `crash-06ef8179…`: a signed header whose ignored
        // `typ` held a byte that is not UTF-8 was accepted.
        check(
            &forge(b"{\"alg\":\"HS256\",\"typ\":\"JW\xad\"}", r#"{"sub":"alice","exp":9999999999}"#, b"s"),
            Err(AuthError::Malformed),
        );
        check(
            &forge(r#"{"alg":"HS256"}"#, b"{\"sub\":\"alice\",\"exp\":9999999999,\"x\":\"\xff\"}", b"s"),
            Err(AuthError::Malformed),
        );
        let svc = mint(b"s", &Claims { sub: "backend".into(), exp: NOW + 1, svc: true });
        assert!(verify(b"s", &svc, NOW).unwrap().svc);
    }
}
