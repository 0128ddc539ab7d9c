//! Blocking netlink sockets, for code that runs without a tokio runtime (DEL, and the undo
//! of an ADD): one request and its answer, a subscription to the namespace's link
//! notifications, and the request sent from a forked child ([`crate::unlink`]). Messages are
//! encoded by [`super::encode`] and decoded by netlink-packet-core.

use std::os::fd::{AsRawFd, RawFd};

use rtnetlink::packet_core::{NLM_F_REQUEST, NetlinkBuffer, NetlinkMessage, NetlinkPayload};
use rtnetlink::packet_route::RouteNetlinkMessage;
use rtnetlink::packet_route::link::{LinkAttribute, LinkMessage};
use rtnetlink::sys::constants::NETLINK_ROUTE;
use rtnetlink::sys::{Socket, SocketAddr};

use super::parse::{self, Link};
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
    let sock = Socket::new(NETLINK_ROUTE).map_err(io("open netlink socket"))?;
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
            NetlinkPayload::Error(e) => match e.code {
                Some(c) if -c.get() == libc::ENODEV => return Ok(None),
                Some(c) => {
                    return Err(Error::io(
                        format!("get link {name}"),
                        std::io::Error::from_raw_os_error(-c.get()),
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
        let mut s = Socket::new(NETLINK_ROUTE).map_err(io("open netlink socket"))?;
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
/// answer and exits with its errno (0 on success, 100-102 when netlink itself failed). Raw
/// system calls only, no allocation: it runs between fork and exit of a process that may
/// have other threads.
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
        let fd = libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            libc::_exit(100);
        }
        let mut sa: libc::sockaddr_nl = std::mem::zeroed();
        sa.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        let sent = libc::sendto(
            fd,
            req.as_ptr().cast(),
            req.len(),
            0,
            (&sa as *const libc::sockaddr_nl).cast(),
            std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
        );
        if sent < 0 {
            libc::_exit(101);
        }
        let mut ack = [0u8; 256];
        let n = libc::recv(fd, ack.as_mut_ptr().cast(), ack.len(), 0);
        // nlmsghdr (16 bytes), then nlmsgerr's error: 0 or -errno.
        if n >= 20 && u16::from_ne_bytes([ack[4], ack[5]]) == libc::NLMSG_ERROR as u16 {
            let err = i32::from_ne_bytes([ack[16], ack[17], ack[18], ack[19]]);
            libc::_exit((-err).clamp(0, 99));
        }
        libc::_exit(102)
    }
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
