//! `prefix-cache-scorer` and `approx-prefix-cache-producer`: approximate prefix-cache
//! affinity from hashed prompt blocks.
//!
//! The producer hashes the prompt into a chain of block hashes (seeded by the target model
//! and `cache_salt`), matches them against the shared [`PrefixIndex`] and stores a
//! [`PrefixMatchInfo`] in the cycle state; the scorer turns it into
//! `matched blocks / total blocks`. After the pick, the request's blocks are recorded for the
//! primary target (and the target of a profile named `prefill`, as upstream does).

use std::sync::Arc;

use serde::Deserialize;
use xxhash_rust::xxh64::Xxh64;

use crate::cycle::{Cycle, keys};
use crate::plugin::{
    DataProducer, EndpointAware, Plugin, PreRequest, Scorer, ScorerCategory, TypedName,
};
use crate::prefix_index::PrefixIndex;
use crate::registry::PluginInit;
use crate::types::{Candidate, LlmRequest, PluginError, SchedulingResult};

/// Characters per token assumed when sizing blocks in bytes (upstream's estimate).
pub const CHARS_PER_TOKEN: usize = 4;

/// Parameters of the prefix plugins, with upstream's names and defaults.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct PrefixParams {
    /// Take the block size and LRU size from the endpoints' metrics when they report them.
    pub auto_tune: bool,
    /// Block size in tokens when not auto-tuned.
    pub block_size_tokens: Option<usize>,
    /// Deprecated block size in characters; only accepted together with `blockSizeTokens`.
    pub block_size: Option<usize>,
    /// v1.0.0's block size in characters; ignored (v1.5.0 ignores it too).
    pub hash_block_size: Option<usize>,
    /// At most this many blocks are hashed and matched.
    pub max_prefix_blocks_to_match: usize,
    /// If > 0, overrides `maxPrefixBlocksToMatch` as `maxPrefixTokensToMatch / blockSizeTokens`.
    pub max_prefix_tokens_to_match: usize,
    /// Blocks remembered per endpoint when its metrics do not report a KV-cache size.
    pub lru_capacity_per_server: usize,
}

impl Default for PrefixParams {
    fn default() -> Self {
        PrefixParams {
            auto_tune: true,
            block_size_tokens: None,
            block_size: None,
            hash_block_size: None,
            max_prefix_blocks_to_match: 256,
            max_prefix_tokens_to_match: 0,
            lru_capacity_per_server: 31_250,
        }
    }
}

/// Default block size in tokens.
pub const DEFAULT_BLOCK_SIZE_TOKENS: usize = 16;

impl PrefixParams {
    fn validate(&self) -> Result<(), String> {
        if self.block_size.is_some() && self.block_size_tokens.is_none() {
            return Err("blockSize (characters) is deprecated and only accepted together with blockSizeTokens; expected blockSizeTokens: <tokens per KV-cache block>".to_owned());
        }
        if self.block_size_tokens == Some(0) {
            return Err(
                "blockSizeTokens is 0; expected a block size in tokens > 0 (vLLM's default is 16)"
                    .to_owned(),
            );
        }
        if self.lru_capacity_per_server == 0 {
            return Err("lruCapacityPerServer is 0; expected a number of blocks > 0".to_owned());
        }
        if self.max_prefix_blocks_to_match == 0 && self.max_prefix_tokens_to_match == 0 {
            return Err("maxPrefixBlocksToMatch is 0; expected a number of blocks > 0".to_owned());
        }
        Ok(())
    }
}

/// What the producer found for one request (upstream's `PrefixCacheMatchInfo`), under
/// [`keys::PREFIX_CACHE_MATCH_INFO`] in the cycle state.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PrefixMatchInfo {
    /// The request's block hashes, in prompt order.
    pub hashes: Vec<u64>,
    /// Matched blocks per candidate (parallel to the candidate slice).
    pub matched: Vec<u32>,
    /// Block size used, in tokens.
    pub block_size_tokens: usize,
    /// The producer that wrote this (only it records the blocks after the pick).
    pub producer: Arc<str>,
}

