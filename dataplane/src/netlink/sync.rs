//! Blocking netlink sockets, for code that runs without a tokio runtime (DEL, and the undo
//! of an ADD): one request and its answer, a subscription to the namespace's link
//! notifications, and the request sent from a forked child ([`crate::unlink`]); and
//! [`BatchSocket`], the overlay's many writes per datagram. Every socket is a
//! [`super::route_socket`]; messages are encoded by [`super::encode`] and decoded by
//! netlink-packet-core, and an answer is read by [`super::parse`].

use std::os::fd::{AsRawFd, RawFd};

use rtnetlink::packet_core::{
    NLM_F_ACK, NLM_F_REQUEST, NetlinkBuffer, NetlinkMessage, NetlinkPayload,
};
use rtnetlink::packet_route::RouteNetlinkMessage;
use rtnetlink::packet_route::link::{LinkAttribute, LinkMessage};
use rtnetlink::sys::{Socket, SocketAddr};

use super::parse::{self, Link};
use super::route_socket;
use crate::{Error, Result};

/// RTMGRP_LINK: the link notifications of the socket's namespace.
const RTMGRP_LINK: u32 = 1;

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |e| Error::io(what, e)
}

/// The netlink messages in one datagram.
pub fn decode(mut buf: &[u8]) -> Vec<NetlinkMessage<RouteNetlinkMessage>> {
    let mut out = Vec::new();
    while let Ok(b) = NetlinkBuffer::new_checked(buf) {
        let len = (b.length() as usize).max(16);
        if let Ok(m) =
            NetlinkMessage::<RouteNetlinkMessage>::deserialize(&buf[..len.min(buf.len())])
        {
            out.push(m);
        }
        // Messages are 4-byte aligned in a datagram.
        let next = (len + 3) & !3;
        if next >= buf.len() {
            break;
        }
        buf = &buf[next..];
    }
    out
}

/// Link `name` in the caller's namespace, `None` if there is none.
pub fn get_link(name: &str) -> Result<Option<Link>> {
    let sock = route_socket().map_err(io("open netlink socket"))?;
    sock.connect(&SocketAddr::new(0, 0))
        .map_err(io("connect netlink socket"))?;
    let mut get = LinkMessage::default();
    get.attributes.push(LinkAttribute::IfName(name.to_string()));
    sock.send(
        &super::encode(RouteNetlinkMessage::GetLink(get), NLM_F_REQUEST),
        0,
    )
    .map_err(io(format!("get link {name}")))?;
    let mut buf = vec![0u8; 64 * 1024];
    let n = sock
        .recv(&mut &mut buf[..], 0)
        .map_err(io(format!("get link {name}")))?;
    for m in decode(&buf[..n]) {
        match m.payload {
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(l)) => {
                return Ok(Some(parse::link(l)));
            }
            NetlinkPayload::Error(e) => match super::errno(&rtnetlink::Error::NetlinkError(e)) {
                Some(libc::ENODEV) => return Ok(None),
                Some(c) => {
                    return Err(Error::io(
                        format!("get link {name}"),
                        std::io::Error::from_raw_os_error(c),
                    ));
                }
                None => {}
            },
            _ => {}
        }
    }
    Err(Error::Invalid(format!(
        "get link {name}: no answer from the kernel"
    )))
}

/// A non-blocking socket subscribed to the link notifications of the caller's namespace.
pub struct LinkEvents(Socket);

impl LinkEvents {
    pub fn subscribe() -> Result<Self> {
        let mut s = route_socket().map_err(io("open netlink socket"))?;
        s.bind(&SocketAddr::new(0, RTMGRP_LINK))
            .map_err(io("subscribe to link notifications"))?;
        let _ = s.set_rx_buf_sz(1 << 20);
        s.set_non_blocking(true)
            .map_err(io("subscribe to link notifications"))?;
        Ok(LinkEvents(s))
    }

    pub fn raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }

    /// The messages of one datagram into `buf`; `WouldBlock` when none is queued, another
    /// error (ENOBUFS) when notifications were lost.
    pub fn recv(
        &mut self,
        buf: &mut [u8],
    ) -> std::io::Result<Vec<NetlinkMessage<RouteNetlinkMessage>>> {
        let n = self.0.recv(&mut &mut buf[..], 0)?;
        Ok(decode(&buf[..n]))
    }
}

