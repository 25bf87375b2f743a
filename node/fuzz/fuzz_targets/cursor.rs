//! Sync cursors (`store::cursor::SyncCursor::open`): the `since` text a browser sends back.
//! First byte even: the rest is cursor text, which never panics and, if it opens, seals back
//! to itself. Odd: five big-endian u64 fields and a user, sealed; they open to the same
//! fields whenever the text is within the accepted length.
#![no_main]

use griddle_fuzz::SECRET;
use libfuzzer_sys::fuzz_target;
use store::cursor::{SyncCursor, CURSOR_TEXT_LEN_MAX};
use store::Version;

fuzz_target!(|data: &[u8]| {
    let Some((mode, rest)) = data.split_first() else { return };
    if mode % 2 == 0 {
        let Ok(text) = std::str::from_utf8(rest) else { return };
        if let Some(cursor) = SyncCursor::open(SECRET, text) {
            assert_eq!(cursor.seal(SECRET), text, "a cursor has one text form");
        }
        assert_eq!(SyncCursor::open(b"another cluster", text), None);
        return;
    }
    if rest.len() < 40 {
        return;
    }
    let number = |i: usize| u64::from_be_bytes(rest[8 * i..8 * i + 8].try_into().expect("8 bytes"));
    let cursor = SyncCursor {
        user: String::from_utf8_lossy(&rest[40..]).into_owned(),
        generation: number(0),
        inbox: Version(number(1)),
        feed: Version(number(2)),
        flags: Version(number(3)),
        signals_after: number(4),
    };
    let text = cursor.seal(SECRET);
    let expected = (text.len() <= CURSOR_TEXT_LEN_MAX).then(|| cursor.clone());
    assert_eq!(SyncCursor::open(SECRET, &text), expected);
});
