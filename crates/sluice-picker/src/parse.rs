//! Request-body parsing for the OpenAI API types upstream's `openai-parser` reads, plus
//! Anthropic `/v1/messages`, and the in-place model rewrite.
//!
//! Only the fields routing needs are read; everything else is skipped without allocating.
//! The body is never re-marshalled: a model rewrite splices the new name into the original
//! bytes, so key order and formatting survive (upstream re-marshals from a map and reorders
//! keys; clients and model servers cannot tell the difference, logs and diffs can).

use serde::Deserialize;
use serde_json::value::RawValue;

mod scan;

pub(crate) use scan::plain_key;

/// Which API a request body belongs to, chosen by the suffix of the request path as
/// upstream does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ApiKind {
    /// `/v1/completions`: `prompt` is a non-empty string or list of strings.
    Completions,
    /// `/v1/chat/completions`: at least one message.
    ChatCompletions,
    /// `/v1/responses`: `input`.
    Responses,
    /// `/v1/conversations`: `items`.
    Conversations,
    /// `/v1/embeddings`: `input`.
    Embeddings,
    /// Anthropic `/v1/messages`: at least one message.
    AnthropicMessages,
}

impl ApiKind {
    /// The API for a request path (query string ignored). Unknown paths are treated as
    /// completions, like upstream's default.
    pub fn from_path(path: &str) -> Self {
        let path = path
            .split(['?', '#'])
            .next()
            .unwrap_or(path)
            .trim_end_matches('/');
        if path.ends_with("/chat/completions") {
            ApiKind::ChatCompletions
        } else if path.ends_with("/completions") {
            ApiKind::Completions
        } else if path.ends_with("/responses") {
            ApiKind::Responses
        } else if path.ends_with("/conversations") {
            ApiKind::Conversations
        } else if path.ends_with("/embeddings") {
            ApiKind::Embeddings
        } else if path.ends_with("/messages") {
            ApiKind::AnthropicMessages
        } else {
            ApiKind::Completions
        }
    }

    /// The field that carries the prompt for this API.
    fn prompt_field(self) -> &'static str {
        match self {
            ApiKind::Completions => "prompt",
            ApiKind::ChatCompletions | ApiKind::AnthropicMessages => "messages",
            ApiKind::Responses | ApiKind::Embeddings => "input",
            ApiKind::Conversations => "items",
        }
    }
}

/// Why a request body was rejected (each becomes a 400 with this text).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// Not a JSON object.
    #[error("request body is not a JSON object: {0}")]
    NotJson(String),
    /// No string `model`.
    #[error("model not found in request body (expected a string field \"model\")")]
    NoModel,
    /// The API's prompt field is missing or empty.
    #[error("request body for {api:?} has no {field:?} (expected a non-empty value)")]
    NoPrompt {
        /// The API chosen from the path.
        api: ApiKind,
        /// The missing field.
        field: &'static str,
    },
}

#[derive(Deserialize)]
struct Fields<'a> {
    #[serde(borrow, default)]
    model: Option<&'a RawValue>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(borrow, default)]
    cache_salt: Option<&'a RawValue>,
    #[serde(borrow, default)]
    prompt: Option<&'a RawValue>,
    #[serde(borrow, default)]
    messages: Option<&'a RawValue>,
    #[serde(borrow, default)]
    input: Option<&'a RawValue>,
    #[serde(borrow, default)]
    items: Option<&'a RawValue>,
    #[serde(borrow, default)]
    system: Option<&'a RawValue>,
}

impl<'a> From<Fields<'a>> for scan::Found<'a> {
    fn from(f: Fields<'a>) -> Self {
        scan::Found {
            model: f.model.map(raw_bytes),
            stream: f.stream,
            cache_salt: f.cache_salt.map(raw_bytes),
            prompt: f.prompt.map(raw_bytes),
            messages: f.messages.map(raw_bytes),
            input: f.input.map(raw_bytes),
            items: f.items.map(raw_bytes),
            system: f.system.map(raw_bytes),
        }
    }
}

/// What routing needs from a request body; byte ranges point into the parsed body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedRequest {
    /// The API chosen from the path.
    pub api: ApiKind,
    /// The model the client asked for.
    pub model: String,
    /// `stream: true`.
    pub stream: bool,
    /// Byte range of the `model` value (including its quotes) in the body.
    pub model_span: (usize, usize),
    /// Byte range of the prompt (raw JSON of `prompt`/`messages`/`input`/`items`).
    pub prompt_span: (usize, usize),
    /// Byte range of Anthropic's `system`, which precedes the messages in the prompt.
    pub system_span: Option<(usize, usize)>,
    /// `cache_salt`, which feeds the prefix hash.
    pub cache_salt: Option<String>,
}

