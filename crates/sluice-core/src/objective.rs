//! InferenceObjectives as the picker uses them.

use serde::{Deserialize, Serialize};

/// A named performance objective: the request header `x-gateway-inference-objective` names
/// one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Objective {
    /// The objective's `metadata.name`.
    pub name: String,
    /// Priority: higher is more important; negative means sheddable. Unset means 0.
    pub priority: i32,
}

impl Objective {
    /// A request under a negative priority may be shed (429) when the pool is saturated.
    pub fn is_sheddable(&self) -> bool {
        self.priority < 0
    }
}
