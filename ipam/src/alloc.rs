//! The on-disk pod IP allocator of the CNI plugin.
//!
//! One directory per CNI network (`<dataDir>/<network name>/`) holds:
//! - `state.json`: every reservation, keyed by (container ID, ifname), and the last
//!   reserved IP; rewritten crash-safe (temp file + fsync + rename: see `replace_file`);
//! - `.state.json.next`: that temp file, the previous version between two writes;
//! - `lock`: taken with `File::lock` (flock) around every read-modify-write, so parallel
//!   plugin processes never hand out the same IP. The lock file stays (removing it would race
//!   with waiters); the lock itself is released when the process closes it or exits.
//!
//! Allocation is round-robin: the search starts after the last reserved IP, so an IP that
//! was just freed is not handed out again at once. The network address, the gateway (first
//! host) and the broadcast address (last) are never handed out.
//!
//! Reservations live as long as the boot they were made in: the state records the kernel's
//! boot ID, and the first lock after a reboot releases every reservation of the previous
//! boot (no pod network namespace survives a reboot, and a runtime whose own state was on
//! tmpfs never sends their DELs, which is how host-local leaks IPs). They are kept as hints:
//! the same (container ID, ifname) asking again, as Podman does for a container that
//! restarts after a reboot, gets its IP back if it is still free.

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// Allocator errors; each names the path, IP or subnet at fault.
#[derive(Debug, thiserror::Error)]
pub enum AllocError {
    #[error("IP allocator {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("IP allocator state {path} is corrupt: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error("no free IP left in subnet {subnet} ({reserved} reserved)")]
    Full { subnet: IpNet, reserved: usize },
    #[error("requested IP {ip} is not usable in subnet {subnet}: {reason}")]
    OutOfRange {
        ip: IpAddr,
        subnet: IpNet,
        reason: &'static str,
    },
    #[error("requested IP {ip} is already reserved by container {container_id} ({ifname})")]
    Taken {
        ip: IpAddr,
        container_id: String,
        ifname: String,
    },
}

/// One pod interface's reservation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Reservation {
    /// The address of the node subnet (IPv4 on a dual-stack node).
    pub ip: IpAddr,
    /// The address of the node's IPv6 subnet (FLANNEL_IPV6_SUBNET), on a dual-stack node:
    /// reserved and released together with `ip`. Absent in a state written before twill
    /// was dual-stack (and in an IPv4-only one), which loads as it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv6: Option<IpAddr>,
    pub container_id: String,
    pub ifname: String,
    /// The host end of the pod's veth pair, so DEL/GC can find it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_veth: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_name: Option<String>,
}

impl Reservation {
    pub fn is(&self, container_id: &str, ifname: &str) -> bool {
        self.container_id == container_id && self.ifname == ifname
    }
}

/// What the caller knows about the pod when it asks for an IP.
#[derive(Debug, Clone, Default)]
pub struct Request {
    pub container_id: String,
    pub ifname: String,
    pub host_veth: Option<String>,
    pub netns: Option<String>,
    pub pod_namespace: Option<String>,
    pub pod_name: Option<String>,
    /// A specific IP (runtimeConfig.ips, CNI_ARGS IP=); otherwise the next free one.
    pub ip: Option<IpAddr>,
    /// The subnet's gateway (the bridge's address, from the subnet file), never handed
    /// out; `None`: the first host address.
    pub gateway: Option<IpAddr>,
    /// A dual-stack node: an address of this second subnet too, in the same reservation.
    pub ipv6: Option<SecondFamily>,
}

/// The second address of a dual-stack reservation: its subnet (FLANNEL_IPV6_SUBNET's
/// network), a specific IP (runtimeConfig.ips) or none, and the gateway never handed out.
#[derive(Debug, Clone)]
pub struct SecondFamily {
    pub subnet: IpNet,
    pub ip: Option<IpAddr>,
    pub gateway: Option<IpAddr>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct State {
    /// Incremented by every write: of two good copies (`state.json` and `.state.json.next`)
    /// the higher one is the newer. Absent (0) in a state written before twill counted.
    #[serde(default)]
    generation: u64,
    /// The boot the reservations were made in (`/proc/sys/kernel/random/boot_id`). Absent
    /// in a state written before twill recorded it: then nothing is released.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    boot_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    last_reserved: Option<IpAddr>,
    /// The last reserved IPv6 address (round-robin of the second family).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    last_reserved_v6: Option<IpAddr>,
    #[serde(default)]
    reservations: Vec<Reservation>,
    /// The reservations of the previous boot, released at the first lock after the reboot:
    /// hints that give the same (container ID, ifname) its IP back while it is free.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    previous_boot: Vec<Reservation>,
}

/// The kernel's ID of the running boot; `None` where it cannot be read (then reservations
/// are never released for a reboot).
pub fn current_boot_id() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

/// The allocator for one CNI network: a directory under the data dir.
#[derive(Debug, Clone)]
pub struct Allocator {
    dir: PathBuf,
    boot_id: Option<String>,
}

impl Allocator {
    /// `<data_dir>/<network>`, in the running boot. Nothing is created until
    /// [`Allocator::lock`].
    pub fn new(data_dir: impl AsRef<Path>, network: &str) -> Self {
        Allocator {
            dir: data_dir.as_ref().join(network),
            boot_id: current_boot_id(),
        }
    }