/// The body of a forked child: sends the encoded request `req`, waits for the kernel's
/// answer and exits with its errno (0 on success, 100-102 when netlink itself failed). System
/// calls only, no allocation: it runs between fork and exit of a process that may have other
/// threads.
pub fn send_from_child(req: &[u8]) -> ! {
    // SAFETY: system calls on memory this process owns; the request buffer was filled
    // before the fork and is only read. Every descriptor is closed first, so the child holds
    // no lock, pipe or socket of the caller (the runtime waits for the caller's stdout).
    unsafe {
        if libc::syscall(libc::SYS_close_range, 0u32, u32::MAX, 0u32) != 0 {
            // Kernels before 5.9: one by one.
            for fd in 0..65536 {
                libc::close(fd);
            }
        }
    }
    let Ok(sock) = route_socket() else {
        // SAFETY: ends the child without running any of the parent's code.
        unsafe { libc::_exit(100) }
    };
    if sock.send_to(req, &SocketAddr::new(0, 0), 0).is_err() {
        // SAFETY: as above.
        unsafe { libc::_exit(101) }
    }
    let mut ack = [0u8; 256];
    let n = sock.recv(&mut &mut ack[..], 0).unwrap_or(0);
    // nlmsghdr (16 bytes), then nlmsgerr's error: 0 or -errno.
    let code = if n >= 20 && u16::from_ne_bytes([ack[4], ack[5]]) == libc::NLMSG_ERROR as u16 {
        (-i32::from_ne_bytes([ack[16], ack[17], ack[18], ack[19]])).clamp(0, 99)
    } else {
        102
    };
    // SAFETY: as above.
    unsafe { libc::_exit(code) }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What this proves: a datagram of two messages, as [`super::super::encode`] writes
    /// them, decodes back into both, in order.
    #[test]
    fn encode_and_decode_agree() {
        let mut a = LinkMessage::default();
        a.header.index = 3;
        let mut b = LinkMessage::default();
        b.attributes.push(LinkAttribute::IfName("eth0".into()));
        let mut buf = super::super::encode(RouteNetlinkMessage::DelLink(a), NLM_F_REQUEST);
        buf.extend(super::super::encode(
            RouteNetlinkMessage::GetLink(b.clone()),
            NLM_F_REQUEST,
        ));
        let got = decode(&buf);
        assert_eq!(got.len(), 2);
        assert!(matches!(&got[0].payload,
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelLink(m)) if m.header.index == 3));
        assert!(matches!(&got[1].payload,
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::GetLink(m)) if *m == b));
    }
}

/// Messages per datagram of a [`BatchSocket`]: well inside the socket's send buffer, and few
/// enough that the errors of a chunk where every message fails fit in the receive buffer.
const BATCH_CHUNK: usize = 256;
const NLMSG_ERROR: u16 = 2;
/// `NETLINK_CAP_ACK`: an error answer does not carry the whole request back.
const NETLINK_CAP_ACK: libc::c_int = 10;

/// A route netlink socket for many writes in few system calls, in the namespace of the
/// thread that opened it. The messages are packed into one datagram per chunk, and only the
/// last of each chunk asks for an ack: the kernel handles every message of a datagram in
/// order inside `sendmsg` and answers a failed one with its error whether it asked for an
/// ack or not, so the last one's ack ends the chunk with every error before it queued.
#[derive(Debug)]
pub struct BatchSocket {
    sock: Socket,
    seq: u32,
    timeout: std::time::Duration,
}

impl BatchSocket {
    /// Opens it in the calling thread's namespace; every receive waits at most `timeout`.
    pub fn current(timeout: std::time::Duration) -> Result<Self> {
        let mut sock = route_socket().map_err(io("open batch netlink socket"))?;
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

    /// Sends `msgs` (message, flags without NLM_F_REQUEST/ACK; their order is kept) and
    /// returns the kernel's errno for each that failed, by index. A chunk that gets no ack
    /// within the timeout, or cannot be sent, fails whole with that error.
    pub fn send(&mut self, msgs: Vec<(RouteNetlinkMessage, u16)>) -> Vec<(usize, Error)> {
        let mut failed = Vec::new();
        let mut msgs = msgs.into_iter().enumerate().peekable();
        while msgs.peek().is_some() {
            let chunk: Vec<_> = msgs.by_ref().take(BATCH_CHUNK).collect();
            let first = chunk[0].0;
            let len = chunk.len();
            let before = failed.len();
            if let Err(e) = self.send_chunk(chunk, &mut failed) {
                let done: Vec<usize> = failed[before..].iter().map(|(i, _)| *i).collect();
                for i in (first..first + len).filter(|i| !done.contains(i)) {
                    let err = match &e {
                        Error::Timeout { after, .. } => {
                            super::timed_out("netlink batch".into(), *after)
                        }
                        e => Error::Invalid(e.to_string()),
                    };
                    failed.push((i, err));
                }
            }
        }
        failed
    }

    fn send_chunk(
        &mut self,
        chunk: Vec<(usize, (RouteNetlinkMessage, u16))>,
        failed: &mut Vec<(usize, Error)>,
    ) -> Result<()> {
        let base = self.seq.wrapping_add(1);
        let n_msgs = chunk.len();
        let first = chunk[0].0;
        let mut buf = Vec::with_capacity(n_msgs * 96);
        for (k, (_, (msg, flags))) in chunk.into_iter().enumerate() {
            let ack = if k + 1 == n_msgs { NLM_F_ACK } else { 0 };
            super::encode_into(
                &mut buf,
                msg,
                flags | NLM_F_REQUEST | ack,
                base.wrapping_add(k as u32),
            );
        }
        let last = base.wrapping_add(n_msgs as u32 - 1);
        self.seq = last;
        self.sock
            .send(&buf, 0)
            .map_err(io("send a netlink batch"))?;
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
                    // An answer to an earlier chunk that timed out has a lower sequence.
                    let k = seq.wrapping_sub(base) as usize;
                    if code < 0 && k < n_msgs {
                        failed.push((
                            first + k,
                            Error::io("netlink batch", std::io::Error::from_raw_os_error(-code)),
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
