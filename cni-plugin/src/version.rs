//! VERSION: the versions twill speaks, in the version asked for (the newest if none).

use serde_json::{Value, json};

use crate::config::{self, LATEST, SUPPORTED_VERSIONS};

pub fn version(stdin: &[u8]) -> Value {
    let asked = config::parse_object(stdin)
        .ok()
        .and_then(|o| config::cni_version(&o).ok())
        .unwrap_or_else(|| LATEST.to_string());
    json!({"cniVersion": asked, "supportedVersions": SUPPORTED_VERSIONS})
}
