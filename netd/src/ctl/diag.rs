//! `twillctl diag`: one tar.gz with what a bug report about this node needs: twillctl's own
//! views (status, leases, network), twilld's /readyz and /metrics, the data plane as the
//! kernel reports it (links, addresses, routes, neighbours, FDB, the nftables table,
//! forwarding sysctls), the IPAM state, the subnet file, the CNI configs, versions, and the
//! last lines of a log when given one.
//!
//! Every part is collected on its own, with a time bound: a part that fails is recorded as
//! `<part>.error` and the bundle is still written. Nothing secret goes in: the etcd
//! certificate and key files are never read, and any PEM block that shows up in a collected
//! text (a conflist or log that embeds one) is replaced by a marker.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::Args;

use super::{Cli, EXIT_ERROR, Failure, NodePaths};

/// One collected part: bounded, so one hung command cannot hang the bundle.
const PART_TIMEOUT: Duration = Duration::from_secs(10);
/// No single file or command output beyond this goes in (a runaway log, a huge state).
const PART_MAX_BYTES: usize = 16 << 20;

#[derive(Debug, Clone, Args)]
pub struct DiagArgs {
    /// Where to write the bundle (default: twill-diag-<host>-<unix time>.tar.gz in the
    /// current directory).
    #[arg(long, short = 'f')]
    pub file: Option<PathBuf>,
    #[command(flatten)]
    pub node: NodePaths,
    /// The CNI plugin binary (its VERSION answer goes in).
    #[arg(
        long,
        env = "TWILLCTL_CNI_PLUGIN",
        default_value = "/opt/cni/bin/twill"
    )]
    pub cni_plugin: PathBuf,
    /// A log file of twilld (e.g. a journal export or the container log): its last lines.
    #[arg(long)]
    pub log: Option<PathBuf>,
    /// How many lines of --log.
    #[arg(long, default_value_t = 2000)]
    pub log_lines: usize,
}

/// The bundle being built: (path inside the archive, content).
struct Bundle {
    parts: Vec<(String, Vec<u8>)>,
}

impl Bundle {
    fn add(&mut self, name: &str, data: Vec<u8>) {
        self.parts.push((name.to_string(), redact(data)));
    }

    fn add_result(&mut self, name: &str, r: Result<Vec<u8>, String>) {
        match r {
            Ok(d) => self.add(name, d),
            Err(e) => self.add(&format!("{name}.error"), format!("{e}\n").into_bytes()),
        }
    }

    /// Runs a command with a bound; its stdout is the part, a failure its `.error`.
    fn command(&mut self, name: &str, program: &Path, args: &[&str], envs: &[(&str, String)]) {
        let r = run_bounded(program, args, envs);
        self.add_result(name, r);
    }

    fn file(&mut self, name: &str, path: &Path) {
        let r = read_regular(path).map_err(|e| format!("{}: {e}", path.display()));
        self.add_result(name, r);
    }
}

pub async fn run(cli: &Cli, args: &DiagArgs) -> Result<(), Failure> {
    let args = args.clone();
    let etcd = cli.etcd.clone();
    // Everything below blocks (commands, files, a local HTTP GET): off the runtime.
    tokio::task::spawn_blocking(move || collect_and_write(&etcd, &args))
        .await
        .map_err(|e| Failure::new(EXIT_ERROR, format!("diag task: {e}")))?
}

