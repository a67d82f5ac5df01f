//! The OpenAI request shapes, checked field by field: every refusal names the field and why.

use axum::body::Bytes;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::Value;
use tokenizers::Tokenizer;
use trainer::tokenizer::{encode_templated, encode_text};

use crate::error::ApiError;

/// `stop`: one string or a list of them.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum StopField {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// The fields both endpoints share (OpenAI's other fields are accepted and ignored).
#[derive(Clone, Debug, Default)]
pub struct Common {
    pub model: String,
    pub stream: bool,
    pub include_usage: bool,
    pub max_tokens: Option<u64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub stop: Option<StopField>,
    pub seed: Option<i64>,
    pub user: Option<String>,
    pub n: Option<u64>,
    pub ignore_eos: bool,
}

/// A request struct with its own fields and the shared ones, written out rather than
/// `#[serde(flatten)]`ed so that a type error names its field.
macro_rules! request {
    ($(#[$doc:meta])* $name:ident { $($(#[$fm:meta])* $field:ident: $ty:ty,)* }) => {
        $(#[$doc])*
        #[derive(Debug, Deserialize)]
        pub struct $name {
            $($(#[$fm])* pub $field: $ty,)*
            pub model: String,
            #[serde(default)]
            pub stream: bool,
            pub stream_options: Option<StreamOptions>,
            pub max_tokens: Option<u64>,
            pub max_completion_tokens: Option<u64>,
            pub temperature: Option<f64>,
            pub top_p: Option<f64>,
            pub stop: Option<StopField>,
            pub seed: Option<i64>,
            pub user: Option<String>,
            pub n: Option<u64>,
            /// vLLM's extension: generate `max_tokens` tokens, past `<|endoftext|>`.
            #[serde(default)]
            pub ignore_eos: bool,
        }

        impl $name {
            pub fn common(&self) -> Common {
                Common {
                    model: self.model.clone(),
                    stream: self.stream,
                    include_usage: self.stream_options.as_ref().is_some_and(|o| o.include_usage),
                    max_tokens: self.max_completion_tokens.or(self.max_tokens),
                    temperature: self.temperature,
                    top_p: self.top_p,
                    stop: self.stop.clone(),
                    seed: self.seed,
                    user: self.user.clone(),
                    n: self.n,
                    ignore_eos: self.ignore_eos,
                }
            }
        }
    };
}

request!(
    /// `POST /v1/chat/completions`.
    ChatRequest {
        messages: Vec<Message>,
    }
);

request!(
    /// `POST /v1/completions`.
    CompletionRequest {
        /// A string, a list of one string, or a list of token ids.
        prompt: Value,
    }
);

#[derive(Debug, Deserialize)]
pub struct Message {
    pub role: String,
    /// A string, or a list of `{"type": "text", "text": ...}` parts.
    #[serde(default)]
    pub content: Value,
}

/// Parses a JSON body into `T`, naming the field that does not fit.
pub fn parse<T: DeserializeOwned>(bytes: &Bytes) -> Result<T, ApiError> {
    match serde_json::from_slice::<Value>(bytes) {
        Err(e) => {
            return Err(ApiError::invalid(
                "",
                format!("The request body is not valid JSON: {e}"),
            ))
        }
        Ok(Value::Object(_)) => {}
        Ok(other) => {
            return Err(ApiError::invalid(
                "",
                format!(
                    "Bad request body: expected a JSON object, got {}",
                    kind_of(&other)
                ),
            ))
        }
    }
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." {
            ApiError::invalid("", format!("Bad request body: {inner}"))
        } else {
            ApiError::invalid(&path, format!("Bad field `{path}`: {inner}"))
        }
    })
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Sampling and output settings after the checks.
#[derive(Clone, Debug)]
pub struct Settings {
    pub stream: bool,
    pub include_usage: bool,
    /// `max_tokens` as asked (None: fill up to the defaults and the context limit).
    pub max_tokens: Option<u64>,
    pub temperature: f64,
    pub top_p: f64,
    pub stops: Vec<String>,
    pub seed: Option<u64>,
    pub ignore_eos: bool,
}

/// Checks the shared fields against OpenAI's ranges; `default_temperature` applies when the
/// request gives none.
pub fn settings(c: &Common, default_temperature: f64) -> Result<Settings, ApiError> {
    if let Some(n) = c.n {
        if n != 1 {
            return Err(ApiError::invalid(
                "n",
                format!("`n` = {n} is not supported: this server returns one choice (n = 1)"),
            ));
        }
    }
    let max_tokens = c.max_tokens;
    if max_tokens == Some(0) {
        return Err(ApiError::invalid(
            "max_tokens",
            "`max_tokens` must be at least 1",
        ));
    }
    let temperature = c.temperature.unwrap_or(default_temperature);
    if !(temperature.is_finite() && (0.0..=2.0).contains(&temperature)) {
        return Err(ApiError::invalid(
            "temperature",
            format!("`temperature` = {temperature} must be between 0 and 2"),
        ));
    }
    let top_p = c.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::invalid(
            "top_p",
            format!("`top_p` = {top_p} must be in (0, 1]"),
        ));
    }
    let stops = match &c.stop {
        None => Vec::new(),
        Some(StopField::One(s)) => vec![s.clone()],
        Some(StopField::Many(v)) => v.clone(),
    };
    if stops.len() > 4 {
        return Err(ApiError::invalid(
            "stop",
            format!("`stop` has {} strings; at most 4 are allowed", stops.len()),
        ));
    }
    if let Some(u) = &c.user {
        if u.len() > 256 {
            return Err(ApiError::invalid("user", "`user` is longer than 256 bytes"));
        }
    }
    Ok(Settings {
        stream: c.stream,
        include_usage: c.include_usage,
        max_tokens,
        temperature,
        top_p,
        stops,
        seed: c.seed.map(|s| s as u64),
        ignore_eos: c.ignore_eos,
    })
}

