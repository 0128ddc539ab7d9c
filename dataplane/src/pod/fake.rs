//! A recording fake of [`PodDataplane`] for unit tests of a plugin's logic (`cfg(test)` or the
//! `fakes` feature; never in a production build): it keeps links in memory, records every
//! call as a line (`"attach_pod cni0 ..."`), and fails the next call of a verb with a given
//! errno when told to.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use ipnet::IpNet;
use rtnetlink::packet_route::route::{RouteProtocol, RouteType};

use super::{AttachedVeth, Link, Mac, PodAddr, PodDataplane, Removal, Route, VethOwner, VethSpec};
use crate::{Error, Result};

/// One namespace's fake kernel. Clones share it (keep one to inspect after handing one
/// to the code under test).
#[derive(Default, Clone)]
pub struct Recording {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    calls: Mutex<Vec<String>>,
    fail: Mutex<HashMap<String, i32>>,
    links: Mutex<BTreeMap<String, Link>>,
    addrs: Mutex<Vec<(u32, IpNet)>>,
    routes: Mutex<Vec<Route>>,
}

impl Recording {
    pub fn new() -> Self {
        Self::default()
    }

    /// The next call of `verb` fails with `errno`.
    pub fn fail_next(&self, verb: &str, errno: i32) {
        self.inner.fail.lock().unwrap().insert(verb.into(), errno);
    }

    /// Forgets the calls so far.
    pub fn clear_calls(&self) {
        self.inner.calls.lock().unwrap().clear();
    }

    /// Puts an address on link `index`, as if the kernel had it.
    pub fn add_address(&self, index: u32, addr: IpNet) {
        self.inner.addrs.lock().unwrap().push((index, addr));
    }

    /// Every link's name.
    pub fn link_names(&self) -> Vec<String> {
        self.inner.links.lock().unwrap().keys().cloned().collect()
    }

    /// Every call so far, one line each.
    pub fn calls(&self) -> Vec<String> {
        self.inner.calls.lock().unwrap().clone()
    }

    /// Adds a link as if the kernel had it.
    pub fn add_link(&self, name: &str, kind: &str) -> Link {
        let mut links = self.inner.links.lock().unwrap();
        let l = Link {
            index: links.len() as u32 + 2,
            name: name.into(),
            mac: Some(Mac([2, 0, 0, 0, 0, links.len() as u8 + 2])),
            mtu: Some(1500),
            up: false,
            controller: None,
            kind: Some(kind.into()),
            peer: None,
            alias: None,
            vxlan: None,
        };
        links.insert(name.into(), l.clone());
        l
    }

    /// Sets a link's alias (and bridge), as if another program had.
    pub fn set_link(&self, name: &str, alias: Option<&str>, controller: Option<u32>) {
        if let Some(l) = self.inner.links.lock().unwrap().get_mut(name) {
            l.alias = alias.map(str::to_string);
            l.controller = controller;
        }
    }

    pub fn has_link(&self, name: &str) -> bool {
        self.inner.links.lock().unwrap().contains_key(name)
    }

    fn call(&self, verb: &str, line: String) -> Result<()> {
        self.inner.calls.lock().unwrap().push(line);
        match self.inner.fail.lock().unwrap().remove(verb) {
            Some(errno) => Err(Error::io(
                format!("fake {verb}"),
                std::io::Error::from_raw_os_error(errno),
            )),
            None => Ok(()),
        }
    }

    fn by_index(&self, index: u32) -> Option<String> {
        self.inner
            .links
            .lock()
            .unwrap()
            .values()
            .find(|l| l.index == index)
            .map(|l| l.name.clone())
    }
}

impl PodDataplane for Recording {
    async fn ensure_bridge(&self, name: &str, mac: Mac, mtu: u32) -> Result<Link> {
        self.call("ensure_bridge", format!("ensure_bridge {name} {mtu}"))?;
        if let Some(l) = self.inner.links.lock().unwrap().get(name)
            && l.kind.as_deref() != Some("bridge")
        {
            return Err(Error::Invalid(format!(
                "a link {name:?} exists and is not a bridge"
            )));
        }
        if !self.has_link(name) {
            let mut l = self.add_link(name, "bridge");
            l.mac = Some(mac);
            l.up = true;
            self.inner.links.lock().unwrap().insert(name.into(), l);
        }
        Ok(self.inner.links.lock().unwrap()[name].clone())
    }

