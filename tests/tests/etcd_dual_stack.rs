//! Dual-stack leases in Flannel's format (`<v4>-<len>&<v6>-<len>` keys) against a real etcd
//! (started per test by the harness): read, listed, watched, acquired, renewed, released.

use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::time::Duration;

use ipnet::{Ipv4Net, Ipv6Net};
use twill_ipam::lease::{LeaseAttrs, LeaseEvent, PublicIpv6};
use twill_ipam::netconf::NetConfig;
use twill_ipam::store::etcd_client::{GetOptions, PutOptions};
use twill_ipam::store::{LeaseStore, LeaseWatch, StoreError};
use twill_tests::etcd::EtcdServer;

const PREFIX: &str = "/twill/network";

/// Dual-stack config: 10.244.0.0/16 in /24s, fd00:10::/56 in /64s.
const DUAL: &str = r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10::/56","Backend":{"Type":"vxlan"}}"#;

const NET16: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#;

/// A dual-stack lease exactly as flanneld writes it (pkg/lease's LeaseAttrs).
const FLANNEL_DUAL: &str = r#"{"PublicIP":"192.168.1.5","PublicIPv6":"2001:db8::5","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"9a:2b:3c:4d:5e:6f"},"BackendV6Data":{"VNI":1,"VtepMAC":"ae:7f:01:02:03:04"}}"#;

fn net(s: &str) -> Ipv4Net {
    s.parse().unwrap()
}

fn net6(s: &str) -> Ipv6Net {
    s.parse().unwrap()
}

async fn setup(etcd: &EtcdServer, cfg_json: &str) -> (LeaseStore, NetConfig) {
    let store = LeaseStore::connect(etcd.options(PREFIX)).await.unwrap();
    let cfg = NetConfig::from_json(cfg_json).unwrap();
    store.put_config(&cfg, true).await.unwrap();
    (store, cfg)
}

/// Writes `value` under `<prefix>/subnets/<name>` by hand (as flanneld does: bound to an
/// etcd lease of 600 s).
async fn put_raw(store: &LeaseStore, name: &str, value: &str) {
    let mut c = store.client();
    let lease = c.lease_grant(600, None).await.unwrap().id();
    c.put(
        format!("{}{name}", store.subnets_prefix()),
        value,
        Some(PutOptions::new().with_lease(lease)),
    )
    .await
    .unwrap();
}

async fn delete_raw(store: &LeaseStore, name: &str) {
    store
        .client()
        .delete(format!("{}{name}", store.subnets_prefix()), None)
        .await
        .unwrap();
}

async fn next_event(w: &mut LeaseWatch) -> LeaseEvent {
    tokio::time::timeout(Duration::from_secs(10), w.next())
        .await
        .expect("an event in time")
        .expect("watch task alive")
}

async fn synced_watch(store: &LeaseStore) -> LeaseWatch {
    let mut w = store.watch();
    tokio::time::timeout(Duration::from_secs(10), w.wait_synced())
        .await
        .expect("synced in time")
        .expect("watch alive");
    w
}

