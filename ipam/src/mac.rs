//! Ethernet addresses and the one stable hash of twill.
//!
//! [`Mac`] is the MAC type of every crate: the VTEP MAC of a lease (ipam), the VXLAN device,
//! neighbour and FDB entries (dataplane's `overlay::Mac` is this type), and the veth ends of
//! a pod. [`stable_hash`] is the hash behind everything that must come out the same on every
//! node and every release: a node's home subnet, its derived VTEP MAC, a pod's host veth name.

use std::fmt;
use std::str::FromStr;

/// A string that is not a MAC address in the form `aa:bb:cc:dd:ee:ff`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("MAC address {0:?}: expected aa:bb:cc:dd:ee:ff")]
pub struct MacError(pub String);

/// An Ethernet address. Displayed and parsed as `aa:bb:cc:dd:ee:ff` (lower case out; either
/// case in), serialized as that string.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Mac(pub [u8; 6]);

impl Mac {
    /// A stable, locally administered unicast MAC derived from `seed` (e.g. the node name):
    /// the same seed always gives the same MAC, on every machine and every release.
    pub fn derive(seed: &str) -> Mac {
        let mut h = stable_hash(seed.bytes());
        // splitmix64 finaliser: FNV barely moves the high bytes for a change in the last
        // character ("node-1" vs "node-2").
        h ^= h >> 30;
        h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
        h ^= h >> 27;
        h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
        h ^= h >> 31;
        let b = h.to_be_bytes();
        Mac([b[0], b[1], b[2], b[3], b[4], b[5]]).local_unicast()
    }

    /// A random locally administered unicast MAC (what the kernel would pick for a new
    /// link, chosen by the caller so that it knows the MAC without asking the kernel).
    pub fn random() -> Mac {
        let mut m = [0u8; 6];
        // SAFETY: the buffer is valid for its length; getrandom(2) fills at most that.
        let n = unsafe { libc::getrandom(m.as_mut_ptr().cast(), m.len(), 0) };
        if n != m.len() as isize {
            // No entropy source (never seen on Linux ≥ 3.17): fall back to time and pid.
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or_default()
                ^ ((std::process::id() as u128) << 64);
            m.copy_from_slice(&t.to_le_bytes()[..6]);
        }
        Mac(m).local_unicast()
    }

    /// This MAC with the locally administered bit set and the multicast bit cleared.
    fn local_unicast(self) -> Mac {
        let mut m = self.0;
        m[0] = (m[0] & 0xfe) | 0x02;
        Mac(m)
    }

    /// The MAC in `s` if it is exactly six bytes long (a netlink attribute).
    pub fn from_slice(s: &[u8]) -> Option<Mac> {
        <[u8; 6]>::try_from(s).ok().map(Mac)
    }

    /// 00:00:00:00:00:00.
    pub fn is_zero(&self) -> bool {
        self.0 == [0; 6]
    }

