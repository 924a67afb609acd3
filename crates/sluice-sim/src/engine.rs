//! The engine model: a pure, deterministic state machine of one vLLM-like server.
//!
//! Time is injected (microseconds of simulated time) and randomness comes from a seeded RNG,
//! so the same arrivals and seed always give the same tokens at the same instants. The HTTP
//! layer (`server`) and the offline harness ([`simulate`]) both drive it the same way:
//!
//! ```text
//! submit(req, now)*  ->  begin_step(now) -> Some(duration)  ->  finish_step() -> token events
//! ```
//!
//! Scheduling follows vLLM v1's scheduler: running requests first (one decode token each, or
//! the next chunk of an unfinished prefill), then waiting requests in FIFO order while the token
//! budget (`max_num_batched_tokens`), the sequence cap (`max_num_seqs`), free KV blocks and LoRA
//! slots allow. When a running request needs a block and none is free, the most recently
//! admitted running request is preempted (recompute mode: its blocks are freed and it goes back
//! to the front of the queue). A request whose first full prompt blocks are in the prefix cache
//! skips computing them.

use std::collections::{HashMap, VecDeque};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::kv::KvCache;
use crate::metrics::{EngineSnapshot, EngineStats};

/// Simulated time or duration in microseconds.
pub type Micros = u64;

/// Identifies a request inside one engine.
pub type ReqId = u64;

/// The cost of one engine step (one forward pass over the batch), in microseconds.
///
/// `step = overhead + max(weights_read, compute_per_token × batched_tokens)
///        + kv_read_per_token × context_tokens + per_seq × sequences + lora_load × loads`
///
/// A decode step is memory-bound (the weights are read once whatever the batch), so it costs
/// about `weights_read` until the batch is large enough to become compute-bound; attention reads
/// every sequence's KV, so inter-token latency grows with batch size and context length;
/// prefill tokens are compute-bound, so time to first token grows with prompt length.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CostModel {
    /// Fixed per-step cost: scheduling, kernel launches, sampling setup.
    pub step_overhead_us: f64,
    /// Time to stream the weights from HBM once (memory-bound floor of a step).
    pub weights_read_us: f64,
    /// Compute time per batched token (prefill or decode).
    pub compute_us_per_token: f64,
    /// Attention time per token of context held by the scheduled sequences.
    pub kv_read_us_per_token: f64,
    /// Per-sequence cost (sampling, detokenisation, bookkeeping).
    pub per_seq_us: f64,
    /// Loading a LoRA adapter into a GPU slot (a miss).
    pub lora_load_us: f64,
}

/// How long a response would be if the client let the model stop by itself
/// (no `ignore_eos`): a log-normal draw capped by `max_tokens`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NaturalLength {
    /// Median length in tokens.
    pub median: f64,
    /// Log-space standard deviation.
    pub sigma: f64,
}

/// Static configuration of one simulated server (vLLM engine arguments plus the cost model).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EngineConfig {
    /// Served model name.
    pub model: String,
    /// Tokens per KV block (`--block-size`).
    pub block_size: u32,
    /// KV blocks on the server (what vLLM logs as `# GPU blocks`).
    pub num_gpu_blocks: u32,
    /// Maximum sequences in a batch (`--max-num-seqs`).
    pub max_num_seqs: u32,
    /// Token budget per step (`--max-num-batched-tokens`); long prompts are prefilled in chunks.
    pub max_num_batched_tokens: u32,
    /// Maximum prompt + output tokens of one request (`--max-model-len`).
    pub max_model_len: u32,
    /// Automatic prefix caching (`--enable-prefix-caching`).
    pub enable_prefix_caching: bool,
    /// LoRA adapters that can be resident (and in one batch) at once (`--max-loras`).
    pub max_loras: u32,
    /// Adapters this server knows (`--lora-modules`).
    pub lora_adapters: Vec<String>,
    /// Step cost.
    pub cost: CostModel,
    /// Output length when the model may stop by itself.
    pub natural_length: NaturalLength,
}

/// A request as the engine sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct SimRequest {
    /// Prompt tokens.
    pub prompt_tokens: u32,
    /// Chained hashes of the prompt's full blocks (see `tokenizer`).
    pub block_hashes: Vec<u64>,
    /// `max_tokens` (`max_completion_tokens`); `None` means up to the context limit.
    pub max_tokens: Option<u32>,
    /// Generate exactly `max_tokens`, never stopping early.
    pub ignore_eos: bool,
    /// LoRA adapter name, or `None` for the base model.
    pub lora: Option<String>,
}