/// Proves that a lease written by flanneld under a dual-stack key is listed and watched
/// with both subnets and both endpoints; that a younger IPv4-only key of the same IPv4
/// subnet does not replace it (it is reported by name as an alias) and takes over once the
/// dual-stack key is deleted; and that an IPv6-only key is refused by name. Fails without
/// the dual-stack key parsing (the key would be an invalid entry, `ipv6_subnet` `None`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flannel_dual_stack_lease_is_listed_and_watched_with_both_subnets() {
    let etcd = EtcdServer::start().unwrap();
    let (store, _) = setup(&etcd, DUAL).await;
    let mut w = synced_watch(&store).await;
    assert!(w.state().is_empty());

    let ds = "10.244.7.0-24&fd00:10:0:7::-64";
    put_raw(&store, ds, FLANNEL_DUAL).await;
    let l = match next_event(&mut w).await {
        LeaseEvent::Added(l) => l,
        e => panic!("expected Added, got {e:?}"),
    };
    assert_eq!(l.subnet, net("10.244.7.0/24"));
    assert_eq!(l.ipv6_subnet, Some(net6("fd00:10:0:7::/64")));
    assert_eq!(l.key().to_string(), ds);
    assert_eq!(l.attrs.public_ip, Ipv4Addr::new(192, 168, 1, 5));
    assert_eq!(
        l.attrs.public_ipv6,
        PublicIpv6::Addr("2001:db8::5".parse().unwrap())
    );
    let v6 = l.attrs.ipv6_endpoint().unwrap().expect("an IPv6 side");
    assert_eq!(
        (v6.vni, v6.vtep_mac.to_string()),
        (1, "ae:7f:01:02:03:04".into())
    );
    assert_eq!(l.attrs.to_json(), FLANNEL_DUAL, "read back byte for byte");
    assert!(!l.reserved);

    let (listed, invalid, _) = store.list_all().await.unwrap();
    assert_eq!(listed, vec![l.clone()]);
    assert!(invalid.is_empty(), "{invalid:?}");
    assert_eq!(store.get(&l.subnet).await.unwrap(), Some(l.clone()));

    // A younger IPv4-only key of the same subnet: an alias, reported by its name.
    put_raw(&store, "10.244.7.0-24", FLANNEL_DUAL).await;
    match next_event(&mut w).await {
        LeaseEvent::Invalid {
            key,
            entry: Some(i),
        } => {
            assert_eq!(key, "10.244.7.0-24");
            assert!(i.detail.contains(ds), "{}", i.detail);
        }
        e => panic!("expected the alias as invalid, got {e:?}"),
    }
    assert_eq!(w.state()[&l.subnet].key().to_string(), ds);
    let (listed, invalid, _) = store.list_all().await.unwrap();
    assert_eq!(listed, vec![l.clone()]);
    assert_eq!(invalid.len(), 1);
    assert_eq!(invalid[0].key, "10.244.7.0-24");
    assert!(invalid[0].detail.contains(ds), "{}", invalid[0].detail);

    // IPv6-only: refused, named.
    let only6 = "0.0.0.0-0&fd00:10:0:9::-64";
    put_raw(&store, only6, FLANNEL_DUAL).await;
    match next_event(&mut w).await {
        LeaseEvent::Invalid {
            key,
            entry: Some(i),
        } => {
            assert_eq!(key, only6);
            assert!(i.detail.contains("IPv6-only"), "{}", i.detail);
            assert!(i.detail.contains(only6), "{}", i.detail);
        }
        e => panic!("expected the IPv6-only key as invalid, got {e:?}"),
    }

    // The dual-stack key goes: the IPv4-only key is the subnet's lease now.
    delete_raw(&store, ds).await;
    match next_event(&mut w).await {
        LeaseEvent::Invalid { key, entry: None } => assert_eq!(key, "10.244.7.0-24"),
        e => panic!("expected the alias to leave the invalid set, got {e:?}"),
    }
    match next_event(&mut w).await {
        LeaseEvent::Changed { old, new } => {
            assert_eq!(old.key().to_string(), ds);
            assert_eq!(new.key().to_string(), "10.244.7.0-24");
            assert_eq!(new.ipv6_subnet, None);
        }
        e => panic!("expected Changed, got {e:?}"),
    }
    // A fresh watch (from a list) sees the same.
    let w2 = synced_watch(&store).await;
    assert_eq!(w2.state(), w.state());
    assert_eq!(
        w2.invalid().keys().collect::<Vec<_>>(),
        w.invalid().keys().collect::<Vec<_>>()
    );
}

fn attrs(node: &str, n: u32) -> LeaseAttrs {
    LeaseAttrs::vxlan(
        node,
        Ipv4Addr::from(0xc0a8_0000 + n),
        1,
        format!("aa:bb:cc:00:{:02x}:{:02x}", (n >> 8) & 0xff, n & 0xff),
    )
}

/// The raw key names under `<prefix>/subnets/`.
async fn key_names(store: &LeaseStore) -> Vec<String> {
    let resp = store
        .client()
        .get(
            store.subnets_prefix(),
            Some(GetOptions::new().with_prefix().with_keys_only()),
        )
        .await
        .unwrap();
    resp.kvs()
        .iter()
        .map(|k| {
            k.key_str()
                .unwrap()
                .strip_prefix(&store.subnets_prefix())
                .unwrap()
                .to_string()
        })
        .collect()
}

