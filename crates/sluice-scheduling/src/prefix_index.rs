//! The approximate prefix-cache index: which endpoint has recently seen which prompt block.
//!
//! Shared by every request in a picker, so it is built for concurrent readers:
//!
//! - block hash ⇒ endpoints lives in 64 shards, each behind its own `RwLock`; matching takes
//!   only read locks, one shard at a time, and never holds two locks;
//! - each endpoint has its own LRU (bounded: its KV-cache block count, or
//!   `lruCapacityPerServer`), behind its own mutex, so inserts for different endpoints do
//!   not contend;
//! - evicting a block from an endpoint's LRU removes the endpoint from that block's entry, so
//!   memory is bounded by the sum of the LRU capacities;
//! - departed endpoints are dropped with [`PrefixIndex::retain`].
//!
//! Lock order is always endpoint table → endpoint LRU → shard, so there is no deadlock.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};
use sluice_core::EndpointKey;

const SHARD_BITS: u32 = 6;
const SHARDS: usize = 1 << SHARD_BITS;

/// The most blocks one endpoint may hold, whatever its metrics claim: a guard against a
/// misreported `num_gpu_blocks` growing the index without bound.
pub const MAX_BLOCKS_PER_ENDPOINT: usize = 1 << 20;

/// A hasher for keys that already are uniformly distributed 64-bit hashes.
#[derive(Clone, Copy, Debug, Default)]
pub struct PassThroughHasher(u64);

impl Hasher for PassThroughHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
}

/// Builds [`PassThroughHasher`]s.
#[derive(Clone, Copy, Debug, Default)]
pub struct PassThrough;

impl BuildHasher for PassThrough {
    type Hasher = PassThroughHasher;
    fn build_hasher(&self) -> PassThroughHasher {
        PassThroughHasher(0)
    }
}

/// The endpoints (by dense id) holding one block; almost always one or two.
#[derive(Clone, Debug)]
enum EpSet {
    One(u32),
    Two(u32, u32),
    Many(Vec<u32>),
}

impl EpSet {
    fn contains(&self, id: u32) -> bool {
        match self {
            EpSet::One(a) => *a == id,
            EpSet::Two(a, b) => *a == id || *b == id,
            EpSet::Many(v) => v.contains(&id),
        }
    }

    fn insert(&mut self, id: u32) {
        if self.contains(id) {
            return;
        }
        *self = match std::mem::replace(self, EpSet::Many(Vec::new())) {
            EpSet::One(a) => EpSet::Two(a, id),
            EpSet::Two(a, b) => EpSet::Many(vec![a, b, id]),
            EpSet::Many(mut v) => {
                v.push(id);
                EpSet::Many(v)
            }
        };
    }

    /// Removes `id`; returns whether the set is now empty.
    fn remove(&mut self, id: u32) -> bool {
        match self {
            EpSet::One(a) => *a == id,
            EpSet::Two(a, b) => {
                if *a == id {
                    *self = EpSet::One(*b);
                } else if *b == id {
                    *self = EpSet::One(*a);
                }
                false
            }
            EpSet::Many(v) => {
                v.retain(|x| *x != id);
                match v.as_slice() {
                    [] => true,
                    [a] => {
                        *self = EpSet::One(*a);
                        false
                    }
                    [a, b] => {
                        *self = EpSet::Two(*a, *b);
                        false
                    }
                    _ => false,
                }
            }
        }
    }
}

const NIL: u32 = u32::MAX;

#[derive(Clone, Copy, Debug)]
struct Node {
    hash: u64,
    prev: u32,
    next: u32,
}

/// A bounded LRU set of block hashes: a slab of nodes in a doubly linked list plus a map.
#[derive(Debug)]
struct Lru {
    map: HashMap<u64, u32, PassThrough>,
    nodes: Vec<Node>,
    head: u32, // most recent
    tail: u32, // least recent
    capacity: usize,
}

impl Lru {
    fn new(capacity: usize) -> Self {
        Lru {
            map: HashMap::with_hasher(PassThrough),
            nodes: Vec::new(),
            head: NIL,
            tail: NIL,
            capacity: capacity.max(1),
        }
    }