impl PrefixMatchInfo {
    /// Total blocks of the request.
    pub fn total_blocks(&self) -> usize {
        self.hashes.len()
    }

    /// `matched / total` for a candidate index; 0 when the prompt is shorter than a block.
    pub fn score(&self, candidate: usize) -> f64 {
        if self.hashes.is_empty() {
            return 0.0;
        }
        f64::from(self.matched.get(candidate).copied().unwrap_or(0)) / self.hashes.len() as f64
    }
}

/// Hashes `prompt` into chained block hashes (`h0 = xxh64(model ‖ salt)`,
/// `h_i = xxh64(block_i ‖ le64(h_{i−1}))`), full blocks only, at most `max_blocks`.
pub fn block_hashes(
    model: &str,
    cache_salt: Option<&str>,
    prompt: &[u8],
    chars_per_block: usize,
    max_blocks: usize,
    out: &mut Vec<u64>,
) {
    out.clear();
    if chars_per_block == 0 || prompt.len() < chars_per_block {
        return;
    }
    let mut prev = match cache_salt {
        None => xxhash_rust::xxh64::xxh64(model.as_bytes(), 0),
        Some(s) => {
            let mut h = Xxh64::new(0);
            h.update(model.as_bytes());
            h.update(s.as_bytes());
            h.digest()
        }
    };
    let limit = prompt.len().min(max_blocks.saturating_mul(chars_per_block));
    out.reserve(limit / chars_per_block);
    for block in prompt[..limit].chunks_exact(chars_per_block) {
        prev = xxh64_then_u64(block, prev);
        out.push(prev);
    }
}

const P1: u64 = 0x9E37_79B1_85EB_CA87;
const P2: u64 = 0xC2B2_AE3D_27D4_EB4F;
const P3: u64 = 0x1656_67B1_9E37_79F9;
const P4: u64 = 0x85EB_CA77_C2B2_AE63;
const P5: u64 = 0x27D4_EB2F_1656_67C5;

#[inline(always)]
fn xxh_round(acc: u64, input: u64) -> u64 {
    acc.wrapping_add(input.wrapping_mul(P2))
        .rotate_left(31)
        .wrapping_mul(P1)
}

/// One 32-byte stripe into the four accumulators.
#[inline(always)]
fn stripe(v: &mut [u64; 4], s: &[u8; 32]) {
    let lane = |i: usize| {
        let mut w = [0u8; 8];
        w.copy_from_slice(&s[i * 8..i * 8 + 8]);
        u64::from_le_bytes(w)
    };
    v[0] = xxh_round(v[0], lane(0));
    v[1] = xxh_round(v[1], lane(1));
    v[2] = xxh_round(v[2], lane(2));
    v[3] = xxh_round(v[3], lane(3));
}

/// The accumulators after the stripes, merged into one value.
#[inline(always)]
fn converge(v: [u64; 4]) -> u64 {
    let mut h = v[0]
        .rotate_left(1)
        .wrapping_add(v[1].rotate_left(7))
        .wrapping_add(v[2].rotate_left(12))
        .wrapping_add(v[3].rotate_left(18));
    for x in v {
        h = (h ^ xxh_round(0, x)).wrapping_mul(P1).wrapping_add(P4);
    }
    h
}

#[inline(always)]
fn tail_word(h: u64, w: u64) -> u64 {
    (h ^ xxh_round(0, w))
        .rotate_left(27)
        .wrapping_mul(P1)
        .wrapping_add(P4)
}

#[inline(always)]
fn avalanche(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(P2);
    h ^= h >> 29;
    h = h.wrapping_mul(P3);
    h ^ (h >> 32)
}

const XXH_INIT: [u64; 4] = [P1.wrapping_add(P2), P2, 0, 0u64.wrapping_sub(P1)];