impl ParsedRequest {
    /// The prompt bytes routing hashes for prefix affinity: `system` (if any) then the
    /// prompt field, both as the client wrote them.
    pub fn prompt<'b>(&self, body: &'b [u8]) -> (&'b [u8], &'b [u8]) {
        let system = self
            .system_span
            .and_then(|(s, e)| body.get(s..e))
            .unwrap_or_default();
        let prompt = body
            .get(self.prompt_span.0..self.prompt_span.1)
            .unwrap_or_default();
        (system, prompt)
    }

    /// A rough prompt-token estimate (4 bytes per token, as many routers assume) for the
    /// picker's in-flight token accounting.
    pub fn estimated_prompt_tokens(&self) -> u64 {
        let sys = self.system_span.map(|(s, e)| e - s).unwrap_or(0);
        ((self.prompt_span.1 - self.prompt_span.0 + sys) as u64).div_ceil(4)
    }
}

fn raw_bytes(raw: &RawValue) -> &[u8] {
    raw.get().as_bytes()
}

fn span_of(body: &[u8], raw: &[u8]) -> (usize, usize) {
    // `raw` borrows from `body`, so its address lies inside it; the subtraction is the offset.
    let start = (raw.as_ptr() as usize).saturating_sub(body.as_ptr() as usize);
    (start, start + raw.len())
}

fn is_empty_json(raw: &[u8]) -> bool {
    matches!(raw.trim_ascii(), b"null" | b"\"\"" | b"[]" | b"{}")
}

/// Parses a request body for the API named by `path`.
pub fn parse_request(path: &str, body: &[u8]) -> Result<ParsedRequest, ParseError> {
    let api = ApiKind::from_path(path);
    let first = body.iter().copied().find(|b| !b.is_ascii_whitespace());
    if first != Some(b'{') {
        let what = match first {
            None => "empty body".to_string(),
            Some(b) => format!("starts with {:?}", char::from(b)),
        };
        return Err(ParseError::NotJson(what));
    }
    // The scanner takes the common case at ~1 instruction per byte; anything it does not
    // vouch for (escaped keys, duplicates, deep nesting, invalid JSON) goes through serde,
    // which then decides, with serde's error messages.
    let fields = match scan::fields(body) {
        Some(f) => f,
        None => serde_json::from_slice::<Fields<'_>>(body)
            .map_err(|e| ParseError::NotJson(e.to_string()))?
            .into(),
    };
    let model_raw = fields.model.ok_or(ParseError::NoModel)?;
    let model = json_string(model_raw).ok_or(ParseError::NoModel)?;
    if model.is_empty() {
        return Err(ParseError::NoModel);
    }
    let prompt = match api {
        ApiKind::Completions => fields.prompt,
        ApiKind::ChatCompletions | ApiKind::AnthropicMessages => fields.messages,
        ApiKind::Responses | ApiKind::Embeddings => fields.input,
        ApiKind::Conversations => fields.items,
    };
    let prompt = prompt
        .filter(|p| !is_empty_json(p))
        .ok_or(ParseError::NoPrompt {
            api,
            field: api.prompt_field(),
        })?;
    let cache_salt = fields.cache_salt.and_then(json_string);
    Ok(ParsedRequest {
        api,
        model,
        stream: fields.stream.unwrap_or(false),
        model_span: span_of(body, model_raw),
        prompt_span: span_of(body, prompt),
        system_span: match api {
            ApiKind::AnthropicMessages => fields.system.map(|s| span_of(body, s)),
            _ => None,
        },
        cache_salt,
    })
}

/// A JSON string value's text: without escapes it is the bytes between the quotes, else
/// serde decodes it. `None` when `raw` is not a string.
fn json_string(raw: &[u8]) -> Option<String> {
    let raw = std::str::from_utf8(raw).ok()?;
    match raw.strip_prefix('"').and_then(|r| r.strip_suffix('"')) {
        Some(inner) if !inner.contains('\\') && !inner.contains('"') => Some(inner.to_owned()),
        _ => serde_json::from_str(raw).ok(),
    }
}

