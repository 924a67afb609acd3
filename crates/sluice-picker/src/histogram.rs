//! A classic Prometheus histogram updated without a lock.
//!
//! prometheus-client's `Histogram` takes a mutex on every observation. A request observes
//! about twenty histograms (plugin durations, sizes, tokens, latencies), most of them shared
//! by every request, so the picker's worker threads took and passed those mutexes back and
//! forth all the time. This histogram keeps one atomic counter per bucket and the sum as
//! the bits of an `f64`: an observation is one `fetch_add` and one compare-and-swap.
//!
//! It encodes through prometheus-client's own histogram encoder, so the exposition text is
//! the same as prometheus-client's `Histogram` with the same buckets and observations
//! (`the_exposition_is_prometheus_clients`). Buckets, including where NaN and values above
//! the last bound go, follow prometheus-client too.
//!
//! What a scrape sees: `_count` is the sum of the bucket counters read at encoding time, so
//! it always equals the `+Inf` bucket. An observation that is in flight during a scrape may
//! already be in its bucket and not yet in `_sum` (or the other way round); the next scrape
//! sees both. prometheus-client's mutex ruled that out, but a scraper cannot tell the
//! difference from an observation made a microsecond later.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::{MetricType, TypedMetric};

/// A histogram with fixed buckets whose observations take no lock. Clones share the
/// counters, like prometheus-client's `Histogram`.
#[derive(Clone, Debug)]
pub struct Histogram {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// Upper bounds in the order given, ending with `+Inf`.
    bounds: Box<[f64]>,
    /// Observations per bucket (not cumulative), parallel to `bounds`.
    counts: Box<[AtomicU64]>,
    /// `f64::to_bits` of the sum of observations.
    sum: AtomicU64,
}

impl Histogram {
    /// A histogram with these upper bounds (non-finite ones are dropped) and `+Inf`, as
    /// prometheus-client's `Histogram::new` builds them.
    pub fn new(buckets: impl IntoIterator<Item = f64>) -> Self {
        let bounds: Box<[f64]> = buckets
            .into_iter()
            .filter(|b| b.is_finite())
            .chain(std::iter::once(f64::INFINITY))
            .collect();
        let counts = bounds.iter().map(|_| AtomicU64::new(0)).collect();
        Histogram {
            inner: Arc::new(Inner {
                bounds,
                counts,
                sum: AtomicU64::new(0f64.to_bits()),
            }),
        }
    }

    /// Records one observation.
    #[inline]
    pub fn observe(&self, v: f64) {
        let inner = &*self.inner;
        // The first bound at or above `v`; NaN (above none) and anything above every bound
        // go to the last bucket, `+Inf`, as in prometheus-client.
        let last = inner.counts.len().saturating_sub(1);
        let i = if v.is_nan() {
            last
        } else {
            inner.bounds.iter().position(|b| *b >= v).unwrap_or(last)
        };
        if let Some(c) = inner.counts.get(i) {
            c.fetch_add(1, Ordering::Relaxed);
        }
        let mut cur = inner.sum.load(Ordering::Relaxed);
        loop {
            let next = (f64::from_bits(cur) + v).to_bits();
            match inner
                .sum
                .compare_exchange_weak(cur, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => break,
                Err(seen) => cur = seen,
            }
        }
    }

    /// The sum of the observations.
    pub fn sum(&self) -> f64 {
        f64::from_bits(self.inner.sum.load(Ordering::Relaxed))
    }

    /// The number of observations.
    pub fn count(&self) -> u64 {
        self.inner
            .counts
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .sum()
    }
}

