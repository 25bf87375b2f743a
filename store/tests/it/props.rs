//! A property test of the storage trait: random sequences of appends (events and metadata,
//! several streams per batch), reads in both directions, heads, finds by id, metadata reads
//! and scans, and reopens, checked after every step against a plain in-memory model. Cases
//! come from a seeded generator, so a failure names its seed and step and reruns the same.
//!
//! `GRIDDLE_STORE_PROPTEST_CASES` sets the number of seeds (default 8).

use std::collections::BTreeMap;

use store::{Event, EventId, ReadRange, StreamName, Version, WriteBatch};

use super::{stream, Backend};

/// SplitMix64: seeded, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Names that are prefixes of each other, to catch key-encoding mistakes.
const STREAMS: &[&str] = &["s", "s:a", "s:a:b", "s:b", "t.x-1"];
const META_KEYS: &[&[u8]] = &[b"a", b"a:1", b"a:2", b"b", b"b\x00", b"c:\xff"];

#[derive(Default)]
struct Model {
    streams: BTreeMap<StreamName, Vec<Event>>,
    meta: BTreeMap<Vec<u8>, Vec<u8>>,
}

impl Model {
    fn head(&self, name: &StreamName) -> u64 {
        self.streams.get(name).map_or(0, |events| events.len() as u64)
    }

    fn read(&self, name: &StreamName, range: ReadRange) -> Vec<Event> {
        let events = self.streams.get(name).map_or(&[][..], |e| &e[..]);
        match range {
            ReadRange::After { after, limit } => {
                events.iter().filter(|e| e.version > after).take(limit).cloned().collect()
            }
            ReadRange::Before { before, limit } => {
                let below: Vec<&Event> = events.iter().filter(|e| before.is_none_or(|b| e.version < b)).collect();
                below[below.len().saturating_sub(limit)..].iter().map(|e| (*e).clone()).collect()
            }
        }
    }
}

fn cases() -> u64 {
    std::env::var("GRIDDLE_STORE_PROPTEST_CASES").ok().and_then(|n| n.parse().ok()).unwrap_or(8)
}

pub(crate) fn random_operations_match_a_model(backend: &mut dyn Backend) {
    // One backend for all seeds: each seed writes streams of its own (a `pN:` prefix).
    for seed in 0..cases() {
        run_case(backend, seed);
    }
}

fn run_case(backend: &mut dyn Backend, seed: u64) {
    let mut rng = Rng(seed);
    let mut model = Model::default();
    let names: Vec<StreamName> = STREAMS.iter().map(|s| stream(&format!("p{seed}:{s}"))).collect();
    let meta_key = |key: &[u8]| [format!("p{seed}:").as_bytes(), key].concat();
    let mut next_id = u128::from(seed) << 64;
    for step in 0..120 {
        let at = format!("seed {seed} step {step}");
        match rng.below(100) {
            0..=39 => {
                let mut batch = WriteBatch::default();
                for _ in 0..1 + rng.below(3) {
                    let name = &names[rng.below(names.len() as u64) as usize];
                    let head = model.head(name) + batch.events.iter().filter(|e| e.stream == *name).count() as u64;
                    for v in head + 1..=head + 1 + rng.below(4) {
                        next_id += 1 + u128::from(rng.below(1000));
                        batch.events.push(Event {
                            id: EventId(next_id),
                            stream: name.clone(),
                            version: Version(v),
                            kind: format!("k{}", rng.below(3)),
                            from: "prop".into(),
                            time_ms: rng.next() >> 20,
                            data: format!(r#"{{"n":{},"s":"é\u0000"}}"#, rng.next()),
                        });
                    }
                }
                if rng.below(3) == 0 {
                    let key = meta_key(META_KEYS[rng.below(META_KEYS.len() as u64) as usize]);
                    let value = (rng.below(4) != 0).then(|| rng.next().to_be_bytes().to_vec());
                    batch.meta.push((key, value));
                }
                let (tx, rx) = std::sync::mpsc::channel();
                backend.store().append(batch.clone(), Box::new(move |r| tx.send(r).unwrap()));
                rx.recv().unwrap().unwrap_or_else(|e| panic!("{at}: append failed: {e}"));
                for event in batch.events {
                    model.streams.entry(event.stream.clone()).or_default().push(event);
                }
                for (key, value) in batch.meta {
                    match value {
                        Some(value) => model.meta.insert(key, value),
                        None => model.meta.remove(&key),
                    };
                }
            }
            40..=74 => {
                let name = &names[rng.below(names.len() as u64) as usize];
                let head = model.head(name);
                // Now and then the extremes: the trait takes any version and limit.
                let extreme = rng.below(8) == 0;
                let limit = if extreme && rng.below(2) == 0 { usize::MAX } else { rng.below(head + 3) as usize };
                let version = if extreme && rng.below(2) == 0 { u64::MAX } else { rng.below(head + 3) };
                let range = if rng.below(2) == 0 {
                    ReadRange::After { after: Version(version), limit }
                } else {
                    let before = (rng.below(4) != 0).then_some(Version(version));
                    ReadRange::Before { before, limit }
                };
                let got = backend.store().read(name, range).unwrap();
                assert_eq!(got, model.read(name, range), "{at}: read {name} {range:?}");
                assert_eq!(backend.store().head(name).unwrap(), Version(head), "{at}: head of {name}");
            }
            75..=84 => {
                let name = &names[rng.below(names.len() as u64) as usize];
                let events = model.streams.get(name).cloned().unwrap_or_default();
                let other = &names[rng.below(names.len() as u64) as usize];
                if let Some(event) = events.get(rng.below(events.len() as u64 + 1) as usize) {
                    assert_eq!(backend.store().find(name, event.id).unwrap().as_ref(), Some(event), "{at}: find");
                    if other != name {
                        assert_eq!(backend.store().find(other, event.id).unwrap(), None, "{at}: ids are per stream");
                    }
                }
                assert_eq!(backend.store().find(name, EventId(u128::MAX - 1)).unwrap(), None, "{at}: unknown id");
            }
            85..=94 => {
                let key = meta_key(META_KEYS[rng.below(META_KEYS.len() as u64) as usize]);
                assert_eq!(backend.store().meta(&key).unwrap(), model.meta.get(&key).cloned(), "{at}: meta {key:?}");
                let prefix = meta_key(&META_KEYS[rng.below(META_KEYS.len() as u64) as usize][..1]);
                let limit = rng.below(5) as usize;
                let expected: Vec<(Vec<u8>, Vec<u8>)> = model
                    .meta
                    .iter()
                    .filter(|(k, _)| k.starts_with(&prefix))
                    .take(limit)
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                assert_eq!(backend.store().meta_scan(&prefix, limit).unwrap(), expected, "{at}: scan {prefix:?}");
            }
            _ => backend.reopen(),
        }
    }
    // Everything, after one last reopen.
    backend.reopen();
    for name in &names {
        let all = ReadRange::After { after: Version(0), limit: usize::MAX };
        assert_eq!(backend.store().read(name, all).unwrap(), model.read(name, all), "seed {seed}: {name} at the end");
    }
}
