//! Removing a link without waiting for the kernel to free it.
//!
//! An `RTM_DELLINK` request returns to its sender only after the kernel's `rcu_barrier()` in
//! `netdev_run_todo` (15–35 ms per deletion on the 6.18 kernel the project is tested on),
//! long after the link is gone: unlisted from its namespace, its name free, its veth peer
//! gone with it, its addresses and routes flushed, its bridge port removed. [`remove_link`]
//! returns at that point. A forked child sends the request and sits out the barrier; the
//! caller watches the namespace's link notifications for the kernel's `RTM_DELLINK` and goes
//! on. The child outlives a short-lived caller (the CNI plugin) by those milliseconds and is
//! reaped by init; even a SIGKILL cannot stop the kernel from finishing the deletion.

use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use rtnetlink::packet_core::{
    NLM_F_ACK, NLM_F_REQUEST, NetlinkBuffer, NetlinkMessage, NetlinkPayload,
};
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::packet_route::RouteNetlinkMessage;
use rtnetlink::packet_route::link::{LinkAttribute, LinkMessage};
use rtnetlink::sys::constants::NETLINK_ROUTE;
use rtnetlink::sys::{Socket, SocketAddr};

use crate::cni::{Link, link_from};
use crate::{Error, Result};

/// RTMGRP_LINK: the link notifications of the socket's namespace.
const RTMGRP_LINK: u32 = 1;

/// How long [`remove_link`] waits for the kernel to unlist the link.
const UNLIST_TIMEOUT: Duration = Duration::from_secs(10);

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |e| Error::io(what, e)
}

fn encode(msg: RouteNetlinkMessage, flags: u16) -> Vec<u8> {
    let mut nl = NetlinkMessage::from(msg);
    nl.header.flags = flags;
    nl.header.sequence_number = 1;
    nl.finalize();
    let mut buf = vec![0; nl.header.length as usize];
    nl.serialize(&mut buf);
    buf
}

