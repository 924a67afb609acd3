//! Calibrated server presets.
//!
//! Each number is derived from public hardware and model figures so that the relative behaviour
//! of a heterogeneous fleet is right, not to reproduce any one benchmark to the millisecond:
//!
//! - GPU peaks from the vendor data sheets: H100 SXM 3.35 TB/s HBM3 and 989 TFLOPS dense BF16;
//!   A100 40GB 1.555 TB/s and 312 TFLOPS; L4 300 GB/s and 121 TFLOPS.
//! - Achieved fractions: 80 % of peak bandwidth for weight and KV streaming, 45–50 % of peak
//!   FLOPS in prefill (typical model-FLOPs utilisation reported for vLLM/FlashAttention prefill).
//! - Model shapes from the Llama 3.1 model cards / `config.json`: 8B = 16.06 GB of BF16 weights,
//!   32 layers, 8 KV heads × 128 dims ⇒ 128 KiB of KV per token; 70B = 141 GB, 80 layers, 8 KV
//!   heads × 128 ⇒ 320 KiB per token. Compute ≈ 2 × parameters FLOPs per token.
//! - KV blocks: `(0.9 × GPU memory − weights − ~2 GiB activations) / (KV bytes per token × 16)`,
//!   vLLM's `--gpu-memory-utilization 0.9` accounting.
//! - Cross-check: the llm-d predictor's `peakPrefillThroughput` is 15,928 tok/s for Qwen3-32B on
//!   2 × H100 TP2 (`slo-routing.md` §3); scaled to an 8B model on one H100 that is ~32k tok/s,
//!   which is what `compute_us_per_token = 32` gives. vLLM on one H100 serves Llama-3.1-8B at
//!   ~6–8 ms per output token at low concurrency, which `weights_read + overhead` gives.
//! - Scheduler limits: vLLM V1 defaults for the OpenAI server, `max_num_batched_tokens` 8192 and
//!   `max_num_seqs` 1024 on ≥ 70 GiB GPUs, 2048 / 256 otherwise (`vllm/engine/arg_utils.py`).
//! - LoRA: loading a rank-16 adapter for an 8B model from host memory into a GPU slot takes on
//!   the order of 10–30 ms (vLLM's `LRUCacheWorkerLoRAManager`, PCIe Gen5 at ~25 GB/s plus
//!   punica setup); 20 ms is used.

use crate::engine::{CostModel, EngineConfig, NaturalLength};

/// A named, calibrated configuration.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum Preset {
    /// Llama-3.1-8B-Instruct on one H100 SXM 80GB.
    H100Llama8b,
    /// Llama-3.1-70B-Instruct on four H100 SXM (tensor parallel 4).
    H100x4Llama70b,
    /// Llama-3.1-8B-Instruct on one A100 40GB (the slower GPU).
    A100Llama8b,
    /// Llama-3.1-8B-Instruct on one L4 24GB (a much slower, memory-starved GPU).
    L4Llama8b,
    /// A tiny server for tests: 1,024 tokens of KV, millisecond steps.
    Tiny,
}

impl Preset {
    /// Every preset, for listings.
    pub const ALL: [Preset; 5] = [
        Preset::H100Llama8b,
        Preset::H100x4Llama70b,
        Preset::A100Llama8b,
        Preset::L4Llama8b,
        Preset::Tiny,
    ];

