//! Kernel tests of `twill_dataplane::unlink::remove_link` (DEL's link removal) in fresh
//! network namespaces: it returns once the link (and a veth's peer) is gone, with the names
//! free at once; a missing link is `false`; the kernel's refusal comes back as an error.
//! Root required.

use twill_dataplane::NetNs;
use twill_dataplane::unlink::remove_link;
use twill_tests::netns::{TestNetns, veth_between};

/// `remove_link(name)` run inside `ns` (a thread that enters it; the child it forks is born
/// there too).
fn remove_in(ns: &TestNetns, name: &str) -> twill_dataplane::Result<bool> {
    let name = name.to_string();
    NetNs::open(ns.path())
        .unwrap()
        .run_in(move || remove_link(&name))?
}

/// A pod-like veth: `twu0` in `node`, up, on a bridge; `eth0` in `pod`, up, addressed.
fn pod_veth(node: &TestNetns, pod: &TestNetns) {
    node.ip(&["link", "add", "twubr", "type", "bridge"]).ok();
    node.ip(&["link", "set", "twubr", "up"]).unwrap();
    veth_between(node, "twu0", pod, "eth0").unwrap();
    node.ip(&["link", "set", "twu0", "master", "twubr"])
        .unwrap();
    pod.ip(&["addr", "add", "10.99.0.2/24", "dev", "eth0"])
        .unwrap();
}

#[test]
fn remove_link_returns_once_the_pair_is_gone_and_its_names_are_free() {
    let node = TestNetns::new("un").unwrap();
    let pod = TestNetns::new("up").unwrap();
    pod_veth(&node, &pod);
    for round in 0..3 {
        assert!(remove_in(&node, "twu0").unwrap(), "round {round}");
        // Gone from both namespaces when the call returns, not later.
        assert!(!node.has_link("twu0"), "round {round}: {:?}", node.links());
        assert!(!pod.has_link("eth0"), "round {round}: {:?}", pod.links());
        // The names are free at once: a pod re-added in the same namespace.
        pod_veth(&node, &pod);
    }
    assert!(remove_in(&node, "twu0").unwrap());
}

#[test]
fn remove_link_of_a_missing_link_is_false() {
    let node = TestNetns::new("um").unwrap();
    assert!(!remove_in(&node, "twunone").unwrap());
}

#[test]
fn remove_link_reports_what_the_kernel_refuses() {
    // The kernel does not delete a namespace's loopback: EOPNOTSUPP, from the child.
    let node = TestNetns::new("ur").unwrap();
    let e = remove_in(&node, "lo").unwrap_err().to_string();
    assert!(e.contains("delete link lo"), "{e}");
    assert!(e.contains("not supported"), "{e}");
    assert!(node.has_link("lo"));
}
