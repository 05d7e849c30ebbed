//! The page's persistent cache of verified block payloads, in IndexedDB.
//!
//! Database `aiblock`, object store `payloads`: key the block hash in
//! lowercase hex, value `{ len, bytes }` (`bytes` a `Uint8Array`). A second
//! store, `sizes`, holds each entry's length under the same key, written and
//! deleted in the same transactions, so [`Cache::usage`] never reads a
//! payload. The cache stores bytes only: whatever comes back is untrusted
//! and goes through [`crate::chain::verify_held_payload`] against the
//! verified header before anything uses it; a corrupt entry is then dropped
//! with [`Cache::delete`] and fetched again.
//!
//! Raw `web-sys`, no IndexedDB crate: every request and transaction gets its
//! event listeners the moment it is made (so no event is missed while
//! another is awaited) and loses them when its future ends or is dropped;
//! nothing relies on a transaction staying active across an `await`.
//! Writes resolve on the transaction's `complete`, so a quota error (raised
//! at commit) is an `Err`, never a panic or a silent loss.

use std::cell::Cell;
use std::rc::Rc;

use futures_channel::oneshot;
use wasm_bindgen::prelude::*;
use wasm_bindgen::JsCast;
use web_sys::{
    DomException, Event, EventTarget, IdbDatabase, IdbFactory, IdbObjectStore, IdbOpenDbRequest,
    IdbRequest, IdbTransaction, IdbTransactionMode,
};

use crate::chain::BlockHash;

/// The database's name.
pub const DB_NAME: &str = "aiblock";
/// The payload store: block hash hex → `{ len, bytes }`.
pub const PAYLOADS: &str = "payloads";
/// Each entry's length, under the same key.
const SIZES: &str = "sizes";

/// An open cache database.
pub struct Cache {
    db: IdbDatabase,
    /// Closes this connection when another page upgrades the database.
    _on_versionchange: Closure<dyn FnMut(Event)>,
}

impl Drop for Cache {
    fn drop(&mut self) {
        self.db.set_onversionchange(None);
        self.db.close();
    }
}

/// A thrown JS value as text.
fn js_text(v: &JsValue) -> String {
    if let Some(e) = v.dyn_ref::<DomException>() {
        return format!("{}: {}", e.name(), e.message());
    }
    v.as_string()
        .or_else(|| {
            v.dyn_ref::<js_sys::Error>()
                .map(|e| String::from(e.message()))
        })
        .unwrap_or_else(|| format!("{v:?}"))
}

/// `map_err` for a thrown JS value: "{what}: {error}".
fn js_err(what: &'static str) -> impl Fn(JsValue) -> String {
    move |v| format!("{what}: {}", js_text(&v))
}

fn dom_text(e: Option<DomException>) -> String {
    e.map(|e| format!("{}: {}", e.name(), e.message()))
        .unwrap_or_else(|| "no error given".into())
}