/// Exactly three IPv6 subnets (fd00:10:0:1::/64 .. fd00:10:0:3::/64), 254 IPv4 ones.
const DUAL_3V6: &str = r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10::/62","IPv6SubnetLen":64,"Backend":{"Type":"vxlan"}}"#;

/// Proves that nodes acquiring at the same time get distinct IPv4 *and* IPv6 subnets, each
/// pair written as one Flannel dual-stack key: with only three IPv6 subnets, three
/// concurrent acquirers (different IPv4 subnets, so no key collides) must still not share
/// one (the transaction fails when another key was created since the listing), and a fourth
/// is refused as IPv6 network full. Repeated to give the race a chance; fails without the
/// listing guard of the dual-stack write (two keys then name one IPv6 subnet).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_dual_stack_acquirers_get_distinct_pairs() {
    let etcd = EtcdServer::start().unwrap();
    let (store, cfg) = setup(&etcd, DUAL_3V6).await;
    assert_eq!(cfg.ipv6_range().unwrap().count(), 3);
    let ttl = Duration::from_secs(60);
    let mut rpcs_3 = Vec::new();
    for round in 0..8u32 {
        let rpcs = store.rpc_count();
        let mut tasks = Vec::new();
        for i in 0..3u32 {
            let (store, cfg) = (store.clone(), cfg.clone());
            let a = attrs(&format!("r{round}-node-{i}"), round * 10 + i);
            tasks.push(tokio::spawn(
                async move { store.acquire(&cfg, &a, ttl).await },
            ));
        }
        let mut v4 = HashSet::new();
        let mut v6 = HashSet::new();
        for t in tasks {
            let l = t.await.unwrap().expect("every acquirer succeeds");
            let s6 = l.ipv6_subnet.expect("a dual-stack lease");
            assert!(cfg.is_valid_subnet(&l.subnet), "{}", l.subnet);
            assert!(cfg.is_valid_ipv6_subnet(&s6), "{s6}");
            assert!(
                v4.insert(l.subnet),
                "round {round}: IPv4 {} twice",
                l.subnet
            );
            assert!(v6.insert(s6), "round {round}: IPv6 {s6} twice");
            let in_etcd = store.get(&l.subnet).await.unwrap().unwrap();
            assert_eq!((in_etcd.key(), &in_etcd.attrs), (l.key(), &l.attrs));
        }
        rpcs_3.push(store.rpc_count() - rpcs);
        let names = key_names(&store).await;
        assert_eq!(names.len(), 3, "{names:?}");
        assert!(names.iter().all(|n| n.contains('&')), "{names:?}");
        let (listed, invalid, _) = store.list_all().await.unwrap();
        assert_eq!(listed.len(), 3);
        assert!(invalid.is_empty(), "{invalid:?}");
        let err = store
            .acquire(&cfg, &attrs(&format!("r{round}-extra"), 99), ttl)
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::Ipv6NetworkFull { .. }), "{err}");
        assert!(err.to_string().contains("IPv6 network full"), "{err}");
        for l in listed {
            assert!(store.release(l.subnet).await.unwrap());
        }
        assert!(key_names(&store).await.is_empty());
    }
    eprintln!(
        "three concurrent dual-stack acquisitions (and 3 gets), etcd requests per round: {rpcs_3:?}"
    );
}

