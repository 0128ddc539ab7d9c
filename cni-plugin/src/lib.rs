//! twill's CNI plugin: ADD, DEL, CHECK, GC, STATUS and VERSION (CNI 0.3.1 – 1.1.0), one
//! module per verb. The binary (`twill`) calls [`main`].
//!
//! The plugin runs in the namespace it is exec'd in (the node's), reads the node subnet from
//! the subnet file, reserves the pod IP on disk (`twill_ipam::alloc`) and talks netlink to
//! the node namespace and, through a socket opened inside it, to the pod namespace.

pub mod add;
pub mod check;
pub mod config;
pub mod del;
pub mod env;
pub mod error;
pub mod fuzz_checks;
pub mod gc;
pub mod status;
pub mod types;
pub mod version;

use std::io::Read;
use std::path::Path;

use serde_json::Value;
use twill_ipam::subnet_file::{SubnetFile, SubnetFileError};

use crate::config::NetConf;
use crate::env::{CniEnv, Command};
use crate::error::{CniError, Result, code};

/// The host end of a pod's veth: `veth` + 8 hex digits of a hash of (container ID, ifname),
/// so DEL and GC find it without state. The stable hash, folded to 32 bits.
pub fn host_veth_name(container_id: &str, ifname: &str) -> String {
    let h = twill_ipam::mac::stable_hash(
        container_id
            .bytes()
            .chain(std::iter::once(0))
            .chain(ifname.bytes()),
    );
    format!("veth{:08x}", (h >> 32) as u32 ^ h as u32)
}

/// Reads the subnet file named by the config. Missing: code 11 (try again: twilld has not
/// written it yet); unreadable: code 5; garbage, or not a regular file (a FIFO, a device:
/// refused without blocking), or larger than 64 KiB: code 7.
pub fn read_subnet_file(path: &Path) -> Result<SubnetFile> {
    SubnetFile::read(path).map_err(|e| {
        let c = match &e {
            SubnetFileError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
                code::TRY_AGAIN
            }
            SubnetFileError::Io { .. } => code::IO,
            _ => code::INVALID_CONFIG,
        };
        CniError::new(c, format!("config key subnetFile: {e}"))
            .with_details("the subnet file is written by twilld once the node has its subnet")
    })
}

/// Takes the allocator's lock; says in the log when that released the reservations of a
/// previous boot (once per boot and network).
pub(crate) fn lock_allocator(
    alloc: &twill_ipam::alloc::Allocator,
) -> std::result::Result<twill_ipam::alloc::Locked, twill_ipam::alloc::AllocError> {
    let locked = alloc.lock()?;
    if let Some(r) = locked.recovered() {
        tracing::warn!(
            dir = %alloc.dir().display(),
            from = %r.from.display(),
            reason = %r.reason,
            "the state file was not the newest good version (torn by a power cut?): recovered it from its copy"
        );
    }
    let n = locked.released_for_reboot();
    if n > 0 {
        tracing::warn!(
            released = n,
            dir = %alloc.dir().display(),
            "the node rebooted since the last reservation: released the previous boot's reservations"
        );
    }
    Ok(locked)
}

/// A current-thread tokio runtime with I/O enabled (netlink).
pub(crate) fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .map_err(|e| CniError::new(code::IO, format!("start tokio runtime: {e}")))
}

/// Runs `f` on a [`runtime`].
pub(crate) fn block_on<F: std::future::Future>(f: F) -> Result<F::Output> {
    Ok(runtime()?.block_on(f))
}

/// Fails with code 1 when `conf`'s version is older than `min`, the version that brought
/// `verb` into the spec.
pub(crate) fn require_version(conf: &NetConf, verb: &str, min: &str) -> Result<()> {
    if config::version_at_least(&conf.cni_version, min) {
        Ok(())
    } else {
        Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!(
                "cniVersion={:?} does not know {verb} (needs {min} or later)",
                conf.cni_version
            ),
        ))
    }
}

/// One invocation's outcome: what goes to stdout, and the exit code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub stdout: String,
    pub exit_code: i32,
}