fn collect_and_write(etcd: &super::CtlEtcdArgs, args: &DiagArgs) -> Result<(), Failure> {
    let host = hostname::get()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_else(|_| "node".into());
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let out = args.file.clone().unwrap_or_else(|| {
        PathBuf::from(format!(
            "twill-diag-{}-{now}.tar.gz",
            host.replace(|c: char| !c.is_ascii_alphanumeric() && c != '-', "_")
        ))
    });
    let mut b = Bundle { parts: Vec::new() };
    let started = Instant::now();

    // twillctl's own views, by running this binary again with the same connection: each
    // part then has exactly what an operator would see, and a failing one is just an error.
    let me = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("twillctl"));
    let mut conn = vec![
        ("TWILLCTL_ETCD_ENDPOINTS", etcd.etcd_endpoints.join(",")),
        ("TWILLCTL_ETCD_PREFIX", etcd.etcd_prefix.clone()),
        (
            "TWILLCTL_ETCD_TIMEOUT",
            humantime::format_duration(etcd.etcd_timeout).to_string(),
        ),
    ];
    for (k, v) in [
        ("TWILLCTL_ETCD_CAFILE", &etcd.etcd_cafile),
        ("TWILLCTL_ETCD_CERTFILE", &etcd.etcd_certfile),
        ("TWILLCTL_ETCD_KEYFILE", &etcd.etcd_keyfile),
    ] {
        if let Some(p) = v {
            conn.push((k, p.display().to_string()));
        }
    }
    b.command(
        "twillctl/status.json",
        &me,
        &["status", "-o", "json"],
        &conn,
    );
    b.command(
        "twillctl/leases.json",
        &me,
        &["leases", "list", "-o", "json"],
        &conn,
    );
    b.command(
        "twillctl/network.json",
        &me,
        &["network", "show", "-o", "json"],
        &conn,
    );

    // twilld's own word.
    for (name, path) in [
        ("twilld/healthz.txt", "/healthz"),
        ("twilld/readyz.txt", "/readyz"),
        ("twilld/metrics.txt", "/metrics"),
    ] {
        let r = http_get(args.node.metrics_addr, path);
        b.add_result(name, r);
    }

    // The data plane as the kernel has it.
    let ip = Path::new("ip");
    b.command("kernel/links.txt", ip, &["-d", "link", "show"], &[]);
    b.command("kernel/addresses.txt", ip, &["address", "show"], &[]);
    b.command(
        "kernel/routes.txt",
        ip,
        &["-d", "route", "show", "table", "all"],
        &[],
    );
    b.command("kernel/rules.txt", ip, &["rule", "show"], &[]);
    b.command("kernel/neighbours.txt", ip, &["neigh", "show"], &[]);
    b.command("kernel/fdb.txt", Path::new("bridge"), &["fdb", "show"], &[]);
    b.command(
        "kernel/nft-twill.txt",
        Path::new("nft"),
        &["-a", "list", "table", "ip", "twill"],
        &[],
    );
    b.add("kernel/sysctls.txt", sysctls().into_bytes());
    b.file(
        "kernel/nf_conntrack_count",
        Path::new("/proc/sys/net/netfilter/nf_conntrack_count"),
    );
    b.file(
        "kernel/nf_conntrack_max",
        Path::new("/proc/sys/net/netfilter/nf_conntrack_max"),
    );

    // What the CNI plugin reads and keeps.
    b.file("cni/subnet.env", &args.node.subnet_file);
    match std::fs::read_dir(&args.node.cni_data_dir) {
        Ok(dirs) => {
            for d in dirs.flatten() {
                let name = d.file_name().to_string_lossy().into_owned();
                for f in ["state.json", "state.json.next"] {
                    let p = d.path().join(f);
                    if p.exists() {
                        b.file(&format!("cni/data/{name}/{f}"), &p);
                    }
                }
            }
        }
        Err(e) => b.add(
            "cni/data.error",
            format!("{}: {e}\n", args.node.cni_data_dir.display()).into_bytes(),
        ),
    }
    match std::fs::read_dir(&args.node.cni_conf_dir) {
        Ok(files) => {
            for f in files.flatten() {
                let name = f.file_name().to_string_lossy().into_owned();
                b.file(&format!("cni/net.d/{name}"), &f.path());
            }
        }
        Err(e) => b.add(
            "cni/net.d.error",
            format!("{}: {e}\n", args.node.cni_conf_dir.display()).into_bytes(),
        ),
    }

    // Versions.
    b.add(
        "versions/twillctl.txt",
        format!("{}\n", env!("CARGO_PKG_VERSION")).into_bytes(),
    );
    b.command(
        "versions/cni-plugin.json",
        &args.cni_plugin,
        &[],
        &[("CNI_COMMAND", "VERSION".into())],
    );
    b.file(
        "versions/kernel.txt",
        Path::new("/proc/sys/kernel/osrelease"),
    );
    b.file("versions/os-release.txt", Path::new("/etc/os-release"));

    if let Some(log) = &args.log {
        let r = read_regular(log)
            .map(|d| tail_lines(&d, args.log_lines))
            .map_err(|e| format!("{}: {e}", log.display()));
        b.add_result("twilld/log.txt", r);
    }

    let errors: Vec<String> = b
        .parts
        .iter()
        .filter(|(n, _)| n.ends_with(".error"))
        .map(|(n, _)| n.clone())
        .collect();
    let summary = format!(
        "twill diagnostics bundle\nhost: {host}\ntime: {now} (unix)\ntwillctl: {}\nparts: {}\nfailed parts: {}\ncollected in: {} ms\n",
        env!("CARGO_PKG_VERSION"),
        b.parts.len(),
        if errors.is_empty() {
            "none".to_string()
        } else {
            errors.join(", ")
        },
        started.elapsed().as_millis()
    );
    b.parts
        .insert(0, ("README.txt".into(), summary.into_bytes()));

    write_tar_gz(&out, &b.parts)
        .map_err(|e| Failure::new(EXIT_ERROR, format!("write {}: {e}", out.display())))?;
    eprintln!(
        "twillctl: wrote {} ({} parts, {} failed)",
        out.display(),
        b.parts.len(),
        errors.len()
    );
    println!("{}", out.display());
    Ok(())
}

