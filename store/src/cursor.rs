//! Sync cursors: a user's position in their own streams, sealed with a MAC.
//!
//! A cursor holds the versions a browser has seen of `inbox:{user}`, `feed:{user}` and
//! `sys:flags`, the history generation, and the stamp of the last signal it delivered (so
//! short-lived signals such as typing are not delivered twice). It stays small however many
//! conversations the user has. The MAC (HMAC-SHA256, truncated to 16 bytes) is keyed with the
//! cluster's secret and covers the user id, so a cursor from another cluster does not decode
//! and one from another user decodes to a different `user` (the caller answers 403).

use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::Version;

const CURSOR_FORMAT_1: u8 = 1;
const MAC_LEN: usize = 16;
/// Longest encoded cursor accepted, in characters; longer input is rejected before decoding.
pub const CURSOR_TEXT_LEN_MAX: usize = 256;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SyncCursor {
    pub user: String,
    pub generation: u64,
    pub inbox: Version,
    pub feed: Version,
    pub flags: Version,
    /// The stamp of the last signal delivered (signal stamps are microseconds since the Unix
    /// epoch, made unique per node), so short-lived signals are not delivered twice.
    pub signals_after: u64,
}

impl SyncCursor {
    /// The opaque, URL-safe text form.
    pub fn seal(&self, key: &[u8]) -> String {
        let mut body = vec![CURSOR_FORMAT_1];
        for n in [self.generation, self.inbox.0, self.feed.0, self.flags.0, self.signals_after] {
            body.extend_from_slice(&n.to_be_bytes());
        }
        body.extend_from_slice(self.user.as_bytes());
        let tag = mac(key, &body);
        body.extend_from_slice(&tag);
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(body)
    }

    /// Decodes and authenticates a cursor. `None` for anything that is not a cursor this
    /// cluster made; the caller answers with `reset`.
    pub fn open(key: &[u8], text: &str) -> Option<SyncCursor> {
        if text.len() > CURSOR_TEXT_LEN_MAX {
            return None;
        }
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(text).ok()?;
        if bytes.len() < 1 + 5 * 8 + MAC_LEN || bytes[0] != CURSOR_FORMAT_1 {
            return None;
        }
        let (body, tag) = bytes.split_at(bytes.len() - MAC_LEN);
        let mut verifier = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
        verifier.update(body);
        verifier.verify_truncated_left(tag).ok()?;
        let number = |i: usize| u64::from_be_bytes(body[1 + 8 * i..9 + 8 * i].try_into().expect("8 bytes"));
        Some(SyncCursor {
            generation: number(0),
            inbox: Version(number(1)),
            feed: Version(number(2)),
            flags: Version(number(3)),
            signals_after: number(4),
            user: String::from_utf8(body[41..].to_vec()).ok()?,
        })
    }
}

fn mac(key: &[u8], body: &[u8]) -> [u8; MAC_LEN] {
    let mut signer = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
    signer.update(body);
    signer.finalize().into_bytes()[..MAC_LEN].try_into().expect("16 of 32 bytes")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cursor(user: &str) -> SyncCursor {
        SyncCursor {
            user: user.into(),
            generation: 1,
            inbox: Version(5),
            feed: Version(9),
            flags: Version(0),
            signals_after: 1_763_776_800_000,
        }
    }

    #[test]
    fn seal_open() {
        let text = cursor("alice").seal(b"k1");
        assert_eq!(SyncCursor::open(b"k1", &text), Some(cursor("alice")));
        assert_eq!(SyncCursor::open(b"other cluster", &text), None);
        let check_rejected = |text: &str| assert_eq!(SyncCursor::open(b"k1", text), None, "{text:?}");
        check_rejected("");
        check_rejected("not base64 !!");
        check_rejected(&text[..text.len() - 2]);
        check_rejected(&"A".repeat(300));
        let mut flipped = text.into_bytes();
        flipped[10] = if flipped[10] == b'A' { b'B' } else { b'A' };
        check_rejected(std::str::from_utf8(&flipped).unwrap());
    }
}
