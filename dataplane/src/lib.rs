//! twill's kernel layer: netlink (links, addresses, routes, neighbours, FDB), network
//! namespaces and nftables (the table through `nft -f`, the peer set's members over netlink).
//! Knows nothing of etcd, and of CNI only what a pod's network is made of ([`pod`]: a bridge,
//! a veth pair, addresses and routes); the CNI protocol lives in the plugin's crate.
//!
//! Who owns which kernel object:
//! - [`pod`]: the bridge (`cni0`), the veth pairs, a pod's address and routes in its namespace
//!   (types and trait, the rtnetlink implementation, a fake for tests); [`unlink`]: removing
//!   a link (a pod's veth) without waiting out the kernel's teardown;
//! - [`overlay`]: the node's VXLAN device (`twill.<VNI>`) and its /32 address, and per peer a
//!   neighbour, an FDB entry and an onlink route (marked with twill's route protocol); its
//!   monitor reads the kernel's notifications of them; [`overlay::underlay`] only reads the
//!   underlay device; [`overlay::sysctl`]: the node's forwarding sysctls;
//! - [`nft`], [`nft_set`]: the nftables table and its peer set.
//!
//! Underneath them:
//! - [`netlink`]: opens every netlink route socket (an rtnetlink connection, the multicast
//!   subscription, the blocking and batch sockets), in the namespace the caller names;
//!   encodes raw requests ([`netlink::encode`]); parses link, route, address and neighbour
//!   messages into typed values once ([`netlink::parse`]); sends batches; owns the errno
//!   helper under [`Error::errno`];
//! - [`netns`]: [`NetNs`], the namespace handle. `setns` is called in one place,
//!   [`NetNs::spawn_in`], on a thread that exits afterwards (never a tokio worker); the
//!   netlink sockets enter a namespace through [`netlink`], the sysctls through
//!   [`overlay::sysctl`], and the nftables set socket (another netlink protocol) through
//!   [`nft_set`].

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
