//! Response-side processing: token usage (buffered JSON and server-sent events) and
//! rewriting the model name back to the one the client asked for.

use serde::Deserialize;

/// Token usage reported by a model server.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// Prompt (input) tokens.
    pub prompt_tokens: u64,
    /// Completion (output) tokens.
    pub completion_tokens: u64,
    /// Total tokens, as reported (prompt + completion when the server omits it).
    pub total_tokens: u64,
    /// Prompt tokens served from the server's prefix cache.
    pub cached_tokens: u64,
}

impl Usage {
    fn merge(&mut self, other: Usage) {
        // Anthropic streams report input tokens first (message_start) and output tokens
        // last (message_delta); OpenAI reports everything once. Later non-zero values win.
        if other.prompt_tokens > 0 {
            self.prompt_tokens = other.prompt_tokens;
        }
        if other.completion_tokens > 0 {
            self.completion_tokens = other.completion_tokens;
        }
        if other.cached_tokens > 0 {
            self.cached_tokens = other.cached_tokens;
        }
        self.total_tokens = other
            .total_tokens
            .max(self.prompt_tokens + self.completion_tokens);
    }
}

#[derive(Deserialize, Default, Debug, PartialEq)]
struct RawDetails {
    #[serde(default)]
    cached_tokens: u64,
}

#[derive(Deserialize, Default, Debug, PartialEq)]
struct RawUsage {
    #[serde(default)]
    prompt_tokens: u64,
    #[serde(default)]
    completion_tokens: u64,
    #[serde(default)]
    input_tokens: u64,
    #[serde(default)]
    output_tokens: u64,
    #[serde(default)]
    total_tokens: u64,
    #[serde(default)]
    prompt_tokens_details: Option<RawDetails>,
    #[serde(default)]
    prompt_token_details: Option<RawDetails>,
    #[serde(default)]
    input_tokens_details: Option<RawDetails>,
    #[serde(default)]
    cache_read_input_tokens: u64,
}

impl From<RawUsage> for Usage {
    fn from(r: RawUsage) -> Self {
        let prompt = r.prompt_tokens.max(r.input_tokens);
        let completion = r.completion_tokens.max(r.output_tokens);
        let cached = [
            r.prompt_tokens_details,
            r.prompt_token_details,
            r.input_tokens_details,
        ]
        .into_iter()
        .flatten()
        .map(|d| d.cached_tokens)
        .max()
        .unwrap_or(0)
        .max(r.cache_read_input_tokens);
        Usage {
            prompt_tokens: prompt,
            completion_tokens: completion,
            total_tokens: r.total_tokens.max(prompt + completion),
            cached_tokens: cached,
        }
    }
}

#[derive(Deserialize, Default)]
struct Nested {
    #[serde(default)]
    usage: Option<RawUsage>,
}

#[derive(Deserialize, Default)]
struct Envelope {
    #[serde(default)]
    usage: Option<RawUsage>,
    /// Responses API `response.completed` events carry `response.usage`.
    #[serde(default)]
    response: Option<Nested>,
    /// Anthropic `message_start` carries `message.usage`.
    #[serde(default)]
    message: Option<Nested>,
}

impl Envelope {
    fn usage(self) -> Option<Usage> {
        self.usage
            .or(self.response.and_then(|r| r.usage))
            .or(self.message.and_then(|m| m.usage))
            .map(Usage::from)
    }
}

/// Usage from a complete (non-streamed) JSON response body; `None` when the body is not
/// JSON or carries no usage.
pub fn usage_from_json(body: &[u8]) -> Option<Usage> {
    // Every place usage can sit is under a `"usage"` key: a body without one (errors,
    // embeddings without usage, plain text) is not worth a JSON parse.
    let last = USAGE_FINDER.rfind(body)?;
    // OpenAI, Responses and Anthropic bodies carry usage at the top level, and vLLM, SGLang
    // and OpenAI put it last: read just that object instead of tokenizing the whole body
    // (choices, logprobs, ...), which cost ~13k instructions per response.
    if let Some(u) = top_level_value_at(body, last, true).and_then(parse_usage_value) {
        return Some(u);
    }
    // Usage elsewhere at the top level: check each occurrence's nesting depth.
    for at in memchr::memmem::rfind_iter(body, USAGE_KEY) {
        if let Some(u) = top_level_value_at(body, at, false).and_then(parse_usage_value) {
            return Some(u);
        }
    }
    // Usage nested elsewhere (`response.usage`, `message.usage`): the full parse.
    serde_json::from_slice::<Envelope>(body).ok()?.usage()
}