/// Runs one invocation: `get` reads environment variables, `stdin` is the config.
pub fn run(get: impl Fn(&str) -> Option<String>, stdin: &[u8]) -> Outcome {
    // The version errors are reported in: the request's, if it is one twill speaks.
    let req_version = || {
        config::parse_object(stdin)
            .ok()
            .and_then(|o| config::cni_version(&o).ok())
            .unwrap_or_else(|| config::LATEST.to_string())
    };
    match dispatch(&get, stdin) {
        Ok(None) => Outcome {
            stdout: String::new(),
            exit_code: 0,
        },
        Ok(Some(v)) => Outcome {
            stdout: v.to_string(),
            exit_code: 0,
        },
        Err(e) => {
            tracing::error!(code = e.code, details = %e.details, "{}", e.msg);
            Outcome {
                stdout: e.to_json(&req_version()).to_string(),
                exit_code: 1,
            }
        }
    }
}

fn dispatch(get: &impl Fn(&str) -> Option<String>, stdin: &[u8]) -> Result<Option<Value>> {
    let cmd = get("CNI_COMMAND")
        .filter(|c| !c.is_empty())
        .ok_or_else(|| CniError::new(code::INVALID_ENV, "CNI_COMMAND is required"))?;
    let cmd = Command::parse(&cmd)?;
    if cmd == Command::Version {
        return Ok(Some(version::version(stdin)));
    }
    let conf = config::parse_conf(stdin)?;
    init_logging(&conf)?;
    let env = CniEnv::from_fn(get)?;
    tracing::debug!(?cmd, container = ?env.container_id, ifname = ?env.ifname, "invoked");
    match cmd {
        Command::Add => add::add(&conf, &env).map(Some),
        Command::Del => del::del(&conf, &env).map(|()| None),
        Command::Check => check::check(&conf, &env).map(|()| None),
        Command::Gc => gc::gc(&conf).map(|()| None),
        Command::Status => status::status(&conf).map(|()| None),
        Command::Version => unreachable!("handled above"),
    }
}

/// Opens `logFile` for appending: created with mode 0600 if missing; a symlink (O_NOFOLLOW)
/// or anything but a regular file (checked on the open descriptor: `/proc/self/mem`, a
/// FIFO, a device; the open itself does not block) is refused, code 7 naming the key and
/// the path.
pub fn open_log_file(p: &Path) -> Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let bad = |why: String| {
        CniError::new(
            code::INVALID_CONFIG,
            format!("config key logFile={:?}: {why}", p.display()),
        )
    };
    let f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(p)
        .map_err(|e| {
            if e.raw_os_error() == Some(libc::ELOOP) {
                bad("is a symlink (not followed)".into())
            } else if e.raw_os_error() == Some(libc::ENXIO) {
                bad("not a regular file (a FIFO or socket without a reader)".into())
            } else {
                bad(format!("open: {e}"))
            }
        })?;
    let meta = f.metadata().map_err(|e| bad(format!("fstat: {e}")))?;
    if !meta.file_type().is_file() {
        return Err(bad("not a regular file".into()));
    }
    // procfs and sysfs report their files as regular (/proc/self/mem, /sys/...): writing
    // log lines there is never meant. Refused by the file system the descriptor is on.
    let fs = nix::sys::statfs::fstatfs(&f).map_err(|e| bad(format!("fstatfs: {e}")))?;
    let t = fs.filesystem_type();
    use nix::sys::statfs as sf;
    if [
        sf::PROC_SUPER_MAGIC,
        sf::SYSFS_MAGIC,
        sf::DEBUGFS_MAGIC,
        sf::TRACEFS_MAGIC,
        sf::SECURITYFS_MAGIC,
        sf::CGROUP_SUPER_MAGIC,
        sf::CGROUP2_SUPER_MAGIC,
        sf::BPF_FS_MAGIC,
    ]
    .contains(&t)
    {
        return Err(bad(format!(
            "on a kernel file system (magic {:#x}), not a log file",
            t.0
        )));
    }
    Ok(f)
}

