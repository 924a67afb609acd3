//! TLS for the ext_proc port, like upstream's `--secure-serving`: a certificate from
//! `--cert-path` (a directory holding `tls.crt` and `tls.key`), else a self-signed one made
//! at start-up. Envoy's reference configuration uses an empty validation context, so a
//! self-signed certificate is accepted; real deployments mount a certificate.

use std::path::Path;

use anyhow::{Context, Result};
use tonic::transport::{Identity, ServerTlsConfig};

/// The certificate and key, PEM-encoded.
#[derive(Clone, Debug)]
pub struct PemIdentity {
    /// Certificate chain.
    pub cert: String,
    /// Private key.
    pub key: String,
}

impl PemIdentity {
    /// Reads `tls.crt` and `tls.key` from `dir`.
    pub fn load(dir: &Path) -> Result<Self> {
        let read = |name: &str| {
            let p = dir.join(name);
            std::fs::read_to_string(&p).with_context(|| {
                format!(
                    "reading {} (--cert-path must be a directory with tls.crt and tls.key)",
                    p.display()
                )
            })
        };
        Ok(PemIdentity {
            cert: read("tls.crt")?,
            key: read("tls.key")?,
        })
    }

    /// A fresh self-signed certificate for `localhost`, `127.0.0.1` and `::1`.
    pub fn self_signed() -> Result<Self> {
        let ck = rcgen::generate_simple_self_signed(vec![
            "localhost".to_string(),
            "127.0.0.1".to_string(),
            "::1".to_string(),
        ])
        .context("generating a self-signed certificate")?;
        Ok(PemIdentity {
            cert: ck.cert.pem(),
            key: ck.signing_key.serialize_pem(),
        })
    }

    /// The tonic server configuration.
    pub fn server_config(&self) -> ServerTlsConfig {
        ServerTlsConfig::new().identity(Identity::from_pem(&self.cert, &self.key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn self_signed_identity_is_pem() {
        let id = PemIdentity::self_signed().unwrap();
        assert!(id.cert.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(id.key.contains("PRIVATE KEY"));
    }

    #[test]
    fn missing_cert_dir_names_the_file() {
        let err = PemIdentity::load(Path::new("/nonexistent-sluice")).unwrap_err();
        assert!(format!("{err:#}").contains("tls.crt"), "{err:#}");
    }
}
