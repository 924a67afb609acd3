//! The request headers of predicted-latency routing (SLO reference §1, seeds 002/004).

use crate::types::LlmRequest;

/// TTFT SLO, milliseconds (current llm-d name, read first).
pub const TTFT_SLO_HEADER: &str = "x-llm-d-slo-ttft-ms";
/// TTFT SLO, milliseconds (the name in seeds 002/004; still accepted).
pub const TTFT_SLO_HEADER_ALIAS: &str = "x-slo-ttft-ms";
/// TPOT (vLLM's inter-token latency, not NTPOT) SLO, milliseconds.
pub const TPOT_SLO_HEADER: &str = "x-llm-d-slo-tpot-ms";
/// TPOT SLO alias (seeds 002/004).
pub const TPOT_SLO_HEADER_ALIAS: &str = "x-slo-tpot-ms";
/// Present on a request: route it without predictions (seed 004).
pub const OPT_OUT_HEADER: &str = "x-prediction-based-scheduling-off";
/// Seed 002's opt-in header; `false` is honoured as an opt-out so old clients keep working.
pub const LEGACY_OPT_IN_HEADER: &str = "x-prediction-based-scheduling";

/// The SLOs a request carries. 0 means "no SLO given".
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Slo {
    /// TTFT SLO in milliseconds (0 when absent or unparsable).
    pub ttft_ms: f64,
    /// TPOT SLO in milliseconds (0 when absent or unparsable).
    pub tpot_ms: f64,
}

impl Slo {
    /// Reads the SLO headers, current name first, then the alias. A missing, unparsable,
    /// negative or non-finite value counts as 0 (no SLO), as upstream does, so that a bad
    /// header never fails the request.
    pub fn from_request(request: &LlmRequest) -> Slo {
        Slo {
            ttft_ms: read_ms(request, TTFT_SLO_HEADER, TTFT_SLO_HEADER_ALIAS),
            tpot_ms: read_ms(request, TPOT_SLO_HEADER, TPOT_SLO_HEADER_ALIAS),
        }
    }

    /// Whether a TTFT SLO was given (shedding only applies then).
    pub fn has_ttft(&self) -> bool {
        self.ttft_ms > 0.0
    }
}

fn read_ms(request: &LlmRequest, name: &str, alias: &str) -> f64 {
    let Some(raw) = request.header(name).or_else(|| request.header(alias)) else {
        return 0.0;
    };
    match raw.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => v,
        _ => {
            tracing::debug!(
                header = name,
                value = raw,
                "SLO header is not a positive number of milliseconds; ignoring it"
            );
            0.0
        }
    }
}

/// Whether the request opts out of predicted-latency routing: `x-prediction-based-scheduling-off`
/// is present (any value), or the legacy `x-prediction-based-scheduling` says `false`.
pub fn opted_out(request: &LlmRequest) -> bool {
    request.header(OPT_OUT_HEADER).is_some()
        || request
            .header(LEGACY_OPT_IN_HEADER)
            .is_some_and(|v| v.trim().eq_ignore_ascii_case("false"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(h: &[(&str, &str)]) -> LlmRequest {
        LlmRequest {
            headers: h
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..LlmRequest::default()
        }
    }

    #[test]
    fn current_name_wins_over_alias_and_bad_values_mean_no_slo() {
        let s = Slo::from_request(&req(&[
            ("X-SLO-TTFT-MS", "500"),
            ("x-llm-d-slo-ttft-ms", "250.5"),
            ("x-slo-tpot-ms", "abc"),
        ]));
        assert_eq!(s.ttft_ms, 250.5);
        assert_eq!(s.tpot_ms, 0.0);
        let s = Slo::from_request(&req(&[("x-slo-tpot-ms", "-3"), ("x-slo-ttft-ms", "inf")]));
        assert_eq!(s, Slo::default());
        assert!(!s.has_ttft());
    }

    #[test]
    fn opt_out_by_new_header_or_legacy_false() {
        assert!(opted_out(&req(&[(
            "x-prediction-based-scheduling-off",
            ""
        )])));
        assert!(opted_out(&req(&[(
            "x-prediction-based-scheduling",
            "False"
        )])));
        assert!(!opted_out(&req(&[(
            "x-prediction-based-scheduling",
            "true"
        )])));
        assert!(!opted_out(&req(&[])));
    }
}
