//! The `/ws` peer protocol: binary WebSocket frames, each one postcard-encoded
//! message, under the subprotocol [`SUBPROTOCOL`]. Defined once here and used
//! by the relay, the native node (`aiblock peer`) and the browser.
//!
//! ```text
//! peer                                relay
//!  │  ── WebSocket upgrade (aiblock.v1) ──►
//!  │  ◄── Challenge{nonce}
//!  │  ── Login{key, sig(LOGIN_DOMAIN‖nonce‖key)} ──►   (within LOGIN_TIMEOUT)
//!  │  ◄── Welcome{peer, limits}  (or Error{code, message} and close)
//!  │  ── Status{load, serve_compute}, Have{add, remove} ──►
//!  │  ── GetChunk{req, block, index} ──►  relay routes it to a holder:
//!  │                                       ◄── ServeChunk{req', block, index}  (to the holder)
//!  │                                       ── Chunk{req', data} ──►  relay checks the hash
//!  │  ◄── ChunkData{req, block, index, data, from}
//!  │  ◄── Compute{req, block, rows, input}   (a peer with serve_compute)
//!  │  ── ComputeResult{req, output} ──►
//! ```
//!
//! Every message type is `#[non_exhaustive]`; [`decode_to_relay`] and
//! [`decode_from_relay`] never panic on any input (property-tested) and refuse
//! a frame larger than [`limits::MAX_MESSAGE`] or with trailing bytes.
//! Request ids (`req`) are chosen by the side that sends the request and are
//! only meaningful on that one connection.

use ed25519_dalek::{Signature, Signer as _, SigningKey, Verifier as _, VerifyingKey};
use serde::{Deserialize, Serialize};

use crate::chain::{BlockHash, ChainId};
use crate::net::direct::{self, Receipt, SignalKind, Signed};

/// The WebSocket subprotocol both sides must name.
pub const SUBPROTOCOL: &str = "aiblock.v1";

/// Domain separation of the login signature: a login signature can never be
/// mistaken for a block signature or anything else the key signs.
pub const LOGIN_DOMAIN: &[u8] = b"aiblock/ws-login/v1";

/// A peer's id: its ed25519 public key.
pub type PeerId = [u8; 32];

/// The protocol's limits. The relay enforces them; peers learn the values
/// that matter to them from [`FromRelay::Welcome`].
pub mod limits {
    use std::time::Duration;

    use crate::chain::limits::MAX_CHUNK_SIZE;

    /// Largest WebSocket message either side accepts: one chunk of the
    /// largest allowed chunk size plus 64 KiB for the envelope. A larger
    /// frame closes the connection (the WebSocket layer refuses it before
    /// buffering it).
    pub const MAX_MESSAGE: usize = MAX_CHUNK_SIZE as usize + 64 * 1024;
    /// Messages queued for one connection before the relay stops routing
    /// to it; a queue that stays full means the peer does not read, and
    /// the peer is dropped (so a slow reader cannot grow relay memory).
    pub const OUTBOUND_QUEUE: usize = 32;
    /// Chunk requests one peer may have outstanding at the relay; one more
    /// is answered `ChunkFailed` with reason `credits` at once.
    pub const CHUNK_CREDITS: u32 = 16;
    /// Chunk requests the relay keeps outstanding at one serving peer;
    /// beyond that it picks another holder or its own store.
    pub const SERVE_CREDITS: u32 = 8;
    /// Compute requests the relay keeps outstanding at one compute peer.
    pub const COMPUTE_CREDITS: u32 = 4;
    /// Messages per second one peer may send (token bucket, refilled
    /// continuously) and the bucket's size; a peer that floods past it is
    /// told `rate_limited` and disconnected.
    pub const PEER_MSGS_PER_SEC: u32 = 400;
    pub const PEER_MSGS_BURST: u32 = 800;
    /// WebSocket connections from one IP address (the relay's
    /// `--max-conns-per-ip` overrides it).
    pub const CONNS_PER_IP: usize = 256;
    /// WebSocket connections in total.
    pub const MAX_CONNS: usize = 8192;
    /// Time from upgrade to a valid `Login`; then the socket is closed.
    pub const LOGIN_TIMEOUT: Duration = Duration::from_secs(10);
    /// The relay pings each peer this often (WebSocket ping; browsers answer
    /// by themselves).
    pub const PING_INTERVAL: Duration = Duration::from_secs(15);
    /// A peer silent (no frame, no pong) this long is dead and expires.
    pub const IDLE_TIMEOUT: Duration = Duration::from_secs(45);
    /// One frame's write may take this long; then the peer is dropped.
    pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
    /// Time a holder has to answer `ServeChunk` before the relay asks
    /// another holder (and scores this one down).
    pub const CHUNK_TIMEOUT: Duration = Duration::from_secs(10);
    /// Time a compute peer has to answer `Compute`.
    pub const COMPUTE_TIMEOUT: Duration = Duration::from_secs(10);
    /// Blocks one peer may announce in total, and per `Have` message.
    pub const MAX_HAVE: usize = 65_536;
    pub const MAX_HAVE_PER_MSG: usize = 4_096;
    /// Longest free-text field (agent, reasons, error messages).
    pub const MAX_TEXT: usize = 1_024;
}

