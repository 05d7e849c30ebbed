//! A payload this node already holds (a browser's IndexedDB cache, a disk
//! store) checked against a header-verified block before anything uses it.
//!
//! A held payload is complete, so it gets the checks a fresh download ends
//! with in [`PayloadAssembler::finish`](super::PayloadAssembler::finish):
//! [`validate_payload`], i.e. the length against the header's
//! `payload_len`, the chunk hashes over the header's `chunk_size` against
//! the header's payload root, and the content rules (chain B: exactly the
//! tensors the config implies for the slot; chain A: the meta spec). The
//! per-chunk checks the assembler runs first add nothing for a complete
//! payload (a root over all chunk hashes of the right length pins every
//! chunk), so this hashes the payload once and copies nothing: a held expert
//! can be most of a gigabyte, and wasm32 has 4 GiB in all. The tests check
//! that the assembler fed the same bytes reaches the same verdict.

use super::{validate_payload, Block, ChainError, VerifiedPayload};
use crate::spec::Config;

/// Check a held payload against a header-verified `block` as strictly as a
/// fresh download. `config` is the model config (from the block's chain-A
/// meta block); chain-B blocks need it, chain-A blocks take `None`.
pub fn verify_held_payload(
    block: &Block,
    config: Option<&Config>,
    bytes: &[u8],
) -> Result<(), ChainError> {
    validate_payload(&block.header, bytes, config).map(|_| ())
}

