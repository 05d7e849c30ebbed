//! Direct transfer between peers (browser to browser over WebRTC data
//! channels): what the two ends sign so that a lie can be proven to a third
//! party and so that serving earns from the receiver's word.
//!
//! * A peer serving a chunk directly sends it with a [`ChunkStatement`]
//!   signed by its key: domain, block, chunk index, the SHA-256 of the bytes
//!   it sends, the receiver's key and the time. The receiver hashes what it
//!   got, checks the signature over *that* hash, then checks the hash against
//!   the block's chunk list (as for every chunk). A valid signature over a
//!   hash that is not the chunk list's is a [`Proof`] of lying that anyone
//!   holding the block's header can check, the relay included, without
//!   trusting the receiver.
//! * After a transfer the receiver signs a [`Receipt`]: server, block, bytes
//!   and the time window. The relay credits the server from receipts (within
//!   caps), not from bytes it never saw.
//! * Signalling (SDP offer and answer, ICE candidates) passes through the
//!   relay between two introduced keys only; [`SignalKind`] and the bounds
//!   here are what the relay enforces.
//!
//! Everything here is plain data and pure functions: the relay, the browser
//! and the native node share it, and its tests run natively.

use ed25519_dalek::{Signature, Signer as _, SigningKey, Verifier as _, VerifyingKey};
use serde::{Deserialize, Serialize};

use crate::chain::BlockHash;
use crate::net::peer::PeerId;

/// Domain of a direct chunk's signature.
pub const CHUNK_DOMAIN: &[u8] = b"aiblock/direct-chunk/v1";
/// Domain of a receipt's signature.
pub const RECEIPT_DOMAIN: &[u8] = b"aiblock/direct-receipt/v1";

/// Bounds of direct transfer and of its signalling.
pub mod limits {
    use std::time::Duration;

    /// Largest data-channel message either side sends or accepts (browsers
    /// interoperate up to 256 KiB); a chunk larger than a message is split.
    pub const MAX_CHANNEL_MESSAGE: usize = 256 * 1024 - 1024;
    /// Largest signalling body (an SDP offer or answer, an ICE candidate).
    pub const MAX_SIGNAL_BODY: usize = 16 * 1024;
    /// Signalling messages one session may carry in total (offer, answer
    /// and candidates of both sides).
    pub const MAX_SIGNALS_PER_SESSION: u32 = 64;
    /// Introductions one peer may have open at once.
    pub const MAX_SESSIONS_PER_PEER: usize = 16;
    /// An introduction not used for this long expires (its signals are
    /// refused afterwards).
    pub const SESSION_TTL: Duration = Duration::from_secs(60);
    /// ICE server URLs the relay hands out at most, and the longest one.
    pub const MAX_ICE_SERVERS: usize = 8;
    pub const MAX_ICE_URL: usize = 256;
    /// A receiver whose data channel has not opened within this long falls
    /// back to relay forwarding.
    pub const OPEN_DEADLINE: Duration = Duration::from_secs(5);
    /// A direct peer that stops answering for this long is abandoned; the
    /// chunks it owed are asked of the relay.
    pub const ANSWER_DEADLINE: Duration = Duration::from_secs(5);
    /// Statements and receipts older than this (or this far in the future)
    /// are refused.
    pub const MAX_CLOCK_SKEW_MS: u64 = 10 * 60 * 1000;
}

/// What a signalling message carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum SignalKind {
    /// An SDP offer (from the peer that asked for the introduction).
    Offer,
    /// The SDP answer (from the holder).
    Answer,
    /// One ICE candidate (either side), as the browser's JSON.
    Candidate,
    /// The session is over (either side): no more signals.
    Bye,
}

/// What a server signs for each chunk it sends directly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkStatement {
    /// The signer: the peer that sends the chunk.
    pub server: PeerId,
    pub receiver: PeerId,
    pub block: BlockHash,
    pub index: u32,
    /// SHA-256 of the bytes sent.
    pub chunk_hash: BlockHash,
    /// Milliseconds since the Unix epoch at the server.
    pub time_ms: u64,
}

