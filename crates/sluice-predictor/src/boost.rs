//! A small gradient-boosted ensemble of *oblivious* regression trees, used to correct the
//! linear model's relative error (see the module doc of `model.rs` for why).
//!
//! An oblivious tree splits every node of one level on the same (feature, threshold), so a
//! depth-`D` tree is `D` comparisons that build a leaf index: evaluation is branch-free and
//! costs a few nanoseconds per tree, which keeps 100 endpoints well inside the picker's
//! microsecond budget. Training is histogram-based: features are cut into at most
//! [`MAX_BINS`] quantile bins once, and each level scans (node, feature, bin) sums, so a fit
//! is `O(trees · depth · rows · features)` with no sorting inside the loop and no
//! randomness (deterministic for a given sample set).
//!
//! The loss is squared error on the residual the caller passes (here the log of
//! `actual / linear prediction`), with leaf values shrunk towards zero by
//! [`LEAF_PRIOR`] pseudo-samples so that a leaf holding a handful of samples barely moves
//! the prediction.

// Histogram loops index several parallel arrays by the same feature/bin/node numbers.
#![allow(clippy::needless_range_loop)]

/// Input width of the trees.
pub(crate) const TREE_FEATURES: usize = 16;

/// Levels per tree (16 leaves).
pub(crate) const DEPTH: usize = 4;

/// Quantile bins per feature; thresholds are chosen among the bin edges.
const MAX_BINS: usize = 32;

/// Pseudo-samples that shrink every leaf value towards zero.
const LEAF_PRIOR: f64 = 20.0;

/// Residuals beyond ±this are clipped before fitting (a factor of e² ≈ 7.4 either way), so
/// a few pathological samples cannot dominate a leaf.
const RESIDUAL_CLIP: f64 = 2.0;

/// Settings of one boosted fit.
#[derive(Clone, Copy, Debug)]
pub(crate) struct BoostParams {
    /// Trees in the ensemble.
    pub trees: usize,
    /// Shrinkage applied to every tree's leaf values.
    pub learning_rate: f64,
    /// Rows fitted at most; above this a deterministic stride picks the rows.
    pub max_rows: usize,
}

impl Default for BoostParams {
    fn default() -> Self {
        BoostParams {
            trees: 32,
            learning_rate: 0.25,
            max_rows: 20_000,
        }
    }
}

/// One oblivious tree: level `l` sends a row right when `x[feature[l]] > threshold[l]`.
#[derive(Clone, Debug, PartialEq)]
struct Tree {
    feature: [u8; DEPTH],
    threshold: [f32; DEPTH],
    leaves: [f32; 1 << DEPTH],
}

/// A fitted ensemble; an empty one predicts 0.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct Boost {
    trees: Vec<Tree>,
}

impl Boost {
    /// The ensemble's correction for one row.
    #[inline]
    pub(crate) fn eval(&self, x: &[f32; TREE_FEATURES]) -> f64 {
        let mut acc = 0.0_f32;
        for t in &self.trees {
            let mut idx = 0usize;
            for l in 0..DEPTH {
                let v = x[usize::from(t.feature[l])];
                idx |= usize::from(v > t.threshold[l]) << l;
            }
            acc += t.leaves[idx];
        }
        f64::from(acc)
    }

    /// Number of trees.
    pub(crate) fn len(&self) -> usize {
        self.trees.len()
    }

