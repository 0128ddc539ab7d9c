//! Many overlay writes in few system calls: the messages of a stage are packed into one
//! datagram per chunk, and only the last of each chunk asks for an ack. The kernel handles
//! every message of a datagram in order inside `sendmsg`, answers a failed one with its
//! error whether it asked for an ack or not, and so the last one's ack ends the chunk with
//! every error before it already queued. `ip -batch` pays one request and one ack per entry.

use std::os::fd::AsRawFd;
use std::time::Duration;

use rtnetlink::packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REPLACE, NLM_F_REQUEST, NetlinkMessage,
};
use rtnetlink::packet_route::RouteNetlinkMessage;
use rtnetlink::sys::constants::NETLINK_ROUTE;
use rtnetlink::sys::{Socket, SocketAddr};

use super::Op;
use super::rtnl::{
    fdb_add_msg, fdb_del_msg, neigh_add_msg, neigh_del_msg, route_del_msg, route_msg,
};
use crate::{Error, Result};

/// Messages per datagram: well inside the socket's send buffer, and few enough that the
/// errors of a chunk where every message fails fit in the receive buffer.
const CHUNK: usize = 256;
const NLMSG_ERROR: u16 = 2;
/// `NETLINK_CAP_ACK`: an error answer does not carry the whole request back.
const NETLINK_CAP_ACK: libc::c_int = 10;

/// A route netlink socket for batches, in the namespace of the thread that opened it.
#[derive(Debug)]
pub struct BatchSocket {
    sock: Socket,
    seq: u32,
    timeout: Duration,
}

impl BatchSocket {
    /// Opens it in the calling thread's namespace; every receive waits at most `timeout`.
    pub fn current(timeout: Duration) -> Result<Self> {
        let io = |what: &'static str| move |e| Error::io(what, e);
        let mut sock = Socket::new(NETLINK_ROUTE).map_err(io("open batch netlink socket"))?;
        sock.bind_auto().map_err(io("bind batch netlink socket"))?;
        sock.connect(&SocketAddr::new(0, 0))
            .map_err(io("connect batch netlink socket"))?;
        let fd = sock.as_raw_fd();
        let one: libc::c_int = 1;
        let tv = libc::timeval {
            tv_sec: timeout.as_secs() as libc::time_t,
            tv_usec: timeout.subsec_micros() as libc::suseconds_t,
        };
        // SAFETY: fd is the socket's own; the option values live across the calls.
        unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_NETLINK,
                NETLINK_CAP_ACK,
                (&one as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
            if libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            ) != 0
            {
                return Err(Error::io(
                    "set the batch socket's timeout",
                    std::io::Error::last_os_error(),
                ));
            }
        }
        Ok(BatchSocket {
            sock,
            seq: 0,
            timeout,
        })
    }

    /// Sends `ops` (one stage: their order does not matter) on `link`, routes create-only.
    /// Returns each failed op with its error; a chunk whose ack does not come within the
    /// timeout fails whole.
    pub fn send(&mut self, link: u32, ops: &[Op]) -> Vec<(Op, Error)> {
        let mut failed = Vec::new();
        for chunk in ops.chunks(CHUNK) {
            if let Err(e) = self.send_chunk(link, chunk, &mut failed) {
                for op in chunk {
                    if !failed.iter().any(|(f, _)| f == op) {
                        let err = match &e {
                            Error::Timeout { after, .. } => {
                                crate::netlink::timed_out(op.to_string(), *after)
                            }
                            e => Error::Invalid(e.to_string()),
                        };
                        failed.push((*op, err));
                    }
                }
            }
        }
        failed
    }

    fn send_chunk(&mut self, link: u32, chunk: &[Op], failed: &mut Vec<(Op, Error)>) -> Result<()> {
        let base = self.seq.wrapping_add(1);
        let mut buf = Vec::with_capacity(chunk.len() * 96);
        for (i, op) in chunk.iter().enumerate() {
            let (msg, mut flags) = match op {
                Op::ReplaceNeigh(n) => (
                    RouteNetlinkMessage::NewNeighbour(neigh_add_msg(link, n)),
                    NLM_F_CREATE | NLM_F_REPLACE,
                ),
                Op::ReplaceFdb(f) => (
                    RouteNetlinkMessage::NewNeighbour(fdb_add_msg(link, f)),
                    NLM_F_CREATE | NLM_F_REPLACE,
                ),
                // Create-only: the caller checks whose route holds a dst that exists.
                Op::ReplaceRoute(r) => (
                    RouteNetlinkMessage::NewRoute(route_msg(link, r)),
                    NLM_F_CREATE | NLM_F_EXCL,
                ),
                Op::DeleteRoute(r) => (RouteNetlinkMessage::DelRoute(route_del_msg(link, r)), 0),
                Op::DeleteNeigh(n) => {
                    (RouteNetlinkMessage::DelNeighbour(neigh_del_msg(link, n)), 0)
                }
                Op::DeleteFdb(f) => (RouteNetlinkMessage::DelNeighbour(fdb_del_msg(link, f)), 0),
            };
            flags |= NLM_F_REQUEST;
            if i + 1 == chunk.len() {
                flags |= NLM_F_ACK;
            }
            let mut nl = NetlinkMessage::from(msg);
            nl.header.flags = flags;
            nl.header.sequence_number = base.wrapping_add(i as u32);
            nl.finalize();
            let at = buf.len();
            buf.resize(at + nl.header.length as usize, 0);
            nl.serialize(&mut buf[at..]);
            // Messages are 4-byte aligned in a datagram.
            buf.resize(buf.len().next_multiple_of(4), 0);
        }
        let last = base.wrapping_add(chunk.len() as u32 - 1);
        self.seq = last;
        self.sock
            .send(&buf, 0)
            .map_err(|e| Error::io("send a netlink batch", e))?;
        let mut rx = vec![0u8; 64 * 1024];
        loop {
            let n = self
                .sock
                .recv(&mut &mut rx[..], 0)
                .map_err(|e| match e.kind() {
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
                        Error::Timeout {
                            op: "netlink batch".into(),
                            after: self.timeout,
                        }
                    }
                    _ => Error::io("receive a netlink batch's answers", e),
                })?;
            let mut done = false;
            let mut off = 0;
            while off + 16 <= n {
                let h = &rx[off..n];
                let len = u32::from_ne_bytes([h[0], h[1], h[2], h[3]]) as usize;
                let kind = u16::from_ne_bytes([h[4], h[5]]);
                let seq = u32::from_ne_bytes([h[8], h[9], h[10], h[11]]);
                if len < 16 || off + len > n {
                    break;
                }
                if kind == NLMSG_ERROR && len >= 20 {
                    let code = i32::from_ne_bytes([h[16], h[17], h[18], h[19]]);
                    let i = seq.wrapping_sub(base) as usize;
                    if code < 0
                        && let Some(op) = chunk.get(i)
                    {
                        failed.push((
                            *op,
                            Error::io(op.to_string(), std::io::Error::from_raw_os_error(-code)),
                        ));
                    }
                    done |= seq == last;
                }
                off += len.next_multiple_of(4);
            }
            if done {
                return Ok(());
            }
        }
    }
}
