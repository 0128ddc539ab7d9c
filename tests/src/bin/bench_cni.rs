//! CNI benchmark: twill against Debian's reference `bridge` + `host-local`, in one run, on
//! one node namespace, same subnet and MTU, every pod in a fresh namespace. Not a test: it
//! prints numbers. Run with bench/cni/run.sh, which starts this program inside the node
//! namespace (`nsenter --net=`), so each plugin is exec'd the way a runtime does it: a
//! fork/exec from a process that already is in the node namespace.
//!
//! Pod namespaces are created before and deleted after each batch of 10 iterations, with a
//! pause for the kernel's asynchronous namespace teardown. Per iteration: exec
//! `/bin/true` (the floor), ADD with each plugin, `ip link del` of a fresh (down) veth pair
//! whose peer is in a pod namespace (the kernel's own cost of removing a veth), DEL with each
//! plugin. The order of the two plugins' ADDs alternates; the reference's DEL goes first (see
//! `reap_orphans`). A second loop, after the comparison, times
//! `ip link del` of a veth as a pod has it. p50/p95 are reported raw and net of the floor's
//! p50; peak RSS comes from wait4's rusage.
//!
//! Usage: bench_cni --twill <path> --work <dir> [--iterations 200] [--ref-dir /usr/lib/cni]
//!        [--prefix twb<pid>] [--tmpfs-work <dir on tmpfs>]
//!        (pod namespaces: <prefix>{t,r,v,w}<i>)

use std::io::Write;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::json;

struct Run {
    elapsed: Duration,
    max_rss_kib: i64,
    cpu: Duration,
    stdout: String,
}

/// fork/exec `program` with `env` and `stdin`, wait with wait4 for its rusage.
fn exec(program: &Path, args: &[&str], env: &[(&str, &str)], stdin: &str) -> Result<Run> {
    let start = Instant::now();
    let mut child = Command::new(program)
        .args(args)
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawn {}", program.display()))?;
    let mut input = child.stdin.take().expect("stdin");
    let _ = input.write_all(stdin.as_bytes());
    drop(input);
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: an all-zero rusage is valid; wait4 fills it for our own child.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: pid is our child, not yet reaped; the pointers are valid.
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut ru) };
    let elapsed = start.elapsed();
    if r != pid {
        bail!(
            "wait4 {}: {}",
            program.display(),
            std::io::Error::last_os_error()
        );
    }
    let st = std::process::ExitStatus::from_raw(status);
    if !st.success() {
        let mut out = String::new();
        if let Some(mut o) = child.stdout.take() {
            let _ = std::io::Read::read_to_string(&mut o, &mut out);
        }
        let mut err = String::new();
        if let Some(mut e) = child.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut e, &mut err);
        }
        bail!("{} {args:?} {env:?}: {st}: {out} {err}", program.display());
    }
    let mut stdout = String::new();
    if let Some(mut o) = child.stdout.take() {
        let _ = std::io::Read::read_to_string(&mut o, &mut stdout);
    }
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    Ok(Run {
        elapsed,
        max_rss_kib: ru.ru_maxrss,
        cpu: tv(ru.ru_utime) + tv(ru.ru_stime),
        stdout,
    })
}

/// The CNI environment of one call: `CNI_COMMAND`, container ID, netns, ifname `eth0`.
fn cni_env<'a>(
    cmd: &'static str,
    id: &'a str,
    netns: &'a str,
    cni_path: &'a str,
) -> Vec<(&'a str, &'a str)> {
    vec![
        ("CNI_COMMAND", cmd),
        ("CNI_CONTAINERID", id),
        ("CNI_NETNS", netns),
        ("CNI_IFNAME", "eth0"),
        ("CNI_PATH", cni_path),
    ]
}

fn sh(program: &str, args: &[&str]) -> Result<()> {
    let st = Command::new(program)
        .args(args)
        .stderr(Stdio::inherit())
        .status()
        .with_context(|| format!("spawn {program}"))?;
    if !st.success() {
        bail!("{program} {args:?}: {st}");
    }
    Ok(())
}

#[derive(Default)]
struct Series {
    ms: Vec<f64>,
    cpu_ms: Vec<f64>,
    rss: Vec<i64>,
}

fn percentile(v: &[f64], p: f64) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i]
}