    /// Fits `params.trees` trees to `residual` (one per row of `x`). Non-finite inputs are
    /// treated as 0 so a bad row cannot poison a histogram.
    pub(crate) fn fit(x: &[[f32; TREE_FEATURES]], residual: &[f64], params: BoostParams) -> Boost {
        let n_all = x.len().min(residual.len());
        if n_all == 0 || params.trees == 0 {
            return Boost::default();
        }
        let stride = n_all.div_ceil(params.max_rows.max(1));
        let rows: Vec<usize> = (0..n_all).step_by(stride.max(1)).collect();
        let n = rows.len();

        // Bin edges per feature from the sorted values (at most MAX_BINS − 1 cuts).
        let mut edges: Vec<Vec<f32>> = Vec::with_capacity(TREE_FEATURES);
        let mut col = Vec::with_capacity(n);
        for f in 0..TREE_FEATURES {
            col.clear();
            col.extend(rows.iter().map(|&i| finite_or_zero(x[i][f])));
            col.sort_by(f32::total_cmp);
            let mut e: Vec<f32> = (1..MAX_BINS)
                .map(|k| col[(k * (n - 1)) / MAX_BINS])
                .collect();
            e.dedup();
            // A cut at the maximum separates nothing.
            if e.last().is_some_and(|&v| v >= col[n - 1]) {
                e.pop();
            }
            edges.push(e);
        }
        // bins[r * F + f]: the bin of row r in feature f (number of edges below the value).
        let mut bins = vec![0u8; n * TREE_FEATURES];
        for (r, &i) in rows.iter().enumerate() {
            for f in 0..TREE_FEATURES {
                let v = finite_or_zero(x[i][f]);
                let b = edges[f].partition_point(|&e| e < v);
                bins[r * TREE_FEATURES + f] = u8::try_from(b).unwrap_or(u8::MAX);
            }
        }

        let mut target: Vec<f64> = rows
            .iter()
            .map(|&i| {
                let r = residual[i];
                if r.is_finite() {
                    r.clamp(-RESIDUAL_CLIP, RESIDUAL_CLIP)
                } else {
                    0.0
                }
            })
            .collect();
        let mut node = vec![0usize; n];
        let mut trees = Vec::with_capacity(params.trees);
        // hist[(node * F + f) * MAX_BINS + b] = (count, sum)
        let mut hist = vec![(0u32, 0.0f64); (1 << DEPTH) * TREE_FEATURES * MAX_BINS];
        for _ in 0..params.trees {
            node.iter_mut().for_each(|v| *v = 0);
            let mut feature = [0u8; DEPTH];
            let mut threshold = [f32::INFINITY; DEPTH];
            for level in 0..DEPTH {
                let nodes = 1 << level;
                hist[..nodes * TREE_FEATURES * MAX_BINS]
                    .iter_mut()
                    .for_each(|h| *h = (0, 0.0));
                for r in 0..n {
                    let base = node[r] * TREE_FEATURES;
                    for f in 0..TREE_FEATURES {
                        let b = usize::from(bins[r * TREE_FEATURES + f]);
                        let h = &mut hist[(base + f) * MAX_BINS + b];
                        h.0 += 1;
                        h.1 += target[r];
                    }
                }
                // Best (feature, cut): the largest total of sum²/(count + prior) over the
                // children of every node of this level.
                let mut best = (0.0_f64, None::<(usize, usize)>);
                for f in 0..TREE_FEATURES {
                    let cuts = edges[f].len();
                    if cuts == 0 {
                        continue;
                    }
                    // Per node: running left sums while the cut moves right.
                    let mut left = vec![(0u32, 0.0f64); nodes];
                    let totals: Vec<(u32, f64)> = (0..nodes)
                        .map(|k| {
                            hist[(k * TREE_FEATURES + f) * MAX_BINS..][..MAX_BINS]
                                .iter()
                                .fold((0, 0.0), |a, h| (a.0 + h.0, a.1 + h.1))
                        })
                        .collect();
                    for cut in 0..cuts {
                        // Cut `cut` sends bins 0..=cut left (values <= edges[cut]).
                        let mut gain = 0.0;
                        for k in 0..nodes {
                            let h = hist[(k * TREE_FEATURES + f) * MAX_BINS + cut];
                            left[k].0 += h.0;
                            left[k].1 += h.1;
                            let (lc, ls) = left[k];
                            let (rc, rs) = (totals[k].0 - lc, totals[k].1 - ls);
                            gain += ls * ls / (f64::from(lc) + LEAF_PRIOR)
                                + rs * rs / (f64::from(rc) + LEAF_PRIOR);
                        }
                        if gain > best.0 {
                            best = (gain, Some((f, cut)));
                        }
                    }
                }
                let Some((f, cut)) = best.1 else {
                    // Nothing separates anything: leave this level a no-op.
                    feature[level] = 0;
                    threshold[level] = f32::INFINITY;
                    continue;
                };
                feature[level] = u8::try_from(f).unwrap_or(0);
                threshold[level] = edges[f][cut];
                for r in 0..n {
                    if usize::from(bins[r * TREE_FEATURES + f]) > cut {
                        node[r] |= 1 << level;
                    }
                }
            }
            let mut sums = [(0u32, 0.0f64); 1 << DEPTH];
            for r in 0..n {
                sums[node[r]].0 += 1;
                sums[node[r]].1 += target[r];
            }
            let mut leaves = [0.0f32; 1 << DEPTH];
            for (leaf, (c, s)) in leaves.iter_mut().zip(sums) {
                *leaf = (params.learning_rate * s / (f64::from(c) + LEAF_PRIOR)) as f32;
            }
            for r in 0..n {
                target[r] -= f64::from(leaves[node[r]]);
            }
            trees.push(Tree {
                feature,
                threshold,
                leaves,
            });
        }
        Boost { trees }
    }
}

