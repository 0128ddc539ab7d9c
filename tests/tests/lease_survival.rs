//! A node keeps its subnet through etcd outages and against a second node of the same name
//! (issue 14), against a real etcd started per test by the harness.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use twill_ipam::lease::LeaseAttrs;
use twill_ipam::netconf::NetConfig;
use twill_ipam::store::{LeaseHolder, LeaseStore};
use twill_tests::etcd::{EtcdServer, TcpProxy};

const PREFIX: &str = "/twill/network";
const NET16: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#;

fn attrs(node: &str, n: u32) -> LeaseAttrs {
    LeaseAttrs::vxlan(
        node,
        Ipv4Addr::from(0xc0a8_0000 + n),
        1,
        format!("aa:bb:cc:00:{:02x}:{:02x}", (n >> 8) & 0xff, n & 0xff),
    )
}

async fn setup(etcd: &EtcdServer) -> (LeaseStore, NetConfig) {
    let store = LeaseStore::connect(etcd.options(PREFIX)).await.unwrap();
    let cfg = NetConfig::from_json(NET16).unwrap();
    store.put_config(&cfg, false).await.unwrap();
    (store, cfg)
}

/// A store that reaches etcd through `proxy` only, with short request timeouts.
async fn store_via(etcd: &EtcdServer, proxy: &TcpProxy) -> LeaseStore {
    let mut o = etcd.options(PREFIX);
    o.endpoints = vec![proxy.endpoint()];
    o.timeout = Duration::from_millis(500);
    LeaseStore::new(o).await.unwrap()
}

/// Polls `cond` every 20 ms until it holds; panics with `what` after `within`.
async fn wait_until(within: Duration, what: &str, mut cond: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < within, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    start.elapsed()
}

async fn acquired(h: &mut LeaseHolder) -> twill_ipam::lease::Lease {
    tokio::time::timeout(Duration::from_secs(10), h.acquired())
        .await
        .expect("acquired in time")
}

/// Proves that renewal after an outage happens within seconds, before etcd's expiry, with
/// the same etcd lease: etcd stays up (its lease clock runs), the node is cut off from it
/// for 26 s of a 30 s TTL (many retry intervals), then reconnected. Before the fix the
/// retries backed off up to TTL/3 (10 s) and the last one was clamped to a local deadline
/// later than etcd's expiry, so the first try after the reconnection came too late: the
/// lease was lost and re-acquired.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewal_after_an_outage_happens_within_seconds_with_the_same_etcd_lease() {
    let etcd = EtcdServer::start().unwrap();
    let (store, cfg) = setup(&etcd).await;
    let proxy = TcpProxy::start(etcd.client_port()).await.unwrap();
    let via = store_via(&etcd, &proxy).await;
    let ttl = Duration::from_secs(30);
    let mut h = via.hold(cfg, attrs("node-a", 1), ttl);
    let lease = acquired(&mut h).await;

    // Cut right after a renewal: etcd's expiry is then ~30 s away.
    let r0 = h.stats().renewals;
    wait_until(Duration::from_secs(15), "first renewal", || {
        h.stats().renewals > r0
    })
    .await;
    proxy.cut();
    let cut_at = Instant::now();
    let renewals = h.stats().renewals;
    tokio::time::sleep(Duration::from_secs(26).saturating_sub(cut_at.elapsed())).await;
    assert_eq!(h.stats().renewals, renewals, "nothing got through the cut");
    assert!(
        h.stats().errors >= 3,
        "several retries failed: {:?}",
        h.stats()
    );
    proxy.restore();

    // Renewed within seconds (≤ RETRY_CAP + jitter + one request timeout), before expiry.
    let took = wait_until(Duration::from_secs(4), "renewal after the outage", || {
        h.stats().renewals > renewals
    })
    .await;
    eprintln!("renewed {took:?} after the reconnection");
    let st = h.stats();
    assert_eq!(st.losses, 0, "{st:?}");
    assert_eq!(st.acquisitions, 1, "{st:?}");
    let s = h.state();
    assert!(s.held && s.healthy, "{s:?}");
    let now = s.lease.unwrap();
    assert_eq!(now.subnet, lease.subnet);
    assert_eq!(now.etcd_lease, lease.etcd_lease, "the same etcd lease");
    // etcd agrees: the key is bound to that lease, which has most of its TTL again.
    let k = store
        .get(&lease.subnet)
        .await
        .unwrap()
        .expect("key still there");
    assert_eq!(k.etcd_lease, lease.etcd_lease);
    let left = store
        .expires(lease.etcd_lease)
        .await
        .unwrap()
        .expect("lease alive")
        .duration_since(std::time::SystemTime::now())
        .unwrap_or_default();
    assert!(left > Duration::from_secs(20), "TTL left {left:?}");
}

