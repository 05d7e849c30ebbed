//! `relay backup` / `relay restore` on real stores and relays: an embedded
//! relay backed up and restored into a fresh data dir and into PostgreSQL
//! (SKIPPED loudly without it, failing under AIBLOCK_REQUIRE_PG=1), a backup
//! of a serving relay over its REST API, and truncated or bit-flipped
//! archives that must import nothing.

use std::path::{Path, PathBuf};

use crate::common::*;
use relay::backup::{
    self, run_backup, run_restore, verify_archive, BackupArgs, BackupError, RestoreArgs,
};
use relay::pg::Pg;
use relay::server::ServeConfig;
use relay::store::{BlockStore as _, FileStore, PgStore, RelayStore};
use relay::ServeOptions;
use test_support::pg::TestPg;
use web_node::chain::{Block, BlockHash, ChainId};
use web_node::model::Slot;
use web_node::net::api::BlockInfo;

/// What a restore must reproduce: each chain's hashes in order, the heads,
/// and every payload.
#[derive(Debug, PartialEq)]
struct Snapshot {
    a: Vec<BlockHash>,
    b: Vec<BlockHash>,
    heads: Vec<(Option<BlockHash>, String, BlockHash)>,
    payloads: Vec<(BlockHash, Vec<u8>)>,
}

fn snapshot(store: &dyn RelayStore) -> Snapshot {
    let all = store.list().unwrap();
    let on = |c: ChainId| {
        all.iter()
            .filter(|b| b.header.chain == c)
            .map(|b| b.hash)
            .collect::<Vec<_>>()
    };
    let mut heads: Vec<_> = store
        .heads()
        .unwrap()
        .into_iter()
        .map(|h| (h.meta, h.name, h.hash))
        .collect();
    heads.sort();
    let payloads = all
        .iter()
        .map(|b| (b.hash, store.payload(&b.hash).unwrap()))
        .collect();
    Snapshot {
        a: on(ChainId::A),
        b: on(ChainId::B),
        heads,
        payloads,
    }
}

fn file_snapshot(dir: &Path) -> Snapshot {
    snapshot(&FileStore::open(dir).unwrap().0)
}

/// An in-process relay on the embedded store (whatever AIBLOCK_TEST_STORE says).
fn embedded_relay(data: &Path, model: Option<&Path>) -> TestRelay {
    TestRelay::start_cfg(
        ServeConfig {
            data_dir: data.to_path_buf(),
            web_dir: None,
            model_dir: model.map(Path::to_path_buf),
            database: None,
        },
        |s| s,
        ServeOptions::default(),
    )
}

/// Upload new versions of a few slots (one slot twice); returns them.
fn upload_versions(url: &str, seed: u64) -> Vec<BlockInfo> {
    let cfg = test_config();
    let meta = list(url, "A")[0].hash;
    let slots = [
        Slot::Expert {
            layer: 0,
            expert: 0,
        },
        Slot::Expert {
            layer: 1,
            expert: 1,
        },
        Slot::Expert {
            layer: 0,
            expert: 0,
        },
        Slot::Shared,
    ];
    let mut out = Vec::new();
    for (i, slot) in slots.into_iter().enumerate() {
        let head = list(url, "B")
            .into_iter()
            .rev()
            .find(|b| b.name == slot.to_string())
            .unwrap()
            .hash;
        let payload = slot_payload(&cfg, slot, seed + i as u64);
        let (_, block) = upload(slot, &payload, vec![head], Some(meta), &miner_key(1));
        let r = post_bin(
            &format!("{url}/blocks"),
            &envelope_and_payload(&block, &payload),
        );
        assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
        out.push(r.json());
    }
    out
}

fn backup_args(out: &Path) -> BackupArgs {
    BackupArgs {
        data: None,
        database: None,
        blobs: None,
        relay: None,
        page: backup::MAX_PAGE,
        out: out.to_path_buf(),
    }
}

fn backup_data(data: &Path, out: &Path) -> anyhow::Result<()> {
    run_backup(&BackupArgs {
        data: Some(data.to_path_buf()),
        ..backup_args(out)
    })
}

