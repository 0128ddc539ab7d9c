//! A netlink (rtnetlink) connection bound to one network namespace.

use futures::TryStreamExt;
use rtnetlink::Handle;
use rtnetlink::packet_route::address::AddressMessage;

use crate::{Error, NetNs, Result};

/// A netlink route socket opened in a given namespace, with its connection task running on
/// the current tokio runtime. The socket stays in the namespace where it was created, so
/// every request through [`Netlink::handle`] acts on that namespace.
#[derive(Clone)]
pub struct Netlink {
    handle: Handle,
}

impl Netlink {
    /// Opens a socket in the caller's own namespace. Must be called inside a tokio runtime.
    pub fn current() -> Result<Self> {
        let (conn, handle, _) =
            rtnetlink::new_connection().map_err(|e| Error::io("open netlink socket", e))?;
        tokio::spawn(conn);
        Ok(Netlink { handle })
    }

    /// Opens a socket inside `ns`: a short-lived thread enters the namespace, creates the
    /// socket (registered with the caller's runtime) and exits. Must be called inside a
    /// tokio runtime.
    pub fn open(ns: &NetNs) -> Result<Self> {
        let rt = tokio::runtime::Handle::current();
        let (conn, handle, _) = ns
            .run_in(move || {
                let _guard = rt.enter();
                rtnetlink::new_connection()
            })?
            .map_err(|e| Error::io(format!("open netlink socket in {}", ns.path().display()), e))?;
        tokio::spawn(conn);
        Ok(Netlink { handle })
    }

    pub fn handle(&self) -> &Handle {
        &self.handle
    }
}

/// The addresses of link `index`. The kernel ignores the dump's link filter unless the socket
/// has strict checking on, so the messages are filtered here too.
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
