//! The page's memory budget, as plain arithmetic: how many bytes of expert
//! payloads it may keep (from `?budget_mb=` or the device check), and a
//! least-recently-used set sized in bytes whose protected entries (the
//! meta, shared and router blocks a model cannot run without) are never
//! chosen for eviction. The wasm facade keeps three of them: the decoded
//! experts the CPU engine holds, the payloads its peer node serves, and the
//! entries of the IndexedDB cache.

use std::collections::HashMap;
use std::hash::Hash;

/// Smallest and largest budget the page picks by itself (a `?budget_mb=`
/// below or above is taken as given).
pub const MIN_AUTO_BYTES: u64 = 256 << 20;
pub const MAX_AUTO_BYTES: u64 = 2 << 30;
/// Budget without a memory hint from the browser.
pub const DEFAULT_BYTES: u64 = 512 << 20;

/// The budget in bytes: `budget_mb` from the page's address when it is a
/// positive number, else an eighth of the device memory the browser reports
/// (`navigator.deviceMemory`, GiB), within [`MIN_AUTO_BYTES`] and
/// [`MAX_AUTO_BYTES`].
pub fn budget_bytes(param_mb: Option<&str>, device_gib: Option<f64>) -> (u64, &'static str) {
    if let Some(mb) = param_mb
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|v| v.is_finite() && *v > 0.0)
    {
        return (
            ((mb * (1u64 << 20) as f64) as u64).max(1),
            "set by ?budget_mb=",
        );
    }
    match device_gib.filter(|g| g.is_finite() && *g > 0.0) {
        Some(g) => (
            ((g * (1u64 << 30) as f64 / 8.0) as u64).clamp(MIN_AUTO_BYTES, MAX_AUTO_BYTES),
            "an eighth of the device memory",
        ),
        None => (
            DEFAULT_BYTES,
            "default (the browser reports no device memory)",
        ),
    }
}

/// The value of `key` in a query string (`?a=1&budget_mb=64`), decoded
/// only as far as `+`/`%20`-free numbers and names need.
pub fn query_param<'a>(search: &'a str, key: &str) -> Option<&'a str> {
    search
        .trim_start_matches('?')
        .split('&')
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
        .filter(|v| !v.is_empty())
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    bytes: u64,
    used: u64,
    protected: bool,
}

/// Entries with a size in bytes and a last-use tick. [`ByteLru::over`]
/// says how far the unprotected part exceeds a capacity;
/// [`ByteLru::evict_for`] picks the least recently used unprotected
/// entries to drop.
#[derive(Debug, Clone)]
pub struct ByteLru<K> {
    entries: HashMap<K, Entry>,
    tick: u64,
    total: u64,
}

impl<K> Default for ByteLru<K> {
    fn default() -> Self {
        Self {
            entries: HashMap::new(),
            tick: 0,
            total: 0,
        }
    }
}

impl<K: Eq + Hash + Copy + Ord> ByteLru<K> {
    pub fn new() -> Self {
        Self::default()
    }

    /// Add (or refresh) `key` as the most recently used.
    pub fn insert(&mut self, key: K, bytes: u64, protected: bool) {
        self.tick += 1;
        if let Some(old) = self.entries.insert(
            key,
            Entry {
                bytes,
                used: self.tick,
                protected,
            },
        ) {
            self.total -= old.bytes;
        }
        self.total += bytes;
    }

    /// Mark `key` used now; false when it is not held.
    pub fn touch(&mut self, key: &K) -> bool {
        self.tick += 1;
        match self.entries.get_mut(key) {
            Some(e) => {
                e.used = self.tick;
                true
            }
            None => false,
        }
    }

    pub fn remove(&mut self, key: &K) -> bool {
        match self.entries.remove(key) {
            Some(e) => {
                self.total -= e.bytes;
                true
            }
            None => false,
        }
    }

