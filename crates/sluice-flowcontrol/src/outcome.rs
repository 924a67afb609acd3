//! Terminal outcomes of a request that was not dispatched, and how a client sees them.
//!
//! The mapping follows llm-d-router's `translateFlowControlOutcome` (reference
//! `flow-control.md` §6) rather than GIE v1.5.0: a TTL expiry while endpoints exist is the
//! pool being too busy, which is what 429 ("slow down and retry") tells a client, while 503
//! is kept for "there is nothing to serve you" (no endpoints, shutting down). The reason
//! string goes in [`DROPPED_REASON_HEADER`] so a client can tell the cases apart.

/// Response header naming why a request was dropped (llm-d-router's name).
pub const DROPPED_REASON_HEADER: &str = "x-llm-d-request-dropped-reason";

/// Why a request did not reach the scheduler.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
pub enum Outcome {
    /// A global or band queue limit (requests or bytes) was full at arrival.
    #[error("the request queue is full")]
    RejectedCapacity,
    /// The request waited longer than its TTL while the pool had endpoints.
    #[error("the request waited longer than its time-to-live for capacity")]
    EvictedTtl,
    /// The request waited while the pool had no endpoints at all.
    #[error("the pool has no endpoints")]
    EvictedNoEndpoints,
    /// The client went away while the request was queued (nobody receives this status;
    /// it exists for metrics and logs).
    #[error("the client cancelled the request while it was queued")]
    EvictedContextCancelled,
    /// The flow controller is shutting down.
    #[error("the endpoint picker is shutting down")]
    ShuttingDown,
}

impl Outcome {
    /// The HTTP status the client receives.
    pub fn http_status(self) -> u16 {
        match self {
            Outcome::RejectedCapacity | Outcome::EvictedTtl => 429,
            Outcome::EvictedNoEndpoints
            | Outcome::EvictedContextCancelled
            | Outcome::ShuttingDown => 503,
        }
    }

    /// The value of [`DROPPED_REASON_HEADER`]. `rejected-no-endpoints` and
    /// `rejected-shutting-down` are sluice additions (upstream sends no reason for them).
    pub fn reason(self) -> &'static str {
        match self {
            Outcome::RejectedCapacity => "rejected-saturated",
            Outcome::EvictedTtl => "rejected-ttl-expired",
            Outcome::EvictedNoEndpoints => "rejected-no-endpoints",
            Outcome::EvictedContextCancelled => "rejected-context-cancelled",
            Outcome::ShuttingDown => "rejected-shutting-down",
        }
    }

    /// The `outcome` label of the flow-control metrics (upstream's `QueueOutcome` names).
    pub fn label(self) -> &'static str {
        match self {
            Outcome::RejectedCapacity => "RejectedCapacity",
            Outcome::EvictedTtl => "EvictedTTL",
            Outcome::EvictedNoEndpoints => "EvictedNoEndpoints",
            Outcome::EvictedContextCancelled => "EvictedContextCancelled",
            Outcome::ShuttingDown => "EvictedOther",
        }
    }
}

/// The `outcome` label of a dispatched request.
pub const DISPATCHED_LABEL: &str = "Dispatched";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_and_reasons_follow_llm_d_router() {
        assert_eq!(
            (
                Outcome::RejectedCapacity.http_status(),
                Outcome::RejectedCapacity.reason()
            ),
            (429, "rejected-saturated")
        );
        assert_eq!(
            (
                Outcome::EvictedTtl.http_status(),
                Outcome::EvictedTtl.reason()
            ),
            (429, "rejected-ttl-expired")
        );
        assert_eq!(Outcome::EvictedNoEndpoints.http_status(), 503);
        assert_eq!(Outcome::ShuttingDown.http_status(), 503);
        assert_eq!(
            Outcome::EvictedContextCancelled.reason(),
            "rejected-context-cancelled"
        );
    }
}