    /// A multicast (or the broadcast) address: the I/G bit of the first byte is set.
    pub fn is_multicast(&self) -> bool {
        self.0[0] & 1 != 0
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

impl fmt::Debug for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for Mac {
    type Err = MacError;
    /// Strict: six colon-separated pairs of hex digits, nothing else (no `-`, no signs, no
    /// single digits, no surrounding space).
    fn from_str(s: &str) -> Result<Mac, MacError> {
        let bad = || MacError(s.to_string());
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for o in out.iter_mut() {
            let p = parts.next().ok_or_else(bad)?;
            // from_str_radix alone takes a sign: "+a" would read as 0a.
            if p.len() != 2 || !p.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(bad());
            }
            *o = u8::from_str_radix(p, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(Mac(out))
    }
}

impl serde::Serialize for Mac {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Mac {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Mac, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// FNV-1a 64 of `bytes`: tiny, and stable across machines, releases and restarts (unlike
/// std's hasher, which is seeded per process). Every value that must be the same wherever
/// and whenever it is computed comes from here; changing it moves home subnets, derived VTEP
/// MACs and host veth names.
pub fn stable_hash(bytes: impl IntoIterator<Item = u8>) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_is_strict_and_display_is_lower_case() {
        let m: Mac = "0a:1B:2c:3d:4e:5f".parse().unwrap();
        assert_eq!(m.to_string(), "0a:1b:2c:3d:4e:5f");
        assert_eq!(format!("{m:?}"), "0a:1b:2c:3d:4e:5f");
        for bad in [
            "0a:1b:2c:3d:4e",
            "0a:1b:2c:3d:4e:5f:00",
            "zz:1b:2c:3d:4e:5f",
            "+a:+b:+c:dd:ee:ff",
            "-a:0b:0c:dd:ee:ff",
            "a:b:c:d:e:f",
            "0a-1b-2c-3d-4e-5f",
            " 0a:1b:2c:3d:4e:5f",
            "0a:1b:2c:3d:4e:5f ",
            "",
        ] {
            let e = bad.parse::<Mac>().unwrap_err();
            assert!(e.to_string().contains("aa:bb:cc:dd:ee:ff"), "{bad}: {e}");
        }
    }

    #[test]
    fn serde_is_the_string_form() {
        let m = Mac([0x02, 0, 0, 0, 0, 0x0a]);
        let j = serde_json::to_string(&m).unwrap();
        assert_eq!(j, r#""02:00:00:00:00:0a""#);
        assert_eq!(serde_json::from_str::<Mac>(&j).unwrap(), m);
        assert!(serde_json::from_str::<Mac>(r#""02:00""#).is_err());
    }

    #[test]
    fn derive_is_stable_local_unicast_and_spreads() {
        let a = Mac::derive("node-1");
        assert_eq!(a, Mac::derive("node-1"));
        assert_ne!(a, Mac::derive("node-2"));
        // The values of earlier releases: peers have them in their neighbour and FDB entries.
        assert_eq!(
            Mac::derive("node-1").to_string(),
            derive_reference("node-1")
        );
        assert_eq!(Mac::derive("").to_string(), derive_reference(""));
        for i in 0..200 {
            let m = Mac::derive(&format!("node-{i}"));
            assert_eq!(m.0[0] & 0x03, 0x02, "{m}: locally administered unicast");
            assert!(!m.is_multicast() && !m.is_zero());
        }
        let spread: std::collections::HashSet<Mac> = (0..10_000)
            .map(|i| Mac::derive(&format!("node-{i}")))
            .collect();
        assert_eq!(spread.len(), 10_000);
        // The last character moves the high bytes too.
        assert_ne!(Mac::derive("node-1").0[..3], Mac::derive("node-2").0[..3]);
    }

    /// FNV-1a + splitmix64 written out independently of the code under test.
    fn derive_reference(seed: &str) -> String {
        let mut h: u64 = 14695981039346656037;
        for b in seed.bytes() {
            h = (h ^ b as u64).wrapping_mul(1099511628211);
        }
        h = (h ^ (h >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
        h = (h ^ (h >> 27)).wrapping_mul(0x94d049bb133111eb);
        h ^= h >> 31;
        let b = h.to_be_bytes();
        format!(
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            (b[0] & 0xfe) | 2,
            b[1],
            b[2],
            b[3],
            b[4],
            b[5]
        )
    }

    #[test]
    fn random_is_local_unicast_and_varies() {
        let macs: std::collections::HashSet<Mac> = (0..64).map(|_| Mac::random()).collect();
        assert!(macs.len() > 60, "{} distinct of 64", macs.len());
        for m in macs {
            assert_eq!(m.0[0] & 0x03, 0x02, "{m}");
        }
    }

    #[test]
    fn zero_multicast_and_slices() {
        assert!(Mac::default().is_zero());
        assert!(Mac([0xff; 6]).is_multicast());
        assert!(Mac([0x01, 0, 0x5e, 0, 0, 1]).is_multicast());
        assert!(!Mac([0x02, 0, 0, 0, 0, 1]).is_multicast());
        assert_eq!(
            Mac::from_slice(&[2, 0, 0, 0, 0, 1]),
            Some(Mac([2, 0, 0, 0, 0, 1]))
        );
        assert_eq!(Mac::from_slice(&[2, 0, 0, 0, 0]), None);
        assert_eq!(Mac::from_slice(&[0; 7]), None);
    }

    #[test]
    fn stable_hash_is_fnv1a_64() {
        // The published FNV-1a 64 test vectors.
        assert_eq!(stable_hash(*b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(stable_hash(*b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(stable_hash(*b"foobar"), 0x8594_4171_f739_67e8);
        assert_eq!(stable_hash("foobar".bytes()), stable_hash(*b"foobar"));
    }
}