/// Limits a peer needs to know, sent in [`FromRelay::Welcome`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireLimits {
    pub max_message: u32,
    pub chunk_credits: u32,
    pub msgs_per_sec: u32,
    pub msgs_burst: u32,
}

impl Default for WireLimits {
    fn default() -> Self {
        Self {
            max_message: limits::MAX_MESSAGE as u32,
            chunk_credits: limits::CHUNK_CREDITS,
            msgs_per_sec: limits::PEER_MSGS_PER_SEC,
            msgs_burst: limits::PEER_MSGS_BURST,
        }
    }
}

/// Where a chunk came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum ChunkSource {
    /// The relay's own store.
    Relay,
    /// Another peer, forwarded by the relay after its hash check.
    Peer(PeerId),
}

/// Messages a peer sends to the relay.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum ToRelay {
    /// The answer to [`FromRelay::Challenge`]: `sig` is the ed25519
    /// signature of [`login_message`] (64 bytes). `agent` names the software
    /// (`aiblock-peer/0.1`, `browser`), at most [`limits::MAX_TEXT`] bytes.
    Login {
        key: PeerId,
        sig: Vec<u8>,
        agent: String,
    },
    /// Load (permille of capacity, 0..=1000) and whether this peer runs
    /// expert computations. Also a heartbeat.
    Status { load: u16, serve_compute: bool },
    /// Blocks whose full verified payload this peer holds (`add`) or no
    /// longer holds (`remove`).
    Have {
        add: Vec<BlockHash>,
        remove: Vec<BlockHash>,
    },
    /// Ask for chunk `index` of `block`'s payload.
    GetChunk {
        req: u64,
        block: BlockHash,
        index: u32,
    },
    /// The answer to [`FromRelay::ServeChunk`].
    Chunk {
        req: u64,
        #[serde(with = "raw_bytes")]
        data: Vec<u8>,
    },
    /// This peer cannot serve [`FromRelay::ServeChunk`] `req`.
    NoChunk { req: u64, reason: String },
    /// The answer to [`FromRelay::Compute`]: `rows × hidden` floats.
    ComputeResult { req: u64, output: Vec<f32> },
    /// This peer cannot answer [`FromRelay::Compute`] `req`.
    ComputeFailed { req: u64, reason: String },
    /// Whether this peer accepts direct connections (WebRTC data channels)
    /// and may be introduced to peers that want the blocks it holds.
    Direct { accept: bool },
    /// Introduce this peer to a holder of `block` that accepts direct
    /// connections; answered with [`FromRelay::Introduced`].
    Introduce { req: u64, block: BlockHash },
    /// A signalling message for the other key of introduction `session`
    /// (body at most [`direct::limits::MAX_SIGNAL_BODY`] bytes).
    Signal {
        session: u64,
        to: PeerId,
        kind: SignalKind,
        body: String,
    },
    /// A proof that `proof.body.server` sent this peer a chunk that is not
    /// the block's (answered with [`FromRelay::Verdict`]).
    Proof { proof: direct::Proof },
    /// A receipt for bytes this peer received directly (answered with
    /// [`FromRelay::ReceiptTaken`]).
    Receipt { receipt: Signed<Receipt> },
}