/// Replaces the `model` value (at `span`, quotes included) with `new_model`, returning the
/// new body. The rest of the body is untouched.
pub fn splice_model(body: &[u8], span: (usize, usize), new_model: &str) -> Vec<u8> {
    let quoted = serde_json::to_string(new_model).unwrap_or_else(|_| format!("\"{new_model}\""));
    let mut out = Vec::with_capacity(body.len() + quoted.len());
    out.extend_from_slice(body.get(..span.0).unwrap_or_default());
    out.extend_from_slice(quoted.as_bytes());
    out.extend_from_slice(body.get(span.1..).unwrap_or_default());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_kind_follows_path_suffix() {
        assert_eq!(
            ApiKind::from_path("/v1/chat/completions"),
            ApiKind::ChatCompletions
        );
        assert_eq!(
            ApiKind::from_path("/v1/completions?x=1"),
            ApiKind::Completions
        );
        assert_eq!(ApiKind::from_path("/v1/responses"), ApiKind::Responses);
        assert_eq!(
            ApiKind::from_path("/v1/conversations"),
            ApiKind::Conversations
        );
        assert_eq!(ApiKind::from_path("/v1/embeddings"), ApiKind::Embeddings);
        assert_eq!(
            ApiKind::from_path("/v1/messages"),
            ApiKind::AnthropicMessages
        );
        assert_eq!(ApiKind::from_path("/whatever"), ApiKind::Completions);
    }

    #[test]
    fn completions_body_is_parsed() {
        let body = br#"{"max_tokens":100,"model":"sql-lora","prompt":"hello","stream":true}"#;
        let p = parse_request("/v1/completions", body).unwrap();
        assert_eq!(p.model, "sql-lora");
        assert!(p.stream);
        assert_eq!(p.prompt(body).1, br#""hello""#);
        assert_eq!(&body[p.model_span.0..p.model_span.1], br#""sql-lora""#);
    }

    #[test]
    fn every_api_kind_requires_its_prompt_field() {
        let cases = [
            (
                "/v1/chat/completions",
                r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#,
            ),
            ("/v1/responses", r#"{"model":"m","input":"hi"}"#),
            (
                "/v1/conversations",
                r#"{"model":"m","items":[{"type":"message"}]}"#,
            ),
            ("/v1/embeddings", r#"{"model":"m","input":["a","b"]}"#),
            (
                "/v1/messages",
                r#"{"model":"m","system":"be brief","messages":[{"role":"user","content":"hi"}]}"#,
            ),
        ];
        for (path, body) in cases {
            let p = parse_request(path, body.as_bytes()).unwrap();
            assert_eq!(p.model, "m", "{path}");
            let wrong = parse_request(path, br#"{"model":"m","prompt":"x"}"#).unwrap_err();
            assert!(
                matches!(wrong, ParseError::NoPrompt { .. }),
                "{path}: {wrong}"
            );
        }
        let anthropic = br#"{"model":"m","system":"be brief","messages":[1]}"#;
        let p = parse_request("/v1/messages", anthropic).unwrap();
        assert_eq!(p.prompt(anthropic).0, br#""be brief""#);
    }

    #[test]
    fn bad_bodies_are_rejected_with_reasons() {
        let e = parse_request("/v1/completions", b"no healthy upstream").unwrap_err();
        assert!(e.to_string().contains("not a JSON object"), "{e}");
        let e = parse_request("/v1/completions", br#"[{"model":"m"}]"#).unwrap_err();
        assert!(matches!(e, ParseError::NotJson(_)));
        let e = parse_request("/v1/completions", br#"{"prompt":"hello world"}"#).unwrap_err();
        assert_eq!(e, ParseError::NoModel);
        let e = parse_request("/v1/completions", br#"{"model":42,"prompt":"x"}"#).unwrap_err();
        assert_eq!(e, ParseError::NoModel);
        let e = parse_request("/v1/completions", br#"{"model":"m","prompt":""}"#).unwrap_err();
        assert!(matches!(
            e,
            ParseError::NoPrompt {
                field: "prompt",
                ..
            }
        ));
        let e = parse_request("/v1/completions", br#"{"model":"m","prompt":"x""#).unwrap_err();
        assert!(matches!(e, ParseError::NotJson(_)));
    }

    #[test]
    fn splice_keeps_everything_but_the_model() {
        let body = br#"{ "prompt": "a \"model\": b", "model" : "small", "n": 1 }"#;
        let p = parse_request("/v1/completions", body).unwrap();
        let out = splice_model(body, p.model_span, "big\"one");
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            r#"{ "prompt": "a \"model\": b", "model" : "big\"one", "n": 1 }"#
        );
        let again = parse_request("/v1/completions", &out).unwrap();
        assert_eq!(again.model, "big\"one");
    }

    #[test]
    fn escaped_model_names_are_decoded() {
        let body = br#"{"model":"a\u0062c","prompt":"x"}"#;
        assert_eq!(parse_request("/v1/completions", body).unwrap().model, "abc");
    }
}