/// The archive: one top directory, files 0600 (it describes the node's network).
fn write_tar_gz(out: &Path, parts: &[(String, Vec<u8>)]) -> std::io::Result<()> {
    let top = out
        .file_name()
        .and_then(|n| n.to_str())
        .map(|n| {
            n.trim_end_matches(".tar.gz")
                .trim_end_matches(".tgz")
                .to_string()
        })
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| "twill-diag".into());
    let mtime = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    twill_ipam::fsutil::replace_file_with(out, 0o600, |file| {
        let gz = flate2::write::GzEncoder::new(file, flate2::Compression::default());
        let mut tar = tar::Builder::new(gz);
        for (name, data) in parts {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o600);
            h.set_mtime(mtime);
            h.set_entry_type(tar::EntryType::Regular);
            tar.append_data(&mut h, format!("{top}/{name}"), data.as_slice())?;
        }
        tar.into_inner()?.finish()?;
        Ok(())
    })
}

/// Runs `program args` with `envs` added, stdout captured up to [`PART_MAX_BYTES`], killed
/// after [`PART_TIMEOUT`]. A non-zero exit is an error carrying stderr.
fn run_bounded(program: &Path, args: &[&str], envs: &[(&str, String)]) -> Result<Vec<u8>, String> {
    let what = format!("{} {}", program.display(), args.join(" "));
    let mut child = Command::new(program)
        .args(args)
        .envs(envs.iter().map(|(k, v)| (*k, v.as_str())))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{what}: {e}"))?;
    let mut stdout = child.stdout.take().expect("piped");
    let mut stderr = child.stderr.take().expect("piped");
    let out_reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = (&mut stdout)
            .take(PART_MAX_BYTES as u64)
            .read_to_end(&mut buf);
        buf
    });
    let err_reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = (&mut stderr).take(64 << 10).read_to_end(&mut buf);
        buf
    });
    let deadline = Instant::now() + PART_TIMEOUT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("{what}: no answer within {PART_TIMEOUT:?}, killed"));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => return Err(format!("{what}: {e}")),
        }
    };
    let out = out_reader.join().unwrap_or_default();
    let err = err_reader.join().unwrap_or_default();
    if status.success() {
        Ok(out)
    } else {
        Err(format!(
            "{what}: {status}\n{}{}",
            String::from_utf8_lossy(&err),
            String::from_utf8_lossy(&out)
        ))
    }
}

/// Reads a regular file (never a FIFO or device: those could block or be endless), bounded.
fn read_regular(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    let meta = f.metadata()?;
    if !meta.file_type().is_file() {
        return Err(std::io::Error::other("not a regular file: not read"));
    }
    let mut buf = Vec::new();
    f.take(PART_MAX_BYTES as u64).read_to_end(&mut buf)?;
    Ok(buf)
}

