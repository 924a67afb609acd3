//! Many simulated servers in one process: one driver task and one accept loop per server,
//! no thread per server.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use crate::metrics::EngineFlavor;
use crate::preset::{Overrides, Preset};
use crate::server::{self, Faults, Handle, ServerConfig};

/// How to build a fleet.
#[derive(Debug, Clone)]
pub struct FleetConfig {
    /// Number of servers.
    pub n: usize,
    /// Presets assigned round-robin (server `i` gets `presets[i % len]`), so a fleet can mix GPUs.
    pub presets: Vec<Preset>,
    /// Address to bind.
    pub host: IpAddr,
    /// First port (server `i` binds `base_port + i`), or `None` for free ports.
    pub base_port: Option<u16>,
    /// Simulated seconds per wall second.
    pub time_scale: f64,
    /// Base seed; server `i` uses `seed + i`.
    pub seed: u64,
    /// Metric names.
    pub flavor: EngineFlavor,
    /// Faults for every server at start.
    pub faults: Faults,
    /// Engine settings applied to every server on top of its preset.
    pub overrides: Overrides,
}

impl FleetConfig {
    /// `n` servers cycling through `presets` on free loopback ports, real time.
    pub fn new(n: usize, presets: &[Preset]) -> Self {
        Self {
            n,
            presets: if presets.is_empty() {
                vec![Preset::H100Llama8b]
            } else {
                presets.to_vec()
            },
            host: IpAddr::V4(Ipv4Addr::LOCALHOST),
            base_port: None,
            time_scale: 1.0,
            seed: 0,
            flavor: EngineFlavor::Vllm,
            faults: Faults::default(),
            overrides: Overrides::default(),
        }
    }

    /// The configuration of server `i` (named `sim-<i>`).
    pub fn server(&self, i: usize) -> anyhow::Result<ServerConfig> {
        let preset = self.presets[i % self.presets.len()];
        let mut engine = preset.config();
        self.overrides.apply(&mut engine);
        let mut c = ServerConfig::new(format!("sim-{i}"), engine);
        let port = match self.base_port {
            None => 0,
            Some(p) => u16::try_from(usize::from(p) + i).map_err(|_| {
                anyhow::anyhow!(
                    "port {p} + {i} is beyond 65535; lower --base-port or the fleet size"
                )
            })?,
        };
        c.bind = SocketAddr::new(self.host, port);
        c.time_scale = self.time_scale;
        c.seed = self.seed.wrapping_add(i as u64);
        c.flavor = self.flavor;
        c.faults = self.faults.clone();
        Ok(c)
    }
}

/// Spawns `n` servers cycling through `presets` on free loopback ports.
pub async fn spawn(n: usize, presets: &[Preset]) -> anyhow::Result<Vec<Handle>> {
    spawn_with(&FleetConfig::new(n, presets)).await
}

/// Spawns a fleet as configured.
pub async fn spawn_with(cfg: &FleetConfig) -> anyhow::Result<Vec<Handle>> {
    let mut out = Vec::with_capacity(cfg.n);
    for i in 0..cfg.n {
        out.push(server::spawn(cfg.server(i)?).await?);
    }
    Ok(out)
}
