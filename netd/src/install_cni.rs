//! `twilld install-cni`: puts the CNI plugin binary and its conflist into the host's CNI
//! directories (the DaemonSet's init container, and ExecStartPre of twilld.service).
//!
//! Each file is written to a temp file in the destination directory, fsynced, given its
//! mode, then renamed over the destination, and the directory is fsynced: a container
//! runtime that reads `/etc/cni/net.d` or executes `/opt/cni/bin/twill` at any moment sees
//! either the old file or the new one, never a half-written one. A plugin process that is
//! running keeps the old inode (rename never hits ETXTBSY, unlike writing in place).
//! The binary goes first, so a new conflist never names a plugin that is not there yet.
//! Files that are already identical (content and mode) are left alone.

use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;
use twill_ipam::fsutil;

use crate::cli::{InstallCniArgs, UninstallCniArgs};

/// Mode of the installed plugin binary.
pub const BIN_MODE: u32 = 0o755;
/// Mode of the installed conflist.
pub const CONF_MODE: u32 = 0o644;
/// Name of the installed plugin binary: the `type` in the conflist.
pub const PLUGIN_NAME: &str = "twill";

/// What [`install_file`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The destination was missing or different and has been replaced.
    Installed,
    /// The destination already had the same content and mode.
    Unchanged,
}

/// Installs the plugin binary, then the conflist (validated first; an invalid conflist
/// installs nothing).
pub fn run(args: &InstallCniArgs) -> Result<()> {
    let conf = fs::read(&args.conf_src)
        .with_context(|| format!("read conflist --conf-src {}", args.conf_src.display()))?;
    validate_conflist(&conf)
        .with_context(|| format!("invalid conflist --conf-src {}", args.conf_src.display()))?;
    ensure!(
        !args.conf_name.is_empty()
            && !args.conf_name.contains('/')
            && !args.conf_name.starts_with('.')
            && (args.conf_name.ends_with(".conflist") || args.conf_name.ends_with(".json")),
        "--conf-name {:?}: must be a plain file name ending in .conflist or .json (libcni \
         loads only those)",
        args.conf_name
    );
    let bin = fs::read(&args.plugin_src)
        .with_context(|| format!("read plugin --plugin-src {}", args.plugin_src.display()))?;
    ensure!(
        !bin.is_empty(),
        "plugin --plugin-src {} is empty",
        args.plugin_src.display()
    );

    let bin_dest = args.bin_dir.join(PLUGIN_NAME);
    let outcome = install_file(&bin, &args.bin_dir, PLUGIN_NAME, BIN_MODE)?;
    log_outcome(outcome, &bin_dest);
    let conf_dest = args.conf_dir.join(&args.conf_name);
    let outcome = install_file(&conf, &args.conf_dir, &args.conf_name, CONF_MODE)?;
    log_outcome(outcome, &conf_dest);
    Ok(())
}

/// What [`uninstall`] did with one file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Removed {
    Removed,
    /// Nothing there (already uninstalled).
    Absent,
    /// Kept (`--keep-plugin`).
    Kept,
}

/// Undoes [`run`]: the conflist first (so that no new pod is given to twill), then the
/// plugin binary. Only twill's own files are removed: a conflist whose first plugin is not
/// `twill` (another network provider's file under the same name) is refused, and nothing
/// is removed. Missing files are fine: running it twice is harmless.
pub fn uninstall(args: &UninstallCniArgs) -> Result<(Removed, Removed)> {
    ensure!(
        !args.conf_name.is_empty()
            && !args.conf_name.contains('/')
            && !args.conf_name.starts_with('.'),
        "--conf-name {:?}: must be a plain file name",
        args.conf_name
    );
    let conf = args.conf_dir.join(&args.conf_name);
    let conf_outcome = match fs::symlink_metadata(&conf) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Removed::Absent,
        Err(e) => return Err(e).with_context(|| format!("stat {}", conf.display())),
        Ok(meta) => {
            ensure!(
                meta.file_type().is_file(),
                "{} is not a regular file: not removed",
                conf.display()
            );
            let bytes = fs::read(&conf).with_context(|| format!("read {}", conf.display()))?;
            let v: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            let first = v["plugins"][0]["type"].as_str().unwrap_or_default();
            ensure!(
                first == PLUGIN_NAME,
                "{}: plugins[0].type is {first:?}, not {PLUGIN_NAME:?}: not twill's conflist, \
                 not removed (give --conf-name of twill's file)",
                conf.display()
            );
            remove_synced(&conf, &args.conf_dir)?;
            Removed::Removed
        }
    };
    log_removed(conf_outcome, &conf);
    let bin = args.bin_dir.join(PLUGIN_NAME);
    let bin_outcome = if args.keep_plugin {
        Removed::Kept
    } else {
        match fs::symlink_metadata(&bin) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Removed::Absent,
            Err(e) => return Err(e).with_context(|| format!("stat {}", bin.display())),
            Ok(meta) => {
                ensure!(
                    !meta.file_type().is_dir(),
                    "{} is a directory: not removed",
                    bin.display()
                );
                remove_synced(&bin, &args.bin_dir)?;
                Removed::Removed
            }
        }
    };
    log_removed(bin_outcome, &bin);
    Ok((conf_outcome, bin_outcome))
}

/// Unlinks `path` (a symlink itself, never its target) and fsyncs `dir`.
fn remove_synced(path: &Path, dir: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("remove {}", path.display())),
    }
    fsutil::sync_dir(path).with_context(|| format!("fsync directory {}", dir.display()))
}