fn restore_data(from: &Path, data: &Path) -> anyhow::Result<()> {
    run_restore(&RestoreArgs {
        from: from.to_path_buf(),
        data: Some(data.to_path_buf()),
        database: None,
        blobs: None,
    })
}

fn backup_error(e: anyhow::Error) -> BackupError {
    e.downcast::<BackupError>()
        .unwrap_or_else(|e| panic!("not a BackupError: {e:#}"))
}

/// Everything under `dir` except `keep`: what a failed backup must not leave.
fn others(dir: &Path, keep: &[&str]) -> Vec<String> {
    files(dir)
        .into_iter()
        .map(|(f, _)| f)
        .filter(|f| {
            !keep
                .iter()
                .any(|k| f == k || f.starts_with(&format!("{k}/")))
        })
        .collect()
}

/// A stopped embedded relay with genesis plus uploaded versions, its
/// listings, and its archive (`--data`).
struct Source {
    _tmp: tempfile::TempDir,
    data: PathBuf,
    archive: PathBuf,
    a: Vec<BlockInfo>,
    b: Vec<BlockInfo>,
    snap: Snapshot,
}

fn source() -> Source {
    let tmp = tempfile::tempdir().unwrap();
    let model = model_dir(tmp.path());
    let data = tmp.path().join("data");
    let r = embedded_relay(&data, Some(&model));
    upload_versions(&r.url, 100);
    let (a, b) = (list(&r.url, "A"), list(&r.url, "B"));
    assert!(
        b.len() > Slot::all(&test_config()).len(),
        "more than genesis"
    );
    r.stop();
    let archive = tmp.path().join("out").join("chain.aibk");
    std::fs::create_dir_all(archive.parent().unwrap()).unwrap();
    backup_data(&data, &archive).unwrap();
    let snap = file_snapshot(&data);
    assert_eq!(snap.a.len() + snap.b.len(), a.len() + b.len());
    Source {
        _tmp: tmp,
        data,
        archive,
        a,
        b,
        snap,
    }
}

#[test]
fn embedded_backup_restores_the_same_chain() {
    let s = source();
    let v = verify_archive(&s.archive).unwrap();
    let order: Vec<_> = FileStore::open(&s.data)
        .unwrap()
        .0
        .list()
        .unwrap()
        .iter()
        .map(|b| b.hash)
        .collect();
    assert_eq!(v.hashes, order, "the store's acceptance order");
    // Only the archive in its directory: the temp file was renamed.
    assert_eq!(others(s.archive.parent().unwrap(), &[]), ["chain.aibk"]);

    let restored = s._tmp.path().join("restored");
    restore_data(&s.archive, &restored).unwrap();
    assert_eq!(file_snapshot(&restored), s.snap);

    // A relay on the restored dir serves the same listing (heads included),
    // makes no genesis of its own, and every block validates from scratch.
    let r = embedded_relay(&restored, None);
    assert_eq!(list(&r.url, "A"), s.a);
    assert_eq!(list(&r.url, "B"), s.b);
    assert_eq!(fetch_and_validate_all(&r.url), s.a.len() + s.b.len());
    r.stop();

    // The same blocks in the same order: the same bytes.
    let again = s._tmp.path().join("again.aibk");
    backup_data(&restored, &again).unwrap();
    assert_eq!(
        std::fs::read(&again).unwrap(),
        std::fs::read(&s.archive).unwrap()
    );
}

fn pg_store(url: &str, blobs: Option<&Path>, staging: &Path) -> PgStore {
    let objects = blobs.map(|b| relay::store::pg::open_blobs(b.to_str().unwrap()).unwrap());
    PgStore::open_with_blobs(Pg::connect(url).unwrap(), staging, objects)
        .unwrap()
        .0
}