static USAGE_FINDER: std::sync::LazyLock<memchr::memmem::FinderRev<'static>> =
    std::sync::LazyLock::new(|| memchr::memmem::FinderRev::new(USAGE_KEY));

const USAGE_KEY: &[u8] = b"\"usage\"";

/// The value after the `"usage"` at `at` when that is a key of the top-level object (not
/// inside a string, not in a nested object or array), and, with `last`, the last one: the
/// value must then be followed by nothing but the top-level object's closing brace, which
/// settles the depth without scanning the body. The value's end is checked by the caller.
fn top_level_value_at(body: &[u8], at: usize, last: bool) -> Option<UsageValue<'_>> {
    if !last && json_depth_at(body, at)? != 1 {
        return None;
    }
    let rest = body.get(at + USAGE_KEY.len()..)?;
    let rest = rest.trim_ascii_start().strip_prefix(b":")?;
    Some(UsageValue {
        bytes: rest.trim_ascii_start(),
        must_end_body: last,
    })
}

/// Where a candidate `usage` value starts.
struct UsageValue<'a> {
    bytes: &'a [u8],
    /// Only `}` (the top-level object's end) may follow the value.
    must_end_body: bool,
}

/// Object/array nesting depth at byte `end` of a JSON text, or `None` when `end` falls
/// inside a string (or the text is malformed before it). Strings are skipped with `memchr`,
/// so this costs far less than parsing.
fn json_depth_at(body: &[u8], end: usize) -> Option<u32> {
    let text = body.get(..end)?;
    let mut depth = 0u32;
    let mut i = 0;
    while let Some(&b) = text.get(i) {
        match b {
            b'"' => {
                // Skip to the closing quote, stepping over escapes.
                let mut j = i + 1;
                loop {
                    let k = j + memchr::memchr2(b'"', b'\\', text.get(j..)?)?;
                    if text.get(k) == Some(&b'\\') {
                        j = k + 2;
                    } else {
                        j = k + 1;
                        break;
                    }
                }
                i = j;
                continue;
            }
            b'{' | b'[' => depth += 1,
            b'}' | b']' => depth = depth.checked_sub(1)?,
            _ => {}
        }
        i += 1;
    }
    Some(depth)
}

/// One `usage` object at the start of the value (what follows it is only checked, not
/// parsed).
fn parse_usage_value(value: UsageValue<'_>) -> Option<Usage> {
    if let Some((raw, used)) = flat_usage(value.bytes) {
        if value.must_end_body && value.bytes.get(used..)?.trim_ascii() != b"}" {
            return None;
        }
        return Some(Usage::from(raw));
    }
    let mut values = serde_json::Deserializer::from_slice(value.bytes).into_iter::<RawUsage>();
    let raw = values.next()?.ok()?;
    if value.must_end_body && value.bytes.get(values.byte_offset()..)?.trim_ascii() != b"}" {
        return None;
    }
    Some(Usage::from(raw))
}

/// The usage object vLLM and SGLang send, `{"key": uint, ...}` (ASCII keys without
/// escapes, non-negative integers), read by hand: serde's derive costs ~1.7k instructions
/// per response for it. Returns the fields and the bytes used. Anything else (details
/// objects, other value types, a known key twice, a number beyond u64) is `None`, and
/// serde reads the value as before.
fn flat_usage(bytes: &[u8]) -> Option<(RawUsage, usize)> {
    let ws = |i: &mut usize| {
        while let Some(b' ' | b'\n' | b'\t' | b'\r') = bytes.get(*i) {
            *i += 1;
        }
    };
    let mut raw = RawUsage::default();
    let mut ignored = 0;
    let mut seen = 0u8;
    let mut i = 0;
    (bytes.first() == Some(&b'{')).then_some(())?;
    i += 1;
    ws(&mut i);
    if bytes.get(i) == Some(&b'}') {
        return Some((raw, i + 1));
    }
    loop {
        ws(&mut i);
        (bytes.get(i) == Some(&b'"')).then_some(())?;
        let key = crate::parse::plain_key(bytes.get(i + 1..)?)?;
        i += key.len() + 2;
        ws(&mut i);
        (bytes.get(i) == Some(&b':')).then_some(())?;
        i += 1;
        ws(&mut i);
        let start = i;
        let mut n: u64 = 0;
        while let Some(&d @ b'0'..=b'9') = bytes.get(i) {
            n = n.checked_mul(10)?.checked_add(u64::from(d - b'0'))?;
            i += 1;
        }
        // JSON forbids leading zeros; fractions and exponents are not u64 for serde.
        if i == start || (bytes.get(start) == Some(&b'0') && i > start + 1) {
            return None;
        }
        if let Some(b'.' | b'e' | b'E') = bytes.get(i) {
            return None;
        }
        let (bit, slot) = match key {
            b"prompt_tokens" => (1, &mut raw.prompt_tokens),
            b"completion_tokens" => (2, &mut raw.completion_tokens),
            b"input_tokens" => (4, &mut raw.input_tokens),
            b"output_tokens" => (8, &mut raw.output_tokens),
            b"total_tokens" => (16, &mut raw.total_tokens),
            b"cache_read_input_tokens" => (32, &mut raw.cache_read_input_tokens),
            // The details objects are never integers, so they never get here.
            _ => (0, &mut ignored),
        };
        if seen & bit != 0 {
            // A duplicate field is serde's error.
            return None;
        }
        seen |= bit;
        *slot = n;
        ws(&mut i);
        match bytes.get(i)? {
            b',' => i += 1,
            b'}' => return Some((raw, i + 1)),
            _ => return None,
        }
    }
}

