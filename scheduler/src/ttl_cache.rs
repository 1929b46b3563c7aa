//! What a scheduler read from its database and may trust for a while (an API key's caller, a
//! tenant's quotas): shared by its requests, each entry trusted for a fixed time after it was
//! read, so that a change made on any scheduler holds on all of them within that time.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A cache of values read at a known time, each trusted for `ttl` after it.
pub struct TtlCache<K, V> {
    entries: Arc<Mutex<HashMap<K, (Instant, V)>>>,
    ttl: Duration,
    capacity: usize,
}

impl<K, V> Clone for TtlCache<K, V> {
    fn clone(&self) -> Self {
        Self {
            entries: self.entries.clone(),
            ttl: self.ttl,
            capacity: self.capacity,
        }
    }
}

impl<K: Eq + Hash, V: Clone> TtlCache<K, V> {
    /// Returns an empty cache trusting each entry for `ttl`, holding at most `capacity`
    /// entries (past it, it starts afresh).
    pub fn new(ttl: Duration, capacity: usize) -> Self {
        Self {
            entries: Arc::default(),
            ttl,
            capacity,
        }
    }

    /// Returns the value of `key` if it was read less than the cache's time ago.
    pub fn get<Q>(&self, key: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Eq + Hash + ?Sized,
    {
        let now = Instant::now();
        taskfleet_common::sync::lock(&self.entries)
            .get(key)
            .filter(|(read_at, _)| now.duration_since(*read_at) < self.ttl)
            .map(|(_, value)| value.clone())
    }

    /// Keeps `value` for `key`, as read at `read_at` (taken before the read, so that it is
    /// never trusted longer than the cache's time after the database said it).
    pub fn insert(&self, key: K, value: V, read_at: Instant) {
        let mut entries = taskfleet_common::sync::lock(&self.entries);
        if entries.len() >= self.capacity {
            entries.clear();
        }
        entries.insert(key, (read_at, value));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_trusted_for_the_cache_time_only() {
        let cache: TtlCache<String, u32> = TtlCache::new(Duration::from_millis(50), 2);
        let now = Instant::now();
        cache.insert("a".to_owned(), 1, now);
        assert_eq!(cache.get("a"), Some(1));
        cache.insert("b".to_owned(), 2, now - Duration::from_millis(60));
        assert_eq!(cache.get("b"), None);
        // At capacity, it starts afresh.
        cache.insert("c".to_owned(), 3, now);
        assert_eq!(cache.get("a"), None);
        assert_eq!(cache.get("c"), Some(3));
    }
}