/// Messages the relay sends to a peer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum FromRelay {
    /// First message on every connection: sign it with [`login_message`].
    Challenge { nonce: [u8; 32], version: u16 },
    /// Login accepted; `peer` is the key that logged in.
    Welcome { peer: PeerId, limits: WireLimits },
    /// An error. Codes are those of [`crate::net::api::codes`] plus
    /// [`codes`]; after a fatal one the relay closes the connection.
    Error { code: String, message: String },
    /// Serve chunk `index` of `block` (answer with `Chunk` or `NoChunk`).
    ServeChunk {
        req: u64,
        block: BlockHash,
        index: u32,
    },
    /// The chunk asked for with `GetChunk` `req`. The relay checked its hash
    /// against the block's chunk list; the receiver checks it again.
    ChunkData {
        req: u64,
        block: BlockHash,
        index: u32,
        #[serde(with = "raw_bytes")]
        data: Vec<u8>,
        from: ChunkSource,
    },
    /// `GetChunk` `req` failed (no such block, index out of range, credits
    /// exhausted, no source left).
    ChunkFailed {
        req: u64,
        block: BlockHash,
        index: u32,
        reason: String,
    },
    /// Run expert `block` (a chain-B expert block this peer holds) on `rows`
    /// hidden states `input` (`rows × hidden` floats, row-major); answer with
    /// `ComputeResult` or `ComputeFailed`.
    Compute {
        req: u64,
        block: BlockHash,
        rows: u32,
        input: Vec<f32>,
    },
    /// The relay accepted a new block: fetch its header (REST) and re-verify.
    BlockAdded {
        hash: BlockHash,
        chain: ChainId,
        name: String,
    },
    /// Sent right after `Welcome`: how to connect directly (the operator's
    /// STUN/TURN URLs; empty: host candidates only).
    DirectConfig { ice_servers: Vec<String> },
    /// The answer to `Introduce` `req`: a holder of `block` that accepts
    /// direct connections and the session to signal on, or `None` (use the
    /// relay), with the reason.
    Introduced {
        req: u64,
        block: BlockHash,
        session: u64,
        holder: Option<PeerId>,
        reason: String,
    },
    /// A signalling message from `from`, the other key of `session`.
    Signal {
        session: u64,
        from: PeerId,
        kind: SignalKind,
        body: String,
    },
    /// A `Signal` on `session` was refused (not introduced, expired, the
    /// other key offline, too large, too many).
    SignalFailed { session: u64, reason: String },
    /// The judgement of a `Proof`: `guilty` bans `accused`; otherwise the
    /// proof proved nothing and counted against its sender.
    Verdict {
        accused: PeerId,
        guilty: bool,
        reason: String,
    },
    /// A `Receipt` was taken: `credited` of its bytes count for `server`
    /// (0 with the reason when none do).
    ReceiptTaken {
        server: PeerId,
        block: BlockHash,
        credited: u64,
        reason: String,
    },
}

/// Chunk data as one byte string (`serialize_bytes`: a length and a memcpy)
/// rather than serde's element-by-element sequence of `u8`. postcard writes
/// both the same way (varint length, then the bytes), so the wire format is
/// unchanged; only the work per chunk is.
pub(crate) mod raw_bytes {
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Vec<u8>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("bytes")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
                Ok(v.to_vec())
            }
            fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
                Ok(v)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut a: A,
            ) -> Result<Vec<u8>, A::Error> {
                let mut out = Vec::with_capacity(a.size_hint().unwrap_or(0).min(64 * 1024));
                while let Some(b) = a.next_element::<u8>()? {
                    out.push(b);
                }
                Ok(out)
            }
        }
        d.deserialize_bytes(V)
    }
}

/// Error codes of the peer protocol (besides the REST ones).
pub mod codes {
    /// The login signature did not verify, or the first message was not `Login`.
    pub const LOGIN_FAILED: &str = "login_failed";
    /// No login within [`super::limits::LOGIN_TIMEOUT`].
    pub const LOGIN_TIMEOUT: &str = "login_timeout";
    /// Another connection logged in with the same key; this one is closed.
    pub const REPLACED: &str = "replaced";
    /// The peer is banned (served corrupt chunks); the message says until when.
    pub const BANNED: &str = "banned";
    /// The frame was not a valid message.
    pub const MALFORMED: &str = "malformed";
    /// Too many messages per second.
    pub const RATE_LIMITED: &str = "rate_limited";
    /// A protocol rule was broken (unknown request id, too many `Have`s...).
    pub const PROTOCOL: &str = "protocol";
    /// The relay is shutting down or at its connection limit.
    pub const UNAVAILABLE: &str = "unavailable";
    /// A proof of lying that proved nothing (forged, or the chunk was right).
    pub const FALSE_PROOF: &str = "false_proof";
}

/// Why a frame could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("message of {len} bytes exceeds the limit of {max}")]
    TooLarge { len: usize, max: usize },
    #[error("malformed message: {0}")]
    Malformed(String),
    #[error("{0} trailing bytes after the message")]
    Trailing(usize),
    #[error("bad login: {0}")]
    Login(String),
}

