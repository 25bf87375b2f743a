//! The on-disk encoding of events: one place, versioned by its first byte.
//!
//! Layout of format 1 (integers big-endian):
//! `[1][id: 16][version: 8][time_ms: 8][kind_len: 2][kind][from_len: 2][from][data_len: 4][data]`.
//! The stream name is not repeated in the value; it is part of the key.

use crate::{Event, EventId, StoreError, StreamName, Version};

const FORMAT_1: u8 = 1;

pub fn encode_event(event: &Event) -> Vec<u8> {
    let mut out = Vec::with_capacity(45 + event.kind.len() + event.from.len() + event.data.len());
    out.push(FORMAT_1);
    out.extend_from_slice(&event.id.0.to_be_bytes());
    out.extend_from_slice(&event.version.0.to_be_bytes());
    out.extend_from_slice(&event.time_ms.to_be_bytes());
    put_str16(&mut out, &event.kind);
    put_str16(&mut out, &event.from);
    let data_len = u32::try_from(event.data.len()).expect("event data is bounded by the request limit");
    out.extend_from_slice(&data_len.to_be_bytes());
    out.extend_from_slice(event.data.as_bytes());
    out
}

fn put_str16(out: &mut Vec<u8>, text: &str) {
    let len = u16::try_from(text.len()).expect("kinds and senders are short");
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(text.as_bytes());
}

pub fn decode_event(stream: &StreamName, bytes: &[u8]) -> Result<Event, StoreError> {
    let mut reader = Reader { bytes, at: 0 };
    let format = reader.take(1)?[0];
    if format != FORMAT_1 {
        return Err(StoreError::Corrupt(format!("unknown event format {format}")));
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
}
