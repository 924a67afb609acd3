//! A small HTTP/1.1 client for the load generator.
//!
//! A streamed answer is one small TCP segment per token, so the client's cost per segment
//! decides how many streamed requests a core can drive. With hyper's pooled client every
//! segment wakes a connection task, which decodes it and passes it through a channel to the
//! request's task; here the request's own task reads the socket, de-chunks the body in place
//! and hands each piece of body to the caller, so a token costs one wake-up and one read.
//!
//! Scope: `http://` targets, one request per connection at a time (no pipelining), keep-alive
//! with a bounded pool of idle connections per target, bodies framed by `Content-Length`,
//! chunked transfer coding or connection close.

use std::collections::HashMap;
use std::pin::Pin;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

/// Largest response head accepted.
const MAX_HEAD: usize = 64 << 10;
/// Headers parsed in a response head.
const MAX_HEADERS: usize = 64;
/// Bytes read from the socket at a time.
const READ_CHUNK: usize = 16 << 10;

/// Where requests go: the parts of an `http://host:port/prefix` base URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Target {
    /// `host:port` to connect to (port 80 when the URL names none).
    pub(crate) addr: String,
    /// The `Host` header.
    pub(crate) host: String,
    /// Path prefix without a trailing slash (`""` for none).
    pub(crate) prefix: String,
}

impl Target {
    /// Parses a base URL; the error says what was expected.
    pub(crate) fn parse(url: &str) -> Result<Self, String> {
        let rest = url.strip_prefix("http://").ok_or_else(|| {
            format!("target {url:?}: expected an http:// base URL such as http://127.0.0.1:8000")
        })?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        if authority.is_empty() || authority.contains('@') {
            return Err(format!(
                "target {url:?}: expected host[:port] after http:// (no user info)"
            ));
        }
        let has_port = match authority.rfind(':') {
            // An IPv6 literal's colons sit inside brackets.
            Some(i) => !authority[i..].contains(']'),
            None => false,
        };
        let addr = if has_port {
            authority.to_owned()
        } else {
            format!("{authority}:80")
        };
        Ok(Self {
            addr,
            host: authority.to_owned(),
            prefix: path.trim_end_matches('/').to_owned(),
        })
    }
}

/// Idle keep-alive connections by target address, and how long an exchange may wait for
/// the server.
#[derive(Debug)]
pub(crate) struct Pool {
    idle: Mutex<HashMap<String, Vec<TcpStream>>>,
    max_idle_per_target: usize,
    stall_timeout: Duration,
}

impl Pool {
    /// A pool keeping at most `max_idle_per_target` idle connections per target, whose
    /// exchanges give up when the server neither takes nor sends a byte for `stall_timeout`.
    pub(crate) fn new(max_idle_per_target: usize, stall_timeout: Duration) -> Self {
        Self {
            idle: Mutex::new(HashMap::new()),
            max_idle_per_target,
            stall_timeout,
        }
    }

    fn take(&self, addr: &str) -> Option<TcpStream> {
        self.idle.lock().get_mut(addr).and_then(Vec::pop)
    }

    fn put(&self, addr: &str, conn: TcpStream) {
        let mut idle = self.idle.lock();
        let v = idle.entry(addr.to_owned()).or_default();
        if v.len() < self.max_idle_per_target {
            v.push(conn);
        }
    }
}

/// The head of a response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Head {
    /// Status code.
    pub(crate) status: u16,
    /// Header names (lower case) and values that the caller asked to keep.
    pub(crate) kept: Vec<(String, String)>,
}

/// Why an exchange failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Failure {
    /// No response head (connect, write, or the connection closed first).
    Request(String),
    /// The head arrived but the body broke off.
    Body(String),
    /// The server neither took nor sent a byte for this long (before or after the head).
    Stalled(Duration),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    Length(u64),
    Chunked,
    UntilClose,
}

/// Receives a response as it arrives.
pub(crate) trait Sink {
    /// The head, before any of the body.
    fn head(&mut self, head: &Head);
    /// The next piece of the de-chunked body.
    fn data(&mut self, data: &[u8]);
}