impl TypedMetric for Histogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for Histogram {
    fn encode(&self, mut encoder: MetricEncoder<'_>) -> Result<(), std::fmt::Error> {
        let inner = &*self.inner;
        let buckets: Vec<(f64, u64)> = inner
            .bounds
            .iter()
            .zip(inner.counts.iter())
            .map(|(b, c)| (*b, c.load(Ordering::Relaxed)))
            .collect();
        let count = buckets.iter().map(|(_, c)| c).sum();
        encoder.encode_histogram::<NoLabelSet>(self.sum(), count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::encoding::text::encode;
    use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
    use prometheus_client::metrics::family::Family;
    use prometheus_client::registry::Registry;

    #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
    struct Labels {
        point: Point,
    }

    #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
    enum Point {
        Scorer,
    }

    const BOUNDS: [f64; 5] = [0.0001, 0.001, 0.01, 0.1, 1.0];

    /// The same observations through ours and prometheus-client's, alone and in a family.
    fn expositions(values: &[f64]) -> (String, String) {
        let text = |reg: &Registry| {
            let mut s = String::new();
            encode(&mut s, reg).unwrap();
            s
        };
        let ours = Histogram::new(BOUNDS);
        let theirs = prometheus_client::metrics::histogram::Histogram::new(BOUNDS);
        fn ours_ctor() -> Histogram {
            Histogram::new(BOUNDS)
        }
        fn theirs_ctor() -> prometheus_client::metrics::histogram::Histogram {
            prometheus_client::metrics::histogram::Histogram::new(BOUNDS)
        }
        let ours_family: Family<Labels, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(ours_ctor);
        let theirs_family: Family<
            Labels,
            prometheus_client::metrics::histogram::Histogram,
            fn() -> prometheus_client::metrics::histogram::Histogram,
        > = Family::new_with_constructor(theirs_ctor);
        // One series per family: a family's series come out in hash-map order.
        let labels = Labels {
            point: Point::Scorer,
        };
        for &v in values {
            ours.observe(v);
            theirs.observe(v);
            ours_family.get_or_create(&labels).observe(v);
            theirs_family.get_or_create(&labels).observe(v);
        }
        let (mut a, mut b) = (Registry::default(), Registry::default());
        a.register("plugin_duration_seconds", "Plugin durations", ours);
        b.register("plugin_duration_seconds", "Plugin durations", theirs);
        a.register("by_point_seconds", "By point", ours_family);
        b.register("by_point_seconds", "By point", theirs_family);
        (text(&a), text(&b))
    }

    #[test]
    fn the_exposition_is_prometheus_clients() {
        // Values on bounds, between them, above the last, zero, negative, and in every
        // bucket, so that a bucket off by one or a cumulative count shows in the text.
        let values = [
            0.0, 0.00005, 0.0001, 0.00011, 0.001, 0.005, 0.01, 0.05, 0.1, 0.7, 1.0, 1.5, 42.0, -3.0,
        ];
        let (ours, theirs) = expositions(&values);
        assert_eq!(ours, theirs);
        assert!(
            ours.contains("plugin_duration_seconds_bucket{le=\"0.001\"} 6"),
            "{ours}"
        );
        assert!(ours.contains("plugin_duration_seconds_count 14"), "{ours}");
    }

    #[test]
    fn an_empty_histogram_exposes_like_prometheus_clients() {
        let (ours, theirs) = expositions(&[]);
        assert_eq!(ours, theirs);
    }

    #[test]
    fn nan_goes_to_the_inf_bucket_like_prometheus_clients() {
        let (ours, theirs) = expositions(&[0.5, f64::NAN]);
        // Both sums are NaN, which prints the same; the count and +Inf bucket hold it.
        assert_eq!(ours, theirs);
        assert!(ours.contains("plugin_duration_seconds_bucket{le=\"+Inf\"} 2"));
    }

    #[test]
    fn observations_from_many_threads_all_count() {
        let h = Histogram::new(BOUNDS);
        std::thread::scope(|s| {
            for t in 0..4 {
                let h = h.clone();
                s.spawn(move || {
                    for i in 0..10_000u32 {
                        // Exactly representable, so the sum does not depend on the order.
                        h.observe(f64::from((i + t) % 4) * 0.25);
                    }
                });
            }
        });
        assert_eq!(h.count(), 40_000);
        // Each thread adds 2,500 × (0 + 0.25 + 0.5 + 0.75) = 3,750.
        assert_eq!(h.sum(), 15_000.0);
    }
}
