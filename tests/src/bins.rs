//! Paths to the built binaries, and a helper that execs a CNI plugin the way a runtime does.
//!
//! Binaries are found in `TWILL_BIN_DIR` (scripts/test.sh sets it), else in the cargo
//! target dir next to the test executable (`target/debug/deps/<test>` → `target/debug`).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result};

/// The directory of the built binaries.
pub fn bin_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("TWILL_BIN_DIR") {
        return PathBuf::from(d);
    }
    let exe = std::env::current_exe().expect("test executable path");
    let mut dir = exe.parent().expect("exe dir").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir
}

/// The path of binary `name` (e.g. "twill"); panics with a hint if it is not built.
pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.is_file(),
        "{} not found: build the binaries first (cargo build --bins) or set TWILL_BIN_DIR",
        p.display()
    );
    p
}

/// The outcome of one plugin invocation.
#[derive(Debug, Clone)]
pub struct CniOutput {
    pub exit_code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl CniOutput {
    pub fn ok(&self) -> bool {
        self.exit_code == 0
    }

    /// stdout as JSON (the result, or the error object).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| {
            panic!(
                "plugin stdout is not JSON ({e}): {:?}; stderr: {}",
                self.stdout, self.stderr
            )
        })
    }

    /// The error code, if it failed with a CNI error object.
    pub fn error_code(&self) -> Option<u64> {
        serde_json::from_str::<serde_json::Value>(&self.stdout)
            .ok()?
            .get("code")?
            .as_u64()
    }

    /// Panics with the error object and stderr unless it succeeded.
    pub fn expect_ok(self, what: &str) -> Self {
        assert!(
            self.ok(),
            "{what}: exit {}: {} (stderr: {})",
            self.exit_code,
            self.stdout,
            self.stderr
        );
        self
    }
}

/// Execs the CNI plugin `plugin` the way a runtime does: config on stdin, `env` as the
/// CNI_* variables (nothing else of the test's CNI_* environment leaks in), inside the
/// namespace at `node_netns` (through `nsenter --net=`), or in the caller's if `None`.
pub fn exec_plugin(
    plugin: &Path,
    node_netns: Option<&Path>,
    env: &[(&str, &str)],
    stdin: &str,
) -> Result<CniOutput> {
    let mut cmd = match node_netns {
        Some(ns) => {
            let mut c = Command::new("nsenter");
            c.arg(format!("--net={}", ns.display()))
                .arg("--")
                .arg(plugin);
            c
        }
        None => Command::new(plugin),
    };
    for (k, _) in std::env::vars() {
        if k.starts_with("CNI_") {
            cmd.env_remove(k);
        }
    }
    cmd.envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .with_context(|| format!("spawn {}", plugin.display()))?;
    let written = child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(stdin.as_bytes());
    // A plugin may exit before reading stdin (e.g. a usage error): not the test's problem.
    if let Err(e) = written
        && e.kind() != std::io::ErrorKind::BrokenPipe
    {
        return Err(e).context("write config to the plugin's stdin");
    }
    let out = child.wait_with_output().context("wait for the plugin")?;
    Ok(CniOutput {
        exit_code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).trim().to_string(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}
