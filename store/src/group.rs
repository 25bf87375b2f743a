//! Group commit's first step, shared by the backends with a writer thread: take whatever is
//! queued behind the append that woke the writer, up to a number of events.

use std::sync::mpsc::Receiver;

use crate::{Completion, WriteBatch};

/// `first` and the appends queued behind it, until the queue is empty or the group holds
/// `events_max` events; returns the group and its event count.
pub(crate) fn take_queued(
    inbox: &Receiver<(WriteBatch, Completion)>,
    first: (WriteBatch, Completion),
    events_max: usize,
) -> (Vec<(WriteBatch, Completion)>, usize) {
    let mut events = first.0.events.len();
    let mut group = vec![first];
    while events < events_max {
        let Ok(next) = inbox.try_recv() else { break };
        events += next.0.events.len();
        group.push(next);
    }
    (group, events)
}