fn finite_or_zero(v: f32) -> f32 {
    if v.is_finite() { v } else { 0.0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(a: f32, b: f32) -> [f32; TREE_FEATURES] {
        let mut x = [0.0; TREE_FEATURES];
        x[0] = a;
        x[3] = b;
        x
    }

    #[test]
    fn an_interaction_a_linear_model_cannot_express_is_learned() {
        // Residual +0.5 only where both a > 5 and b > 5 (an AND), −0.2 elsewhere.
        let mut xs = Vec::new();
        let mut ys = Vec::new();
        for i in 0..40 {
            for j in 0..40 {
                let (a, b) = (i as f32 / 4.0, j as f32 / 4.0);
                xs.push(row(a, b));
                ys.push(if a > 5.0 && b > 5.0 { 0.5 } else { -0.2 });
            }
        }
        let m = Boost::fit(&xs, &ys, BoostParams::default());
        assert_eq!(m.len(), 32);
        let err: f64 = xs
            .iter()
            .zip(&ys)
            .map(|(x, y)| (m.eval(x) - y).abs())
            .sum::<f64>()
            / ys.len() as f64;
        assert!(err < 0.03, "mean abs error {err}");
        assert!((m.eval(&row(8.0, 8.0)) - 0.5).abs() < 0.05);
        assert!((m.eval(&row(8.0, 1.0)) + 0.2).abs() < 0.05);
    }

    #[test]
    fn constant_or_empty_data_gives_a_harmless_model() {
        assert_eq!(
            Boost::fit(&[], &[], BoostParams::default()).eval(&row(1.0, 1.0)),
            0.0
        );
        let xs = vec![row(1.0, 1.0); 100];
        let ys = vec![0.3; 100];
        let m = Boost::fit(&xs, &ys, BoostParams::default());
        // No split separates identical rows; the leaves converge to the mean residual.
        assert!(
            (m.eval(&row(1.0, 1.0)) - 0.3).abs() < 0.05,
            "{}",
            m.eval(&row(1.0, 1.0))
        );
        // Far outside the training range the prediction stays bounded by what was seen.
        assert!(m.eval(&row(1e9, -1e9)).abs() <= 0.31);
    }

    #[test]
    fn non_finite_inputs_and_outliers_do_not_poison_the_fit() {
        let mut xs: Vec<_> = (0..200).map(|i| row(i as f32, 0.0)).collect();
        let mut ys: Vec<f64> = (0..200).map(|i| if i < 100 { -0.1 } else { 0.1 }).collect();
        xs.push(row(f32::NAN, f32::INFINITY));
        ys.push(f64::NAN);
        ys[5] = 1e9;
        let m = Boost::fit(&xs, &ys, BoostParams::default());
        assert!(m.eval(&row(150.0, 0.0)) > 0.05);
        assert!(m.eval(&row(f32::NAN, 0.0)).is_finite());
        assert!(m.eval(&row(50.0, 0.0)) < 0.0);
    }
}
