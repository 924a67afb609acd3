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

#[derive(Deserialize, Default)]
struct RawDetails {
    #[serde(default)]
    cached_tokens: u64,
}

#[derive(Deserialize, Default)]
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
    if !contains(body, b"\"usage\"") {
        return None;
    }
    serde_json::from_slice::<Envelope>(body).ok()?.usage()
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
}