/// Sends `request` (a complete HTTP/1.1 request) to `target` and streams the response into
/// `sink` piece by piece as it arrives. `keep` names the response headers to return.
///
/// A pooled connection that the server closed while idle fails before any response byte;
/// then the request is sent once more on a fresh connection, as hyper's client does. A
/// server that goes quiet for the pool's stall timeout fails the exchange (and is not
/// retried: it may be working on the request). There is no deadline on the whole exchange:
/// a long answer that keeps arriving is read to its end.
pub(crate) async fn exchange(
    pool: &Pool,
    target: &Target,
    request: &[u8],
    keep: &[&str],
    sink: &mut impl Sink,
) -> Result<Head, Failure> {
    let mut conn = None;
    let mut reused = false;
    if let Some(c) = pool.take(&target.addr) {
        conn = Some(c);
        reused = true;
    }
    let stall = pool.stall_timeout;
    loop {
        let mut c = match conn.take() {
            Some(c) => c,
            None => connect(&target.addr, stall).await?,
        };
        let mut buf: Vec<u8> = Vec::with_capacity(READ_CHUNK);
        let mut stall = Watchdog::new(stall);
        let head = match send_and_read_head(&mut c, request, &mut buf, keep, &mut stall).await {
            Ok(h) => h,
            Err(Failure::Request(_)) if reused => {
                // Stale keep-alive connection: nothing was answered, try a fresh one.
                reused = false;
                continue;
            }
            Err(e) => return Err(e),
        };
        let (head, framing, keep_alive, used) = head;
        sink.head(&head);
        buf.drain(..used);
        let clean = read_body(&mut c, &mut buf, framing, sink, &mut stall).await?;
        if keep_alive && clean {
            pool.put(&target.addr, c);
        }
        return Ok(head);
    }
}

async fn connect(addr: &str, stall: Duration) -> Result<TcpStream, Failure> {
    let c = tokio::time::timeout(stall, TcpStream::connect(addr))
        .await
        .map_err(|_| {
            Failure::Request(format!(
                "request failed: cannot connect to {addr}: no answer in {stall:?}"
            ))
        })?
        .map_err(|e| Failure::Request(format!("request failed: cannot connect to {addr}: {e}")))?;
    let _ = c.set_nodelay(true);
    Ok(c)
}

/// Notices when the server has gone quiet for the stall timeout. One timer per exchange,
/// pushed back lazily: a read only notes the time, and the timer, when it fires early,
/// re-arms at the last progress plus the timeout. So a streamed token costs a clock read,
/// not a timer insertion.
struct Watchdog {
    timeout: Duration,
    last_progress: Instant,
    timer: Pin<Box<Sleep>>,
}

impl Watchdog {
    fn new(timeout: Duration) -> Self {
        let now = Instant::now();
        Self {
            timeout,
            last_progress: now,
            timer: Box::pin(tokio::time::sleep_until(now + timeout)),
        }
    }

    fn progress(&mut self) {
        self.last_progress = Instant::now();
    }

    /// Resolves once nothing has moved for the timeout.
    async fn stalled(&mut self) {
        loop {
            self.timer.as_mut().await;
            let due = self.last_progress + self.timeout;
            if Instant::now() >= due {
                return;
            }
            self.timer.as_mut().reset(due);
        }
    }
}

/// Reads what the socket has into `buf`, unless the server stays quiet for the stall timeout.
async fn read_some(
    c: &mut TcpStream,
    buf: &mut Vec<u8>,
    stall: &mut Watchdog,
) -> Result<usize, Failure> {
    buf.reserve(READ_CHUNK);
    let timeout = stall.timeout;
    tokio::select! {
        biased;
        read = c.read_buf(buf) => {
            stall.progress();
            read.map_err(|e| Failure::Request(e.to_string()))
        }
        () = stall.stalled() => Err(Failure::Stalled(timeout)),
    }
}