/// Proves that a second node with the name of a live node (another PublicIP: a cloned VM, a
/// hostname default) does not take its lease over, and fails with a message naming the
/// other node's IP; that the same name from the same PublicIP (a restart) does take it over
/// (positive control); and that once the other lease has expired, the second node acquires.
/// Before the fix the second node took the key over, and the two took it from each other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_node_name_from_another_public_ip_does_not_take_the_lease_over() {
    let etcd = EtcdServer::start().unwrap();
    let (store, cfg) = setup(&etcd).await;
    let first = store
        .acquire(&cfg, &attrs("node-dup", 1), Duration::from_secs(4))
        .await
        .unwrap();
    // The clone: same name, another PublicIP.
    let e = store
        .acquire(&cfg, &attrs("node-dup", 2), Duration::from_secs(4))
        .await
        .unwrap_err();
    let msg = e.to_string();
    assert!(
        matches!(e, twill_ipam::store::StoreError::DuplicateName { .. }),
        "{msg}"
    );
    assert!(
        msg.contains("192.168.0.1") && msg.contains("node-dup"),
        "{msg}"
    );
    assert!(msg.contains(&first.subnet.to_string()), "{msg}");
    let k = store.get(&first.subnet).await.unwrap().unwrap();
    assert_eq!(
        k.attrs.public_ip,
        Ipv4Addr::new(192, 168, 0, 1),
        "untouched"
    );
    assert_eq!(k.etcd_lease, first.etcd_lease);
    let (all, _) = store.list().await.unwrap();
    assert_eq!(all.len(), 1, "the clone took no other subnet either");

    // Positive control: the same name from the same PublicIP (a restart) takes it over.
    let again = store
        .acquire(&cfg, &attrs("node-dup", 1), Duration::from_secs(4))
        .await
        .unwrap();
    assert_eq!(again.subnet, first.subnet);
    assert_ne!(again.etcd_lease, first.etcd_lease);

    // A holder for the clone keeps failing, says why, and acquires once the first node's
    // lease has expired (nobody renews it).
    let h = store.hold(cfg.clone(), attrs("node-dup", 2), Duration::from_secs(4));
    wait_until(Duration::from_secs(5), "the clone's error", || {
        h.state()
            .last_error
            .is_some_and(|e| e.contains("already used by the node at 192.168.0.1"))
    })
    .await;
    assert!(!h.state().held);
    let mut h = h;
    let got = tokio::time::timeout(Duration::from_secs(15), h.acquired())
        .await
        .expect("acquired after the other lease expired");
    assert_eq!(got.attrs.public_ip, Ipv4Addr::new(192, 168, 0, 2));
    let k = store.get(&got.subnet).await.unwrap().unwrap();
    assert_eq!(k.attrs.public_ip, Ipv4Addr::new(192, 168, 0, 2));
}

/// Proves that a reservation taken by one node is not taken by a second node of that name
/// from another PublicIP (both would share one pod subnet), and that reserving it again
/// (the documented way to move it) lets the second node take it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_node_name_does_not_share_a_reservation() {
    let etcd = EtcdServer::start().unwrap();
    let (store, cfg) = setup(&etcd).await;
    let subnet: ipnet::Ipv4Net = "10.244.7.0/24".parse().unwrap();
    let mut r = LeaseAttrs::vxlan("node-r", Ipv4Addr::UNSPECIFIED, 0, "");
    r.backend_type.clear();
    store.reserve(subnet, &r).await.unwrap();
    let a = store
        .acquire(&cfg, &attrs("node-r", 1), Duration::from_secs(60))
        .await
        .unwrap();
    assert!(a.reserved && a.subnet == subnet);
    let e = store
        .acquire(&cfg, &attrs("node-r", 2), Duration::from_secs(60))
        .await
        .unwrap_err();
    assert!(
        e.to_string().contains("192.168.0.1") && e.to_string().contains("reserve"),
        "{e}"
    );
    // The operator reserves it again (the node at .1 is gone): the other node takes it.
    store.reserve(subnet, &r).await.unwrap();
    let b = store
        .acquire(&cfg, &attrs("node-r", 2), Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(b.subnet, subnet);
    assert_eq!(
        store.get(&subnet).await.unwrap().unwrap().attrs.public_ip,
        Ipv4Addr::new(192, 168, 0, 2)
    );
}