#[test]
fn archive_restores_into_postgres() {
    let Some(pg) = TestPg::shared() else {
        eprintln!("**** SKIPPED: archive_restores_into_postgres (no PostgreSQL) ****");
        return;
    };
    let s = source();
    // PgStore::open empties its staging dir: the archives live elsewhere.
    let staging = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let blob_dir = tempfile::tempdir().unwrap();
    for blobs in [None, Some(blob_dir.path())] {
        let url = pg.create_db();
        let restore = |from: &Path| {
            run_restore(&RestoreArgs {
                from: from.to_path_buf(),
                data: None,
                database: Some(url.clone()),
                blobs: blobs.map(|b| b.display().to_string()),
            })
        };
        // A damaged archive first: refused, the database stays empty.
        let mut bytes = std::fs::read(&s.archive).unwrap();
        let at = bytes.len() / 2;
        bytes[at] ^= 0x04;
        let bad = work.path().join("bad.aibk");
        std::fs::write(&bad, &bytes).unwrap();
        let e = backup_error(restore(&bad).unwrap_err());
        assert!(matches!(e, BackupError::Damaged { .. }), "{e}");
        assert!(pg_store(&url, blobs, staging.path())
            .list()
            .unwrap()
            .is_empty());

        restore(&s.archive).unwrap();
        let store = pg_store(&url, blobs, staging.path());
        assert_eq!(snapshot(&store), s.snap, "blobs: {blobs:?}");

        // Backup from the database gives back the same archive.
        let out = work.path().join("from-pg.aibk");
        run_backup(&BackupArgs {
            database: Some(url.clone()),
            blobs: blobs.map(|b| b.display().to_string()),
            ..backup_args(&out)
        })
        .unwrap();
        assert_eq!(
            std::fs::read(&out).unwrap(),
            std::fs::read(&s.archive).unwrap()
        );
        // And a second restore into it is refused.
        let e = backup_error(restore(&s.archive).unwrap_err());
        assert!(matches!(e, BackupError::NotEmpty(_)), "{e}");
    }
}

fn web(dir: &Path) -> PathBuf {
    let w = dir.join("web");
    std::fs::create_dir_all(&w).unwrap();
    std::fs::write(w.join("index.html"), "hi").unwrap();
    w
}

#[test]
fn backup_of_a_serving_relay() {
    let tmp = tempfile::tempdir().unwrap();
    let model = model_dir(tmp.path());
    let data = tmp.path().join("data");
    let r = ChildRelay::start(&data, &model, &web(tmp.path()));
    upload_versions(&r.url, 300);
    let out_dir = tmp.path().join("out");
    std::fs::create_dir_all(&out_dir).unwrap();

    // --data of a serving relay: a clear error, no file left behind, and
    // the relay's store untouched.
    let out = out_dir.join("data.aibk");
    let e = backup_error(backup_data(&data, &out).unwrap_err());
    assert!(matches!(e, BackupError::RelayRunning(_)), "{e}");
    let msg = e.to_string();
    assert!(msg.contains("running") && msg.contains("--relay"), "{msg}");
    assert!(others(&out_dir, &[]).is_empty());
    // Restoring into it is refused as well.
    let e = backup_error(restore_data(&out, &data).unwrap_err());
    assert!(matches!(e, BackupError::TargetInUse(_)), "{e}");

    // --relay, two blocks per page: several pages per chain.
    let via_relay = out_dir.join("relay.aibk");
    run_backup(&BackupArgs {
        relay: Some(r.url.clone()),
        page: 2,
        ..backup_args(&via_relay)
    })
    .unwrap();
    let (a, b) = (list(&r.url, "A"), list(&r.url, "B"));
    assert!(b.len() > 4);
    let restored = tmp.path().join("restored");
    restore_data(&via_relay, &restored).unwrap();
    let snap = file_snapshot(&restored);
    assert_eq!(snap.a, a.iter().map(|i| i.hash).collect::<Vec<_>>());
    assert_eq!(snap.b, b.iter().map(|i| i.hash).collect::<Vec<_>>());
    for (h, p) in &snap.payloads {
        assert_eq!(get(&format!("{}/blocks/{h}/payload", r.url)).body, *p);
    }
    let mut want: Vec<BlockHash> = a
        .iter()
        .chain(&b)
        .filter(|i| i.is_head)
        .map(|i| i.hash)
        .collect();
    let mut restored_heads: Vec<BlockHash> = snap.heads.iter().map(|h| h.2).collect();
    restored_heads.sort();
    want.sort();
    assert_eq!(restored_heads, want);

    // While uploads go on: the archive holds a consistent set that validates.
    let url = r.url.clone();
    let uploader = std::thread::spawn(move || upload_versions(&url, 400));
    let during = out_dir.join("during.aibk");
    run_backup(&BackupArgs {
        relay: Some(r.url.clone()),
        page: 1,
        ..backup_args(&during)
    })
    .unwrap();
    uploader.join().unwrap();
    let n = verify_archive(&during).unwrap().hashes.len();
    assert!(n >= a.len() + b.len() && n <= a.len() + b.len() + 4, "{n}");

    // Stopped, the same relay's --data backup is the --relay archive plus
    // the blocks uploaded since, in the same order.
    let total = list(&r.url, "A").len() + list(&r.url, "B").len();
    let via_relay_all = out_dir.join("relay-all.aibk");
    run_backup(&BackupArgs {
        relay: Some(r.url.clone()),
        ..backup_args(&via_relay_all)
    })
    .unwrap();
    r.terminate();
    backup_data(&data, &out).unwrap();
    assert_eq!(verify_archive(&out).unwrap().hashes.len(), total);
    assert_eq!(
        std::fs::read(&out).unwrap(),
        std::fs::read(&via_relay_all).unwrap()
    );
}

