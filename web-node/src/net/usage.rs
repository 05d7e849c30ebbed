//! Signed usage self-reports: inference a node ran itself (in a browser, or
//! natively), sent to the relay's `POST /usage/report`. Defined once here:
//! the browser and native nodes sign them, the relay checks them
//! (signature, replay, period and per-key caps — see the relay's `usage`).

use serde::{Deserialize, Serialize};

use crate::chain::BlockHash;

/// Length of a self-report period.
pub const REPORT_PERIOD_MS: u64 = 3_600_000;
/// Entries of one report.
pub const REPORT_MAX_ENTRIES: usize = 256;
/// Domain separation of usage-report signatures.
pub const REPORT_DOMAIN: &[u8] = b"aiblock/usage-report/v1";

/// One entry of a signed self-report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReportEntry {
    pub block: BlockHash,
    pub calls: u64,
    pub tokens: u64,
}

/// A node's signed report of inference it ran itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageReport {
    /// The node key (hex in JSON).
    #[serde(with = "hex32")]
    pub key: [u8; 32],
    /// `timestamp_ms / REPORT_PERIOD_MS` of the period reported.
    pub period: u64,
    /// Distinct per key and period; a repeated one is a replay.
    pub seq: u64,
    pub entries: Vec<ReportEntry>,
    /// ed25519 over [`UsageReport::signing_bytes`] (hex in JSON).
    #[serde(with = "hex64")]
    pub sig: [u8; 64],
}

impl UsageReport {
    /// `REPORT_DOMAIN ‖ postcard(key, period, seq, entries)`.
    pub fn signing_bytes(&self) -> Vec<u8> {
        let mut m = REPORT_DOMAIN.to_vec();
        let body = (&self.key, self.period, self.seq, &self.entries);
        m.extend(postcard::to_allocvec(&body).unwrap_or_default());
        m
    }

    /// A signed report.
    pub fn sign(
        key: &ed25519_dalek::SigningKey,
        period: u64,
        seq: u64,
        entries: Vec<ReportEntry>,
    ) -> Self {
        use ed25519_dalek::Signer as _;
        let mut r = Self {
            key: key.verifying_key().to_bytes(),
            period,
            seq,
            entries,
            sig: [0; 64],
        };
        r.sig = key.sign(&r.signing_bytes()).to_bytes();
        r
    }
}

/// A 32-byte key as hex in JSON (bytes in postcard).
pub mod hex32 {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            s.serialize_str(&hex::encode(v))
        } else {
            serde::Serialize::serialize(v, s)
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        if d.is_human_readable() {
            let s = String::deserialize(d)?;
            let mut out = [0u8; 32];
            hex::decode_to_slice(&s, &mut out).map_err(|e| {
                serde::de::Error::custom(format!("expected 64 hex characters: {e}"))
            })?;
            Ok(out)
        } else {
            <[u8; 32]>::deserialize(d)
        }
    }
}

/// A 64-byte signature as hex in JSON (bytes in postcard).
mod hex64 {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8; 64], s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            s.serialize_str(&hex::encode(v))
        } else {
            s.serialize_bytes(v)
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 64], D::Error> {
        let bytes: Vec<u8> = if d.is_human_readable() {
            let s = String::deserialize(d)?;
            hex::decode(&s).map_err(|e| serde::de::Error::custom(format!("not hex: {e}")))?
        } else {
            serde_bytes_vec(d)?
        };
        bytes.try_into().map_err(|b: Vec<u8>| {
            serde::de::Error::custom(format!("expected 64 bytes, got {}", b.len()))
        })
    }

    fn serde_bytes_vec<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Vec<u8>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("bytes")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
                Ok(v.to_vec())
            }
        }
        d.deserialize_bytes(V)
    }
}