    /// The same allocator as seen from the boot `boot_id` (tests, tools).
    pub fn with_boot_id(mut self, boot_id: impl Into<String>) -> Self {
        self.boot_id = Some(boot_id.into());
        self
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn state_path(&self) -> PathBuf {
        self.dir.join("state.json")
    }

    pub fn lock_path(&self) -> PathBuf {
        self.dir.join("lock")
    }

    /// Takes the lock (blocking) and reads the state. Changes are written by
    /// [`Locked::commit`]; dropping the guard without commit discards them.
    pub fn lock(&self) -> Result<Locked, AllocError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| AllocError::Io { path, source }
        };
        std::fs::create_dir_all(&self.dir).map_err(io(&self.dir))?;
        let lock_path = self.lock_path();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock_path)
            .map_err(io(&lock_path))?;
        file.lock().map_err(io(&lock_path))?;
        let state_path = self.state_path();
        let (mut state, recovered) = read_newest_good(&state_path)?;
        let mut released_for_reboot = 0;
        if let (Some(then), Some(now)) = (&state.boot_id, &self.boot_id)
            && then != now
        {
            // A reboot since the last write: every pod of that boot is gone.
            released_for_reboot = state.reservations.len();
            state.previous_boot = std::mem::take(&mut state.reservations);
        }
        // The boot ID goes in with the next write; a lock that changes nothing writes nothing.
        // A state recovered from the previous copy is written back at once (into
        // `state.json`, keeping the copy it came from: see `Locked::commit`).
        let dirty = released_for_reboot > 0 || recovered.is_some();
        state.boot_id = self.boot_id.clone();
        Ok(Locked {
            _lock: file,
            state,
            state_path,
            dirty,
            released_for_reboot,
            recovered,
        })
    }

    /// All reservations (takes the lock briefly).
    pub fn list(&self) -> Result<Vec<Reservation>, AllocError> {
        Ok(self.lock()?.state.reservations)
    }
}

/// A write of the state running on a thread of its own ([`Locked::commit_in_background`]).
#[derive(Debug)]
pub struct PendingCommit {
    rx: std::sync::mpsc::Receiver<Result<(), AllocError>>,
    path: PathBuf,
}

impl PendingCommit {
    /// The write's result. Its answer comes over a channel: waiting for the thread's exit
    /// would add the kernel's thread teardown (~0.1 ms) to the caller.
    pub fn wait(self) -> Result<(), AllocError> {
        self.rx.recv().unwrap_or_else(|_| {
            Err(AllocError::Io {
                path: self.path,
                source: std::io::Error::other("the thread writing the state died"),
            })
        })
    }
}

/// The allocator's state while its lock is held.
#[derive(Debug)]
pub struct Locked {
    _lock: File,
    state: State,
    state_path: PathBuf,
    dirty: bool,
    released_for_reboot: usize,
    recovered: Option<Recovered>,
}

/// Why the state was read from `.state.json.next` rather than `state.json`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovered {
    /// The path the state was read from (`.state.json.next`).
    pub from: PathBuf,
    /// What was wrong with `state.json` (it did not parse, or it was older).
    pub reason: String,
}

impl Locked {
    pub fn reservations(&self) -> &[Reservation] {
        &self.state.reservations
    }

    /// How many reservations of a previous boot this lock released (0 but once per boot).
    pub fn released_for_reboot(&self) -> usize {
        self.released_for_reboot
    }

    /// Set when `state.json` did not parse (torn by a power cut, damaged) or was older than
    /// its copy `.state.json.next`, and the state was read from that copy.
    pub fn recovered(&self) -> Option<&Recovered> {
        self.recovered.as_ref()
    }

    pub fn get(&self, container_id: &str, ifname: &str) -> Option<&Reservation> {
        self.state
            .reservations
            .iter()
            .find(|r| r.is(container_id, ifname))
    }

    pub fn last_reserved(&self) -> Option<IpAddr> {
        self.state.last_reserved
    }

    /// Reserves an IP of `subnet` (the node subnet, e.g. 10.244.3.0/24) for the request,
    /// and with `req.ipv6` one of that second subnet too, in the same reservation (both or
    /// neither). Returns the reservation and whether it is new or changed (false: the same
    /// (container ID, ifname) already held one that fits the request, returned unchanged).
    pub fn reserve(
        &mut self,
        subnet: IpNet,
        req: &Request,
    ) -> Result<(Reservation, bool), AllocError> {
        let own = self.get(&req.container_id, &req.ifname).cloned();
        if let Some(r) = &own
            && req.ip.is_none_or(|ip| ip == r.ip)
            && match (&req.ipv6, r.ipv6) {
                (None, None) => true,
                (Some(q), Some(a)) => q.subnet.contains(&a) && q.ip.is_none_or(|ip| ip == a),
                _ => false,
            }
        {
            return Ok((r.clone(), false));
        }
        // The IPs this (container ID, ifname) holds now or held before a reboot are tried
        // first while they are free (a node that became dual-stack keeps a pod's IPv4).
        let hint = |v6: bool| {
            let of = |r: &Reservation| if v6 { r.ipv6 } else { Some(r.ip) };
            own.as_ref().and_then(of).or_else(|| {
                self.state
                    .previous_boot
                    .iter()
                    .find(|r| r.is(&req.container_id, &req.ifname))
                    .and_then(of)
            })
        };
        let ip = self.pick(
            subnet,
            req.ip,
            req.gateway,
            hint(false),
            self.state.last_reserved,
            req,
            |r| Some(r.ip),
        )?;
        let ipv6 = match &req.ipv6 {
            None => None,
            Some(q) => Some(self.pick(
                q.subnet,
                q.ip,
                q.gateway,
                hint(true),
                self.state.last_reserved_v6,
                req,
                |r| r.ipv6,
            )?),
        };
        self.state
            .reservations
            .retain(|r| !r.is(&req.container_id, &req.ifname));
        self.state
            .previous_boot
            .retain(|r| !r.is(&req.container_id, &req.ifname));
        let r = Reservation {
            ip,
            ipv6,
            container_id: req.container_id.clone(),
            ifname: req.ifname.clone(),
            host_veth: req.host_veth.clone(),
            netns: req.netns.clone(),
            pod_namespace: req.pod_namespace.clone(),
            pod_name: req.pod_name.clone(),
        };
        self.state.reservations.push(r.clone());
        self.state.last_reserved = Some(ip);
        if ipv6.is_some() {
            self.state.last_reserved_v6 = ipv6;
        }
        self.dirty = true;
        Ok((r, true))
    }

