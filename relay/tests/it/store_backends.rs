//! The same store behaviour on both backends: the embedded `FileStore` and
//! `PgStore` on a real PostgreSQL (a throwaway server; SKIPPED loudly
//! without PostgreSQL, failing under AIBLOCK_REQUIRE_PG=1).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::sync::Arc;

use crate::common::*;
use relay::pg::Pg;
use relay::store::{
    put_checked, BlockStore as _, Committed, Expect, FileStore, PgStore, RelayStore,
};
use test_support::pg::TestPg;
use web_node::chain::{Block, BlockKind, MetaPayload};
use web_node::model::random::random_model_bytes;
use web_node::model::Slot;
use web_node::net::api::{SeedUpload, UploadOptions};
use web_node::store::{load_dag, StoreError};

/// A meta block and two versions of one expert (several chunks each).
fn blocks() -> Vec<(Block, Vec<u8>)> {
    // Experts of 72 KiB: 18 chunks each.
    let cfg = web_node::model::random::small_config(259, 64, 96, 2, 2, 1);
    let m = random_model_bytes(&cfg, 1).unwrap();
    let meta = MetaPayload::new("m", serde_json::from_slice(&m.config_json).unwrap(), None)
        .unwrap()
        .to_json();
    let key = miner_key(1);
    let (_, mb) =
        SeedUpload::build(BlockKind::Meta, "m", &meta, &UploadOptions::default(), &key).unwrap();
    let slot = Slot::Expert {
        layer: 0,
        expert: 0,
    };
    let p1 = slot_payload(&cfg, slot, 1);
    let b1 = small_chunks(slot, &p1, vec![], mb.hash);
    let p2 = slot_payload(&cfg, slot, 2);
    let b2 = small_chunks(slot, &p2, vec![b1.hash], mb.hash);
    assert!(b1.header.payload_len > 3 * u64::from(b1.header.chunk_size));
    vec![(mb, meta), (b1, p1), (b2, p2)]
}

/// A version of `slot` with 4 KiB chunks (the smallest allowed).
fn small_chunks(
    slot: Slot,
    payload: &[u8],
    parents: Vec<web_node::chain::BlockHash>,
    meta: web_node::chain::BlockHash,
) -> Block {
    let opts = UploadOptions {
        parents,
        meta: Some(meta),
        chunk_size: Some(4096),
        timestamp_ms: 1_700_000_000_000,
        ..UploadOptions::default()
    };
    SeedUpload::build(
        BlockKind::of_slot(slot),
        &slot.to_string(),
        payload,
        &opts,
        &miner_key(1),
    )
    .unwrap()
    .1
}

/// One backend: how to open it (again) and how to damage a stored chunk
/// behind its back.
enum Backend {
    File(tempfile::TempDir),
    Pg {
        url: String,
        staging: tempfile::TempDir,
    },
    /// PostgreSQL with payloads as objects in a directory (`--blobs DIR`).
    PgBlobs {
        url: String,
        staging: tempfile::TempDir,
        blobs: tempfile::TempDir,
    },
}

impl Backend {
    fn all() -> Vec<Backend> {
        let mut v = vec![Backend::File(tempfile::tempdir().unwrap())];
        match TestPg::shared() {
            Some(pg) => {
                v.push(Backend::Pg {
                    url: pg.create_db(),
                    staging: tempfile::tempdir().unwrap(),
                });
                v.push(Backend::PgBlobs {
                    url: pg.create_db(),
                    staging: tempfile::tempdir().unwrap(),
                    blobs: tempfile::tempdir().unwrap(),
                });
            }
            None => eprintln!("**** SKIPPED: the PostgreSQL half of this test ****"),
        }
        v
    }

