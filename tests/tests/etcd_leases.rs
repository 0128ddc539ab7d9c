//! Subnet leases against a real etcd (started per test by the harness).

use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use ipnet::Ipv4Net;
use twill_ipam::lease::{LeaseAttrs, LeaseEvent};
use twill_ipam::netconf::NetConfig;
use twill_ipam::store::{LeaseStore, LeaseWatch, StoreError};
use twill_tests::etcd::{EtcdServer, TcpProxy};

const PREFIX: &str = "/twill/network";

fn net(s: &str) -> Ipv4Net {
    s.parse().unwrap()
}

fn attrs(node: &str, n: u32) -> LeaseAttrs {
    LeaseAttrs::vxlan(
        node,
        Ipv4Addr::from(0xc0a8_0000 + n),
        1,
        format!("aa:bb:cc:00:{:02x}:{:02x}", (n >> 8) & 0xff, n & 0xff),
    )
}

/// `attrs(node, n)` with the VTEP MAC of `mac_n`: the same node (same PublicIP) with new
/// attributes (a PublicIP change of a live lease is a duplicate name, refused).
fn attrs_mac(node: &str, n: u32, mac_n: u32) -> LeaseAttrs {
    let mut a = attrs(node, n);
    a.backend_data.vtep_mac = attrs(node, mac_n).backend_data.vtep_mac;
    a
}

async fn setup(etcd: &EtcdServer, cfg_json: &str) -> (LeaseStore, NetConfig) {
    let store = LeaseStore::connect(etcd.options(PREFIX)).await.unwrap();
    let cfg = NetConfig::from_json(cfg_json).unwrap();
    store.put_config(&cfg, false).await.unwrap();
    (store, cfg)
}

const NET16: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#;

/// Next event within `within`, or panic.
async fn next_event(w: &mut LeaseWatch, within: Duration) -> LeaseEvent {
    tokio::time::timeout(within, w.next())
        .await
        .expect("an event in time")
        .expect("watch task alive")
}

/// Asserts that no event arrives within `d`.
async fn no_event(w: &mut LeaseWatch, d: Duration) {
    if let Ok(ev) = tokio::time::timeout(d, w.next()).await {
        panic!("unexpected event {ev:?}");
    }
}

/// Waits (10 s at most per event) until a fresh watch reports `subnet` removed; any other
/// Removed event before it fails the test. Returns the watch, positioned after the event.
async fn wait_removed(store: &LeaseStore, subnet: Ipv4Net) -> LeaseWatch {
    let mut w = synced_watch(store).await;
    loop {
        if let LeaseEvent::Removed(l) = next_event(&mut w, Duration::from_secs(10)).await {
            assert_eq!(l.subnet, subnet);
            return w;
        }
    }
}

