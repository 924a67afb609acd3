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
    Features, LatencyPredictor, PredictError, Prediction, RemoteConfig, RemotePredictor,
    TrainingSample,
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
    /// Each prediction call's rows, by `input_token_length`, in arrival order.
    calls: Vec<Vec<u64>>,
    training: Vec<Value>,
}

/// A row with at least this many input tokens makes the whole call it is in answer 500.
const FAIL_AT: u32 = 9000;
/// A row with at least this many input tokens (and below [`FAIL_AT`]) makes its call answer
/// one prediction short.
const SHORT_AT: u32 = 8000;
/// A row with at least this many input tokens (and below [`SHORT_AT`]) makes its call take
/// [`DELAY`] before answering normally.
const DELAY_AT: u32 = 7000;
const DELAY: Duration = Duration::from_millis(300);

#[derive(Clone)]
struct Server {
    mode: Arc<Mutex<Mode>>,
    seen: Arc<Mutex<Seen>>,
}

async fn predict(State(s): State<Server>, Json(body): Json<Value>) -> (StatusCode, Json<Value>) {
    let rows = body["requests"].as_array().cloned().unwrap_or_default();
    let inputs: Vec<u64> = rows
        .iter()
        .map(|r| r["input_token_length"].as_u64().unwrap())
        .collect();
    {
        let mut seen = s.seen.lock();
        seen.bulk_sizes.push(rows.len());
        seen.calls.push(inputs.clone());
    }
    let mut mode = *s.mode.lock();
    if mode == Mode::Ok {
        if inputs.iter().any(|&i| i >= u64::from(FAIL_AT)) {
            mode = Mode::Error;
        } else if inputs.iter().any(|&i| i >= u64::from(SHORT_AT)) {
            mode = Mode::Short;
        } else if inputs.iter().any(|&i| i >= u64::from(DELAY_AT)) {
            tokio::time::sleep(DELAY).await;
        }
    }
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

// --- Coalescing -------------------------------------------------------------------------

fn coalescing(addr: SocketAddr, window_ms: u64, max_rows: usize) -> RemoteConfig {
    RemoteConfig {
        coalesce_window: Duration::from_millis(window_ms),
        max_coalesced_rows: max_rows,
        timeout: Duration::from_secs(2),
        ..config(addr)
    }
}

/// `n` rows with input lengths `first..first + n`, so every caller's rows are distinct.
fn rows_from(first: u32, n: u32) -> Vec<Features> {
    (first..first + n)
        .map(|input_tokens| Features {
            input_tokens,
            ..Features::default()
        })
        .collect()
}

/// The mock answers each row with a function of its input length: a caller handed
/// someone else's rows, or its own out of order, fails this.
fn assert_own_rows(batch: &[Features], got: &[Prediction]) {
    let want: Vec<f64> = batch
        .iter()
        .map(|f| f64::from(f.input_tokens) * 2.0)
        .collect();
    let got: Vec<f64> = got.iter().map(|p| p.ttft_ms).collect();
    assert_eq!(
        got, want,
        "a caller got rows that are not its own, in its order"
    );
}

fn call_sizes(server: &Server) -> Vec<usize> {
    let mut sizes = server.seen.lock().bulk_sizes.clone();
    sizes.sort_unstable();
    sizes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_callers_in_one_window_share_one_call_and_get_their_own_rows_back() {
    let (server, addr) = start(Mode::Ok).await;
    let p = Arc::new(RemotePredictor::new(coalescing(addr, 100, 100)).unwrap());
    let callers = 6u32;
    let barrier = Arc::new(tokio::sync::Barrier::new(callers as usize));
    let tasks: Vec<_> = (0..callers)
        .map(|k| {
            let (p, barrier) = (Arc::clone(&p), Arc::clone(&barrier));
            let batch = rows_from(1000 * (k + 1), k + 1);
            tokio::spawn(async move {
                barrier.wait().await;
                let got = p.predict_batch(&batch).await;
                (batch, got)
            })
        })
        .collect();
    for task in tasks {
        let (batch, got) = task.await.unwrap();
        assert_own_rows(&batch, &got.unwrap());
    }
    let calls = server.seen.lock().calls.clone();
    assert_eq!(calls.len(), 1, "one merged call, got {calls:?}");
    assert_eq!(calls[0].len(), (1..=callers as usize).sum::<usize>());
    let stats = p.stats();
    assert_eq!(
        (
            stats.predict_calls,
            stats.merged_calls,
            stats.callers_merged
        ),
        (1, 1, u64::from(callers))
    );
}

#[tokio::test]
async fn a_caller_arriving_later_in_the_window_joins_the_open_call() {
    let (server, addr) = start(Mode::Ok).await;
    let p = RemotePredictor::new(coalescing(addr, 200, 100)).unwrap();
    let (a, b) = (rows_from(1000, 2), rows_from(2000, 3));
    let a_fut = p.predict_batch(&a);
    // Not synchronisation but the scenario: `b` arrives 20 ms into `a`'s 200 ms window
    // (the dispatcher, on this single-threaded runtime, has taken `a` by then).
    tokio::time::sleep(Duration::from_millis(20)).await;
    let b_fut = p.predict_batch(&b);
    let (a_got, b_got) = tokio::join!(a_fut, b_fut);
    assert_own_rows(&a, &a_got.unwrap());
    assert_own_rows(&b, &b_got.unwrap());
    assert_eq!(call_sizes(&server), vec![5]);
}

#[tokio::test]
async fn callers_waiting_for_a_dispatch_slot_share_the_next_call() {
    let (server, addr) = start(Mode::Ok).await;
    let p = RemotePredictor::new(RemoteConfig {
        max_concurrent_dispatches: 1,
        ..coalescing(addr, 10, 100)
    })
    .unwrap();
    let slow = rows_from(DELAY_AT, 1);
    let (b, c) = (rows_from(1000, 2), rows_from(2000, 2));
    let slow_fut = p.predict_batch(&slow);
    let waiting = async {
        // The scenario, not synchronisation: `b` and `c` arrive far more than a 10 ms window
        // apart, both while the only slot is busy for 300 ms.
        tokio::time::sleep(Duration::from_millis(20)).await;
        let b_fut = p.predict_batch(&b);
        tokio::time::sleep(Duration::from_millis(120)).await;
        let c_fut = p.predict_batch(&c);
        tokio::join!(b_fut, c_fut)
    };
    let (slow_got, (b_got, c_got)) = tokio::join!(slow_fut, waiting);
    assert_own_rows(&slow, &slow_got.unwrap());
    assert_own_rows(&b, &b_got.unwrap());
    assert_own_rows(&c, &c_got.unwrap());
    assert_eq!(
        call_sizes(&server),
        vec![1, 4],
        "b and c shared the second call"
    );
}

#[tokio::test]
async fn callers_beyond_max_coalesced_rows_start_the_next_call_and_none_exceeds_it() {
    let (server, addr) = start(Mode::Ok).await;
    let p = RemotePredictor::new(coalescing(addr, 50, 10)).unwrap();
    let small: Vec<Vec<Features>> = (0..4).map(|k| rows_from(1000 * (k + 1), 3)).collect();
    let large = rows_from(5000, 25);
    // Calling queues the rows at once, so the queue order is the call order.
    let mut pending: Vec<_> = small.iter().map(|b| p.predict_batch(b)).collect();
    pending.push(p.predict_batch(&large));
    let mut answers = Vec::new();
    for fut in pending {
        answers.push(fut.await.unwrap());
    }
    for (batch, got) in small.iter().chain([&large]).zip(&answers) {
        assert_own_rows(batch, got);
    }
    // 3+3+3 fill the first call; the fourth caller's 3 would make 12, so it starts the
    // second, which the large caller's first 10-row chunk would overflow; its chunks then
    // go 10, 10 (each full at once) and 5.
    assert_eq!(call_sizes(&server), vec![3, 5, 9, 10, 10]);
    let stats = p.stats();
    assert_eq!((stats.merged_calls, stats.callers_merged), (5, 7));
}

#[tokio::test]
async fn lowering_max_bulk_size_alone_also_caps_merged_calls() {
    let (server, addr) = start(Mode::Ok).await;
    let p = RemotePredictor::new(RemoteConfig {
        max_bulk_size: 4,
        ..coalescing(addr, 50, 100)
    })
    .unwrap();
    let batches = [rows_from(1000, 3), rows_from(2000, 3), rows_from(3000, 2)];
    let futs = batches.each_ref().map(|b| p.predict_batch(b));
    for (batch, fut) in batches.iter().zip(futs) {
        assert_own_rows(batch, &fut.await.unwrap());
    }
    // 3 + 3 and 3 + 2 would both exceed the bulk size of 4.
    assert_eq!(call_sizes(&server), vec![2, 3, 3]);
}

#[tokio::test]
async fn a_zero_window_sends_one_call_per_caller() {
    let (server, addr) = start(Mode::Ok).await;
    let p = RemotePredictor::new(coalescing(addr, 0, 100)).unwrap();
    let batches: Vec<Vec<Features>> = (0..3).map(|k| rows_from(1000 * (k + 1), 2)).collect();
    let (a, b, c) = tokio::join!(
        p.predict_batch(&batches[0]),
        p.predict_batch(&batches[1]),
        p.predict_batch(&batches[2])
    );
    for (batch, got) in batches.iter().zip([a, b, c]) {
        assert_own_rows(batch, &got.unwrap());
    }
    assert_eq!(call_sizes(&server), vec![2, 2, 2]);
    let stats = p.stats();
    assert_eq!((stats.predict_calls, stats.merged_calls), (3, 0));
}

#[tokio::test]
async fn a_failed_or_short_merged_call_fails_only_the_callers_in_it() {
    let (server, addr) = start(Mode::Ok).await;
    let p = RemotePredictor::new(coalescing(addr, 50, 4)).unwrap();
    // Queue order makes the grouping: [fails, with_failing] fill one call, `alone` (3 rows)
    // cannot take `short`'s 2, and [short, with_short] fill the last.
    let fails = rows_from(FAIL_AT, 2);
    let with_failing = rows_from(1000, 2);
    let alone = rows_from(2000, 3);
    let short = rows_from(SHORT_AT, 2);
    let with_short = rows_from(3000, 2);
    let futs = [&fails, &with_failing, &alone, &short, &with_short].map(|b| p.predict_batch(b));
    let mut answers = Vec::new();
    for fut in futs {
        answers.push(fut.await);
    }
    let [
        fails_got,
        with_failing_got,
        alone_got,
        short_got,
        with_short_got,
    ] = <[_; 5]>::try_from(answers).unwrap();
    for err in [fails_got, with_failing_got] {
        let err = err.unwrap_err();
        assert!(
            matches!(&err, PredictError::Unavailable { reason, .. } if reason.contains("500")),
            "{err}"
        );
    }
    for err in [short_got, with_short_got] {
        let err = err.unwrap_err();
        assert!(
            matches!(&err, PredictError::Unavailable { reason, .. } if reason.contains("3 predictions for 4 rows")),
            "{err}"
        );
    }
    assert_own_rows(&alone, &alone_got.unwrap());
    assert_eq!(call_sizes(&server), vec![3, 4, 4]);
    assert_eq!(p.stats().predict_failures, 4);
}

#[tokio::test]
async fn a_caller_past_its_deadline_times_out_promptly_and_frees_its_dispatch_slot() {
    let (server, addr) = start(Mode::Slow).await;
    let p = RemotePredictor::new(RemoteConfig {
        timeout: Duration::from_millis(200),
        max_concurrent_dispatches: 1,
        ..coalescing(addr, 10, 100)
    })
    .unwrap();
    let (a, b) = (rows_from(1000, 2), rows_from(2000, 2));
    let started = Instant::now();
    let (a_got, b_got) = tokio::join!(p.predict_batch(&a), p.predict_batch(&b));
    for err in [a_got.unwrap_err(), b_got.unwrap_err()] {
        assert!(matches!(err, PredictError::Timeout { .. }), "{err}");
    }
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "took {:?} for a 200 ms deadline against a 5 s server",
        started.elapsed()
    );
    assert_eq!(call_sizes(&server), vec![4], "both callers shared the call");

    // The slow handler is still sleeping; the single dispatch slot must be free anyway.
    *server.mode.lock() = Mode::Ok;
    let c = rows_from(3000, 1);
    assert_own_rows(&c, &p.predict_batch(&c).await.unwrap());
}

#[tokio::test]
async fn a_full_queue_fails_the_caller_at_once_and_is_counted() {
    use sluice_predictor::remote::COALESCE_QUEUE_CAPACITY;
    let (server, addr) = start(Mode::Ok).await;
    let p = RemotePredictor::new(coalescing(addr, 10, 100)).unwrap();
    let one = rows(1);
    // On this single-threaded runtime the dispatcher cannot run until the test awaits, so
    // the queue holds exactly its capacity.
    let waiting: Vec<_> = (0..COALESCE_QUEUE_CAPACITY)
        .map(|_| p.predict_batch(&one))
        .collect();
    for _ in 0..3 {
        match p.predict_batch(&one) {
            sluice_predictor::PredictFuture::Ready(Some(Err(PredictError::Unavailable {
                reason,
                ..
            }))) => assert!(reason.contains("queue is full"), "{reason}"),
            other => panic!("expected an immediate queue-full error, got {other:?}"),
        }
    }
    let stats = p.stats();
    assert_eq!((stats.coalesce_queue_full, stats.predict_failures), (3, 3));

    // Callers that gave up before their call was sent are left out of it; the others
    // are answered, a full call at a time.
    let mut waiting = waiting;
    let kept = waiting.split_off(COALESCE_QUEUE_CAPACITY / 2);
    drop(waiting);
    for fut in kept {
        assert_own_rows(&one, &fut.await.unwrap());
    }
    let sizes = call_sizes(&server);
    assert_eq!(sizes.iter().sum::<usize>(), COALESCE_QUEUE_CAPACITY / 2);
    assert!(sizes.iter().all(|&n| n <= 100), "{sizes:?}");
    assert_eq!(
        p.stats().callers_merged,
        (COALESCE_QUEUE_CAPACITY / 2) as u64
    );
}

#[tokio::test]
async fn coalescing_settings_round_trip_through_serde_and_bad_values_are_rejected() {
    let defaults: RemoteConfig = serde_json::from_value(json!({})).unwrap();
    assert_eq!(
        (
            defaults.coalesce_window,
            defaults.max_coalesced_rows,
            defaults.max_concurrent_dispatches
        ),
        (Duration::from_millis(1), 100, 36),
        "upstream's defaults, with the row cap at the bulk size"
    );
    let set = RemoteConfig {
        coalesce_window: Duration::from_millis(5),
        max_coalesced_rows: 40,
        max_concurrent_dispatches: 8,
        ..RemoteConfig::default()
    };
    let value = serde_json::to_value(&set).unwrap();
    assert_eq!(value["coalesceWindowMs"], json!(5));
    assert_eq!(value["maxCoalescedRows"], json!(40));
    assert_eq!(value["maxConcurrentDispatches"], json!(8));
    assert_eq!(serde_json::from_value::<RemoteConfig>(value).unwrap(), set);
    RemotePredictor::new(set).unwrap();

    let rejected = |c: RemoteConfig| RemotePredictor::new(c).unwrap_err();
    for rows in [0, 101] {
        let err = rejected(RemoteConfig {
            max_coalesced_rows: rows,
            ..RemoteConfig::default()
        });
        assert_eq!(err, RemoteConfigError::BadCoalescedRows(rows));
        assert!(err.to_string().contains("expected 1..=100"), "{err}");
    }
    let err = rejected(RemoteConfig {
        max_concurrent_dispatches: 0,
        ..RemoteConfig::default()
    });
    assert!(
        err.to_string().contains("maxConcurrentDispatches 0"),
        "{err}"
    );
    let err = rejected(RemoteConfig {
        coalesce_window: Duration::from_millis(400),
        timeout: Duration::from_millis(400),
        ..RemoteConfig::default()
    });
    assert!(
        err.to_string().contains("coalesceWindowMs 400")
            && err.to_string().contains("timeoutMs 400"),
        "{err}"
    );
}