    /// Every key, in no particular order.
    pub fn keys(&self) -> impl Iterator<Item = &K> {
        self.entries.keys()
    }

    pub fn contains(&self, key: &K) -> bool {
        self.entries.contains_key(key)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Bytes of every entry.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// Bytes of the unprotected entries (what a capacity bounds).
    pub fn evictable(&self) -> u64 {
        self.entries
            .values()
            .filter(|e| !e.protected)
            .map(|e| e.bytes)
            .sum()
    }

    /// The least recently used unprotected entries, oldest first, that
    /// must go so that `incoming` more bytes fit in `capacity` (counting
    /// unprotected bytes only), never one in `keep`. May free less than
    /// asked when too little is evictable; the caller removes them.
    pub fn evict_for(&self, incoming: u64, capacity: u64, keep: &[K]) -> Vec<K> {
        let used = self.evictable();
        let Some(excess) = (used + incoming).checked_sub(capacity).filter(|x| *x > 0) else {
            return Vec::new();
        };
        self.oldest(excess, keep)
    }

    /// Unprotected entries, oldest first, until at least `bytes` are
    /// freed (or none is left), never one in `keep`.
    pub fn oldest(&self, bytes: u64, keep: &[K]) -> Vec<K> {
        let mut v: Vec<(&K, &Entry)> = self
            .entries
            .iter()
            .filter(|(k, e)| !e.protected && !keep.contains(k))
            .collect();
        v.sort_by_key(|(k, e)| (e.used, **k));
        let mut freed = 0;
        let mut out = Vec::new();
        for (k, e) in v {
            if freed >= bytes {
                break;
            }
            freed += e.bytes;
            out.push(*k);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_from_param_device_or_default() {
        assert_eq!(budget_bytes(Some("24"), Some(8.0)).0, 24 << 20);
        assert_eq!(budget_bytes(Some("0.5"), None).0, 512 << 10);
        // Bad values fall back to the device memory, then the default.
        assert_eq!(budget_bytes(Some("-3"), Some(8.0)).0, 1 << 30);
        assert_eq!(budget_bytes(Some("lots"), None).0, DEFAULT_BYTES);
        assert_eq!(budget_bytes(None, Some(0.5)).0, MIN_AUTO_BYTES);
        assert_eq!(budget_bytes(None, Some(64.0)).0, MAX_AUTO_BYTES);
        assert_eq!(
            query_param("?model=x&budget_mb=64", "budget_mb"),
            Some("64")
        );
        assert_eq!(query_param("?budget_mbx=1", "budget_mb"), None);
        assert_eq!(query_param("?budget_mb=", "budget_mb"), None);
    }

    #[test]
    fn evicts_least_recently_used_unprotected_only() {
        let mut l = ByteLru::new();
        l.insert(1u32, 100, true); // a router: never evicted
        l.insert(2, 40, false);
        l.insert(3, 40, false);
        l.insert(4, 40, false);
        assert_eq!((l.total(), l.evictable()), (220, 120));
        assert!(l.touch(&2));
        // 30 more into a capacity of 130 → 30 must go: the oldest is 3.
        assert_eq!(l.evict_for(30, 130, &[]), vec![3]);
        // 100 more → 90 must go: 3, 4 and then 2 (used last).
        assert_eq!(l.evict_for(100, 130, &[]), vec![3, 4, 2]);
        // Kept keys are skipped, and a capacity below the protected bytes
        // only ever evicts unprotected entries.
        assert_eq!(l.evict_for(0, 0, &[4]), vec![3, 2]);
        assert!(l.evict_for(10, 1000, &[]).is_empty());
        assert!(l.remove(&3));
        assert!(!l.remove(&3));
        assert_eq!((l.len(), l.total()), (3, 180));
        // Re-inserting replaces the size.
        l.insert(2, 10, false);
        assert_eq!(l.total(), 150);
        assert!(!l.touch(&9));
    }
}
