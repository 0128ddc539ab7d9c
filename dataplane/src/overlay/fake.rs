//! A recording [`Overlay`] for unit tests: keeps the programmed entries in memory and logs
//! every call, so that tests can assert what a reconcile did (and did not) do.

use std::sync::{Arc, Mutex};

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use super::{
    DirectRoute, EnsureOutcome, Fdb, Neigh, Overlay, Programmed, Route, RoutePath, VxlanLink,
    VxlanSpec,
};
use crate::Result;

/// One call made on a [`FakeOverlay`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FakeCall {
    EnsureVxlan(Box<VxlanSpec>),
    Dump,
    ReplaceNeigh(Neigh),
    DeleteNeigh(Neigh),
    ReplaceFdb(Fdb),
    DeleteFdb(Fdb),
    ReplaceRoute(Route),
    DeleteRoute(Route),
    ReplaceDirect(DirectRoute),
    DeleteDirect(DirectRoute),
    LookupRoute(Ipv4Addr),
}

#[derive(Default)]
struct State {
    link: Option<VxlanLink>,
    programmed: Programmed,
    calls: Vec<FakeCall>,
    /// The answers of `lookup_route` (none: no route).
    paths: BTreeMap<Ipv4Addr, RoutePath>,
}

/// In-memory overlay. Clones share state.
#[derive(Clone, Default)]
pub struct FakeOverlay {
    st: Arc<Mutex<State>>,
}

impl FakeOverlay {
    pub fn new() -> Self {
        Self::default()
    }

    /// The calls made so far, oldest first.
    pub fn calls(&self) -> Vec<FakeCall> {
        self.st.lock().unwrap().calls.clone()
    }

    /// The write calls (replace/delete) made so far.
    pub fn writes(&self) -> Vec<FakeCall> {
        self.calls()
            .into_iter()
            .filter(|c| {
                !matches!(
                    c,
                    FakeCall::Dump | FakeCall::EnsureVxlan(_) | FakeCall::LookupRoute(_)
                )
            })
            .collect()
    }

    pub fn clear_calls(&self) {
        self.st.lock().unwrap().calls.clear();
    }

    pub fn programmed(&self) -> Programmed {
        self.st.lock().unwrap().programmed.clone()
    }

    /// Sets the programmed state directly (simulates drift or a previous run).
    pub fn set_programmed(&self, p: Programmed) {
        self.st.lock().unwrap().programmed = p;
    }

    /// Sets how the fake kernel routes `ip` (`None`: it has no route to it).
    pub fn set_path(&self, ip: Ipv4Addr, path: Option<RoutePath>) {
        let mut st = self.st.lock().unwrap();
        match path {
            Some(p) => st.paths.insert(ip, p),
            None => st.paths.remove(&ip),
        };
    }

    fn record(&self, c: FakeCall) {
        self.st.lock().unwrap().calls.push(c);
    }

    /// Records the verb's call `c` and applies its `op` to the programmed state.
    fn apply(&self, c: FakeCall, op: super::Op) -> Result<()> {
        self.record(c);
        op.apply_to(&mut self.st.lock().unwrap().programmed);
        Ok(())
    }
}

impl Overlay for FakeOverlay {
    async fn get_vxlan(&self, _vni: u32) -> Result<Option<VxlanLink>> {
        Ok(self.st.lock().unwrap().link.clone())
    }

    async fn ensure_vxlan(&self, spec: &VxlanSpec) -> Result<(VxlanLink, EnsureOutcome)> {
        self.record(FakeCall::EnsureVxlan(Box::new(spec.clone())));
        let want = VxlanLink {
            index: 100,
            name: spec.name(),
            vni: Some(spec.vni),
            port: Some(spec.port),
            underlay_index: Some(spec.underlay_index),
            local: Some(spec.local),
            learning: Some(false),
            mtu: spec.mtu,
            mac: spec.mac,
            up: true,
            addresses: vec![ipnet::Ipv4Net::new(spec.address, 32).expect("/32")],
        };
        let mut st = self.st.lock().unwrap();
        let outcome = match &st.link {
            None => EnsureOutcome::Created,
            Some(l) => match l.mismatch(spec) {
                None => EnsureOutcome::Adopted,
                Some(reason) => {
                    st.programmed = Programmed::default();
                    EnsureOutcome::Recreated { reason }
                }
            },
        };
        st.link = Some(want.clone());
        Ok((want, outcome))
    }

    async fn dump(&self, _link: u32) -> Result<Programmed> {
        self.record(FakeCall::Dump);
        Ok(self.programmed())
    }

    async fn replace_neigh(&self, _link: u32, n: &Neigh) -> Result<()> {
        self.apply(FakeCall::ReplaceNeigh(*n), super::Op::ReplaceNeigh(*n))
    }

    async fn delete_neigh(&self, _link: u32, n: &Neigh) -> Result<()> {
        self.apply(FakeCall::DeleteNeigh(*n), super::Op::DeleteNeigh(*n))
    }

    async fn replace_fdb(&self, _link: u32, f: &Fdb) -> Result<()> {
        self.apply(FakeCall::ReplaceFdb(*f), super::Op::ReplaceFdb(*f))
    }

    async fn delete_fdb(&self, _link: u32, f: &Fdb) -> Result<()> {
        self.apply(FakeCall::DeleteFdb(*f), super::Op::DeleteFdb(*f))
    }

    async fn replace_route(&self, _link: u32, r: &Route) -> Result<()> {
        self.apply(FakeCall::ReplaceRoute(*r), super::Op::ReplaceRoute(*r))
    }

    async fn delete_route(&self, _link: u32, r: &Route) -> Result<()> {
        self.apply(FakeCall::DeleteRoute(*r), super::Op::DeleteRoute(*r))
    }

    async fn replace_direct(&self, r: &DirectRoute) -> Result<()> {
        self.apply(FakeCall::ReplaceDirect(*r), super::Op::ReplaceDirect(*r))
    }

    async fn delete_direct(&self, r: &DirectRoute) -> Result<()> {
        self.apply(FakeCall::DeleteDirect(*r), super::Op::DeleteDirect(*r))
    }

    async fn lookup_route(&self, ip: Ipv4Addr) -> Result<Option<RoutePath>> {
        self.record(FakeCall::LookupRoute(ip));
        Ok(self.st.lock().unwrap().paths.get(&ip).copied())
    }

    async fn remove_address(&self, _addr: ipnet::Ipv4Net) -> Result<Vec<u32>> {
        Ok(Vec::new())
    }
}
