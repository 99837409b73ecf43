//! In-memory state: a TTL set for dedupe (the hot path) and a bounded TTL
//! store implementing `StateStore` for local runs and tests.
//!
//! Both are bounded: when full, the oldest entry is evicted first (and
//! counted), never an unbounded growth.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    sync::Mutex,
    time::Duration,
};

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};

use super::{StateError, StateStore};

/// Identities with an expiry, bounded by `max` (oldest evicted first).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct TtlSet {
    #[serde(skip)]
    max: usize,
    /// id -> expires at (ms)
    entries: foldhash::HashMap<String, i64>,
    /// insertion order, for expiry and eviction; may hold stale ids
    order: VecDeque<(i64, String)>,
}

impl TtlSet {
    pub fn new(max: usize) -> Self {
        Self { max: max.max(1), ..Default::default() }
    }

    pub fn set_bound(&mut self, max: usize) {
        self.max = max.max(1);
    }

    /// True when `id` is new or expired (and is now remembered for `ttl`).
    pub fn insert(&mut self, id: String, now: i64, ttl: i64) -> bool {
        self.expire(now);
        if let Some(exp) = self.entries.get(&id)
            && *exp > now
        {
            return false;
        }
        let expires = now.saturating_add(ttl);
        while self.entries.len() >= self.max.max(1) {
            match self.order.pop_front() {
                Some((exp, old)) => {
                    if self.entries.get(&old) == Some(&exp) {
                        self.entries.remove(&old);
                    }
                }
                None => break,
            }
        }
        self.entries.insert(id.clone(), expires);
        self.order.push_back((expires, id));
        true
    }