/// Proves that the pair is sticky: a node that comes back (its key still alive) gets the
/// same dual-stack key, with the IPv6 attributes it passes now; an IPv4-only node passes
/// none, and its value has no PublicIPv6 and no BackendV6Data (as Flannel without an IPv6
/// address). Fails if the own dual-stack key is not recognised (a second key would be made).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_keeps_the_dual_stack_pair() {
    let etcd = EtcdServer::start().unwrap();
    let (store, cfg) = setup(&etcd, DUAL).await;
    let ttl = Duration::from_secs(60);
    let a = attrs("node-a", 1);
    let rpcs = store.rpc_count();
    let first = store.acquire(&cfg, &a, ttl).await.unwrap();
    let s6 = first.ipv6_subnet.expect("dual-stack");
    // As many requests as an IPv4-only acquisition: list + grant, grace list, one txn.
    let used = store.rpc_count() - rpcs;
    eprintln!("dual-stack acquisition: {used} etcd requests");
    assert!(used <= 4, "{used} requests");
    let raw = store
        .client()
        .get(store.key_of(&first), None)
        .await
        .unwrap();
    let value = raw.kvs()[0].value_str().unwrap().to_string();
    assert!(!value.contains("PublicIPv6"), "{value}");
    assert!(!value.contains("BackendV6Data"), "{value}");
    for i in 0..4 {
        store
            .acquire(&cfg, &attrs(&format!("other-{i}"), 10 + i), ttl)
            .await
            .unwrap();
    }
    let with_v6 = a
        .clone()
        .with_ipv6("2001:db8::1".parse().unwrap(), 1, "02:00:00:00:00:61");
    let again = store.acquire(&cfg, &with_v6, ttl).await.unwrap();
    assert_eq!((again.subnet, again.ipv6_subnet), (first.subnet, Some(s6)));
    assert_eq!(again.attrs, with_v6);
    let in_etcd = store.get(&first.subnet).await.unwrap().unwrap();
    assert_eq!(in_etcd.key(), first.key());
    assert_eq!(
        in_etcd.attrs.ipv6_endpoint().unwrap().unwrap().public_ip,
        "2001:db8::1".parse::<std::net::Ipv6Addr>().unwrap()
    );
    assert_eq!(key_names(&store).await.len(), 5);
}

/// Proves that a node holding an IPv4-only lease when IPv6 gets enabled moves to
/// `<same v4>&<new v6>` in one transaction: its IPv4 subnet does not change, the old key is
/// gone, a watch sees one Changed event for the subnet (never a Removed). Also a reservation
/// keeps having no TTL when it moves. Fails without the move (the node would keep its
/// IPv4-only key, or take a new IPv4 subnet).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv4_lease_upgraded_to_a_pair_keeps_its_ipv4_subnet() {
    let etcd = EtcdServer::start().unwrap();
    let (store, v4cfg) = setup(&etcd, NET16).await;
    let ttl = Duration::from_secs(60);
    let a = attrs("node-a", 1);
    let old = store.acquire(&v4cfg, &a, ttl).await.unwrap();
    assert_eq!(old.ipv6_subnet, None);
    let r = attrs("node-r", 2);
    let reserved = store.reserve(net("10.244.200.0/24"), &r).await.unwrap();
    let mut w = synced_watch(&store).await;

    let dual = NetConfig::from_json(DUAL).unwrap();
    store.put_config(&dual, true).await.unwrap();
    let new = store.acquire(&dual, &a, ttl).await.unwrap();
    assert_eq!(new.subnet, old.subnet, "the IPv4 subnet stays");
    let s6 = new.ipv6_subnet.expect("an IPv6 subnet now");
    assert!(dual.is_valid_ipv6_subnet(&s6));
    assert!(!new.reserved);
    match next_event(&mut w).await {
        LeaseEvent::Changed { old: o, new: n } => {
            assert_eq!(o.key(), old.key());
            assert_eq!(n.key(), new.key());
        }
        e => panic!("expected one Changed, got {e:?}"),
    }
    let moved_r = store.acquire(&dual, &r, ttl).await.unwrap();
    assert_eq!(moved_r.subnet, reserved.subnet);
    assert!(moved_r.reserved && moved_r.ipv6_subnet.is_some());
    assert_ne!(moved_r.ipv6_subnet, Some(s6));
    let mut names = key_names(&store).await;
    names.sort();
    let mut want = vec![new.key().to_string(), moved_r.key().to_string()];
    want.sort();
    assert_eq!(names, want);
    let (listed, invalid, _) = store.list_all().await.unwrap();
    assert!(invalid.is_empty(), "{invalid:?}");
    assert!(
        listed
            .iter()
            .any(|l| l.key() == moved_r.key() && l.reserved)
    );
    // And sticky from there on.
    let again = store.acquire(&dual, &a, ttl).await.unwrap();
    assert_eq!(again.key(), new.key());
}