fn decode<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, WireError> {
    decode_bounded(bytes, limits::MAX_MESSAGE)
}

/// Decode one postcard message of at most `max` bytes with nothing after
/// it (the rule of every frame: `/ws` and the data channels).
pub(crate) fn decode_bounded<'a, T: Deserialize<'a>>(
    bytes: &'a [u8],
    max: usize,
) -> Result<T, WireError> {
    if bytes.len() > max {
        return Err(WireError::TooLarge {
            len: bytes.len(),
            max,
        });
    }
    let (msg, rest) =
        postcard::take_from_bytes(bytes).map_err(|e| WireError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(WireError::Trailing(rest.len()));
    }
    Ok(msg)
}

pub(crate) fn encode<T: Serialize>(msg: &T) -> Vec<u8> {
    // Serialising these plain enums into a Vec cannot fail.
    postcard::to_allocvec(msg).unwrap_or_default()
}

impl ToRelay {
    pub fn encode(&self) -> Vec<u8> {
        encode(self)
    }
}

impl FromRelay {
    pub fn encode(&self) -> Vec<u8> {
        encode(self)
    }

    pub fn error(code: &str, message: impl Into<String>) -> Self {
        let mut message = message.into();
        truncate_text(&mut message);
        Self::Error {
            code: code.to_string(),
            message,
        }
    }
}

/// Decode a frame a peer sent.
pub fn decode_to_relay(bytes: &[u8]) -> Result<ToRelay, WireError> {
    decode(bytes)
}

/// Decode a frame the relay sent.
pub fn decode_from_relay(bytes: &[u8]) -> Result<FromRelay, WireError> {
    decode(bytes)
}