/// Upper bound on one buffered SSE line; longer lines are skipped, not buffered.
const MAX_SSE_LINE: usize = 1 << 20;

/// Reads usage out of a server-sent-event stream delivered in arbitrary chunks.
#[derive(Debug, Default)]
pub struct SseUsageScanner {
    carry: Vec<u8>,
    skipping: bool,
    usage: Option<Usage>,
    events: u64,
}

impl SseUsageScanner {
    /// Feeds the next chunk of the stream.
    pub fn feed(&mut self, chunk: &[u8]) {
        let mut rest = chunk;
        while let Some(nl) = rest.iter().position(|&b| b == b'\n') {
            let (line, tail) = rest.split_at(nl);
            rest = tail.get(1..).unwrap_or_default();
            if self.skipping {
                self.skipping = false;
                continue;
            }
            if self.carry.is_empty() {
                self.line(line);
            } else {
                let mut full = std::mem::take(&mut self.carry);
                full.extend_from_slice(line);
                self.line(&full);
            }
        }
        if !self.skipping && !rest.is_empty() {
            if self.carry.len() + rest.len() > MAX_SSE_LINE {
                self.carry.clear();
                self.skipping = true;
            } else {
                self.carry.extend_from_slice(rest);
            }
        }
    }

    /// Ends the stream (a final line without a newline still counts).
    pub fn finish(&mut self) {
        if !self.carry.is_empty() && !self.skipping {
            let line = std::mem::take(&mut self.carry);
            self.line(&line);
        }
    }

    /// The usage seen so far.
    pub fn usage(&self) -> Option<Usage> {
        self.usage
    }

    /// How many `data:` events carried content (a proxy for output tokens when the server
    /// reports no usage).
    pub fn events(&self) -> u64 {
        self.events
    }

    fn line(&mut self, line: &[u8]) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(data) = line.strip_prefix(b"data:") else {
            return;
        };
        let data = data.strip_prefix(b" ").unwrap_or(data);
        if data == b"[DONE]" {
            return;
        }
        self.events += 1;
        if !contains(data, b"\"usage\"") {
            return;
        }
        if let Some(u) = serde_json::from_slice::<Envelope>(data)
            .ok()
            .and_then(Envelope::usage)
        {
            self.usage.get_or_insert_with(Usage::default).merge(u);
        }
    }
}

/// Whether `needle` occurs in `hay`.
pub fn contains(hay: &[u8], needle: &[u8]) -> bool {
    find(hay, needle, 0).is_some()
}

fn find(hay: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    if needle.is_empty() {
        return None;
    }
    // SIMD substring search: response bodies and SSE lines are scanned once per chunk.
    memchr::memmem::find(hay.get(from..)?, needle).map(|i| i + from)
}

/// Rewrites `"model":"<target>"` back to `"model":"<incoming>"` (or, when nothing matched,
/// the same with a space after the colon), as upstream does. Returns `None` when nothing
/// changed, so callers can forward the original bytes.
pub fn rewrite_model_back(body: &[u8], target: &str, incoming: &str) -> Option<Vec<u8>> {
    if target.is_empty() || incoming.is_empty() || target == incoming {
        return None;
    }
    let target_json = serde_json::to_string(target).ok()?;
    let incoming_json = serde_json::to_string(incoming).ok()?;
    for sep in [":", ": "] {
        let from = format!("\"model\"{sep}{target_json}");
        let to = format!("\"model\"{sep}{incoming_json}");
        if let Some(out) = replace_all(body, from.as_bytes(), to.as_bytes()) {
            return Some(out);
        }
    }
    None
}

