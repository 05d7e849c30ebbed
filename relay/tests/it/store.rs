//! FileStore: durability layout and repair on open.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common::*;
use relay::FileStore;
use web_node::chain::{BlockKind, MetaPayload};
use web_node::model::random::random_model_bytes;
use web_node::model::Slot;
use web_node::net::api::{SeedUpload, UploadOptions};
use web_node::store::{load_dag, BlockStore, StoreError};

/// A meta block and two versions of one expert.
fn blocks() -> Vec<(web_node::chain::Block, Vec<u8>)> {
    let cfg = test_config();
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
    let (_, b1) = upload(slot, &p1, vec![], Some(mb.hash), &key);
    let p2 = slot_payload(&cfg, slot, 2);
    let (_, b2) = upload(slot, &p2, vec![b1.hash], Some(mb.hash), &key);
    vec![(mb, meta), (b1, p1), (b2, p2)]
}

#[test]
fn put_read_list_and_reopen() {
    let tmp = tempfile::tempdir().unwrap();
    let bs = blocks();
    {
        let (s, rep) = FileStore::open(tmp.path()).unwrap();
        assert_eq!(rep, Default::default());
        for (b, p) in &bs {
            s.put(b, p).unwrap();
        }
        assert_eq!(
            s.put(&bs[1].0, &bs[1].1),
            Err(StoreError::Duplicate(bs[1].0.hash))
        );
        let on_disk = std::fs::read(s.block_path(&bs[1].0.hash)).unwrap();
        assert_eq!(on_disk, envelope_and_payload(&bs[1].0, &bs[1].1));
    }
    let (s, rep) = FileStore::open(tmp.path()).unwrap();
    assert_eq!(rep, Default::default());
    assert_eq!(
        s.list().unwrap().iter().map(|b| b.hash).collect::<Vec<_>>(),
        bs.iter().map(|(b, _)| b.hash).collect::<Vec<_>>()
    );
    assert_eq!(
        s.read_payload(&bs[2].0.hash, 10, 20).unwrap(),
        bs[2].1[10..30].to_vec()
    );
    assert!(matches!(
        s.read_payload(&bs[2].0.hash, 10, bs[2].1.len() as u64),
        Err(StoreError::Range { .. })
    ));
    let dag = load_dag(&s).unwrap();
    assert_eq!(dag.len(), 3);
    use web_node::chain::ChainView;
    assert_eq!(
        dag.head(Some(&bs[0].0.hash), "layer0.expert0"),
        Some(bs[2].0.hash)
    );
}

#[test]
fn open_removes_temp_files_drops_broken_entries_and_reports_orphans() {
    let tmp = tempfile::tempdir().unwrap();
    let bs = blocks();
    let (path1, path2);
    {
        let (s, _) = FileStore::open(tmp.path()).unwrap();
        for (b, p) in &bs[..2] {
            s.put(b, p).unwrap();
        }
        path1 = s.block_path(&bs[1].0.hash);
        path2 = s.block_path(&bs[2].0.hash);
    }
    // Leftovers of interrupted writes, and a block file written without its index entry.
    std::fs::write(path1.parent().unwrap().join(".tmpXYZ"), b"half").unwrap();
    std::fs::write(tmp.path().join("tmp/upload-abc"), b"half upload").unwrap();
    std::fs::create_dir_all(path2.parent().unwrap()).unwrap();
    std::fs::write(&path2, envelope_and_payload(&bs[2].0, &bs[2].1)).unwrap();
    let (s, rep) = FileStore::open(tmp.path()).unwrap();
    assert_eq!(rep.removed_temp, 2);
    assert!(rep.dropped.is_empty());
    assert_eq!(rep.orphans, vec![bs[2].0.hash]);
    assert!(!s.contains(&bs[2].0.hash).unwrap());
    let (b, p) = s.read_orphan(&bs[2].0.hash).unwrap();
    assert_eq!((b, p), bs[2].clone());
    s.put(&bs[2].0, &bs[2].1).unwrap();
    drop(s);

    // Truncate the middle block: it and its child are dropped, heads fall back.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&path1)
        .unwrap();
    f.set_len(std::fs::metadata(&path1).unwrap().len() - 1)
        .unwrap();
    drop(f);
    let (s, rep) = FileStore::open(tmp.path()).unwrap();
    assert_eq!(rep.dropped, vec![bs[1].0.hash, bs[2].0.hash]);
    let mut want = vec![bs[1].0.hash, bs[2].0.hash];
    want.sort();
    assert_eq!(rep.orphans, want);
    assert_eq!(s.list().unwrap().len(), 1);
    assert!(s.heads().unwrap().iter().all(|h| h.hash == bs[0].0.hash));
    s.quarantine(&bs[1].0.hash).unwrap();
    assert!(tmp
        .path()
        .join("quarantine")
        .join(bs[1].0.hash.to_hex())
        .is_file());
}

#[test]
fn relay_adopts_valid_orphans_and_quarantines_the_rest() {
    let tmp = tempfile::tempdir().unwrap();
    let model = model_dir(tmp.path());
    let data = tmp.path().join("data");
    let (meta, head) = {
        let r = TestRelay::start(&data, Some(&model), None);
        let meta = list(&r.url, "A")[0].hash;
        let head = list(&r.url, "B")
            .into_iter()
            .find(|i| i.name == "layer0.expert2")
            .unwrap()
            .hash;
        r.stop();
        (meta, head)
    };
    let cfg = test_config();
    let slot = Slot::Expert {
        layer: 0,
        expert: 2,
    };
    let p = slot_payload(&cfg, slot, 77);
    let (_, good) = upload(slot, &p, vec![head], Some(meta), &miner_key(1));
    let (_, stale) = upload(
        slot,
        &slot_payload(&cfg, slot, 78),
        vec![],
        Some(meta),
        &miner_key(1),
    );
    // As if the relay crashed after writing the files but before indexing them.
    for (b, payload) in [(&good, p.clone()), (&stale, slot_payload(&cfg, slot, 78))] {
        let hex = b.hash.to_hex();
        let dir = data.join("blocks").join(&hex[..2]);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(&hex), envelope_and_payload(b, &payload)).unwrap();
    }
    let r = TestRelay::start(&data, Some(&model), None);
    let b = list(&r.url, "B");
    assert!(
        b.iter().any(|i| i.hash == good.hash && i.is_head),
        "valid orphan adopted"
    );
    assert!(
        !b.iter().any(|i| i.hash == stale.hash),
        "invalid orphan not indexed"
    );
    assert!(data.join("quarantine").join(stale.hash.to_hex()).is_file());
    assert_eq!(fetch_and_validate_all(&r.url), 1 + b.len());
}
