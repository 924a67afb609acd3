//! Turning a served request into a [`TrainingSample`].
//!
//! Upstream semantics (SLO reference §3.5–§3.7): latencies are measured **from dispatch**
//! (queueing in the picker excluded); TTFT ends at the first streamed chunk, or at the end
//! of the response when it is not streamed; one chunk counts as one token, and
//! `TPOT = (e2e − TTFT) / (chunks − 1)` — vLLM's inter-token latency, not NTPOT. The
//! features are the ones captured at dispatch, not re-read at the end, because by then the
//! endpoint's load includes this request.
//!
//! Times are passed in by the caller, so the tracker works with a real or a virtual clock.

use std::time::{Duration, Instant};

use crate::features::{Features, TrainingSample};

/// Per-request latency bookkeeping, from dispatch to the end of the response.
#[derive(Clone, Copy, Debug)]
pub struct LatencyTracker {
    features: Features,
    dispatched_at: Instant,
    streaming: bool,
    first_chunk_at: Option<Instant>,
    chunks: u32,
}

/// The latencies a finished request had (also handy for SLO metrics).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Measured {
    /// Dispatch to first chunk (or to the end when not streamed), milliseconds.
    pub ttft_ms: f64,
    /// Mean inter-chunk latency after the first chunk, milliseconds; `None` with fewer than
    /// two chunks or when not streamed.
    pub tpot_ms: Option<f64>,
    /// Dispatch to the end of the response, milliseconds.
    pub e2e_ms: f64,
    /// Chunks seen.
    pub chunks: u32,
}

impl LatencyTracker {
    /// Starts tracking at dispatch, with the features the predictor saw for the chosen
    /// endpoint.
    pub fn dispatched(features: Features, at: Instant, streaming: bool) -> Self {
        LatencyTracker {
            features,
            dispatched_at: at,
            streaming,
            first_chunk_at: None,
            chunks: 0,
        }
    }

    /// Records one response body chunk (one token, by upstream's convention). Empty
    /// chunks, such as a final empty frame, should not be reported.
    pub fn on_chunk(&mut self, at: Instant) {
        if self.first_chunk_at.is_none() {
            self.first_chunk_at = Some(at);
        }
        self.chunks = self.chunks.saturating_add(1);
    }

    /// The latencies of a completed response ending at `at`; `None` if no chunk arrived
    /// (an error or a disconnect before the first token teaches nothing about latency).
    pub fn finish(&self, at: Instant) -> Option<Measured> {
        let first = self.first_chunk_at?;
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let e2e_ms = ms(at.saturating_duration_since(self.dispatched_at));
        let (ttft_ms, tpot_ms) = if self.streaming {
            let ttft = ms(first.saturating_duration_since(self.dispatched_at));
            let tpot = (self.chunks > 1).then(|| (e2e_ms - ttft) / f64::from(self.chunks - 1));
            (ttft, tpot)
        } else {
            (e2e_ms, None)
        };
        Some(Measured {
            ttft_ms,
            tpot_ms,
            e2e_ms,
            chunks: self.chunks,
        })
    }

    /// The training sample of a completed response ending at `at` (see [`Self::finish`]).
    pub fn training_sample(&self, at: Instant) -> Option<TrainingSample> {
        let m = self.finish(at)?;
        Some(TrainingSample {
            // What the response turned out to be decides which model the sample trains.
            features_at_dispatch: Features {
                streamed: self.streaming,
                ..self.features
            },
            ttft_ms: Some(m.ttft_ms),
            tpot_ms: m.tpot_ms,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn streaming_response_measures_ttft_and_inter_token_latency() {
        let t0 = Instant::now();
        let f = Features {
            input_tokens: 123,
            ..Features::default()
        };
        let mut t = LatencyTracker::dispatched(f, t0, true);
        t.on_chunk(t0 + ms(100)); // first token
        t.on_chunk(t0 + ms(120));
        t.on_chunk(t0 + ms(140));
        t.on_chunk(t0 + ms(160));
        let s = t.training_sample(t0 + ms(160)).unwrap();
        // The response was streamed: the sample trains the streamed model.
        assert_eq!(
            s.features_at_dispatch,
            Features {
                streamed: true,
                ..f
            }
        );
        assert!((s.ttft_ms.unwrap() - 100.0).abs() < 1e-9);
        assert!(
            (s.tpot_ms.unwrap() - 20.0).abs() < 1e-9,
            "(160-100)/(4-1) = 20"
        );
    }

    #[test]
    fn non_streamed_response_trains_ttft_with_e2e_only() {
        let t0 = Instant::now();
        let mut t = LatencyTracker::dispatched(Features::default(), t0, false);
        t.on_chunk(t0 + ms(300));
        let s = t.training_sample(t0 + ms(450)).unwrap();
        assert!(
            !s.features_at_dispatch.streamed,
            "trains the whole-response model"
        );
        assert!((s.ttft_ms.unwrap() - 450.0).abs() < 1e-9);
        assert_eq!(s.tpot_ms, None);
    }

    #[test]
    fn single_chunk_has_no_tpot_and_no_chunk_has_no_sample() {
        let t0 = Instant::now();
        let mut t = LatencyTracker::dispatched(Features::default(), t0, true);
        assert!(
            t.training_sample(t0 + ms(50)).is_none(),
            "disconnect before first token"
        );
        t.on_chunk(t0 + ms(40));
        let m = t.finish(t0 + ms(40)).unwrap();
        assert_eq!(m.tpot_ms, None);
        assert_eq!(m.chunks, 1);
    }
}
