//! `twilld install-cni`: atomic (a concurrent reader only ever sees a whole old or a whole
//! new file, no temp file is left), idempotent (an identical file is not rewritten),
//! correct modes (0755 binary, 0644 conflist, whatever the source's mode and the umask).
//! Temp directories only; no root needed.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use twill_netd::cli::InstallCniArgs;
use twill_netd::install_cni::{self, BIN_MODE, CONF_MODE, Outcome};

const CONFLIST: &str = r#"{"cniVersion":"1.0.0","cniVersions":["1.0.0","1.1.0"],"name":"twill","plugins":[
  {"type":"twill","subnetFile":"/run/twill/subnet.env","bridge":"cni0","hairpinMode":true},
  {"type":"portmap","capabilities":{"portMappings":true}}]}"#;

/// A fake plugin: a shell script, so that the installed copy can be executed.
const PLUGIN: &str = "#!/bin/sh\necho twill-plugin-v1\n";

struct Setup {
    _dir: tempfile::TempDir,
    args: InstallCniArgs,
}

impl Setup {
    fn new() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let src = root.join("src");
        fs::create_dir(&src).unwrap();
        let plugin_src = src.join("twill");
        let conf_src = src.join("cni-conf.json");
        fs::write(&plugin_src, PLUGIN).unwrap();
        fs::write(&conf_src, CONFLIST).unwrap();
        // Sources with "wrong" modes: the installed files must not inherit them.
        fs::set_permissions(&plugin_src, fs::Permissions::from_mode(0o700)).unwrap();
        fs::set_permissions(&conf_src, fs::Permissions::from_mode(0o600)).unwrap();
        let args = InstallCniArgs {
            plugin_src,
            bin_dir: root.join("host/opt/cni/bin"),
            conf_src,
            conf_dir: root.join("host/etc/cni/net.d"),
            conf_name: "10-twill.conflist".into(),
        };
        Setup { _dir: dir, args }
    }
    fn bin(&self) -> PathBuf {
        self.args.bin_dir.join("twill")
    }
    fn conf(&self) -> PathBuf {
        self.args.conf_dir.join(&self.args.conf_name)
    }
}

fn mode(p: &Path) -> u32 {
    fs::metadata(p).unwrap().permissions().mode() & 0o7777
}

fn dir_names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn installs_with_exact_modes_and_creates_the_directories() {
    let s = Setup::new();
    install_cni::run(&s.args).unwrap();
    assert_eq!(fs::read_to_string(s.bin()).unwrap(), PLUGIN);
    assert_eq!(fs::read_to_string(s.conf()).unwrap(), CONFLIST);
    assert_eq!(mode(&s.bin()), BIN_MODE);
    assert_eq!(mode(&s.conf()), CONF_MODE);
    assert_eq!((BIN_MODE, CONF_MODE), (0o755, 0o644));
    // Only the installed files, no temp file.
    assert_eq!(dir_names(&s.args.bin_dir), ["twill"]);
    assert_eq!(dir_names(&s.args.conf_dir), ["10-twill.conflist"]);
    // The installed plugin runs.
    let out = std::process::Command::new(s.bin()).output().unwrap();
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout), "twill-plugin-v1\n");
}

#[test]
fn modes_ignore_the_umask() {
    let s = Setup::new();
    // A restrictive umask would turn 0755 into 0700 if the mode came from open(2) alone.
    // SAFETY: umask is process-wide; this test only reads what it wrote itself.
    let old = unsafe { libc::umask(0o077) };
    let r = install_cni::run(&s.args);
    unsafe { libc::umask(old) };
    r.unwrap();
    assert_eq!(mode(&s.bin()), 0o755);
    assert_eq!(mode(&s.conf()), 0o644);
}

#[test]
fn second_run_leaves_identical_files_alone() {
    let s = Setup::new();
    install_cni::run(&s.args).unwrap();
    let before = [
        fs::metadata(s.bin()).unwrap(),
        fs::metadata(s.conf()).unwrap(),
    ];
    install_cni::run(&s.args).unwrap();
    let after = [
        fs::metadata(s.bin()).unwrap(),
        fs::metadata(s.conf()).unwrap(),
    ];
    for (b, a) in before.iter().zip(&after) {
        assert_eq!(b.ino(), a.ino(), "rewritten although identical");
        assert_eq!(b.mtime_nsec(), a.mtime_nsec());
    }
    assert_eq!(
        install_cni::install_file(
            CONFLIST.as_bytes(),
            &s.args.conf_dir,
            &s.args.conf_name,
            CONF_MODE
        )
        .unwrap(),
        Outcome::Unchanged
    );
}