fn log_removed(outcome: Removed, path: &Path) {
    match outcome {
        Removed::Removed => tracing::info!(path = %path.display(), "removed"),
        Removed::Absent => tracing::info!(path = %path.display(), "not there"),
        Removed::Kept => tracing::info!(path = %path.display(), "kept (--keep-plugin)"),
    }
}

fn log_outcome(outcome: Outcome, dest: &Path) {
    match outcome {
        Outcome::Installed => tracing::info!(path = %dest.display(), "installed"),
        Outcome::Unchanged => tracing::info!(path = %dest.display(), "already up to date"),
    }
}

/// Checks the conflist with the twill plugin's own parser ([`twill_cni::config`]: libcni's
/// rules, supported `cniVersion`/`cniVersions`, every `twill` entry parsed as the plugin
/// will at ADD time), then what an installed twill conflist must also be: `twill` first
/// (chained plugins such as portmap come after it), with an absolute `subnetFile`.
pub fn validate_conflist(bytes: &[u8]) -> Result<()> {
    twill_cni::config::validate_conflist(bytes).context("rejected by the twill plugin's parser")?;
    // The parser accepted it, so it is an object with a non-empty list of typed plugins.
    let v: Value = serde_json::from_slice(bytes).context("not JSON")?;
    let first = &v["plugins"][0];
    let ty = first["type"].as_str().unwrap_or_default();
    if ty != PLUGIN_NAME {
        bail!("plugins[0].type: {ty:?}, expected {PLUGIN_NAME:?} (the main plugin comes first)");
    }
    if let Some(sf) = first.get("subnetFile") {
        ensure!(
            sf.as_str().is_some_and(|s| s.starts_with('/')),
            "plugins[0].subnetFile: {sf} is not an absolute path"
        );
    }
    Ok(())
}

/// Atomically makes `<dir>/<name>` hold `content` with permission bits `mode`: temp file
/// in `dir`, write, chmod, fsync, rename, fsync `dir`. Leaves the file alone if it already
/// matches. Stale temp files of an earlier, interrupted run are removed first.
pub fn install_file(content: &[u8], dir: &Path, name: &str, mode: u32) -> Result<Outcome> {
    fs::create_dir_all(dir).with_context(|| format!("create directory {}", dir.display()))?;
    remove_stale_temps(dir, name)?;
    let dest = dir.join(name);
    if is_identical(&dest, content, mode)? {
        return Ok(Outcome::Unchanged);
    }

    fsutil::replace_file(&dest, content, mode)
        .with_context(|| format!("write {} (temp file and rename)", dest.display()))?;
    Ok(Outcome::Installed)
}

fn is_identical(dest: &Path, content: &[u8], mode: u32) -> Result<bool> {
    let meta = match fs::symlink_metadata(dest) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e).with_context(|| format!("stat {}", dest.display())),
    };
    // A symlink or a directory in the way is replaced (rename fails on a directory,
    // with an error that names it).
    if !meta.file_type().is_file()
        || meta.permissions().mode() & 0o7777 != mode
        || meta.len() != content.len() as u64
    {
        return Ok(false);
    }
    let current = fs::read(dest).with_context(|| format!("read {}", dest.display()))?;
    Ok(current == content)
}

fn remove_stale_temps(dir: &Path, name: &str) -> Result<()> {
    let prefix = format!(".{name}{}", fsutil::TMP_MARKER);
    let entries = fs::read_dir(dir).with_context(|| format!("list {}", dir.display()))?;
    for entry in entries {
        let entry = entry.with_context(|| format!("list {}", dir.display()))?;
        if entry.file_name().to_string_lossy().starts_with(&prefix) {
            let path = entry.path();
            match fs::remove_file(&path) {
                Ok(()) => tracing::warn!(path = %path.display(), "removed stale temp file"),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(e).with_context(|| format!("remove stale {}", path.display()));
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"{"cniVersion":"1.0.0","cniVersions":["1.0.0","1.1.0"],"name":"twill","plugins":[
      {"type":"twill","subnetFile":"/run/twill/subnet.env","bridge":"cni0","hairpinMode":true},
      {"type":"portmap","capabilities":{"portMappings":true}}]}"#;

    #[test]
    fn accepts_the_design_conflist() {
        validate_conflist(GOOD.as_bytes()).unwrap();
    }

    #[test]
    fn rejects_broken_conflists_naming_the_field() {
        let cases = [
            ("{", "not valid JSON"),
            ("[]", "JSON object"),
            (r#"{"name":"n","plugins":[{"type":"twill"}]}"#, "cniVersion"),
            (
                r#"{"cniVersion":"9.9.9","name":"n","plugins":[{"type":"twill"}]}"#,
                "9.9.9",
            ),
            (
                r#"{"cniVersion":"1.0.0","plugins":[{"type":"twill"}]}"#,
                "key name",
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"n","type":"twill"}"#,
                "key plugins",
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"n","plugins":[]}"#,
                "plugins is empty",
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"n","plugins":[{"bridge":"x"}]}"#,
                "plugins[0]: key type",
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"n","plugins":[{"type":"portmap"},{"type":"twill"}]}"#,
                "plugins[0].type",
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"n","plugins":[{"type":"twill","subnetFile":"run/x"}]}"#,
                "subnetFile",
            ),
        ];
        for (json, want) in cases {
            let err = format!("{:#}", validate_conflist(json.as_bytes()).unwrap_err());
            assert!(err.contains(want), "{json}: error {err:?} lacks {want:?}");
        }
    }
}
