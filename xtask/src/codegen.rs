//! `cargo xtask codegen`: proto/ -> crates/sluice-proto/src/gen (committed, so that building
//! sluice needs no protoc). The test below fails when the committed code is stale.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

const PROTOS: &[&str] = &["sluice/config/v1/config.proto"];

fn out_dir(root: &Path) -> PathBuf {
    root.join("crates/sluice-proto/src/gen")
}

/// Generates the Rust code into `dir`.
pub fn generate_into(root: &Path, dir: &Path) -> Result<()> {
    let fds = protox::compile(PROTOS, [root.join("proto")]).context("compiling protos")?;
    std::fs::create_dir_all(dir)?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .build_transport(true)
        .emit_rerun_if_changed(false)
        .out_dir(dir)
        .compile_fds(fds)
        .context("generating Rust from protos")?;
    Ok(())
}

/// Regenerates the committed code.
pub fn write(root: &Path) -> Result<()> {
    let dir = out_dir(root);
    generate_into(root, &dir)?;
    eprintln!("xtask: wrote {}", dir.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_proto_code_is_up_to_date() {
        let root = crate::project_root();
        let tmp = std::env::temp_dir().join(format!("sluice-codegen-{}", std::process::id()));
        generate_into(&root, &tmp).unwrap();
        for entry in std::fs::read_dir(&tmp).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap();
            let fresh = std::fs::read_to_string(&path).unwrap();
            let committed = std::fs::read_to_string(out_dir(&root).join(name)).unwrap_or_default();
            assert!(
                fresh == committed,
                "crates/sluice-proto/src/gen/{} is stale: run `cargo xtask codegen` and commit",
                name.to_string_lossy()
            );
        }
        let _ = std::fs::remove_dir_all(&tmp);
    }
}
