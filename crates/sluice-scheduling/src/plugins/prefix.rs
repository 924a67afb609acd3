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
    let mut h = Xxh64::new(0);
    h.update(model.as_bytes());
    if let Some(s) = cache_salt {
        h.update(s.as_bytes());
    }
    let mut prev = h.digest();
    let limit = prompt.len().min(max_blocks.saturating_mul(chars_per_block));
    out.reserve(limit / chars_per_block);
    // One-shot hashing of `block ‖ le64(prev)` from one reused buffer: the same value as
    // streaming the two parts, at a fraction of the cost for 64-byte blocks. Blocks up to
    // 128 tokens (vLLM's largest common size) use a stack buffer, so no allocation.
    let mut stack = [0u8; 4 * 128 + 8];
    let mut heap = Vec::new();
    let buf: &mut [u8] = match stack.get_mut(..chars_per_block + 8) {
        Some(b) => b,
        None => {
            heap.resize(chars_per_block + 8, 0);
            &mut heap
        }
    };
    for block in prompt[..limit].chunks_exact(chars_per_block) {
        buf[..chars_per_block].copy_from_slice(block);
        buf[chars_per_block..].copy_from_slice(&prev.to_le_bytes());
        prev = xxhash_rust::xxh64::xxh64(buf, 0);
        out.push(prev);
    }
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
    fn every_block_size_hashes_the_documented_chain() {
        // Small blocks hash from a stack buffer, large ones (> 128 tokens) from the heap:
        // both must give h_i = xxh64(block_i ‖ le64(h_{i-1})) from h0 = xxh64(model ‖ salt).
        let prompt: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8).collect();
        for chars in [1, 64, 4 * 128, 4 * 128 + 1, 2048] {
            let mut got = Vec::new();
            block_hashes("m", Some("s"), &prompt, chars, 256, &mut got);
            let mut prev = xxhash_rust::xxh64::xxh64(b"ms", 0);
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
            assert_eq!(got, want, "{chars} bytes per block");
        }
    }
}