    fn name(&self) -> &'static str {
        match self {
            Backend::File(_) => "embedded",
            Backend::Pg { .. } => "postgres",
            Backend::PgBlobs { .. } => "postgres+blobs",
        }
    }

    fn open(&self) -> Box<dyn RelayStore> {
        match self {
            Backend::File(d) => Box::new(FileStore::open(d.path()).unwrap().0),
            Backend::Pg { url, staging } => Box::new(
                PgStore::open(Pg::connect(url).unwrap(), staging.path())
                    .unwrap()
                    .0,
            ),
            Backend::PgBlobs {
                url,
                staging,
                blobs,
            } => {
                let objects = relay::store::pg::open_blobs(blobs.path().to_str().unwrap()).unwrap();
                Box::new(
                    PgStore::open_with_blobs(
                        Pg::connect(url).unwrap(),
                        staging.path(),
                        Some(objects),
                    )
                    .unwrap()
                    .0,
                )
            }
        }
    }

    /// Flip one byte of chunk 1 of `b`'s payload where it is stored.
    fn corrupt_chunk(&self, b: &Block) {
        match self {
            Backend::File(d) => {
                let (s, _) = FileStore::open(d.path()).unwrap();
                let path = s.block_path(&b.hash);
                let mut bytes = std::fs::read(&path).unwrap();
                let at = b.encoded_len() + b.header.chunk_size as usize + 5;
                bytes[at] ^= 0x55;
                std::fs::write(&path, bytes).unwrap();
            }
            Backend::PgBlobs { blobs, .. } => {
                let path = blobs.path().join("payloads").join(b.hash.to_hex());
                let mut bytes = std::fs::read(&path).unwrap();
                bytes[b.header.chunk_size as usize + 5] ^= 0x55;
                std::fs::write(&path, bytes).unwrap();
            }
            Backend::Pg { url, .. } => {
                let pg = Pg::connect(url).unwrap();
                let h = b.hash.0.to_vec();
                let n: u64 = pg
                    .with(move |c| async move {
                        Ok::<_, relay::pg::PgError>(c
                            .execute(
                                "UPDATE payload_chunks SET data = set_byte(data, 5, get_byte(data, 5) # 85)
                                 WHERE block = $1 AND idx = 1",
                                &[&h],
                            )
                            .await?)
                    })
                    .unwrap();
                assert_eq!(n, 1);
            }
        }
    }
}

fn hashes(v: &[Block]) -> Vec<web_node::chain::BlockHash> {
    v.iter().map(|b| b.hash).collect()
}

#[test]
fn put_read_list_heads_and_reopen() {
    let bs = blocks();
    for be in Backend::all() {
        let name = be.name();
        {
            let s = be.open();
            for (b, p) in &bs {
                s.put(b, p).unwrap();
            }
            assert_eq!(
                s.put(&bs[1].0, &bs[1].1),
                Err(StoreError::Duplicate(bs[1].0.hash)),
                "{name}"
            );
        }
        // Everything survives a reopen.
        let s = be.open();
        let listed = s.list().unwrap();
        assert_eq!(
            hashes(&listed),
            bs.iter().map(|(b, _)| b.hash).collect::<Vec<_>>(),
            "{name}"
        );
        for (b, p) in &bs {
            assert_eq!(s.get(&b.hash).unwrap().as_ref(), Some(b), "{name}");
            assert_eq!(&s.payload(&b.hash).unwrap(), p, "{name}");
            assert_eq!(
                s.chunk_list(&b.hash).unwrap(),
                web_node::chain::chunk_hashes(p, b.header.chunk_size),
                "{name}"
            );
        }
        // Ranges across chunk borders, at the end, empty, and outside.
        let (b, p) = &bs[1];
        let cs = b.header.chunk_size as u64;
        for (start, len) in [
            (0, 1),
            (10, 20),
            (cs - 3, 7),
            (cs, cs),
            (cs - 1, 2 * cs + 2),
        ] {
            assert_eq!(
                s.read_payload(&b.hash, start, len).unwrap(),
                p[start as usize..(start + len) as usize],
                "{name} {start}+{len}"
            );
        }
        let plen = b.header.payload_len;
        assert_eq!(s.read_payload(&b.hash, plen, 0).unwrap(), Vec::<u8>::new());
        assert!(
            matches!(
                s.read_payload(&b.hash, plen - 1, 2),
                Err(StoreError::Range { .. })
            ),
            "{name}"
        );
        let unknown = web_node::chain::BlockHash([9; 32]);
        assert_eq!(s.get(&unknown).unwrap(), None, "{name}");
        assert!(
            matches!(s.read_payload(&unknown, 0, 1), Err(StoreError::NotFound(_))),
            "{name}"
        );
        assert!(
            matches!(s.chunk_list(&unknown), Err(StoreError::NotFound(_))),
            "{name}"
        );
        assert!(
            matches!(
                s.set_head(None, "x", &unknown),
                Err(StoreError::NotFound(_))
            ),
            "{name}"
        );
        // Heads: the meta block and the newer expert version.
        let mut heads: Vec<_> = s.heads().unwrap().into_iter().map(|h| h.hash).collect();
        heads.sort();
        let mut want = vec![bs[0].0.hash, bs[2].0.hash];
        want.sort();
        assert_eq!(heads, want, "{name}");
        // Positions: list_after gives what came after.
        let all = s.list_after(None).unwrap();
        assert_eq!(all.len(), 3);
        let after_first = s.list_after(Some(all[0].0)).unwrap();
        assert_eq!(
            hashes(&after_first.into_iter().map(|x| x.1).collect::<Vec<_>>()),
            vec![bs[1].0.hash, bs[2].0.hash],
            "{name}"
        );
        assert!(s.list_after(Some(all[2].0)).unwrap().is_empty(), "{name}");
        // The DAG loads from either the same way.
        assert_eq!(load_dag(&*s).unwrap().len(), 3, "{name}");
        assert_eq!(s.scrub().unwrap().checked, 3, "{name}");
    }
}