    /// One address of `subnet` for `req`: `want` if it is usable and free, else the next
    /// free one after `last` (round-robin), `hint` first while it is free. `of` gives a
    /// reservation's address of this family. Never enumerates the subnet: at most
    /// |reserved| + 1 candidates are looked at, so a /64 costs what a /24 does.
    #[allow(clippy::too_many_arguments)]
    fn pick(
        &self,
        subnet: IpNet,
        want: Option<IpAddr>,
        gateway: Option<IpAddr>,
        hint: Option<IpAddr>,
        last: Option<IpAddr>,
        req: &Request,
        of: impl Fn(&Reservation) -> Option<IpAddr>,
    ) -> Result<IpAddr, AllocError> {
        let subnet = subnet.trunc();
        let (first, last_host) = host_range(subnet);
        let gateway = gateway.unwrap_or_else(|| from_u128(subnet, first));
        let mut taken: HashSet<IpAddr> = self
            .state
            .reservations
            .iter()
            .filter(|r| !r.is(&req.container_id, &req.ifname))
            .filter_map(&of)
            .collect();
        let reserved = taken.len();
        // The gateway is skipped as if it were reserved, wherever it is in the subnet.
        taken.insert(gateway);
        if let Some(ip) = want {
            let reason = if ip.is_ipv4() != subnet.addr().is_ipv4() || !subnet.contains(&ip) {
                Some("outside the subnet")
            } else if ip == subnet.network() {
                Some(if ip.is_ipv4() {
                    "the network address"
                } else {
                    "the subnet-router anycast (network) address"
                })
            } else if ip == gateway {
                Some("the gateway")
            } else if to_u128(ip) > last_host {
                Some(if ip.is_ipv4() {
                    "the broadcast address"
                } else {
                    "the last address of the subnet (reserved)"
                })
            } else {
                None
            };
            if let Some(reason) = reason {
                return Err(AllocError::OutOfRange { ip, subnet, reason });
            }
            if let Some(r) = self.state.reservations.iter().find(|r| of(r) == Some(ip))
                && !r.is(&req.container_id, &req.ifname)
            {
                return Err(AllocError::Taken {
                    ip,
                    container_id: r.container_id.clone(),
                    ifname: r.ifname.clone(),
                });
            }
            return Ok(ip);
        }
        if first > last_host {
            return Err(AllocError::Full { subnet, reserved });
        }
        let hint = hint.filter(|ip| {
            ip.is_ipv4() == subnet.addr().is_ipv4()
                && subnet.contains(ip)
                && (first..=last_host).contains(&to_u128(*ip))
                && !taken.contains(ip)
        });
        // The size is at most 2^128 - 2 (::/0 without its first and last address): no
        // overflow.
        let size = last_host - first + 1;
        let last = last
            .filter(|l| l.is_ipv4() == subnet.addr().is_ipv4())
            .map(to_u128);
        let start = match (hint, last) {
            (Some(h), _) => to_u128(h),
            (None, Some(l)) if (first..last_host).contains(&l) => l + 1,
            _ => first,
        };
        // At most |taken| + 1 candidates need a look before a free one shows up.
        let tries = size.min(taken.len() as u128 + 1);
        (0..tries)
            .map(|i| from_u128(subnet, first + (start - first + i) % size))
            .find(|ip| !taken.contains(ip))
            .ok_or(AllocError::Full { subnet, reserved })
    }

    /// Releases the reservation of (container ID, ifname), if any.
    pub fn release(&mut self, container_id: &str, ifname: &str) -> Option<Reservation> {
        let hints = self.state.previous_boot.len();
        self.state
            .previous_boot
            .retain(|r| !r.is(container_id, ifname));
        if self.state.previous_boot.len() != hints {
            self.dirty = true;
        }
        let i = self
            .state
            .reservations
            .iter()
            .position(|r| r.is(container_id, ifname))?;
        self.dirty = true;
        Some(self.state.reservations.remove(i))
    }

