//! The remote predictor client against a tiny in-test server speaking the llm-d latency
//! predictor's HTTP API.
// Test helpers outside #[test] fns: a failed setup should fail the test loudly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use parking_lot::Mutex;
use serde_json::{Value, json};
use sluice_predictor::remote::RemoteConfigError;
use sluice_predictor::{
    Features, LatencyPredictor, PredictError, RemoteConfig, RemotePredictor, TrainingSample,
};

#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    Ok,
    Slow,
    Error,
    Short,
}

#[derive(Default)]
struct Seen {
    bulk_sizes: Vec<usize>,
    training: Vec<Value>,
}

#[derive(Clone)]
struct Server {
    mode: Arc<Mutex<Mode>>,
    seen: Arc<Mutex<Seen>>,
}

async fn predict(State(s): State<Server>, Json(body): Json<Value>) -> (StatusCode, Json<Value>) {
    let rows = body["requests"].as_array().cloned().unwrap_or_default();
    s.seen.lock().bulk_sizes.push(rows.len());
    let mode = *s.mode.lock();
    match mode {
        Mode::Error => {
            return (
                StatusCode::INTERNAL_SERVER_ERROR,
                Json(json!({"detail": "boom"})),
            );
        }
        // The server under test is slow on purpose: this is what the client's deadline is for.
        Mode::Slow => tokio::time::sleep(Duration::from_secs(5)).await,
        Mode::Ok | Mode::Short => {}
    }
    let n = if mode == Mode::Short {
        rows.len().saturating_sub(1)
    } else {
        rows.len()
    };
    // A recognisable function of the input so the test can check row order.
    let predictions: Vec<Value> = rows[..n]
        .iter()
        .map(|r| {
            let input = r["input_token_length"].as_f64().unwrap();
            json!({"ttft_ms": input * 2.0, "tpot_ms": input / 10.0, "predicted_at": 0.0,
                   "model_type": "xgboost", "objective_type": "mean", "quantile": 0.9,
                   "last_model_load": null})
        })
        .collect();
    let total = rows.len();
    (
        StatusCode::OK,
        Json(json!({"predictions": predictions, "total_requests": total,
                    "successful_predictions": n, "failed_predictions": 0, "processing_time_ms": 1.0})),
    )
}

async fn train(State(s): State<Server>, Json(body): Json<Value>) -> (StatusCode, Json<Value>) {
    let entries = body["entries"].as_array().cloned().unwrap_or_default();
    let n = entries.len();
    s.seen.lock().training.extend(entries);
    (
        StatusCode::ACCEPTED,
        Json(json!({"message": format!("Accepted {n} training samples.")})),
    )
}

async fn start(mode: Mode) -> (Server, SocketAddr) {
    let server = Server {
        mode: Arc::new(Mutex::new(mode)),
        seen: Arc::default(),
    };
    let app = Router::new()
        .route("/predict/bulk/strict", post(predict))
        .route("/add_training_data_bulk", post(train))
        .with_state(server.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (server, addr)
}

fn config(addr: SocketAddr) -> RemoteConfig {
    RemoteConfig {
        prediction_urls: vec![format!("http://{addr}")],
        training_url: format!("http://{addr}"),
        timeout: Duration::from_millis(300),
        flush_interval: Duration::from_secs(3600),
        ..RemoteConfig::default()
    }
}

fn rows(n: u32) -> Vec<Features> {
    (0..n)
        .map(|i| Features {
            input_tokens: 100 + i,
            ..Features::default()
        })
        .collect()
}

#[tokio::test]
async fn batches_above_the_100_row_limit_are_split_and_reassembled_in_order() {
    let (server, addr) = start(Mode::Ok).await;
    let p = RemotePredictor::new(config(addr)).unwrap();
    assert!(!p.ready(), "not ready before the first answer");
    let batch = rows(250);
    let preds = p.predict_batch(&batch).await.unwrap();
    assert_eq!(preds.len(), 250);
    for (f, got) in batch.iter().zip(&preds) {
        assert_eq!(got.ttft_ms, f64::from(f.input_tokens) * 2.0);
        assert_eq!(got.tpot_ms, Some(f64::from(f.input_tokens) / 10.0));
    }
    let mut sizes = server.seen.lock().bulk_sizes.clone();
    sizes.sort_unstable();
    assert_eq!(sizes, vec![50, 100, 100]);
    assert!(p.ready());
    assert_eq!(p.stats().predict_calls, 3);
}

#[tokio::test]
async fn a_slow_predictor_times_out_quickly_and_callers_fall_back() {
    let (_server, addr) = start(Mode::Slow).await;
    let p = RemotePredictor::new(config(addr)).unwrap();
    let started = Instant::now();
    let err = p.predict_batch(&rows(3)).await.unwrap_err();
    assert!(matches!(err, PredictError::Timeout { .. }), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "took {:?}",
        started.elapsed()
    );
    assert!(!p.ready());
    assert_eq!(p.stats().predict_failures, 1);
}

#[tokio::test]
async fn server_errors_and_short_answers_are_unavailable() {
    let (server, addr) = start(Mode::Error).await;
    let p = RemotePredictor::new(config(addr)).unwrap();
    let err = p.predict_batch(&rows(3)).await.unwrap_err();
    assert!(
        matches!(&err, PredictError::Unavailable { reason, .. } if reason.contains("500")),
        "{err}"
    );

    *server.mode.lock() = Mode::Short;
    let err = p.predict_batch(&rows(3)).await.unwrap_err();
    assert!(
        matches!(&err, PredictError::Unavailable { reason, .. } if reason.contains("2 predictions for 3 rows")),
        "{err}"
    );

    *server.mode.lock() = Mode::Ok;
    assert_eq!(p.predict_batch(&rows(3)).await.unwrap().len(), 3);
    assert!(p.ready(), "recovers once the server answers");
}

#[tokio::test]
async fn an_unreachable_predictor_is_unavailable() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let p = RemotePredictor::new(config(addr)).unwrap();
    let err = p.predict_batch(&rows(1)).await.unwrap_err();
    assert!(
        matches!(
            err,
            PredictError::Unavailable { .. } | PredictError::Timeout { .. }
        ),
        "{err}"
    );
}