    fn expire(&mut self, now: i64) {
        while let Some((exp, _)) = self.order.front() {
            if *exp > now {
                break;
            }
            if let Some((exp, id)) = self.order.pop_front()
                && self.entries.get(&id) == Some(&exp)
            {
                self.entries.remove(&id);
            }
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

struct Entry {
    value: Vec<u8>,
    expires: Option<std::time::Instant>,
    inserted: u64,
}

#[derive(Default)]
struct Inner {
    map: HashMap<String, Entry>,
    /// insertion sequence -> key, for evicting the oldest
    by_age: BTreeMap<u64, String>,
    next: u64,
    evicted: u64,
}

/// A bounded in-memory `StateStore` with TTLs (lazy expiry on access).
pub struct MemoryStore {
    max_keys: usize,
    inner: Mutex<Inner>,
    /// Keys held (including not yet collected expired ones): the size metric.
    size: Option<prometheus::IntGauge>,
}

impl MemoryStore {
    pub fn new(max_keys: usize) -> Self {
        Self { max_keys: max_keys.max(1), inner: Mutex::new(Inner::default()), size: None }
    }

    /// Report the number of keys held on `gauge` (e.g. `sluice_state_keys`).
    pub fn with_size_gauge(mut self, gauge: prometheus::IntGauge) -> Self {
        self.size = Some(gauge);
        self
    }

    fn report(&self, inner: &Inner) {
        if let Some(g) = &self.size {
            g.set(i64::try_from(inner.map.len()).unwrap_or(i64::MAX));
        }
    }

    /// Live keys: the state-size metric.
    pub fn len(&self) -> usize {
        let now = std::time::Instant::now();
        self.lock().map.values().filter(|e| e.expires.is_none_or(|x| x > now)).count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Entries evicted because the bound was reached.
    pub fn evicted(&self) -> u64 {
        self.lock().evicted
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A poisoned lock only means another thread panicked mid-update of a
        // cache; the map itself is still valid.
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn put_sync(&self, key: String, value: Vec<u8>, ttl: Option<Duration>) {
        let mut inner = self.lock();
        let expires = ttl.map(|t| std::time::Instant::now() + t);
        let seq = inner.next;
        inner.next += 1;
        if let Some(old) = inner.map.insert(key.clone(), Entry { value, expires, inserted: seq }) {
            inner.by_age.remove(&old.inserted);
        }
        inner.by_age.insert(seq, key);
        while inner.map.len() > self.max_keys {
            let Some((_, oldest)) = inner.by_age.pop_first() else { break };
            inner.map.remove(&oldest);
            inner.evicted += 1;
        }
        self.report(&inner);
    }

    fn get_sync(&self, key: &str) -> Option<Vec<u8>> {
        let mut inner = self.lock();
        let live = inner.map.get(key).map(|e| e.expires.is_none_or(|x| x > std::time::Instant::now()))?;
        if !live {
            if let Some(e) = inner.map.remove(key) {
                inner.by_age.remove(&e.inserted);
            }
            self.report(&inner);
            return None;
        }
        inner.map.get(key).map(|e| e.value.clone())
    }
}

impl StateStore for MemoryStore {
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Vec<u8>>, StateError>> {
        Box::pin(async move { Ok(self.get_sync(key)) })
    }

    fn put_many<'a>(
        &'a self,
        entries: Vec<(String, Vec<u8>)>,
        ttl: Option<Duration>,
    ) -> BoxFuture<'a, Result<(), StateError>> {
        Box::pin(async move {
            for (k, v) in entries {
                self.put_sync(k, v, ttl);
            }
            Ok(())
        })
    }

    fn merge<'a>(&'a self, key: &'a str, delta: i64, ttl: Option<Duration>) -> BoxFuture<'a, Result<i64, StateError>> {
        Box::pin(async move {
            let current = match self.get_sync(key) {
                None => 0,
                Some(bytes) => std::str::from_utf8(&bytes)
                    .ok()
                    .and_then(|s| s.parse::<i64>().ok())
                    .ok_or_else(|| StateError::NotAnInteger { key: key.to_string() })?,
            };
            let next = current.saturating_add(delta);
            self.put_sync(key.to_string(), next.to_string().into_bytes(), ttl);
            Ok(next)
        })
    }

    fn expire<'a>(&'a self, key: &'a str, ttl: Duration) -> BoxFuture<'a, Result<bool, StateError>> {
        Box::pin(async move {
            if self.get_sync(key).is_none() {
                return Ok(false);
            }
            let mut inner = self.lock();
            if let Some(e) = inner.map.get_mut(key) {
                e.expires = Some(std::time::Instant::now() + ttl);
            }
            Ok(true)
        })
    }

    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<(), StateError>> {
        Box::pin(async move {
            let mut inner = self.lock();
            if let Some(e) = inner.map.remove(key) {
                inner.by_age.remove(&e.inserted);
            }
            self.report(&inner);
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn ttl_set_expires_and_stays_bounded() {
        let mut s = TtlSet::new(2);
        assert!(s.insert("a".into(), 0, 10));
        assert!(!s.insert("a".into(), 5, 10));
        assert!(s.insert("b".into(), 5, 10));
        assert!(s.insert("c".into(), 6, 10), "evicts a");
        assert_eq!(s.len(), 2);
        assert!(s.insert("a".into(), 7, 10), "a was evicted");
        assert!(s.insert("b".into(), 100, 10), "b expired");
    }

    #[tokio::test]
    async fn memory_store_gets_puts_merges_and_expires() {
        let gauge = prometheus::IntGauge::new("keys", "keys").unwrap();
        let s = MemoryStore::new(3).with_size_gauge(gauge.clone());
        s.put("a", b"1".to_vec(), None).await.unwrap();
        assert_eq!(s.get("a").await.unwrap(), Some(b"1".to_vec()));
        assert_eq!(s.merge("a", 4, None).await.unwrap(), 5);
        assert_eq!(s.merge("n", -2, None).await.unwrap(), -2);
        assert!(s.expire("a", Duration::ZERO).await.unwrap());
        assert_eq!(s.get("a").await.unwrap(), None);
        assert!(!s.expire("zzz", Duration::from_secs(1)).await.unwrap());
        for k in ["x", "y", "z", "w"] {
            s.put(k, vec![], None).await.unwrap();
        }
        assert_eq!(s.len(), 3, "bounded");
        assert_eq!(gauge.get(), 3, "the size metric follows");
        assert!(s.evicted() >= 1);
        assert_eq!(s.get("n").await.unwrap(), None, "oldest evicted first");
    }

    proptest! {
        /// The set agrees with a map of expiries whenever the bound is not hit.
        #[test]
        fn ttl_set_matches_a_model(ops in prop::collection::vec((0u8..6, 0i64..5, 1i64..20), 0..60)) {
            let mut s = TtlSet::new(1000);
            let mut model: HashMap<String, i64> = HashMap::new();
            let mut now = 0;
            for (id, dt, ttl) in ops {
                now += dt;
                let id = format!("id{id}");
                let fresh = model.get(&id).is_none_or(|exp| *exp <= now);
                if fresh {
                    model.insert(id.clone(), now + ttl);
                }
                prop_assert_eq!(s.insert(id, now, ttl), fresh);
            }
        }
    }
}
