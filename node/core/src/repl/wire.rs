//! The binary encoding of replication messages and log entries: one place, versioned by
//! the first byte. Integers are big-endian; strings and byte strings carry a u32 length.
//! Decoding never panics: a short or malformed input is an error.

use store::{decode_event, encode_event, Event, StreamName, WriteBatch};

use super::{Conf, Entry, Epoch, LogId, Member, Msg, Payload};

const FORMAT: u8 = 1;
/// A stored log entry: `[2][crc32c of the rest: 4][entry]`. Entries of format 1 (no checksum)
/// are still read.
const ENTRY_CHECKED: u8 = 2;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed replication record: {0}")]
pub struct Malformed(pub &'static str);

#[derive(Default)]
struct Writer(Vec<u8>);

impl Writer {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }
    fn bytes(&mut self, v: &[u8]) {
        self.u32(u32::try_from(v.len()).expect("records are far below 4 GiB"));
        self.0.extend_from_slice(v);
    }
    fn str(&mut self, v: &str) {
        self.bytes(v.as_bytes());
    }
    fn epoch(&mut self, e: &Epoch) {
        self.u64(e.counter);
        self.str(&e.node);
    }
    fn log_id(&mut self, id: &LogId) {
        self.epoch(&id.epoch);
        self.u64(id.index);
    }
    fn conf(&mut self, conf: &Conf) {
        self.u32(conf.members.len() as u32);
        for m in &conf.members {
            self.str(&m.node);
            self.u64(m.storage);
            self.u8(u8::from(m.voter));
        }
    }
    fn entry(&mut self, entry: &Entry) {
        self.epoch(&entry.epoch);
        match &entry.payload {
            Payload::Conf { conf, start } => {
                self.u8(if *start { 1 } else { 2 });
                self.conf(conf);
            }
            Payload::Data(batch) => {
                self.u8(3);
                self.u32(batch.events.len() as u32);
                for event in &batch.events {
                    self.str(event.stream.as_str());
                    self.bytes(&encode_event(event));
                }
                self.u32(batch.meta.len() as u32);
                for (key, value) in &batch.meta {
                    self.bytes(key);
                    match value {
                        Some(value) => {
                            self.u8(1);
                            self.bytes(value);
                        }
                        None => self.u8(0),
                    }
                }
            }
        }
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, len: usize) -> Result<&'a [u8], Malformed> {
        let end = self.at.checked_add(len).filter(|end| *end <= self.bytes.len()).ok_or(Malformed("truncated"))?;
        let out = &self.bytes[self.at..end];
        self.at = end;
        Ok(out)
    }
    fn u8(&mut self) -> Result<u8, Malformed> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, Malformed> {
        Ok(u32::from_be_bytes(self.take(4)?.try_into().expect("four bytes")))
    }
    fn u64(&mut self) -> Result<u64, Malformed> {
        Ok(u64::from_be_bytes(self.take(8)?.try_into().expect("eight bytes")))
    }
    fn bytes(&mut self) -> Result<&'a [u8], Malformed> {
        let len = self.u32()? as usize;
        self.take(len)
    }
    fn str(&mut self) -> Result<String, Malformed> {
        String::from_utf8(self.bytes()?.to_vec()).map_err(|_| Malformed("text is not UTF-8"))
    }
    /// A count of items that each take at least `min_len` bytes, checked against what is left.
    fn count(&mut self, min_len: usize) -> Result<usize, Malformed> {
        let count = self.u32()? as usize;
        if count.saturating_mul(min_len) > self.bytes.len() - self.at {
            return Err(Malformed("count beyond the record"));
        }
        Ok(count)
    }
    fn epoch(&mut self) -> Result<Epoch, Malformed> {
        Ok(Epoch { counter: self.u64()?, node: self.str()? })
    }
    fn log_id(&mut self) -> Result<LogId, Malformed> {
        Ok(LogId { epoch: self.epoch()?, index: self.u64()? })
    }
    fn conf(&mut self) -> Result<Conf, Malformed> {
        let count = self.count(13)?;
        let mut members = Vec::with_capacity(count);
        for _ in 0..count {
            members.push(Member { node: self.str()?, storage: self.u64()?, voter: self.u8()? == 1 });
        }
        Ok(Conf { members })
    }
    fn entry(&mut self) -> Result<Entry, Malformed> {
        let epoch = self.epoch()?;
        let payload = match self.u8()? {
            kind @ (1 | 2) => Payload::Conf { conf: self.conf()?, start: kind == 1 },
            3 => {
                let count = self.count(8)?;
                let mut events: Vec<Event> = Vec::with_capacity(count);
                for _ in 0..count {
                    let stream = StreamName::new(self.str()?).map_err(|_| Malformed("stream name"))?;
                    let event = decode_event(&stream, self.bytes()?).map_err(|_| Malformed("event"))?;
                    events.push(event);
                }
                let count = self.count(5)?;
                let mut meta = Vec::with_capacity(count);
                for _ in 0..count {
                    let key = self.bytes()?.to_vec();
                    let value = match self.u8()? {
                        0 => None,
                        _ => Some(self.bytes()?.to_vec()),
                    };
                    meta.push((key, value));
                }
                Payload::Data(WriteBatch { events, meta })
            }
            _ => return Err(Malformed("entry kind")),
        };
        Ok(Entry { epoch, payload })
    }
    fn done<T>(self, value: T) -> Result<T, Malformed> {
        if self.at == self.bytes.len() {
            Ok(value)
        } else {
            Err(Malformed("trailing bytes"))
        }
    }
}

