//! The tokio shell around [`NodeCore`]: it moves requests in, batches to the store, store
//! completions back, and replies out, and keeps one timer for all of the core's deadlines.
//!
//! The core sits behind one mutex. Whoever holds it drains the core's outputs in order
//! ([`Driver::pump`]): persists are handed to the store while the lock is held, so batches
//! reach the store in the order the core sequenced them. Store completions arrive on a channel
//! that one task feeds back into the core, so the store's writer thread never waits for the
//! core. Read-only requests (history pages) do not take the lock at all.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use node_core::api::{Reply, Request, RequestId};
use node_core::{BatchId, NodeCore, Output};
use parking_lot::{Mutex, MutexGuard};
use store::{Store, StoreError};
use tokio::sync::{mpsc, oneshot, Notify};

use crate::clock::now_ms;

pub struct Driver {
    inner: Mutex<Inner>,
    store: Arc<dyn Store>,
    completions: mpsc::UnboundedSender<(BatchId, Result<(), StoreError>)>,
    /// Wakes the timer task when a deadline earlier than the one it sleeps to appears.
    timer: Notify,
    armed_ms: AtomicU64,
    /// Notified once when storage failed and the process must restart from disk.
    pub fatal: Notify,
}

struct Inner {
    core: NodeCore,
    replies: HashMap<RequestId, oneshot::Sender<Reply>>,
    next_request: u64,
}

impl Driver {
    /// Starts the driver's two tasks (store completions, timer) on the current runtime.
    pub fn start(core: NodeCore, store: Arc<dyn Store>) -> Arc<Driver> {
        let (completions, mut completed) = mpsc::unbounded_channel();
        let driver = Arc::new(Driver {
            inner: Mutex::new(Inner { core, replies: HashMap::new(), next_request: 0 }),
            store,
            completions,
            timer: Notify::new(),
            armed_ms: AtomicU64::new(u64::MAX),
            fatal: Notify::new(),
        });
        driver.pump(driver.inner.lock()); // Outputs of recovery.
        let weak = Arc::downgrade(&driver);
        tokio::spawn(async move {
            while let Some((batch, result)) = completed.recv().await {
                let Some(driver) = weak.upgrade() else { return };
                let mut inner = driver.inner.lock();
                let now = now_ms();
                inner.core.persisted(now, batch, result);
                // Take whatever else completed meanwhile under the same lock.
                while let Ok((batch, result)) = completed.try_recv() {
                    inner.core.persisted(now, batch, result);
                }
                driver.pump(inner);
            }
        });
        let weak = Arc::downgrade(&driver);
        tokio::spawn(async move {
            loop {
                let Some(driver) = weak.upgrade() else { return };
                let now = now_ms();
                let deadline = {
                    // Armed under the lock, so a request that adds an earlier deadline after
                    // this sees it and wakes us.
                    let inner = driver.inner.lock();
                    let deadline = inner.core.poll_timeout().unwrap_or(u64::MAX).min(now + 1000);
                    driver.armed_ms.store(deadline, Ordering::Relaxed);
                    deadline
                };
                let sleep = Duration::from_millis(deadline.saturating_sub(now));
                tokio::select! {
                    _ = tokio::time::sleep(sleep) => {}
                    _ = driver.timer.notified() => {}
                }
                let mut inner = driver.inner.lock();
                inner.core.tick(now_ms());
                driver.pump(inner);
            }
        });
        driver
    }

    /// Runs one request to its reply. Dropping the future cancels a long-poll.
    pub async fn call(self: &Arc<Self>, request: Request) -> Reply {
        if let Some(reply) = node_core::read_only(&*self.store, &request) {
            return reply;
        }
        let (tx, rx) = oneshot::channel();
        let id = {
            let mut inner = self.inner.lock();
            let id = RequestId(inner.next_request);
            inner.next_request += 1;
            inner.replies.insert(id, tx);
            inner.core.request(now_ms(), id, request);
            self.pump(inner);
            id
        };
        let mut pending = Pending { driver: self, id, answered: false };
        let reply = rx
            .await
            .unwrap_or_else(|_| Reply::Error(node_core::api::CoreError::Unavailable("node is stopping".into())));
        pending.answered = true;
        reply
    }

    /// Drains the core's outputs in order, then releases the lock.
    fn pump(&self, mut inner: MutexGuard<'_, Inner>) {
        while let Some(output) = inner.core.poll_output() {
            match output {
                Output::Persist(batch, writes) => {
                    let completions = self.completions.clone();
                    self.store.append(writes, Box::new(move |result| drop(completions.send((batch, result)))));
                }
                Output::Reply(id, reply) => {
                    if let Some(tx) = inner.replies.remove(&id) {
                        let _ = tx.send(reply);
                    }
                }
                Output::Fatal(error) => {
                    tracing::error!(%error, "storage failed; stopping so the node restarts from what is on disk");
                    self.fatal.notify_one();
                }
            }
        }
        if inner.core.poll_timeout().is_some_and(|deadline| deadline < self.armed_ms.load(Ordering::Relaxed)) {
            self.timer.notify_one();
        }
    }

    /// Answers every long-poll (with its cursor) and refuses new requests.
    pub fn stop(&self) {
        let mut inner = self.inner.lock();
        inner.core.stop(now_ms());
        self.pump(inner);
    }

    pub fn long_polls_held(&self) -> usize {
        self.inner.lock().core.waiting()
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }
}

/// Cancels its request in the core if dropped before the reply came.
struct Pending<'a> {
    driver: &'a Driver,
    id: RequestId,
    answered: bool,
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        if self.answered {
            return;
        }
        let mut inner = self.driver.inner.lock();
        inner.replies.remove(&self.id);
        inner.core.cancel(now_ms(), self.id);
        self.driver.pump(inner);
    }
}