/// [`verify_held_payload`], keeping the bytes: the same [`VerifiedPayload`]
/// a download's [`PayloadAssembler::finish`](super::PayloadAssembler::finish)
/// gives (with the parsed spec and config for a chain-A block).
pub fn verify_held(
    block: &Block,
    config: Option<&Config>,
    bytes: Vec<u8>,
) -> Result<VerifiedPayload, ChainError> {
    let meta = validate_payload(&block.header, &bytes, config)?;
    Ok(VerifiedPayload {
        hash: block.hash,
        bytes,
        meta,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use ed25519_dalek::SigningKey;

    use super::*;
    use crate::chain::{chunk_hashes, limits, BlockBuilder, PayloadAssembler};
    use crate::test_chain::TinyChain;

    /// The tiny model's meta block and two expert blocks, each with its
    /// payload (several 4 KiB chunks).
    struct Fixture {
        config: Config,
        meta: (Block, Vec<u8>),
        expert: (Block, Vec<u8>),
        other: (Block, Vec<u8>),
    }

    fn fixture() -> Fixture {
        let chain = TinyChain::new(5);
        let mut experts = chain.experts().into_iter();
        let expert = experts.next().unwrap();
        let other = experts.next().unwrap();
        assert!(expert.1.len() > 2 * limits::MIN_CHUNK_SIZE as usize);
        Fixture {
            config: chain.config,
            meta: chain.meta,
            expert,
            other,
        }
    }

    /// The verdict of a download fed the same bytes, chunk by chunk.
    fn assembled(block: &Block, config: Option<&Config>, bytes: &[u8]) -> Result<(), ChainError> {
        let mut asm = PayloadAssembler::new(block);
        asm.set_chunk_list(chunk_hashes(bytes, block.header.chunk_size))?;
        for i in asm.missing() {
            let r = asm.chunk_range(i).unwrap();
            asm.add_chunk(i, bytes[r.start as usize..r.end as usize].to_vec())?;
        }
        asm.finish(config).map(|_| ())
    }

    /// Held check and download agree; returns the held check's error.
    fn check(block: &Block, config: Option<&Config>, bytes: &[u8]) -> Result<(), ChainError> {
        let held = verify_held_payload(block, config, bytes);
        assert_eq!(
            held.is_ok(),
            assembled(block, config, bytes).is_ok(),
            "held check and download disagree: {held:?}"
        );
        held
    }

    #[test]
    fn good_payloads_pass() {
        let f = fixture();
        let (b, p) = &f.expert;
        check(b, Some(&f.config), p).unwrap();
        let v = verify_held(b, Some(&f.config), p.clone()).unwrap();
        assert_eq!((v.hash, &v.bytes, v.meta.is_none()), (b.hash, p, true));
        // Chain A: the spec is parsed and handed back.
        let (mb, mp) = &f.meta;
        check(mb, None, mp).unwrap();
        let v = verify_held(mb, None, mp.clone()).unwrap();
        let (spec, cfg) = v.meta.unwrap();
        assert_eq!(spec.model_name, "tiny");
        assert_eq!(cfg.num_hidden_layers, f.config.num_hidden_layers);
    }

    #[test]
    fn a_flipped_byte_fails_in_any_chunk() {
        let f = fixture();
        let (b, p) = &f.expert;
        for at in [0, p.len() / 2, p.len() - 1] {
            let mut bad = p.clone();
            bad[at] ^= 0x01;
            let e = check(b, Some(&f.config), &bad).unwrap_err();
            assert!(
                matches!(e, ChainError::PayloadRoot { expected, .. } if expected == b.header.payload_root),
                "byte {at}: {e}"
            );
            assert!(e.to_string().contains("payload root mismatch"), "{e}");
        }
        let mut bad = f.meta.1.clone();
        bad[0] ^= 0x01;
        assert!(matches!(
            check(&f.meta.0, None, &bad),
            Err(ChainError::PayloadRoot { .. })
        ));
    }

    #[test]
    fn truncated_or_extended_payloads_fail_on_length() {
        let f = fixture();
        let (b, p) = &f.expert;
        let len = p.len() as u64;
        let cs = limits::MIN_CHUNK_SIZE as usize;
        // One byte short, a whole chunk short, empty.
        for cut in [p.len() - 1, p.len() - cs, 0] {
            let e = check(b, Some(&f.config), &p[..cut]).unwrap_err();
            assert_eq!(
                e,
                ChainError::PayloadLength {
                    header: len,
                    actual: cut as u64
                }
            );
            assert!(e.to_string().contains("payload length mismatch"), "{e}");
        }
        // One byte more, a whole chunk more.
        for extra in [1, cs] {
            let mut long = p.clone();
            long.extend(std::iter::repeat_n(0u8, extra));
            let e = check(b, Some(&f.config), &long).unwrap_err();
            assert_eq!(
                e,
                ChainError::PayloadLength {
                    header: len,
                    actual: len + extra as u64
                }
            );
        }
    }

    #[test]
    fn another_blocks_payload_fails() {
        let f = fixture();
        let (b, p) = &f.expert;
        let (ob, op) = &f.other;
        assert_ne!(p, op);
        // Another expert: the same tensor shapes, so (almost surely) the
        // same length, and then only the root tells them apart.
        let e = check(b, Some(&f.config), op).unwrap_err();
        if p.len() == op.len() {
            assert_eq!(
                e,
                ChainError::PayloadRoot {
                    expected: b.header.payload_root,
                    actual: ob.header.payload_root
                }
            );
        } else {
            assert!(matches!(e, ChainError::PayloadLength { .. }), "{e}");
        }
        // The meta payload under an expert header, and the other way round.
        assert!(matches!(
            check(b, Some(&f.config), &f.meta.1),
            Err(ChainError::PayloadLength { .. })
        ));
        assert!(matches!(
            check(&f.meta.0, None, p),
            Err(ChainError::PayloadLength { .. })
        ));
    }

    #[test]
    fn content_rules_apply_to_held_payloads() {
        let f = fixture();
        let (b, p) = &f.expert;
        // A chain-B block whose header matches its bytes (length, root) but
        // whose safetensors header is broken.
        let mut garbage = p.clone();
        garbage[8] = b'X';
        let key = SigningKey::from_bytes(&[6; 32]);
        let h = &b.header;
        let liar = BlockBuilder::new(h.kind, h.name.clone(), h.meta, h.dtype)
            .chunk_size(limits::MIN_CHUNK_SIZE)
            .timestamp_ms(1)
            .sign(&garbage, &key);
        let e = check(&liar, Some(&f.config), &garbage).unwrap_err();
        assert!(matches!(e, ChainError::Tensors(_)), "{e}");
        // Declared safetensors header far past the limit.
        let mut huge = p.clone();
        huge[..8].copy_from_slice(&u64::MAX.to_le_bytes());
        let liar = BlockBuilder::new(h.kind, h.name.clone(), h.meta, h.dtype)
            .chunk_size(limits::MIN_CHUNK_SIZE)
            .timestamp_ms(1)
            .sign(&huge, &key);
        let e = check(&liar, Some(&f.config), &huge).unwrap_err();
        assert!(matches!(e, ChainError::TooLarge { .. }), "{e}");
        // A chain-B payload cannot be checked without its model's config.
        assert!(matches!(check(b, None, p), Err(ChainError::MetaLink(_))));
        // A chain-A block over bytes that are no spec.
        let junk = b"not a spec".to_vec();
        let bad_meta = BlockBuilder::meta("tiny")
            .chunk_size(limits::MIN_CHUNK_SIZE)
            .timestamp_ms(1)
            .sign(&junk, &key);
        let e = check(&bad_meta, None, &junk).unwrap_err();
        assert!(matches!(e, ChainError::MetaPayload(_)), "{e}");
    }
}