/// What a receiver signs after a transfer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipt {
    pub server: PeerId,
    /// The signer.
    pub receiver: PeerId,
    pub block: BlockHash,
    /// Verified bytes received from `server` for `block`.
    pub bytes: u64,
    /// The transfer's time window, milliseconds since the Unix epoch.
    pub from_ms: u64,
    pub to_ms: u64,
}

/// A signed statement (its signature is 64 bytes).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signed<T> {
    pub body: T,
    pub sig: Vec<u8>,
}

/// A signed [`ChunkStatement`] whose hash is not the block's: what a
/// receiver sends the relay to have a liar banned.
pub type Proof = Signed<ChunkStatement>;

/// Why a signed statement, a proof or a receipt was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DirectError {
    #[error("the signer's key is not a valid ed25519 public key")]
    BadKey,
    #[error("signature is {0} bytes, not 64")]
    SigLength(usize),
    #[error("the signature does not verify")]
    BadSignature,
    #[error("chunk {index} is out of range: the block has {chunks} chunks")]
    IndexOutOfRange { index: u32, chunks: usize },
    #[error("the signed hash is the chunk list's: the chunk was correct")]
    NotALie,
    #[error("the server and the receiver are the same key")]
    SelfDealing,
    #[error("{0}")]
    Invalid(String),
}

fn message<T: Serialize>(domain: &[u8], body: &T) -> Vec<u8> {
    let mut m = domain.to_vec();
    // Plain structs of fixed-size fields: serialising cannot fail.
    m.extend_from_slice(&postcard::to_allocvec(body).unwrap_or_default());
    m
}

fn verify(key: &PeerId, msg: &[u8], sig: &[u8]) -> Result<(), DirectError> {
    let vk = VerifyingKey::from_bytes(key).map_err(|_| DirectError::BadKey)?;
    let sig: [u8; 64] = sig
        .try_into()
        .map_err(|_| DirectError::SigLength(sig.len()))?;
    vk.verify(msg, &Signature::from_bytes(&sig))
        .map_err(|_| DirectError::BadSignature)
}

impl ChunkStatement {
    /// The statement for `data`, signed by `key` (the server).
    pub fn sign(
        key: &SigningKey,
        receiver: PeerId,
        block: BlockHash,
        index: u32,
        data: &[u8],
        time_ms: u64,
    ) -> Signed<ChunkStatement> {
        let body = ChunkStatement {
            server: key.verifying_key().to_bytes(),
            receiver,
            block,
            index,
            chunk_hash: BlockHash::of(data),
            time_ms,
        };
        let sig = key.sign(&message(CHUNK_DOMAIN, &body)).to_bytes().to_vec();
        Signed { body, sig }
    }
}

impl Signed<ChunkStatement> {
    /// Is this the server's signature over this statement?
    pub fn verify(&self) -> Result<(), DirectError> {
        verify(
            &self.body.server,
            &message(CHUNK_DOMAIN, &self.body),
            &self.sig,
        )
    }

    /// Check what a receiver got: the statement must be signed by the server
    /// it came from, name this receiver, block and index, and hash `data`.
    /// `Ok` does not say the chunk is right: compare
    /// [`ChunkStatement::chunk_hash`] with the chunk list next (and keep
    /// this statement as a [`Proof`] when they differ).
    pub fn check_received(
        &self,
        server: &PeerId,
        receiver: &PeerId,
        block: &BlockHash,
        index: u32,
        data: &[u8],
    ) -> Result<(), DirectError> {
        let b = &self.body;
        if &b.server != server || &b.receiver != receiver || &b.block != block || b.index != index {
            return Err(DirectError::Invalid(
                "the statement names another server, receiver, block or chunk".into(),
            ));
        }
        if b.chunk_hash != BlockHash::of(data) {
            return Err(DirectError::Invalid(
                "the statement's hash is not the hash of the bytes sent".into(),
            ));
        }
        self.verify()
    }