fn replace_all(hay: &[u8], from: &[u8], to: &[u8]) -> Option<Vec<u8>> {
    let mut at = find(hay, from, 0)?;
    let mut out = Vec::with_capacity(hay.len() + to.len());
    let mut last = 0;
    loop {
        out.extend_from_slice(hay.get(last..at)?);
        out.extend_from_slice(to);
        last = at + from.len();
        match find(hay, from, last) {
            Some(next) => at = next,
            None => break,
        }
    }
    out.extend_from_slice(hay.get(last..)?);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openai_and_responses_usage_is_read() {
        let chat = br#"{"object":"chat.completion","model":"m","usage":{"prompt_tokens":7,"completion_tokens":10,"total_tokens":17,"prompt_tokens_details":{"cached_tokens":4}}}"#;
        assert_eq!(
            usage_from_json(chat),
            Some(Usage {
                prompt_tokens: 7,
                completion_tokens: 10,
                total_tokens: 17,
                cached_tokens: 4
            })
        );
        let resp = br#"{"object":"response","usage":{"input_tokens":3,"output_tokens":5}}"#;
        assert_eq!(
            usage_from_json(resp).map(|u| (u.prompt_tokens, u.total_tokens)),
            Some((3, 8))
        );
        assert_eq!(usage_from_json(b"no healthy upstream"), None);
        assert_eq!(usage_from_json(br#"{"choices":[]}"#), None);
    }

    /// The reference: the whole body parsed as JSON.
    fn full_parse(body: &[u8]) -> Option<Usage> {
        serde_json::from_slice::<Envelope>(body).ok()?.usage()
    }

    #[test]
    fn only_the_top_level_usage_counts_wherever_the_key_appears() {
        let cases: &[(&[u8], Option<u64>)] = &[
            // Simulator / vLLM order: usage last.
            (
                br#"{"choices":[{"index":0,"text":" hi"}],"model":"m","object":"text_completion","usage":{"completion_tokens":1,"prompt_tokens":246,"total_tokens":247}}"#,
                Some(246),
            ),
            // Usage first, then a nested object with its own "usage" key.
            (
                br#"{"usage":{"prompt_tokens":3},"choices":[{"usage":{"prompt_tokens":99}}]}"#,
                Some(3),
            ),
            // The word inside strings, escaped or not, and as a value.
            (
                br#"{"choices":[{"text":"the \"usage\": {\"prompt_tokens\": 5} key"}],"note":"usage","usage":{"prompt_tokens":8}}"#,
                Some(8),
            ),
            (br#"{"usage":{"prompt_tokens":4},"note":"usage"}"#, Some(4)),
            // Whitespace around the colon; backslashes before a closing quote.
            (
                b"{\"text\":\"a\\\\\", \"usage\" : \n {\"input_tokens\": 6, \"output_tokens\": 1}}",
                Some(6),
            ),
            // Only nested usage (Responses-style event as a body): the full parse finds it.
            (
                br#"{"type":"response.completed","response":{"usage":{"input_tokens":2,"output_tokens":9}}}"#,
                Some(2),
            ),
            // Last key, but of a nested object: not the top level.
            (br#"{"a":{"usage":{"prompt_tokens":5}}}"#, None),
            (
                br#"{"usage":{"prompt_tokens":7},"a":{"usage":{"prompt_tokens":5}}}"#,
                Some(7),
            ),
            // Nested only in an array: no top-level usage.
            (br#"{"data":[{"usage":{"prompt_tokens":1}}]}"#, None),
            (br#"{"usage":null}"#, None),
            (br#"{"text":"\"usage\":{\"prompt_tokens\":1}"}"#, None),
            (br#"{"usage":{"prompt_tokens":1"#, None),
            (br#""usage""#, None),
        ];
        for (body, want) in cases {
            let got = usage_from_json(body);
            assert_eq!(
                got.map(|u| u.prompt_tokens),
                *want,
                "{}",
                String::from_utf8_lossy(body)
            );
            if full_parse(body).is_some() {
                assert_eq!(got, full_parse(body), "{}", String::from_utf8_lossy(body));
            }
        }
    }

    #[test]
    fn sse_usage_survives_arbitrary_chunking() {
        let stream = b"data: {\"choices\":[]}\n\ndata: {\"usage\":{\"prompt_tokens\":7,\"total_tokens\":17,\"completion_tokens\":10}}\n\ndata: [DONE]\n\n";
        for split in 1..stream.len() {
            let mut s = SseUsageScanner::default();
            s.feed(&stream[..split]);
            s.feed(&stream[split..]);
            s.finish();
            let u = s.usage().unwrap();
            assert_eq!(
                (u.prompt_tokens, u.completion_tokens),
                (7, 10),
                "split at {split}"
            );
            assert_eq!(s.events(), 2);
        }
    }

    #[test]
    fn sse_responses_and_anthropic_usage() {
        let mut s = SseUsageScanner::default();
        s.feed(b"event: response.completed\ndata: {\"type\":\"response.completed\",\"response\":{\"usage\":{\"input_tokens\":2,\"output_tokens\":9}}}\n");
        assert_eq!(s.usage().map(|u| u.completion_tokens), Some(9));

        let mut a = SseUsageScanner::default();
        a.feed(b"data: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":12,\"output_tokens\":1}}}\r\n");
        a.feed(b"data: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":30}}\r\n");
        let u = a.usage().unwrap();
        assert_eq!(
            (u.prompt_tokens, u.completion_tokens, u.total_tokens),
            (12, 30, 42)
        );
    }

    #[test]
    fn oversized_sse_lines_are_skipped_not_buffered() {
        let mut s = SseUsageScanner::default();
        s.feed(b"data: ");
        s.feed(&vec![b'x'; MAX_SSE_LINE + 10]);
        assert!(s.carry.is_empty());
        s.feed(b"still the long line\ndata: {\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":2}}\n");
        assert_eq!(s.usage().map(|u| u.completion_tokens), Some(2));
    }

    #[test]
    fn model_is_rewritten_back() {
        let body = br#"{"id":"x","model":"rewritten-model","choices":[{"text":"model"}]}"#;
        let out = rewrite_model_back(body, "rewritten-model", "my-model").unwrap();
        assert_eq!(
            out,
            br#"{"id":"x","model":"my-model","choices":[{"text":"model"}]}"#.to_vec()
        );
        let spaced = br#"{"model": "t", "x": 1}"#;
        assert_eq!(
            rewrite_model_back(spaced, "t", "in").unwrap(),
            br#"{"model": "in", "x": 1}"#.to_vec()
        );
        assert_eq!(rewrite_model_back(body, "same", "same"), None);
        assert_eq!(rewrite_model_back(body, "other", "my-model"), None);
        let sse = b"data: {\"model\":\"t\"}\n\ndata: {\"model\":\"t\"}\n\n";
        assert_eq!(
            rewrite_model_back(sse, "t", "in").unwrap(),
            b"data: {\"model\":\"in\"}\n\ndata: {\"model\":\"in\"}\n\n".to_vec()
        );
    }

    #[test]
    fn the_hand_read_usage_object_agrees_with_serde() {
        use rand::rngs::SmallRng;
        use rand::{Rng, SeedableRng};
        let serde_read = |b: &[u8]| {
            let mut it = serde_json::Deserializer::from_slice(b).into_iter::<RawUsage>();
            let raw = it.next()?.ok()?;
            Some((raw, it.byte_offset()))
        };
        let seeds: [&[u8]; 4] = [
            br#"{"completion_tokens":1,"prompt_tokens":246,"total_tokens":247}"#,
            br#"{ "input_tokens" : 12 , "output_tokens":0,"cache_read_input_tokens":7 }"#,
            br#"{"prompt_tokens":5,"prompt_tokens_details":{"cached_tokens":3}}"#,
            br#"{}"#,
        ];
        for seed in &seeds[..2] {
            assert!(
                flat_usage(seed).is_some(),
                "plain usage takes the fast path"
            );
        }
        let mut rng = SmallRng::seed_from_u64(9);
        let alphabet = b"{}\":,0123456789.eE-_ \\aptokens";
        let mut fast = 0;
        for _ in 0..20_000 {
            let mut b = seeds[rng.random_range(0..seeds.len())].to_vec();
            for _ in 0..rng.random_range(0..3) {
                let at = rng.random_range(0..b.len());
                match rng.random_range(0..3) {
                    0 => {
                        b.remove(at);
                    }
                    1 => b.insert(at, alphabet[rng.random_range(0..alphabet.len())]),
                    _ => b[at] = alphabet[rng.random_range(0..alphabet.len())],
                }
            }
            if let Some(got) = flat_usage(&b) {
                fast += 1;
                assert_eq!(
                    Some(got),
                    serde_read(&b),
                    "{:?}",
                    String::from_utf8_lossy(&b)
                );
            }
        }
        assert!(fast > 1_000, "only {fast} bodies took the fast path");
    }
}
