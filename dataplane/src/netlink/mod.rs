//! The kernel layer's netlink: every netlink socket of the crate is opened here, in the
//! namespace the caller names, on a short-lived thread ([`NetNs::spawn_in`]) when that is not
//! the caller's own: the route sockets, and the NETLINK_NETFILTER socket of the nftables
//! peer set ([`netfilter_socket`], whose messages [`crate::nft_set`] encodes).
//!
//! - [`Netlink`]: an rtnetlink connection bound to one namespace, and the one helper that
//!   bounds every request made through it ([`bounded`]);
//! - [`subscribe`]: a connection to rtnetlink's multicast groups (the overlay's monitor);
//! - [`route_socket`]: a plain blocking socket, for [`sync`];
//! - [`parse`]: link, route, address and neighbour messages read into typed values, once;
//! - [`batch`]: several requests sent on one socket before the first answer is read (one
//!   round trip: the CNI ADD);
//! - [`sync`]: blocking sockets without a runtime (DEL's link removal, and the request sent
//!   from a forked child), sharing [`encode`], and [`sync::BatchSocket`], many writes per
//!   datagram (the overlay's peer entries);
//! - [`errno`]: the kernel's errno behind an rtnetlink error, under [`Error::errno`].

use std::future::Future;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::TryStreamExt;
use futures::channel::mpsc::UnboundedReceiver;
use rtnetlink::packet_core::NetlinkMessage;
use rtnetlink::packet_route::RouteNetlinkMessage;
use rtnetlink::packet_route::address::AddressMessage;
use rtnetlink::sys::constants::NETLINK_ROUTE;
use rtnetlink::sys::{AsyncSocket, Socket, SocketAddr};
use rtnetlink::{Handle, MulticastGroup};

use crate::{Error, NetNs, Result};

pub mod batch;
pub mod parse;
pub mod sync;

pub use batch::{Answers, Batch};

/// The kernel's errno behind an rtnetlink error (`libc::EEXIST`, ...), if it is one. Callers
/// check a crate [`Error`] with [`Error::errno`], which reads this.
pub fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.code.map(|c| -c.get()),
        _ => None,
    }
}

/// `msg` with `flags` as one netlink datagram (sequence number 1), for a socket that is not
/// an rtnetlink connection ([`sync`]).
pub fn encode(msg: RouteNetlinkMessage, flags: u16) -> Vec<u8> {
    let mut buf = Vec::new();
    encode_into(&mut buf, msg, flags, 1);
    buf
}

/// Appends `msg` with `flags` and sequence number `seq` to the datagram `buf`, 4-byte
/// aligned (several messages in one datagram: [`sync::BatchSocket`]).
pub fn encode_into(buf: &mut Vec<u8>, msg: RouteNetlinkMessage, flags: u16, seq: u32) {
    let mut nl = NetlinkMessage::from(msg);
    nl.header.flags = flags;
    nl.header.sequence_number = seq;
    nl.finalize();
    let at = buf.len();
    buf.resize(at + nl.header.length as usize, 0);
    nl.serialize(&mut buf[at..]);
    buf.resize(buf.len().next_multiple_of(4), 0);
}

/// A blocking netlink route socket in the calling thread's namespace, neither bound nor
/// connected: [`sync`]'s sockets. Makes one system call and allocates nothing, so a forked
/// child may call it ([`sync::send_from_child`]).
pub fn route_socket() -> std::io::Result<Socket> {
    Socket::new(NETLINK_ROUTE)
}

/// A connected NETLINK_NETFILTER socket on the current tokio runtime, in the calling
/// thread's namespace, with NETLINK_CAP_ACK set (an error reply carries only the header of
/// the failed request, not its elements): [`crate::nft_set::PeerSet`]'s.
pub fn netfilter_socket() -> std::io::Result<rtnetlink::sys::TokioSocket> {
    use rtnetlink::sys::protocols::NETLINK_NETFILTER;
    let mut sock = rtnetlink::sys::TokioSocket::new(NETLINK_NETFILTER)?;
    let s = sock.socket_mut();
    s.bind_auto()?;
    s.connect(&SocketAddr::new(0, 0))?;
    s.set_cap_ack(true)?;
    Ok(sock)
}

/// How long one netlink request (a write and its ack, or a whole dump) may take by default.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// Netlink requests that ran out of time, in this process, since it started.
static TIMEOUTS: AtomicU64 = AtomicU64::new(0);