/// Proves the grace period: a subnet whose lease just expired (its node cut off, nobody
/// renewing) is not handed to another node while its grace key lives, even when that node
/// asks for it; the node that held it gets it back; and without a grace period (positive
/// control) the other node takes it. An explicit release frees it at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subnet_whose_lease_just_expired_is_kept_for_its_node_for_the_grace_period() {
    let etcd = EtcdServer::start().unwrap();
    let (plain, cfg) = setup(&etcd).await;
    let store = plain.clone().with_grace(Duration::from_secs(60));
    let ttl = Duration::from_secs(2);
    let a = store.acquire(&cfg, &attrs("node-a", 1), ttl).await.unwrap();
    // Nobody renews: the lease expires, the grace key stays.
    wait_until_async(Duration::from_secs(10), "lease expired", || async {
        plain.get(&a.subnet).await.unwrap().is_none()
    })
    .await;
    let b = store
        .acquire_with(&cfg, &attrs("node-b", 2), ttl, Some(a.subnet))
        .await
        .unwrap();
    assert_ne!(b.subnet, a.subnet, "in node-a's grace period");
    // node-a comes back: its subnet again.
    let a2 = store
        .acquire_with(&cfg, &attrs("node-a", 1), ttl, Some(a.subnet))
        .await
        .unwrap();
    assert_eq!(a2.subnet, a.subnet);
    // An explicit release ends the grace period at once.
    assert!(plain.release(a.subnet).await.unwrap());
    let c = store
        .acquire_with(&cfg, &attrs("node-c", 3), ttl, Some(a.subnet))
        .await
        .unwrap();
    assert_eq!(c.subnet, a.subnet, "released: no grace period");

    // Positive control: no grace key written (store without grace): taken at once.
    let d = plain.acquire(&cfg, &attrs("node-d", 4), ttl).await.unwrap();
    wait_until_async(Duration::from_secs(10), "lease expired", || async {
        plain.get(&d.subnet).await.unwrap().is_none()
    })
    .await;
    let e = store
        .acquire_with(&cfg, &attrs("node-e", 5), ttl, Some(d.subnet))
        .await
        .unwrap();
    assert_eq!(e.subnet, d.subnet);
}

/// Proves that the holder renews the grace key with the lease: after several TTLs of a
/// held lease, the grace key still exists and names the node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_holder_renews_the_grace_key_with_the_lease() {
    let etcd = EtcdServer::start().unwrap();
    let (plain, cfg) = setup(&etcd).await;
    let store = plain.clone().with_grace(Duration::from_secs(2));
    let mut h = store.hold(cfg, attrs("node-a", 1), Duration::from_secs(3));
    let l = acquired(&mut h).await;
    let key = store.grace_key(&l.subnet);
    let mut client = plain.client().clone();
    let deadline = Instant::now() + Duration::from_secs(12);
    while Instant::now() < deadline {
        let r = client.get(key.clone(), None).await.unwrap();
        assert_eq!(r.kvs().len(), 1, "grace key renewed (ttl 3 s + 2 s)");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(h.stats().renewals >= 3, "{:?}", h.stats());
}

