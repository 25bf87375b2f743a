//! The on-disk encoding of events: one place, versioned by its first byte.
//!
//! Layout of format 2, written now (integers big-endian):
//! `[2][crc: 4][id: 16][version: 8][time_ms: 8][kind_len: 2][kind][from_len: 2][from][data_len: 4][data]`,
//! where `crc` is the CRC-32C of the stream name followed by everything after the checksum.
//! The stream name is not repeated in the value (it is part of the key), but the checksum
//! covers it, so a record under another stream's key fails too. Format 1 is format 2 without
//! the checksum; it is still read.
//!
//! A record that fails its checksum or does not decode is `StoreError::Corrupt`: never
//! served. The node then repairs its copy from a replica (`node::damage`).

use crate::crc::{crc32c, crc32c_extend};
use crate::{Event, EventId, StoreError, StreamName, Version};

const FORMAT_1: u8 = 1;
const FORMAT_2: u8 = 2;
const CRC_AT: std::ops::Range<usize> = 1..5;

pub fn encode_event(event: &Event) -> Vec<u8> {
    let mut out = Vec::with_capacity(49 + event.kind.len() + event.from.len() + event.data.len());
    out.push(FORMAT_2);
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&event.id.0.to_be_bytes());
    out.extend_from_slice(&event.version.0.to_be_bytes());
    out.extend_from_slice(&event.time_ms.to_be_bytes());
    put_str16(&mut out, &event.kind);
    put_str16(&mut out, &event.from);
    let data_len = u32::try_from(event.data.len()).expect("event data is bounded by the request limit");
    out.extend_from_slice(&data_len.to_be_bytes());
    out.extend_from_slice(event.data.as_bytes());
    let crc = crc32c_extend(crc32c(event.stream.as_str().as_bytes()), &out[CRC_AT.end..]);
    out[CRC_AT].copy_from_slice(&crc.to_be_bytes());
    out
}

fn put_str16(out: &mut Vec<u8>, text: &str) {
    let len = u16::try_from(text.len()).expect("kinds and senders are short");
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(text.as_bytes());
}

pub fn decode_event(stream: &StreamName, bytes: &[u8]) -> Result<Event, StoreError> {
    let mut reader = Reader { bytes, at: 0 };
    match reader.take(1)?[0] {
        FORMAT_1 => {}
        FORMAT_2 => {
            let stored = u32::from_be_bytes(reader.array()?);
            let crc = crc32c_extend(crc32c(stream.as_str().as_bytes()), &bytes[CRC_AT.end..]);
            if crc != stored {
                return Err(StoreError::Corrupt(format!("checksum mismatch in an event of {stream}")));
            }
        }
        format => return Err(StoreError::Corrupt(format!("unknown event format {format}"))),
    }
    let id = EventId(u128::from_be_bytes(reader.array()?));
    let version = Version(u64::from_be_bytes(reader.array()?));
    let time_ms = u64::from_be_bytes(reader.array()?);
    let kind_len = usize::from(u16::from_be_bytes(reader.array()?));
    let kind = reader.string(kind_len)?;
    let from_len = usize::from(u16::from_be_bytes(reader.array()?));
    let from = reader.string(from_len)?;
    let data_len = u32::from_be_bytes(reader.array()?) as usize;
    let data = reader.string(data_len)?;
    if reader.at != bytes.len() {
        return Err(StoreError::Corrupt("trailing bytes after event".into()));
    }
    Ok(Event { id, stream: stream.clone(), version, kind, from, time_ms, data })
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, len: usize) -> Result<&'a [u8], StoreError> {
        let end = self.at.checked_add(len).filter(|end| *end <= self.bytes.len());
        let end = end.ok_or_else(|| StoreError::Corrupt("event record is truncated".into()))?;
        let slice = &self.bytes[self.at..end];
        self.at = end;
        Ok(slice)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], StoreError> {
        Ok(self.take(N)?.try_into().expect("take returns exactly N bytes"))
    }

    fn string(&mut self, len: usize) -> Result<String, StoreError> {
        let bytes = self.take(len)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| StoreError::Corrupt("event text is not UTF-8".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_truncation() {
        let stream = StreamName::new("feed:alice").unwrap();
        let event = Event {
            id: EventId(7),
            stream: stream.clone(),
            version: Version(3),
            kind: "feed.flirt".into(),
            from: "bob".into(),
            time_ms: 99,
            data: r#"{"x":"ü"}"#.into(),
        };
        let bytes = encode_event(&event);
        assert_eq!(decode_event(&stream, &bytes), Ok(event));
        for cut in 0..bytes.len() {
            assert!(decode_event(&stream, &bytes[..cut]).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn every_flipped_bit_and_foreign_key_is_corrupt() {
        let stream = StreamName::new("chat:alice:bob").unwrap();
        let event = Event {
            id: EventId(u128::MAX - 5),
            stream: stream.clone(),
            version: Version(41),
            kind: "chat.message".into(),
            from: "alice".into(),
            time_ms: 1_790_000_000_000,
            data: r#"{"text":"hi"}"#.into(),
        };
        let bytes = encode_event(&event);
        for bit in 0..bytes.len() * 8 {
            let mut flipped = bytes.clone();
            flipped[bit / 8] ^= 1 << (bit % 8);
            assert!(
                matches!(decode_event(&stream, &flipped), Err(StoreError::Corrupt(_))),
                "bit {bit} flipped went unnoticed"
            );
        }
        let other = StreamName::new("chat:alice:eve").unwrap();
        assert!(matches!(decode_event(&other, &bytes), Err(StoreError::Corrupt(_))));
    }

    #[test]
    fn format_1_records_still_read() {
        let stream = StreamName::new("feed:alice").unwrap();
        let event = Event {
            id: EventId(9),
            stream: stream.clone(),
            version: Version(1),
            kind: "k".into(),
            from: "f".into(),
            time_ms: 5,
            data: "{}".into(),
        };
        let mut old = encode_event(&event);
        old.drain(CRC_AT);
        old[0] = FORMAT_1;
        assert_eq!(decode_event(&stream, &old), Ok(event));
    }
}