/// The number of netlink requests that ran out of time (every [`bounded`] call that
/// returned [`Error::Timeout`]), for the daemon's `twill_netlink_timeouts_total`.
pub fn timeouts() -> u64 {
    TIMEOUTS.load(Ordering::Relaxed)
}

/// Runs one netlink request `fut` (named `op` in the error and the log) for at most
/// `limit`. Past it the request is dropped (its sequence number is forgotten by the
/// connection; a late answer is discarded), a warning names the op, the timeout counter
/// goes up, and the caller gets [`Error::Timeout`], which it handles like any other
/// netlink failure (the next reconcile or resync retries).
pub async fn bounded<T>(
    op: impl FnOnce() -> String,
    limit: Duration,
    fut: impl Future<Output = Result<T>>,
) -> Result<T> {
    match tokio::time::timeout(limit, fut).await {
        Ok(r) => r,
        Err(_) => Err(timed_out(op(), limit)),
    }
}

/// Counts and logs a timeout of `op`.
pub(crate) fn timed_out(op: String, after: Duration) -> Error {
    TIMEOUTS.fetch_add(1, Ordering::Relaxed);
    tracing::warn!(%op, timeout = ?after, "netlink request timed out");
    Error::Timeout { op, after }
}

/// A netlink route socket opened in a given namespace, with its connection task running on
/// the current tokio runtime. The socket stays in the namespace where it was created, so
/// every request through [`Netlink::handle`] acts on that namespace. Requests made through
/// [`Netlink::run`] are bounded by [`Netlink::timeout`].
#[derive(Clone)]
pub struct Netlink {
    handle: Handle,
    timeout: Duration,
}

impl Netlink {
    /// Opens a socket in the calling thread's namespace, its connection task spawned on the
    /// runtime that the thread has entered.
    fn connect(what: impl FnOnce() -> String) -> Result<Self> {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(|e| Error::io(what(), e))?;
        tokio::spawn(conn);
        Ok(Netlink {
            handle,
            timeout: DEFAULT_TIMEOUT,
        })
    }

    /// Opens a socket in the caller's own namespace. Must be called inside a tokio runtime.
    pub fn current() -> Result<Self> {
        Self::connect(|| "open netlink socket".into())
    }

    /// Opens a socket inside `ns`: a short-lived thread enters the namespace, creates the
    /// socket (registered with the caller's runtime) and exits. Must be called inside a
    /// tokio runtime.
    pub fn open(ns: &NetNs) -> Result<Self> {
        Self::spawn_open(tokio::runtime::Handle::current(), ns).join()
    }

    /// Starts opening a socket inside `ns` and returns at once: one thread enters the
    /// namespace, creates the socket (registered with the tokio runtime `rt`) and exits,
    /// while the caller goes on with other work. `rt` must still run when the result is used.
    pub fn spawn_open(rt: tokio::runtime::Handle, ns: &NetNs) -> Opening {
        let path = ns.path().to_path_buf();
        Opening(ns.spawn_in(move || {
            let _rt = rt.enter();
            Self::connect(|| format!("open netlink socket in {}", path.display()))
        }))
    }

    /// The same socket with another bound on each request (`--netlink-timeout`).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The bound on each request.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    pub fn handle(&self) -> &Handle {
        &self.handle
    }

    /// Runs the request `fut` (named by `op` if it fails or times out), bounded by
    /// [`Netlink::timeout`]: see [`bounded`].
    pub async fn run<T>(
        &self,
        op: impl FnOnce() -> String,
        fut: impl Future<Output = std::result::Result<T, rtnetlink::Error>>,
    ) -> Result<T> {
        match tokio::time::timeout(self.timeout, fut).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(Error::netlink(op(), e)),
            Err(_) => Err(timed_out(op(), self.timeout)),
        }
    }
}

/// A socket being opened by [`Netlink::spawn_open`].
pub struct Opening(Result<std::thread::JoinHandle<Result<Result<Netlink>>>>);

impl Opening {
    /// Waits for the socket.
    pub fn join(self) -> Result<Netlink> {
        self.0?
            .join()
            .map_err(|_| Error::Invalid("netns thread panicked".into()))??
    }
}