/// Polls the async `cond` every 50 ms until it holds; panics with `what` after `within`.
async fn wait_until_async<F, Fut>(within: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !cond().await {
        assert!(start.elapsed() < within, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Proves the pinned holder (twilld's, issue 14): a node cut off until its lease and grace
/// key expired, whose subnet another node took meanwhile, takes no other subnet while its
/// pin says pods hold addresses of the old one: it is blocked, naming the subnet and the other
/// node, and keeps trying; a move permission for another subnet is ignored, a malformed one
/// too; once the pin counts 0 it takes another subnet by itself. A second run shows the
/// operator's permission (`request_move`) letting it move with pods still there, and the
/// permission deleted once used. Before the fix (`hold_with`, no pin) the holder took a new
/// subnet at its first retry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pinned_holder_is_blocked_while_another_node_holds_its_subnet() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    let etcd = EtcdServer::start().unwrap();
    let (plain, cfg) = setup(&etcd).await;
    let grace = Duration::from_secs(1);
    let ttl = Duration::from_secs(2);
    for by_operator in [false, true] {
        let n = if by_operator { 10 } else { 1 };
        let node = format!("node-a{n}");
        let proxy = TcpProxy::start(etcd.client_port()).await.unwrap();
        let via = store_via(&etcd, &proxy).await.with_grace(grace);
        let pods = Arc::new(AtomicU64::new(2));
        let p = pods.clone();
        let mut h = via.hold_pinned(
            cfg.clone(),
            attrs(&node, n),
            ttl,
            None,
            Arc::new(move |_| Ok(p.load(Ordering::SeqCst))),
        );
        let old = acquired(&mut h).await.subnet;
        proxy.cut();
        let store = plain.clone().with_grace(grace);
        wait_until_async(
            Duration::from_secs(15),
            "lease and grace key expired",
            || async {
                let g = plain
                    .client()
                    .clone()
                    .get(plain.grace_key(&old), None)
                    .await
                    .unwrap();
                plain.get(&old).await.unwrap().is_none() && g.kvs().is_empty()
            },
        )
        .await;
        let b = store
            .acquire_with(
                &cfg,
                &attrs("node-b", n + 1),
                Duration::from_secs(60),
                Some(old),
            )
            .await
            .unwrap();
        assert_eq!(b.subnet, old, "node-b takes the subnet");
        proxy.restore();
        wait_until(Duration::from_secs(15), "blocked", || {
            h.state().blocked.is_some()
        })
        .await;
        let st = h.state();
        let bl = st.blocked.clone().unwrap();
        assert_eq!(bl.subnet, old);
        assert_eq!(bl.pods, Some(2));
        let text = st.last_error.clone().unwrap();
        assert!(
            text.contains("node-b") && text.contains(&old.to_string()),
            "{text}"
        );
        assert!(!st.held);
        // A permission for another subnet, and a malformed one, change nothing.
        let other: ipnet::Ipv4Net = "10.244.250.0/24".parse().unwrap();
        plain
            .request_move(&node, Some(other), Duration::from_secs(60))
            .await
            .unwrap();
        let b0 = h.stats().blocked;
        wait_until(Duration::from_secs(10), "retries", || {
            h.stats().blocked >= b0 + 2
        })
        .await;
        plain
            .client()
            .clone()
            .put(plain.move_key(&node), "{\"NodeName\":1}", None)
            .await
            .unwrap();
        let b0 = h.stats().blocked;
        wait_until(Duration::from_secs(10), "retries", || {
            h.stats().blocked >= b0 + 2
        })
        .await;
        let (all, _) = plain.list().await.unwrap();
        assert!(
            all.iter().all(|l| l.attrs.node_name != node),
            "no other subnet taken: {all:?}"
        );
        if by_operator {
            plain
                .request_move(&node, Some(old), Duration::from_secs(60))
                .await
                .unwrap();
        } else {
            plain.clear_move(&node).await.unwrap();
            pods.store(0, Ordering::SeqCst);
        }
        wait_until(Duration::from_secs(10), "moved", || h.state().held).await;
        let st = h.state();
        let new = st.lease.unwrap().subnet;
        assert_ne!(new, old);
        assert!(st.blocked.is_none());
        assert!(
            plain.move_request(&node).await.unwrap().is_none(),
            "no permission left"
        );
        plain.release(old).await.unwrap();
        drop(h);
    }
}

/// Proves `acquire_only`: the node's own key or the free subnet is taken; a subnet held by
/// another node's lease, or in another node's grace period, is `SubnetHeld` naming it, and
/// nothing else is taken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acquire_only_takes_that_subnet_or_names_who_holds_it() {
    use twill_ipam::store::StoreError;
    let etcd = EtcdServer::start().unwrap();
    let (plain, cfg) = setup(&etcd).await;
    let store = plain.clone().with_grace(Duration::from_secs(60));
    let ttl = Duration::from_secs(2);
    let s: ipnet::Ipv4Net = "10.244.9.0/24".parse().unwrap();
    let a = store
        .acquire_only(&cfg, &attrs("node-a", 1), ttl, s)
        .await
        .unwrap();
    assert_eq!(a.subnet, s);
    let e = store
        .acquire_only(&cfg, &attrs("node-b", 2), ttl, s)
        .await
        .unwrap_err();
    assert!(
        matches!(&e, StoreError::SubnetHeld { holder, grace: false, .. } if holder == "node-a"),
        "{e}"
    );
    assert!(e.to_string().contains("192.168.0.1"), "{e}");
    wait_until_async(Duration::from_secs(10), "lease expired", || async {
        plain.get(&s).await.unwrap().is_none()
    })
    .await;
    let e = store
        .acquire_only(&cfg, &attrs("node-b", 2), ttl, s)
        .await
        .unwrap_err();
    assert!(
        matches!(&e, StoreError::SubnetHeld { grace: true, .. }),
        "{e}"
    );
    assert!(
        e.to_string().contains("grace period of node \"node-a\""),
        "{e}"
    );
    let (all, _) = plain.list().await.unwrap();
    assert!(all.is_empty(), "node-b took nothing: {all:?}");
    let bad: ipnet::Ipv4Net = "10.99.0.0/24".parse().unwrap();
    assert!(matches!(
        store
            .acquire_only(&cfg, &attrs("node-b", 2), ttl, bad)
            .await,
        Err(StoreError::InvalidSubnet { .. })
    ));
}