/// Writes the request and reads until the response head is complete. Returns the head, the
/// body framing, whether the connection may be reused, and the head's length in `buf`.
async fn send_and_read_head(
    c: &mut TcpStream,
    request: &[u8],
    buf: &mut Vec<u8>,
    keep: &[&str],
    stall: &mut Watchdog,
) -> Result<(Head, Framing, bool, usize), Failure> {
    let timeout = stall.timeout;
    let mut sent = 0;
    while sent < request.len() {
        tokio::select! {
            biased;
            written = c.write(&request[sent..]) => {
                stall.progress();
                match written {
                    Ok(0) => return Err(Failure::Request("request failed: connection closed".into())),
                    Ok(n) => sent += n,
                    Err(e) => return Err(Failure::Request(format!("request failed: {e}"))),
                }
            }
            () = stall.stalled() => return Err(Failure::Stalled(timeout)),
        }
    }
    loop {
        if let Some(parsed) = parse_head(buf, keep).map_err(Failure::Request)? {
            // An interim 1xx answer is followed by the real one.
            if (100..200).contains(&parsed.0.status) {
                buf.drain(..parsed.3);
                continue;
            }
            return Ok(parsed);
        }
        if buf.len() > MAX_HEAD {
            return Err(Failure::Request(format!(
                "request failed: response head larger than {MAX_HEAD} bytes"
            )));
        }
        let n = read_some(c, buf, stall).await.map_err(|e| match e {
            Failure::Request(e) => Failure::Request(format!("request failed: {e}")),
            other => other,
        })?;
        if n == 0 {
            return Err(Failure::Request(
                "request failed: connection closed before a response".into(),
            ));
        }
    }
}

/// Parses a complete response head at the front of `buf`, or `None` if more bytes are needed.
fn parse_head(buf: &[u8], keep: &[&str]) -> Result<Option<(Head, Framing, bool, usize)>, String> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut headers);
    let used = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(format!("request failed: malformed response head: {e}")),
    };
    let status = resp.code.unwrap_or(0);
    let mut keep_alive = resp.version == Some(1);
    let mut framing = Framing::UntilClose;
    let mut kept = Vec::new();
    for h in resp.headers.iter() {
        let v = std::str::from_utf8(h.value).unwrap_or("");
        if h.name.eq_ignore_ascii_case("content-length") {
            if framing != Framing::Chunked {
                let n = v
                    .trim()
                    .parse::<u64>()
                    .map_err(|_| format!("request failed: content-length {v:?} is not a number"))?;
                framing = Framing::Length(n);
            }
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            if v.to_ascii_lowercase().trim_end().ends_with("chunked") {
                framing = Framing::Chunked;
            }
        } else if h.name.eq_ignore_ascii_case("connection") {
            let v = v.to_ascii_lowercase();
            if v.contains("close") {
                keep_alive = false;
            } else if v.contains("keep-alive") {
                keep_alive = true;
            }
        }
        if keep.iter().any(|k| h.name.eq_ignore_ascii_case(k)) {
            kept.push((h.name.to_ascii_lowercase(), v.to_owned()));
        }
    }
    // These statuses carry no body whatever the headers say.
    if status == 204 || status == 304 {
        framing = Framing::Length(0);
    }
    if framing == Framing::UntilClose {
        keep_alive = false;
    }
    Ok(Some((Head { status, kept }, framing, keep_alive, used)))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// Expecting a chunk-size line.
    Size,
    /// Inside a chunk's data, this many bytes left.
    Data(u64),
    /// After a chunk's data, expecting CRLF.
    DataEnd,
    /// After the last chunk, reading trailer lines until an empty one.
    Trailers,
}