/// Cut a free-text field to [`limits::MAX_TEXT`] bytes (on a char boundary).
pub fn truncate_text(s: &mut String) {
    if s.len() > limits::MAX_TEXT {
        let mut end = limits::MAX_TEXT;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
}

/// The bytes a login signs: domain, nonce, key.
pub fn login_message(nonce: &[u8; 32], key: &PeerId) -> Vec<u8> {
    let mut m = Vec::with_capacity(LOGIN_DOMAIN.len() + 64);
    m.extend_from_slice(LOGIN_DOMAIN);
    m.extend_from_slice(nonce);
    m.extend_from_slice(key);
    m
}

/// The `Login` answering a challenge.
pub fn login(key: &SigningKey, nonce: &[u8; 32], agent: &str) -> ToRelay {
    let pk = key.verifying_key().to_bytes();
    let sig = key.sign(&login_message(nonce, &pk));
    let mut agent = agent.to_string();
    truncate_text(&mut agent);
    ToRelay::Login {
        key: pk,
        sig: sig.to_bytes().to_vec(),
        agent,
    }
}

/// Check a `Login` against the nonce this connection was sent.
pub fn verify_login(nonce: &[u8; 32], key: &PeerId, sig: &[u8]) -> Result<(), WireError> {
    let vk = VerifyingKey::from_bytes(key)
        .map_err(|_| WireError::Login("the key is not a valid ed25519 public key".into()))?;
    let sig: [u8; 64] = sig
        .try_into()
        .map_err(|_| WireError::Login(format!("signature is {} bytes, not 64", sig.len())))?;
    vk.verify(&login_message(nonce, key), &Signature::from_bytes(&sig))
        .map_err(|_| WireError::Login("the signature does not verify".into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key(b: u8) -> SigningKey {
        SigningKey::from_bytes(&[b; 32])
    }

    #[test]
    fn messages_round_trip() {
        let h = BlockHash([7; 32]);
        let to = [
            login(&key(1), &[3; 32], "test"),
            ToRelay::Status {
                load: 250,
                serve_compute: true,
            },
            ToRelay::Have {
                add: vec![h],
                remove: vec![],
            },
            ToRelay::GetChunk {
                req: 9,
                block: h,
                index: 2,
            },
            ToRelay::Chunk {
                req: 1,
                data: vec![1, 2, 3],
            },
            ToRelay::ComputeResult {
                req: 4,
                output: vec![1.5, -2.0],
            },
            ToRelay::Direct { accept: true },
            ToRelay::Introduce { req: 3, block: h },
            ToRelay::Signal {
                session: 8,
                to: [4; 32],
                kind: SignalKind::Candidate,
                body: "candidate:1 1 udp 1 127.0.0.1 5000 typ host".into(),
            },
            ToRelay::Proof {
                proof: direct::ChunkStatement::sign(&key(2), [5; 32], h, 1, b"x", 9),
            },
            ToRelay::Receipt {
                receipt: Receipt {
                    server: [1; 32],
                    receiver: key(2).verifying_key().to_bytes(),
                    block: h,
                    bytes: 10,
                    from_ms: 1,
                    to_ms: 2,
                }
                .sign(&key(2)),
            },
        ];
        for m in to {
            assert_eq!(decode_to_relay(&m.encode()), Ok(m));
        }
        let from = [
            FromRelay::Challenge {
                nonce: [9; 32],
                version: 1,
            },
            FromRelay::ChunkData {
                req: 1,
                block: h,
                index: 0,
                data: vec![0; 100],
                from: ChunkSource::Peer([2; 32]),
            },
            FromRelay::Compute {
                req: 2,
                block: h,
                rows: 1,
                input: vec![0.25; 4],
            },
            FromRelay::error(codes::BANNED, "x".repeat(5000)),
            FromRelay::DirectConfig {
                ice_servers: vec!["stun:a.example:3478".into()],
            },
            FromRelay::Introduced {
                req: 3,
                block: h,
                session: 8,
                holder: Some([6; 32]),
                reason: String::new(),
            },
            FromRelay::Signal {
                session: 8,
                from: [6; 32],
                kind: SignalKind::Answer,
                body: "v=0".into(),
            },
        ];
        for m in from {
            let back = decode_from_relay(&m.encode()).expect("decodes");
            if let FromRelay::Error { message, .. } = &back {
                assert_eq!(message.len(), limits::MAX_TEXT);
            } else {
                assert_eq!(back, m);
            }
        }
    }

    #[test]
    fn chunk_data_is_encoded_as_a_plain_byte_sequence() {
        // The same bytes serde's default Vec<u8> encoding gives (so the
        // byte-string fast path changed no wire format).
        #[derive(Serialize)]
        enum Plain {
            #[allow(dead_code)]
            Login,
            #[allow(dead_code)]
            Status,
            #[allow(dead_code)]
            Have,
            #[allow(dead_code)]
            GetChunk,
            Chunk {
                req: u64,
                data: Vec<u8>,
            },
        }
        let data: Vec<u8> = (0..=255).collect();
        let ours = ToRelay::Chunk {
            req: 300,
            data: data.clone(),
        }
        .encode();
        let plain = postcard::to_allocvec(&Plain::Chunk { req: 300, data }).expect("encodes");
        assert_eq!(ours, plain);
    }

    #[test]
    fn login_verifies_only_for_its_nonce_and_key() {
        let k = key(5);
        let nonce = [1; 32];
        let ToRelay::Login { key: pk, sig, .. } = login(&k, &nonce, "t") else {
            panic!("login message");
        };
        assert_eq!(verify_login(&nonce, &pk, &sig), Ok(()));
        assert!(verify_login(&[2; 32], &pk, &sig).is_err(), "other nonce");
        let other = key(6).verifying_key().to_bytes();
        assert!(verify_login(&nonce, &other, &sig).is_err(), "other key");
        assert!(verify_login(&nonce, &pk, &sig[..63]).is_err(), "short sig");
        assert!(verify_login(&nonce, &[0xff; 32], &sig).is_err(), "bad key");
        // A block-signing key's signature over the same bytes without the
        // domain does not pass.
        let mut raw = nonce.to_vec();
        raw.extend_from_slice(&pk);
        let s = k.sign(&raw).to_bytes();
        assert!(verify_login(&nonce, &pk, &s).is_err());
    }

    #[test]
    fn oversized_and_trailing_frames_are_refused() {
        let big = vec![0u8; limits::MAX_MESSAGE + 1];
        assert!(matches!(
            decode_to_relay(&big),
            Err(WireError::TooLarge { .. })
        ));
        let mut b = ToRelay::Status {
            load: 1,
            serve_compute: false,
        }
        .encode();
        b.push(0);
        assert_eq!(decode_to_relay(&b), Err(WireError::Trailing(1)));
        assert!(decode_from_relay(&[]).is_err());
        assert!(decode_from_relay(&[200]).is_err());
    }

    proptest! {
        #[test]
        fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let _ = decode_to_relay(&bytes);
            let _ = decode_from_relay(&bytes);
        }

        #[test]
        fn truncated_frames_are_errors(cut in 0usize..40) {
            let m = ToRelay::GetChunk { req: u64::MAX, block: BlockHash([1; 32]), index: 7 }.encode();
            if cut < m.len() {
                prop_assert!(decode_to_relay(&m[..cut]).is_err());
            }
        }
    }
}
