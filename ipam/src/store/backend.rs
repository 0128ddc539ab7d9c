//! [`LeaseBackend`]: what the lease store needs from the database under it.
//!
//! The store ([`super::LeaseStore`]) owns the key layout, the parsing and the algorithms
//! (acquisition, grace, move permissions); the holder and the watch use only this trait. A
//! backend is a revisioned key-value store with expiring leases, as etcd is: every write
//! gets a revision that only grows, a watch resumes from a revision, and keys can be bound
//! to a lease that expires unless it is kept alive. [`super::etcd`] is the etcd
//! implementation; another backend (e.g. one on the Kubernetes API) is one more module that
//! implements this trait, plugged in with [`super::LeaseStore::with_backend`].

use std::any::Any;
use std::fmt::Debug;

use futures::future::BoxFuture;
use tokio::sync::watch;

use super::StoreError;

/// The future of a backend call.
pub type BackendFuture<'a, T> = BoxFuture<'a, Result<T, StoreError>>;

/// One stored key-value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    /// The full key (lossy UTF-8).
    pub key: String,
    pub value: Vec<u8>,
    /// The lease the key is bound to; 0: none (the key never expires).
    pub lease: i64,
    /// The revision that created the key.
    pub create_revision: i64,
    /// The revision of the key's last change (of a deletion, in a [`WatchEvent::Delete`]).
    pub mod_revision: i64,
}

/// The key-values under a prefix and the store's revision they were read at.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Listing {
    pub kvs: Vec<KeyValue>,
    pub revision: i64,
}

/// One write of a conditional write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Put {
    pub key: String,
    pub value: String,
    /// Bind the key to this lease; 0: no lease (a key without TTL).
    pub lease: i64,
}

/// The condition of [`LeaseBackend::put_if`], on the key of its first [`Put`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Guard {
    /// The key does not exist.
    Absent,
    /// The key exists and its last change is this revision.
    ModRevision(i64),
}

/// One condition of [`LeaseBackend::write_if`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cond {
    /// The key does not exist.
    Absent(String),
    /// The key exists and its last change is this revision.
    ModRevision(String, i64),
    /// No key starts with this prefix.
    NoneUnder(String),
    /// No key under this prefix was created or changed after `revision` (a deletion does not
    /// count): nothing was added to a listing made at `revision`.
    UnchangedSince { prefix: String, revision: i64 },
}

/// The outcome of [`LeaseBackend::put_if`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Written {
    /// Every put was made at `revision`.
    Done { revision: i64 },
    /// The guard failed; nothing was written. `current`: the listing asked for, read in the
    /// same transaction (so that a retry needs no extra round trip).
    Refused { current: Option<Listing> },
}

/// An etcd lease (or the equivalent): its ID and the TTL the backend granted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Granted {
    pub id: i64,
    /// Seconds, as granted (a backend may raise a very short TTL to its minimum).
    pub ttl: i64,
}

/// What a watch follows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchSpec {
    /// One key, or a prefix (`prefix`).
    pub key: String,
    pub prefix: bool,
    /// The first revision to deliver (the last one seen + 1).
    pub from_revision: i64,
    /// Ask for [`WatchMessage::Progress`] while nothing changes.
    pub progress: bool,
}

/// One change seen by a watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent {
    Put(KeyValue),
    /// The deleted key (its value empty) with the revision of the deletion.
    Delete(KeyValue),
}

impl WatchEvent {
    pub fn kv(&self) -> &KeyValue {
        match self {
            WatchEvent::Put(kv) | WatchEvent::Delete(kv) => kv,
        }
    }
}

/// One message of a watch stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchMessage {
    /// The watch is in place; the store is at `revision` (lower than a revision seen
    /// before: the store was restored or replaced, the history is not the one resumed).
    Started { revision: i64 },
    /// Changes, in revision order.
    Events(Vec<WatchEvent>),
    /// Every change up to `revision` has been delivered.
    Progress { revision: i64 },
    /// The revision asked for is compacted away: list again, then watch from the list.
    Compacted { compact_revision: i64 },
    /// The backend ended the watch for another reason; start it again.
    Cancelled { reason: String },
}