/// Offsets of each record in an archive: (envelope start, payload start, payload length).
fn records(bytes: &[u8]) -> Vec<(usize, usize, usize)> {
    let mut out = Vec::new();
    let mut pos = backup::HEADER_LEN as usize;
    loop {
        let n = u32::from_le_bytes(bytes[pos..pos + 4].try_into().unwrap()) as usize;
        if n == 0 {
            return out;
        }
        let b = Block::decode(&bytes[pos + 4..pos + 4 + n]).unwrap();
        let plen = b.header.payload_len as usize;
        out.push((pos + 4, pos + 4 + n, plen));
        pos += 4 + n + plen;
    }
}

#[test]
fn damaged_archives_are_refused_and_nothing_is_imported() {
    let s = source();
    let good = std::fs::read(&s.archive).unwrap();
    let len = good.len();
    let recs = records(&good);
    assert!(recs.len() > 3);
    let (env0, pay0, plen0) = recs[0];
    let (_, pay2, plen2) = recs[2];
    let last = recs[recs.len() - 1];
    let trailer = len - backup::TRAILER_LEN as usize;
    assert_eq!(last.1 + last.2, trailer);

    let mut cases: Vec<(String, Vec<u8>)> = Vec::new();
    for cut in [
        0,
        5,
        backup::HEADER_LEN as usize,
        env0 + 10,
        pay0 + plen0 / 2,
        pay2 + plen2 - 1,
        trailer,
        trailer + 20,
        len - 32,
        len - 1,
    ] {
        cases.push((format!("cut at {cut}"), good[..cut].to_vec()));
    }
    for (what, at) in [
        ("magic", 2),
        ("format version", 8),
        ("flags", 13),
        ("record length", env0 - 4),
        ("envelope header", env0 + 12),
        ("envelope signature", pay0 - 3),
        ("meta payload", pay0 + plen0 / 2),
        ("expert payload", pay2 + plen2 / 3),
        ("last payload byte", trailer - 1),
        ("end marker", trailer + 1),
        ("trailer magic", trailer + 6),
        ("trailer count", trailer + 12),
        ("trailer bytes", trailer + 20),
        ("checksum", len - 1),
    ] {
        for bit in [0u8, 7] {
            let mut b = good.clone();
            b[at] ^= 1 << bit;
            cases.push((format!("bit {bit} of the {what} (offset {at})"), b));
        }
    }
    // One byte too many.
    let mut longer = good.clone();
    longer.push(0);
    cases.push(("a byte appended".into(), longer));

    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.aibk");
    for (i, (what, bytes)) in cases.iter().enumerate() {
        std::fs::write(&bad, bytes).unwrap();
        let target = dir.path().join(format!("t{i}"));
        let e = backup_error(restore_data(&bad, &target).unwrap_err());
        assert!(
            matches!(
                e,
                BackupError::Damaged { .. } | BackupError::NotArchive { .. }
            ),
            "{what}: {e}"
        );
        let store = FileStore::open(&target).unwrap().0;
        assert!(store.list().unwrap().is_empty(), "{what}: blocks imported");
        assert!(
            files(&target.join("blocks")).is_empty(),
            "{what}: block files written"
        );
        drop(store);
    }
    // The control: the unchanged bytes restore.
    std::fs::write(&bad, &good).unwrap();
    restore_data(&bad, &dir.path().join("ok")).unwrap();
    assert_eq!(file_snapshot(&dir.path().join("ok")), s.snap);
}