/// The netlink messages in one datagram.
fn decode(mut buf: &[u8]) -> Vec<NetlinkMessage<RouteNetlinkMessage>> {
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

/// The index of link `name` in the caller's namespace, `None` if there is none.
fn index_of(name: &str) -> Result<Option<u32>> {
    Ok(get_link(name)?.map(|l| l.index))
}

/// Link `name` in the caller's namespace, `None` if there is none.
pub fn get_link(name: &str) -> Result<Option<Link>> {
    let sock = Socket::new(NETLINK_ROUTE).map_err(io("open netlink socket"))?;
    sock.connect(&SocketAddr::new(0, 0))
        .map_err(io("connect netlink socket"))?;
    let mut get = LinkMessage::default();
    get.attributes.push(LinkAttribute::IfName(name.to_string()));
    sock.send(&encode(RouteNetlinkMessage::GetLink(get), NLM_F_REQUEST), 0)
        .map_err(io(format!("get link {name}")))?;
    let mut buf = vec![0u8; 64 * 1024];
    let n = sock
        .recv(&mut &mut buf[..], 0)
        .map_err(io(format!("get link {name}")))?;
    for m in decode(&buf[..n]) {
        match m.payload {
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(l)) => {
                return Ok(Some(link_from(l)));
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

/// The forked child: sends the prepared `RTM_DELLINK`, waits for the kernel's answer (which
/// comes after the RCU barrier) and exits with its errno. Raw system calls only, no
/// allocation: it runs between fork and exit of a process that may have other threads.
fn child(req: &[u8]) -> ! {
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

/// What the child's exit status says.
fn child_result(status: i32, name: &str) -> Result<bool> {
    if !libc::WIFEXITED(status) {
        return Err(Error::Invalid(format!(
            "delete link {name}: the deleting process died (wait status {status})"
        )));
    }
    match libc::WEXITSTATUS(status) {
        0 => Ok(true),
        c if c == libc::ENODEV => Ok(false),
        c if c < 100 => Err(Error::io(
            format!("delete link {name}"),
            std::io::Error::from_raw_os_error(c),
        )),
        c => Err(Error::Invalid(format!(
            "delete link {name}: the deleting process could not talk netlink (exit {c})"
        ))),
    }
}

/// Removes link `name` from the caller's network namespace (with a veth, its peer goes too)
/// and returns once the kernel has unlisted it; `Ok(false)` if there was no such link. The
/// kernel's final teardown is left to a child process (see the module doc). Meant for
/// short-lived processes: a child that outlives the caller is reaped by init.
pub fn remove_link(name: &str) -> Result<bool> {
    Ok(matches!(remove_link_if(name, |_| true)?, Removal::Removed))
}

/// What [`remove_link_if`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Removal {
    /// The link was there, `owned` accepted it, and it is gone.
    Removed,
    /// There was no link of that name.
    Absent,
    /// The link is there and `owned` refused it: it was left alone.
    Kept(Link),
}

/// [`remove_link`], but only when `owned` accepts the link as the kernel reports it (kind,
/// alias, bridge). The request deletes by the index that was checked, so a link that took
/// the name after the check is not the one deleted.
pub fn remove_link_if(name: &str, owned: impl FnOnce(&Link) -> bool) -> Result<Removal> {
    // Subscribed before the request exists, so the notification cannot be missed.
    let mut mon = Socket::new(NETLINK_ROUTE).map_err(io("open netlink socket"))?;
    mon.bind(&SocketAddr::new(0, RTMGRP_LINK))
        .map_err(io("subscribe to link notifications"))?;
    let _ = mon.set_rx_buf_sz(1 << 20);
    mon.set_non_blocking(true)
        .map_err(io("subscribe to link notifications"))?;
    let Some(link) = get_link(name)? else {
        return Ok(Removal::Absent);
    };
    if !owned(&link) {
        return Ok(Removal::Kept(link));
    }
    let index = link.index;
    let mut del = LinkMessage::default();
    del.header.index = index;
    let req = encode(RouteNetlinkMessage::DelLink(del), NLM_F_REQUEST | NLM_F_ACK);

    // SAFETY: fork duplicates this process; the child runs `child` only (raw system calls,
    // then _exit) and never returns into Rust code of the parent's.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(Error::io(
            format!("delete link {name}: fork"),
            std::io::Error::last_os_error(),
        ));
    }
    if pid == 0 {
        child(&req);
    }
    // SAFETY: pidfd_open on our own child, which has not been reaped.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as RawFd;
    let result = wait_unlisted(&mut mon, pidfd, pid, index, name);
    if pidfd >= 0 {
        // SAFETY: closing the pidfd this function opened.
        unsafe { libc::close(pidfd) };
    }
    Ok(if result? {
        Removal::Removed
    } else {
        Removal::Absent
    })
}

/// Waits until the kernel announces the deletion of link `index` (RTM_DELLINK of family
/// AF_UNSPEC, sent once it is unlisted and its notifiers ran) or the child exits.
fn wait_unlisted(
    mon: &mut Socket,
    pidfd: RawFd,
    pid: libc::pid_t,
    index: u32,
    name: &str,
) -> Result<bool> {
    let deadline = Instant::now() + UNLIST_TIMEOUT;
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Error::Invalid(format!(
                "delete link {name}: not gone after {}s",
                UNLIST_TIMEOUT.as_secs()
            )));
        }
        let mut fds = [
            libc::pollfd {
                fd: mon.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: pidfd,
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // Without a pidfd (kernel < 5.3) the child is checked every 10 ms.
        let (nfds, wait_ms) = if pidfd >= 0 {
            (2, left.as_millis().min(1000) as i32)
        } else {
            (1, 10)
        };
        // SAFETY: `fds` is valid for `nfds` entries.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), nfds, wait_ms) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(Error::io(format!("delete link {name}: poll"), e));
        }
        // The child's end first: its answer is final.
        let mut status = 0;
        // SAFETY: waiting for our own child without blocking.
        if unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) } == pid {
            return child_result(status, name);
        }
        if fds[0].revents != 0 {
            loop {
                match mon.recv(&mut &mut buf[..], 0) {
                    Ok(n) => {
                        let gone = decode(&buf[..n]).into_iter().any(|m| {
                            matches!(&m.payload,
                                NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelLink(l))
                                    if l.header.index == index
                                        && l.header.interface_family == AddressFamily::Unspec)
                        });
                        if gone {
                            return Ok(true);
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    // ENOBUFS: notifications were lost; ask the kernel instead.
                    Err(_) => {
                        if index_of(name)?.is_none_or(|i| i != index) {
                            return Ok(true);
                        }
                        break;
                    }
                }
            }
        }
    }
}
