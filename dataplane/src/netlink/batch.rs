//! Several requests on one socket in one round trip: all are sent before the first answer is
//! read. The kernel handles one socket's requests one after the other, in the order sent, so
//! a request may rely on the ones before it (a route on the address made just before it),
//! and the caller pays one round trip instead of one per request.

use std::collections::VecDeque;

use futures::StreamExt;
use rtnetlink::Handle;
use rtnetlink::packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REPLACE, NLM_F_REQUEST, NetlinkMessage,
    NetlinkPayload,
};
use rtnetlink::packet_route::RouteNetlinkMessage;

use crate::{Error, Result};

/// Requests to send together, each with the name its error carries.
#[derive(Default)]
pub struct Batch {
    reqs: Vec<(RouteNetlinkMessage, u16, String)>,
}

const REQ_ACK: u16 = NLM_F_REQUEST | NLM_F_ACK;

impl Batch {
    pub fn new() -> Self {
        Self::default()
    }

    /// A change that is acknowledged (a set).
    pub fn ack(self, op: impl Into<String>, msg: RouteNetlinkMessage) -> Self {
        self.push(op, msg, REQ_ACK)
    }

    /// A create that fails with EEXIST if the object is there.
    pub fn create(self, op: impl Into<String>, msg: RouteNetlinkMessage) -> Self {
        self.push(op, msg, REQ_ACK | NLM_F_CREATE | NLM_F_EXCL)
    }

    /// A create that replaces the object if it is there.
    pub fn replace(self, op: impl Into<String>, msg: RouteNetlinkMessage) -> Self {
        self.push(op, msg, REQ_ACK | NLM_F_CREATE | NLM_F_REPLACE)
    }

    /// A get: its answer is the messages the kernel returns.
    pub fn get(self, op: impl Into<String>, msg: RouteNetlinkMessage) -> Self {
        self.push(op, msg, NLM_F_REQUEST)
    }

    fn push(mut self, op: impl Into<String>, msg: RouteNetlinkMessage, flags: u16) -> Self {
        self.reqs.push((msg, flags, op.into()));
        self
    }

    /// Sends every request, then collects each one's answer, in order.
    pub async fn send(self, handle: &Handle) -> Answers {
        let mut handle = handle.clone();
        // Every request is queued before the first answer is awaited.
        let streams: Vec<_> = self
            .reqs
            .into_iter()
            .map(|(msg, flags, op)| {
                let mut req = NetlinkMessage::from(msg);
                req.header.flags = flags;
                (op, handle.request(req))
            })
            .collect();
        let mut out = VecDeque::with_capacity(streams.len());
        for (op, s) in streams {
            let answer = match s {
                Ok(mut s) => {
                    let mut msgs = Vec::new();
                    let mut res = Ok(());
                    while let Some(m) = s.next().await {
                        match m.payload {
                            NetlinkPayload::Error(e) if e.code.is_some() => {
                                res = Err(rtnetlink::Error::NetlinkError(e))
                            }
                            NetlinkPayload::InnerMessage(m) => msgs.push(m),
                            _ => {}
                        }
                    }
                    res.map(|()| msgs)
                }
                Err(e) => Err(e),
            };
            out.push_back(answer.map_err(|e| Error::netlink(op, e)));
        }
        Answers(out)
    }
}

/// The answers of a [`Batch`], in the order of its requests.
pub struct Answers(VecDeque<Result<Vec<RouteNetlinkMessage>>>);

impl Answers {
    /// The next request's answer: the messages it returned, or its error (named by its op).
    pub fn take(&mut self) -> Result<Vec<RouteNetlinkMessage>> {
        self.0.pop_front().unwrap_or_else(|| {
            Err(Error::Invalid(
                "more answers asked for than requests sent".into(),
            ))
        })
    }

    /// The first error among the answers left, if any.
    pub fn all_ok(self) -> Result<()> {
        self.0.into_iter().try_for_each(|r| r.map(drop))
    }
}