#[test]
fn changed_content_or_mode_is_replaced_by_rename() {
    let s = Setup::new();
    install_cni::run(&s.args).unwrap();
    let ino = fs::metadata(s.bin()).unwrap().ino();
    // A new plugin version: a new inode (rename), so a running plugin keeps the old one.
    let v2 = PLUGIN.replace("v1", "v2");
    fs::write(&s.args.plugin_src, &v2).unwrap();
    install_cni::run(&s.args).unwrap();
    assert_eq!(fs::read_to_string(s.bin()).unwrap(), v2);
    assert_ne!(fs::metadata(s.bin()).unwrap().ino(), ino);
    // Someone chmod'ed the conflist: the mode is repaired.
    fs::set_permissions(s.conf(), fs::Permissions::from_mode(0o600)).unwrap();
    assert_eq!(
        install_cni::install_file(
            CONFLIST.as_bytes(),
            &s.args.conf_dir,
            &s.args.conf_name,
            CONF_MODE
        )
        .unwrap(),
        Outcome::Installed
    );
    assert_eq!(mode(&s.conf()), 0o644);
}

#[test]
fn a_symlink_in_the_way_is_replaced_not_followed() {
    let s = Setup::new();
    fs::create_dir_all(&s.args.bin_dir).unwrap();
    let elsewhere = s.args.bin_dir.parent().unwrap().join("elsewhere");
    fs::write(&elsewhere, "precious").unwrap();
    symlink(&elsewhere, s.bin()).unwrap();
    install_cni::run(&s.args).unwrap();
    assert!(fs::symlink_metadata(s.bin()).unwrap().file_type().is_file());
    assert_eq!(fs::read_to_string(&elsewhere).unwrap(), "precious");
}

#[test]
fn an_invalid_conflist_installs_nothing() {
    let s = Setup::new();
    install_cni::run(&s.args).unwrap();
    let good_bin = fs::read(s.bin()).unwrap();
    fs::write(&s.args.plugin_src, "#!/bin/sh\necho new\n").unwrap();
    fs::write(
        &s.args.conf_src,
        r#"{"cniVersion":"1.0.0","name":"twill","plugins":[{"type":"portmap"}]}"#,
    )
    .unwrap();
    let err = format!("{:#}", install_cni::run(&s.args).unwrap_err());
    assert!(err.contains("plugins[0].type"), "{err}");
    assert!(
        err.contains(&s.args.conf_src.display().to_string()),
        "{err}"
    );
    // Neither the binary nor the conflist was touched.
    assert_eq!(fs::read(s.bin()).unwrap(), good_bin);
    assert_eq!(fs::read_to_string(s.conf()).unwrap(), CONFLIST);
    assert_eq!(dir_names(&s.args.conf_dir), ["10-twill.conflist"]);
}

#[test]
fn missing_sources_and_bad_names_fail_with_the_flag_named() {
    let s = Setup::new();
    let mut a = s.args.clone();
    a.plugin_src = a.plugin_src.with_file_name("nope");
    let err = format!("{:#}", install_cni::run(&a).unwrap_err());
    assert!(
        err.contains("--plugin-src") && err.contains("nope"),
        "{err}"
    );
    let mut a = s.args.clone();
    a.conf_src = a.conf_src.with_file_name("nope.json");
    let err = format!("{:#}", install_cni::run(&a).unwrap_err());
    assert!(
        err.contains("--conf-src") && err.contains("nope.json"),
        "{err}"
    );
    for bad in [
        "10-twill.conf.tmp",
        "../10-twill.conflist",
        ".10-twill.conflist",
        "",
    ] {
        let mut a = s.args.clone();
        a.conf_name = bad.into();
        let err = format!("{:#}", install_cni::run(&a).unwrap_err());
        assert!(err.contains("--conf-name"), "{bad:?}: {err}");
    }
    assert!(
        !s.args.bin_dir.exists(),
        "nothing installed after a failed validation"
    );
}