/// Reads the body to its end, passing it on piece by piece. Returns whether the connection
/// ended exactly at the end of the message (so it can carry another request).
async fn read_body(
    c: &mut TcpStream,
    buf: &mut Vec<u8>,
    framing: Framing,
    sink: &mut impl Sink,
    stall: &mut Watchdog,
) -> Result<bool, Failure> {
    let mut left = match framing {
        Framing::Length(n) => n,
        _ => 0,
    };
    let mut chunk = Chunk::Size;
    loop {
        // Consume what is buffered.
        let mut at = 0;
        match framing {
            Framing::Length(_) => {
                let n = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
                if n > 0 {
                    sink.data(&buf[..n]);
                }
                left -= n as u64;
                at = n;
                if left == 0 {
                    return Ok(buf.len() == n);
                }
            }
            Framing::UntilClose => {
                if !buf.is_empty() {
                    sink.data(buf);
                }
                at = buf.len();
            }
            Framing::Chunked => loop {
                match chunk {
                    Chunk::Size | Chunk::Trailers => {
                        let Some(eol) = memchr::memmem::find(&buf[at..], b"\r\n") else {
                            if buf.len() - at > 4096 {
                                return Err(Failure::Body(
                                    "response body broken: chunk-size line too long".into(),
                                ));
                            }
                            break;
                        };
                        let line = &buf[at..at + eol];
                        at += eol + 2;
                        if chunk == Chunk::Trailers {
                            if line.is_empty() {
                                return Ok(at == buf.len());
                            }
                            continue;
                        }
                        let hex = line.split(|b| *b == b';').next().unwrap_or(&[]);
                        let size = std::str::from_utf8(hex)
                            .ok()
                            .and_then(|h| u64::from_str_radix(h.trim(), 16).ok())
                            .ok_or_else(|| {
                                Failure::Body(format!(
                                    "response body broken: bad chunk size {:?}",
                                    String::from_utf8_lossy(line)
                                ))
                            })?;
                        chunk = if size == 0 {
                            Chunk::Trailers
                        } else {
                            Chunk::Data(size)
                        };
                    }
                    Chunk::Data(rem) => {
                        let n = usize::try_from(rem)
                            .unwrap_or(usize::MAX)
                            .min(buf.len() - at);
                        if n == 0 {
                            break;
                        }
                        sink.data(&buf[at..at + n]);
                        at += n;
                        let rem = rem - n as u64;
                        chunk = if rem == 0 {
                            Chunk::DataEnd
                        } else {
                            Chunk::Data(rem)
                        };
                    }
                    Chunk::DataEnd => {
                        if buf.len() - at < 2 {
                            break;
                        }
                        if &buf[at..at + 2] != b"\r\n" {
                            return Err(Failure::Body(
                                "response body broken: chunk data not followed by CRLF".into(),
                            ));
                        }
                        at += 2;
                        chunk = Chunk::Size;
                    }
                }
            },
        }
        buf.drain(..at);
        let n = read_some(c, buf, stall).await.map_err(|e| match e {
            Failure::Request(e) => Failure::Body(format!("response body broken: {e}")),
            other => other,
        })?;
        if n == 0 {
            return match framing {
                Framing::UntilClose => Ok(false),
                _ => Err(Failure::Body(
                    "response body broken: connection closed before the end of the body".into(),
                )),
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    #[derive(Default)]
    struct Got {
        status: u16,
        kept: Vec<(String, String)>,
        body: Vec<u8>,
        pieces: usize,
    }

    impl Sink for Got {
        fn head(&mut self, head: &Head) {
            self.status = head.status;
            self.kept = head.kept.clone();
        }
        fn data(&mut self, data: &[u8]) {
            self.body.extend_from_slice(data);
            self.pieces += 1;
        }
    }

    /// A server that answers each request on a connection with the next scripted answer,
    /// written in pieces of `piece` bytes (to split heads, chunk sizes and CRLFs), and counts
    /// the connections it accepted.
    async fn scripted(answers: Vec<&'static str>, piece: usize) -> (Target, Arc<AtomicUsize>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let conns = Arc::new(AtomicUsize::new(0));
        let counter = conns.clone();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = l.accept().await.unwrap();
                counter.fetch_add(1, Ordering::SeqCst);
                let answers = answers.clone();
                tokio::spawn(async move {
                    for a in answers {
                        let mut req = Vec::new();
                        let mut b = [0u8; 4096];
                        while memchr::memmem::find(&req, b"\r\n\r\n").is_none() {
                            let n = s.read(&mut b).await.unwrap();
                            if n == 0 {
                                return;
                            }
                            req.extend_from_slice(&b[..n]);
                        }
                        for p in a.as_bytes().chunks(piece) {
                            s.write_all(p).await.unwrap();
                            s.flush().await.unwrap();
                            tokio::task::yield_now().await;
                        }
                    }
                });
            }
        });
        (
            Target::parse(&format!("http://{addr}/base/")).unwrap(),
            conns,
        )
    }

    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    const REQ: &[u8] = b"GET /base/x HTTP/1.1\r\nhost: h\r\n\r\n";

    #[test]
    fn base_urls_parse_into_address_host_and_prefix() {
        let t = Target::parse("http://127.0.0.1:8000").unwrap();
        assert_eq!(
            (t.addr.as_str(), t.host.as_str(), t.prefix.as_str()),
            ("127.0.0.1:8000", "127.0.0.1:8000", "")
        );
        let t = Target::parse("http://gw.local/v2/").unwrap();
        assert_eq!((t.addr.as_str(), t.prefix.as_str()), ("gw.local:80", "/v2"));
        let t = Target::parse("http://[::1]").unwrap();
        assert_eq!(t.addr, "[::1]:80");
        let e = Target::parse("https://x:1").unwrap_err();
        assert!(e.contains("expected an http:// base URL"), "{e}");
        assert!(Target::parse("http://").is_err());
    }

    #[tokio::test]
    async fn chunked_bodies_split_anywhere_are_decoded_and_the_connection_reused() {
        let answer = "HTTP/1.1 200 OK\r\nx-sim-server: sim-3\r\ntransfer-encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n7\r\n, world\r\n0\r\ntrailer: t\r\n\r\n";
        for piece in [1, 3, 7, 1000] {
            let (t, conns) = scripted(vec![answer, answer], piece).await;
            let pool = Pool::new(4, Duration::from_secs(10));
            for _ in 0..2 {
                let mut got = Got::default();
                let head = exchange(&pool, &t, REQ, &["x-sim-server"], &mut got)
                    .await
                    .unwrap();
                assert_eq!(head.status, 200);
                assert_eq!(
                    got.kept,
                    vec![("x-sim-server".to_owned(), "sim-3".to_owned())]
                );
                assert_eq!(got.body, b"hello, world", "piece {piece}");
            }
            assert_eq!(conns.load(Ordering::SeqCst), 1, "keep-alive, piece {piece}");
        }
    }

    #[tokio::test]
    async fn content_length_and_close_delimited_bodies() {
        let (t, _) = scripted(
            vec!["HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 404 Not Found\r\ncontent-length: 4\r\n\r\nnope"],
            2,
        )
        .await;
        let pool = Pool::new(4, Duration::from_secs(10));
        let mut got = Got::default();
        exchange(&pool, &t, REQ, &[], &mut got).await.unwrap();
        assert_eq!((got.status, got.body.as_slice()), (404, &b"nope"[..]));

        // No length, no chunking: the body ends when the server closes, and that connection
        // cannot carry the next request.
        let (t, conns) = scripted(vec!["HTTP/1.0 200 OK\r\n\r\nuntil close"], 4).await;
        for _ in 0..2 {
            let mut got = Got::default();
            exchange(&pool, &t, REQ, &[], &mut got).await.unwrap();
            assert_eq!(got.body, b"until close");
        }
        assert_eq!(conns.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_body_cut_short_is_an_error_and_a_stale_pooled_connection_is_retried() {
        let (t, _) = scripted(
            vec!["HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhel"],
            100,
        )
        .await;
        let pool = Pool::new(4, Duration::from_secs(10));
        let mut got = Got::default();
        // The scripted server closes after its single answer.
        let e = exchange(&pool, &t, REQ, &[], &mut got).await.unwrap_err();
        assert!(matches!(e, Failure::Body(_)), "{e:?}");
        assert_eq!(got.body, b"hel");

        // One answer per connection: the pooled connection is closed by the server, so the
        // second request must go out again on a new one.
        let ok = "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
        let (t, conns) = scripted(vec![ok], 100).await;
        for _ in 0..2 {
            let mut got = Got::default();
            exchange(&pool, &t, REQ, &[], &mut got).await.unwrap();
            assert_eq!(got.body, b"ok");
        }
        assert_eq!(conns.load(Ordering::SeqCst), 2);
    }
}
