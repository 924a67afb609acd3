//! OpenAI request parsing, response bodies and vLLM-style error bodies.

use serde::Deserialize;
use serde_json::{Value, json};

/// The two generation endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    /// `POST /v1/completions`.
    Completions,
    /// `POST /v1/chat/completions`.
    Chat,
}

/// What the server needs from a request body.
#[derive(Debug, Clone, PartialEq)]
pub struct ParsedRequest {
    /// Requested model (base model or adapter name).
    pub model: String,
    /// The prompt as text, or token ids.
    pub prompt: Prompt,
    /// `max_tokens` / `max_completion_tokens`.
    pub max_tokens: Option<u32>,
    /// vLLM's `ignore_eos` extension.
    pub ignore_eos: bool,
    /// `stream`.
    pub stream: bool,
    /// `stream_options.include_usage`.
    pub include_usage: bool,
}

/// A prompt.
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    /// Text (for chat, the rendered conversation).
    Text(String),
    /// Token ids.
    Ids(Vec<u32>),
}

/// A 400 answer in vLLM's shape.
#[derive(Debug, Clone, PartialEq)]
pub struct BadRequest(pub String);

impl BadRequest {
    /// vLLM's error body: `{"error": {"message", "type": "BadRequestError", "param", "code": 400}}`
    /// (vLLM ≥ 0.10; older versions returned the same fields without the `error` wrapper).
    pub fn body(&self) -> Value {
        error_body(&self.0, "BadRequestError", 400)
    }
}

/// An error body in vLLM's shape with any status.
pub fn error_body(message: &str, kind: &str, code: u16) -> Value {
    json!({"error": {"message": message, "type": kind, "param": null, "code": code}})
}

#[derive(Deserialize)]
struct Raw {
    model: Option<Value>,
    prompt: Option<Value>,
    messages: Option<Value>,
    max_tokens: Option<Value>,
    max_completion_tokens: Option<Value>,
    #[serde(default)]
    ignore_eos: Option<Value>,
    #[serde(default)]
    stream: Option<Value>,
    #[serde(default)]
    stream_options: Option<Value>,
}

fn bad(msg: impl Into<String>) -> BadRequest {
    BadRequest(msg.into())
}

/// Parses and validates a request body.
pub fn parse(api: Api, body: &[u8]) -> Result<ParsedRequest, BadRequest> {
    let raw: Raw = serde_json::from_slice(body)
        .map_err(|e| bad(format!("The request body is not a valid JSON object: {e}.")))?;
    let model = match raw.model {
        Some(Value::String(s)) => s,
        Some(_) => return Err(bad("Field `model` must be a string.")),
        None => return Err(bad("Field `model` is required.")),
    };
    let prompt = match api {
        Api::Completions => parse_prompt(raw.prompt)?,
        Api::Chat => Prompt::Text(render_chat(raw.messages)?),
    };
    let max_tokens = match raw.max_completion_tokens.or(raw.max_tokens) {
        None | Some(Value::Null) => None,
        Some(v) => Some(
            v.as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| {
                    bad(format!(
                        "`max_tokens` must be a non-negative integer, got {v}."
                    ))
                })?,
        ),
    };
    let max_tokens = match (api, max_tokens) {
        // The legacy completions API defaults to 16 tokens (OpenAI and vLLM alike).
        (Api::Completions, None) => Some(16),
        (_, m) => m,
    };
    let flag = |v: Option<Value>, name: &str| match v {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(b),
        Some(other) => Err(bad(format!("`{name}` must be a boolean, got {other}."))),
    };
    let include_usage = match raw.stream_options {
        None | Some(Value::Null) => false,
        Some(Value::Object(o)) => flag(
            o.get("include_usage").cloned(),
            "stream_options.include_usage",
        )?,
        Some(_) => return Err(bad("`stream_options` must be an object.")),
    };
    let stream = flag(raw.stream, "stream")?;
    if include_usage && !stream {
        return Err(bad(
            "Stream options can only be defined when `stream=True`.",
        ));
    }
    Ok(ParsedRequest {
        model,
        prompt,
        max_tokens,
        ignore_eos: flag(raw.ignore_eos, "ignore_eos")?,
        stream,
        include_usage,
    })
}

fn parse_prompt(v: Option<Value>) -> Result<Prompt, BadRequest> {
    match v {
        Some(Value::String(s)) => Ok(Prompt::Text(s)),
        Some(Value::Array(items)) if items.is_empty() => Err(bad("`prompt` must not be empty.")),
        Some(Value::Array(items)) => {
            if items.iter().all(Value::is_string) {
                // A batch of prompts is answered as one here; join them like the EPP does.
                let parts: Vec<&str> = items.iter().filter_map(Value::as_str).collect();
                return Ok(Prompt::Text(parts.join(" ")));
            }
            items
                .iter()
                .map(|x| x.as_u64().and_then(|n| u32::try_from(n).ok()))
                .collect::<Option<Vec<u32>>>()
                .map(Prompt::Ids)
                .ok_or_else(|| {
                    bad("`prompt` must be a string, a list of strings or a list of token ids.")
                })
        }
        Some(_) => Err(bad(
            "`prompt` must be a string, a list of strings or a list of token ids.",
        )),
        None => Err(bad("Field `prompt` is required.")),
    }
}

