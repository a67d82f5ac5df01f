//! A Hugging Face byte-level BPE `tokenizer.json` as GGUF tokenizer metadata, the way
//! llama.cpp's converter writes a GPT-2 style vocabulary: `tokenizer.ggml.model = "gpt2"`,
//! `pre = "gpt-2"` (the GPT-2 split regex, which is what a `ByteLevel` pre-tokenizer with
//! `use_regex` runs), every id's token string, its type, the merges as `"left right"` strings,
//! and the special ids. Ids the tokenizer does not use (embedding rows past it) become
//! `[PAD{id}]` tokens of type UNUSED, as in the converter.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde_json::Value as Json;

use super::gguf::{GgufFile, Value};

/// llama.cpp's token types (`llama_token_type`).
const NORMAL: i32 = 1;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;
const UNUSED: i32 = 5;

/// What the export writes for a tokenizer.
#[derive(Debug)]
pub struct Vocab {
    pub tokens: Vec<String>,
    pub types: Vec<i32>,
    pub merges: Vec<String>,
    pub eos: Option<u32>,
    pub pad: Option<u32>,
}

impl Vocab {
    /// Reads `path`, laid out over `n_vocab` ids (the embedding rows).
    pub fn load(path: &Path, n_vocab: usize) -> Result<Vocab> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading tokenizer {}", path.display()))?;
        let j: Json = serde_json::from_str(&text)
            .with_context(|| format!("tokenizer {}: not JSON", path.display()))?;
        Self::from_json(&j, n_vocab).with_context(|| format!("tokenizer {}", path.display()))
    }

    fn from_json(j: &Json, n_vocab: usize) -> Result<Vocab> {
        check_byte_level_bpe(j)?;
        let model = &j["model"];
        let mut slots: Vec<Option<(String, i32)>> = vec![None; n_vocab];
        let vocab = model["vocab"]
            .as_object()
            .context("model.vocab is not a map")?;
        for (tok, id) in vocab {
            put(&mut slots, tok, id, NORMAL)?;
        }
        for a in j["added_tokens"].as_array().into_iter().flatten() {
            let tok = a["content"]
                .as_str()
                .context("added token without content")?;
            let ty = if a["special"].as_bool().unwrap_or(false) {
                CONTROL
            } else {
                USER_DEFINED
            };
            put(&mut slots, tok, &a["id"], ty)?;
        }
        let (mut tokens, mut types) = (Vec::with_capacity(n_vocab), Vec::with_capacity(n_vocab));
        for (i, s) in slots.into_iter().enumerate() {
            let (t, ty) = s.unwrap_or_else(|| (format!("[PAD{i}]"), UNUSED));
            tokens.push(t);
            types.push(ty);
        }
        let merges = merges(model)?;
        let find = |s: &str| tokens.iter().position(|t| t == s).map(|i| i as u32);
        Ok(Vocab {
            eos: find(crate::tokenizer::EOT),
            pad: find(crate::tokenizer::PAD),
            tokens,
            types,
            merges,
        })
    }

    /// Adds the `tokenizer.ggml.*` keys. Mamba's tokenizers start no text with a BOS token:
    /// `add_bos_token` is false and BOS is the end-of-text token, as in GPT-NeoX's.
    pub fn write(self, f: &mut GgufFile) {
        f.set("tokenizer.ggml.model", Value::Str("gpt2".into()));
        f.set("tokenizer.ggml.pre", Value::Str("gpt-2".into()));
        f.set("tokenizer.ggml.tokens", Value::StrArray(self.tokens));
        f.set("tokenizer.ggml.token_type", Value::I32Array(self.types));
        f.set("tokenizer.ggml.merges", Value::StrArray(self.merges));
        if let Some(e) = self.eos {
            f.set("tokenizer.ggml.bos_token_id", Value::U32(e));
            f.set("tokenizer.ggml.eos_token_id", Value::U32(e));
        }
        if let Some(p) = self.pad {
            f.set("tokenizer.ggml.padding_token_id", Value::U32(p));
        }
        f.set("tokenizer.ggml.add_bos_token", Value::Bool(false));
    }
}

