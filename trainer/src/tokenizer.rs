//! Tokenizers through the Hugging Face `tokenizers` crate: any `tokenizer.json` loads, checked
//! against the model's vocabulary.

use std::path::Path;

use anyhow::{anyhow, bail, Result};
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer};

/// The end-of-text token every Vet-Mamba tokenizer carries.
pub const EOT: &str = "<|endoftext|>";

/// Loads `tokenizer.json` and checks that every id it can produce fits the model's
/// `vocab_size` embedding rows.
pub fn load(path: &Path, vocab_size: usize) -> Result<Tokenizer> {
    if !path.is_file() {
        bail!("tokenizer {}: no such file", path.display());
    }
    let tok =
        Tokenizer::from_file(path).map_err(|e| anyhow!("tokenizer {}: {e}", path.display()))?;
    let n = tok.get_vocab_size(true);
    if n > vocab_size {
        bail!(
            "tokenizer {} has {n} tokens but the model's vocabulary has {vocab_size} rows: they do not belong together",
            path.display()
        );
    }
    Ok(tok)
}

/// GPT-2's reversible byte -> printable character map (`ByteLevel`'s alphabet): printable
/// Latin-1 bytes stand for themselves, the others for U+0100 onwards in byte order. The one
/// copy of the table: the byte-level tokenizer and `prepare`'s fast BPE both use it.
pub fn byte_chars() -> [char; 256] {
    let mut out = ['\0'; 256];
    let mut extra = 0u32;
    for b in 0..256u32 {
        let printable =
            (0x21..=0x7E).contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b);
        let code = if printable {
            b
        } else {
            extra += 1;
            255 + extra
        };
        out[b as usize] = char::from_u32(code).unwrap_or('\0');
    }
    out
}

/// A byte-level tokenizer with no merges: token `b` is byte `b`, then `<|endoftext|>` = 256.
/// The bundled tiny model uses it; real models train a BPE (`vet-data tokenizer`).
pub fn byte_level() -> Result<Tokenizer> {
    let vocab: tokenizers::models::bpe::Vocab = byte_chars()
        .into_iter()
        .enumerate()
        .map(|(i, c)| (c.to_string(), i as u32))
        .collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, vec![])
        .build()
        .map_err(|e| anyhow!("building the byte-level BPE: {e}"))?;
    let mut tok = Tokenizer::new(bpe);
    tok.with_pre_tokenizer(Some(ByteLevel::default().add_prefix_space(false)));
    tok.with_decoder(Some(ByteLevel::default()));
    tok.add_special_tokens(&[AddedToken::from(EOT, true)]);
    Ok(tok)
}

/// Token ids of `text` (no special tokens added).
pub fn encode(tok: &Tokenizer, text: &str) -> Result<Vec<u32>> {
    Ok(tok
        .encode(text, false)
        .map_err(|e| anyhow!("tokenizing: {e}"))?
        .get_ids()
        .to_vec())
}

/// Text of `ids`, special tokens dropped.
pub fn decode(tok: &Tokenizer, ids: &[u32]) -> Result<String> {
    tok.decode(ids, true)
        .map_err(|e| anyhow!("detokenizing: {e}"))
}

/// Padding token of Vet-Mamba tokenizers (never a loss target).
pub const PAD: &str = "<|pad|>";
/// QA prompt markers: a fine-tuning example is
/// `<|question|> {question}\n<|answer|> {answer}<|endoftext|>` (see [`QA_TEMPLATE`]).
pub const QUESTION: &str = "<|question|>";
pub const ANSWER: &str = "<|answer|>";
/// The default QA prompt; `{question}` is replaced, the answer and `<|endoftext|>` follow it.
pub const QA_TEMPLATE: &str = "<|question|> {question}\n<|answer|> ";
/// Special tokens `vet-data tokenizer` adds, in id order from 0.
pub const SPECIAL_TOKENS: [&str; 4] = [EOT, PAD, QUESTION, ANSWER];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_byte_map_is_gpt2s_bytelevel_alphabet_one_char_per_byte() {
        let chars = byte_chars();
        let ours: std::collections::HashSet<char> = chars.iter().copied().collect();
        assert_eq!(ours.len(), 256, "two bytes share a character");
        let alphabet: std::collections::HashSet<char> = ByteLevel::alphabet().into_iter().collect();
        assert_eq!(ours, alphabet);
        // GPT-2's well-known spellings: space is 'Ġ', newline 'Ċ', 'a' itself.
        assert_eq!((chars[b' ' as usize], chars[b'\n' as usize]), ('Ġ', 'Ċ'));
        assert_eq!(chars[b'a' as usize], 'a');
    }
}
