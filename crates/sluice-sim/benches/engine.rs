//! Engine cost: how much CPU one simulated server's state machine needs per request, which
//! bounds how many simulated servers one process can run.

use criterion::{Criterion, criterion_group, criterion_main};
use sluice_sim::engine::{SimRequest, simulate};
use sluice_sim::preset::Preset;
use sluice_sim::tokenizer::block_hashes;

fn requests(n: usize) -> Vec<(u64, SimRequest)> {
    (0..n)
        .map(|i| {
            let text = format!("{:064}", i % 50).repeat(16) + &format!("{i:0256}");
            (
                // 60 requests per simulated second on one server.
                i as u64 * 16_666,
                SimRequest {
                    prompt_tokens: 320,
                    block_hashes: block_hashes(text.as_bytes(), "m", None, 16),
                    max_tokens: Some(32),
                    ignore_eos: true,
                    lora: None,
                },
            )
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let reqs = requests(600);
    c.bench_function("simulate 600 requests (10 s at 60 req/s, H100)", |b| {
        b.iter(|| simulate(Preset::H100Llama8b.config(), 1, reqs.clone()))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