/// A plain HTTP/1.0 GET to twilld's local server: the status line and the body.
pub(crate) fn http_get(addr: SocketAddr, path: &str) -> Result<Vec<u8>, String> {
    let what = format!("GET http://{addr}{path}");
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .map_err(|e| format!("{what}: {e}"))?;
    s.set_read_timeout(Some(PART_TIMEOUT))
        .and_then(|_| s.set_write_timeout(Some(PART_TIMEOUT)))
        .and_then(|_| write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n"))
        .map_err(|e| format!("{what}: {e}"))?;
    let mut resp = Vec::new();
    s.take(PART_MAX_BYTES as u64)
        .read_to_end(&mut resp)
        .map_err(|e| format!("{what}: {e}"))?;
    let text = String::from_utf8_lossy(&resp);
    let status = text.lines().next().unwrap_or_default().to_string();
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b)
        .unwrap_or_default();
    Ok(format!("{status}\n\n{body}").into_bytes())
}

/// The forwarding and filtering sysctls that decide whether pod traffic flows.
fn sysctls() -> String {
    let mut out = String::new();
    let mut keys = vec![
        "net/ipv4/ip_forward".to_string(),
        "net/ipv4/conf/all/rp_filter".to_string(),
        "net/ipv4/conf/default/rp_filter".to_string(),
        "net/bridge/bridge-nf-call-iptables".to_string(),
        "net/ipv6/conf/all/forwarding".to_string(),
    ];
    if let Ok(devs) = std::fs::read_dir("/proc/sys/net/ipv4/conf") {
        let mut names: Vec<String> = devs
            .flatten()
            .map(|d| d.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("twill") || n == "cni0" || n.starts_with("veth"))
            .collect();
        names.sort();
        for n in names {
            keys.push(format!("net/ipv4/conf/{n}/rp_filter"));
            keys.push(format!("net/ipv4/conf/{n}/forwarding"));
        }
    }
    for k in keys {
        let v = std::fs::read_to_string(Path::new("/proc/sys").join(&k))
            .map(|v| v.trim().to_string())
            .unwrap_or_else(|e| format!("({e})"));
        out.push_str(&format!("{} = {v}\n", k.replace('/', ".")));
    }
    out
}

fn tail_lines(data: &[u8], n: usize) -> Vec<u8> {
    let text = String::from_utf8_lossy(data);
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.len().saturating_sub(n);
    let mut out = lines[start..].join("\n");
    out.push('\n');
    out.into_bytes()
}

/// Replaces every PEM block (certificates, and above all private keys) by a marker.
fn redact(data: Vec<u8>) -> Vec<u8> {
    let text = String::from_utf8_lossy(&data);
    if !text.contains("-----BEGIN ") {
        return data;
    }
    let mut out = String::with_capacity(text.len());
    let mut rest: &str = &text;
    while let Some(start) = rest.find("-----BEGIN ") {
        out.push_str(&rest[..start]);
        let after = &rest[start..];
        match after.find("-----END ") {
            Some(end) => {
                let tail = &after[end + "-----END ".len()..];
                let close = tail.find("-----").map(|i| i + 5).unwrap_or(tail.len());
                out.push_str("[PEM block removed by twillctl diag]");
                rest = &tail[close..];
            }
            None => {
                out.push_str("[PEM block removed by twillctl diag]");
                rest = "";
            }
        }
    }
    out.push_str(rest);
    out.into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pem_blocks_are_removed_and_the_rest_kept() {
        let key = "a\n-----BEGIN PRIVATE KEY-----\nMIIEv...\n-----END PRIVATE KEY-----\nb\n\
                   -----BEGIN CERTIFICATE-----\nxyz\n-----END CERTIFICATE-----\nc";
        let out = String::from_utf8(redact(key.as_bytes().to_vec())).unwrap();
        assert!(!out.contains("MIIEv") && !out.contains("xyz"), "{out}");
        assert!(out.starts_with("a\n") && out.contains("\nb\n") && out.ends_with("\nc"));
        let torn = "x -----BEGIN RSA PRIVATE KEY-----\nsecret";
        let out = String::from_utf8(redact(torn.as_bytes().to_vec())).unwrap();
        assert!(!out.contains("secret"), "{out}");
        assert_eq!(redact(b"plain".to_vec()), b"plain");
    }

    #[test]
    fn tail_keeps_the_last_lines() {
        assert_eq!(tail_lines(b"1\n2\n3\n", 2), b"2\n3\n");
        assert_eq!(tail_lines(b"1\n2", 5), b"1\n2\n");
    }
}