    fn unlink(&mut self, i: u32) {
        let Node { prev, next, .. } = self.nodes[i as usize];
        if prev != NIL {
            self.nodes[prev as usize].next = next;
        } else {
            self.head = next;
        }
        if next != NIL {
            self.nodes[next as usize].prev = prev;
        } else {
            self.tail = prev;
        }
    }

    fn push_front(&mut self, i: u32) {
        self.nodes[i as usize].prev = NIL;
        self.nodes[i as usize].next = self.head;
        if self.head != NIL {
            self.nodes[self.head as usize].prev = i;
        }
        self.head = i;
        if self.tail == NIL {
            self.tail = i;
        }
    }

    /// Marks `hash` most recent. Returns (whether it is new, the hash evicted to make room).
    fn touch(&mut self, hash: u64) -> (bool, Option<u64>) {
        if let Some(&i) = self.map.get(&hash) {
            if self.head != i {
                self.unlink(i);
                self.push_front(i);
            }
            return (false, None);
        }
        if self.map.len() >= self.capacity && self.tail != NIL {
            // Reuse the least recent node.
            let i = self.tail;
            let old = self.nodes[i as usize].hash;
            self.unlink(i);
            self.map.remove(&old);
            self.nodes[i as usize].hash = hash;
            self.push_front(i);
            self.map.insert(hash, i);
            return (true, Some(old));
        }
        let i = self.nodes.len() as u32;
        self.nodes.push(Node {
            hash,
            prev: NIL,
            next: NIL,
        });
        self.push_front(i);
        self.map.insert(hash, i);
        (true, None)
    }

    /// Evicts least-recent entries until at most `capacity` remain.
    fn shrink_to(&mut self, capacity: usize, evicted: &mut Vec<u64>) {
        self.capacity = capacity.max(1);
        while self.map.len() > self.capacity && self.tail != NIL {
            let i = self.tail;
            let h = self.nodes[i as usize].hash;
            self.unlink(i);
            self.map.remove(&h);
            evicted.push(h);
        }
        if self.map.is_empty() {
            self.nodes.clear();
            self.head = NIL;
            self.tail = NIL;
        }
    }

    fn len(&self) -> usize {
        self.map.len()
    }
}

#[derive(Debug)]
struct Server {
    id: u32,
    lru: Mutex<Lru>,
}

#[derive(Debug, Default)]
struct ServerTable {
    by_key: HashMap<EndpointKey, Arc<Server>, foldhash::fast::RandomState>,
    free_ids: Vec<u32>,
    next_id: u32,
}

type Shard = RwLock<HashMap<u64, EpSet, PassThrough>>;

/// Block hash ⇒ endpoints that recently saw it, with one bounded LRU per endpoint.
#[derive(Debug)]
pub struct PrefixIndex {
    shards: Box<[Shard]>,
    servers: RwLock<ServerTable>,
}

impl Default for PrefixIndex {
    fn default() -> Self {
        PrefixIndex::new()
    }
}

fn shard_of(hash: u64) -> usize {
    (hash >> (64 - SHARD_BITS)) as usize
}

impl PrefixIndex {
    /// An empty index.
    pub fn new() -> Self {
        PrefixIndex {
            shards: (0..SHARDS)
                .map(|_| RwLock::new(HashMap::with_hasher(PassThrough)))
                .collect(),
            servers: RwLock::new(ServerTable::default()),
        }
    }

    fn server(&self, key: &EndpointKey, capacity: usize) -> Arc<Server> {
        if let Some(s) = self.servers.read().by_key.get(key) {
            return s.clone();
        }
        let mut t = self.servers.write();
        if let Some(s) = t.by_key.get(key) {
            return s.clone();
        }
        let id = match t.free_ids.pop() {
            Some(id) => id,
            None => {
                t.next_id += 1;
                t.next_id - 1
            }
        };
        let s = Arc::new(Server {
            id,
            lru: Mutex::new(Lru::new(capacity)),
        });
        t.by_key.insert(key.clone(), s.clone());
        s
    }