/// XXH64 (seed 0) of `block ‖ le64(suffix)`, read in place: the same value as hashing the
/// concatenation, without first copying every block next to its predecessor's hash.
#[inline]
fn xxh64_then_u64(block: &[u8], suffix: u64) -> u64 {
    let total = (block.len() + 8) as u64;
    let (stripes, rest) = block.as_chunks::<32>();
    if rest.is_empty() && !stripes.is_empty() {
        // The usual case (blocks of 8, 16, 32 ... tokens): whole stripes, then the suffix
        // as the one 8-byte tail word.
        let mut v = XXH_INIT;
        for s in stripes {
            stripe(&mut v, s);
        }
        return avalanche(tail_word(converge(v).wrapping_add(total), suffix));
    }
    // What the stripes of `block` leave, followed by the suffix: 8 to 39 bytes.
    let mut tail_buf = [0u8; 40];
    tail_buf[..rest.len()].copy_from_slice(rest);
    tail_buf[rest.len()..rest.len() + 8].copy_from_slice(&suffix.to_le_bytes());
    let tail = &tail_buf[..rest.len() + 8];
    let (mut h, tail) = if total >= 32 {
        let mut v = XXH_INIT;
        for s in stripes {
            stripe(&mut v, s);
        }
        let (extra, tail) = tail.as_chunks::<32>();
        for s in extra {
            stripe(&mut v, s);
        }
        (converge(v), tail)
    } else {
        (P5, tail)
    };
    h = h.wrapping_add(total);
    let (words, tail) = tail.as_chunks::<8>();
    for w in words {
        h = tail_word(h, u64::from_le_bytes(*w));
    }
    let (halves, tail) = tail.as_chunks::<4>();
    for w in halves {
        h ^= u64::from(u32::from_le_bytes(*w)).wrapping_mul(P1);
        h = h.rotate_left(23).wrapping_mul(P2).wrapping_add(P3);
    }
    for &b in tail {
        h ^= u64::from(b).wrapping_mul(P5);
        h = h.rotate_left(11).wrapping_mul(P1);
    }
    avalanche(h)
}

/// The prefix plugin: a producer (and, as `prefix-cache-scorer`, a scorer) over a shared
/// index.
#[derive(Debug)]
pub struct PrefixCachePlugin {
    name: TypedName,
    params: PrefixParams,
    index: Arc<PrefixIndex>,
    scorer: bool,
}

impl PrefixCachePlugin {
    /// A plugin over `index`; `scorer` makes it also a scorer.
    pub fn new(
        name: TypedName,
        params: PrefixParams,
        index: Arc<PrefixIndex>,
        scorer: bool,
    ) -> Self {
        PrefixCachePlugin {
            name,
            params,
            index,
            scorer,
        }
    }

    /// The index (shared with other holders of the `Arc`).
    pub fn index(&self) -> &Arc<PrefixIndex> {
        &self.index
    }

    pub(crate) fn factory(
        scorer: bool,
    ) -> impl Fn(&PluginInit<'_>) -> Result<Arc<dyn Plugin>, String> + Send + Sync {
        move |init| {
            let p: PrefixParams = init.parse().map_err(|e| {
                format!("{e}; expected {{autoTune: bool, blockSizeTokens: int, maxPrefixBlocksToMatch: int, maxPrefixTokensToMatch: int, lruCapacityPerServer: int}}")
            })?;
            p.validate()?;
            if p.hash_block_size.is_some() {
                tracing::warn!(plugin = %init.typed_name, "hashBlockSize is a v1.0.0 parameter and is ignored; use blockSizeTokens");
            }
            // Shared across rebuilds under the instance name, so that a config or endpoint change
            // does not wipe what the index learned.
            let key = format!("prefix-index/{}", init.typed_name.name);
            let index = init.env.shared.get_or_insert_with(&key, PrefixIndex::new);
            Ok(Arc::new(PrefixCachePlugin::new(
                init.typed_name.clone(),
                p,
                index,
                scorer,
            )))
        }
    }

    fn block_size_tokens(&self, candidates: &[Candidate]) -> usize {
        let configured = self
            .params
            .block_size_tokens
            .unwrap_or(DEFAULT_BLOCK_SIZE_TOKENS);
        if self.params.auto_tune
            && let Some(bs) = candidates
                .first()
                .and_then(|c| c.metrics.as_ref())
                .map(|m| m.cache_block_size)
            && bs > 0
        {
            return bs as usize;
        }
        configured
    }