/// Why `submit` refused a request (each maps to a 400 like vLLM's).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    /// The prompt plus the requested output exceed `max_model_len`.
    #[error(
        "This model's maximum context length is {max_len} tokens. However, you requested {total} tokens ({prompt} in the messages, {output} in the completion). Please reduce the length of the messages or completion."
    )]
    ContextTooLong {
        /// The limit.
        max_len: u32,
        /// Prompt plus output.
        total: u64,
        /// Prompt tokens.
        prompt: u32,
        /// Requested output tokens.
        output: u32,
    },
    /// `max_tokens` was zero.
    #[error("max_tokens must be at least 1, got 0.")]
    ZeroMaxTokens,
    /// The prompt was empty.
    #[error("The prompt is empty; at least one token is required.")]
    EmptyPrompt,
    /// The named LoRA adapter is not loaded on this server.
    #[error("The model `{0}` does not exist.")]
    UnknownAdapter(String),
}

/// Why a request finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    /// Reached `max_tokens`.
    Length,
    /// Sampled end-of-sequence.
    Stop,
}

impl FinishReason {
    /// The OpenAI `finish_reason` string.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Length => "length",
            FinishReason::Stop => "stop",
        }
    }
}

/// Per-request timings and counts reported when it finishes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct RequestStats {
    /// Prompt tokens.
    pub prompt_tokens: u32,
    /// Prompt tokens served from the prefix cache at first admission.
    pub cached_tokens: u32,
    /// Generated tokens.
    pub output_tokens: u32,
    /// Arrival time.
    pub arrival: Micros,
    /// First-token time.
    pub first_token: Micros,
    /// Last-token time.
    pub finished: Micros,
    /// Times the request was preempted.
    pub preemptions: u32,
    /// Why it finished.
    #[serde(skip)]
    pub reason: FinishReason,
}