    /// Records that `endpoint` has seen `hashes` (a request's block hashes, in prompt order),
    /// keeping at most `capacity` blocks for it.
    ///
    /// Blocks are touched last-to-first so that the first blocks of a prompt, which more
    /// requests share, are the most recent and evicted last (vLLM frees a sequence's blocks
    /// in the same reverse order).
    pub fn insert(&self, endpoint: &EndpointKey, hashes: &[u64], capacity: usize) {
        if hashes.is_empty() {
            return;
        }
        let capacity = capacity.clamp(1, MAX_BLOCKS_PER_ENDPOINT);
        let server = self.server(endpoint, capacity);
        let mut lru = server.lru.lock();
        let mut evicted = Vec::new();
        if lru.capacity != capacity {
            lru.shrink_to(capacity, &mut evicted);
        }
        let mut added = Vec::with_capacity(hashes.len());
        for &h in hashes.iter().rev() {
            let (new, out) = lru.touch(h);
            if new {
                added.push(h);
            }
            if let Some(o) = out {
                evicted.push(o);
            }
        }
        // Still under the LRU lock, so that a concurrent insert for this endpoint cannot
        // interleave and leave the shards disagreeing with the LRU.
        for h in evicted {
            let mut shard = self.shards[shard_of(h)].write();
            if let Some(set) = shard.get_mut(&h)
                && set.remove(server.id)
            {
                shard.remove(&h);
            }
        }
        for h in added {
            let mut shard = self.shards[shard_of(h)].write();
            shard
                .entry(h)
                .and_modify(|s| s.insert(server.id))
                .or_insert(EpSet::One(server.id));
        }
    }

