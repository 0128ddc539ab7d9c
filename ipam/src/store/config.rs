//! The network config key `<prefix>/config`: read it, write it with its compatibility
//! policy.

use super::backend::{Guard, Put, Written};
use super::{LeaseStore, StoreError};
use crate::netconf::NetConfig;

impl LeaseStore {
    /// The network config, `None` if there is none.
    pub async fn get_config(&self) -> Result<Option<NetConfig>, StoreError> {
        let key = self.config_key();
        let (item, _) = self.backend.get(&key).await?;
        let Some(item) = item else {
            return Ok(None);
        };
        let text = String::from_utf8_lossy(&item.value);
        let cfg = NetConfig::from_json(&text).map_err(|source| StoreError::BadConfig {
            key: key.clone(),
            source,
        })?;
        Ok(Some(cfg))
    }

    /// The network config, or [`StoreError::NoConfig`].
    pub async fn require_config(&self) -> Result<NetConfig, StoreError> {
        self.get_config()
            .await?
            .ok_or_else(|| StoreError::NoConfig {
                key: self.config_key(),
            })
    }

    /// Writes the network config. Without `force` it refuses ([`StoreError::Refused`]) a
    /// config under which existing leases would be invalid (stranded), and a change of
    /// backend type/VNI/port while leases exist.
    pub async fn put_config(&self, cfg: &NetConfig, force: bool) -> Result<(), StoreError> {
        let key = self.config_key();
        // The current config's revision guards the write: a concurrent writer makes us fail
        // rather than silently overwrite what we checked against.
        let current = self.backend.get(&key).await?.0;
        if !force {
            let (leases, _) = self.list().await?;
            let old = current
                .as_ref()
                .and_then(|old| NetConfig::from_json(&String::from_utf8_lossy(&old.value)).ok());
            let problems = cfg.replacement_problems(old.as_ref(), &leases);
            if !problems.is_empty() {
                let mut reasons = problems.reasons;
                reasons.push("use --force to write it anyway".into());
                return Err(StoreError::Refused {
                    reasons,
                    stranded: problems.stranded,
                });
            }
        }
        let guard = match &current {
            Some(k) => Guard::ModRevision(k.mod_revision),
            None => Guard::Absent,
        };
        let put = Put {
            key,
            value: cfg.to_json(),
            lease: 0,
        };
        match self.backend.put_if(guard, vec![put], None).await? {
            Written::Done { .. } => Ok(()),
            Written::Refused { .. } => Err(StoreError::Contention {
                what: "writing the network config (it changed concurrently)",
                attempts: 1,
            }),
        }
    }
}