impl Series {
    fn push(&mut self, r: Run) {
        self.ms.push(r.elapsed.as_secs_f64() * 1e3);
        self.cpu_ms.push(r.cpu.as_secs_f64() * 1e3);
        self.rss.push(r.max_rss_kib);
    }
    fn pct(&self, p: f64) -> f64 {
        percentile(&self.ms, p)
    }
    fn max_rss(&self) -> i64 {
        self.rss.iter().copied().max().unwrap_or(0)
    }
}

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let twill = PathBuf::from(arg(&args, "--twill").context("--twill <path> is required")?);
    let work = PathBuf::from(arg(&args, "--work").context("--work <dir> is required")?);
    let n: usize = arg(&args, "--iterations")
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(200);
    let ref_dir = PathBuf::from(arg(&args, "--ref-dir").unwrap_or("/usr/lib/cni".into()));
    let prefix = arg(&args, "--prefix").unwrap_or_else(|| format!("twb{}", std::process::id()));
    let tmpfs = arg(&args, "--tmpfs-work").map(PathBuf::from);

    std::fs::create_dir_all(&work)?;
    let subnet_file = work.join("subnet.env");
    std::fs::write(
        &subnet_file,
        "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.3.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n",
    )?;
    let twill_conf = json!({"cniVersion":"1.0.0","name":"twill","type":"twill",
        "subnetFile": subnet_file, "dataDir": work.join("twill-data"),
        "bridge":"cni0","hairpinMode":true})
    .to_string();
    // The same with the reservations on tmpfs, where fsync costs nothing: the second loop
    // alternates the two, to show how much of an ADD is the disk making the reservation
    // durable.
    let twill_conf_tmpfs = tmpfs.as_ref().map(|t| {
        json!({"cniVersion":"1.0.0","name":"twill","type":"twill",
            "subnetFile": subnet_file, "dataDir": t.join("twill-data"),
            "bridge":"cni0","hairpinMode":true})
        .to_string()
    });
    // Flannel's delegate config for the reference bridge plugin, same subnet and MTU.
    let ref_conf = json!({"cniVersion":"1.0.0","name":"refnet","type":"bridge",
        "bridge":"cni0","isGateway":true,"isDefaultGateway":true,"hairpinMode":true,
        "ipMasq":false,"mtu":1450,
        "ipam":{"type":"host-local","ranges":[[{"subnet":"10.244.3.0/24"}]],
                "routes":[{"dst":"10.244.0.0/16"}],"dataDir": work.join("host-local")}})
    .to_string();
    let bridge = ref_dir.join("bridge");
    let ip = PathBuf::from("/usr/sbin/ip");
    let truebin = PathBuf::from("/bin/true");
    let cni_path = ref_dir.display().to_string();

    let mut floor = Series::default();
    let mut t_add = Series::default();
    let mut t_del = Series::default();
    let mut r_add = Series::default();
    let mut r_del = Series::default();
    let mut vdel = Series::default();
    let mut pvdel = Series::default();
    let mut w_add_disk = Series::default();
    let mut w_add_tmpfs = Series::default();
    // Pod namespaces are made in batches of BATCH iterations before they are used (fresh:
    // each serves one call) and deleted after, then the kernel is given time to tear them
    // down: that runs asynchronously under the RTNL lock and would compete with the next
    // calls. (Every extra namespace mount also slows every exec on this kernel: hundreds of
    // them add milliseconds to the floor, so batches stay small.)
    const BATCH: usize = 10;
    // twill's DEL returns once the veth pair is gone and leaves the kernel's final teardown
    // (an RCU barrier, 15-35 ms) to a child process, which outlives the plugin; as this
    // process is a child subreaper, such orphans become its children. A concurrent
    // rcu_barrier() waits for the other one first, so no deletion is timed while one runs:
    // the reference's DEL goes before twill's in every iteration, and the orphans are reaped
    // before the bare veth's deletion is timed.
    // SAFETY: prctl on this process.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    let reap_orphans = || {
        // No exec of ours is outstanding here: every one was waited for by its pid.
        // SAFETY: waitpid on our own (adopted) children.
        while unsafe { libc::waitpid(-1, std::ptr::null_mut(), 0) } > 0 {}
    };
    let netns_batch = |from: usize, to: usize, verb: &str, kinds: &[&str]| -> Result<()> {
        for i in from..to {
            for k in kinds {
                sh("ip", &["netns", verb, &format!("{prefix}{k}{i}")])?;
            }
        }
        Ok(())
    };
    eprintln!(
        "bench: {n} iterations (twill {} vs bridge+host-local)",
        twill.display()
    );
    for i in 0..n {
        if i % BATCH == 0 {
            netns_batch(i, (i + BATCH).min(n), "add", &["t", "r", "v"])?;
            std::thread::sleep(Duration::from_millis(300));
        }
        let pt = format!("{prefix}t{i}");
        let pr = format!("{prefix}r{i}");
        let pv = format!("{prefix}v{i}");
        let nst = format!("/var/run/netns/{pt}");
        let nsr = format!("/var/run/netns/{pr}");
        let id_t = format!("bench-t-{i}");
        let id_r = format!("bench-r-{i}");
        let env_t = |cmd| cni_env(cmd, &id_t, &nst, &cni_path);
        let env_r = |cmd| cni_env(cmd, &id_r, &nsr, &cni_path);
        floor.push(exec(&truebin, &[], &[], "")?);
        let twill_first = i % 2 == 0;
        for k in 0..2 {
            if (k == 0) == twill_first {
                t_add.push(exec(&twill, &[], &env_t("ADD"), &twill_conf)?);
            } else {
                r_add.push(exec(&bridge, &[], &env_r("ADD"), &ref_conf)?);
            }
        }
        // The kernel's floor for removing a veth whose peer is in a pod namespace.
        reap_orphans();
        let veth = format!("twbv{i}");
        sh(
            "ip",
            &[
                "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &pv,
            ],
        )?;
        vdel.push(exec(&ip, &["link", "del", &veth], &[], "")?);
        r_del.push(exec(&bridge, &[], &env_r("DEL"), &ref_conf)?);
        t_del.push(exec(&twill, &[], &env_t("DEL"), &twill_conf)?);
        if i % BATCH == BATCH - 1 || i == n - 1 {
            netns_batch(i - (i % BATCH), i + 1, "del", &["t", "r", "v"])?;
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    // Apart from the comparison above (so that its extra kernel work does not weigh on it):
    // `ip link del` of the host end of a veth as a pod has it (up, a bridge port with
    // hairpin, the pod end up with its address, routes and IPv6 link-local), made by an
    // twill ADD; an untimed DEL releases the IP. With --tmpfs-work, the ADDs alternate between
    // reservations on disk (as in the comparison) and on tmpfs.
    for i in 0..n {
        if i % BATCH == 0 {
            netns_batch(i, (i + BATCH).min(n), "add", &["w"])?;
            std::thread::sleep(Duration::from_millis(300));
        }
        let nsw = format!("/var/run/netns/{prefix}w{i}");
        let id_w = format!("bench-w-{i}");
        let env_w = |cmd| cni_env(cmd, &id_w, &nsw, &cni_path);
        let (conf_w, series) = match &twill_conf_tmpfs {
            Some(c) if i % 2 == 1 => (c, &mut w_add_tmpfs),
            _ => (&twill_conf, &mut w_add_disk),
        };
        let added = exec(&twill, &[], &env_w("ADD"), conf_w)?;
        let res: serde_json::Value = serde_json::from_str(&added.stdout)?;
        series.push(added);
        let host = res["interfaces"][1]["name"]
            .as_str()
            .context("host veth in the ADD result")?
            .to_string();
        pvdel.push(exec(&ip, &["link", "del", &host], &[], "")?);
        exec(&twill, &[], &env_w("DEL"), conf_w)?;
        if i % BATCH == BATCH - 1 || i == n - 1 {
            netns_batch(i - (i % BATCH), i + 1, "del", &["w"])?;
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    let f50 = floor.pct(0.5);
    let net = |s: &Series, p: f64| (s.pct(p) - f50).max(0.0);
    println!(
        "| call | p50 ms | p95 ms | p50 net ms | p95 net ms | CPU (user+sys) p50 ms | peak RSS KiB |"
    );
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: |");
    for (name, s) in [
        ("exec /bin/true (floor)", &floor),
        ("twill ADD", &t_add),
        ("bridge+host-local ADD", &r_add),
        ("twill DEL", &t_del),
        ("bridge+host-local DEL", &r_del),
        ("ip link del (bare veth)", &vdel),
        ("ip link del (pod veth)", &pvdel),
        ("2nd loop: twill ADD, reservations on disk", &w_add_disk),
        ("2nd loop: twill ADD, reservations on tmpfs", &w_add_tmpfs),
    ] {
        if s.ms.is_empty() {
            continue;
        }
        println!(
            "| {name} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {} |",
            s.pct(0.5),
            s.pct(0.95),
            net(s, 0.5),
            net(s, 0.95),
            percentile(&s.cpu_ms, 0.5),
            s.max_rss()
        );
    }
    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { f64::NAN };
    println!();
    println!(
        "ADD p50 net: twill/reference = {:.3} (target <= 0.25)",
        ratio(net(&t_add, 0.5), net(&r_add, 0.5))
    );
    println!(
        "DEL p50 net: twill/reference = {:.3} (target <= 0.5)",
        ratio(net(&t_del, 0.5), net(&r_del, 0.5))
    );
    println!(
        "DEL p50 net: twill/ip-link-del of a bare veth = {:.3} (target <= 1.3)",
        ratio(net(&t_del, 0.5), net(&vdel, 0.5))
    );
    println!(
        "DEL p50 net: twill/ip-link-del of a pod's veth = {:.3}",
        ratio(net(&t_del, 0.5), net(&pvdel, 0.5))
    );
    if !w_add_tmpfs.ms.is_empty() {
        println!(
            "ADD p50 net, 2nd loop: reservations on disk {:.2} ms, on tmpfs {:.2} ms (twill/reference with tmpfs: {:.3})",
            net(&w_add_disk, 0.5),
            net(&w_add_tmpfs, 0.5),
            ratio(net(&w_add_tmpfs, 0.5), net(&r_add, 0.5))
        );
    }
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!("load average at the end: {}", load.trim());
    let size = std::fs::metadata(&twill)?.len();
    println!(
        "twill binary: {} bytes ({:.2} MiB)",
        size,
        size as f64 / 1048576.0
    );
    Ok(())
}