async fn synced_watch(store: &LeaseStore) -> LeaseWatch {
    let mut w = store.watch();
    tokio::time::timeout(Duration::from_secs(10), w.wait_synced())
        .await
        .expect("synced in time")
        .expect("watch alive");
    w
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_parallel_acquirers_get_distinct_subnets_then_network_full() {
    let etcd = EtcdServer::start().unwrap();
    // Exactly 200 subnets: 10.10.1.0/24 .. 10.10.200.0/24.
    let (store, cfg) = setup(
        &etcd,
        r#"{"Network":"10.10.0.0/16","SubnetLen":24,"SubnetMin":"10.10.1.0","SubnetMax":"10.10.200.0"}"#,
    )
    .await;
    assert_eq!(cfg.subnet_count(), 200);
    let mut tasks = Vec::new();
    for i in 0..200u32 {
        let (store, cfg) = (store.clone(), cfg.clone());
        tasks.push(tokio::spawn(async move {
            store
                .acquire(
                    &cfg,
                    &attrs(&format!("node-{i}"), i),
                    Duration::from_secs(60),
                )
                .await
        }));
    }
    let mut subnets = HashSet::new();
    for t in tasks {
        let lease = t.await.unwrap().expect("every acquirer succeeds");
        assert!(cfg.is_valid_subnet(&lease.subnet), "{}", lease.subnet);
        assert!(cfg.network.contains(&lease.subnet));
        assert!(subnets.insert(lease.subnet), "duplicate {}", lease.subnet);
    }
    assert_eq!(subnets.len(), 200);
    let (listed, _) = store.list().await.unwrap();
    assert_eq!(listed.len(), 200);

    let err = store
        .acquire(&cfg, &attrs("node-201", 201), Duration::from_secs(60))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::NetworkFull { .. }), "{err}");
    assert!(err.to_string().contains("network full"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_gets_the_same_subnet_also_after_expiry() {
    let etcd = EtcdServer::start().unwrap();
    let (store, cfg) = setup(&etcd, NET16).await;
    let a = attrs("node-a", 1);
    let first = store
        .acquire(&cfg, &a, Duration::from_secs(2))
        .await
        .unwrap();
    // Other nodes come and go.
    for i in 0..5 {
        store
            .acquire(
                &cfg,
                &attrs(&format!("other-{i}"), 10 + i),
                Duration::from_secs(60),
            )
            .await
            .unwrap();
    }
    // A restart while the key is alive: the key names this node, it is taken over.
    let again = store
        .acquire(&cfg, &a, Duration::from_secs(2))
        .await
        .unwrap();
    assert_eq!(again.subnet, first.subnet);
    assert_ne!(again.etcd_lease, first.etcd_lease);
    assert_eq!(store.list().await.unwrap().0.len(), 6);

    // A restart after the lease expired: the node's previous subnet (from its subnet file)
    // is preferred when still free.
    wait_removed(&store, first.subnet).await;
    assert!(store.get(&first.subnet).await.unwrap().is_none());
    let back = store
        .acquire_with(&cfg, &a, Duration::from_secs(60), Some(first.subnet))
        .await
        .unwrap();
    assert_eq!(back.subnet, first.subnet);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reboot_past_ttl_without_hint_gets_the_home_subnet_back() {
    // A node that was down past its TTL and lost /run (no subnet file, so no hint): its home
    // subnet (a hash of its name) is still free, so it gets the same subnet as before.
    let etcd = EtcdServer::start().unwrap();
    let (store, cfg) = setup(&etcd, NET16).await;
    let a = attrs("node-reboot", 1);
    let first = store
        .acquire(&cfg, &a, Duration::from_secs(1))
        .await
        .unwrap();
    for i in 0..20 {
        let other = attrs(&format!("peer-{i}"), 10 + i);
        store
            .acquire(&cfg, &other, Duration::from_secs(60))
            .await
            .unwrap();
    }
    wait_removed(&store, first.subnet).await;
    let back = store
        .acquire(&cfg, &a, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(back.subnet, first.subnet);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ttl_expiry_gives_a_removed_event_within_ttl_plus_one_second() {
    let etcd = EtcdServer::start().unwrap();
    let (store, cfg) = setup(&etcd, NET16).await;
    let mut w = synced_watch(&store).await;
    let ttl = Duration::from_secs(2);
    let t0 = Instant::now();
    let lease = store.acquire(&cfg, &attrs("node-a", 1), ttl).await.unwrap();
    match next_event(&mut w, Duration::from_secs(5)).await {
        LeaseEvent::Added(l) => assert_eq!(l.subnet, lease.subnet),
        e => panic!("expected Added, got {e:?}"),
    }
    let deadline = tokio::time::Instant::from_std(t0 + ttl + Duration::from_secs(1));
    let ev = tokio::time::timeout_at(deadline, w.next())
        .await
        .expect("removed within TTL + 1 s")
        .unwrap();
    match ev {
        LeaseEvent::Removed(l) => {
            assert_eq!(l.subnet, lease.subnet);
            assert_eq!(
                l.attrs.node_name, "node-a",
                "removed carries the lease content"
            );
        }
        e => panic!("expected Removed, got {e:?}"),
    }
    eprintln!("removed {:?} after acquire", t0.elapsed());
    assert!(w.state().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_survives_etcd_restart_without_losing_or_repeating_events() {
    let mut etcd = EtcdServer::start().unwrap();
    let (store, cfg) = setup(&etcd, NET16).await;
    let ttl = Duration::from_secs(600);
    let a = store
        .acquire_with(&cfg, &attrs("a", 1), ttl, Some(net("10.244.1.0/24")))
        .await
        .unwrap();
    let mut w = synced_watch(&store).await;
    assert_eq!(w.state().len(), 1);
    let b = store
        .acquire_with(&cfg, &attrs("b", 2), ttl, Some(net("10.244.2.0/24")))
        .await
        .unwrap();
    match next_event(&mut w, Duration::from_secs(5)).await {
        LeaseEvent::Added(l) => assert_eq!(l.subnet, b.subnet),
        e => panic!("{e:?}"),
    }

    etcd.stop().unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    etcd.restart().unwrap();
    // Changes right after the restart, before the watch is back.
    let writer = LeaseStore::connect(etcd.options(PREFIX)).await.unwrap();
    assert!(writer.release(a.subnet).await.unwrap());
    let c = writer
        .acquire_with(&cfg, &attrs("c", 3), ttl, Some(net("10.244.3.0/24")))
        .await
        .unwrap();
    let b2 = writer
        .acquire(&cfg, &attrs_mac("b", 2, 22), ttl)
        .await
        .unwrap();
    assert_eq!(b2.subnet, b.subnet);

    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(next_event(&mut w, Duration::from_secs(20)).await);
    }
    match &got[0] {
        LeaseEvent::Removed(l) => assert_eq!(l.subnet, a.subnet),
        e => panic!("{e:?}"),
    }
    match &got[1] {
        LeaseEvent::Added(l) => assert_eq!(l.subnet, c.subnet),
        e => panic!("{e:?}"),
    }
    match &got[2] {
        LeaseEvent::Changed { old, new } => {
            assert_eq!(old.attrs.backend_data.vtep_mac, "aa:bb:cc:00:00:02");
            assert_eq!(new.attrs.backend_data.vtep_mac, "aa:bb:cc:00:00:16");
        }
        e => panic!("{e:?}"),
    }
    no_event(&mut w, Duration::from_millis(1500)).await;
    let st = w.stats();
    assert!(st.reconnects >= 1, "{st:?}");
    assert_eq!(st.lists, 1, "resumed, not re-listed: {st:?}");
    let keys: Vec<Ipv4Net> = w.state().keys().copied().collect();
    let mut want = vec![b.subnet, c.subnet];
    want.sort();
    assert_eq!(keys, want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_while_disconnected_causes_a_relist_and_diff() {
    let etcd = EtcdServer::start().unwrap();
    let (store, cfg) = setup(&etcd, NET16).await;
    let ttl = Duration::from_secs(600);
    let a = store
        .acquire_with(&cfg, &attrs("a", 1), ttl, Some(net("10.244.1.0/24")))
        .await
        .unwrap();
    let b = store
        .acquire_with(&cfg, &attrs("b", 2), ttl, Some(net("10.244.2.0/24")))
        .await
        .unwrap();
    let proxy = TcpProxy::start(etcd.client_port()).await.unwrap();
    let mut o = etcd.options(PREFIX);
    o.endpoints = vec![proxy.endpoint()];
    let via_proxy = LeaseStore::connect(o).await.unwrap();
    let mut w = synced_watch(&via_proxy).await;
    assert_eq!(w.state().len(), 2);

    proxy.cut();
    assert!(store.release(a.subnet).await.unwrap());
    let c = store
        .acquire_with(&cfg, &attrs("c", 3), ttl, Some(net("10.244.3.0/24")))
        .await
        .unwrap();
    let b2 = store
        .acquire(&cfg, &attrs_mac("b", 2, 22), ttl)
        .await
        .unwrap();
    assert_eq!(b2.subnet, b.subnet);
    let (_, rev) = store.list().await.unwrap();
    let mut client = store.client().clone();
    client.compact(rev, None).await.unwrap();
    proxy.restore();

    let mut removed = Vec::new();
    let mut added = Vec::new();
    let mut changed = Vec::new();
    loop {
        match next_event(&mut w, Duration::from_secs(20)).await {
            LeaseEvent::Removed(l) => removed.push(l.subnet),
            LeaseEvent::Added(l) => added.push(l.subnet),
            LeaseEvent::Changed { new, .. } => changed.push(new.subnet),
            LeaseEvent::Invalid { key, .. } => panic!("unexpected invalid key {key}"),
            LeaseEvent::Synced { revision } => {
                assert!(revision >= rev);
                break;
            }
        }
    }
    assert_eq!(removed, vec![a.subnet]);
    assert_eq!(added, vec![c.subnet]);
    assert_eq!(changed, vec![b.subnet]);
    let st = w.stats();
    assert_eq!(st.compactions, 1, "{st:?}");
    assert_eq!(st.lists, 2, "{st:?}");
    no_event(&mut w, Duration::from_millis(1000)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holder_renews_and_reacquires_the_same_subnet_after_a_manual_delete() {
    let etcd = EtcdServer::start().unwrap();
    let (store, cfg) = setup(&etcd, NET16).await;
    let mut h = store.hold(cfg.clone(), attrs("node-a", 1), Duration::from_secs(2));
    let lease = tokio::time::timeout(Duration::from_secs(10), h.acquired())
        .await
        .unwrap();
    // Outlive the TTL several times: renewals keep it.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let st = h.stats();
    assert!(st.renewals >= 3, "{st:?}");
    assert_eq!(st.losses, 0, "{st:?}");
    assert_eq!(
        store.get(&lease.subnet).await.unwrap().unwrap().etcd_lease,
        lease.etcd_lease
    );

    // Deleted by hand: lost, counted, re-acquired with the same subnet.
    let mut client = store.client().clone();
    client
        .delete(store.lease_key(&lease.subnet), None)
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let st = h.stats();
        if st.losses == 1 && st.acquisitions == 2 && h.state().held {
            break;
        }
        assert!(Instant::now() < deadline, "not re-acquired: {st:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let again = h.state().lease.unwrap();
    assert_eq!(again.subnet, lease.subnet);
    let in_etcd = store.get(&lease.subnet).await.unwrap().unwrap();
    assert_eq!(in_etcd.attrs.node_name, "node-a");
    assert_eq!(in_etcd.etcd_lease, again.etcd_lease);

    // New attributes (e.g. a recreated VXLAN device's MAC) go to the same key and lease.
    let mut w = synced_watch(&store).await;
    let mut new_attrs = attrs("node-a", 1);
    new_attrs.backend_data.vtep_mac = "02:00:00:00:99:99".into();
    h.update_attrs(new_attrs);
    match next_event(&mut w, Duration::from_secs(5)).await {
        LeaseEvent::Changed { old, new } => {
            assert_eq!(new.subnet, lease.subnet);
            assert_eq!(old.attrs.vtep_mac(), "aa:bb:cc:00:00:01");
            assert_eq!(new.attrs.vtep_mac(), "02:00:00:00:99:99");
            assert_eq!(new.etcd_lease, again.etcd_lease);
        }
        e => panic!("{e:?}"),
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let st = h.stats();
    assert_eq!((st.losses, st.acquisitions), (1, 2), "{st:?}");
    assert_eq!(
        h.state().lease.unwrap().attrs.vtep_mac(),
        "02:00:00:00:99:99"
    );

    // Explicit release deletes the key.
    assert!(h.release().await.unwrap());
    assert!(store.get(&lease.subnet).await.unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holder_rides_out_an_outage_and_recovers_the_subnet_after_expiry() {
    let etcd = EtcdServer::start().unwrap();
    let (store, cfg) = setup(&etcd, NET16).await;
    let proxy = TcpProxy::start(etcd.client_port()).await.unwrap();
    let mut o = etcd.options(PREFIX);
    o.endpoints = vec![proxy.endpoint()];
    o.timeout = Duration::from_millis(500);
    let via_proxy = LeaseStore::new(o).await.unwrap();
    let mut h = via_proxy.hold(cfg.clone(), attrs("node-a", 1), Duration::from_secs(3));
    let lease = tokio::time::timeout(Duration::from_secs(10), h.acquired())
        .await
        .unwrap();

    // A short outage (less than the TTL): the lease survives.
    proxy.cut();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    proxy.restore();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let st = h.stats();
    assert_eq!(st.losses, 0, "{st:?}");
    assert!(st.errors >= 1, "{st:?}");
    assert!(h.state().healthy);

    // A long outage: etcd expires the lease; back online, the holder takes the same subnet.
    proxy.cut();
    let mut w = wait_removed(&store, lease.subnet).await;
    assert!(!h.state().healthy);
    proxy.restore();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let s = h.state();
        if h.stats().acquisitions == 2 && s.held {
            assert_eq!(s.lease.unwrap().subnet, lease.subnet);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not re-acquired: {:?}",
            h.stats()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(h.stats().losses, 1);
    match next_event(&mut w, Duration::from_secs(5)).await {
        LeaseEvent::Added(l) => assert_eq!(l.subnet, lease.subnet),
        e => panic!("{e:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reservations_are_honoured() {
    let etcd = EtcdServer::start().unwrap();
    // Three subnets only.
    let (store, cfg) = setup(&etcd, r#"{"Network":"10.1.0.0/26"}"#).await;
    assert_eq!(cfg.subnet_count(), 3);
    let reserved: Ipv4Net = "10.1.0.32/28".parse().unwrap();
    let mut r = LeaseAttrs::vxlan("node-r", Ipv4Addr::UNSPECIFIED, 0, "");
    r.backend_type.clear();
    let res = store.reserve(reserved, &r).await.unwrap();
    assert!(res.reserved);
    // Others never get it.
    let x = store
        .acquire(&cfg, &attrs("x", 1), Duration::from_secs(60))
        .await
        .unwrap();
    let y = store
        .acquire(&cfg, &attrs("y", 2), Duration::from_secs(60))
        .await
        .unwrap();
    assert!(x.subnet != reserved && y.subnet != reserved);
    let err = store
        .acquire(&cfg, &attrs("z", 3), Duration::from_secs(60))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::NetworkFull { .. }), "{err}");
    // Reserving a held subnet for another node is refused.
    assert!(matches!(
        store.reserve(x.subnet, &r).await.unwrap_err(),
        StoreError::Conflict { .. }
    ));
    // The node it is reserved for takes it, without TTL, and its attrs are written.
    let got = store
        .acquire(&cfg, &attrs("node-r", 9), Duration::from_secs(2))
        .await
        .unwrap();
    assert_eq!(got.subnet, reserved);
    assert!(got.reserved);
    let in_etcd = store.get(&reserved).await.unwrap().unwrap();
    assert!(in_etcd.reserved);
    assert_eq!(in_etcd.attrs.public_ip, Ipv4Addr::new(192, 168, 0, 9));
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(store.get(&reserved).await.unwrap().is_some(), "no TTL");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_fields_survive_a_takeover_and_flannel_leases_are_read() {
    let etcd = EtcdServer::start().unwrap();
    let (store, cfg) = setup(&etcd, NET16).await;
    let mut client = store.client().clone();
    // A lease written by flanneld (no NodeName) and one by a newer twill (extra fields).
    client
        .put(
            format!("{PREFIX}/subnets/10.244.7.0-24"),
            r#"{"PublicIP":"192.168.9.9","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"0a:0b:0c:0d:0e:0f"}}"#,
            None,
        )
        .await
        .unwrap();
    client
        .put(
            format!("{PREFIX}/subnets/10.244.8.0-24"),
            r#"{"PublicIP":"192.168.9.8","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"0a:0b:0c:0d:0e:08"},"NodeName":"new","Zone":"z1"}"#,
            None,
        )
        .await
        .unwrap();
    let (leases, _) = store.list().await.unwrap();
    assert_eq!(leases.len(), 2);
    assert_eq!(leases[0].attrs.node_name, "");
    assert!(leases[0].attrs.is_routable());
    assert_eq!(leases[1].attrs.extra.get("Zone").unwrap(), "z1");
    // The "new" node restarts on this version: takes over its key, keeping the unknown field
    // it passes back (the daemon carries the extra fields of its own lease).
    let mut a = leases[1].attrs.clone();
    a.backend_data.vtep_mac = "0a:0b:0c:0d:0e:18".into();
    let l = store
        .acquire(&cfg, &a, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(l.subnet, "10.244.8.0/24".parse::<Ipv4Net>().unwrap());
    let raw = client
        .get(format!("{PREFIX}/subnets/10.244.8.0-24"), None)
        .await
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(raw.kvs()[0].value()).unwrap();
    assert_eq!(v["Zone"], "z1");
    assert_eq!(v["BackendData"]["VtepMAC"], "0a:0b:0c:0d:0e:18");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_changes_that_strand_leases_are_refused_unless_forced() {
    let etcd = EtcdServer::start().unwrap();
    let (store, cfg) = setup(&etcd, NET16).await;
    let l = store
        .acquire_with(
            &cfg,
            &attrs("a", 1),
            Duration::from_secs(60),
            Some("10.244.200.0/24".parse().unwrap()),
        )
        .await
        .unwrap();
    assert_eq!(l.subnet.to_string(), "10.244.200.0/24");
    let narrower = NetConfig::from_json(r#"{"Network":"10.244.0.0/17"}"#).unwrap();
    match store.put_config(&narrower, false).await.unwrap_err() {
        StoreError::Refused { stranded, .. } => assert_eq!(stranded, vec![l.subnet]),
        e => panic!("{e}"),
    }
    let vni = NetConfig::from_json(r#"{"Network":"10.244.0.0/16","Backend":{"VNI":7}}"#).unwrap();
    let e = store.put_config(&vni, false).await.unwrap_err();
    assert!(e.to_string().contains("Backend.VNI"), "{e}");
    let wider = NetConfig::from_json(r#"{"Network":"10.240.0.0/12","SubnetLen":24}"#).unwrap();
    store.put_config(&wider, false).await.unwrap();
    store.put_config(&narrower, true).await.unwrap();
    assert_eq!(store.get_config().await.unwrap().unwrap(), narrower);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_etcd_gives_a_clear_error() {
    // A port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut o = twill_ipam::store::EtcdOptions::new([format!("http://127.0.0.1:{port}")]);
    o.timeout = Duration::from_millis(500);
    let err = LeaseStore::connect(o.clone()).await.unwrap_err();
    assert!(matches!(err, StoreError::Unreachable { .. }), "{err}");
    assert!(
        err.to_string().contains(&format!("127.0.0.1:{port}")),
        "{err}"
    );
    // A lazily built store fails each request with a timeout/etcd error, and the watch just
    // keeps retrying (no panic).
    let store = LeaseStore::new(o).await.unwrap();
    assert!(store.list().await.unwrap_err().is_transient());
    let mut w = store.watch();
    let cfg = NetConfig::from_json(NET16).unwrap();
    let h = store.hold(cfg, attrs("a", 1), Duration::from_secs(10));
    no_event(&mut w, Duration::from_millis(1500)).await;
    assert!(w.stats().errors >= 1);
    let (st, hs) = (h.state(), h.stats());
    assert!(!st.held && !st.healthy && st.lease.is_none(), "{st:?}");
    assert!(st.last_error.is_some() && hs.errors >= 1, "{st:?} {hs:?}");
    // http:// with TLS files is an option error.
    let mut bad = twill_ipam::store::EtcdOptions::new(["http://127.0.0.1:1"]);
    bad.ca_file = Some("/nonexistent/ca.pem".into());
    assert!(matches!(
        LeaseStore::new(bad).await.unwrap_err(),
        StoreError::Options(_)
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_endpoints_work_with_one_of_them_down() {
    let etcd = EtcdServer::start().unwrap();
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut o = etcd.options(PREFIX);
    o.endpoints = vec![format!("http://127.0.0.1:{dead}"), etcd.endpoint()];
    let store = LeaseStore::connect(o).await.unwrap();
    let cfg = NetConfig::from_json(NET16).unwrap();
    store.put_config(&cfg, false).await.unwrap();
    for i in 0..20 {
        store
            .acquire(&cfg, &attrs(&format!("n{i}"), i), Duration::from_secs(60))
            .await
            .unwrap();
    }
    assert_eq!(store.list().await.unwrap().0.len(), 20);
    // Streams too: a fresh store (starting at the dead endpoint again) watches and holds.
    let mut o = etcd.options(PREFIX);
    o.endpoints = vec![format!("http://127.0.0.1:{dead}"), etcd.endpoint()];
    let fresh = LeaseStore::new(o).await.unwrap();
    let mut w = synced_watch(&fresh).await;
    assert_eq!(w.state().len(), 20);
    let mut h = fresh.hold(cfg.clone(), attrs("held", 99), Duration::from_secs(2));
    let l = tokio::time::timeout(Duration::from_secs(10), h.acquired())
        .await
        .unwrap();
    match next_event(&mut w, Duration::from_secs(5)).await {
        LeaseEvent::Added(a) => assert_eq!(a.subnet, l.subnet),
        e => panic!("{e:?}"),
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        h.stats().renewals >= 1 && h.stats().losses == 0,
        "{:?}",
        h.stats()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_relists_when_etcd_comes_back_empty() {
    let mut etcd = EtcdServer::start().unwrap();
    let (store, cfg) = setup(&etcd, NET16).await;
    let ttl = Duration::from_secs(600);
    for i in 0..3 {
        store
            .acquire(&cfg, &attrs(&format!("n{i}"), i), ttl)
            .await
            .unwrap();
    }
    // Push the revision up so that the new store's revision is clearly lower.
    let mut client = store.client().clone();
    for i in 0..20 {
        client
            .put(format!("/tw-other/{i}"), "x", None)
            .await
            .unwrap();
    }
    let mut w = synced_watch(&store).await;
    assert_eq!(w.state().len(), 3);
    etcd.stop().unwrap();
    std::fs::remove_dir_all(etcd.data_dir()).unwrap();
    etcd.restart().unwrap();
    let mut removed = 0;
    loop {
        match next_event(&mut w, Duration::from_secs(20)).await {
            LeaseEvent::Removed(_) => removed += 1,
            LeaseEvent::Synced { .. } => break,
            e => panic!("{e:?}"),
        }
    }
    assert_eq!(removed, 3);
    assert!(w.state().is_empty());
    let writer = LeaseStore::connect(etcd.options(PREFIX)).await.unwrap();
    writer.put_config(&cfg, false).await.unwrap();
    let l = writer.acquire(&cfg, &attrs("new", 9), ttl).await.unwrap();
    match next_event(&mut w, Duration::from_secs(10)).await {
        LeaseEvent::Added(a) => assert_eq!(a.subnet, l.subnet),
        e => panic!("{e:?}"),
    }
}