    /// Judge a proof of lying against the block's chunk list: `Ok` means
    /// the signer ([`ChunkStatement::server`]) provably sent a chunk that is
    /// not the block's; any error means the proof proves nothing (and a
    /// relay counts it against whoever sent it).
    pub fn judge(&self, chunks: &[BlockHash]) -> Result<(), DirectError> {
        let b = &self.body;
        if b.server == b.receiver {
            return Err(DirectError::SelfDealing);
        }
        let Some(expected) = chunks.get(b.index as usize) else {
            return Err(DirectError::IndexOutOfRange {
                index: b.index,
                chunks: chunks.len(),
            });
        };
        self.verify()?;
        if *expected == b.chunk_hash {
            return Err(DirectError::NotALie);
        }
        Ok(())
    }
}

impl Receipt {
    /// This receipt, signed by `key` (the receiver).
    pub fn sign(self, key: &SigningKey) -> Signed<Receipt> {
        let sig = key
            .sign(&message(RECEIPT_DOMAIN, &self))
            .to_bytes()
            .to_vec();
        Signed { body: self, sig }
    }
}

impl Signed<Receipt> {
    /// Is this the receiver's signature over a well-formed receipt?
    pub fn verify(&self) -> Result<(), DirectError> {
        let b = &self.body;
        if b.server == b.receiver {
            return Err(DirectError::SelfDealing);
        }
        if b.bytes == 0 {
            return Err(DirectError::Invalid("a receipt for 0 bytes".into()));
        }
        if b.from_ms > b.to_ms {
            return Err(DirectError::Invalid(
                "the receipt's window ends before it starts".into(),
            ));
        }
        verify(&b.receiver, &message(RECEIPT_DOMAIN, b), &self.sig)
    }
}

/// Is `time_ms` within [`limits::MAX_CLOCK_SKEW_MS`] of `now_ms`?
pub fn fresh(time_ms: u64, now_ms: u64) -> bool {
    time_ms.abs_diff(now_ms) <= limits::MAX_CLOCK_SKEW_MS
}

/// Check the ICE server URLs an operator configured (`stun:`, `stuns:`,
/// `turn:`, `turns:`; bounded count and length, printable ASCII).
pub fn check_ice_servers(urls: &[String]) -> Result<(), String> {
    if urls.len() > limits::MAX_ICE_SERVERS {
        return Err(format!(
            "{} ICE servers: at most {}",
            urls.len(),
            limits::MAX_ICE_SERVERS
        ));
    }
    for u in urls {
        if u.len() > limits::MAX_ICE_URL {
            return Err(format!(
                "ICE server URL of {} bytes: at most {}",
                u.len(),
                limits::MAX_ICE_URL
            ));
        }
        if !u.bytes().all(|c| c.is_ascii_graphic()) {
            return Err(format!(
                "ICE server URL {u:?} has spaces or non-ASCII bytes"
            ));
        }
        let scheme = u.split(':').next().unwrap_or_default();
        if !matches!(scheme, "stun" | "stuns" | "turn" | "turns") || u.len() <= scheme.len() + 1 {
            return Err(format!(
                "ICE server URL {u:?} is not stun:, stuns:, turn: or turns: HOST[:PORT]"
            ));
        }
    }
    Ok(())
}

/// A message on a data channel between two peers (postcard, at most
/// [`limits::MAX_CHANNEL_MESSAGE`] bytes; the channel is reliable and
/// ordered, so a chunk's parts arrive in order).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum ChannelMsg {
    /// Receiver → server: send chunk `index` of `block`.
    Want {
        req: u32,
        block: BlockHash,
        index: u32,
    },
    /// Server → receiver: bytes `offset..offset + data.len()` of the chunk
    /// asked with `req`, `total` bytes in all; the first part carries the
    /// signed statement over the whole chunk.
    Part {
        req: u32,
        offset: u32,
        total: u32,
        statement: Option<Signed<ChunkStatement>>,
        #[serde(with = "crate::net::peer::raw_bytes")]
        data: Vec<u8>,
    },
    /// Server → receiver: it does not hold that chunk (any more).
    NotHeld { req: u32 },
}

