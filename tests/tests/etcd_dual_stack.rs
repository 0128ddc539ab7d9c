//! Dual-stack leases in Flannel's format (`<v4>-<len>&<v6>-<len>` keys) against a real etcd
//! (started per test by the harness): read, listed, watched, acquired, renewed, released.

use std::net::Ipv4Addr;
use std::time::Duration;

use ipnet::{Ipv4Net, Ipv6Net};
use twill_ipam::lease::{LeaseEvent, PublicIpv6};
use twill_ipam::netconf::NetConfig;
use twill_ipam::store::etcd_client::PutOptions;
use twill_ipam::store::{LeaseStore, LeaseWatch};
use twill_tests::etcd::EtcdServer;

const PREFIX: &str = "/twill/network";

/// Dual-stack config: 10.244.0.0/16 in /24s, fd00:10::/56 in /64s.
const DUAL: &str = r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10::/56","Backend":{"Type":"vxlan"}}"#;

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
