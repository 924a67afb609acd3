//! Status conditions and Events, written by the Lease holder only.
//!
//! Every replica indexes and serves config streams; only the leader writes. Status goes
//! through server-side apply under one field manager ([`FIELD_MANAGER`]) on the `/status`
//! subresource of EndpointPickerConfigs (Accepted or the validation error, observedGeneration,
//! applied version, pickers in sync), InferenceObjectives and InferenceModelRewrites
//! (Accepted, or Pending while their pool does not exist).
//! InferencePool status belongs to the Gateway controllers and is never written. A rejected
//! config also gets a Warning Event.
//!
//! Writes are skipped when nothing changed since the last write by this leader; on gaining
//! the lease the cache is cleared so that the new leader re-asserts everything.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Api, Client, Resource};
use serde_json::{Value, json};
use sluice_api::condition::{
    Condition, REASON_CONFLICT, REASON_INVALID_CONFIG, REASON_PENDING, REASON_POOL_NOT_FOUND,
};
use sluice_api::{EndpointPickerConfig as EpcResource, llm_d, x_k8s};
use tokio::sync::watch;

use crate::FIELD_MANAGER;
use crate::hub::Hub;
use crate::index::{AlphaGroup, EpcVerdict};
use crate::runtime::SharedIndex;

/// What a status write targets.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Target {
    Epc(String, String),
    Objective(AlphaGroup, String, String),
    Rewrite(AlphaGroup, String, String),
}

/// The desired status of one object, without timestamps (so that equal states compare
/// equal).
#[derive(Clone, Debug, PartialEq)]
struct Desired {
    status: &'static str,
    reason: String,
    message: String,
    generation: Option<i64>,
    extra: Value,
    /// An Event to record when this state is new (rejected configs).
    event: Option<(String, String)>,
}

/// Computes every desired status from the index and the hub.
fn desired(index: &SharedIndex, hub: &Hub) -> BTreeMap<Target, Desired> {
    let mut out = BTreeMap::new();
    let (verdicts, objectives, rewrites) = index.read(|i| {
        (
            i.epc_verdicts().clone(),
            i.objective_statuses(),
            i.rewrite_statuses(),
        )
    });
    for ((ns, name), st) in verdicts {
        let counts = hub.counts(&st.pool);
        let current = hub.current(&st.pool).map(|s| s.version);
        let (status, reason, message, event) = match &st.verdict {
            EpcVerdict::Accepted { .. } => (
                "True",
                "Accepted".to_owned(),
                format!(
                    "in use by pool {}; {} of {} pickers run the current version",
                    st.pool.name, counts.in_sync, counts.total
                ),
                None,
            ),
            EpcVerdict::Invalid(e) => (
                "False",
                REASON_INVALID_CONFIG.to_owned(),
                format!("{e}; pickers keep the last valid configuration"),
                Some(("ConfigRejected".to_owned(), e.clone())),
            ),
            EpcVerdict::PoolNotFound => (
                "False",
                REASON_POOL_NOT_FOUND.to_owned(),
                format!(
                    "InferencePool {}/{} not found",
                    st.pool.namespace, st.pool.name
                ),
                None,
            ),
            EpcVerdict::Conflict(m) => ("False", REASON_CONFLICT.to_owned(), m.clone(), None),
        };
        let accepted = matches!(st.verdict, EpcVerdict::Accepted { .. });
        let extra = json!({
            "appliedVersion": if accepted { current.map(|v| v as i64) } else { None },
            "pickersInSync": counts.in_sync as i64,
            "pickersTotal": counts.total as i64,
        });
        out.insert(
            Target::Epc(ns, name),
            Desired {
                status,
                reason,
                message,
                generation: st.generation,
                extra,
                event,
            },
        );
    }
    let alphas = objectives
        .into_iter()
        .map(|(g, (ns, name), st)| (Target::Objective(g, ns, name), st))
        .chain(
            rewrites
                .into_iter()
                .map(|(g, (ns, name), st)| (Target::Rewrite(g, ns, name), st)),
        );
    for (target, st) in alphas {
        let (status, reason, message) = if st.verdict {
            (
                "True",
                "Accepted".to_owned(),
                format!("in use by pool {}", st.pool.name),
            )
        } else {
            (
                "False",
                REASON_PENDING.to_owned(),
                format!(
                    "InferencePool {}/{} not found",
                    st.pool.namespace, st.pool.name
                ),
            )
        };
        out.insert(
            target,
            Desired {
                status,
                reason,
                message,
                generation: st.generation,
                extra: json!({}),
                event: None,
            },
        );
    }
    out
}

/// Server-side-applies `body` to the `/status` of the namespaced `K` named `name`.
async fn patch_status<K>(
    client: Client,
    ns: &str,
    name: &str,
    pp: &PatchParams,
    body: &Patch<Value>,
) -> Result<(), kube::Error>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    Api::<K>::namespaced(client, ns)
        .patch_status(name, pp, body)
        .await
        .map(drop)
}

fn condition(d: &Desired) -> Value {
    let status = match d.status {
        "True" => sluice_api::ConditionStatus::True,
        "False" => sluice_api::ConditionStatus::False,
        _ => sluice_api::ConditionStatus::Unknown,
    };
    let c = Condition::new(
        "Accepted",
        status,
        &d.reason,
        d.message.clone(),
        Time(k8s_openapi::jiff::Timestamp::now()),
    )
    .with_observed_generation(d.generation);
    serde_json::to_value(c).unwrap_or_default()
}