/// llama.cpp's "gpt2" tokenizer is byte-level BPE with the GPT-2 split: refuse anything else
/// rather than write a vocabulary llama.cpp would split differently.
fn check_byte_level_bpe(j: &Json) -> Result<()> {
    let ty = j["model"]["type"].as_str().unwrap_or("?");
    if ty != "BPE" {
        bail!("model.type is {ty:?}; GGUF export handles byte-level BPE tokenizers only");
    }
    let pre = &j["pre_tokenizer"];
    let pre_ty = pre["type"].as_str().unwrap_or("none");
    if pre_ty != "ByteLevel" || pre["use_regex"].as_bool() == Some(false) {
        bail!(
            "pre_tokenizer is {pre_ty:?}{}; GGUF export handles a ByteLevel pre-tokenizer with \
             the GPT-2 regex only (llama.cpp's \"gpt-2\" pre-tokenizer)",
            if pre_ty == "ByteLevel" {
                " without its regex"
            } else {
                ""
            }
        );
    }
    if pre["add_prefix_space"].as_bool() == Some(true) {
        bail!("pre_tokenizer has add_prefix_space, which llama.cpp's \"gpt-2\" pre-tokenizer does not do");
    }
    Ok(())
}

fn put(slots: &mut [Option<(String, i32)>], tok: &str, id: &Json, ty: i32) -> Result<()> {
    let n = slots.len();
    let i = id
        .as_u64()
        .with_context(|| format!("token {tok:?}: id {id} is not a number"))?;
    match slots.get_mut(i as usize) {
        Some(s) => *s = Some((tok.to_string(), ty)),
        None => bail!(
            "token {tok:?} has id {i}, past the model's {n} embedding rows (config.json vocab_size)"
        ),
    }
    Ok(())
}

/// `model.merges`, either `"a b"` strings or `["a", "b"]` pairs (newer `tokenizers`).
fn merges(model: &Json) -> Result<Vec<String>> {
    let Some(list) = model["merges"].as_array() else {
        return Ok(Vec::new());
    };
    list.iter()
        .enumerate()
        .map(|(i, m)| match m {
            Json::String(s) => Ok(s.clone()),
            Json::Array(p) if p.len() == 2 => match (p[0].as_str(), p[1].as_str()) {
                (Some(a), Some(b)) if !a.contains(' ') && !b.contains(' ') => {
                    Ok(format!("{a} {b}"))
                }
                _ => bail!("merge {i} ({m}) cannot be written as \"left right\""),
            },
            _ => bail!("merge {i} ({m}) is neither \"a b\" nor [\"a\", \"b\"]"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tok(pre: Json) -> Json {
        serde_json::json!({
            "added_tokens": [{"id": 3, "content": "<|endoftext|>", "special": true}],
            "pre_tokenizer": pre,
            "model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "ab": 2},
                      "merges": [["a", "b"]]}
        })
    }

    #[test]
    fn tokens_types_merges_and_unused_rows() {
        let j = tok(
            serde_json::json!({"type": "ByteLevel", "add_prefix_space": false, "use_regex": true}),
        );
        let v = Vocab::from_json(&j, 6).unwrap();
        assert_eq!(
            v.tokens,
            ["a", "b", "ab", "<|endoftext|>", "[PAD4]", "[PAD5]"]
        );
        assert_eq!(v.types, [1, 1, 1, 3, 5, 5]);
        assert_eq!(v.merges, ["a b"]);
        assert_eq!((v.eos, v.pad), (Some(3), None));
    }

    #[test]
    fn other_pre_tokenizers_and_ids_past_the_embedding_are_refused() {
        let j = tok(serde_json::json!({"type": "Whitespace"}));
        let e = format!("{:#}", Vocab::from_json(&j, 6).unwrap_err());
        assert!(e.contains("Whitespace"), "{e}");
        let j = tok(serde_json::json!({"type": "ByteLevel", "use_regex": true}));
        let e = format!("{:#}", Vocab::from_json(&j, 3).unwrap_err());
        assert!(
            e.contains("<|endoftext|>") && e.contains("id 3") && e.contains("3 embedding rows"),
            "{e}"
        );
    }
}