/// An event listener kept alive while it is registered.
type Listener = (&'static str, Closure<dyn FnMut(Event)>);

/// Listeners on one request or transaction for the events that end it.
/// The first of them to fire is the outcome; the listeners are removed
/// when this is dropped (awaited or not), so none fires into freed memory.
struct Outcome {
    target: EventTarget,
    listeners: Vec<Listener>,
    rx: oneshot::Receiver<&'static str>,
}

impl Outcome {
    fn listen(target: &EventTarget, events: &[&'static str]) -> Result<Self, String> {
        let (tx, rx) = oneshot::channel();
        let tx = Rc::new(Cell::new(Some(tx)));
        let mut out = Self {
            target: target.clone(),
            listeners: Vec::with_capacity(events.len()),
            rx,
        };
        for &name in events {
            let tx = Rc::clone(&tx);
            let f = Closure::<dyn FnMut(Event)>::new(move |_: Event| {
                if let Some(tx) = tx.take() {
                    let _ = tx.send(name);
                }
            });
            target
                .add_event_listener_with_callback(name, f.as_ref().unchecked_ref())
                .map_err(js_err("cannot listen to IndexedDB events"))?;
            out.listeners.push((name, f));
        }
        Ok(out)
    }

    /// The name of the first event that fired.
    async fn event(mut self) -> Result<&'static str, String> {
        (&mut self.rx)
            .await
            .map_err(|_| "IndexedDB dropped a request".to_string())
    }
}

impl Drop for Outcome {
    fn drop(&mut self) {
        for (name, f) in &self.listeners {
            let _ = self
                .target
                .remove_event_listener_with_callback(name, f.as_ref().unchecked_ref());
        }
    }
}

/// A request whose result is awaited later; listening starts now.
struct Pending {
    req: IdbRequest,
    outcome: Outcome,
}

impl Pending {
    fn new(req: Result<IdbRequest, JsValue>, what: &'static str) -> Result<Self, String> {
        let req = req.map_err(js_err(what))?;
        let outcome = Outcome::listen(&req, &["success", "error"])?;
        Ok(Self { req, outcome })
    }

    async fn result(self, what: &'static str) -> Result<JsValue, String> {
        match self.outcome.event().await? {
            "success" => self.req.result().map_err(js_err(what)),
            _ => Err(format!(
                "{what}: {}",
                self.req
                    .error()
                    .map(dom_text)
                    .unwrap_or_else(|e| js_text(&e))
            )),
        }
    }
}

/// A transaction over both stores, listening for its end from the start.
struct Tx {
    tx: IdbTransaction,
    done: Outcome,
}

impl Tx {
    fn new(db: &IdbDatabase, mode: IdbTransactionMode) -> Result<Self, String> {
        let names = js_sys::Array::of2(&PAYLOADS.into(), &SIZES.into());
        let tx = db
            .transaction_with_str_sequence_and_mode(&names, mode)
            .map_err(js_err("cannot start a cache transaction"))?;
        let done = Outcome::listen(&tx, &["complete", "abort"])?;
        Ok(Self { tx, done })
    }

    fn store(&self, name: &str) -> Result<IdbObjectStore, String> {
        self.tx
            .object_store(name)
            .map_err(js_err("cache store missing"))
    }

    /// The payload and size stores of a write; the transaction is aborted
    /// when either is missing.
    fn payloads_and_sizes(&self) -> Result<(IdbObjectStore, IdbObjectStore), String> {
        match (self.store(PAYLOADS), self.store(SIZES)) {
            (Ok(p), Ok(s)) => Ok((p, s)),
            (Err(e), _) | (_, Err(e)) => {
                self.abort();
                Err(e)
            }
        }
    }

    /// Wait until the transaction commits; an abort (a failed request, a
    /// full quota) is an error naming `what`.
    async fn commit(self, what: &str) -> Result<(), String> {
        match self.done.event().await? {
            "complete" => Ok(()),
            _ => Err(format!("{what}: {}", dom_text(self.tx.error()))),
        }
    }

    /// Give up on a write whose request could not even be made.
    fn abort(&self) {
        let _ = self.tx.abort();
    }
}

fn factory() -> Result<IdbFactory, String> {
    let v = js_sys::Reflect::get(&js_sys::global(), &"indexedDB".into())
        .map_err(js_err("IndexedDB is not available"))?;
    if v.is_undefined() || v.is_null() {
        return Err("IndexedDB is not available in this browser".into());
    }
    v.dyn_into::<IdbFactory>()
        .map_err(|_| "IndexedDB is not available in this browser".into())
}

fn has_stores(db: &IdbDatabase) -> bool {
    let names = db.object_store_names();
    names.contains(PAYLOADS) && names.contains(SIZES)
}

/// Open the database (at `version`, or its current one), creating the
/// stores when an upgrade runs.
async fn open_db(factory: &IdbFactory, version: Option<u32>) -> Result<IdbDatabase, String> {
    let req: IdbOpenDbRequest = match version {
        Some(v) => factory.open_with_u32(DB_NAME, v),
        None => factory.open(DB_NAME),
    }
    .map_err(js_err("cannot open the IndexedDB cache"))?;
    let upgrade_req = req.clone();
    let upgrade = Closure::<dyn FnMut(Event)>::new(move |_: Event| {
        let created = upgrade_req
            .result()
            .and_then(|db| db.dyn_into::<IdbDatabase>())
            .and_then(|db| {
                for name in [PAYLOADS, SIZES] {
                    if !db.object_store_names().contains(name) {
                        db.create_object_store(name)?;
                    }
                }
                Ok(())
            });
        if created.is_err() {
            // The open then fails with an AbortError.
            if let Some(tx) = upgrade_req.transaction() {
                let _ = tx.abort();
            }
        }
    });
    req.set_onupgradeneeded(Some(upgrade.as_ref().unchecked_ref()));
    let outcome = Outcome::listen(&req, &["success", "error", "blocked"]);
    let event = match outcome {
        Ok(o) => o.event().await,
        Err(e) => Err(e),
    };
    req.set_onupgradeneeded(None);
    drop(upgrade);
    match event? {
        "success" => req
            .result()
            .map_err(js_err("cannot open the IndexedDB cache"))?
            .dyn_into::<IdbDatabase>()
            .map_err(|_| "IndexedDB opened something that is not a database".into()),
        "blocked" => {
            // Should the open still succeed later, close that connection.
            let late = req.clone();
            let close = Closure::once_into_js(move |_: Event| {
                if let Ok(db) = late.result().and_then(|v| v.dyn_into::<IdbDatabase>()) {
                    db.close();
                }
            });
            req.set_onsuccess(Some(close.unchecked_ref()));
            Err("the IndexedDB cache is blocked: another tab holds an older version open".into())
        }
        _ => Err(format!(
            "cannot open the IndexedDB cache: {}",
            req.error().map(dom_text).unwrap_or_else(|e| js_text(&e))
        )),
    }
}

fn key(hash: &BlockHash) -> JsValue {
    JsValue::from_str(&hash.to_hex())
}

/// The number in a `sizes` entry (0 for anything else).
fn size_of(v: &JsValue) -> u64 {
    v.as_f64()
        .filter(|n| n.is_finite() && *n >= 0.0)
        .map_or(0, |n| n as u64)
}

impl Cache {
    /// Open (or create) the cache. IndexedDB missing, refused (private
    /// mode, storage disabled) or blocked by another tab → `Err`; the page
    /// then runs without a cache.
    pub async fn open() -> Result<Cache, String> {
        let factory = factory()?;
        let mut db = open_db(&factory, None).await?;
        if !has_stores(&db) {
            // The database exists without our stores: upgrade it.
            let next = (db.version() as u32).saturating_add(1);
            db.close();
            db = open_db(&factory, Some(next)).await?;
            if !has_stores(&db) {
                db.close();
                return Err("the IndexedDB cache has no payload store".into());
            }
        }
        let closing = db.clone();
        let on_versionchange = Closure::<dyn FnMut(Event)>::new(move |_: Event| closing.close());
        db.set_onversionchange(Some(on_versionchange.as_ref().unchecked_ref()));
        Ok(Cache {
            db,
            _on_versionchange: on_versionchange,
        })
    }

    /// The payload held for `hash`, unverified. An entry that is not a
    /// `{ len, bytes }` record of matching length is deleted and reported.
    pub async fn get(&self, hash: &BlockHash) -> Result<Option<Vec<u8>>, String> {
        let tx = Tx::new(&self.db, IdbTransactionMode::Readonly)?;
        let req = Pending::new(tx.store(PAYLOADS)?.get(&key(hash)), "cache read failed")?;
        let value = req.result("cache read failed").await?;
        if value.is_undefined() {
            return Ok(None);
        }
        let bytes = js_sys::Reflect::get(&value, &"bytes".into())
            .ok()
            .and_then(|b| b.dyn_into::<js_sys::Uint8Array>().ok());
        let len = js_sys::Reflect::get(&value, &"len".into())
            .ok()
            .and_then(|l| l.as_f64());
        match (bytes, len) {
            (Some(b), Some(len)) if f64::from(b.length()) == len => Ok(Some(b.to_vec())),
            _ => {
                let dropped = self.delete(hash).await;
                Err(format!(
                    "cache entry {} is malformed{}",
                    hash.short(),
                    match dropped {
                        Ok(()) => " and was dropped".to_string(),
                        Err(e) => format!(" and could not be dropped ({e})"),
                    }
                ))
            }
        }
    }

    /// Store `bytes` (a verified payload) under `hash`, replacing any entry.
    /// Resolves once committed; a full quota is an `Err`.
    pub async fn put(&self, hash: &BlockHash, bytes: &[u8]) -> Result<(), String> {
        let len = bytes.len() as f64;
        let record = js_sys::Object::new();
        let array = js_sys::Uint8Array::new_from_slice(bytes);
        js_sys::Reflect::set(&record, &"len".into(), &len.into())
            .and_then(|_| js_sys::Reflect::set(&record, &"bytes".into(), &array))
            .map_err(js_err("cannot build a cache entry"))?;
        let tx = Tx::new(&self.db, IdbTransactionMode::Readwrite)?;
        let k = key(hash);
        let wrote = tx
            .store(PAYLOADS)
            .and_then(|s| s.put_with_key(&record, &k).map_err(js_err("cache write")))
            .and_then(|_| tx.store(SIZES))
            .and_then(|s| {
                s.put_with_key(&len.into(), &k)
                    .map_err(js_err("cache write"))
            });
        if let Err(e) = wrote {
            tx.abort();
            return Err(format!("could not cache {} bytes: {e}", bytes.len()));
        }
        tx.commit(&format!(
            "the browser refused to cache {} bytes of block {}",
            bytes.len(),
            hash.short()
        ))
        .await
    }

    /// Store several verified payloads in one transaction (one commit for
    /// all: a batch of experts costs one write, not one each). All or
    /// nothing: a full quota is an `Err` and none is stored.
    pub async fn put_many(&self, items: &[(BlockHash, &[u8])]) -> Result<(), String> {
        if items.is_empty() {
            return Ok(());
        }
        let tx = Tx::new(&self.db, IdbTransactionMode::Readwrite)?;
        let (payloads, sizes) = tx.payloads_and_sizes()?;
        let mut total = 0usize;
        for (hash, bytes) in items {
            let len = bytes.len() as f64;
            total += bytes.len();
            let record = js_sys::Object::new();
            let array = js_sys::Uint8Array::new_from_slice(bytes);
            let k = key(hash);
            let wrote = js_sys::Reflect::set(&record, &"len".into(), &len.into())
                .and_then(|_| js_sys::Reflect::set(&record, &"bytes".into(), &array))
                .and_then(|_| payloads.put_with_key(&record, &k))
                .and_then(|_| sizes.put_with_key(&len.into(), &k));
            if let Err(e) = wrote {
                tx.abort();
                return Err(format!(
                    "could not cache {} bytes: {}",
                    bytes.len(),
                    js_err("cache write")(e)
                ));
            }
        }
        tx.commit(&format!(
            "the browser refused to cache {total} bytes in {} blocks",
            items.len()
        ))
        .await
    }

    /// Drop the entry for `hash` (no entry is no error).
    pub async fn delete(&self, hash: &BlockHash) -> Result<(), String> {
        self.delete_keys(&[key(hash)]).await
    }

    async fn delete_keys(&self, keys: &[JsValue]) -> Result<(), String> {
        let tx = Tx::new(&self.db, IdbTransactionMode::Readwrite)?;
        let (payloads, sizes) = tx.payloads_and_sizes()?;
        for k in keys {
            if let Err(e) = payloads.delete(k).and_then(|_| sizes.delete(k)) {
                tx.abort();
                return Err(js_err("cache delete failed")(e));
            }
        }
        tx.commit("cache delete failed").await
    }

    /// The hashes of every entry. Keys that are not a block hash (lowercase
    /// hex) are deleted and skipped.
    pub async fn keys(&self) -> Result<Vec<BlockHash>, String> {
        let tx = Tx::new(&self.db, IdbTransactionMode::Readonly)?;
        let req = Pending::new(tx.store(PAYLOADS)?.get_all_keys(), "cache listing failed")?;
        let all = req.result("cache listing failed").await;
        let mut out = Vec::new();
        let mut bad = Vec::new();
        for k in js_sys::Array::from(&all?).iter() {
            match k
                .as_string()
                .and_then(|s| BlockHash::from_hex(&s).ok().filter(|h| h.to_hex() == s))
            {
                Some(h) => out.push(h),
                None => bad.push(k),
            }
        }
        if !bad.is_empty() {
            self.delete_keys(&bad).await?;
        }
        Ok(out)
    }

    /// Drop every entry.
    pub async fn clear(&self) -> Result<(), String> {
        let tx = Tx::new(&self.db, IdbTransactionMode::Readwrite)?;
        let cleared = tx
            .store(PAYLOADS)
            .and_then(|s| s.clear().map_err(js_err("cache clear failed")))
            .and_then(|_| tx.store(SIZES))
            .and_then(|s| s.clear().map_err(js_err("cache clear failed")));
        if let Err(e) = cleared {
            tx.abort();
            return Err(e);
        }
        tx.commit("cache clear failed").await
    }

    /// Every entry's block and length, without reading any payload. Keys
    /// that are not a block hash are skipped.
    pub async fn sizes(&self) -> Result<Vec<(BlockHash, u64)>, String> {
        let tx = Tx::new(&self.db, IdbTransactionMode::Readonly)?;
        let store = tx.store(SIZES)?;
        let keys = Pending::new(store.get_all_keys(), "cache listing failed")?;
        let sizes = Pending::new(store.get_all(), "cache listing failed")?;
        let keys = js_sys::Array::from(&keys.result("cache listing failed").await?);
        let sizes = js_sys::Array::from(&sizes.result("cache listing failed").await?);
        Ok(keys
            .iter()
            .zip(sizes.iter())
            .filter_map(|(k, v)| {
                let h = BlockHash::from_hex(&k.as_string()?).ok()?;
                Some((h, size_of(&v)))
            })
            .collect())
    }

    /// (entries, payload bytes) held, without reading any payload.
    pub async fn usage(&self) -> Result<(u64, u64), String> {
        let tx = Tx::new(&self.db, IdbTransactionMode::Readonly)?;
        let count = Pending::new(tx.store(PAYLOADS)?.count(), "cache usage failed")?;
        let sizes = Pending::new(tx.store(SIZES)?.get_all(), "cache usage failed")?;
        let count = count.result("cache usage failed").await;
        let sizes = sizes.result("cache usage failed").await;
        let entries = size_of(&count?);
        let bytes = js_sys::Array::from(&sizes?)
            .iter()
            .map(|v| size_of(&v))
            .sum();
        Ok((entries, bytes))
    }
}
