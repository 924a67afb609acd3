//! A cheap, deterministic stand-in for a real tokenizer.
//!
//! The simulator has no vocabulary. It counts **one token per 4 bytes** of UTF-8 text (rounded
//! up), the same approximation the EPP's approximate prefix scorer uses (`scheduling.md` §6), so
//! a block of 16 tokens is 64 bytes both in the picker's index and in the simulated KV cache.
//! Token-id prompts (`"prompt": [1, 2, 3]`) count one token per id, and each id is hashed as
//! its 4 little-endian bytes, so a token-id prompt and a text prompt have the same block
//! geometry.
//!
//! Prefix-cache block hashes are chained like vLLM's: `h_i = xxh64(block_i ‖ h_{i-1})`, with
//! `h_0` derived from the model name and LoRA adapter, so two requests share a cached block only
//! if everything before it is identical too.

use xxhash_rust::xxh64::xxh64;

/// Bytes of text that count as one token.
pub const BYTES_PER_TOKEN: usize = 4;

/// A prompt reduced to what the engine needs: its length and the hashes of its full blocks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenizedPrompt {
    /// Number of prompt tokens.
    pub tokens: u32,
    /// Chained hashes of each full `block_size`-token block, in order.
    pub block_hashes: Vec<u64>,
}

/// Number of tokens in `text` (`ceil(len / 4)`).
pub fn count_tokens(text: &str) -> u32 {
    u32::try_from(text.len().div_ceil(BYTES_PER_TOKEN)).unwrap_or(u32::MAX)
}

/// Tokenizes a text prompt for a model (and optional LoRA adapter) with `block_size`-token blocks.
pub fn tokenize_text(
    text: &str,
    model: &str,
    lora: Option<&str>,
    block_size: u32,
) -> TokenizedPrompt {
    TokenizedPrompt {
        tokens: count_tokens(text),
        block_hashes: block_hashes(text.as_bytes(), model, lora, block_size),
    }
}

/// Tokenizes a token-id prompt: one token per id, hashed as 4 little-endian bytes each.
pub fn tokenize_ids(
    ids: &[u32],
    model: &str,
    lora: Option<&str>,
    block_size: u32,
) -> TokenizedPrompt {
    let bytes: Vec<u8> = ids.iter().flat_map(|id| id.to_le_bytes()).collect();
    TokenizedPrompt {
        tokens: u32::try_from(ids.len()).unwrap_or(u32::MAX),
        block_hashes: block_hashes(&bytes, model, lora, block_size),
    }
}

/// Chained hashes of the full blocks of `bytes`; a trailing partial block is not hashed
/// because vLLM only caches full blocks.
pub fn block_hashes(bytes: &[u8], model: &str, lora: Option<&str>, block_size: u32) -> Vec<u64> {
    let block_bytes = (block_size.max(1) as usize) * BYTES_PER_TOKEN;
    let mut seed_input = Vec::with_capacity(model.len() + 1 + lora.map_or(0, str::len));
    seed_input.extend_from_slice(model.as_bytes());
    seed_input.push(0);
    if let Some(l) = lora {
        seed_input.extend_from_slice(l.as_bytes());
    }
    let mut prev = xxh64(&seed_input, 0);
    let mut out = Vec::with_capacity(bytes.len() / block_bytes);
    for chunk in bytes.chunks_exact(block_bytes) {
        // Seeding with the parent hash chains the blocks without copying them.
        prev = xxh64(chunk, prev);
        out.push(prev);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_four_bytes_per_token_rounding_up() {
        assert_eq!(count_tokens(""), 0);
        assert_eq!(count_tokens("abc"), 1);
        assert_eq!(count_tokens("abcd"), 1);
        assert_eq!(count_tokens("abcde"), 2);
    }

    #[test]
    fn shared_prefix_shares_leading_hashes_only() {
        let a = "x".repeat(64 * 3) + &"a".repeat(64);
        let b = "x".repeat(64 * 3) + &"b".repeat(64);
        let ha = block_hashes(a.as_bytes(), "m", None, 16);
        let hb = block_hashes(b.as_bytes(), "m", None, 16);
        assert_eq!(ha.len(), 4);
        assert_eq!(ha[..3], hb[..3]);
        assert_ne!(ha[3], hb[3]);
        // A different adapter never shares blocks with the base model.
        let hl = block_hashes(a.as_bytes(), "m", Some("lora"), 16);
        assert_ne!(ha[0], hl[0]);
    }

    #[test]
    fn partial_block_is_not_hashed() {
        assert_eq!(block_hashes(&[0u8; 63], "m", None, 16).len(), 0);
        assert_eq!(tokenize_ids(&[1; 33], "m", None, 16).block_hashes.len(), 2);
    }
}