#[test]
fn stale_temp_files_of_an_interrupted_run_are_removed() {
    let s = Setup::new();
    fs::create_dir_all(&s.args.conf_dir).unwrap();
    let stale = s.args.conf_dir.join(".10-twill.conflist.twill-tmp.99999");
    fs::write(&stale, "{\"half").unwrap();
    // Other files in the directory are not ours: kept.
    let other = s.args.conf_dir.join("05-other.conflist");
    fs::write(&other, "{}").unwrap();
    install_cni::run(&s.args).unwrap();
    assert!(!stale.exists());
    assert!(other.exists());
    assert_eq!(
        dir_names(&s.args.conf_dir),
        ["05-other.conflist", "10-twill.conflist"]
    );
}

/// A reader that opens the destination in a tight loop while it is replaced over and over
/// by two large, different versions: every read is exactly one of the versions. Writing in
/// place (truncate + write) fails this within a few iterations.
#[test]
fn concurrent_reader_never_sees_a_partial_file() {
    let dir = tempfile::tempdir().unwrap();
    let dest_dir = dir.path().join("bin");
    let name = "twill";
    // 4 MiB each, far bigger than one write(2) or a page, with different first bytes and
    // different lengths.
    let a: Arc<Vec<u8>> = Arc::new(vec![b'a'; 4 << 20]);
    let b: Arc<Vec<u8>> = Arc::new(vec![b'b'; (4 << 20) + 4096]);
    install_cni::install_file(&a, &dest_dir, name, BIN_MODE).unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (a, b, stop) = (a.clone(), b.clone(), stop.clone());
        let path = dest_dir.join(name);
        std::thread::spawn(move || {
            let (mut reads, mut bad) = (0u64, 0u64);
            while !stop.load(Ordering::Relaxed) {
                let got = fs::read(&path).expect("the destination always exists");
                reads += 1;
                if got != *a && got != *b {
                    bad += 1;
                }
            }
            (reads, bad)
        })
    };
    let mut installs = 0;
    for i in 0..40 {
        let v = if i % 2 == 0 { &b } else { &a };
        assert_eq!(
            install_cni::install_file(v, &dest_dir, name, BIN_MODE).unwrap(),
            Outcome::Installed
        );
        installs += 1;
    }
    stop.store(true, Ordering::Relaxed);
    let (reads, bad) = reader.join().unwrap();
    assert_eq!(bad, 0, "{bad} of {reads} reads saw a partial file");
    assert!(reads > 0 && installs == 40);
    assert_eq!(dir_names(&dest_dir), ["twill"], "temp files left behind");
}

/// The real binary, if twilld's `install-cni` subcommand is built: same result through the
/// env variables that the DaemonSet's init container sets.
#[test]
fn twilld_install_cni_subcommand_through_env() {
    let Some(twilld) = twilld_bin() else {
        panic!("twilld binary not found: build it (cargo build --bins) or set TWILL_BIN_DIR");
    };
    let s = Setup::new();
    let out = std::process::Command::new(&twilld)
        .arg("install-cni")
        .env("TWILLD_CNI_PLUGIN_SRC", &s.args.plugin_src)
        .env("TWILLD_CNI_CONF_SRC", &s.args.conf_src)
        .env("TWILLD_CNI_BIN_DIR", &s.args.bin_dir)
        .env("TWILLD_CNI_CONF_DIR", &s.args.conf_dir)
        .env("TWILLD_CNI_CONF_NAME", &s.args.conf_name)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{} install-cni: {}\n{}",
        twilld.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.stdout.is_empty(),
        "stdout is for machine output: {:?}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(fs::read_to_string(s.bin()).unwrap(), PLUGIN);
    assert_eq!(mode(&s.bin()), 0o755);
    assert_eq!(fs::read_to_string(s.conf()).unwrap(), CONFLIST);
    assert_eq!(mode(&s.conf()), 0o644);
}