/// Waits (bounded) until `cond` holds.
async fn wait_until(within: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let start = std::time::Instant::now();
    while !cond() {
        assert!(start.elapsed() < within, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Proves that the holder keeps a dual-stack key: renews it past its TTL several times
/// (the key stays, on the same etcd lease), writes new attributes to the dual-stack key
/// (not to an IPv4-only key beside it), re-acquires the same pair after the key is deleted
/// by hand, and its release deletes the dual-stack key. Fails while the holder watches or
/// rewrites `<v4>` (it would see its lease as deleted at once and loop, or create an alias).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holder_renews_rewrites_and_releases_the_pair_key() {
    let etcd = EtcdServer::start().unwrap();
    let (store, cfg) = setup(&etcd, DUAL).await;
    let mut h = store.hold(cfg.clone(), attrs("node-a", 1), Duration::from_secs(2));
    let lease = tokio::time::timeout(Duration::from_secs(10), h.acquired())
        .await
        .unwrap();
    let s6 = lease.ipv6_subnet.expect("dual-stack");
    let name = lease.key().to_string();
    assert!(name.contains('&'), "{name}");
    // Outlive the 2 s TTL several times.
    wait_until(Duration::from_secs(15), "4 renewals", || {
        h.stats().renewals >= 4
    })
    .await;
    let st = h.stats();
    assert_eq!((st.losses, st.acquisitions), (0, 1), "{st:?}");
    assert_eq!(key_names(&store).await, vec![name.clone()]);
    let in_etcd = store.get(&lease.subnet).await.unwrap().unwrap();
    assert_eq!(in_etcd.etcd_lease, lease.etcd_lease);

    // New attributes (with an IPv6 side now) go to the dual-stack key.
    let mut w = synced_watch(&store).await;
    let new_attrs =
        attrs("node-a", 1).with_ipv6("2001:db8::1".parse().unwrap(), 1, "02:00:00:00:00:61");
    h.update_attrs(new_attrs.clone());
    match next_event(&mut w).await {
        LeaseEvent::Changed { old, new } => {
            assert_eq!((old.key(), new.key()), (lease.key(), lease.key()));
            assert_eq!(new.attrs, new_attrs);
            assert_eq!(new.etcd_lease, lease.etcd_lease);
        }
        e => panic!("{e:?}"),
    }
    assert_eq!(key_names(&store).await, vec![name.clone()]);

    // Deleted by hand: lost, re-acquired with the same pair.
    delete_raw(&store, &name).await;
    wait_until(Duration::from_secs(10), "re-acquired", || {
        let st = h.stats();
        st.losses == 1 && st.acquisitions == 2 && h.state().held
    })
    .await;
    let again = h.state().lease.unwrap();
    assert_eq!((again.subnet, again.ipv6_subnet), (lease.subnet, Some(s6)));
    assert_eq!(key_names(&store).await, vec![name.clone()]);

    assert!(h.release().await.unwrap());
    assert!(key_names(&store).await.is_empty());
}

/// Proves that `reserve` keeps a node's dual-stack key (now without TTL, same IPv6
/// subnet) instead of writing an IPv4-only alias beside it; that another node is refused
/// naming the dual-stack key; and that `release` of the subnet deletes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reserve_and_release_handle_the_pair_key() {
    let etcd = EtcdServer::start().unwrap();
    let (store, cfg) = setup(&etcd, DUAL).await;
    let a = attrs("node-a", 1);
    let l = store
        .acquire(&cfg, &a, Duration::from_secs(60))
        .await
        .unwrap();
    let r = store.reserve(l.subnet, &a).await.unwrap();
    assert_eq!(r.key(), l.key());
    assert!(r.reserved);
    let in_etcd = store.get(&l.subnet).await.unwrap().unwrap();
    assert!(in_etcd.reserved && in_etcd.key() == l.key());
    assert_eq!(key_names(&store).await, vec![l.key().to_string()]);
    let err = store
        .reserve(l.subnet, &attrs("node-b", 2))
        .await
        .unwrap_err();
    assert!(err.to_string().contains(&l.key().to_string()), "{err}");
    // The node takes its reservation back: still the same pair, still reserved.
    let back = store
        .acquire(&cfg, &a, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(back.key(), l.key());
    assert!(back.reserved);
    assert!(store.release(l.subnet).await.unwrap());
    assert!(key_names(&store).await.is_empty());
    assert!(!store.release(l.subnet).await.unwrap());
}

/// Proves that the IPv6 subnet is sticky like the IPv4 one when the key is gone: a holder
/// whose dual-stack key was deleted takes the same pair again, also when its IPv6 subnet is
/// not its home subnet (which is free by then, and would be chosen without the preference).
/// The store's `acquire_with_ipv6` takes a preferred free pair as given.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_pair_comes_back_with_the_same_ipv6_subnet() {
    let etcd = EtcdServer::start().unwrap();
    let (store, cfg) = setup(&etcd, DUAL).await;
    let range6 = cfg.ipv6_range().unwrap();
    let home6 = twill_ipam::subnets::home_subnet_in(&range6, "node-a").unwrap();
    // Someone holds node-a's home IPv6 subnet while node-a joins.
    let blocker = format!("10.244.250.0-24&{}-{}", home6.network(), home6.prefix_len());
    put_raw(&store, &blocker, FLANNEL_DUAL).await;
    let mut h = store.hold(cfg.clone(), attrs("node-a", 1), Duration::from_secs(60));
    let first = tokio::time::timeout(Duration::from_secs(10), h.acquired())
        .await
        .unwrap();
    let s6 = first.ipv6_subnet.unwrap();
    assert_ne!(s6, home6);
    // The home subnet is free again; the node's key is deleted by hand.
    delete_raw(&store, &blocker).await;
    delete_raw(&store, &first.key().to_string()).await;
    wait_until(Duration::from_secs(10), "re-acquired", || {
        let st = h.stats();
        st.losses == 1 && st.acquisitions == 2 && h.state().held
    })
    .await;
    let again = h.state().lease.unwrap();
    assert_eq!(again.key(), first.key(), "the same pair");
    drop(h);

    // A preferred free pair, as given.
    let want6 = range6.at(5).unwrap();
    let l = store
        .acquire_with_ipv6(
            &cfg,
            &attrs("node-b", 2),
            Duration::from_secs(60),
            Some(net("10.244.77.0/24")),
            Some(want6),
        )
        .await
        .unwrap();
    assert_eq!(
        (l.subnet, l.ipv6_subnet),
        (net("10.244.77.0/24"), Some(want6))
    );
}

/// Proves that keys written by others take their subnets from twill's acquisitions in every
/// form: an IPv4-only acquisition never takes the IPv4 subnet of a (flanneld's) dual-stack
/// key, `acquire_only` of it names the holder, and the IPv6 subnets of dual-stack and
/// IPv6-only keys are not handed out again. Fails with the IPv4-only key parser in the
/// acquisition (a pair key then takes nothing, and twill writes an alias of it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_of_every_form_take_their_subnets() {
    let etcd = EtcdServer::start().unwrap();
    // Exactly one IPv4 subnet: 10.244.1.0/24.
    let one = r#"{"Network":"10.244.0.0/16","SubnetMin":"10.244.1.0","SubnetMax":"10.244.1.0","Backend":{"Type":"vxlan"}}"#;
    let (store, cfg) = setup(&etcd, one).await;
    put_raw(&store, "10.244.1.0-24&fd00:10:0:1::-64", FLANNEL_DUAL).await;
    let ttl = Duration::from_secs(60);
    let err = store.acquire(&cfg, &attrs("a", 1), ttl).await.unwrap_err();
    assert!(matches!(err, StoreError::NetworkFull { .. }), "{err}");
    let err = store
        .acquire_only(&cfg, &attrs("a", 1), ttl, net("10.244.1.0/24"))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::SubnetHeld { .. }), "{err}");
    assert!(err.to_string().contains("192.168.1.5"), "{err}");
    assert_eq!(key_names(&store).await.len(), 1);

    // Three IPv6 subnets, two of them held by a dual-stack and an IPv6-only key.
    let cfg = NetConfig::from_json(DUAL_3V6).unwrap();
    store.put_config(&cfg, true).await.unwrap();
    put_raw(&store, "0.0.0.0-0&fd00:10:0:2::-64", FLANNEL_DUAL).await;
    let l = store.acquire(&cfg, &attrs("b", 2), ttl).await.unwrap();
    assert_eq!(l.ipv6_subnet, Some(net6("fd00:10:0:3::/64")));
    let err = store.acquire(&cfg, &attrs("c", 3), ttl).await.unwrap_err();
    assert!(matches!(err, StoreError::Ipv6NetworkFull { .. }), "{err}");
}