/// A connection subscribed to rtnetlink's multicast `groups`: its handle (the connection
/// task lives as long as one is kept) and the notifications as they come.
pub struct Subscription {
    pub handle: Handle,
    pub rx: UnboundedReceiver<(NetlinkMessage<RouteNetlinkMessage>, SocketAddr)>,
}

/// Subscribes to `groups` inside `ns`, or in the caller's own namespace for `None` (the socket
/// is created on a short-lived thread in `ns`), with a receive buffer of `rcvbuf` bytes
/// (SO_RCVBUFFORCE as root, else SO_RCVBUF capped by rmem_max): a full buffer loses
/// notifications. Must be called inside a tokio runtime.
pub fn subscribe(
    ns: Option<&NetNs>,
    groups: &'static [MulticastGroup],
    rcvbuf: libc::c_int,
) -> Result<Subscription> {
    let connect = move || {
        let (mut conn, handle, rx) = rtnetlink::new_multicast_connection(groups)
            .map_err(|e| Error::io("open netlink multicast socket", e))?;
        let sock = conn.socket_mut().socket_mut();
        // SO_RCVBUFFORCE ignores net.core.rmem_max (needs CAP_NET_ADMIN); fall back to SO_RCVBUF.
        // SAFETY: setsockopt on a valid fd with a c_int option value.
        let forced = unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUFFORCE,
                (&rcvbuf as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if forced != 0 {
            let _ = sock.set_rx_buf_sz(rcvbuf as usize);
        }
        tokio::spawn(conn);
        Ok(Subscription { handle, rx })
    };
    match ns {
        None => connect(),
        Some(ns) => {
            let rt = tokio::runtime::Handle::current();
            ns.run_in(move || {
                let _g = rt.enter();
                connect()
            })?
        }
    }
}

/// The addresses of link `index`. The kernel ignores the dump's link filter unless the socket
/// has strict checking on, so the messages are filtered here too. Not bounded: twilld calls
/// [`Netlink::link_addresses`].
pub async fn link_addresses(handle: &Handle, index: u32) -> Result<Vec<AddressMessage>> {
    let msgs: Vec<AddressMessage> = handle
        .address()
        .get()
        .set_link_index_filter(index)
        .execute()
        .try_collect()
        .await
        .map_err(|e| Error::netlink(format!("dump addresses of link {index}"), e))?;
    Ok(msgs
        .into_iter()
        .filter(|m| m.header.index == index)
        .collect())
}

impl Netlink {
    /// [`link_addresses`] bounded by [`Netlink::timeout`].
    pub async fn link_addresses(&self, index: u32) -> Result<Vec<AddressMessage>> {
        bounded(
            || format!("dump addresses of link {index}"),
            self.timeout,
            link_addresses(&self.handle, index),
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What this proves: a request future that never completes (as a netlink request whose
    /// answer never comes would) returns `Error::Timeout` naming the op after the bound,
    /// and the timeout counter goes up by one. It does not prove that the kernel can make a
    /// real request hang: no reliable way was found to make it do so in a test.
    #[tokio::test]
    async fn a_request_that_never_answers_times_out_and_is_counted() {
        let before = timeouts();
        let t0 = std::time::Instant::now();
        let r: Result<()> = bounded(
            || "replace route 10.1.2.0/24 via 10.1.2.0".to_string(),
            Duration::from_millis(50),
            futures::future::pending(),
        )
        .await;
        let took = t0.elapsed();
        match r {
            Err(Error::Timeout { op, after }) => {
                assert_eq!(op, "replace route 10.1.2.0/24 via 10.1.2.0");
                assert_eq!(after, Duration::from_millis(50));
            }
            other => panic!("want a timeout, got {other:?}"),
        }
        assert!(took >= Duration::from_millis(50), "{took:?}");
        assert!(timeouts() > before, "the counter did not move");
        let e = Error::Timeout {
            op: "x".into(),
            after: Duration::from_secs(5),
        };
        assert!(e.is_timeout());
        assert_eq!(e.to_string(), "netlink: x: no answer within 5s");
    }

    #[tokio::test]
    async fn an_answer_within_the_bound_passes_through() {
        let r = bounded(|| "op".into(), Duration::from_secs(5), async { Ok(7) }).await;
        assert_eq!(r.unwrap(), 7);
        let r: Result<()> = bounded(|| "op".into(), Duration::from_secs(5), async {
            Err(Error::Invalid("no".into()))
        })
        .await;
        assert!(matches!(r, Err(Error::Invalid(_))));
    }
}