    /// For each endpoint in `endpoints`, how many of `hashes` it holds consecutively from the
    /// first; written into `out` (resized to `endpoints.len()`). Walking stops at the first
    /// block no listed endpoint holds.
    pub fn match_prefix<'a>(
        &self,
        hashes: &[u64],
        endpoints: impl Iterator<Item = &'a EndpointKey>,
        out: &mut Vec<u32>,
    ) {
        out.clear();
        // Dense server id ⇒ position in `endpoints`.
        let mut alive: Vec<(u32, usize)> = Vec::new();
        let ids;
        {
            let t = self.servers.read();
            ids = t.next_id as usize;
            for (pos, key) in endpoints.enumerate() {
                out.push(0);
                if let Some(s) = t.by_key.get(key) {
                    alive.push((s.id, pos));
                }
            }
        }
        // For blocks many endpoints hold, mark the holders (generation = block number) so the
        // intersection costs O(alive + holders) instead of O(alive × holders).
        let mut marks: Vec<u32> = Vec::new();
        for (step, &h) in hashes.iter().enumerate() {
            if alive.is_empty() {
                break;
            }
            let shard = self.shards[shard_of(h)].read();
            let Some(set) = shard.get(&h) else { break };
            match set {
                EpSet::Many(v) if alive.len() > 2 => {
                    if marks.is_empty() {
                        marks.resize(ids, u32::MAX);
                    }
                    let generation = step as u32;
                    for &id in v {
                        if let Some(m) = marks.get_mut(id as usize) {
                            *m = generation;
                        }
                    }
                    alive.retain(|&(id, _)| marks.get(id as usize) == Some(&generation));
                }
                _ => alive.retain(|&(id, _)| set.contains(id)),
            }
            drop(shard);
            for &(_, pos) in &alive {
                out[pos] += 1;
            }
        }
    }

    /// Forgets every endpoint for which `keep` is false.
    pub fn retain(&self, keep: &dyn Fn(&EndpointKey) -> bool) {
        let mut t = self.servers.write();
        let gone: Vec<EndpointKey> = t.by_key.keys().filter(|k| !keep(k)).cloned().collect();
        for key in gone {
            let Some(server) = t.by_key.remove(&key) else {
                continue;
            };
            let mut lru = server.lru.lock();
            let mut evicted = Vec::with_capacity(lru.len());
            lru.shrink_to(0, &mut evicted);
            // shrink_to keeps one slot; drop the last entry too.
            evicted.extend(lru.map.keys().copied());
            lru.map.clear();
            lru.nodes.clear();
            for h in evicted {
                let mut shard = self.shards[shard_of(h)].write();
                if let Some(set) = shard.get_mut(&h)
                    && set.remove(server.id)
                {
                    shard.remove(&h);
                }
            }
            t.free_ids.push(server.id);
        }
    }

    /// Number of endpoints tracked.
    pub fn endpoints(&self) -> usize {
        self.servers.read().by_key.len()
    }

    /// Number of (block, endpoint) entries: the index's size.
    pub fn len(&self) -> usize {
        let servers: Vec<Arc<Server>> = self.servers.read().by_key.values().cloned().collect();
        servers.iter().map(|s| s.lru.lock().len()).sum()
    }

    /// Whether the index is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Number of distinct block hashes held by at least one endpoint.
    pub fn distinct_blocks(&self) -> usize {
        self.shards.iter().map(|s| s.read().len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(pod: &str) -> EndpointKey {
        EndpointKey {
            namespace: "ns".into(),
            pod: pod.into(),
            rank: 0,
        }
    }

    fn matched(ix: &PrefixIndex, hashes: &[u64], pods: &[&str]) -> Vec<u32> {
        let keys: Vec<EndpointKey> = pods.iter().map(|p| key(p)).collect();
        let mut out = Vec::new();
        ix.match_prefix(hashes, keys.iter(), &mut out);
        out
    }

    #[test]
    fn counts_consecutive_blocks_from_the_start() {
        let ix = PrefixIndex::new();
        ix.insert(&key("a"), &[1, 2, 3, 4], 100);
        ix.insert(&key("b"), &[1, 2], 100);
        assert_eq!(matched(&ix, &[1, 2, 3, 9], &["a", "b", "c"]), vec![3, 2, 0]);
        // The walk stops at the first block nobody holds, even if later ones are held.
        assert_eq!(matched(&ix, &[9, 2, 3], &["a", "b"]), vec![0, 0]);
    }

    #[test]
    fn many_holders_intersect_correctly() {
        let ix = PrefixIndex::new();
        let pods: Vec<String> = (0..8).map(|i| format!("p{i}")).collect();
        for (i, p) in pods.iter().enumerate() {
            // p_i holds the first i+1 blocks.
            let blocks: Vec<u64> = (1..=(i as u64 + 1)).collect();
            ix.insert(&key(p), &blocks, 100);
        }
        let names: Vec<&str> = pods.iter().map(String::as_str).rev().collect();
        assert_eq!(
            matched(&ix, &[1, 2, 3, 4, 5, 6, 7, 8, 9], &names),
            vec![8, 7, 6, 5, 4, 3, 2, 1]
        );
    }

    #[test]
    fn lru_evicts_tail_blocks_first_and_cleans_the_shards() {
        let ix = PrefixIndex::new();
        ix.insert(&key("a"), &[1, 2, 3], 3);
        ix.insert(&key("a"), &[10, 11], 3);
        // 10 and 11 are newest; of 1,2,3 the prefix block 1 was touched last, so 3 and 2 go.
        assert_eq!(ix.len(), 3);
        assert_eq!(matched(&ix, &[1, 2], &["a"]), vec![1]);
        assert_eq!(matched(&ix, &[10, 11], &["a"]), vec![2]);
        assert_eq!(ix.distinct_blocks(), 3);
    }

    #[test]
    fn shrinking_capacity_evicts() {
        let ix = PrefixIndex::new();
        ix.insert(&key("a"), &[1, 2, 3, 4, 5], 10);
        ix.insert(&key("a"), &[1], 2);
        assert_eq!(ix.len(), 2);
        assert_eq!(ix.distinct_blocks(), 2);
    }

    #[test]
    fn departed_endpoints_are_forgotten_and_ids_reused() {
        let ix = PrefixIndex::new();
        ix.insert(&key("a"), &[1, 2], 10);
        ix.insert(&key("b"), &[1, 2], 10);
        ix.retain(&|k| &*k.pod != "a");
        assert_eq!(ix.endpoints(), 1);
        assert_eq!(ix.len(), 2);
        assert_eq!(matched(&ix, &[1, 2], &["a", "b"]), vec![0, 2]);
        // A new endpoint reuses a's id and must not inherit its blocks.
        ix.insert(&key("c"), &[7], 10);
        assert_eq!(matched(&ix, &[1, 2], &["c", "b"]), vec![0, 2]);
        ix.retain(&|_| false);
        assert!(ix.is_empty());
        assert_eq!(ix.distinct_blocks(), 0);
    }
}