#[tokio::test]
async fn training_samples_are_uploaded_in_upstreams_shape() {
    let (server, addr) = start(Mode::Ok).await;
    let p = RemotePredictor::new(config(addr)).unwrap();
    let f = Features {
        kv_cache_usage: 0.42,
        input_tokens: 812,
        running: 3,
        prefix_cache_score: 0.75,
        prefill_tokens_in_flight: 2048,
        ..Features::default()
    };
    p.record(TrainingSample {
        features_at_dispatch: f,
        ttft_ms: Some(143.0),
        tpot_ms: Some(21.0),
    });
    p.record(TrainingSample {
        features_at_dispatch: f,
        ttft_ms: Some(150.0),
        tpot_ms: None,
    });
    p.flush().await;
    let seen = server.seen.lock().training.clone();
    assert_eq!(
        seen.len(),
        3,
        "two entries for a streamed request, one for a non-streamed one"
    );
    assert_eq!(
        seen[0],
        json!({"kv_cache_percentage": 0.42, "input_token_length": 812, "num_request_waiting": 0,
               "num_request_running": 3, "actual_ttft_ms": 143.0, "actual_tpot_ms": 0.0,
               "num_tokens_generated": 0, "prefix_cache_score": 0.75, "pod_type": "",
               "prefill_tokens_in_flight": 2048, "decode_tokens_in_flight": 0})
    );
    assert_eq!(seen[1]["actual_tpot_ms"], json!(21.0));
    assert_eq!(seen[1]["actual_ttft_ms"], json!(0.0));
    assert_eq!(p.stats().entries_sent, 3);
}

#[tokio::test]
async fn closing_sends_what_is_still_buffered() {
    let (server, addr) = start(Mode::Ok).await;
    let p = RemotePredictor::new(config(addr)).unwrap();
    p.record(TrainingSample {
        features_at_dispatch: Features::default(),
        ttft_ms: Some(9.0),
        tpot_ms: None,
    });
    p.close().await;
    assert_eq!(server.seen.lock().training.len(), 1);
}

#[tokio::test]
async fn the_training_buffer_is_bounded() {
    let (server, addr) = start(Mode::Ok).await;
    let p = RemotePredictor::new(RemoteConfig {
        max_buffered: 10,
        ..config(addr)
    })
    .unwrap();
    for _ in 0..20 {
        p.record(TrainingSample {
            features_at_dispatch: Features::default(),
            ttft_ms: Some(1.0),
            tpot_ms: None,
        });
    }
    p.flush().await;
    assert_eq!(server.seen.lock().training.len(), 10);
    assert_eq!(p.stats().entries_dropped, 10);
}

#[tokio::test]
async fn bad_configuration_is_rejected_with_the_offending_value() {
    let err = RemotePredictor::new(RemoteConfig {
        prediction_urls: vec![],
        ..RemoteConfig::default()
    })
    .unwrap_err();
    assert_eq!(err, RemoteConfigError::NoPredictionServer);
    let err = RemotePredictor::new(RemoteConfig {
        max_bulk_size: 101,
        ..RemoteConfig::default()
    })
    .unwrap_err();
    assert_eq!(err, RemoteConfigError::BadBulkSize(101));
    let err = RemotePredictor::new(RemoteConfig {
        training_url: "ftp://x".into(),
        ..RemoteConfig::default()
    })
    .unwrap_err();
    assert!(err.to_string().contains("ftp://x"), "{err}");
}

#[test]
fn creating_outside_a_runtime_is_an_error_not_a_panic() {
    assert_eq!(
        RemotePredictor::new(RemoteConfig::default()).unwrap_err(),
        RemoteConfigError::NoRuntime
    );
}
