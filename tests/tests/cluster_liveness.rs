//! Issue 14, liveness: `/healthz` means "the main loop completes cycles", not "the HTTP task
//! runs". A real twilld whose main loop is wedged in one step (its `nft` hangs, through a
//! wrapper on PATH that blocks while a marker file exists) fails `/healthz` within the
//! liveness timeout while the HTTP server itself still answers, and passes again once the
//! step returns. Before the fix /healthz answered "ok" throughout.

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use twill_tests::cluster::{Cluster, ClusterOpts, wait_for};

#[test]
fn healthz_fails_while_the_main_loop_is_wedged_and_recovers() {
    let mut c = Cluster::start(ClusterOpts {
        nodes: 1,
        pods_per_node: 0,
        resync: Duration::from_millis(500),
        ..ClusterOpts::default()
    })
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("hang");
    let nft = dir.path().join("nft");
    let real = ["/usr/sbin/nft", "/sbin/nft", "/usr/bin/nft"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .expect("nft installed");
    std::fs::write(
        &nft,
        format!(
            "#!/bin/sh\nif [ -e {m} ]; then exec sleep 8; fi\nexec {real} \"$@\"\n",
            m = marker.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&nft, std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = format!(
        "PATH={}:/usr/sbin:/usr/bin:/sbin:/bin",
        dir.path().display()
    );

    // The harness's twilld again, behind the PATH wrapper, with a short liveness timeout.
    c.nodes[0].stop_daemon().unwrap();
    c.start_daemon_with(
        0,
        &twill_tests::bins::bin("twilld"),
        &["--liveness-timeout", "2s"],
        &["env", &path],
    )
    .unwrap();
    c.wait_ready(0, Duration::from_secs(20)).unwrap();
    let n = &c.nodes[0];
    assert_eq!(n.http("/healthz").unwrap().0, 200, "{}", n.log_text());

    // Wedge: the next resync's nft call blocks.
    std::fs::write(&marker, b"").unwrap();
    let stalled = wait_for(Duration::from_secs(10), || match n.http("/healthz") {
        Ok((503, body)) => Some(body),
        _ => None,
    });
    let body = stalled.unwrap_or_else(|| panic!("/healthz never failed\n{}", n.log_text()));
    assert!(body.contains("main loop stalled"), "{body}");
    // The HTTP server itself is fine: it is the loop that is stuck.
    assert!(matches!(n.http("/metrics"), Ok((200, _))));

    // Unwedge: once the blocked call returns (or is timed out), /healthz passes again.
    std::fs::remove_file(&marker).unwrap();
    assert!(
        wait_for(Duration::from_secs(30), || matches!(
            n.http("/healthz"),
            Ok((200, _))
        )
        .then_some(()))
        .is_some(),
        "/healthz did not recover\n{}",
        n.log_text()
    );
}
