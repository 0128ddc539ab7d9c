//! twill's kernel layer: netlink (links, addresses, routes, neighbours, FDB), network
//! namespaces and nftables (the table through `nft -f`, the peer set's members over netlink).
//! Knows nothing of etcd or CNI.
//!
//! Every netlink socket is opened by [`Netlink::open`], in the namespace that the caller
//! names, on a short-lived thread (never a tokio worker), so that `setns` never moves a
//! thread that other code runs on.

pub mod cni;
pub mod error;
pub mod netlink;
pub mod netns;
pub mod nft;
pub mod nft_set;
pub mod overlay;
pub mod unlink;

pub use error::{Error, Result};
pub use netlink::Netlink;
pub use netns::NetNs;

/// The packet types, always imported through rtnetlink so that the two never drift apart.
pub use rtnetlink::packet_route;
