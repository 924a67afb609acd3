//! InferenceModelRewrite rule selection (upstream `modelrewritestore.go` semantics).

use rand::Rng;
use sluice_core::ModelRewriteRule;

/// Picks the rewrite for `model`: rules that name the model exactly win over match-all
/// rules; among those, the first in precedence order (oldest resource first, then rule
/// order) wins. Its target is drawn by weight (uniformly when no weight is set). Returns the
/// rule and the target model, or `None` when no rule applies.
pub fn pick<'a>(
    rules: &'a [ModelRewriteRule],
    model: &str,
    rng: &mut impl Rng,
) -> Option<(&'a ModelRewriteRule, &'a str)> {
    let rule = rules
        .iter()
        .find(|r| r.matches.iter().any(|m| m == model) && !r.targets.is_empty())
        .or_else(|| {
            rules
                .iter()
                .find(|r| r.matches.is_empty() && !r.targets.is_empty())
        })?;
    let total: u64 = rule.targets.iter().map(|t| u64::from(t.weight)).sum();
    let target = if total == 0 {
        rule.targets.get(rng.random_range(0..rule.targets.len()))?
    } else {
        let mut draw = rng.random_range(0..total);
        rule.targets.iter().find(|t| {
            let w = u64::from(t.weight);
            if draw < w {
                true
            } else {
                draw -= w;
                false
            }
        })?
    };
    Some((rule, target.model_rewrite.as_str()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::SmallRng;
    use sluice_core::RewriteTarget;

    fn rule(source: &str, matches: &[&str], targets: &[(&str, u32)]) -> ModelRewriteRule {
        ModelRewriteRule {
            source: source.into(),
            created: String::new(),
            matches: matches.iter().map(|s| s.to_string()).collect(),
            targets: targets
                .iter()
                .map(|(m, w)| RewriteTarget {
                    model_rewrite: m.to_string(),
                    weight: *w,
                })
                .collect(),
        }
    }

    #[test]
    fn exact_match_beats_generic_and_order_breaks_ties() {
        let rules = vec![
            rule("ns/all", &[], &[("generic", 1)]),
            rule("ns/old", &["m"], &[("old-target", 1)]),
            rule("ns/new", &["m"], &[("new-target", 1)]),
        ];
        let mut rng = SmallRng::seed_from_u64(1);
        assert_eq!(
            pick(&rules, "m", &mut rng).map(|(r, t)| (r.source.as_str(), t)),
            Some(("ns/old", "old-target"))
        );
        assert_eq!(
            pick(&rules, "other", &mut rng).map(|(_, t)| t),
            Some("generic")
        );
        assert!(pick(&rules[1..], "other", &mut rng).is_none());
    }

    #[test]
    fn weights_are_honoured() {
        let rules = vec![rule(
            "ns/split",
            &["m"],
            &[("a", 90), ("b", 10), ("never", 0)],
        )];
        let mut rng = SmallRng::seed_from_u64(7);
        let mut a = 0;
        for _ in 0..10_000 {
            match pick(&rules, "m", &mut rng).map(|(_, t)| t) {
                Some("a") => a += 1,
                Some("b") => {}
                other => panic!("unexpected {other:?}"),
            }
        }
        assert!(
            (8_700..9_300).contains(&a),
            "a picked {a} times out of 10000 at weight 90%"
        );
    }

    #[test]
    fn no_weights_means_uniform() {
        let rules = vec![rule("ns/u", &["m"], &[("a", 0), ("b", 0)])];
        let mut rng = SmallRng::seed_from_u64(3);
        let a = (0..2000)
            .filter(|_| pick(&rules, "m", &mut rng).map(|(_, t)| t) == Some("a"))
            .count();
        assert!((800..1200).contains(&a), "{a}");
    }
}