    fn capacity_for(&self, c: &Candidate) -> usize {
        match c.metrics.as_ref().map(|m| m.cache_num_blocks) {
            Some(n) if self.params.auto_tune && n > 0 => usize::try_from(n).unwrap_or(usize::MAX),
            _ => self.params.lru_capacity_per_server,
        }
    }
}

impl Plugin for PrefixCachePlugin {
    fn typed_name(&self) -> &TypedName {
        &self.name
    }
    fn as_scorer(self: Arc<Self>) -> Option<Arc<dyn Scorer>> {
        if self.scorer { Some(self) } else { None }
    }
    fn as_data_producer(self: Arc<Self>) -> Option<Arc<dyn DataProducer>> {
        Some(self)
    }
    fn as_pre_request(self: Arc<Self>) -> Option<Arc<dyn PreRequest>> {
        Some(self)
    }
    fn as_endpoint_aware(self: Arc<Self>) -> Option<Arc<dyn EndpointAware>> {
        Some(self)
    }
}

impl DataProducer for PrefixCachePlugin {
    fn produces(&self) -> &[&'static str] {
        &[keys::PREFIX_CACHE_MATCH_INFO]
    }

    fn produce(
        &self,
        cycle: &mut Cycle,
        request: &LlmRequest,
        candidates: &[Candidate],
    ) -> Result<(), PluginError> {
        // A declared approx-prefix-cache-producer (or another prefix scorer) already did the
        // work for this request.
        if cycle.state.contains(keys::PREFIX_CACHE_MATCH_INFO) {
            return Ok(());
        }
        let bs = self.block_size_tokens(candidates);
        let max_blocks = if self.params.max_prefix_tokens_to_match > 0 {
            self.params.max_prefix_tokens_to_match / bs
        } else {
            self.params.max_prefix_blocks_to_match
        };
        let mut info = PrefixMatchInfo {
            block_size_tokens: bs,
            producer: self.name.name.clone(),
            ..Default::default()
        };
        block_hashes(
            &request.target_model,
            request.cache_salt.as_deref(),
            &request.prompt,
            bs * CHARS_PER_TOKEN,
            max_blocks,
            &mut info.hashes,
        );
        self.index.match_prefix(
            &info.hashes,
            candidates.iter().map(|c| &c.endpoint.key),
            &mut info.matched,
        );
        cycle.state.insert(keys::PREFIX_CACHE_MATCH_INFO, info);
        Ok(())
    }
}

impl Scorer for PrefixCachePlugin {
    fn category(&self) -> ScorerCategory {
        ScorerCategory::Affinity
    }

    fn score(
        &self,
        cycle: &mut Cycle,
        _request: &LlmRequest,
        _candidates: &[Candidate],
        endpoints: &[usize],
        out: &mut [f64],
    ) -> Result<(), PluginError> {
        if let Some(info) = cycle
            .state
            .get::<PrefixMatchInfo>(keys::PREFIX_CACHE_MATCH_INFO)
        {
            for (o, &i) in out.iter_mut().zip(endpoints) {
                *o = info.score(i);
            }
        }
        Ok(())
    }
}

impl PreRequest for PrefixCachePlugin {
    fn pre_request(&self, cycle: &mut Cycle, _request: &LlmRequest, result: &SchedulingResult) {
        let Some(info) = cycle
            .state
            .get::<PrefixMatchInfo>(keys::PREFIX_CACHE_MATCH_INFO)
        else {
            return;
        };
        if info.producer != self.name.name || info.hashes.is_empty() {
            return;
        }
        if let Some(t) = result.targets.first() {
            self.index
                .insert(&t.endpoint.key, &info.hashes, self.capacity_for(t));
        }
        // Upstream hard-codes the profile name `prefill` for P/D (issue #2080).
        if let Some(p) = result
            .profile("prefill")
            .and_then(|r| r.target_candidates.first())
            && result
                .targets
                .first()
                .is_none_or(|t| t.endpoint.key != p.endpoint.key)
        {
            self.index
                .insert(&p.endpoint.key, &info.hashes, self.capacity_for(p));
        }
    }
}