    async fn attach_pod(
        &self,
        bridge: &Link,
        gateways: &[IpNet],
        spec: &VethSpec<'_>,
    ) -> Result<AttachedVeth> {
        let host = spec.host_name;
        let gw: Vec<String> = gateways.iter().map(|g| g.to_string()).collect();
        self.call(
            "attach_pod",
            format!(
                "attach_pod {} {} {host} {} {} hairpin={}",
                bridge.name,
                gw.join(","),
                spec.pod_ifname,
                spec.mtu,
                spec.hairpin
            ),
        )?;
        if self.has_link(host) {
            return Err(Error::io(
                "fake attach_pod",
                std::io::Error::from_raw_os_error(libc::EEXIST),
            ));
        }
        let mut h = self.add_link(host, "veth");
        h.up = true;
        h.mac = Some(spec.host_mac);
        h.controller = Some(bridge.index);
        h.alias = Some(spec.host_alias.to_string());
        // The pod end appears in the pod namespace's fake (the test adds it there, as
        // that fake's first link: index 2).
        h.peer = Some(2);
        self.inner
            .links
            .lock()
            .unwrap()
            .insert(host.into(), h.clone());
        Ok(AttachedVeth {
            host: h,
            pod_index: 2,
        })
    }

    async fn configure_pod(&self, index: u32, addrs: &[PodAddr]) -> Result<()> {
        let n = self.by_index(index).unwrap_or_default();
        let each: Vec<String> = addrs
            .iter()
            .map(|a| {
                let r: Vec<String> = a.routes.iter().map(|r| r.to_string()).collect();
                format!("{} via {} routes {}", a.addr, a.gateway, r.join(","))
            })
            .collect();
        self.call(
            "configure_pod",
            format!("configure_pod {n} {}", each.join("; ")),
        )?;
        if let Some(l) = self.inner.links.lock().unwrap().get_mut(&n) {
            l.up = true;
        }
        for a in addrs {
            self.inner.addrs.lock().unwrap().push((index, a.addr));
            for dst in &a.routes {
                self.inner.routes.lock().unwrap().push(Route {
                    dst: *dst,
                    gateway: Some(a.gateway),
                    oif: Some(index),
                    // What `ip route add` and rtnetlink's builder give a route.
                    protocol: RouteProtocol::Static,
                    kind: RouteType::Unicast,
                });
            }
        }
        Ok(())
    }

    async fn set_up(&self, index: u32) -> Result<()> {
        let n = self.by_index(index).unwrap_or_default();
        self.call("set_up", format!("set_up {n}"))?;
        if let Some(l) = self.inner.links.lock().unwrap().get_mut(&n) {
            l.up = true;
        }
        Ok(())
    }

    async fn link(&self, name: &str) -> Result<Option<Link>> {
        self.call("link", format!("link {name}"))?;
        Ok(self.inner.links.lock().unwrap().get(name).cloned())
    }

    async fn delete_link(&self, name: &str) -> Result<bool> {
        self.call("delete_link", format!("delete_link {name}"))?;
        Ok(self.inner.links.lock().unwrap().remove(name).is_some())
    }

    async fn bridge_ports(&self, bridge: u32) -> Result<Vec<Link>> {
        self.call("bridge_ports", format!("bridge_ports {bridge}"))?;
        Ok(self
            .inner
            .links
            .lock()
            .unwrap()
            .values()
            .filter(|l| l.controller == Some(bridge))
            .cloned()
            .collect())
    }

    async fn addresses(&self, index: u32) -> Result<Vec<IpNet>> {
        self.call("addresses", format!("addresses {index}"))?;
        Ok(self
            .inner
            .addrs
            .lock()
            .unwrap()
            .iter()
            .filter(|(i, _)| *i == index)
            .map(|(_, a)| *a)
            .collect())
    }

    async fn routes(&self, _family_of: IpAddr) -> Result<Vec<Route>> {
        self.call("routes", "routes".into())?;
        Ok(self.inner.routes.lock().unwrap().clone())
    }

    fn remove_link_now(&self, name: &str) -> Result<bool> {
        self.call("remove_link_now", format!("remove_link_now {name}"))?;
        Ok(self.inner.links.lock().unwrap().remove(name).is_some())
    }

    fn remove_veth(&self, name: &str, owner: &VethOwner) -> Result<Removal> {
        self.call("remove_veth", format!("remove_veth {name}"))?;
        let Some(l) = self.inner.links.lock().unwrap().get(name).cloned() else {
            return Ok(Removal::Absent);
        };
        let lookup = |n: &str| self.inner.links.lock().unwrap().get(n).cloned();
        if !owner.owns(&l, lookup) {
            return Ok(Removal::Kept(l));
        }
        self.inner.links.lock().unwrap().remove(name);
        Ok(Removal::Removed)
    }
}