    /// Releases every reservation for which `keep` is false; returns them.
    pub fn release_unless(&mut self, keep: impl Fn(&Reservation) -> bool) -> Vec<Reservation> {
        let (kept, gone): (Vec<_>, Vec<_>) = std::mem::take(&mut self.state.reservations)
            .into_iter()
            .partition(|r| keep(r));
        self.state.reservations = kept;
        let hints = self.state.previous_boot.len();
        self.state.previous_boot.retain(|r| keep(r));
        if !gone.is_empty() || self.state.previous_boot.len() != hints {
            self.dirty = true;
        }
        gone
    }

    /// [`Locked::commit`] on a thread of its own, which holds the lock until the state is
    /// written; returns at once, so the caller's other work overlaps the fsync.
    pub fn commit_in_background(self) -> PendingCommit {
        let path = self.state_path.clone();
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        std::thread::spawn(move || {
            let _ = tx.send(self.commit());
        });
        PendingCommit { rx, path }
    }

    /// Writes the state if it changed (crash-safe), then releases the lock.
    pub fn commit(mut self) -> Result<(), AllocError> {
        if !self.dirty {
            return Ok(());
        }
        self.state.generation += 1;
        let bytes = serde_json::to_vec_pretty(&self.state).expect("state serializes");
        let res = if self.recovered.is_some() {
            // The state came from the copy: write `state.json` in place and leave the copy
            // alone, so a crash during this write still finds that good copy.
            write_in_place(&self.state_path, &bytes)
        } else {
            replace_file(&self.state_path, &bytes)
        };
        res.map_err(|source| AllocError::Io {
            path: self.state_path.clone(),
            source,
        })
    }
}

/// Replaces the state file at `path` with `data`, crash-safe, through its copy
/// `.state.json.next` ([`crate::fsutil::swap_file`]). At every instant one of the two files is
/// a complete, fsynced version; [`Allocator::lock`] reads the newest one that parses (by
/// generation), without looking at any clock.
fn replace_file(path: &Path, data: &[u8]) -> std::io::Result<()> {
    crate::fsutil::swap_file(path, &next_path(path), data)
}

/// `.state.json.next` beside the state file `path`.
fn next_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.next"))
}