/// Logs go to stderr, or to `logFile` (appended) when the config names one; never stdout.
/// Level: `logLevel` (error, warn, info, debug, trace), default warn. A `logFile` that
/// [`open_log_file`] refuses fails the invocation.
fn init_logging(conf: &NetConf) -> Result<()> {
    let level = conf
        .log_level
        .as_deref()
        .and_then(|l| l.parse::<tracing::Level>().ok())
        .unwrap_or(tracing::Level::WARN);
    let builder = tracing_subscriber::fmt()
        .with_max_level(level)
        .with_ansi(false)
        .with_target(false);
    let file = conf.log_file.as_deref().map(open_log_file).transpose()?;
    let _ = match file {
        Some(f) => builder.with_writer(std::sync::Mutex::new(f)).try_init(),
        None => builder.with_writer(std::io::stderr).try_init(),
    };
    Ok(())
}

/// The binary's entry point: reads stdin and the environment, prints the result or the
/// error on stdout, returns the exit code.
pub fn main() -> i32 {
    let mut stdin = Vec::new();
    let read = std::io::stdin().read_to_end(&mut stdin);
    let out = match read {
        Ok(_) => run(|k| std::env::var(k).ok(), &stdin),
        Err(e) => Outcome {
            stdout: CniError::new(code::IO, format!("read network config from stdin: {e}"))
                .to_json(config::LATEST)
                .to_string(),
            exit_code: 1,
        },
    };
    if !out.stdout.is_empty() {
        println!("{}", out.stdout);
    }
    out.exit_code
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The attachment the verbs' unit tests work on: container c1, eth0, host veth vethabc.
    pub(crate) fn pod() -> twill_dataplane::pod::Pod {
        twill_dataplane::pod::Pod {
            container_id: "c1".into(),
            ifname: "eth0".into(),
            netns: None,
            host_veth: "vethabc".into(),
        }
    }

    #[test]
    fn host_veth_name_is_stable_and_short() {
        let a = host_veth_name("abc", "eth0");
        assert_eq!(a, host_veth_name("abc", "eth0"));
        assert_ne!(a, host_veth_name("abc", "eth1"));
        assert_ne!(a, host_veth_name("abd", "eth0"));
        assert_eq!(a.len(), 12);
        assert!(a.starts_with("veth"));
    }

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| {
            vars.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn errors_are_json_on_stdout_in_the_requested_version() {
        let o = run(env(&[]), b"{}");
        assert_eq!(o.exit_code, 1);
        let v: Value = serde_json::from_str(&o.stdout).unwrap();
        assert_eq!(v["code"], 4);
        assert_eq!(v["cniVersion"], config::LATEST);
        let o = run(
            env(&[("CNI_COMMAND", "ADD")]),
            br#"{"cniVersion":"0.4.0","name":"n","type":"twill"}"#,
        );
        let v: Value = serde_json::from_str(&o.stdout).unwrap();
        assert_eq!(v["cniVersion"], "0.4.0");
        assert_eq!(v["code"], 4);
        assert!(v["msg"].as_str().unwrap().contains("CNI_CONTAINERID"));
        let o = run(
            env(&[("CNI_COMMAND", "GC")]),
            br#"{"cniVersion":"1.0.0","name":"n","type":"twill"}"#,
        );
        let v: Value = serde_json::from_str(&o.stdout).unwrap();
        assert_eq!(v["code"], 1);
    }

    #[test]
    fn version_lists_exactly_the_supported_versions() {
        let o = run(
            env(&[("CNI_COMMAND", "VERSION")]),
            br#"{"cniVersion":"0.4.0"}"#,
        );
        assert_eq!(o.exit_code, 0);
        let v: Value = serde_json::from_str(&o.stdout).unwrap();
        assert_eq!(v["cniVersion"], "0.4.0");
        assert_eq!(
            v["supportedVersions"],
            serde_json::json!(["0.3.1", "0.4.0", "1.0.0", "1.1.0"])
        );
        let o = run(env(&[("CNI_COMMAND", "VERSION")]), b"");
        let v: Value = serde_json::from_str(&o.stdout).unwrap();
        assert_eq!(v["cniVersion"], "1.1.0");
    }
}