fn encode_with(write: impl FnOnce(&mut Writer)) -> Vec<u8> {
    let mut w = Writer::default();
    write(&mut w);
    w.0
}

/// Reads one value that must fill `bytes` exactly.
fn decode_whole<T>(bytes: &[u8], read: impl FnOnce(&mut Reader<'_>) -> Result<T, Malformed>) -> Result<T, Malformed> {
    let mut r = Reader { bytes, at: 0 };
    let value = read(&mut r)?;
    r.done(value)
}

/// A log entry as stored on disk, with a checksum.
pub fn encode_entry(entry: &Entry) -> Vec<u8> {
    let mut out = encode_with(|w| {
        w.u8(ENTRY_CHECKED);
        w.u32(0);
        w.entry(entry);
    });
    let crc = store::crc32c(&out[5..]);
    out[1..5].copy_from_slice(&crc.to_be_bytes());
    out
}

/// A stored log entry; a checksum mismatch is `Malformed("checksum")`: never used.
pub fn decode_entry(bytes: &[u8]) -> Result<Entry, Malformed> {
    decode_whole(bytes, |r| match r.u8()? {
        FORMAT => r.entry(),
        ENTRY_CHECKED => {
            let stored = r.u32()?;
            if bytes.get(5..).map(store::crc32c) != Some(stored) {
                return Err(Malformed("checksum"));
            }
            r.entry()
        }
        _ => Err(Malformed("format")),
    })
}

pub fn encode_epoch(epoch: &Epoch) -> Vec<u8> {
    encode_with(|w| w.epoch(epoch))
}

pub fn decode_epoch(bytes: &[u8]) -> Result<Epoch, Malformed> {
    decode_whole(bytes, |r| r.epoch())
}

pub fn encode_log_id(id: &LogId) -> Vec<u8> {
    encode_with(|w| w.log_id(id))
}

pub fn decode_log_id(bytes: &[u8]) -> Result<LogId, Malformed> {
    decode_whole(bytes, |r| r.log_id())
}

pub fn encode_conf(conf: &Conf) -> Vec<u8> {
    encode_with(|w| w.conf(conf))
}

pub fn decode_conf(bytes: &[u8]) -> Result<Conf, Malformed> {
    decode_whole(bytes, |r| r.conf())
}

/// Several messages to one peer in one frame.
pub fn encode_msgs(msgs: &[Msg]) -> Vec<u8> {
    let mut w = Writer::default();
    w.u8(FORMAT);
    w.u32(msgs.len() as u32);
    for msg in msgs {
        encode_msg(&mut w, msg);
    }
    w.0
}

pub fn decode_msgs(bytes: &[u8]) -> Result<Vec<Msg>, Malformed> {
    let mut r = Reader { bytes, at: 0 };
    if r.u8()? != FORMAT {
        return Err(Malformed("format"));
    }
    let count = r.count(5)?;
    let mut msgs = Vec::with_capacity(count);
    for _ in 0..count {
        msgs.push(decode_msg(&mut r)?);
    }
    r.done(msgs)
}

fn encode_msg(w: &mut Writer, msg: &Msg) {
    match msg {
        Msg::Prepare { part, epoch } => {
            w.u8(1);
            w.u32(*part);
            w.epoch(epoch);
        }
        Msg::Promise { part, epoch, storage, last, commit, established, seen } => {
            w.u8(2);
            w.u32(*part);
            w.epoch(epoch);
            w.u64(*storage);
            w.log_id(last);
            w.u64(*commit);
            w.u8(u8::from(*established));
            w.u32(seen.len() as u32);
            seen.iter().for_each(|n| w.str(n));
        }
        Msg::Refuse { part, promised, outsider } => {
            w.u8(3);
            w.u32(*part);
            w.epoch(promised);
            w.u8(u8::from(*outsider));
        }
        Msg::Fetch { part, epoch, from } => {
            w.u8(4);
            w.u32(*part);
            w.epoch(epoch);
            w.u64(*from);
        }
        Msg::Entries { part, epoch, from, entries, last } => {
            w.u8(5);
            w.u32(*part);
            w.epoch(epoch);
            w.u64(*from);
            w.u32(entries.len() as u32);
            entries.iter().for_each(|e| w.entry(e));
            w.log_id(last);
        }
        Msg::Append { part, epoch, prev, entries, commit } => {
            w.u8(6);
            w.u32(*part);
            w.epoch(epoch);
            w.log_id(prev);
            w.u32(entries.len() as u32);
            entries.iter().for_each(|e| w.entry(e));
            w.u64(*commit);
        }
        Msg::Ack { part, epoch, storage, matched } => {
            w.u8(7);
            w.u32(*part);
            w.epoch(epoch);
            w.u64(*storage);
            w.u64(*matched);
        }
        Msg::Heartbeat { part, epoch, round } => {
            w.u8(9);
            w.u32(*part);
            w.epoch(epoch);
            w.u64(*round);
        }
        Msg::HeartbeatAck { part, epoch, storage, round } => {
            w.u8(10);
            w.u32(*part);
            w.epoch(epoch);
            w.u64(*storage);
            w.u64(*round);
        }
        Msg::Nack { part, epoch, storage, commit } => {
            w.u8(8);
            w.u32(*part);
            w.epoch(epoch);
            w.u64(*storage);
            w.u64(*commit);
        }
    }
}

fn decode_msg(r: &mut Reader<'_>) -> Result<Msg, Malformed> {
    let kind = r.u8()?;
    let part = r.u32()?;
    let epoch = r.epoch()?;
    Ok(match kind {
        1 => Msg::Prepare { part, epoch },
        2 => Msg::Promise {
            part,
            epoch,
            storage: r.u64()?,
            last: r.log_id()?,
            commit: r.u64()?,
            established: r.u8()? == 1,
            seen: {
                let count = r.count(4)?;
                (0..count).map(|_| r.str()).collect::<Result<_, _>>()?
            },
        },
        3 => Msg::Refuse { part, promised: epoch, outsider: r.u8()? == 1 },
        4 => Msg::Fetch { part, epoch, from: r.u64()? },
        5 => {
            let from = r.u64()?;
            let count = r.count(13)?;
            let entries = (0..count).map(|_| r.entry()).collect::<Result<_, _>>()?;
            Msg::Entries { part, epoch, from, entries, last: r.log_id()? }
        }
        6 => {
            let prev = r.log_id()?;
            let count = r.count(13)?;
            let entries = (0..count).map(|_| r.entry()).collect::<Result<_, _>>()?;
            Msg::Append { part, epoch, prev, entries, commit: r.u64()? }
        }
        7 => Msg::Ack { part, epoch, storage: r.u64()?, matched: r.u64()? },
        8 => Msg::Nack { part, epoch, storage: r.u64()?, commit: r.u64()? },
        9 => Msg::Heartbeat { part, epoch, round: r.u64()? },
        10 => Msg::HeartbeatAck { part, epoch, storage: r.u64()?, round: r.u64()? },
        _ => return Err(Malformed("message kind")),
    })
}

#[cfg(test)]
mod tests {
    use store::{Event, EventId, StreamName, Version, WriteBatch};

    use super::*;

    fn epoch(counter: u64, node: &str) -> Epoch {
        Epoch { counter, node: node.into() }
    }

    fn data_entry() -> Entry {
        let event = Event {
            id: EventId(42),
            stream: StreamName::new("chat:a:b").unwrap(),
            version: Version(7),
            kind: "message".into(),
            from: "a".into(),
            time_ms: 1_700_000_000_000,
            data: r#"{"text":"hi"}"#.into(),
        };
        let meta = vec![(b"copy:x".to_vec(), Some(Vec::new())), (b"gone".to_vec(), None)];
        Entry { epoch: epoch(3, "n1"), payload: Payload::Data(WriteBatch { events: vec![event], meta }) }
    }

    #[test]
    fn a_stored_entry_with_any_bit_flipped_is_refused() {
        let entry = data_entry();
        let bytes = encode_entry(&entry);
        assert_eq!(decode_entry(&bytes), Ok(entry));
        for bit in 0..bytes.len() * 8 {
            let mut flipped = bytes.clone();
            flipped[bit / 8] ^= 1 << (bit % 8);
            assert!(decode_entry(&flipped).is_err(), "bit {bit} flipped went unnoticed");
        }
    }

    #[test]
    fn messages_round_trip() {
        let conf = Conf {
            members: vec![
                Member { node: "n1".into(), storage: 9, voter: true },
                Member { node: "n2".into(), storage: 0, voter: false },
            ],
        };
        let start = Entry { epoch: epoch(4, "n2"), payload: Payload::Conf { conf, start: true } };
        let last = LogId { epoch: epoch(4, "n2"), index: 12 };
        let msgs = vec![
            Msg::Prepare { part: 1, epoch: epoch(5, "n3") },
            Msg::Promise {
                part: 1,
                epoch: epoch(5, "n3"),
                storage: 77,
                last: last.clone(),
                commit: 11,
                established: true,
                seen: vec!["n1".into(), "n4".into()],
            },
            Msg::Refuse { part: 2, promised: epoch(6, "n1"), outsider: true },
            Msg::Fetch { part: 3, epoch: epoch(5, "n3"), from: 4 },
            Msg::Entries { part: 3, epoch: epoch(5, "n3"), from: 4, entries: vec![data_entry(), start.clone()], last },
            Msg::Append { part: 4, epoch: epoch(5, "n3"), prev: LogId::default(), entries: vec![start], commit: 0 },
            Msg::Ack { part: 4, epoch: epoch(5, "n3"), storage: 77, matched: 1 },
            Msg::Heartbeat { part: 4, epoch: epoch(5, "n3"), round: 9 },
            Msg::HeartbeatAck { part: 4, epoch: epoch(5, "n3"), storage: 77, round: 9 },
            Msg::Nack { part: 4, epoch: epoch(5, "n3"), storage: 77, commit: 0 },
        ];
        assert_eq!(decode_msgs(&encode_msgs(&msgs)).unwrap(), msgs);
        assert_eq!(decode_entry(&encode_entry(&data_entry())).unwrap(), data_entry());
    }

    #[test]
    fn malformed_input_is_an_error_never_a_panic() {
        let bytes = encode_msgs(&[Msg::Prepare { part: 1, epoch: epoch(5, "n3") }]);
        for len in 0..bytes.len() {
            assert!(decode_msgs(&bytes[..len]).is_err(), "a truncation at {len} must fail");
        }
        let mut huge_count = vec![FORMAT];
        huge_count.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(decode_msgs(&huge_count).is_err());
        let mut trailing = bytes.clone();
        trailing.push(0);
        assert!(decode_msgs(&trailing).is_err());
    }
}
