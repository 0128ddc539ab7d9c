//! twill's kernel layer: netlink (links, addresses, routes, neighbours, FDB), network
//! namespaces and nftables (the table through `nft -f`, the peer set's members over netlink).
//! Knows nothing of etcd, and of CNI only what a pod's network is made of ([`pod`]: a bridge,
//! a veth pair, addresses and routes); the CNI protocol lives in the plugin's crate.
//!
//! - [`netlink`]: opens the rtnetlink sockets (in the namespace the caller names, on a
//!   short-lived thread that [`NetNs::spawn_in`] starts, never a tokio worker), parses
//!   link, route and address messages once, sends batches, owns the errno helper;
//! - [`pod`]: the verbs of a pod's network (types and trait, the rtnetlink implementation,
//!   a fake for tests); [`unlink`]: removing a link without waiting out the kernel's
//!   teardown;
//! - [`overlay`]: the node's VXLAN device, routes, neighbours and FDB entries of its peers;
//! - [`nft`], [`nft_set`]: the nftables table and the peer set.
//!
//! `setns` is called in one place, [`NetNs::spawn_in`], on a thread that exits afterwards.
//! The overlay's multicast listener and the nftables set socket open their own sockets
//! there too (`overlay::monitor`, [`nft_set`]).

pub mod error;
pub mod netlink;
pub mod netns;
pub mod nft;
pub mod nft_set;
pub mod overlay;
pub mod pod;
pub mod unlink;

pub use error::{Error, Result};
pub use netlink::Netlink;
pub use netns::NetNs;

/// The packet types, always imported through rtnetlink so that the two never drift apart.
pub use rtnetlink::packet_route;
