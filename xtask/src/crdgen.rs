//! `cargo xtask crdgen`: the API types in sluice-api -> crds/*.yaml.

use std::path::Path;

use anyhow::Result;

/// Writes one YAML file per CRD.
pub fn write(root: &Path) -> Result<()> {
    let dir = root.join("crds");
    std::fs::create_dir_all(&dir)?;
    for (file, yaml) in sluice_api::crd_files().map_err(|e| anyhow::anyhow!("{e}"))? {
        std::fs::write(dir.join(&file), yaml)?;
        eprintln!("xtask: wrote crds/{file}");
    }
    Ok(())
}