impl EndpointAware for PrefixCachePlugin {
    fn retain_endpoints(&self, keep: &dyn Fn(&sluice_core::EndpointKey) -> bool) {
        self.index.retain(keep);
    }

    fn state_size(&self) -> usize {
        self.index.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_chain_full_blocks_only() {
        let mut a = Vec::new();
        block_hashes("m", None, b"abcdefgh-xy", 4, 256, &mut a);
        assert_eq!(a.len(), 2, "the trailing partial block is ignored");
        let mut b = Vec::new();
        block_hashes("m", None, b"abcdZZZZ", 4, 256, &mut b);
        assert_eq!(a[0], b[0]);
        assert_ne!(a[1], b[1]);
        // The chain: a later block hash depends on the earlier ones.
        let mut c = Vec::new();
        block_hashes("m", None, b"ZZZZefgh", 4, 256, &mut c);
        assert_ne!(a[1], c[1]);
    }

    #[test]
    fn model_and_salt_seed_the_chain() {
        let mut a = Vec::new();
        let mut b = Vec::new();
        let mut c = Vec::new();
        block_hashes("m1", None, b"abcd", 4, 256, &mut a);
        block_hashes("m2", None, b"abcd", 4, 256, &mut b);
        block_hashes("m1", Some("tenant"), b"abcd", 4, 256, &mut c);
        assert_ne!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn truncates_to_max_blocks_and_short_prompts_have_none() {
        let mut a = Vec::new();
        block_hashes("m", None, &[b'x'; 100], 4, 3, &mut a);
        assert_eq!(a.len(), 3);
        block_hashes("m", None, b"abc", 4, 3, &mut a);
        assert!(a.is_empty());
    }

    #[test]
    fn known_hash_values() {
        // Pins the exact hash function so that a change in the algorithm is deliberate.
        let mut a = Vec::new();
        block_hashes("m", None, b"abcd", 4, 1, &mut a);
        let h0 = xxhash_rust::xxh64::xxh64(b"m", 0);
        let mut bytes = b"abcd".to_vec();
        bytes.extend_from_slice(&h0.to_le_bytes());
        assert_eq!(a, vec![xxhash_rust::xxh64::xxh64(&bytes, 0)]);
    }

    #[test]
    fn in_place_hashing_is_xxh64_of_the_concatenation() {
        // Every block length around the 32-byte stripe and 8/4-byte tail boundaries, and
        // suffixes with high and low bytes set.
        let data: Vec<u8> = (0..700u32)
            .map(|i| (i.wrapping_mul(131) % 256) as u8)
            .collect();
        for len in 0..=200 {
            for suffix in [0u64, 1, u64::MAX, 0x0123_4567_89ab_cdef] {
                let block = &data[len % 7..len % 7 + len];
                let mut cat = block.to_vec();
                cat.extend_from_slice(&suffix.to_le_bytes());
                assert_eq!(
                    xxh64_then_u64(block, suffix),
                    xxhash_rust::xxh64::xxh64(&cat, 0),
                    "{len} bytes, suffix {suffix:#x}"
                );
            }
        }
    }

    #[test]
    fn every_block_size_hashes_the_documented_chain() {
        // Every block size, with and without a salt, must give
        // h_i = xxh64(block_i ‖ le64(h_{i-1})) from h0 = xxh64(model ‖ salt).
        let prompt: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8).collect();
        for salt in [None, Some("s")] {
            for chars in [1, 64, 4 * 128, 4 * 128 + 1, 2048] {
                let mut got = Vec::new();
                block_hashes("m", salt, &prompt, chars, 256, &mut got);
                let seed = format!("m{}", salt.unwrap_or(""));
                let mut prev = xxhash_rust::xxh64::xxh64(seed.as_bytes(), 0);
                let want: Vec<u64> = prompt
                    .chunks_exact(chars)
                    .take(256)
                    .map(|block| {
                        let mut h = Xxh64::new(0);
                        h.update(block);
                        h.update(&prev.to_le_bytes());
                        prev = h.digest();
                        prev
                    })
                    .collect();
                assert_eq!(got, want, "{chars} bytes per block, salt {salt:?}");
            }
        }
    }
}