/// Room a `Part`'s envelope and statement take besides its data.
const PART_OVERHEAD: usize = 512;

impl ChannelMsg {
    pub fn encode(&self) -> Vec<u8> {
        crate::net::peer::encode(self)
    }

    /// Decode one data-channel message: bounded, no trailing bytes (the
    /// same rule as a `/ws` frame, with the channel's bound).
    pub fn decode(bytes: &[u8]) -> Result<ChannelMsg, DirectError> {
        crate::net::peer::decode_bounded(bytes, limits::MAX_CHANNEL_MESSAGE)
            .map_err(|e| DirectError::Invalid(format!("channel message: {e}")))
    }

    /// The parts that carry `data` (one chunk) for `req`, each under
    /// [`limits::MAX_CHANNEL_MESSAGE`] once encoded.
    pub fn parts(req: u32, statement: Signed<ChunkStatement>, data: &[u8]) -> Vec<ChannelMsg> {
        let step = limits::MAX_CHANNEL_MESSAGE - PART_OVERHEAD;
        let total = data.len() as u32;
        let mut out = Vec::with_capacity(data.len() / step + 1);
        let mut statement = Some(statement);
        let mut offset = 0usize;
        loop {
            let end = (offset + step).min(data.len());
            out.push(ChannelMsg::Part {
                req,
                offset: offset as u32,
                total,
                statement: statement.take(),
                data: data[offset..end].to_vec(),
            });
            offset = end;
            if offset >= data.len() {
                return out;
            }
        }
    }
}

/// A complete chunk and the statement its server signed over it.
pub type SignedChunk = (Signed<ChunkStatement>, Vec<u8>);

/// Reassembles one chunk from its parts, checking as it goes: parts in
/// order, a total within the block's chunk size, the statement first.
#[derive(Debug)]
pub struct Reassembly {
    max_total: u32,
    statement: Option<Signed<ChunkStatement>>,
    total: u32,
    data: Vec<u8>,
}

impl Reassembly {
    /// A chunk of at most `max_total` bytes (the block's chunk size).
    pub fn new(max_total: u32) -> Self {
        Self {
            max_total,
            statement: None,
            total: 0,
            data: Vec::new(),
        }
    }