/// The status writer.
pub struct StatusWriter {
    client: Client,
    recorder: Recorder,
    written: BTreeMap<Target, Desired>,
}

impl std::fmt::Debug for StatusWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StatusWriter")
            .field("written", &self.written.len())
            .finish()
    }
}

impl StatusWriter {
    /// A writer reporting Events as `identity`.
    pub fn new(client: Client, identity: &str) -> Self {
        let reporter = Reporter {
            controller: FIELD_MANAGER.into(),
            instance: Some(identity.into()),
        };
        StatusWriter {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            written: BTreeMap::new(),
        }
    }

    /// Writes every status that differs from what this writer last wrote.
    pub async fn sync(&mut self, index: &SharedIndex, hub: &Hub) {
        let want = desired(index, hub);
        self.written.retain(|k, _| want.contains_key(k));
        for (target, d) in want {
            if self.written.get(&target) == Some(&d) {
                continue;
            }
            match self.write(&target, &d).await {
                Ok(()) => {
                    if let Some((reason, note)) = &d.event {
                        self.event(&target, reason, note).await;
                    }
                    self.written.insert(target, d);
                }
                Err(error) => tracing::warn!(?target, %error, "status write failed; will retry"),
            }
        }
    }

    /// Forgets what was written (a new leader re-asserts everything).
    pub fn reset(&mut self) {
        self.written.clear();
    }

    async fn write(&self, target: &Target, d: &Desired) -> Result<(), kube::Error> {
        let pp = PatchParams::apply(FIELD_MANAGER).force();
        match target {
            Target::Epc(ns, name) => {
                let mut status =
                    json!({"conditions": [condition(d)], "observedGeneration": d.generation});
                if let (Some(s), Some(e)) = (status.as_object_mut(), d.extra.as_object()) {
                    s.extend(
                        e.iter()
                            .filter(|(_, v)| !v.is_null())
                            .map(|(k, v)| (k.clone(), v.clone())),
                    );
                }
                let body = json!({"apiVersion": "sluice.dev/v1alpha1", "kind": "EndpointPickerConfig", "status": status});
                Api::<EpcResource>::namespaced(self.client.clone(), ns)
                    .patch_status(name, &pp, &Patch::Apply(body))
                    .await?;
            }
            Target::Rewrite(group, ns, name) | Target::Objective(group, ns, name) => {
                let kind = match target {
                    Target::Rewrite(..) => "InferenceModelRewrite",
                    _ => "InferenceObjective",
                };
                let body = Patch::Apply(json!({
                    "apiVersion": format!("{}/v1alpha2", group.api_group()),
                    "kind": kind,
                    "status": {"conditions": [condition(d)]},
                }));
                let client = self.client.clone();
                match (target, group) {
                    (Target::Rewrite(..), AlphaGroup::XK8s) => {
                        patch_status::<x_k8s::InferenceModelRewrite>(client, ns, name, &pp, &body)
                            .await?;
                    }
                    (Target::Rewrite(..), AlphaGroup::LlmD) => {
                        patch_status::<llm_d::InferenceModelRewrite>(client, ns, name, &pp, &body)
                            .await?;
                    }
                    (_, AlphaGroup::XK8s) => {
                        patch_status::<x_k8s::InferenceObjective>(client, ns, name, &pp, &body)
                            .await?;
                    }
                    (_, AlphaGroup::LlmD) => {
                        patch_status::<llm_d::InferenceObjective>(client, ns, name, &pp, &body)
                            .await?;
                    }
                }
            }
        }
        Ok(())
    }

    async fn event(&self, target: &Target, reason: &str, note: &str) {
        let Target::Epc(ns, name) = target else {
            return;
        };
        let Ok(obj) = Api::<EpcResource>::namespaced(self.client.clone(), ns)
            .get(name)
            .await
        else {
            return;
        };
        let ev = Event {
            type_: EventType::Warning,
            reason: reason.into(),
            note: Some(note.chars().take(1024).collect()),
            action: "Validate".into(),
            secondary: None,
        };
        if let Err(error) = self.recorder.publish(&ev, &obj.object_ref(&())).await {
            tracing::warn!(%error, "cannot record event");
        }
    }
}

/// How often status is re-checked.
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    /// Least time between two passes (batches bursts of changes).
    pub min_interval: Duration,
    /// Longest time between two passes.
    pub resync: Duration,
}

/// Writes status while `leader` is true, re-checking on every hub or index change (at most
/// every `min_interval`) and at least every `resync`.
pub async fn run(
    client: Client,
    identity: String,
    index: SharedIndex,
    hub: Hub,
    mut leader: watch::Receiver<bool>,
    mut shutdown: watch::Receiver<bool>,
    timing: Timing,
) {
    let Timing {
        min_interval,
        resync,
    } = timing;
    let mut writer = StatusWriter::new(client, &identity);
    let mut changes = hub.changes();
    let mut was_leader = false;
    loop {
        let is_leader = *leader.borrow_and_update();
        if is_leader && !was_leader {
            tracing::info!(identity = %identity, "became leader: writing status");
            writer.reset();
        } else if !is_leader && was_leader {
            tracing::info!(identity = %identity, "lost leadership: no longer writing status");
        }
        was_leader = is_leader;
        if is_leader {
            writer.sync(&index, &hub).await;
        }
        tokio::select! {
            _ = changes.changed() => {}
            _ = leader.changed() => {}
            _ = tokio::time::sleep(resync) => {}
            _ = shutdown.changed() => return,
        }
        tokio::time::sleep(min_interval).await;
    }
}
