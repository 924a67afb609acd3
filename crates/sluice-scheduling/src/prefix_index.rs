//! The approximate prefix-cache index: which endpoint has recently seen which prompt block.
//!
//! Shared by every request in a picker, so it is built for concurrent readers:
//!
//! - block hash ⇒ endpoints lives in 64 shards, each behind its own `RwLock`. A block goes
//!   to the shard of its chain's *first* block: every block of a request's chain then sits in
//!   one shard, so a match takes one read lock for the whole walk (not one per block) and an
//!   insert one write lock, which keeps lock traffic — the contended cache lines — per
//!   request constant. (Chained hashes make a block's first block unique, and distinct system
//!   prompts or conversations spread over the shards.)
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
    #[inline]
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
    /// The shard holding this block's entry.
    shard: u8,
}

/// A bounded LRU set of block hashes: a slab of nodes in a doubly linked list plus a map.
#[derive(Debug)]
struct Lru {
    map: HashMap<u64, u32, PassThrough>,
    nodes: Vec<Node>,
    /// Slots of evicted nodes, reused before the slab grows.
    free: Vec<u32>,
    head: u32, // most recent
    tail: u32, // least recent
    capacity: usize,
}

impl Lru {
    fn new(capacity: usize) -> Self {
        Lru {
            map: HashMap::with_hasher(PassThrough),
            nodes: Vec::new(),
            free: Vec::new(),
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

    /// Marks `hash` most recent. Returns (whether it is new, the block evicted to make room
    /// with its shard).
    fn touch(&mut self, hash: u64, shard: u8) -> (bool, Option<(u64, u8)>) {
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
            let Node {
                hash: old,
                shard: old_shard,
                ..
            } = self.nodes[i as usize];
            self.unlink(i);
            self.map.remove(&old);
            self.nodes[i as usize].hash = hash;
            self.nodes[i as usize].shard = shard;
            self.push_front(i);
            self.map.insert(hash, i);
            return (true, Some((old, old_shard)));
        }
        let node = Node {
            hash,
            prev: NIL,
            next: NIL,
            shard,
        };
        let i = match self.free.pop() {
            Some(i) => {
                self.nodes[i as usize] = node;
                i
            }
            None => {
                self.nodes.push(node);
                (self.nodes.len() - 1) as u32
            }
        };
        self.push_front(i);
        self.map.insert(hash, i);
        (true, None)
    }

    /// Evicts least-recent entries until at most `capacity` remain.
    fn shrink_to(&mut self, capacity: usize, evicted: &mut Vec<(u64, u8)>) {
        self.capacity = capacity.max(1);
        while self.map.len() > self.capacity && self.tail != NIL {
            let i = self.tail;
            let Node { hash, shard, .. } = self.nodes[i as usize];
            self.unlink(i);
            self.map.remove(&hash);
            self.free.push(i);
            evicted.push((hash, shard));
        }
    }

    /// Removes everything, returning every block with its shard.
    fn drain(&mut self, evicted: &mut Vec<(u64, u8)>) {
        evicted.extend(
            self.map
                .values()
                .map(|&i| (self.nodes[i as usize].hash, self.nodes[i as usize].shard)),
        );
        self.map.clear();
        self.nodes.clear();
        self.free.clear();
        self.head = NIL;
        self.tail = NIL;
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

    /// Records that `endpoint` has seen `hashes` (a request's chained block hashes from its
    /// first block, in prompt order), keeping at most `capacity` blocks for it.
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
        let root = shard_of(hashes[0]);
        let mut added = Vec::new();
        for &h in hashes.iter().rev() {
            let (new, out) = lru.touch(h, root as u8);
            if new {
                added.push(h);
            }
            if let Some(o) = out {
                evicted.push(o);
            }
        }
        // Still under the LRU lock, so that a concurrent insert for this endpoint cannot
        // interleave and leave the shards disagreeing with the LRU.
        self.remove_entries(server.id, &mut evicted);
        // A chain longer than the capacity evicts some of its own new blocks before the
        // call ends: they must not reach the shard (an entry the LRU no longer holds would
        // count as a match and never be removed).
        if hashes.len() > lru.capacity {
            added.retain(|h| lru.map.contains_key(h));
        }
        if !added.is_empty() {
            let mut shard = self.shards[root].write();
            for h in added {
                shard
                    .entry(h)
                    .and_modify(|s| s.insert(server.id))
                    .or_insert(EpSet::One(server.id));
            }
        }
    }

    /// Removes `id` from the entries of `blocks`, taking each shard's lock once.
    fn remove_entries(&self, id: u32, blocks: &mut [(u64, u8)]) {
        blocks.sort_unstable_by_key(|&(_, s)| s);
        for group in blocks.chunk_by(|a, b| a.1 == b.1) {
            let mut shard = self.shards[usize::from(group[0].1)].write();
            for &(h, _) in group {
                if let Some(set) = shard.get_mut(&h)
                    && set.remove(id)
                {
                    shard.remove(&h);
                }
            }
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
        out.reserve(endpoints.size_hint().0);
        // Dense server id ⇒ position in `endpoints`.
        let mut alive: Vec<(u32, usize)> = Vec::with_capacity(endpoints.size_hint().0);
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
        let Some(&first) = hashes.first() else { return };
        // The whole chain lives in its first block's shard: one read lock for the walk.
        let shard = self.shards[shard_of(first)].read();
        for (step, &h) in hashes.iter().enumerate() {
            if alive.is_empty() {
                break;
            }
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
            lru.drain(&mut evicted);
            self.remove_entries(server.id, &mut evicted);
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
    fn chains_in_different_shards_evict_cleanly() {
        let ix = PrefixIndex::new();
        let chain = |shard: u64, n: u64| {
            (0..n)
                .map(|i| (shard << 58) | (i + 1))
                .collect::<Vec<u64>>()
        };
        let (a, b, c) = (chain(5, 4), chain(9, 4), chain(63, 4));
        ix.insert(&key("x"), &a, 8);
        ix.insert(&key("x"), &b, 8);
        ix.insert(&key("y"), &a, 8);
        // Evicts the four blocks of chain a from x (its oldest), in shard 5.
        ix.insert(&key("x"), &c, 8);
        assert_eq!(ix.len(), 12);
        assert_eq!(ix.distinct_blocks(), 12, "a's blocks remain for y only");
        assert_eq!(matched(&ix, &a, &["x", "y"]), vec![0, 4]);
        assert_eq!(matched(&ix, &b, &["x", "y"]), vec![4, 0]);
        assert_eq!(matched(&ix, &c, &["x", "y"]), vec![4, 0]);
        ix.retain(&|k| &*k.pod == "y");
        assert_eq!(ix.distinct_blocks(), 4);
    }

    #[test]
    fn evicted_slots_are_reused() {
        let ix = PrefixIndex::new();
        for round in 0..50u64 {
            let chain: Vec<u64> = (0..10).map(|i| (round << 32) | i).collect();
            ix.insert(&key("a"), &chain, 10 + (round as usize % 3));
        }
        let t = ix.servers.read();
        let lru = t.by_key.get(&key("a")).unwrap().lru.lock();
        assert!(lru.nodes.len() <= 12, "slab grew to {}", lru.nodes.len());
    }

    #[test]
    fn a_chain_longer_than_the_capacity_keeps_only_what_the_lru_holds() {
        let ix = PrefixIndex::new();
        // Touched last-to-first: 6, 5, 4, 3 fill the LRU, then 2 and 1 evict 6 and 5.
        ix.insert(&key("a"), &[1, 2, 3, 4, 5, 6], 4);
        assert_eq!(ix.len(), 4);
        assert_eq!(matched(&ix, &[1, 2, 3, 4, 5, 6], &["a"]), vec![4]);
        assert_eq!(ix.distinct_blocks(), 4, "evicted blocks left in the shards");
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

    /// The index's specification, written plainly: per endpoint, an LRU list of blocks
    /// (most recent first) holding at most its capacity; a match counts, per candidate,
    /// the consecutive blocks from the first that its list holds.
    #[derive(Default)]
    struct Model {
        lists: HashMap<EndpointKey, (Vec<u64>, usize)>,
    }

    impl Model {
        fn insert(&mut self, k: &EndpointKey, hashes: &[u64], capacity: usize) {
            let capacity = capacity.clamp(1, MAX_BLOCKS_PER_ENDPOINT);
            let (list, cap) = self.lists.entry(k.clone()).or_default();
            *cap = capacity;
            for &h in hashes.iter().rev() {
                list.retain(|&x| x != h);
                list.insert(0, h);
            }
            list.truncate(*cap);
        }

        fn matched(&self, hashes: &[u64], keys: &[EndpointKey]) -> Vec<u32> {
            keys.iter()
                .map(|k| match self.lists.get(k) {
                    Some((list, _)) => {
                        hashes.iter().take_while(|h| list.contains(h)).count() as u32
                    }
                    None => 0,
                })
                .collect()
        }
    }

    #[test]
    fn random_traffic_matches_the_plain_model() {
        use rand::rngs::SmallRng;
        use rand::{Rng, SeedableRng};
        // Chained hashes over a 3-token alphabet and 2 models, so prompts share prefixes
        // the way conversations and system prompts do.
        let chain = |rng: &mut SmallRng| -> Vec<u64> {
            let mut h = xxhash_rust::xxh64::xxh64(&[rng.random_range(0..2u8)], 0);
            (0..rng.random_range(1..10))
                .map(|_| {
                    let token = rng.random_range(0..3u8);
                    h = xxhash_rust::xxh64::xxh64(&[&h.to_le_bytes()[..], &[token]].concat(), 0);
                    h
                })
                .collect()
        };
        for seed in 0..20 {
            let mut rng = SmallRng::seed_from_u64(seed);
            let pods: Vec<EndpointKey> = (0..6).map(|i| key(&format!("p{i}"))).collect();
            let (ix, mut model) = (PrefixIndex::new(), Model::default());
            for step in 0..600 {
                let hashes = chain(&mut rng);
                match rng.random_range(0..10) {
                    0..=4 => {
                        let k = &pods[rng.random_range(0..pods.len())];
                        let cap = rng.random_range(4..24);
                        ix.insert(k, &hashes, cap);
                        model.insert(k, &hashes, cap);
                    }
                    5 if step % 50 == 0 => {
                        let gone = pods[rng.random_range(0..pods.len())].clone();
                        ix.retain(&|k| *k != gone);
                        model.lists.remove(&gone);
                    }
                    _ => {
                        // Candidates: a random subset in random order, with duplicates and
                        // an endpoint the index never saw.
                        let mut keys: Vec<EndpointKey> = (0..rng.random_range(0..8))
                            .map(|_| pods[rng.random_range(0..pods.len())].clone())
                            .collect();
                        if rng.random_bool(0.3) {
                            keys.push(key("unknown"));
                        }
                        let mut got = Vec::new();
                        ix.match_prefix(&hashes, keys.iter(), &mut got);
                        assert_eq!(
                            got,
                            model.matched(&hashes, &keys),
                            "seed {seed} step {step}"
                        );
                    }
                }
            }
            let held: usize = model.lists.values().map(|(l, _)| l.len()).sum();
            assert_eq!(ix.len(), held, "seed {seed}");
            let distinct: std::collections::HashSet<u64> =
                model.lists.values().flat_map(|(l, _)| l).copied().collect();
            assert_eq!(
                ix.distinct_blocks(),
                distinct.len(),
                "seed {seed}: stale entries"
            );
        }
    }
}
