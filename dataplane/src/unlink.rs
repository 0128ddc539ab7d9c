//! Removing a link without waiting for the kernel to free it.
//!
//! An `RTM_DELLINK` request returns to its sender only after the kernel's `rcu_barrier()` in
//! `netdev_run_todo` (docs/benchmarks.md: most of a DEL), long after the link is gone:
//! unlisted from its namespace, its name free, its veth peer gone with it, its addresses and
//! routes flushed, its bridge port removed. [`remove_link`]
//! returns at that point. A forked child sends the request and sits out the barrier; the
//! caller watches the namespace's link notifications for the kernel's `RTM_DELLINK` and goes
//! on. The child outlives a short-lived caller (the CNI plugin) by those milliseconds and is
//! reaped by init; even a SIGKILL cannot stop the kernel from finishing the deletion.
//!
//! The sockets and the request are [`crate::netlink`]'s: the request is encoded by
//! [`crate::netlink::encode`] before the fork and sent by [`crate::netlink::sync::send_from_child`],
//! the link is read by [`get_link`], the notifications by [`crate::netlink::sync::LinkEvents`].

use std::os::fd::RawFd;
use std::time::{Duration, Instant};

use rtnetlink::packet_core::{NLM_F_ACK, NLM_F_REQUEST, NetlinkPayload};
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::packet_route::RouteNetlinkMessage;
use rtnetlink::packet_route::link::LinkMessage;

use crate::netlink::parse::Link;
pub use crate::netlink::sync::get_link;
use crate::netlink::sync::{LinkEvents, send_from_child};
use crate::{Error, Result};

/// How long [`remove_link`] waits for the kernel to unlist the link.
const UNLIST_TIMEOUT: Duration = Duration::from_secs(10);

/// The index of link `name` in the caller's namespace, `None` if there is none.
fn index_of(name: &str) -> Result<Option<u32>> {
    Ok(get_link(name)?.map(|l| l.index))
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
    let mut mon = LinkEvents::subscribe()?;
    let Some(link) = get_link(name)? else {
        return Ok(Removal::Absent);
    };
    if !owned(&link) {
        return Ok(Removal::Kept(link));
    }
    let index = link.index;
    let mut del = LinkMessage::default();
    del.header.index = index;
    let req = crate::netlink::encode(RouteNetlinkMessage::DelLink(del), NLM_F_REQUEST | NLM_F_ACK);

    // SAFETY: fork duplicates this process; the child runs `send_from_child` only (raw system calls,
    // then _exit) and never returns into Rust code of the parent's.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(Error::io(
            format!("delete link {name}: fork"),
            std::io::Error::last_os_error(),
        ));
    }
    if pid == 0 {
        send_from_child(&req);
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
    mon: &mut LinkEvents,
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
                fd: mon.raw_fd(),
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
                match mon.recv(&mut buf) {
                    Ok(msgs) => {
                        let gone = msgs.into_iter().any(|m| {
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