/// One copy of the state: `None` if the file does not exist, `Some(Err(reason))` if it does
/// not parse.
fn read_copy(path: &Path) -> Result<Option<Result<State, String>>, AllocError> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(Some(
            serde_json::from_slice::<State>(&bytes).map_err(|e| e.to_string()),
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(AllocError::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// The newest good copy of the state: `state.json`, or its copy `.state.json.next` when
/// `state.json` does not parse or the copy has a higher generation (a write that reached
/// the disk but whose swap did not: its reservations may be in use, so they are kept).
/// No clock is involved. A missing `state.json` is an empty state (the documented reset
/// deletes it); it is an error only when no copy parses.
fn read_newest_good(path: &Path) -> Result<(State, Option<Recovered>), AllocError> {
    let next = next_path(path);
    let main = match read_copy(path)? {
        None => return Ok((State::default(), None)),
        Some(m) => m,
    };
    let copy = read_copy(&next)?;
    match (main, copy) {
        (Ok(m), Some(Ok(c))) if c.generation > m.generation => {
            let reason = format!(
                "state.json has generation {}, its copy {}",
                m.generation, c.generation
            );
            Ok((c, Some(Recovered { from: next, reason })))
        }
        (Ok(m), _) => Ok((m, None)),
        (Err(reason), Some(Ok(c))) => Ok((c, Some(Recovered { from: next, reason }))),
        (Err(reason), copy) => Err(AllocError::Corrupt {
            path: path.to_path_buf(),
            reason: match copy {
                None => format!("{reason} (and there is no copy {})", next.display()),
                Some(Err(r)) => format!("{reason} (and its copy {} neither: {r})", next.display()),
                Some(Ok(_)) => unreachable!("matched above"),
            },
        }),
    }
}

/// Overwrites `path` in place with `data` and fsyncs it (used right after a recovery from
/// the copy, which must stay intact until this write is on disk).
fn write_in_place(path: &Path, data: &[u8]) -> std::io::Result<()> {
    crate::fsutil::overwrite_file(path, data)?;
    crate::fsutil::sync_dir(path)
}

/// The first and last host IP (as numbers): after the network address, before the
/// broadcast address (the last address). The gateway, one of them, is skipped separately.
fn host_range(subnet: IpNet) -> (u128, u128) {
    let net = to_u128(subnet.network());
    let bcast = to_u128(subnet.broadcast());
    (net + 1, bcast.saturating_sub(1))
}

fn to_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(a) => u32::from(a) as u128,
        IpAddr::V6(a) => u128::from(a),
    }
}

fn from_u128(like: IpNet, n: u128) -> IpAddr {
    match like {
        IpNet::V4(_) => IpAddr::V4((n as u32).into()),
        IpNet::V6(_) => IpAddr::V6(n.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(cid: &str) -> Request {
        Request {
            container_id: cid.into(),
            ifname: "eth0".into(),
            ..Default::default()
        }
    }

    fn reserve(a: &Allocator, subnet: &str, r: &Request) -> Result<IpAddr, AllocError> {
        let mut l = a.lock()?;
        let (res, _) = l.reserve(subnet.parse().unwrap(), r)?;
        l.commit()?;
        Ok(res.ip)
    }

    #[test]
    fn a_reboot_releases_the_previous_boots_reservations_and_keeps_them_as_hints() {
        let dir = tempfile::tempdir().unwrap();
        let boot1 = Allocator::new(dir.path(), "twill").with_boot_id("boot-1");
        let net = "10.1.0.0/24";
        for c in ["a", "b", "c"] {
            reserve(&boot1, net, &req(c)).unwrap();
        }
        assert_eq!(boot1.list().unwrap().len(), 3);
        // The same boot: nothing released.
        let l = boot1.lock().unwrap();
        assert_eq!(l.released_for_reboot(), 0);
        drop(l);

        // After a reboot: the first lock releases all three.
        let boot2 = Allocator::new(dir.path(), "twill").with_boot_id("boot-2");
        let mut l = boot2.lock().unwrap();
        assert_eq!(l.released_for_reboot(), 3);
        assert!(l.reservations().is_empty());
        // A new container gets the next IP in turn (the hints' IPs are free, round-robin
        // comes to them last);
        let (d, _) = l.reserve(net.parse().unwrap(), &req("d")).unwrap();
        assert_eq!(d.ip.to_string(), "10.1.0.5");
        // "b" (a Podman container restarted after the reboot) gets its IP back.
        let (b, new) = l.reserve(net.parse().unwrap(), &req("b")).unwrap();
        assert!(new);
        assert_eq!(b.ip.to_string(), "10.1.0.3");
        // "a"'s DEL drops its hint; "c"'s hint is lost once its IP is taken.
        assert!(l.release("a", "eth0").is_none());
        let (e, _) = l
            .reserve(
                net.parse().unwrap(),
                &Request {
                    ip: Some("10.1.0.4".parse().unwrap()),
                    ..req("e")
                },
            )
            .unwrap();
        assert_eq!(e.ip.to_string(), "10.1.0.4");
        let (c, _) = l.reserve(net.parse().unwrap(), &req("c")).unwrap();
        assert_eq!(c.ip.to_string(), "10.1.0.6");
        l.commit().unwrap();

        // Written down: the next lock in the same boot releases nothing.
        let l = boot2.lock().unwrap();
        assert_eq!(l.released_for_reboot(), 0);
        assert_eq!(l.reservations().len(), 4);
        let text = std::fs::read_to_string(boot2.state_path()).unwrap();
        assert!(text.contains("\"bootId\": \"boot-2\""), "{text}");
        assert!(!text.contains("previousBoot"), "{text}");
    }

    /// Proves that a torn or garbage `state.json` beside a good previous copy does not block
    /// an ADD and keeps the copy's reservations, whatever the file times say (no clock is
    /// involved: the mtime is set far in the future, as after a clock that ran ahead). Before
    /// the fix the same files gave `Corrupt`.
    #[test]
    fn a_torn_state_with_a_good_copy_recovers_the_copy_and_keeps_its_reservations() {
        let dir = tempfile::tempdir().unwrap();
        let a = Allocator::new(dir.path(), "twill");
        let net = "10.1.0.0/24";
        for c in ["a", "b"] {
            reserve(&a, net, &req(c)).unwrap();
        }
        // After the second write the copy holds the first version (reservation "a" only);
        // one more write makes the copy hold both.
        reserve(&a, net, &req("c")).unwrap();
        let good_copy = std::fs::read(next_path(&a.state_path())).unwrap();
        assert!(String::from_utf8_lossy(&good_copy).contains("\"b\""));
        for garbage in [
            &b"{\"reservations\": [{\"ip\": \"10.1"[..],
            &b"\0\0\0\0\0\0\0\0"[..],
            &b""[..],
        ] {
            std::fs::write(next_path(&a.state_path()), &good_copy).unwrap();
            std::fs::write(a.state_path(), garbage).unwrap();
            let f = File::options().write(true).open(a.state_path()).unwrap();
            f.set_modified(
                std::time::SystemTime::now() + std::time::Duration::from_secs(86400 * 365),
            )
            .unwrap();
            drop(f);
            let mut l = a.lock().unwrap();
            let rec = l.recovered().expect("recovered from the copy").clone();
            assert_eq!(rec.from, next_path(&a.state_path()));
            let ids: Vec<&str> = l
                .reservations()
                .iter()
                .map(|r| r.container_id.as_str())
                .collect();
            assert_eq!(ids, ["a", "b"], "the copy's reservations are kept");
            // An ADD works and does not hand out a kept IP.
            let (r, _) = l.reserve(net.parse().unwrap(), &req("d")).unwrap();
            assert_eq!(r.ip.to_string(), "10.1.0.4");
            l.commit().unwrap();
            // The recovery wrote state.json in place and left the copy as it was.
            assert_eq!(
                std::fs::read(next_path(&a.state_path())).unwrap(),
                good_copy
            );
            let l = a.lock().unwrap();
            assert!(l.recovered().is_none());
            assert_eq!(l.reservations().len(), 3);
            drop(l);
            let mut l = a.lock().unwrap();
            l.release("d", "eth0");
            l.commit().unwrap();
        }
    }

    /// Proves that the newer of two good copies wins: a copy written and fsynced whose swap
    /// did not happen (crash between the two) holds reservations that may be in use.
    #[test]
    fn a_newer_good_copy_wins_over_an_older_state_json() {
        let dir = tempfile::tempdir().unwrap();
        let a = Allocator::new(dir.path(), "twill");
        let net = "10.1.0.0/24";
        reserve(&a, net, &req("a")).unwrap();
        reserve(&a, net, &req("b")).unwrap();
        // Swap the two files back: state.json is now the older version (generation 1).
        let (p, n) = (a.state_path(), next_path(&a.state_path()));
        let (new, old) = (std::fs::read(&p).unwrap(), std::fs::read(&n).unwrap());
        std::fs::write(&p, &old).unwrap();
        std::fs::write(&n, &new).unwrap();
        let l = a.lock().unwrap();
        assert!(l.recovered().is_some());
        assert_eq!(l.reservations().len(), 2);
        // Positive control: in the normal order nothing is recovered.
        drop(l);
        std::fs::write(&p, &new).unwrap();
        std::fs::write(&n, &old).unwrap();
        let l = a.lock().unwrap();
        assert!(l.recovered().is_none());
        assert_eq!(l.reservations().len(), 2);
    }

    #[test]
    fn a_state_without_boot_id_keeps_its_reservations() {
        // Written by a twill that did not record the boot: nothing can be said about it.
        let dir = tempfile::tempdir().unwrap();
        let a = Allocator::new(dir.path(), "twill").with_boot_id("boot-9");
        std::fs::create_dir_all(a.dir()).unwrap();
        std::fs::write(
            a.state_path(),
            r#"{"lastReserved":"10.1.0.2","reservations":[{"ip":"10.1.0.2","containerId":"x","ifname":"eth0"}]}"#,
        )
        .unwrap();
        let l = a.lock().unwrap();
        assert_eq!(l.released_for_reboot(), 0);
        assert_eq!(l.reservations().len(), 1);
        drop(l);
        assert_eq!(
            reserve(&a, "10.1.0.0/24", &req("y")).unwrap().to_string(),
            "10.1.0.3"
        );
        let text = std::fs::read_to_string(a.state_path()).unwrap();
        assert!(text.contains("boot-9"), "{text}");
        assert_eq!(a.list().unwrap().len(), 2);
    }

    #[test]
    fn hands_out_hosts_after_gateway_round_robin() {
        let dir = tempfile::tempdir().unwrap();
        let a = Allocator::new(dir.path(), "twill");
        assert_eq!(
            reserve(&a, "10.1.0.0/29", &req("a")).unwrap().to_string(),
            "10.1.0.2"
        );
        assert_eq!(
            reserve(&a, "10.1.0.0/29", &req("b")).unwrap().to_string(),
            "10.1.0.3"
        );
        // Same (container, ifname): the same IP again.
        assert_eq!(
            reserve(&a, "10.1.0.0/29", &req("a")).unwrap().to_string(),
            "10.1.0.2"
        );
        // Freed .2 is not reused at once: next is .4.
        let mut l = a.lock().unwrap();
        assert!(l.release("a", "eth0").is_some());
        l.commit().unwrap();
        assert_eq!(
            reserve(&a, "10.1.0.0/29", &req("c")).unwrap().to_string(),
            "10.1.0.4"
        );
        assert_eq!(
            reserve(&a, "10.1.0.0/29", &req("d")).unwrap().to_string(),
            "10.1.0.5"
        );
        assert_eq!(
            reserve(&a, "10.1.0.0/29", &req("e")).unwrap().to_string(),
            "10.1.0.6"
        );
        // Wraps around to the freed .2; .7 (broadcast) and .1 (gateway) never.
        assert_eq!(
            reserve(&a, "10.1.0.0/29", &req("f")).unwrap().to_string(),
            "10.1.0.2"
        );
        let e = reserve(&a, "10.1.0.0/29", &req("g")).unwrap_err();
        assert!(matches!(e, AllocError::Full { reserved: 5, .. }), "{e}");
        assert!(e.to_string().contains("10.1.0.0/29"), "{e}");
        // A fresh allocator over the same dir sees the same state.
        let ips: HashSet<_> = Allocator::new(dir.path(), "twill")
            .list()
            .unwrap()
            .into_iter()
            .map(|r| r.ip.to_string())
            .collect();
        assert_eq!(ips.len(), 5);
        assert!(!ips.contains("10.1.0.1") && !ips.contains("10.1.0.7"));
    }

    #[test]
    fn requested_ip_is_checked() {
        let dir = tempfile::tempdir().unwrap();
        let a = Allocator::new(dir.path(), "n");
        let with = |cid: &str, ip: &str| Request {
            ip: Some(ip.parse().unwrap()),
            ..req(cid)
        };
        for (ip, frag) in [
            ("10.2.0.0", "network address"),
            ("10.2.0.1", "gateway"),
            ("10.2.0.255", "broadcast"),
            ("10.3.0.9", "outside"),
        ] {
            let e = reserve(&a, "10.2.0.0/24", &with("x", ip))
                .unwrap_err()
                .to_string();
            assert!(e.contains(frag) && e.contains(ip), "{e}");
        }
        assert_eq!(
            reserve(&a, "10.2.0.0/24", &with("x", "10.2.0.77"))
                .unwrap()
                .to_string(),
            "10.2.0.77"
        );
        let e = reserve(&a, "10.2.0.0/24", &with("y", "10.2.0.77")).unwrap_err();
        assert!(
            matches!(e, AllocError::Taken { .. }) && e.to_string().contains("x"),
            "{e}"
        );
        // Round-robin continues after the requested one.
        assert_eq!(
            reserve(&a, "10.2.0.0/24", &req("z")).unwrap().to_string(),
            "10.2.0.78"
        );
    }

    /// The gateway of the subnet file is skipped wherever it is (FLANNEL_SUBNET=10.4.0.2/29
    /// puts the bridge on .2): never handed out, never reservable; .1 is an ordinary host.
    #[test]
    fn the_actual_gateway_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let a = Allocator::new(dir.path(), "n");
        let gw = |cid: &str| Request {
            gateway: Some("10.4.0.2".parse().unwrap()),
            ..req(cid)
        };
        let got: Vec<String> = ["a", "b", "c", "d", "e"]
            .iter()
            .map(|c| reserve(&a, "10.4.0.0/29", &gw(c)).unwrap().to_string())
            .collect();
        assert_eq!(
            got,
            ["10.4.0.1", "10.4.0.3", "10.4.0.4", "10.4.0.5", "10.4.0.6"]
        );
        let e = reserve(&a, "10.4.0.0/29", &gw("f")).unwrap_err();
        assert!(matches!(e, AllocError::Full { reserved: 5, .. }), "{e}");
        let e = reserve(
            &a,
            "10.4.0.0/29",
            &Request {
                ip: Some("10.4.0.2".parse().unwrap()),
                ..gw("g")
            },
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("gateway") && e.contains("10.4.0.2"), "{e}");
    }

    #[test]
    fn release_unless_and_corrupt_state() {
        let dir = tempfile::tempdir().unwrap();
        let a = Allocator::new(dir.path(), "n");
        for c in ["a", "b", "c"] {
            reserve(&a, "fd00::/120", &req(c)).unwrap();
        }
        let mut l = a.lock().unwrap();
        let gone = l.release_unless(|r| r.container_id == "b");
        l.commit().unwrap();
        assert_eq!(gone.len(), 2);
        let left = a.list().unwrap();
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].ip.to_string(), "fd00::3");
        // Corrupt only when no copy parses either.
        std::fs::write(a.state_path(), b"{not json").unwrap();
        std::fs::write(next_path(&a.state_path()), b"{nor this").unwrap();
        let e = a.lock().unwrap_err().to_string();
        assert!(e.contains("state.json") && e.contains("corrupt"), "{e}");
        assert!(e.contains(".state.json.next"), "{e}");
        std::fs::remove_file(next_path(&a.state_path())).unwrap();
        let e = a.lock().unwrap_err().to_string();
        assert!(e.contains("no copy"), "{e}");
    }

    fn dual(cid: &str, v6: Option<&str>) -> Request {
        Request {
            gateway: Some("10.5.0.1".parse().unwrap()),
            ipv6: Some(SecondFamily {
                subnet: "fc00:0:0:3::/64".parse().unwrap(),
                ip: v6.map(|s| s.parse().unwrap()),
                gateway: Some("fc00:0:0:3::1".parse().unwrap()),
            }),
            ..req(cid)
        }
    }

    /// Proves that a dual-stack request gets one IPv4 and one IPv6 address in one
    /// reservation, sequentially after the IPv6 gateway (a /64 is never enumerated: this
    /// test would not finish otherwise), and that a release frees both together.
    #[test]
    fn a_dual_stack_reservation_holds_both_families_and_releases_them_together() {
        let dir = tempfile::tempdir().unwrap();
        let a = Allocator::new(dir.path(), "n");
        let net = "10.5.0.0/24";
        let mut got = Vec::new();
        for c in ["a", "b", "c"] {
            let mut l = a.lock().unwrap();
            let (r, new) = l.reserve(net.parse().unwrap(), &dual(c, None)).unwrap();
            assert!(new);
            l.commit().unwrap();
            got.push((r.ip.to_string(), r.ipv6.unwrap().to_string()));
        }
        assert_eq!(
            got,
            [
                ("10.5.0.2".to_string(), "fc00:0:0:3::2".to_string()),
                ("10.5.0.3".into(), "fc00:0:0:3::3".into()),
                ("10.5.0.4".into(), "fc00:0:0:3::4".into()),
            ]
        );
        // The same (container, ifname) again: unchanged.
        let mut l = a.lock().unwrap();
        let (r, new) = l.reserve(net.parse().unwrap(), &dual("b", None)).unwrap();
        assert!(!new);
        assert_eq!(r.ipv6.unwrap().to_string(), "fc00:0:0:3::3");
        // Release frees both: the IPs are free again (requestable by another container).
        assert_eq!(
            l.release("b", "eth0").unwrap().ipv6.unwrap().to_string(),
            "fc00:0:0:3::3"
        );
        let (r, _) = l
            .reserve(
                net.parse().unwrap(),
                &Request {
                    ip: Some("10.5.0.3".parse().unwrap()),
                    ..dual("d", Some("fc00:0:0:3::3"))
                },
            )
            .unwrap();
        assert_eq!(r.ipv6.unwrap().to_string(), "fc00:0:0:3::3");
        l.commit().unwrap();
        let text = std::fs::read_to_string(a.state_path()).unwrap();
        assert!(text.contains("\"ipv6\": \"fc00:0:0:3::4\""), "{text}");
        assert!(text.contains("lastReservedV6"), "{text}");
    }

    /// Proves the IPv6 side refuses what it must (naming the IP and the reason), that a
    /// failed IPv6 half reserves nothing (not even the IPv4 half), and that round-robin wraps
    /// in a small IPv6 subnet skipping the network address, the gateway and the last address.
    #[test]
    fn the_ipv6_half_is_checked_wraps_and_fails_as_a_whole() {
        let dir = tempfile::tempdir().unwrap();
        let a = Allocator::new(dir.path(), "n");
        let net = "10.5.0.0/24";
        for (ip, frag) in [
            ("fc00:0:0:3::", "network"),
            ("fc00:0:0:3::1", "gateway"),
            ("fc00::3:ffff:ffff:ffff:ffff", "last address"),
            ("fc00:0:0:4::9", "outside"),
        ] {
            let mut l = a.lock().unwrap();
            let e = l
                .reserve(net.parse().unwrap(), &dual("x", Some(ip)))
                .unwrap_err()
                .to_string();
            assert!(e.contains(frag) && e.contains(ip), "{e}");
            assert!(l.reservations().is_empty(), "nothing half-reserved");
        }
        // Taken by another container: refused, naming it.
        let mut l = a.lock().unwrap();
        l.reserve(net.parse().unwrap(), &dual("x", Some("fc00:0:0:3::99")))
            .unwrap();
        let e = l
            .reserve(net.parse().unwrap(), &dual("y", Some("fc00:0:0:3::99")))
            .unwrap_err();
        assert!(matches!(e, AllocError::Taken { .. }) && e.to_string().contains("x"));
        assert_eq!(l.reservations().len(), 1);
        drop(l);

        // A /126: hosts ::1 (gateway) and ::2; ::3 is the last address.
        let dir = tempfile::tempdir().unwrap();
        let a = Allocator::new(dir.path(), "n");
        let small = |cid: &str| Request {
            ipv6: Some(SecondFamily {
                subnet: "fd00::/126".parse().unwrap(),
                ip: None,
                gateway: Some("fd00::1".parse().unwrap()),
            }),
            ..req(cid)
        };
        let mut l = a.lock().unwrap();
        let (r, _) = l.reserve(net.parse().unwrap(), &small("a")).unwrap();
        assert_eq!(r.ipv6.unwrap().to_string(), "fd00::2");
        let e = l.reserve(net.parse().unwrap(), &small("b")).unwrap_err();
        assert!(matches!(e, AllocError::Full { .. }) && e.to_string().contains("fd00::/126"));
        assert_eq!(l.reservations().len(), 1, "the IPv4 half was not kept");
        l.release("a", "eth0");
        let (r, _) = l.reserve(net.parse().unwrap(), &small("b")).unwrap();
        assert_eq!(r.ipv6.unwrap().to_string(), "fd00::2", "wrapped around");
        // The last reserved IPv6 address at the top of a /64 wraps to gateway + 1.
        let mut l2 = Allocator::new(tempfile::tempdir().unwrap().path(), "n")
            .lock()
            .unwrap();
        l2.state.last_reserved_v6 = Some("fc00::3:ffff:ffff:ffff:fffe".parse().unwrap());
        let (r, _) = l2.reserve(net.parse().unwrap(), &dual("z", None)).unwrap();
        assert_eq!(r.ipv6.unwrap().to_string(), "fc00:0:0:3::2");
    }

    /// Proves format compatibility: a state written by an IPv4-only twill (no `ipv6`, no
    /// `lastReservedV6`) loads; its pod keeps its IPv4 and gets an IPv6 address once the
    /// node is dual-stack; an IPv4-only state is written without the new keys.
    #[test]
    fn an_ipv4_only_state_loads_and_its_pod_keeps_its_ipv4_when_the_node_turns_dual_stack() {
        let dir = tempfile::tempdir().unwrap();
        let a = Allocator::new(dir.path(), "n");
        std::fs::create_dir_all(a.dir()).unwrap();
        std::fs::write(
            a.state_path(),
            r#"{"generation":3,"lastReserved":"10.5.0.7","reservations":[{"ip":"10.5.0.7","containerId":"old","ifname":"eth0"}]}"#,
        )
        .unwrap();
        assert_eq!(
            reserve(&a, "10.5.0.0/24", &req("v4")).unwrap().to_string(),
            "10.5.0.8"
        );
        let text = std::fs::read_to_string(a.state_path()).unwrap();
        assert!(!text.contains("ipv6") && !text.contains("V6"), "{text}");
        let mut l = a.lock().unwrap();
        let (r, new) = l
            .reserve("10.5.0.0/24".parse().unwrap(), &dual("old", None))
            .unwrap();
        assert!(new, "changed: an IPv6 address was added");
        assert_eq!(r.ip.to_string(), "10.5.0.7");
        assert_eq!(r.ipv6.unwrap().to_string(), "fc00:0:0:3::2");
    }

    #[test]
    fn parallel_threads_get_distinct_ips() {
        let dir = tempfile::tempdir().unwrap();
        let handles: Vec<_> = (0..16)
            .map(|i| {
                let a = Allocator::new(dir.path(), "n");
                std::thread::spawn(move || {
                    reserve(&a, "10.9.0.0/24", &req(&format!("c{i}"))).unwrap()
                })
            })
            .collect();
        let ips: HashSet<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        assert_eq!(ips.len(), 16);
    }
}
