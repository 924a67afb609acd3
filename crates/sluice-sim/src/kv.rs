//! The paged KV cache: a fixed number of blocks, reference-counted prefix-cache blocks and an
//! LRU of unreferenced cached blocks that are reused before they are evicted (vLLM's automatic
//! prefix caching, v1 block pool).

use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasherDefault, Hasher};

/// Block hashes are already uniformly distributed (xxh64), so hashing them again is waste.
#[derive(Debug, Default)]
pub(crate) struct IdentityHasher(u64);

impl Hasher for IdentityHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 << 8) | u64::from(*b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

type IdMap<V> = HashMap<u64, V, BuildHasherDefault<IdentityHasher>>;

#[derive(Debug, Clone, Copy)]
struct Entry {
    refs: u32,
    /// Position in the LRU when `refs == 0`.
    tick: u64,
}

/// Block accounting for one simulated server.
#[derive(Debug)]
pub(crate) struct KvCache {
    num_blocks: u32,
    /// Blocks that cannot be reused: private blocks plus cached blocks with references.
    pinned: u32,
    cached: IdMap<Entry>,
    /// Unreferenced cached blocks, oldest first; evicted when a private block is needed.
    lru: BTreeMap<u64, u64>,
    tick: u64,
    /// Cached blocks dropped to make room (for tests and metrics).
    pub(crate) evictions: u64,
}

impl KvCache {
    pub(crate) fn new(num_blocks: u32) -> Self {
        Self {
            num_blocks,
            pinned: 0,
            cached: IdMap::default(),
            lru: BTreeMap::new(),
            tick: 0,
            evictions: 0,
        }
    }

    pub(crate) fn num_blocks(&self) -> u32 {
        self.num_blocks
    }

    /// Blocks a new allocation can take (free plus evictable), vLLM's "free blocks".
    pub(crate) fn available(&self) -> u32 {
        self.num_blocks - self.pinned
    }

    /// Share of blocks in use, as `vllm:kv_cache_usage_perc` reports it (evictable cached
    /// blocks count as free).
    pub(crate) fn usage(&self) -> f64 {
        if self.num_blocks == 0 {
            return 0.0;
        }
        f64::from(self.pinned) / f64::from(self.num_blocks)
    }

    /// Whether `hash` is cached (referenced or not).
    pub(crate) fn contains(&self, hash: u64) -> bool {
        self.cached.contains_key(&hash)
    }

    /// Whether `hash` is cached with no references (so touching it consumes an available block).
    pub(crate) fn is_evictable(&self, hash: u64) -> bool {
        self.cached.get(&hash).is_some_and(|e| e.refs == 0)
    }

    /// Takes a reference on a cached block.
    pub(crate) fn touch(&mut self, hash: u64) {
        if let Some(e) = self.cached.get_mut(&hash) {
            if e.refs == 0 {
                self.lru.remove(&e.tick);
                self.pinned += 1;
            }
            e.refs += 1;
        }
    }

    /// Drops a reference on a cached block; at zero it becomes the newest LRU entry.
    pub(crate) fn release_cached(&mut self, hash: u64) {
        if let Some(e) = self.cached.get_mut(&hash) {
            if e.refs == 0 {
                return;
            }
            e.refs -= 1;
            if e.refs == 0 {
                self.tick += 1;
                e.tick = self.tick;
                self.lru.insert(self.tick, hash);
                self.pinned -= 1;
            }
        }
    }

    /// Allocates `n` private blocks, evicting the oldest unreferenced cached blocks if the free
    /// pool is short. Returns false (allocating nothing) if fewer than `n` are available.
    pub(crate) fn allocate(&mut self, n: u32) -> bool {
        if n > self.available() {
            return false;
        }
        let free_uncached = self.num_blocks - self.pinned - self.lru_len();
        let mut to_evict = n.saturating_sub(free_uncached);
        while to_evict > 0 {
            let Some((_, hash)) = self.lru.pop_first() else {
                break;
            };
            self.cached.remove(&hash);
            self.evictions += 1;
            to_evict -= 1;
        }
        self.pinned += n;
        true
    }

    /// Frees `n` private blocks.
    pub(crate) fn release_private(&mut self, n: u32) {
        self.pinned = self.pinned.saturating_sub(n);
    }

    /// Turns a full private block into a cached one under `hash`, so later requests can reuse it.
    /// Returns false (the block stays private) if the hash is already cached by another request.
    pub(crate) fn promote(&mut self, hash: u64) -> bool {
        if self.cached.contains_key(&hash) {
            return false;
        }
        self.cached.insert(hash, Entry { refs: 1, tick: 0 });
        true
    }

    fn lru_len(&self) -> u32 {
        u32::try_from(self.lru.len()).unwrap_or(u32::MAX)
    }

    /// Drops every cached block (`POST /reset_prefix_cache` in vLLM).
    pub(crate) fn reset_prefix_cache(&mut self) {
        for (_, hash) in std::mem::take(&mut self.lru) {
            self.cached.remove(&hash);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn released_cached_blocks_are_reused_then_evicted_oldest_first() {
        let mut kv = KvCache::new(3);
        assert!(kv.allocate(2));
        assert!(kv.promote(10));
        assert!(kv.promote(11));
        kv.release_cached(10);
        kv.release_cached(11);
        assert_eq!(kv.available(), 3);
        assert!(kv.contains(10) && kv.contains(11));
        // One free block, then the oldest cached block (10) is evicted.
        assert!(kv.allocate(2));
        assert!(!kv.contains(10));
        assert!(kv.contains(11));
        assert_eq!(kv.evictions, 1);
        assert!(!kv.allocate(2));
        kv.touch(11);
        assert_eq!(kv.available(), 0);
        assert!((kv.usage() - 1.0).abs() < 1e-9);
    }
}