#[test]
fn commit_settles_the_head_and_discard_leaves_nothing() {
    let bs = blocks();
    for be in Backend::all() {
        let name = be.name();
        let s = be.open();
        let (meta, mp) = &bs[0];
        let (v1, p1) = &bs[1];
        let (v2, p2) = &bs[2];
        assert_eq!(
            put_checked(&*s, meta, mp, Expect::Head(None)).unwrap(),
            Committed::Done
        );
        // v1 expects the slot to be new: it is.
        assert_eq!(
            put_checked(&*s, v1, p1, Expect::Head(None)).unwrap(),
            Committed::Done
        );
        // v2 also expecting a new slot lost the race: nothing indexed, payload discarded.
        assert_eq!(
            put_checked(&*s, v2, p2, Expect::Head(None)).unwrap(),
            Committed::HeadMoved(Some(v1.hash)),
            "{name}"
        );
        assert!(!s.contains(&v2.hash).unwrap(), "{name}");
        assert!(
            matches!(s.read_payload(&v2.hash, 0, 1), Err(StoreError::NotFound(_))),
            "{name}"
        );
        assert_eq!(s.list().unwrap().len(), 2, "{name}");
        if let Backend::PgBlobs { blobs, .. } = &be {
            let obj = blobs.path().join("payloads").join(v2.hash.to_hex());
            assert!(!obj.exists(), "the loser's object is deleted");
        }
        // A payload of the wrong length is refused before anything is written.
        assert!(matches!(
            put_checked(&*s, v2, &p2[..p2.len() - 1], Expect::Any),
            Err(StoreError::Corrupt(_))
        ));
        assert!(!s.contains(&v2.hash).unwrap(), "{name}");
        // Built on the right head it goes in.
        assert_eq!(
            put_checked(&*s, v2, p2, Expect::Head(Some(v1.hash))).unwrap(),
            Committed::Done
        );
        assert_eq!(
            put_checked(&*s, v2, p2, Expect::Any),
            Err(StoreError::Duplicate(v2.hash))
        );
        // Staging dir holds nothing afterwards.
        let left = std::fs::read_dir(s.staging_dir())
            .map(|d| d.count())
            .unwrap_or(0);
        assert_eq!(left, 0, "{name}: staged files left behind");
    }
}

#[test]
fn a_corrupted_chunk_is_never_served_and_is_quarantined() {
    let bs = blocks();
    for be in Backend::all() {
        let name = be.name();
        {
            let s = be.open();
            for (b, p) in &bs {
                s.put(b, p).unwrap();
            }
        }
        let (b, p) = &bs[1];
        be.corrupt_chunk(b);
        let s = be.open();
        let cs = b.header.chunk_size as u64;
        // Chunk 0 alone is intact and still readable.
        assert_eq!(
            s.read_payload(&b.hash, 0, cs).unwrap(),
            p[..cs as usize],
            "{name}"
        );
        // Any read touching chunk 1 fails and quarantines the payload.
        match s.read_payload(&b.hash, cs + 1, 10) {
            Err(StoreError::Corrupt(m)) => assert!(m.contains("chunk 1"), "{name}: {m}"),
            other => panic!("{name}: {other:?}"),
        }
        assert!(s.quarantined(&b.hash).unwrap().is_some(), "{name}");
        assert!(
            matches!(s.chunk_list(&b.hash), Err(StoreError::Corrupt(_))),
            "{name}"
        );
        assert!(
            matches!(s.read_payload(&b.hash, 0, 1), Err(StoreError::Corrupt(_))),
            "{name}"
        );
        assert_eq!(s.quarantined_all().unwrap().len(), 1, "{name}");
        // The header stays in the chain; the other payloads are served.
        assert!(s.get(&b.hash).unwrap().is_some(), "{name}");
        assert_eq!(&s.payload(&bs[2].0.hash).unwrap(), &bs[2].1, "{name}");
        let r = s.scrub().unwrap();
        assert_eq!((r.checked, r.already_quarantined), (2, 1), "{name}");
    }
}