/// One token produced for one request at the end of a step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenEvent {
    /// Request.
    pub id: ReqId,
    /// When the token exists (end of the step).
    pub at: Micros,
    /// Tokens generated so far, this one included.
    pub output_tokens: u32,
    /// Set on the last token.
    pub finished: Option<RequestStats>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LoraPlan {
    Resident,
    /// Load into the given slot (replacing its adapter) or a new one.
    Load(Option<usize>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Block {
    Cached(u64),
    Private,
}

#[derive(Debug)]
struct Req {
    arrival: Micros,
    prompt: u32,
    hashes: Vec<u64>,
    target: u32,
    stop_reason: FinishReason,
    lora: Option<u32>,
    computed: u32,
    output: u32,
    blocks: Vec<Block>,
    first_token: Option<Micros>,
    last_token: Micros,
    cached_tokens: Option<u32>,
    scheduled_once: bool,
    preemptions: u32,
}

impl Req {
    fn seq_len(&self) -> u32 {
        self.prompt + self.output
    }
}

/// One simulated server's engine.
#[derive(Debug)]
pub struct Engine {
    cfg: EngineConfig,
    kv: KvCache,
    reqs: HashMap<ReqId, Req>,
    waiting: VecDeque<ReqId>,
    running: Vec<ReqId>,
    step: Vec<(ReqId, u32)>,
    step_end: Micros,
    lora_names: Vec<String>,
    /// Resident adapters with their last-use counter.
    lora_slots: Vec<(u32, u64)>,
    lora_tick: u64,
    pending_lora_loads: u32,
    rng: SmallRng,
    next_id: ReqId,
    stats: EngineStats,
}

impl Engine {
    /// A fresh engine; `seed` fixes every random draw (output lengths).
    pub fn new(mut cfg: EngineConfig, seed: u64) -> Self {
        // Like vLLM's start-up check: a request must fit in the KV cache on its own.
        cfg.block_size = cfg.block_size.max(1);
        cfg.max_model_len = cfg
            .max_model_len
            .min(cfg.num_gpu_blocks.saturating_mul(cfg.block_size));
        Self {
            kv: KvCache::new(cfg.num_gpu_blocks),
            lora_names: cfg.lora_adapters.clone(),
            cfg,
            reqs: HashMap::new(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            step: Vec::new(),
            step_end: 0,
            lora_slots: Vec::new(),
            lora_tick: 0,
            pending_lora_loads: 0,
            rng: SmallRng::seed_from_u64(seed),
            next_id: 0,
            stats: EngineStats::default(),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }

    /// Accepts a request arriving at `now` into the waiting queue.
    pub fn submit(&mut self, req: SimRequest, now: Micros) -> Result<ReqId, SubmitError> {
        if req.prompt_tokens == 0 {
            return Err(SubmitError::EmptyPrompt);
        }
        if req.max_tokens == Some(0) {
            return Err(SubmitError::ZeroMaxTokens);
        }
        let room = self.cfg.max_model_len.saturating_sub(req.prompt_tokens);
        let max_tokens = req.max_tokens.unwrap_or(room);
        if u64::from(req.prompt_tokens) + u64::from(max_tokens) > u64::from(self.cfg.max_model_len)
            || max_tokens == 0
        {
            return Err(SubmitError::ContextTooLong {
                max_len: self.cfg.max_model_len,
                total: u64::from(req.prompt_tokens) + u64::from(max_tokens.max(1)),
                prompt: req.prompt_tokens,
                output: max_tokens.max(1),
            });
        }
        let lora = match &req.lora {
            None => None,
            Some(name) => match self.lora_names.iter().position(|n| n == name) {
                Some(i) => Some(u32::try_from(i).unwrap_or(u32::MAX)),
                None => return Err(SubmitError::UnknownAdapter(name.clone())),
            },
        };
        let (target, stop_reason) = if req.ignore_eos {
            (max_tokens, FinishReason::Length)
        } else {
            let natural = self.natural_length();
            if natural < max_tokens {
                (natural, FinishReason::Stop)
            } else {
                (max_tokens, FinishReason::Length)
            }
        };
        let id = self.next_id;
        self.next_id += 1;
        self.reqs.insert(
            id,
            Req {
                arrival: now,
                prompt: req.prompt_tokens,
                hashes: if self.cfg.enable_prefix_caching {
                    req.block_hashes
                } else {
                    Vec::new()
                },
                target,
                stop_reason,
                lora,
                computed: 0,
                output: 0,
                blocks: Vec::new(),
                first_token: None,
                last_token: now,
                cached_tokens: None,
                scheduled_once: false,
                preemptions: 0,
            },
        );
        self.waiting.push_back(id);
        Ok(id)
    }

    fn natural_length(&mut self) -> u32 {
        // Box–Muller: one standard normal from two uniforms.
        let u1: f64 = self.rng.random::<f64>().max(f64::MIN_POSITIVE);
        let u2: f64 = self.rng.random::<f64>();
        let z = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
        let v = (self.cfg.natural_length.median.ln() + self.cfg.natural_length.sigma * z).exp();
        (v.round() as u32).max(1)
    }

    /// Drops a request (client went away). Its blocks are freed at once.
    pub fn abort(&mut self, id: ReqId) {
        let Some(mut r) = self.reqs.remove(&id) else {
            return;
        };
        self.free_blocks(&mut r);
        self.waiting.retain(|w| *w != id);
        self.running.retain(|w| *w != id);
        self.stats.aborted += 1;
    }

    /// Whether there is anything to schedule.
    pub fn has_work(&self) -> bool {
        !self.waiting.is_empty() || !self.running.is_empty()
    }

    /// Forms the next batch at `now` and returns how long the step takes, or `None` if idle
    /// (or nothing fits, which only happens when a lone request cannot get KV blocks).
    pub fn begin_step(&mut self, now: Micros) -> Option<Micros> {
        if !self.step.is_empty() {
            return None;
        }
        let mut budget = self.cfg.max_num_batched_tokens;
        let mut preempted = false;
        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let id = self.running[i];
            let Some(r) = self.reqs.get(&id) else {
                self.running.remove(i);
                continue;
            };
            let num_new = (r.seq_len() - r.computed).min(budget);
            let need = self
                .blocks_for(r.computed + num_new)
                .saturating_sub(r.blocks.len() as u32);
            let mut scheduled = true;
            while !self.kv.allocate(need) {
                let Some(victim) = self.running.pop() else {
                    scheduled = false;
                    break;
                };
                self.preempt(victim);
                preempted = true;
                if victim == id {
                    scheduled = false;
                    break;
                }
            }
            if !scheduled {
                break;
            }
            if let Some(r) = self.reqs.get_mut(&id) {
                r.blocks
                    .extend(std::iter::repeat_n(Block::Private, need as usize));
            }
            self.step.push((id, num_new));
            budget -= num_new;
            i += 1;
        }
        if !preempted {
            self.admit_waiting(&mut budget, now);
        }
        if self.step.is_empty() {
            return None;
        }
        let mut tokens = 0u64;
        let mut context = 0u64;
        for (id, n) in &self.step {
            tokens += u64::from(*n);
            if let Some(r) = self.reqs.get(id) {
                context += u64::from(r.computed + n);
            }
        }
        let c = &self.cfg.cost;
        let loads = self.pending_lora_loads;
        self.pending_lora_loads = 0;
        let t = c.step_overhead_us
            + c.weights_read_us
                .max(c.compute_us_per_token * tokens as f64)
            + c.kv_read_us_per_token * context as f64
            + c.per_seq_us * self.step.len() as f64
            + c.lora_load_us * f64::from(loads);
        let dur = (t.round() as Micros).max(1);
        self.step_end = now + dur;
        self.stats.steps += 1;
        Some(dur)
    }

    fn admit_waiting(&mut self, budget: &mut u32, now: Micros) {
        let mut idx = 0;
        while idx < self.waiting.len()
            && *budget > 0
            && (self.running.len() as u32) < self.cfg.max_num_seqs
        {
            let id = self.waiting[idx];
            let Some(r) = self.reqs.get(&id) else {
                self.waiting.remove(idx);
                continue;
            };
            // A request whose adapter cannot get a slot waits; later ones may still run.
            let mut lora_plan = LoraPlan::Resident;
            if let Some(l) = r.lora {
                match self.lora_slot_for(l) {
                    Some(plan) => lora_plan = plan,
                    None => {
                        idx += 1;
                        continue;
                    }
                }
            }
            let lora_load = lora_plan != LoraPlan::Resident;
            let bs = self.cfg.block_size;
            let mut hit_blocks = 0u32;
            let mut touch_cost = 0u32;
            if r.blocks.is_empty() {
                for h in &r.hashes {
                    if !self.kv.contains(*h) {
                        break;
                    }
                    if self.kv.is_evictable(*h) {
                        touch_cost += 1;
                    }
                    hit_blocks += 1;
                }
                // The last token is always recomputed so that there are logits to sample from.
                if hit_blocks > 0 && hit_blocks * bs >= r.seq_len() {
                    hit_blocks -= 1;
                    if self.kv.is_evictable(r.hashes[hit_blocks as usize]) {
                        touch_cost -= 1;
                    }
                }
            }
            let start = hit_blocks * bs;
            let num_new = (r.seq_len() - start).min(*budget);
            let need = self.blocks_for(start + num_new) - hit_blocks;
            if need + touch_cost > self.kv.available() {
                // KV cache full: the queue waits (FIFO head-of-line, as vLLM does).
                break;
            }
            let hashes: Vec<u64> = r.hashes[..hit_blocks as usize].to_vec();
            for h in &hashes {
                self.kv.touch(*h);
            }
            let allocated = self.kv.allocate(need);
            debug_assert!(allocated);
            if let (Some(l), LoraPlan::Load(slot)) = (r.lora, lora_plan) {
                self.pending_lora_loads += 1;
                match slot {
                    Some(i) => self.lora_slots[i] = (l, 0),
                    None => self.lora_slots.push((l, 0)),
                }
            }
            let first = !r.scheduled_once;
            let prompt = r.prompt;
            let arrival = r.arrival;
            if let Some(r) = self.reqs.get_mut(&id) {
                r.blocks = hashes.into_iter().map(Block::Cached).collect();
                r.blocks
                    .extend(std::iter::repeat_n(Block::Private, need as usize));
                r.computed = start;
                r.scheduled_once = true;
                if r.cached_tokens.is_none() {
                    r.cached_tokens = Some(start.min(prompt));
                }
                if let Some(l) = r.lora {
                    if lora_load {
                        self.stats.lora_misses += 1;
                    } else if first {
                        self.stats.lora_hits += 1;
                    }
                    self.lora_tick += 1;
                    let tick = self.lora_tick;
                    if let Some(s) = self.lora_slots.iter_mut().find(|s| s.0 == l) {
                        s.1 = tick;
                    }
                }
            }
            if first {
                self.stats.prompt_tokens += u64::from(prompt);
                if self.cfg.enable_prefix_caching {
                    self.stats.prefix_queries += u64::from(prompt);
                    self.stats.prefix_hits += u64::from(start.min(prompt));
                }
                self.stats
                    .queue
                    .observe(now.saturating_sub(arrival) as f64 / 1e6);
            }
            self.waiting.remove(idx);
            self.running.push(id);
            self.step.push((id, num_new));
            *budget -= num_new;
        }
    }

    /// Finds a GPU slot for adapter `l`: resident, load into a free slot or over the least
    /// recently used adapter no running request uses, or `None` if every slot is busy.
    fn lora_slot_for(&self, l: u32) -> Option<LoraPlan> {
        if self.lora_slots.iter().any(|s| s.0 == l) {
            return Some(LoraPlan::Resident);
        }
        if (self.lora_slots.len() as u32) < self.cfg.max_loras {
            return Some(LoraPlan::Load(None));
        }
        let in_use = |a: u32| {
            self.running
                .iter()
                .any(|id| self.reqs.get(id).is_some_and(|r| r.lora == Some(a)))
        };
        let victim = self
            .lora_slots
            .iter()
            .enumerate()
            .filter(|(_, s)| !in_use(s.0))
            .min_by_key(|(_, s)| s.1)
            .map(|(i, _)| i)?;
        Some(LoraPlan::Load(Some(victim)))
    }

    fn blocks_for(&self, tokens: u32) -> u32 {
        tokens.div_ceil(self.cfg.block_size)
    }

    fn free_blocks(&mut self, r: &mut Req) {
        let mut private = 0;
        for b in r.blocks.drain(..) {
            match b {
                Block::Cached(h) => self.kv.release_cached(h),
                Block::Private => private += 1,
            }
        }
        self.kv.release_private(private);
    }

    fn preempt(&mut self, id: ReqId) {
        if let Some(mut r) = self.reqs.remove(&id) {
            self.free_blocks(&mut r);
            r.computed = 0;
            r.preemptions += 1;
            self.reqs.insert(id, r);
            self.waiting.push_front(id);
            self.stats.preemptions += 1;
        }
    }

    /// Applies the step formed by `begin_step`: advances each request, caches newly full prompt
    /// blocks, and returns one event per generated token (all at the step's end time).
    pub fn finish_step(&mut self) -> Vec<TokenEvent> {
        let at = self.step_end;
        let bs = self.cfg.block_size;
        let mut events = Vec::with_capacity(self.step.len());
        let mut done = Vec::new();
        for (id, n) in std::mem::take(&mut self.step) {
            let Some(r) = self.reqs.get_mut(&id) else {
                continue; // aborted during the step
            };
            let before = r.computed;
            r.computed += n;
            // Prompt blocks that just became full enter the prefix cache.
            let first_full = before / bs;
            let last_full = (r.computed.min(r.prompt) / bs).min(r.hashes.len() as u32);
            for b in first_full..last_full {
                let bi = b as usize;
                if r.blocks.get(bi) == Some(&Block::Private) && self.kv.promote(r.hashes[bi]) {
                    r.blocks[bi] = Block::Cached(r.hashes[bi]);
                }
            }
            if r.computed < r.seq_len() {
                continue; // mid-prefill chunk
            }
            r.output += 1;
            self.stats.generation_tokens += 1;
            match r.first_token {
                None => {
                    r.first_token = Some(at);
                    self.stats
                        .ttft
                        .observe(at.saturating_sub(r.arrival) as f64 / 1e6);
                }
                Some(_) => self
                    .stats
                    .itl
                    .observe(at.saturating_sub(r.last_token) as f64 / 1e6),
            }
            r.last_token = at;
            let finished = (r.output >= r.target).then(|| RequestStats {
                prompt_tokens: r.prompt,
                cached_tokens: r.cached_tokens.unwrap_or(0),
                output_tokens: r.output,
                arrival: r.arrival,
                first_token: r.first_token.unwrap_or(at),
                finished: at,
                preemptions: r.preemptions,
                reason: r.stop_reason,
            });
            if let Some(s) = &finished {
                done.push(id);
                self.stats
                    .e2e
                    .observe(at.saturating_sub(s.arrival) as f64 / 1e6);
                match s.reason {
                    FinishReason::Length => self.stats.finished_length += 1,
                    FinishReason::Stop => self.stats.finished_stop += 1,
                }
            }
            events.push(TokenEvent {
                id,
                at,
                output_tokens: r.output,
                finished,
            });
        }
        for id in done {
            if let Some(mut r) = self.reqs.remove(&id) {
                self.free_blocks(&mut r);
            }
            self.running.retain(|x| *x != id);
        }
        events
    }

    /// Gauges for `/metrics`.
    pub fn snapshot(&self) -> EngineSnapshot {
        let names = |ids: &mut dyn Iterator<Item = &ReqId>| {
            let mut v: Vec<u32> = ids
                .filter_map(|id| self.reqs.get(id).and_then(|r| r.lora))
                .collect();
            v.sort_unstable();
            v.dedup();
            v.into_iter()
                .filter_map(|i| self.lora_names.get(i as usize).cloned())
                .collect::<Vec<_>>()
        };
        EngineSnapshot {
            waiting: self.waiting.len() as u32,
            running: self.running.len() as u32,
            kv_usage: self.kv.usage(),
            running_loras: names(&mut self.running.iter()),
            waiting_loras: names(&mut self.waiting.iter()),
            max_loras: self.cfg.max_loras,
            block_size: self.cfg.block_size,
            num_gpu_blocks: self.kv.num_blocks(),
        }
    }

    /// Counters and histograms.
    pub fn stats(&self) -> &EngineStats {
        &self.stats
    }

    /// Cached blocks evicted so far.
    pub fn evictions(&self) -> u64 {
        self.kv.evictions
    }

    /// Drops all unreferenced prefix-cache blocks.
    pub fn reset_prefix_cache(&mut self) {
        self.kv.reset_prefix_cache();
    }
}

/// Outcome of one request in an offline [`simulate`] run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Outcome {
    /// Index of the request in the arrival list.
    pub index: usize,
    /// Timings and counts.
    pub stats: RequestStats,
    /// Time to first token, milliseconds.
    pub ttft_ms: f64,
    /// Mean inter-token latency after the first token, milliseconds (0 for one token).
    pub tpot_ms: f64,
    /// Arrival to last token, milliseconds.
    pub e2e_ms: f64,
}

/// Runs one engine over a list of `(arrival time, request)` pairs (sorted by time) until every
/// request finishes, without any I/O. Requests the engine refuses are skipped.
pub fn simulate(cfg: EngineConfig, seed: u64, arrivals: Vec<(Micros, SimRequest)>) -> Vec<Outcome> {
    let mut engine = Engine::new(cfg, seed);
    let mut ids: HashMap<ReqId, usize> = HashMap::new();
    let mut out = Vec::with_capacity(arrivals.len());
    let mut pending = arrivals.into_iter().enumerate().peekable();
    let mut now: Micros = 0;
    loop {
        while let Some((i, (t, _))) = pending.peek() {
            if *t > now {
                break;
            }
            let i = *i;
            if let Some((_, (t, req))) = pending.next()
                && let Ok(id) = engine.submit(req, t)
            {
                ids.insert(id, i);
            }
        }
        match engine.begin_step(now) {
            Some(d) => {
                for ev in engine.finish_step() {
                    if let (Some(s), Some(index)) = (ev.finished, ids.get(&ev.id)) {
                        let ttft = s.first_token.saturating_sub(s.arrival) as f64 / 1e3;
                        let tpot = if s.output_tokens > 1 {
                            s.finished.saturating_sub(s.first_token) as f64
                                / 1e3
                                / f64::from(s.output_tokens - 1)
                        } else {
                            0.0
                        };
                        out.push(Outcome {
                            index: *index,
                            stats: s,
                            ttft_ms: ttft,
                            tpot_ms: tpot,
                            e2e_ms: s.finished.saturating_sub(s.arrival) as f64 / 1e3,
                        });
                    }
                }
                now += d;
            }
            None => match pending.peek() {
                Some((_, (t, _))) => now = now.max(*t),
                None => break,
            },
        }
    }
    out.sort_by_key(|o| o.index);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::preset::Preset;
    use crate::tokenizer::block_hashes;

    /// A request whose prompt is `tokens` tokens of text starting with `prefix` (repeated).
    fn req(prefix: &str, unique: &str, tokens: u32, max_tokens: u32) -> SimRequest {
        let mut text = String::new();
        while text.len() < (tokens as usize) * 4 {
            text.push_str(prefix);
        }
        text.truncate(tokens as usize * 4 - unique.len().min(tokens as usize * 4));
        text.push_str(unique);
        SimRequest {
            prompt_tokens: tokens,
            block_hashes: block_hashes(text.as_bytes(), "m", None, 16),
            max_tokens: Some(max_tokens),
            ignore_eos: true,
            lora: None,
        }
    }

    fn uniq(i: usize) -> String {
        format!("<<unique request {i:06}>>")
    }

    fn h100() -> EngineConfig {
        Preset::H100Llama8b.config()
    }

    #[test]
    fn ttft_grows_with_prompt_length() {
        let short = simulate(h100(), 1, vec![(0, req("a", "", 128, 4))]);
        let long = simulate(h100(), 1, vec![(0, req("a", "", 8000, 4))]);
        assert!(
            long[0].ttft_ms > 3.0 * short[0].ttft_ms,
            "{} vs {}",
            long[0].ttft_ms,
            short[0].ttft_ms
        );
        // 8,000 prompt tokens at ~32 µs each are about a quarter of a second of prefill.
        assert!(
            long[0].ttft_ms > 200.0 && long[0].ttft_ms < 400.0,
            "{}",
            long[0].ttft_ms
        );
    }

    #[test]
    fn ttft_grows_with_queue_depth() {
        let mut cfg = h100();
        cfg.max_num_seqs = 4;
        let ttft_behind = |depth: usize| {
            let arrivals = (0..=depth)
                .map(|i| (0, req("q", &uniq(i), 512, 64)))
                .collect();
            let out = simulate(cfg.clone(), 1, arrivals);
            out[depth].ttft_ms
        };
        let (t0, t8, t32) = (ttft_behind(0), ttft_behind(8), ttft_behind(32));
        assert!(t8 > 2.0 * t0, "{t0} {t8}");
        assert!(t32 > 2.0 * t8, "{t8} {t32}");
    }

    #[test]
    fn tpot_grows_with_batch_size() {
        let mean_tpot = |batch: usize| {
            let arrivals = (0..batch)
                .map(|i| (0, req("b", &uniq(i), 1000, 200)))
                .collect();
            let out = simulate(h100(), 1, arrivals);
            out.iter().map(|o| o.tpot_ms).sum::<f64>() / batch as f64
        };
        let (t1, t64, t512) = (mean_tpot(1), mean_tpot(64), mean_tpot(512));
        // A lone decode is memory-bound on the weights: ~7 ms on an H100.
        assert!(t1 > 6.0 && t1 < 8.5, "{t1}");
        assert!(t64 > t1 * 1.3, "{t1} {t64}");
        assert!(t512 > t64 * 1.5, "{t64} {t512}");
    }

    #[test]
    fn a_repeated_prefix_cuts_ttft() {
        let shared = "You are a helpful assistant. Here is a long shared document. ";
        let run = |prefix_caching: bool| {
            let mut cfg = h100();
            cfg.enable_prefix_caching = prefix_caching;
            let arrivals = vec![
                (0, req(shared, &uniq(1), 6000, 8)),
                (1_000_000, req(shared, &uniq(2), 6000, 8)),
            ];
            simulate(cfg, 1, arrivals)
        };
        let cached = run(true);
        let uncached = run(false);
        assert!(cached[1].ttft_ms < cached[0].ttft_ms / 5.0, "{:?}", cached);
        assert!(
            cached[1].stats.cached_tokens >= 5900,
            "{:?}",
            cached[1].stats
        );
        assert_eq!(uncached[1].stats.cached_tokens, 0);
        assert!(uncached[1].ttft_ms > uncached[0].ttft_ms * 0.8);
    }

    #[test]
    fn a_full_kv_cache_queues_requests() {
        // Tiny: 64 blocks of 16 tokens, max_num_seqs 8. Each request needs 480 + 16 tokens
        // (31 blocks), so only two fit at a time and the rest wait although seats are free.
        let run = |num_blocks: u32| {
            let mut cfg = Preset::Tiny.config();
            cfg.num_gpu_blocks = num_blocks;
            let mut e = Engine::new(cfg, 1);
            for i in 0..6 {
                // Distinct from the first byte, so nothing is shared through the prefix cache.
                e.submit(req(&uniq(i), "", 480, 16), 0).unwrap();
            }
            let (mut now, mut finished, mut kv_bound_queue_steps) = (0, 0, 0);
            while e.has_work() {
                let d = e.begin_step(now).expect("progress");
                let s = e.snapshot();
                if s.waiting > 0 && s.kv_usage > 0.9 && s.running < 8 {
                    kv_bound_queue_steps += 1;
                }
                now += d;
                finished += e
                    .finish_step()
                    .iter()
                    .filter(|ev| ev.finished.is_some())
                    .count();
            }
            assert_eq!(finished, 6);
            assert_eq!(e.snapshot().kv_usage, 0.0);
            (kv_bound_queue_steps, now)
        };
        let (small_queued, small_time) = run(64);
        let (big_queued, big_time) = run(1024);
        assert!(small_queued > 10, "{small_queued}");
        assert_eq!(big_queued, 0);
        assert!(small_time > big_time, "{small_time} {big_time}");
    }

    #[test]
    fn decode_out_of_blocks_preempts_and_still_finishes_everything() {
        // Three requests that fit at admission (19 blocks each) but grow to 57 blocks each.
        let arrivals = (0..3).map(|i| (0, req(&uniq(i), "", 300, 600))).collect();
        let mut e = Engine::new(Preset::Tiny.config(), 1);
        let out = {
            let o = simulate(Preset::Tiny.config(), 1, arrivals);
            // Re-run by hand to read the counters.
            for i in 0..3 {
                e.submit(req(&uniq(i), "", 300, 600), 0).unwrap();
            }
            let mut now = 0;
            while let Some(d) = e.begin_step(now) {
                now += d;
                e.finish_step();
            }
            o
        };
        assert_eq!(out.len(), 3);
        assert!(out.iter().all(|o| o.stats.output_tokens == 600));
        assert!(e.stats().preemptions > 0);
        assert!(out.iter().any(|o| o.stats.preemptions > 0));
    }

    #[test]
    fn lora_miss_costs_more_than_a_hit() {
        let mut cfg = Preset::Tiny.config(); // max_loras = 1
        cfg.cost.lora_load_us = 50_000.0;
        let with = |name: &str, r: SimRequest| SimRequest {
            lora: Some(name.into()),
            ..r
        };
        let arrivals = vec![
            (0, with("lora-0", req("l", &uniq(0), 64, 4))),
            (1_000_000, with("lora-0", req("l", &uniq(1), 64, 4))), // hit
            (2_000_000, with("lora-1", req("l", &uniq(2), 64, 4))), // miss, evicts lora-0
        ];
        let out = simulate(cfg, 1, arrivals);
        let (hit, miss) = (out[1].ttft_ms, out[2].ttft_ms);
        assert!(miss > hit + 45.0, "hit {hit} miss {miss}");
        // Base-model requests never pay the load.
        let base = simulate(
            Preset::Tiny.config(),
            1,
            vec![(0, req("l", &uniq(3), 64, 4))],
        );
        assert!(base[0].ttft_ms < 10.0);
    }

    #[test]
    fn adapters_beyond_max_loras_wait_for_a_slot() {
        let cfg = Preset::Tiny.config(); // max_loras = 1
        let mut e = Engine::new(cfg, 1);
        let mut a = req("w", &uniq(0), 32, 50);
        a.lora = Some("lora-0".into());
        let mut b = req("w", &uniq(1), 32, 50);
        b.lora = Some("lora-1".into());
        e.submit(a, 0).unwrap();
        e.submit(b, 0).unwrap();
        e.begin_step(0).unwrap();
        let s = e.snapshot();
        assert_eq!((s.running, s.waiting), (1, 1));
        assert_eq!(s.running_loras, vec!["lora-0".to_owned()]);
        assert_eq!(s.waiting_loras, vec!["lora-1".to_owned()]);
    }

    #[test]
    fn max_tokens_and_ignore_eos_are_honoured() {
        let mut arrivals = Vec::new();
        for i in 0..50 {
            let mut r = req("o", &uniq(i), 32, 300);
            r.ignore_eos = i % 2 == 0;
            arrivals.push((0, r));
        }
        let out = simulate(h100(), 7, arrivals);
        for o in &out {
            if o.index % 2 == 0 {
                assert_eq!(o.stats.output_tokens, 300);
                assert_eq!(o.stats.reason, FinishReason::Length);
            } else {
                assert!(o.stats.output_tokens <= 300);
            }
        }
        assert!(out.iter().any(|o| o.stats.reason == FinishReason::Stop));
    }

    #[test]
    fn same_seed_same_result_and_other_seed_differs() {
        let arrivals = |n: usize| {
            (0..n)
                .map(|i| {
                    let mut r = req("s", &uniq(i), 100 + (i as u32 * 37) % 900, 500);
                    r.ignore_eos = false;
                    ((i as u64) * 7_000, r)
                })
                .collect::<Vec<_>>()
        };
        let a = simulate(h100(), 42, arrivals(200));
        let b = simulate(h100(), 42, arrivals(200));
        let c = simulate(h100(), 43, arrivals(200));
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn long_prompts_are_prefilled_in_chunks_alongside_decodes() {
        // A decoding request keeps producing tokens while a long prompt is chunked.
        let mut e = Engine::new(h100(), 1);
        let d = e.submit(req("c", &uniq(0), 100, 1000), 0).unwrap();
        let mut now = 0;
        now += e.begin_step(now).unwrap();
        e.finish_step();
        let long = e.submit(req("c", &uniq(1), 30_000, 4), now).unwrap();
        let mut steps_until_first = 0;
        let mut decode_tokens = 0;
        loop {
            now += e.begin_step(now).unwrap();
            steps_until_first += 1;
            let evs = e.finish_step();
            decode_tokens += evs.iter().filter(|ev| ev.id == d).count();
            if evs.iter().any(|ev| ev.id == long) {
                break;
            }
        }
        // 30,000 tokens with an 8,192-token budget minus the decode: 4 chunks.
        assert_eq!(steps_until_first, 4);
        assert_eq!(decode_tokens, 4);
    }

    #[test]
    fn refuses_what_vllm_refuses() {
        let mut e = Engine::new(Preset::Tiny.config(), 1);
        let err = e.submit(req("x", "", 1000, 100), 0).unwrap_err();
        assert!(
            err.to_string()
                .contains("maximum context length is 1024 tokens"),
            "{err}"
        );
        let mut r = req("x", "", 10, 10);
        r.lora = Some("nope".into());
        assert_eq!(
            e.submit(r, 0).unwrap_err(),
            SubmitError::UnknownAdapter("nope".into())
        );
        assert_eq!(
            e.submit(req("x", "", 10, 0), 0).unwrap_err(),
            SubmitError::ZeroMaxTokens
        );
    }

    #[test]
    fn abort_frees_blocks() {
        let mut e = Engine::new(Preset::Tiny.config(), 1);
        let id = e.submit(req("a", &uniq(0), 400, 100), 0).unwrap();
        e.begin_step(0).unwrap();
        e.abort(id);
        assert!(e.finish_step().is_empty());
        assert_eq!(e.snapshot().kv_usage, 0.0);
        assert!(!e.has_work());
    }
}
