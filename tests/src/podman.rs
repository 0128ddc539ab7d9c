//! A real libcni client for the plugin: rootful podman 4.x (Debian 12) with its CNI network
//! backend, isolated from every global podman setting and run inside a node network
//! namespace, so libcni execs `twill` there and cni0/veths never appear in the root namespace.
//!
//! [`Podman`] owns a temp dir holding the container root/runroot (vfs storage), the
//! containers/storage/registries configs (passed through `CONTAINERS_CONF`,
//! `CONTAINERS_STORAGE_CONF`, `CONTAINERS_REGISTRIES_CONF`, so nothing under /etc is read),
//! a plugin dir (`twill` + symlinks to Debian's /usr/lib/cni plugins), the `twill` conflist of
//! DESIGN.md with its own subnet file and data dir, and a busybox rootfs (`--rootfs`, no image
//! registry needed). Containers go into a cgroup parent named like the namespaces
//! (`tw<pid>n<seq>pmcg`). On drop: `podman rm -f` of everything it started (CNI DEL through
//! libcni), then, as a last resort, kill the recorded conmon/container PIDs, delete the
//! recorded container netns and libcni's cached results of our container IDs, unmount what
//! podman left mounted under the temp dir, remove the cgroup parent, and delete the node
//! namespace. Podman also creates empty /run/runc and /var/lib/cni/results (libcni 1.1's
//! fixed cache dir, not configurable in podman 4.3); both stay, empty.
//!
//! Sandbox quirks: crun 1.8 refuses cgroup v1/v2 hybrid hosts ("cgroups in hybrid mode not
//! supported"), and runc refuses `cgroups = "disabled"`, so runc with cgroupfs is used; the
//! sandbox's hard RLIMIT_NOFILE (20000) is below podman's default (1048576), so the ulimits
//! are set explicitly.

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail, ensure};
use serde_json::{Value, json};

use crate::netns::{TestNetns, unique_name};

/// The node's subnet file (flannel's subnet.env format).
pub const SUBNET_ENV: &str = "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.7.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n";
/// A dual-stack node's subnet file: [`SUBNET_ENV`] plus the IPv6 keys twilld writes.
pub const DUAL_SUBNET_ENV: &str = "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.7.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\nFLANNEL_IPV6_NETWORK=fc00::/48\nFLANNEL_IPV6_SUBNET=fc00:0:0:7::1/64\n";
/// The node's IPv6 pod subnet, from [`DUAL_SUBNET_ENV`].
pub const POD_SUBNET6: &str = "fc00:0:0:7::/64";
/// The node's pod subnet and gateway (cni0's address), from [`SUBNET_ENV`].
pub const POD_SUBNET: &str = "10.244.7.0/24";
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 244, 7, 1);
/// The network name in the conflist, what `--network` takes.
pub const NETWORK: &str = "twill";

/// libcni 1.1's default cache of results (podman 4.3 does not configure another).
const CNI_CACHE: &str = "/var/lib/cni/results";
/// Where Debian's busybox-static puts its binary.
const BUSYBOX: &str = "/bin/busybox";
/// Applets linked into the rootfs.
const APPLETS: &[&str] = &["sh", "ip", "ping", "cat", "sleep", "nc", "echo", "true"];
/// Tools the harness needs, installed by scripts/setup.sh.
const TOOLS: &[&str] = &[
    "/usr/bin/podman",
    "/usr/bin/conmon",
    "/usr/sbin/runc",
    BUSYBOX,
];

/// One container started by [`Podman::run_detached`].
#[derive(Debug, Clone)]
pub struct Container {
    pub name: String,
    pub id: String,
    pub pid: u32,
    pub conmon_pid: u32,
    /// The netns podman created for it (`/run/netns/netns-<uuid>`), CNI_NETNS for libcni.
    pub sandbox: PathBuf,
}

/// Podman isolated in a temp dir, run inside its own node namespace.
#[derive(Debug)]
pub struct Podman {
    node: TestNetns,
    dir: tempfile::TempDir,
    cgroup_parent: String,
    started: Vec<Container>,
}

fn path_str(p: &Path) -> String {
    p.display().to_string()
}

/// Fails (never skips) when a tool is missing: scripts/setup.sh installs them.
pub fn require_tools() {
    for t in TOOLS {
        assert!(
            Path::new(t).exists(),
            "{t} is missing: run scripts/setup.sh (it installs podman, runc, conmon, busybox-static)"
        );
    }
}

impl Podman {
    /// Sets everything up; `plugin` is the built `twill` binary.
    pub fn new(plugin: &Path) -> Result<Self> {
        Self::with_subnet_env(plugin, SUBNET_ENV)
    }