/// Renders messages with a fixed template (`<|role|>\ncontent\n` per message, then the
/// assistant header), so a shared conversation prefix is a shared token prefix.
fn render_chat(v: Option<Value>) -> Result<String, BadRequest> {
    let Some(Value::Array(msgs)) = v else {
        return Err(bad("Field `messages` is required and must be a list."));
    };
    if msgs.is_empty() {
        return Err(bad("`messages` must contain at least one message."));
    }
    let mut out = String::new();
    for (i, m) in msgs.iter().enumerate() {
        let role = m.get("role").and_then(Value::as_str).ok_or_else(|| {
            bad(format!(
                "messages[{i}].role is required and must be a string."
            ))
        })?;
        out.push_str("<|");
        out.push_str(role);
        out.push_str("|>\n");
        match m.get("content") {
            Some(Value::String(s)) => out.push_str(s),
            Some(Value::Array(parts)) => {
                for p in parts {
                    if let Some(t) = p.get("text").and_then(Value::as_str) {
                        out.push_str(t);
                    }
                }
            }
            None | Some(Value::Null) => {}
            Some(_) => {
                return Err(bad(format!(
                    "messages[{i}].content must be a string or a list of parts."
                )));
            }
        }
        out.push('\n');
    }
    out.push_str("<|assistant|>\n");
    Ok(out)
}

/// The text of generated token `i` (every token is 4 bytes, matching the tokenizer).
pub fn token_text(i: u32) -> &'static str {
    const WORDS: [&str; 8] = [
        " the", " sim", " ran", " all", " day", " and", " now", " ok.",
    ];
    WORDS[(i % 8) as usize]
}

/// A generated text of `n` tokens.
pub fn generated_text(n: u32) -> String {
    (0..n).map(token_text).collect()
}

/// The `usage` object.
pub fn usage(prompt: u32, completion: u32, cached: u32) -> Value {
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    })
}

/// One streamed chunk carrying `text` (and `finish_reason` on the last).
pub fn stream_chunk(
    api: Api,
    id: &str,
    model: &str,
    created: u64,
    text: &str,
    finish: Option<&str>,
) -> Value {
    match api {
        Api::Completions => json!({
            "id": id, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": null, "finish_reason": finish, "stop_reason": null}],
        }),
        Api::Chat => json!({
            "id": id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": {"role": "assistant", "content": text}, "logprobs": null, "finish_reason": finish}],
        }),
    }
}

/// The final usage-only chunk (`stream_options.include_usage`).
pub fn usage_chunk(api: Api, id: &str, model: &str, created: u64, usage: Value) -> Value {
    let object = match api {
        Api::Completions => "text_completion",
        Api::Chat => "chat.completion.chunk",
    };
    json!({"id": id, "object": object, "created": created, "model": model, "choices": [], "usage": usage})
}

/// A whole (non-streamed) response.
pub fn full_response(
    api: Api,
    id: &str,
    model: &str,
    created: u64,
    text: &str,
    finish: &str,
    usage: Value,
) -> Value {
    match api {
        Api::Completions => json!({
            "id": id, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": null, "finish_reason": finish, "stop_reason": null}],
            "usage": usage,
        }),
        Api::Chat => json!({
            "id": id, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": null, "finish_reason": finish}],
            "usage": usage,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_completions_with_defaults_and_token_ids() {
        let p = parse(Api::Completions, br#"{"model":"m","prompt":"hello"}"#).unwrap();
        assert_eq!(p.max_tokens, Some(16));
        assert!(!p.stream);
        let p = parse(
            Api::Completions,
            br#"{"model":"m","prompt":[1,2,3],"max_tokens":5,"ignore_eos":true}"#,
        )
        .unwrap();
        assert_eq!(p.prompt, Prompt::Ids(vec![1, 2, 3]));
        assert!(p.ignore_eos);
    }

    #[test]
    fn chat_renders_messages_and_reads_stream_options() {
        let p = parse(
            Api::Chat,
            br#"{"model":"m","messages":[{"role":"user","content":"hi"}],"stream":true,"stream_options":{"include_usage":true},"max_completion_tokens":7}"#,
        )
        .unwrap();
        assert_eq!(
            p.prompt,
            Prompt::Text("<|user|>\nhi\n<|assistant|>\n".into())
        );
        assert!(p.stream && p.include_usage);
        assert_eq!(p.max_tokens, Some(7));
    }

    #[test]
    fn bad_requests_say_what_is_wrong() {
        let e = parse(Api::Chat, br#"{"model":"m"}"#).unwrap_err();
        assert!(e.0.contains("messages"), "{}", e.0);
        let e = parse(
            Api::Completions,
            br#"{"model":"m","prompt":"x","max_tokens":-1}"#,
        )
        .unwrap_err();
        assert!(e.0.contains("max_tokens"), "{}", e.0);
        let e = parse(Api::Completions, b"not json").unwrap_err();
        assert!(e.0.contains("JSON"));
        assert_eq!(e.body()["error"]["code"], 400);
        assert_eq!(e.body()["error"]["type"], "BadRequestError");
    }
}