    /// Add a part. `Ok(Some(..))` once the chunk is complete: the statement
    /// and the bytes (not yet checked against the statement or the list).
    pub fn add(
        &mut self,
        offset: u32,
        total: u32,
        statement: Option<Signed<ChunkStatement>>,
        data: Vec<u8>,
    ) -> Result<Option<SignedChunk>, DirectError> {
        let first = self.statement.is_none();
        if first {
            let Some(st) = statement else {
                return Err(DirectError::Invalid(
                    "the first part has no statement".into(),
                ));
            };
            if offset != 0 || total == 0 || total > self.max_total {
                return Err(DirectError::Invalid(format!(
                    "a first part at {offset} of {total} bytes (chunks are at most {})",
                    self.max_total
                )));
            }
            self.statement = Some(st);
            self.total = total;
            self.data = Vec::with_capacity(total as usize);
        } else if statement.is_some() || total != self.total {
            return Err(DirectError::Invalid(
                "a later part changes the statement or the total".into(),
            ));
        }
        if offset as usize != self.data.len()
            || self.data.len() + data.len() > self.total as usize
            || data.is_empty()
        {
            return Err(DirectError::Invalid(format!(
                "part at {offset} of {} bytes does not continue the chunk at {}",
                data.len(),
                self.data.len()
            )));
        }
        self.data.extend_from_slice(&data);
        if self.data.len() == self.total as usize {
            let st = self.statement.take().ok_or_else(|| {
                DirectError::Invalid("the chunk completed without a statement".into())
            })?;
            return Ok(Some((st, std::mem::take(&mut self.data))));
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u8) -> SigningKey {
        SigningKey::from_bytes(&[b; 32])
    }

    #[test]
    fn a_signed_lie_is_a_proof_and_a_true_chunk_is_not() {
        let (server, receiver) = (key(1), key(2));
        let rk = receiver.verifying_key().to_bytes();
        let sk = server.verifying_key().to_bytes();
        let block = BlockHash([9; 32]);
        let good = b"the real chunk".to_vec();
        let chunks = vec![BlockHash([0; 32]), BlockHash::of(&good)];

        let honest = ChunkStatement::sign(&server, rk, block, 1, &good, 1000);
        assert_eq!(honest.check_received(&sk, &rk, &block, 1, &good), Ok(()));
        assert_eq!(honest.judge(&chunks), Err(DirectError::NotALie));

        let mut bad = good.clone();
        bad[0] ^= 1;
        let lie = ChunkStatement::sign(&server, rk, block, 1, &bad, 1000);
        assert_eq!(lie.check_received(&sk, &rk, &block, 1, &bad), Ok(()));
        assert_eq!(
            lie.judge(&chunks),
            Ok(()),
            "a signed wrong hash proves the lie"
        );

        // The statement must hash what was sent and name the right parties.
        assert!(lie.check_received(&sk, &rk, &block, 1, &good).is_err());
        assert!(lie.check_received(&rk, &rk, &block, 1, &bad).is_err());
        assert!(lie.check_received(&sk, &sk, &block, 1, &bad).is_err());
        assert!(lie.check_received(&sk, &rk, &block, 0, &bad).is_err());

        // A forged proof: another key's signature, a changed field, a cut
        // signature, an index past the list.
        let mut forged = ChunkStatement::sign(&key(3), rk, block, 1, &bad, 1000);
        forged.body.server = sk;
        assert_eq!(forged.judge(&chunks), Err(DirectError::BadSignature));
        let mut edited = lie.clone();
        edited.body.time_ms += 1;
        assert_eq!(edited.judge(&chunks), Err(DirectError::BadSignature));
        let mut short = lie.clone();
        short.sig.pop();
        assert_eq!(short.judge(&chunks), Err(DirectError::SigLength(63)));
        let far = ChunkStatement::sign(&server, rk, block, 7, &bad, 1000);
        assert!(matches!(
            far.judge(&chunks),
            Err(DirectError::IndexOutOfRange { index: 7, .. })
        ));
        let mut self_deal = ChunkStatement::sign(&server, sk, block, 1, &bad, 1000);
        self_deal.body.receiver = sk;
        assert_eq!(self_deal.judge(&chunks), Err(DirectError::SelfDealing));
    }

    #[test]
    fn receipts_verify_only_as_signed_by_the_receiver() {
        let (server, receiver) = (key(1), key(2));
        let r = Receipt {
            server: server.verifying_key().to_bytes(),
            receiver: receiver.verifying_key().to_bytes(),
            block: BlockHash([4; 32]),
            bytes: 4096,
            from_ms: 10,
            to_ms: 20,
        };
        assert_eq!(r.sign(&receiver).verify(), Ok(()));
        assert_eq!(r.sign(&server).verify(), Err(DirectError::BadSignature));
        let mut more = r.sign(&receiver);
        more.body.bytes *= 2;
        assert_eq!(more.verify(), Err(DirectError::BadSignature));
        let zero = Receipt { bytes: 0, ..r };
        assert!(zero.sign(&receiver).verify().is_err());
        let back = Receipt { from_ms: 30, ..r };
        assert!(back.sign(&receiver).verify().is_err());
        let own = Receipt {
            server: r.receiver,
            ..r
        };
        assert_eq!(own.sign(&receiver).verify(), Err(DirectError::SelfDealing));
        // A chunk statement's signature is never a receipt's.
        let st = ChunkStatement::sign(&receiver, r.server, r.block, 0, b"x", 5);
        let cross = Signed {
            body: r,
            sig: st.sig,
        };
        assert_eq!(cross.verify(), Err(DirectError::BadSignature));
    }

    #[test]
    fn ice_server_urls_are_checked() {
        let ok =
            |v: &[&str]| check_ice_servers(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert!(ok(&[]).is_ok());
        assert!(ok(&["stun:stun.example.org:3478", "turns:turn.example.org"]).is_ok());
        for bad in ["http://x", "stun:", "stun:a b", "stün:x", "stun"] {
            assert!(ok(&[bad]).is_err(), "{bad}");
        }
        assert!(ok(&["stun:x"; 9]).is_err());
        assert!(ok(&[&format!("stun:{}", "a".repeat(300))]).is_err());
        assert!(fresh(1_000_000, 1_000_000 + limits::MAX_CLOCK_SKEW_MS));
        assert!(!fresh(0, limits::MAX_CLOCK_SKEW_MS + 1));
    }

    #[test]
    fn chunks_split_into_bounded_parts_and_reassemble_checked() {
        let k = key(1);
        let rk = key(2).verifying_key().to_bytes();
        let block = BlockHash([3; 32]);
        for len in [
            1usize,
            1000,
            limits::MAX_CHANNEL_MESSAGE,
            3 * limits::MAX_CHANNEL_MESSAGE + 17,
        ] {
            let data: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
            let st = ChunkStatement::sign(&k, rk, block, 4, &data, 1);
            let parts = ChannelMsg::parts(9, st.clone(), &data);
            let mut r = Reassembly::new(8 << 20);
            let mut done = None;
            for (n, p) in parts.iter().enumerate() {
                let bytes = p.encode();
                assert!(
                    bytes.len() <= limits::MAX_CHANNEL_MESSAGE,
                    "{}",
                    bytes.len()
                );
                let ChannelMsg::Part {
                    req: 9,
                    offset,
                    total,
                    statement,
                    data,
                } = ChannelMsg::decode(&bytes).unwrap()
                else {
                    panic!("a part");
                };
                let got = r.add(offset, total, statement, data).unwrap();
                assert_eq!(got.is_some(), n + 1 == parts.len());
                done = got.or(done);
            }
            let (st2, back) = done.unwrap();
            assert_eq!((st2, back.as_slice()), (st, data.as_slice()));
        }
    }

    #[test]
    fn hostile_parts_are_refused() {
        let k = key(1);
        let st = ChunkStatement::sign(&k, [2; 32], BlockHash([3; 32]), 0, b"abcd", 1);
        // No statement first; a total past the chunk size; a gap; overflow.
        assert!(Reassembly::new(4).add(0, 4, None, b"ab".to_vec()).is_err());
        assert!(Reassembly::new(4)
            .add(0, 5, Some(st.clone()), b"ab".to_vec())
            .is_err());
        let mut r = Reassembly::new(4);
        assert_eq!(r.add(0, 4, Some(st.clone()), b"ab".to_vec()), Ok(None));
        assert!(r.add(3, 4, None, b"c".to_vec()).is_err(), "a gap");
        let mut r = Reassembly::new(4);
        r.add(0, 4, Some(st.clone()), b"ab".to_vec()).unwrap();
        assert!(
            r.add(2, 4, None, b"cde".to_vec()).is_err(),
            "past the total"
        );
        let mut r = Reassembly::new(4);
        r.add(0, 4, Some(st.clone()), b"ab".to_vec()).unwrap();
        assert!(
            r.add(2, 4, Some(st), b"cd".to_vec()).is_err(),
            "a second statement"
        );
        // Oversized, malformed and trailing messages.
        assert!(ChannelMsg::decode(&vec![0; limits::MAX_CHANNEL_MESSAGE + 1]).is_err());
        assert!(ChannelMsg::decode(&[9, 9, 9]).is_err());
        let mut m = ChannelMsg::NotHeld { req: 1 }.encode();
        m.push(0);
        assert!(ChannelMsg::decode(&m).is_err());
    }

    proptest::proptest! {
        #[test]
        fn channel_decoding_never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..1024)) {
            let _ = ChannelMsg::decode(&bytes);
        }
    }
}