    /// The preset's name as written on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Preset::H100Llama8b => "h100-llama8b",
            Preset::H100x4Llama70b => "h100x4-llama70b",
            Preset::A100Llama8b => "a100-llama8b",
            Preset::L4Llama8b => "l4-llama8b",
            Preset::Tiny => "tiny",
        }
    }

    /// The engine configuration.
    pub fn config(self) -> EngineConfig {
        // ShareGPT-like reply lengths when the client lets the model stop by itself:
        // median ~150 tokens with a long tail.
        let natural_length = NaturalLength {
            median: 150.0,
            sigma: 0.9,
        };
        let adapters = (0..8).map(|i| format!("lora-{i}")).collect();
        match self {
            Preset::H100Llama8b => EngineConfig {
                model: "meta-llama/Llama-3.1-8B-Instruct".into(),
                block_size: 16,
                // (0.9 × 79.6 GiB − 15 GiB − 2 GiB) / 128 KiB ≈ 433k tokens.
                num_gpu_blocks: 27_000,
                max_num_seqs: 1024,
                max_num_batched_tokens: 8192,
                max_model_len: 131_072,
                enable_prefix_caching: true,
                max_loras: 4,
                lora_adapters: adapters,
                cost: CostModel {
                    step_overhead_us: 800.0,
                    // 16.06 GB / (3.35 TB/s × 0.8).
                    weights_read_us: 6_000.0,
                    // 16 GFLOP / (989 TFLOPS × 0.5).
                    compute_us_per_token: 32.0,
                    // 128 KiB / (3.35 TB/s × 0.8).
                    kv_read_us_per_token: 0.049,
                    per_seq_us: 15.0,
                    lora_load_us: 20_000.0,
                },
                natural_length,
            },
            Preset::H100x4Llama70b => EngineConfig {
                model: "meta-llama/Llama-3.1-70B-Instruct".into(),
                block_size: 16,
                // (4 × 0.9 × 79.6 GiB − 131 GiB − 8 GiB) / 320 KiB ≈ 475k tokens.
                num_gpu_blocks: 29_000,
                max_num_seqs: 1024,
                max_num_batched_tokens: 8192,
                max_model_len: 131_072,
                enable_prefix_caching: true,
                max_loras: 4,
                lora_adapters: adapters,
                cost: CostModel {
                    // Tensor-parallel all-reduces add to the fixed cost.
                    step_overhead_us: 2_500.0,
                    // 141 GB / (4 × 3.35 TB/s × 0.8).
                    weights_read_us: 13_200.0,
                    // 141 GFLOP / (4 × 989 TFLOPS × 0.45).
                    compute_us_per_token: 79.0,
                    // 320 KiB / (4 × 3.35 TB/s × 0.8).
                    kv_read_us_per_token: 0.031,
                    per_seq_us: 20.0,
                    lora_load_us: 40_000.0,
                },
                natural_length,
            },
            Preset::A100Llama8b => EngineConfig {
                model: "meta-llama/Llama-3.1-8B-Instruct".into(),
                block_size: 16,
                // (0.9 × 39.4 GiB − 15 GiB − 2 GiB) / 128 KiB ≈ 151k tokens.
                num_gpu_blocks: 9_400,
                max_num_seqs: 256,
                max_num_batched_tokens: 2048,
                max_model_len: 131_072,
                enable_prefix_caching: true,
                max_loras: 4,
                lora_adapters: adapters,
                cost: CostModel {
                    step_overhead_us: 1_000.0,
                    // 16.06 GB / (1.555 TB/s × 0.8).
                    weights_read_us: 12_900.0,
                    // 16 GFLOP / (312 TFLOPS × 0.5).
                    compute_us_per_token: 103.0,
                    // 128 KiB / (1.555 TB/s × 0.8).
                    kv_read_us_per_token: 0.105,
                    per_seq_us: 20.0,
                    lora_load_us: 25_000.0,
                },
                natural_length,
            },
            Preset::L4Llama8b => EngineConfig {
                model: "meta-llama/Llama-3.1-8B-Instruct".into(),
                block_size: 16,
                // (0.9 × 22.5 GiB − 15 GiB − 1.5 GiB) / 128 KiB ≈ 30k tokens.
                num_gpu_blocks: 1_900,
                max_num_seqs: 256,
                max_num_batched_tokens: 2048,
                max_model_len: 30_400,
                enable_prefix_caching: true,
                max_loras: 2,
                lora_adapters: adapters,
                cost: CostModel {
                    step_overhead_us: 1_500.0,
                    // 16.06 GB / (300 GB/s × 0.8).
                    weights_read_us: 66_900.0,
                    // 16 GFLOP / (121 TFLOPS × 0.5).
                    compute_us_per_token: 265.0,
                    // 128 KiB / (300 GB/s × 0.8).
                    kv_read_us_per_token: 0.546,
                    per_seq_us: 30.0,
                    lora_load_us: 40_000.0,
                },
                natural_length,
            },
            Preset::Tiny => EngineConfig {
                model: "tiny".into(),
                block_size: 16,
                num_gpu_blocks: 64,
                max_num_seqs: 8,
                max_num_batched_tokens: 256,
                max_model_len: 1024,
                enable_prefix_caching: true,
                max_loras: 1,
                lora_adapters: vec!["lora-0".into(), "lora-1".into()],
                cost: CostModel {
                    step_overhead_us: 200.0,
                    weights_read_us: 1_000.0,
                    compute_us_per_token: 10.0,
                    kv_read_us_per_token: 0.5,
                    per_seq_us: 50.0,
                    lora_load_us: 5_000.0,
                },
                natural_length: NaturalLength {
                    median: 16.0,
                    sigma: 0.5,
                },
            },
        }
    }
}

impl std::fmt::Display for Preset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Preset {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Preset::ALL
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| {
                let names: Vec<_> = Preset::ALL.iter().map(|p| p.name()).collect();
                format!("unknown preset `{s}`; expected one of {}", names.join(", "))
            })
    }
}

/// Engine settings to change on top of a preset (command-line flags, fleet-wide settings).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Overrides {
    /// Served model name (every server of a pool serves the same name).
    pub model: Option<String>,
    /// KV blocks.
    pub num_gpu_blocks: Option<u32>,
    /// `max_num_seqs`.
    pub max_num_seqs: Option<u32>,
    /// `max_num_batched_tokens`.
    pub max_num_batched_tokens: Option<u32>,
    /// `max_loras`.
    pub max_loras: Option<u32>,
    /// LoRA adapters served.
    pub lora_adapters: Option<Vec<String>>,
    /// Turn automatic prefix caching off.
    pub no_prefix_caching: bool,
}

impl Overrides {
    /// Applies the set fields to `e`.
    pub fn apply(&self, e: &mut EngineConfig) {
        if let Some(m) = &self.model {
            e.model.clone_from(m);
        }
        if let Some(v) = self.num_gpu_blocks {
            e.num_gpu_blocks = v;
        }
        if let Some(v) = self.max_num_seqs {
            e.max_num_seqs = v;
        }
        if let Some(v) = self.max_num_batched_tokens {
            e.max_num_batched_tokens = v;
        }
        if let Some(v) = self.max_loras {
            e.max_loras = v;
        }
        if let Some(v) = &self.lora_adapters {
            e.lora_adapters.clone_from(v);
        }
        if self.no_prefix_caching {
            e.enable_prefix_caching = false;
        }
    }
}
