//! The overlay's writes as one [`BatchSocket`] batch per stage: each op becomes its netlink
//! message (routes create-only: the caller checks whose route holds a dst that exists).

use rtnetlink::packet_core::{NLM_F_CREATE, NLM_F_EXCL, NLM_F_REPLACE};
use rtnetlink::packet_route::RouteNetlinkMessage;

use super::Op;
use super::rtnl::{
    direct_del_msg, direct_msg, fdb_add_msg, fdb_del_msg, neigh_add_msg, neigh_del_msg,
    route_del_msg, route_msg,
};
use crate::Error;
pub use crate::netlink::sync::BatchSocket;

/// Sends `ops` (one stage: their order does not matter) on `link`; returns each failed op
/// with its error (the op named in it).
pub fn send(sock: &mut BatchSocket, link: u32, ops: &[Op]) -> Vec<(Op, Error)> {
    let msgs = ops
        .iter()
        .map(|op| match op {
            Op::ReplaceNeigh(n) => (
                RouteNetlinkMessage::NewNeighbour(neigh_add_msg(link, n)),
                NLM_F_CREATE | NLM_F_REPLACE,
            ),
            Op::ReplaceFdb(f) => (
                RouteNetlinkMessage::NewNeighbour(fdb_add_msg(link, f)),
                NLM_F_CREATE | NLM_F_REPLACE,
            ),
            Op::ReplaceRoute(r) => (
                RouteNetlinkMessage::NewRoute(route_msg(link, r)),
                NLM_F_CREATE | NLM_F_EXCL,
            ),
            Op::DeleteRoute(r) => (RouteNetlinkMessage::DelRoute(route_del_msg(link, r)), 0),
            Op::ReplaceDirect(r) => (
                RouteNetlinkMessage::NewRoute(direct_msg(r)),
                NLM_F_CREATE | NLM_F_EXCL,
            ),
            Op::DeleteDirect(r) => (RouteNetlinkMessage::DelRoute(direct_del_msg(r)), 0),
            Op::DeleteNeigh(n) => (RouteNetlinkMessage::DelNeighbour(neigh_del_msg(link, n)), 0),
            Op::DeleteFdb(f) => (RouteNetlinkMessage::DelNeighbour(fdb_del_msg(link, f)), 0),
        })
        .collect();
    sock.send(msgs)
        .into_iter()
        .map(|(i, e)| {
            let e = match e {
                Error::Io { source, .. } => Error::io(ops[i].to_string(), source),
                e => e,
            };
            (ops[i], e)
        })
        .collect()
}