/// The text of message `i`'s content.
fn content_text(i: usize, content: &Value) -> Result<String, ApiError> {
    let param = format!("messages[{i}].content");
    match content {
        Value::String(s) => Ok(s.clone()),
        Value::Array(parts) => {
            let mut text = String::new();
            for (j, p) in parts.iter().enumerate() {
                match (p.get("type").and_then(Value::as_str), p.get("text")) {
                    (Some("text"), Some(Value::String(t))) => text.push_str(t),
                    _ => {
                        return Err(ApiError::invalid(
                            &param,
                            format!("`{param}[{j}]` must be a text part {{\"type\": \"text\", \"text\": \"...\"}}"),
                        ))
                    }
                }
            }
            Ok(text)
        }
        Value::Null => Err(ApiError::invalid(&param, format!("`{param}` is missing"))),
        other => Err(ApiError::invalid(
            &param,
            format!("`{param}` must be a string or a list of text parts, not {other}"),
        )),
    }
}

/// The tokens of a chat: each user turn through the QA template (system messages are put
/// before the next user question), each assistant turn as text followed by
/// `<|endoftext|>` — the sequence `vet-chat` builds, so a cached state fits it.
pub fn render_chat(
    tok: &Tokenizer,
    template: &str,
    eot: Option<u32>,
    messages: &[Message],
) -> Result<Vec<u32>, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::invalid(
            "messages",
            "`messages` is empty: send at least one user message",
        ));
    }
    let mut ids = Vec::new();
    let mut system = String::new();
    for (i, m) in messages.iter().enumerate() {
        let text = content_text(i, &m.content)?;
        let tokenize = |r: anyhow::Result<Vec<u32>>| {
            r.map_err(|e| ApiError::invalid(&format!("messages[{i}].content"), format!("{e:#}")))
        };
        match m.role.as_str() {
            "system" | "developer" => {
                system.push_str(&text);
                system.push('\n');
            }
            "user" => {
                if text.trim().is_empty() {
                    return Err(ApiError::invalid(
                        &format!("messages[{i}].content"),
                        format!("`messages[{i}].content` is empty"),
                    ));
                }
                let q = format!("{system}{text}");
                system.clear();
                ids.extend(tokenize(encode_templated(tok, template, &q))?);
            }
            "assistant" => {
                ids.extend(tokenize(encode_text(tok, &text))?);
                ids.extend(eot);
            }
            other => {
                return Err(ApiError::invalid(
                    &format!("messages[{i}].role"),
                    format!("`messages[{i}].role` = {other:?}: expected system, user or assistant"),
                ))
            }
        }
    }
    if messages.last().map(|m| m.role.as_str()) != Some("user") {
        return Err(ApiError::invalid(
            "messages",
            "the last message must be from the user (the answer follows it)",
        ));
    }
    Ok(ids)
}

/// The tokens of a completion prompt.
pub fn render_prompt(tok: &Tokenizer, vocab: usize, prompt: &Value) -> Result<Vec<u32>, ApiError> {
    let bad = |m: String| ApiError::invalid("prompt", m);
    let text = match prompt {
        Value::String(s) => s.as_str(),
        Value::Array(v) if v.len() == 1 && v[0].is_string() => v[0].as_str().unwrap_or(""),
        Value::Array(v) if !v.is_empty() && v.iter().all(Value::is_u64) => {
            let ids: Vec<u32> = v
                .iter()
                .filter_map(Value::as_u64)
                .map(|t| t as u32)
                .collect();
            if let Some(t) = v
                .iter()
                .filter_map(Value::as_u64)
                .find(|&t| t >= vocab as u64)
            {
                return Err(bad(format!(
                    "token id {t} is outside the vocabulary of {vocab}"
                )));
            }
            return Ok(ids);
        }
        Value::Array(v) if v.len() > 1 => {
            return Err(bad(
                "a list of several prompts is not supported: send one prompt".into(),
            ))
        }
        other => {
            return Err(bad(format!(
                "`prompt` must be a string or a list of token ids, not {other}"
            )))
        }
    };
    if text.is_empty() {
        return Err(bad("`prompt` is empty".into()));
    }
    let ids = encode_text(tok, text).map_err(|e| bad(format!("{e:#}")))?;
    if ids.is_empty() {
        return Err(bad("`prompt` encodes to no tokens".into()));
    }
    Ok(ids)
}
