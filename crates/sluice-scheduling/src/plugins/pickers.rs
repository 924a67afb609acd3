//! `max-score-picker`, `random-picker`, `weighted-random-picker`.

use std::sync::Arc;

use rand::Rng;
use rand::seq::SliceRandom;
use serde::Deserialize;

use crate::cycle::Cycle;
use crate::plugin::{Picker, Plugin, TypedName};
use crate::registry::PluginInit;
use crate::types::ScoredEndpoint;

/// Parameters shared by the pickers.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct PickerParams {
    /// How many endpoints to return: the pick and then fallbacks (default 1; ≤ 0 means 1).
    pub max_num_of_endpoints: i64,
}

impl Default for PickerParams {
    fn default() -> Self {
        PickerParams {
            max_num_of_endpoints: 1,
        }
    }
}

impl PickerParams {
    fn count(self) -> usize {
        usize::try_from(self.max_num_of_endpoints)
            .unwrap_or(1)
            .max(1)
    }
}

/// How a picker chooses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PickerKind {
    /// Highest score first, ties broken at random (`max-score-picker`).
    MaxScore,
    /// Uniformly at random (`random-picker`).
    Random,
    /// Probability proportional to score (`weighted-random-picker`, A-Res sampling).
    WeightedRandom,
}

/// One of the built-in pickers.
#[derive(Debug)]
pub struct BuiltinPicker {
    name: TypedName,
    kind: PickerKind,
    count: usize,
}

impl BuiltinPicker {
    /// A picker returning up to `count` endpoints.
    pub fn new(name: TypedName, kind: PickerKind, count: usize) -> Self {
        BuiltinPicker {
            name,
            kind,
            count: count.max(1),
        }
    }

    pub(crate) fn factory(
        kind: PickerKind,
    ) -> impl Fn(&PluginInit<'_>) -> Result<Arc<dyn Plugin>, String> + Send + Sync {
        move |init| {
            let p: PickerParams = init
                .parse()
                .map_err(|e| format!("{e}; expected {{maxNumOfEndpoints: integer}}"))?;
            Ok(Arc::new(BuiltinPicker::new(
                init.typed_name.clone(),
                kind,
                p.count(),
            )))
        }
    }
}

impl Plugin for BuiltinPicker {
    fn typed_name(&self) -> &TypedName {
        &self.name
    }
    fn as_picker(self: Arc<Self>) -> Option<Arc<dyn Picker>> {
        Some(self)
    }
}

impl Picker for BuiltinPicker {
    fn pick(&self, cycle: &mut Cycle, scored: &mut [ScoredEndpoint], targets: &mut Vec<usize>) {
        if scored.is_empty() {
            return;
        }
        match self.kind {
            PickerKind::MaxScore => max_score(cycle, scored, self.count, targets),
            PickerKind::Random => random(cycle, scored, self.count, targets),
            PickerKind::WeightedRandom => {
                if scored.iter().all(|s| s.score <= 0.0 || s.score.is_nan()) {
                    random(cycle, scored, self.count, targets);
                } else {
                    weighted_random(cycle, scored, self.count, targets);
                }
            }
        }
    }
}

fn max_score(
    cycle: &mut Cycle,
    scored: &mut [ScoredEndpoint],
    count: usize,
    targets: &mut Vec<usize>,
) {
    if count == 1 {
        // Reservoir sampling over the ties: uniform among the best without shuffling.
        let mut best = scored[0];
        let mut ties = 1u32;
        for s in &scored[1..] {
            if s.score > best.score {
                best = *s;
                ties = 1;
            } else if s.score == best.score {
                ties += 1;
                if cycle.rng.random_range(0..ties) == 0 {
                    best = *s;
                }
            }
        }
        targets.push(best.index);
        return;
    }
    scored.shuffle(&mut cycle.rng);
    scored.sort_by(|a, b| b.score.total_cmp(&a.score));
    targets.extend(scored.iter().take(count).map(|s| s.index));
}

fn random(
    cycle: &mut Cycle,
    scored: &mut [ScoredEndpoint],
    count: usize,
    targets: &mut Vec<usize>,
) {
    if count == 1 {
        let i = cycle.rng.random_range(0..scored.len());
        targets.push(scored[i].index);
        return;
    }
    let (chosen, _) = scored.partial_shuffle(&mut cycle.rng, count);
    targets.extend(chosen.iter().map(|s| s.index));
}

fn weighted_random(
    cycle: &mut Cycle,
    scored: &mut [ScoredEndpoint],
    count: usize,
    targets: &mut Vec<usize>,
) {
    // A-Res: key = U^(1/score); compared through ln(U)/score, which orders the same and does
    // not underflow for small scores. Score ≤ 0 gets the lowest key.
    let key = |s: &ScoredEndpoint, rng: &mut rand::rngs::SmallRng| {
        if s.score > 0.0 {
            let u: f64 = 1.0 - rng.random::<f64>(); // (0, 1]
            u.ln() / s.score
        } else {
            f64::NEG_INFINITY
        }
    };
    if count == 1 {
        let mut best = (f64::NEG_INFINITY, scored[0].index);
        for s in scored.iter() {
            let k = key(s, &mut cycle.rng);
            if k > best.0 {
                best = (k, s.index);
            }
        }
        targets.push(best.1);
        return;
    }
    let mut keyed: Vec<(f64, usize)> = scored
        .iter()
        .map(|s| (key(s, &mut cycle.rng), s.index))
        .collect();
    keyed.shuffle(&mut cycle.rng);
    keyed.sort_by(|a, b| b.0.total_cmp(&a.0));
    targets.extend(keyed.iter().take(count).map(|k| k.1));
}
