//! The members of twill's VXLAN peer set (`set ip twill peers`, see [`crate::nft`]) changed
//! over netlink by twilld itself, without an `nft` process per join: NFT_MSG_NEWSETELEM /
//! NFT_MSG_DELSETELEM messages inside one nfnetlink batch on a NETLINK_NETFILTER socket.
//! The table, its chains and a full rewrite of the set stay with `nft -f` ([`crate::nft::Nft`]).
//!
//! No crate does exactly this under a licence the workspace can take: `rustables` (GPL-3.0),
//! `nftnl` (needs libnftnl), `netlink-packet-netfilter` (nflog and conntrack only), so the
//! few messages are written here (netlink headers, the nfgenmsg header, attributes), with
//! the socket from netlink-sys (through rtnetlink). Every call is bounded by the netlink
//! timeout ([`crate::netlink::bounded`]).

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use rtnetlink::sys::{AsyncSocketExt, TokioSocket};

use crate::nft::{PEER_SET, TABLE};
use crate::{Error, NetNs, Result};

// linux/netlink.h
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_CREATE: u16 = 0x400;
const NLMSG_ERROR: u16 = 0x2;
const NLMSG_HDRLEN: usize = 16;
const NLA_F_NESTED: u16 = 0x8000;
// linux/netfilter/nfnetlink.h
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
const NFGENMSG_LEN: usize = 4;
// linux/netfilter.h
const NFPROTO_IPV4: u8 = 2;
// linux/netfilter/nf_tables.h
const NFT_MSG_NEWSETELEM: u16 = 12;
const NFT_MSG_DELSETELEM: u16 = 14;
const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_DATA_VALUE: u16 = 1;

/// Elements per NEWSETELEM/DELSETELEM message (16 bytes each: ~8 KiB per message).
const ELEMS_PER_MSG: usize = 512;
/// Messages per batch (one `send`: ~64 KiB, well under the socket's send buffer).
const MSGS_PER_BATCH: usize = 8;

/// Add or delete.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SetOp {
    Add,
    Delete,
}

impl SetOp {
    fn verb(self) -> &'static str {
        match self {
            SetOp::Add => "add",
            SetOp::Delete => "delete",
        }
    }
}

/// One nfnetlink message: nlmsghdr, nfgenmsg, attributes (already encoded).
fn push_msg(buf: &mut Vec<u8>, ty: u16, flags: u16, seq: u32, family: u8, attrs: &[u8]) {
    let len = NLMSG_HDRLEN + NFGENMSG_LEN + attrs.len();
    buf.extend_from_slice(&(len as u32).to_ne_bytes());
    buf.extend_from_slice(&ty.to_ne_bytes());
    buf.extend_from_slice(&flags.to_ne_bytes());
    buf.extend_from_slice(&seq.to_ne_bytes());
    buf.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel fills it in
    buf.push(family);
    buf.push(0); // NFNETLINK_V0
    // res_id is big-endian; in a batch header it names the subsystem.
    let res_id = if ty == NFNL_MSG_BATCH_BEGIN || ty == NFNL_MSG_BATCH_END {
        NFNL_SUBSYS_NFTABLES
    } else {
        0
    };
    buf.extend_from_slice(&res_id.to_be_bytes());
    buf.extend_from_slice(attrs);
}

/// One attribute, padded to 4 bytes (the length field excludes the padding).
fn push_attr(buf: &mut Vec<u8>, ty: u16, payload: &[u8]) {
    let len = 4 + payload.len();
    buf.extend_from_slice(&(len as u16).to_ne_bytes());
    buf.extend_from_slice(&ty.to_ne_bytes());
    buf.extend_from_slice(payload);
    buf.resize(buf.len() + (4 - len % 4) % 4, 0);
}

fn nested(ty: u16, inner: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(4 + inner.len());
    push_attr(&mut b, ty | NLA_F_NESTED, inner);
    b
}