#[test]
fn scrub_finds_corruption_before_any_read() {
    let bs = blocks();
    for be in Backend::all() {
        let name = be.name();
        {
            let s = be.open();
            for (b, p) in &bs {
                s.put(b, p).unwrap();
            }
        }
        be.corrupt_chunk(&bs[2].0);
        let s = be.open();
        let r = s.scrub().unwrap();
        assert_eq!(r.checked, 2, "{name}");
        assert_eq!(r.quarantined.len(), 1, "{name}");
        assert_eq!(r.quarantined[0].0, bs[2].0.hash, "{name}");
        assert!(s.quarantined(&bs[2].0.hash).unwrap().is_some(), "{name}");
    }
}

#[test]
fn pg_store_refuses_a_database_it_cannot_reach_and_a_newer_schema() {
    let Some(pg) = TestPg::shared() else {
        eprintln!("**** SKIPPED: no PostgreSQL ****");
        return;
    };
    // Nothing listens on this port.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let e = Pg::connect(&format!("postgres://postgres@127.0.0.1:{port}/x")).unwrap_err();
    assert!(e.to_string().contains("cannot connect"), "{e}");
    // Not a URL at all.
    assert!(Pg::connect("postgres://[::bad").is_err());
    // A database a newer relay migrated.
    let url = pg.create_db();
    let db = Pg::connect(&url).unwrap();
    db.with(|c| async move {
        c.execute(
            "INSERT INTO schema_migrations (version, name) VALUES (999, 'future')",
            &[],
        )
        .await?;
        Ok::<_, relay::pg::PgError>(())
    })
    .unwrap();
    drop(db);
    let e = Pg::connect(&url).unwrap_err();
    assert!(e.to_string().contains("newer than this relay"), "{e}");
}

#[test]
fn migrations_apply_once_when_relays_start_together() {
    let Some(pg) = TestPg::shared() else {
        eprintln!("**** SKIPPED: no PostgreSQL ****");
        return;
    };
    let url = pg.create_db();
    let handles: Vec<_> = (0..4)
        .map(|_| {
            let u = url.clone();
            std::thread::spawn(move || Pg::connect(&u).map(|_| ()))
        })
        .collect();
    for h in handles {
        h.join().unwrap().unwrap();
    }
    let db: Arc<Pg> = Pg::connect(&url).unwrap();
    let n: i64 = db
        .with(|c| async move {
            Ok::<_, relay::pg::PgError>(
                c.query_one("SELECT count(*) FROM schema_migrations", &[])
                    .await?
                    .get(0),
            )
        })
        .unwrap();
    assert_eq!(n as usize, relay::pg::MIGRATIONS.len());
    let _ = Path::new("");
}

#[test]
fn blobs_a_missing_object_is_corrupt_not_a_panic_and_blobs_need_a_database() {
    let Some(pg) = TestPg::shared() else {
        eprintln!("**** SKIPPED: no PostgreSQL ****");
        return;
    };
    let bs = blocks();
    let (staging, dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let objects = relay::store::pg::open_blobs(dir.path().to_str().unwrap()).unwrap();
    let (s, _) = PgStore::open_with_blobs(
        Pg::connect(&pg.create_db()).unwrap(),
        staging.path(),
        Some(objects),
    )
    .unwrap();
    for (b, p) in &bs {
        s.put(b, p).unwrap();
    }
    // One object per payload, nothing in the chunk rows.
    assert_eq!(
        std::fs::read_dir(dir.path().join("payloads"))
            .unwrap()
            .count(),
        3
    );
    std::fs::remove_file(dir.path().join("payloads").join(bs[1].0.hash.to_hex())).unwrap();
    match s.read_payload(&bs[1].0.hash, 0, 10) {
        Err(StoreError::Corrupt(m)) => assert!(m.contains("missing"), "{m}"),
        other => panic!("{other:?}"),
    }
    assert!(s.quarantined(&bs[1].0.hash).unwrap().is_some());
    assert_eq!(s.payload(&bs[2].0.hash).unwrap(), bs[2].1);
    // A URL scheme it does not know, and --blobs without --database.
    assert!(relay::store::pg::open_blobs("gs://bucket").is_err());
    let tmp = tempfile::tempdir().unwrap();
    let cfg = relay::server::ServeConfig {
        data_dir: tmp.path().to_path_buf(),
        web_dir: None,
        model_dir: None,
        database: None,
    };
    let e = relay::open_relay_with_blobs(&cfg, Some("/tmp/x"))
        .err()
        .unwrap();
    assert!(e.to_string().contains("--blobs needs --database"), "{e}");
}