#[test]
fn restore_refuses_a_non_empty_store() {
    let s = source();
    // The source itself (genesis and more).
    let e = backup_error(restore_data(&s.archive, &s.data).unwrap_err());
    assert!(matches!(e, BackupError::NotEmpty(_)), "{e}");
    assert!(e.to_string().contains("not empty"), "{e}");
    assert_eq!(file_snapshot(&s.data), s.snap);
    // A restored store, restored again.
    let t = s._tmp.path().join("restored");
    restore_data(&s.archive, &t).unwrap();
    let e = backup_error(restore_data(&s.archive, &t).unwrap_err());
    assert!(matches!(e, BackupError::NotEmpty(_)), "{e}");
    assert_eq!(file_snapshot(&t), s.snap);
    // --data of a directory that holds no store is not a backup source.
    let e = backup_error(
        backup_data(&s._tmp.path().join("nothing"), &s._tmp.path().join("x")).unwrap_err(),
    );
    assert!(matches!(e, BackupError::NoStore(_)), "{e}");
}

#[test]
fn flags_need_exactly_one_source_and_say_what_is_left_out() {
    use clap::{Args as _, FromArgMatches as _};
    fn backup(args: &[&str]) -> Result<BackupArgs, clap::Error> {
        let m = BackupArgs::augment_args(clap::Command::new("backup"))
            .try_get_matches_from(std::iter::once("backup").chain(args.iter().copied()))?;
        BackupArgs::from_arg_matches(&m)
    }
    fn restore(args: &[&str]) -> Result<RestoreArgs, clap::Error> {
        let m = RestoreArgs::augment_args(clap::Command::new("restore"))
            .try_get_matches_from(std::iter::once("restore").chain(args.iter().copied()))?;
        RestoreArgs::from_arg_matches(&m)
    }
    let a = backup(&["--data", "d", "--out", "f"]).unwrap();
    assert_eq!(a.data.as_deref(), Some(Path::new("d")));
    assert_eq!(a.page, 1000);
    assert!(backup(&["--relay", "http://x", "--page", "5", "--out", "f"]).is_ok());
    assert!(backup(&["--database", "postgres://x/y", "--blobs", "b", "--out", "f"]).is_ok());
    assert!(backup(&["--out", "f"]).is_err(), "no source");
    assert!(backup(&["--data", "d", "--relay", "u", "--out", "f"]).is_err());
    assert!(backup(&["--data", "d", "--database", "u", "--out", "f"]).is_err());
    assert!(backup(&["--relay", "u", "--blobs", "b", "--out", "f"]).is_err());
    assert!(backup(&["--data", "d", "--blobs", "b", "--out", "f"]).is_err());
    assert!(backup(&["--blobs", "b", "--out", "f"]).is_err());
    assert!(backup(&["--data", "d", "--page", "5", "--out", "f"]).is_err());
    assert!(backup(&["--relay", "u", "--page", "1001", "--out", "f"]).is_err());
    assert!(backup(&["--data", "d"]).is_err(), "no --out");
    assert!(restore(&["--from", "f", "--data", "d"]).is_ok());
    assert!(restore(&["--from", "f"]).is_err(), "no target");
    assert!(restore(&["--from", "f", "--data", "d", "--database", "u"]).is_err());
    assert!(restore(&["--from", "f", "--data", "d", "--blobs", "b"]).is_err());
    assert!(restore(&["--from", "f", "--database", "u", "--blobs", "b"]).is_ok());
    for mut cmd in [
        BackupArgs::augment_args(clap::Command::new("backup")),
        RestoreArgs::augment_args(clap::Command::new("restore")),
    ] {
        let help = cmd.render_long_help().to_string();
        assert!(
            help.contains("Usage counters, usage reports and rewards are NOT in the archive"),
            "{help}"
        );
    }
}