fn cstr(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

/// The attributes of a set element message: table, set, and the elements as keys (IPv4
/// addresses in network order).
pub(crate) fn setelem_attrs(table: &str, set: &str, ips: &[Ipv4Addr]) -> Vec<u8> {
    let mut a = Vec::new();
    push_attr(&mut a, NFTA_SET_ELEM_LIST_TABLE, &cstr(table));
    push_attr(&mut a, NFTA_SET_ELEM_LIST_SET, &cstr(set));
    let mut elems = Vec::with_capacity(ips.len() * 16);
    for ip in ips {
        let mut value = Vec::with_capacity(8);
        push_attr(&mut value, NFTA_DATA_VALUE, &ip.octets());
        let key = nested(NFTA_SET_ELEM_KEY, &value);
        elems.extend_from_slice(&nested(NFTA_LIST_ELEM, &key));
    }
    a.extend_from_slice(&nested(NFTA_SET_ELEM_LIST_ELEMENTS, &elems));
    a
}

/// A whole batch: BEGIN, one element message per chunk of `ips` (sequence numbers from
/// `seq0 + 1`, each asking for an ack), END. Returns the bytes and the acked sequences.
pub(crate) fn batch(op: SetOp, seq0: u32, ips: &[Ipv4Addr]) -> (Vec<u8>, Vec<u32>) {
    let mut buf = Vec::new();
    let mut seqs = Vec::new();
    let mut seq = seq0;
    push_msg(&mut buf, NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, seq, 0, &[]);
    let (ty, flags) = match op {
        // Without NLM_F_EXCL an element that is there already is not an error.
        SetOp::Add => (NFT_MSG_NEWSETELEM, NLM_F_REQUEST | NLM_F_CREATE | NLM_F_ACK),
        SetOp::Delete => (NFT_MSG_DELSETELEM, NLM_F_REQUEST | NLM_F_ACK),
    };
    for chunk in ips.chunks(ELEMS_PER_MSG) {
        seq = seq.wrapping_add(1);
        push_msg(
            &mut buf,
            (NFNL_SUBSYS_NFTABLES << 8) | ty,
            flags,
            seq,
            NFPROTO_IPV4,
            &setelem_attrs(TABLE, PEER_SET, chunk),
        );
        seqs.push(seq);
    }
    seq = seq.wrapping_add(1);
    push_msg(&mut buf, NFNL_MSG_BATCH_END, NLM_F_REQUEST, seq, 0, &[]);
    (buf, seqs)
}

/// The (sequence, errno) of every NLMSG_ERROR in a datagram (errno 0 is an ack).
pub(crate) fn parse_acks(mut b: &[u8]) -> Vec<(u32, i32)> {
    let mut out = Vec::new();
    while b.len() >= NLMSG_HDRLEN {
        let len = u32::from_ne_bytes(b[0..4].try_into().unwrap()) as usize;
        let ty = u16::from_ne_bytes(b[4..6].try_into().unwrap());
        let seq = u32::from_ne_bytes(b[8..12].try_into().unwrap());
        if len < NLMSG_HDRLEN || len > b.len() {
            break;
        }
        if ty == NLMSG_ERROR && len >= NLMSG_HDRLEN + 4 {
            let code = i32::from_ne_bytes(b[16..20].try_into().unwrap());
            out.push((seq, -code));
        }
        let step = (len + 3) & !3;
        b = &b[step.min(b.len())..];
    }
    out
}

/// A NETLINK_NETFILTER socket that changes the members of `set ip twill peers`.
pub struct PeerSet {
    sock: TokioSocket,
    seq: AtomicU32,
    timeout: Duration,
}

impl PeerSet {
    /// A socket in the caller's own namespace. Must be called inside a tokio runtime.
    pub fn current() -> Result<PeerSet> {
        Self::connect()
    }

    /// A socket inside `ns` (created on a short-lived thread in `ns`).
    pub fn open(ns: &NetNs) -> Result<PeerSet> {
        let rt = tokio::runtime::Handle::current();
        ns.run_in(move || {
            let _g = rt.enter();
            Self::connect()
        })?
    }

    fn connect() -> Result<PeerSet> {
        let sock = crate::netlink::netfilter_socket()
            .map_err(|e| Error::io("open a NETLINK_NETFILTER socket", e))?;
        Ok(PeerSet {
            sock,
            seq: AtomicU32::new(1),
            timeout: crate::netlink::DEFAULT_TIMEOUT,
        })
    }

    /// The same socket with another bound on each call (`--netlink-timeout`).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Adds `ips` to the set (members already there stay; no error for them).
    pub async fn add(&self, ips: &BTreeSet<Ipv4Addr>) -> Result<()> {
        self.change(SetOp::Add, ips).await
    }

    /// Deletes `ips` from the set; an element that is not there is not an error.
    pub async fn delete(&self, ips: &BTreeSet<Ipv4Addr>) -> Result<()> {
        self.change(SetOp::Delete, ips).await
    }

    async fn change(&self, op: SetOp, ips: &BTreeSet<Ipv4Addr>) -> Result<()> {
        if ips.is_empty() {
            return Ok(());
        }
        let v: Vec<Ipv4Addr> = ips.iter().copied().collect();
        let what = || describe(op, &v);
        crate::netlink::bounded(what, self.timeout, async {
            for part in v.chunks(ELEMS_PER_MSG * MSGS_PER_BATCH) {
                match (op, self.send_batch(op, part).await?) {
                    (_, 0) => {}
                    // One missing element aborts the whole batch: delete one at a time,
                    // each missing one counting as deleted.
                    (SetOp::Delete, libc::ENOENT) => {
                        for ip in part {
                            match self.send_batch(op, std::slice::from_ref(ip)).await? {
                                0 | libc::ENOENT => {}
                                errno => return Err(kernel_error(op, part, errno)),
                            }
                        }
                    }
                    (_, errno) => return Err(kernel_error(op, part, errno)),
                }
            }
            Ok(())
        })
        .await
    }

    /// Sends one batch and waits for the ack of each of its element messages: the first
    /// non-zero errno, or 0.
    async fn send_batch(&self, op: SetOp, ips: &[Ipv4Addr]) -> Result<i32> {
        let n = ips.len().div_ceil(ELEMS_PER_MSG) as u32 + 2;
        let seq0 = self.seq.fetch_add(n, Ordering::Relaxed);
        let (buf, mut want) = batch(op, seq0, ips);
        self.sock
            .send(&buf)
            .await
            .map_err(|e| Error::io(format!("nftables: send {}", describe(op, ips)), e))?;
        let mut first_err = 0;
        let mut rx = Vec::with_capacity(64 << 10);
        while !want.is_empty() {
            rx.clear();
            self.sock.recv(&mut rx).await.map_err(|e| {
                Error::io(
                    format!("nftables: receive the answer to {}", describe(op, ips)),
                    e,
                )
            })?;
            for (seq, errno) in parse_acks(&rx) {
                // Answers to an earlier call that timed out have other sequence numbers.
                if let Some(i) = want.iter().position(|s| *s == seq) {
                    want.swap_remove(i);
                    if first_err == 0 {
                        first_err = errno;
                    }
                } else if seq == seq0 && errno != 0 {
                    // An error on the batch header itself (e.g. no nf_tables in the kernel).
                    return Ok(errno);
                }
            }
        }
        Ok(first_err)
    }
}

/// "add 3 elements (10.0.0.1, 10.0.0.2, ...) to set ip twill peers"
fn describe(op: SetOp, ips: &[Ipv4Addr]) -> String {
    let shown: Vec<String> = ips.iter().take(3).map(|i| i.to_string()).collect();
    let more = if ips.len() > 3 { ", ..." } else { "" };
    let prep = if op == SetOp::Add { "to" } else { "from" };
    format!(
        "{} {} element{} ({}{more}) {prep} set ip {TABLE} {PEER_SET}",
        op.verb(),
        ips.len(),
        if ips.len() == 1 { "" } else { "s" },
        shown.join(", ")
    )
}

fn kernel_error(op: SetOp, ips: &[Ipv4Addr], errno: i32) -> Error {
    let why = match errno {
        libc::ENOENT => " (the table or the set does not exist)",
        libc::EPERM => " (needs CAP_NET_ADMIN)",
        _ => "",
    };
    Error::Nft(format!(
        "{}: {}{why}",
        describe(op, ips),
        std::io::Error::from_raw_os_error(errno)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u16_at(b: &[u8], i: usize) -> u16 {
        u16::from_ne_bytes(b[i..i + 2].try_into().unwrap())
    }
    fn u32_at(b: &[u8], i: usize) -> u32 {
        u32::from_ne_bytes(b[i..i + 4].try_into().unwrap())
    }

    /// The encoding, byte by byte where it matters: nlmsghdr lengths and types, the batch
    /// header's big-endian subsystem, 4-byte padding of the strings, NLA_F_NESTED on the
    /// nested attributes, the key in network order.
    #[test]
    fn one_element_batch_encodes_as_the_kernel_expects() {
        let (b, seqs) = batch(SetOp::Add, 100, &[Ipv4Addr::new(192, 168, 0, 2)]);
        assert_eq!(seqs, vec![101]);
        // BATCH_BEGIN: 20 bytes, type 0x10, seq 100, res_id = htons(10).
        assert_eq!(u32_at(&b, 0), 20);
        assert_eq!(u16_at(&b, 4), NFNL_MSG_BATCH_BEGIN);
        assert_eq!(u32_at(&b, 8), 100);
        assert_eq!(&b[16..20], &[0, 0, 0, 10]);
        // The element message.
        let m = &b[20..];
        let len = u32_at(m, 0) as usize;
        assert_eq!(u16_at(m, 4), (10 << 8) | 12);
        assert_eq!(u16_at(m, 6), NLM_F_REQUEST | NLM_F_CREATE | NLM_F_ACK);
        assert_eq!(u32_at(m, 8), 101);
        assert_eq!(&m[16..20], &[NFPROTO_IPV4, 0, 0, 0]);
        let a = &m[20..len];
        // "twill\0" = 6 bytes: attr len 10, padded to 12.
        assert_eq!(u16_at(a, 0), 10);
        assert_eq!(u16_at(a, 2), NFTA_SET_ELEM_LIST_TABLE);
        assert_eq!(&a[4..10], b"twill\0");
        assert_eq!(&a[10..12], &[0, 0]);
        // "peers\0": the same.
        assert_eq!(u16_at(a, 12), 10);
        assert_eq!(u16_at(a, 14), NFTA_SET_ELEM_LIST_SET);
        assert_eq!(&a[16..22], b"peers\0");
        // ELEMENTS { LIST_ELEM { KEY { DATA_VALUE 192.168.0.2 } } }: 4+4+4+4+4 = 20 bytes.
        let e = &a[24..];
        assert_eq!(u16_at(e, 0), 20);
        assert_eq!(u16_at(e, 2), NFTA_SET_ELEM_LIST_ELEMENTS | NLA_F_NESTED);
        assert_eq!(u16_at(e, 4), 16);
        assert_eq!(u16_at(e, 6), NFTA_LIST_ELEM | NLA_F_NESTED);
        assert_eq!(u16_at(e, 8), 12);
        assert_eq!(u16_at(e, 10), NFTA_SET_ELEM_KEY | NLA_F_NESTED);
        assert_eq!(u16_at(e, 12), 8);
        assert_eq!(u16_at(e, 14), NFTA_DATA_VALUE);
        assert_eq!(&e[16..20], &[192, 168, 0, 2]);
        assert_eq!(len, 20 + 24 + 20);
        // BATCH_END.
        let end = &m[len..];
        assert_eq!(end.len(), 20);
        assert_eq!(u16_at(end, 4), NFNL_MSG_BATCH_END);
        assert_eq!(u32_at(end, 8), 102);
    }

    #[test]
    fn large_sets_are_split_into_messages_and_deletes_ask_for_no_create() {
        let ips: Vec<Ipv4Addr> = (0..1300u32)
            .map(|i| Ipv4Addr::from(0x0a00_0000 + i))
            .collect();
        let (b, seqs) = batch(SetOp::Delete, 7, &ips);
        assert_eq!(seqs, vec![8, 9, 10]);
        let mut off = 20;
        for _ in 0..3 {
            assert_eq!(u16_at(&b, off + 4), (10 << 8) | 14);
            assert_eq!(u16_at(&b, off + 6), NLM_F_REQUEST | NLM_F_ACK);
            off += u32_at(&b, off) as usize;
        }
        assert_eq!(u16_at(&b, off + 4), NFNL_MSG_BATCH_END);
        assert_eq!(off + 20, b.len());
    }

    #[test]
    fn acks_and_errors_parse() {
        let mut d = Vec::new();
        for (seq, code) in [(5u32, 0i32), (6, -libc::ENOENT)] {
            d.extend_from_slice(&36u32.to_ne_bytes());
            d.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
            d.extend_from_slice(&0u16.to_ne_bytes());
            d.extend_from_slice(&seq.to_ne_bytes());
            d.extend_from_slice(&0u32.to_ne_bytes());
            d.extend_from_slice(&code.to_ne_bytes());
            d.extend_from_slice(&[0u8; 16]);
        }
        assert_eq!(parse_acks(&d), vec![(5, 0), (6, libc::ENOENT)]);
        // A truncated datagram yields what is complete, never a panic.
        assert_eq!(parse_acks(&d[..40]), vec![(5, 0)]);
        assert!(parse_acks(&[1, 2, 3]).is_empty());
    }

    #[test]
    fn errors_name_the_op_the_set_and_the_values() {
        let e = kernel_error(
            SetOp::Add,
            &[Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(10, 0, 0, 2)],
            libc::ENOENT,
        )
        .to_string();
        assert!(
            e.contains("add 2 elements (10.0.0.1, 10.0.0.2) to set ip twill peers"),
            "{e}"
        );
        assert!(e.contains("does not exist"), "{e}");
    }
}