    /// [`Podman::new`] with another subnet file (e.g. [`DUAL_SUBNET_ENV`]).
    pub fn with_subnet_env(plugin: &Path, subnet_env: &str) -> Result<Self> {
        require_tools();
        let node = TestNetns::new("pmnode")?;
        let dir = tempfile::Builder::new().prefix("twpodman").tempdir()?;
        let pm = Podman {
            node,
            cgroup_parent: unique_name("pmcg"),
            dir,
            started: vec![],
        };
        pm.write_files(plugin, subnet_env)?;
        Ok(pm)
    }

    fn write_files(&self, plugin: &Path, subnet_env: &str) -> Result<()> {
        let d = self.dir.path();
        for sub in ["root", "runroot", "tmp", "net", "cni-bin", "data"] {
            std::fs::create_dir_all(d.join(sub))?;
        }
        // The plugin dir: twill itself plus the reference plugins (portmap, loopback, ...).
        std::fs::copy(plugin, d.join("cni-bin/twill"))
            .with_context(|| format!("copy {} into the plugin dir", plugin.display()))?;
        for e in std::fs::read_dir("/usr/lib/cni").context("read /usr/lib/cni")? {
            let e = e?;
            std::os::unix::fs::symlink(e.path(), d.join("cni-bin").join(e.file_name()))?;
        }
        std::fs::write(d.join("subnet.env"), subnet_env)?;
        let conflist = json!({"cniVersion":"1.0.0","cniVersions":["1.0.0","1.1.0"],"name":NETWORK,
            "plugins":[
                {"type":"twill","subnetFile":d.join("subnet.env"),"dataDir":d.join("data"),
                 "bridge":"cni0","hairpinMode":true},
                {"type":"portmap","capabilities":{"portMappings":true}}]});
        std::fs::write(
            d.join("net/10-twill.conflist"),
            serde_json::to_vec_pretty(&conflist)?,
        )?;

        let rootfs = d.join("rootfs");
        for sub in ["bin", "etc", "proc", "sys", "dev", "tmp", "run"] {
            std::fs::create_dir_all(rootfs.join(sub))?;
        }
        std::fs::copy(BUSYBOX, rootfs.join("bin/busybox")).context("copy busybox")?;
        for a in APPLETS {
            std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(a))?;
        }