/// A running watch. Dropping it ends the watch.
pub trait EventStream: Send {
    /// The next message; `Ok(None)`: the stream ended (resume from the last revision seen).
    fn next(&mut self) -> BackendFuture<'_, Option<WatchMessage>>;
}

/// A keep-alive channel of one lease.
pub trait KeepAlive: Send {
    /// One renewal: the TTL left, in seconds, as the backend answered; 0 or less: the lease
    /// is gone. After an error the channel is not used again (open a new one).
    fn renew(&mut self) -> BackendFuture<'_, i64>;
}

/// The database under the lease store. See the module doc.
pub trait LeaseBackend: Debug + Send + Sync + 'static {
    /// One key, and the store's revision it was read at.
    fn get<'a>(&'a self, key: &'a str) -> BackendFuture<'a, (Option<KeyValue>, i64)>;

    /// Every key under `prefix`, at one revision.
    fn list<'a>(&'a self, prefix: &'a str) -> BackendFuture<'a, Listing>;

    /// Changes of a key or prefix from a revision on. Compaction is its own message.
    fn watch(&self, spec: WatchSpec) -> BackendFuture<'_, Box<dyn EventStream>>;

    /// A new lease of `ttl` seconds.
    fn grant(&self, ttl: i64) -> BackendFuture<'_, Granted>;

    /// A keep-alive channel of lease `id`.
    fn keep_alive(&self, id: i64) -> BackendFuture<'_, Box<dyn KeepAlive>>;

    /// The TTL left of lease `id`, in seconds; 0 or less: it is gone.
    fn time_to_live(&self, id: i64) -> BackendFuture<'_, i64>;

    /// Ends lease `id` and deletes the keys bound to it.
    fn revoke(&self, id: i64) -> BackendFuture<'_, ()>;

    /// Atomically: if `guard` holds for the key of `puts[0]`, writes every put; otherwise
    /// writes nothing and, with `else_list`, lists that prefix in the same transaction.
    fn put_if(
        &self,
        guard: Guard,
        puts: Vec<Put>,
        else_list: Option<String>,
    ) -> BackendFuture<'_, Written>;

    /// Atomically: if every condition holds, deletes `deletes` and writes `puts` (one
    /// revision); otherwise writes nothing and, with `else_list`, lists that prefix in the
    /// same transaction.
    fn write_if(
        &self,
        conds: Vec<Cond>,
        deletes: Vec<String>,
        puts: Vec<Put>,
        else_list: Option<String>,
    ) -> BackendFuture<'_, Written>;

    /// An unconditional write; returns its revision.
    fn put(&self, put: Put) -> BackendFuture<'_, i64>;

    /// Deletes `key`; returns what it held (`None`: there was no such key).
    fn delete<'a>(&'a self, key: &'a str) -> BackendFuture<'a, Option<KeyValue>>;

    /// A counter of the backend's connections: bumped when they are replaced (new TLS
    /// files), so that long-lived streams (keep-alive, watches) are opened again on them.
    fn connections(&self) -> watch::Receiver<u64>;

    /// Requests (round trips) made so far.
    fn requests(&self) -> u64;

    /// Where the backend is, for error messages (e.g. the etcd endpoints).
    fn describe(&self) -> String;

    /// For the backend's own API (e.g. [`super::etcd::EtcdBackend::client`]).
    fn as_any(&self) -> &dyn Any;

    /// Creates the key of `puts[0]` if it is absent (see [`LeaseBackend::put_if`]).
    fn create_if_absent(
        &self,
        puts: Vec<Put>,
        else_list: Option<String>,
    ) -> BackendFuture<'_, Written> {
        self.put_if(Guard::Absent, puts, else_list)
    }

    /// Writes if the key of `puts[0]` is still at `mod_revision` (see
    /// [`LeaseBackend::put_if`]).
    fn compare_and_put(
        &self,
        mod_revision: i64,
        puts: Vec<Put>,
        else_list: Option<String>,
    ) -> BackendFuture<'_, Written> {
        self.put_if(Guard::ModRevision(mod_revision), puts, else_list)
    }

    /// One renewal of lease `id` (a keep-alive channel opened for it).
    fn keep_alive_once(&self, id: i64) -> BackendFuture<'_, i64> {
        Box::pin(async move { self.keep_alive(id).await?.renew().await })
    }
}