/// `$TWILL_BIN_DIR/twilld`, else `target/debug/twilld` next to this test executable.
fn twilld_bin() -> Option<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(d) = std::env::var_os("TWILL_BIN_DIR") {
        dirs.push(PathBuf::from(d));
    }
    if let Ok(exe) = std::env::current_exe() {
        // target/debug/deps/<test> -> target/debug
        if let Some(d) = exe.parent().and_then(Path::parent) {
            dirs.push(d.to_path_buf());
        }
    }
    dirs.into_iter()
        .map(|d| d.join("twilld"))
        .find(|p| p.is_file())
}

fn uninstall_args(s: &Setup) -> twill_netd::cli::UninstallCniArgs {
    twill_netd::cli::UninstallCniArgs {
        bin_dir: s.args.bin_dir.clone(),
        conf_dir: s.args.conf_dir.clone(),
        conf_name: s.args.conf_name.clone(),
        keep_plugin: false,
    }
}

/// `uninstall-cni` removes exactly what `install-cni` put there (the conflist and the
/// binary), leaves the other files of both directories alone, and a second run is a no-op.
#[test]
fn uninstall_removes_twills_files_and_only_those() {
    use install_cni::Removed;
    let s = Setup::new();
    install_cni::run(&s.args).unwrap();
    let other_conf = s.args.conf_dir.join("20-other.conflist");
    let other_bin = s.args.bin_dir.join("portmap");
    fs::write(&other_conf, "{}").unwrap();
    fs::write(&other_bin, "x").unwrap();
    let u = uninstall_args(&s);
    assert_eq!(
        install_cni::uninstall(&u).unwrap(),
        (Removed::Removed, Removed::Removed)
    );
    assert!(!s.conf().exists() && !s.bin().exists());
    assert_eq!(dir_names(&s.args.conf_dir), ["20-other.conflist"]);
    assert_eq!(dir_names(&s.args.bin_dir), ["portmap"]);
    assert_eq!(
        install_cni::uninstall(&u).unwrap(),
        (Removed::Absent, Removed::Absent)
    );
}

/// A conflist under twill's name that is not twill's (its first plugin is another
/// provider's) is refused with the file and the type named, and nothing is removed, not
/// even the plugin binary. `--keep-plugin` keeps the binary for pods still on the node.
#[test]
fn uninstall_refuses_a_conflist_that_is_not_twills_and_can_keep_the_plugin() {
    use install_cni::Removed;
    let s = Setup::new();
    install_cni::run(&s.args).unwrap();
    let foreign = r#"{"cniVersion":"1.0.0","name":"cbr0","plugins":[{"type":"flannel"}]}"#;
    fs::write(s.conf(), foreign).unwrap();
    let err = format!(
        "{:#}",
        install_cni::uninstall(&uninstall_args(&s)).unwrap_err()
    );
    assert!(
        err.contains("\"flannel\"") && err.contains("10-twill.conflist"),
        "{err}"
    );
    assert_eq!(fs::read_to_string(s.conf()).unwrap(), foreign);
    assert!(s.bin().exists());

    install_cni::run(&s.args).unwrap();
    let mut u = uninstall_args(&s);
    u.keep_plugin = true;
    assert_eq!(
        install_cni::uninstall(&u).unwrap(),
        (Removed::Removed, Removed::Kept)
    );
    assert!(!s.conf().exists());
    assert_eq!(fs::read_to_string(s.bin()).unwrap(), PLUGIN);
}

/// The real binary: `twilld uninstall-cni` through the same env variables as install-cni.
#[test]
fn twilld_uninstall_cni_subcommand_through_env() {
    let Some(twilld) = twilld_bin() else {
        panic!("twilld binary not found: build it (cargo build --bins) or set TWILL_BIN_DIR");
    };
    let s = Setup::new();
    install_cni::run(&s.args).unwrap();
    let out = std::process::Command::new(&twilld)
        .arg("uninstall-cni")
        .env("TWILLD_CNI_BIN_DIR", &s.args.bin_dir)
        .env("TWILLD_CNI_CONF_DIR", &s.args.conf_dir)
        .env("TWILLD_CNI_CONF_NAME", &s.args.conf_name)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "uninstall-cni: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!s.conf().exists() && !s.bin().exists());
}