        let p = |s: &str| path_str(&d.join(s));
        let containers_conf = format!(
            r#"[containers]
netns = "private"
default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]

[network]
network_backend = "cni"
cni_plugin_dirs = ["{bin}"]
network_config_dir = "{net}"
default_network = "{NETWORK}"

[engine]
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = "{events}"
runtime = "runc"
tmp_dir = "{tmp}"
static_dir = "{static_dir}"
volume_path = "{volumes}"
"#,
            bin = p("cni-bin"),
            net = p("net"),
            events = p("events.log"),
            tmp = p("tmp"),
            static_dir = p("root/libpod"),
            volumes = p("root/volumes"),
        );
        std::fs::write(d.join("containers.conf"), containers_conf)?;
        std::fs::write(
            d.join("storage.conf"),
            format!(
                "[storage]\ndriver = \"vfs\"\nrunroot = \"{}\"\ngraphroot = \"{}\"\n",
                p("runroot"),
                p("root")
            ),
        )?;
        std::fs::write(
            d.join("registries.conf"),
            "unqualified-search-registries = []\n",
        )?;
        Ok(())
    }

    /// The node namespace podman (and so libcni and the plugins) runs in.
    pub fn node(&self) -> &TestNetns {
        &self.node
    }

    /// The busybox rootfs for `--rootfs`.
    pub fn rootfs(&self) -> PathBuf {
        self.dir.path().join("rootfs")
    }

    /// twill's allocator state (`<dataDir>/twill/state.json`).
    pub fn state_file(&self) -> PathBuf {
        self.dir.path().join("data/twill/state.json")
    }

    /// The reservations in twill's state file (none if it does not exist).
    pub fn reservations(&self) -> Result<Vec<Value>> {
        match std::fs::read(self.state_file()) {
            Ok(b) => Ok(serde_json::from_slice::<Value>(&b)
                .context("parse twill state.json")?["reservations"]
                .as_array()
                .cloned()
                .unwrap_or_default()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(vec![]),
            Err(e) => Err(e).context("read twill state.json"),
        }
    }

    /// A `podman` command inside the node namespace with the isolated configuration.
    pub fn command<I, S>(&self, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let d = self.dir.path();
        let mut c = self.node.command("podman");
        c.arg("--root")
            .arg(d.join("root"))
            .arg("--runroot")
            .arg(d.join("runroot"))
            .arg("--storage-driver")
            .arg("vfs")
            .args(args)
            .env("CONTAINERS_CONF", d.join("containers.conf"))
            .env("CONTAINERS_STORAGE_CONF", d.join("storage.conf"))
            .env("CONTAINERS_REGISTRIES_CONF", d.join("registries.conf"))
            .stdin(Stdio::null());
        c
    }

    /// Runs `podman args`; an error carries podman's stderr (libcni's error text).
    pub fn run(&self, args: &[&str]) -> Result<String> {
        let out = self
            .command(args)
            .output()
            .context("spawn nsenter podman")?;
        if !out.status.success() {
            bail!(
                "podman {}: {}: {}{}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim(),
                String::from_utf8_lossy(&out.stdout).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `podman run -d --name <name> --network twill <extra> --rootfs <rootfs> <cmd>`.
    pub fn run_detached(&mut self, name: &str, extra: &[&str], cmd: &[&str]) -> Result<Container> {
        let rootfs = path_str(&self.rootfs());
        let cg = format!("/{}", self.cgroup_parent);
        let mut args = vec![
            "run",
            "-d",
            "--name",
            name,
            "--network",
            NETWORK,
            "--cgroup-parent",
            &cg,
        ];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["--rootfs", &rootfs]);
        args.extend_from_slice(cmd);
        let res = self.run(&args);
        // Whatever happened, the container may exist: remember it for the cleanup.
        let c = self.inspect(name);
        if let Ok(c) = &c {
            self.started.push(c.clone());
        } else {
            self.started.push(Container {
                name: name.into(),
                id: String::new(),
                pid: 0,
                conmon_pid: 0,
                sandbox: PathBuf::new(),
            });
        }
        let id = res?;
        let c = c?;
        ensure!(
            id.trim() == c.id,
            "podman run printed {:?}, inspect says {}",
            id.trim(),
            c.id
        );
        Ok(c)
    }

    /// `podman inspect` of one container.
    pub fn inspect(&self, name: &str) -> Result<Container> {
        let v = self.inspect_json(name)?;
        Ok(Container {
            name: name.into(),
            id: v["Id"].as_str().context("inspect: Id")?.into(),
            pid: v["State"]["Pid"].as_u64().unwrap_or(0) as u32,
            conmon_pid: v["State"]["ConmonPid"].as_u64().unwrap_or(0) as u32,
            sandbox: PathBuf::from(v["NetworkSettings"]["SandboxKey"].as_str().unwrap_or("")),
        })
    }

    /// `podman inspect <name>`'s object.
    pub fn inspect_json(&self, name: &str) -> Result<Value> {
        let out = self.run(&["inspect", "--type", "container", name])?;
        let v: Value = serde_json::from_str(&out).context("parse podman inspect")?;
        Ok(v[0].clone())
    }

    /// The IPv4 address podman reports for `name` on the twill network (libcni's result).
    pub fn ip(&self, name: &str) -> Result<Ipv4Addr> {
        let v = self.inspect_json(name)?;
        let s = v["NetworkSettings"]["Networks"][NETWORK]["IPAddress"]
            .as_str()
            .with_context(|| format!("inspect {name}: no IPAddress on network {NETWORK}"))?;
        s.parse()
            .with_context(|| format!("inspect {name}: IPAddress {s:?}"))
    }

    /// The IPv6 address podman reports for `name` on the twill network (libcni's result).
    pub fn ipv6(&self, name: &str) -> Result<std::net::Ipv6Addr> {
        let v = self.inspect_json(name)?;
        let s = v["NetworkSettings"]["Networks"][NETWORK]["GlobalIPv6Address"]
            .as_str()
            .with_context(|| {
                format!("inspect {name}: no GlobalIPv6Address on network {NETWORK}")
            })?;
        s.parse()
            .with_context(|| format!("inspect {name}: GlobalIPv6Address {s:?}"))
    }

    /// `podman exec <name> <cmd>`.
    pub fn exec(&self, name: &str, cmd: &[&str]) -> Result<String> {
        let mut args = vec!["exec", name];
        args.extend_from_slice(cmd);
        self.run(&args)
    }

    /// `podman rm -f -t 0 <names>` (CNI DEL through libcni).
    pub fn rm(&self, names: &[&str]) -> Result<()> {
        let mut args = vec!["rm", "-f", "-t", "0"];
        args.extend_from_slice(names);
        self.run(&args).map(|_| ())
    }

    /// Names of the containers podman knows (running or not).
    pub fn containers(&self) -> Result<Vec<String>> {
        Ok(self
            .run(&["ps", "-a", "--format", "{{.Names}}"])?
            .lines()
            .map(str::to_string)
            .filter(|l| !l.is_empty())
            .collect())
    }

    /// libcni's cached results for `id` (libcni 1.1 keeps them in /var/lib/cni/results).
    pub fn cni_cache_entries(id: &str) -> Vec<String> {
        std::fs::read_dir(CNI_CACHE)
            .map(|it| {
                it.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| !id.is_empty() && n.contains(id))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Mount points under the temp dir (e.g. podman's per-container shm tmpfs).
    fn mounts_under_dir(&self) -> Vec<String> {
        let prefix = path_str(self.dir.path());
        std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split(' ').nth(4).map(str::to_string))
            .filter(|m| m.starts_with(&prefix))
            .collect()
    }

    fn cleanup(&mut self) {
        if !self.started.is_empty() {
            let _ = self
                .command(["rm", "-f", "-t", "0", "--all"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        for c in &self.started {
            // Last resort, only the PIDs podman reported for our containers, and only if
            // they still are what they were (conmon with our id / a process in our cgroup).
            if c.conmon_pid != 0 && !c.id.is_empty() {
                let cmdline =
                    std::fs::read(format!("/proc/{}/cmdline", c.conmon_pid)).unwrap_or_default();
                if String::from_utf8_lossy(&cmdline).contains(&c.id) {
                    // SAFETY: kill has no memory-safety preconditions.
                    unsafe { libc::kill(c.conmon_pid as i32, libc::SIGKILL) };
                }
            }
            if c.pid != 0 {
                let cg =
                    std::fs::read_to_string(format!("/proc/{}/cgroup", c.pid)).unwrap_or_default();
                if cg.contains(&self.cgroup_parent) {
                    // SAFETY: as above.
                    unsafe { libc::kill(c.pid as i32, libc::SIGKILL) };
                }
            }
            // libcni keeps a cached result until DEL succeeds: `<network>-<id>-<ifname>`.
            for n in Self::cni_cache_entries(&c.id) {
                if n.starts_with(&format!("{NETWORK}-{}-", c.id)) {
                    let _ = std::fs::remove_file(Path::new(CNI_CACHE).join(n));
                }
            }
            if let Some(n) = c.sandbox.file_name().and_then(OsStr::to_str)
                && n.starts_with("netns-")
                && c.sandbox.exists()
            {
                let _ = Command::new("ip")
                    .args(["netns", "del", n])
                    .stderr(Stdio::null())
                    .status();
            }
        }
        // Deepest first, so a parent is unmounted after what is mounted below it.
        let mut mounts = self.mounts_under_dir();
        mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in mounts {
            let _ = nix::mount::umount2(m.as_str(), nix::mount::MntFlags::MNT_DETACH);
        }
        self.remove_cgroups();
    }

    /// Removes `/sys/fs/cgroup/<hierarchy>/<cgroup parent>` and what podman created in it
    /// (`conmon`, `libpod-<id>`); rmdir only succeeds on empty cgroups.
    fn remove_cgroups(&self) {
        let Ok(hier) = std::fs::read_dir("/sys/fs/cgroup") else {
            return;
        };
        for h in hier.filter_map(|e| e.ok()) {
            let top = h.path().join(&self.cgroup_parent);
            if !top.is_dir() {
                continue;
            }
            let mut dirs = BTreeSet::new();
            collect_dirs(&top, &mut dirs);
            let mut dirs: Vec<_> = dirs.into_iter().collect();
            dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
            for d in dirs {
                // EBUSY while a process is still in it: podman's cleanup process runs the
                // plugin's DEL in conmon's cgroup, and DEL's child that sits out the kernel's
                // veth teardown lives up to ~35 ms more. Wait for such stragglers (1 s at most).
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
                while let Err(e) = std::fs::remove_dir(&d) {
                    if e.raw_os_error() != Some(libc::EBUSY) || std::time::Instant::now() > deadline
                    {
                        break;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
            }
        }
    }

    /// The cgroup parent (a directory name in every /sys/fs/cgroup hierarchy).
    pub fn cgroup_parent(&self) -> &str {
        &self.cgroup_parent
    }
}

fn collect_dirs(d: &Path, out: &mut BTreeSet<PathBuf>) {
    out.insert(d.to_path_buf());
    if let Ok(it) = std::fs::read_dir(d) {
        for e in it.filter_map(|e| e.ok()) {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                collect_dirs(&e.path(), out);
            }
        }
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        // Runs before the fields drop: containers go (CNI DEL inside the node namespace)
        // while the node namespace still exists; the temp dir and namespace go afterwards.
        self.cleanup();
    }
}
