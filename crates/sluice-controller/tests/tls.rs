//! The config service over mutual TLS, as `manifests/base` deploys it (`--tls-cert`,
//! `--tls-key`, `--tls-client-ca`): a picker with a client certificate from the CA gets its
//! pool's config; one without a client certificate, or trusting another CA, never does.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "../../sluice-picker/src/config_client.rs"]
#[allow(dead_code)]
mod config_client;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;
use config_client::{Backoff, ClientStatus, ConfigClientOptions};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
};
use sluice_core::PoolRef;
use sluice_testkit::process::free_ports;
use tokio::sync::watch;
use tonic::transport::{Certificate, ClientTlsConfig, Identity};

struct Pem {
    cert: String,
    key: String,
}

struct Ca {
    pem: String,
    issuer: Issuer<'static, KeyPair>,
}

fn ca(name: &str) -> Ca {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    let key = KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    Ca {
        pem: cert.pem(),
        issuer: Issuer::new(params, key),
    }
}

fn leaf(ca: &Ca, names: &[&str], usage: ExtendedKeyUsagePurpose) -> Pem {
    let mut params =
        CertificateParams::new(names.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>()).unwrap();
    params.extended_key_usages = vec![usage];
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &ca.issuer).unwrap();
    Pem {
        cert: cert.pem(),
        key: key.serialize_pem(),
    }
}

fn temp_dir() -> PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let dir = std::env::temp_dir().join(format!("sluice-ctrl-tls-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.to_str().unwrap().to_owned()
}

const POOL: &str = "apiVersion: inference.networking.k8s.io/v1\nkind: InferencePool\n\
metadata: {name: pool, namespace: ns}\nspec:\n  selector: {matchLabels: {app: vllm}}\n  \
targetPorts: [{number: 8000}]\n  endpointPickerRef: {name: epp, port: {number: 9002}}\n";

fn subscribe(
    grpc: SocketAddr,
    id: &str,
    tls: ClientTlsConfig,
) -> (watch::Receiver<ClientStatus>, watch::Sender<bool>) {
    let pool = PoolRef {
        namespace: "ns".into(),
        name: "pool".into(),
    };
    let mut opts = ConfigClientOptions::new(format!("https://localhost:{}", grpc.port()), pool, id);
    opts.tls = Some(tls);
    opts.backoff = Backoff {
        initial: Duration::from_millis(20),
        max: Duration::from_millis(100),
    };
    let (stop, stop_rx) = watch::channel(false);
    let (status_tx, status) = watch::channel(ClientStatus::default());
    tokio::spawn(config_client::run_with_status(
        opts,
        |_| Ok(()),
        stop_rx,
        status_tx,
    ));
    (status, stop)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_pickers_with_a_client_certificate_from_the_ca_get_configs() {
    let dir = temp_dir();
    let manifests = dir.join("manifests");
    std::fs::create_dir_all(&manifests).unwrap();
    std::fs::write(manifests.join("pool.yaml"), POOL).unwrap();

    let authority = ca("sluice-ca");
    let server = leaf(
        &authority,
        &["localhost", "127.0.0.1"],
        ExtendedKeyUsagePurpose::ServerAuth,
    );
    let client = leaf(
        &authority,
        &["sluice-picker"],
        ExtendedKeyUsagePurpose::ClientAuth,
    );
    let stranger = ca("someone-else");
    let foreign_client = leaf(
        &stranger,
        &["sluice-picker"],
        ExtendedKeyUsagePurpose::ClientAuth,
    );
    let ports = free_ports(2).unwrap();
    let grpc: SocketAddr = ([127, 0, 0, 1], ports[0]).into();
    let args = sluice_controller::cli::Args::try_parse_from([
        "sluice-controller".to_owned(),
        "--manifests".into(),
        manifests.to_str().unwrap().into(),
        "--grpc-addr".into(),
        grpc.to_string(),
        "--metrics-addr".into(),
        format!("127.0.0.1:{}", ports[1]),
        "--tls-cert".into(),
        write(&dir, "tls.crt", &server.cert),
        "--tls-key".into(),
        write(&dir, "tls.key", &server.key),
        "--tls-client-ca".into(),
        write(&dir, "ca.crt", &authority.pem),
    ])
    .unwrap();
    let (stop, stop_rx) = watch::channel(false);
    let controller = tokio::spawn(args.run_until(stop_rx));

    let trust = || ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&authority.pem));
    let (mut good, _g) = subscribe(
        grpc,
        "with-cert",
        trust().identity(Identity::from_pem(&client.cert, &client.key)),
    );
    let (no_cert, _n) = subscribe(grpc, "without-cert", trust());
    let (foreign, _f) = subscribe(
        grpc,
        "foreign-cert",
        trust().identity(Identity::from_pem(
            &foreign_client.cert,
            &foreign_client.key,
        )),
    );
    tokio::time::timeout(
        Duration::from_secs(10),
        good.wait_for(|s| s.applied_version >= 1),
    )
    .await
    .expect("a picker with a client certificate from the CA gets the config")
    .unwrap();
    // The refused ones had as long as the good one plus more retries than it needed.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for (what, st) in [
        ("no client certificate", no_cert),
        ("a foreign CA", foreign),
    ] {
        let st = st.borrow().clone();
        assert_eq!(
            st.applied_version, 0,
            "a picker with {what} must get nothing: {st:?}"
        );
        assert!(!st.connected, "{what}: {st:?}");
    }

    stop.send(true).unwrap();
    let _ = tokio::time::timeout(Duration::from_secs(5), controller).await;
    let _ = std::fs::remove_dir_all(dir);
}
