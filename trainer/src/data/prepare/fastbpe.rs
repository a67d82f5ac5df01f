//! A fast path for byte-level BPE tokenizers (GPT-2 style, what `vet-data tokenizer` trains):
//! the same ids as `Tokenizer::encode`, several times faster.
//!
//! The `tokenizers` pipeline spends most of its time on offsets and per-character alignment
//! bookkeeping that shard preparation does not need. Here the text is split with the GPT-2
//! pattern (`'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`),
//! each piece is looked up in a cache, and only unseen pieces go through the tokenizer's own
//! BPE model.
//!
//! Splitting: a space that follows an ASCII non-space character always starts a new piece
//! (no alternative of the pattern puts a non-space before a space), and the pattern has no
//! look-behind, so the text can be cut there into segments that split independently. Pure
//! ASCII segments (nearly all of them in English text) are split by [`ascii_piece_len`], a
//! hand-written transcription of the pattern; the others by the very regex `tokenizers` uses.
//! Tests check both against `tokenizers` on generated text, and `prepare` re-encodes a sample
//! of documents through the full pipeline and stops on any difference.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use anyhow::{anyhow, Result};
use tokenizers::models::bpe::BPE;
use tokenizers::utils::SysRegex;
use tokenizers::{Model, ModelWrapper, PreTokenizerWrapper, Tokenizer};

/// The GPT-2 pre-tokenization pattern of `tokenizers`' `ByteLevel`.
pub const GPT2_PATTERN: &str =
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";

/// Cached pieces before the cache is emptied (bounds memory at some tens of MB).
const CACHE_PIECES: usize = 1 << 20;

/// A fast multiplicative hash for the piece cache (not for untrusted keys at scale).
#[derive(Default, Clone, Copy)]
struct FxHasher(u64);

impl Hasher for FxHasher {
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut w = [0u8; 8];
            w[..chunk.len()].copy_from_slice(chunk);
            self.0 = (self.0.rotate_left(5) ^ u64::from_le_bytes(w))
                .wrapping_mul(0x51_7C_C1_B7_27_22_0A_95);
        }
    }
    fn write_u64(&mut self, x: u64) {
        self.0 = (self.0.rotate_left(5) ^ x).wrapping_mul(0x51_7C_C1_B7_27_22_0A_95);
    }
    fn finish(&self) -> u64 {
        // The multiplications only carry low bits upwards; fold the high bits back down, as
        // the table picks buckets by the low bits.
        let x = (self.0 ^ (self.0 >> 32)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        x ^ (x >> 29)
    }
}

type FxMap<K, V> = HashMap<K, V, BuildHasherDefault<FxHasher>>;

/// ASCII `\s` of the pattern: tab, newline, vertical tab, form feed, carriage return, space.
fn is_space(b: u8) -> bool {
    matches!(b, b'\t' | b'\n' | 0x0B | 0x0C | b'\r' | b' ')
}

fn is_other(b: u8) -> bool {
    !is_space(b) && !b.is_ascii_alphanumeric()
}

/// Length of the pattern's match at the start of `s` (ASCII, not empty), where `s` ends at the
/// end of the text or before a space that follows a non-space.
fn ascii_piece_len(s: &[u8]) -> usize {
    let n = s.len();
    if s[0] == b'\'' && n >= 2 {
        match s[1] {
            b's' | b't' | b'm' | b'd' => return 2,
            b'r' | b'v' if n >= 3 && s[2] == b'e' => return 3,
            b'l' if n >= 3 && s[2] == b'l' => return 3,
            _ => {}
        }
    }
    let j = usize::from(s[0] == b' ');
    if j < n && !is_space(s[j]) {
        let class: fn(u8) -> bool = if s[j].is_ascii_alphabetic() {
            |b| b.is_ascii_alphabetic()
        } else if s[j].is_ascii_digit() {
            |b| b.is_ascii_digit()
        } else {
            is_other
        };
        let mut k = j + 1;
        while k < n && class(s[k]) {
            k += 1;
        }
        return k;
    }
    // A run of spaces: `\s+(?!\S)` leaves the last one for the next piece, `\s+` takes a
    // single one, and at the end of the text the whole run goes.
    let mut k = 1;
    while k < n && is_space(s[k]) {
        k += 1;
    }
    if k == n || k == 1 {
        k
    } else {
        k - 1
    }
}

/// Calls `piece` with every pre-tokenization piece of `text`, in order.
fn split(re: &SysRegex, text: &str, mut piece: impl FnMut(&str)) {
    let b = text.as_bytes();
    let mut seg = 0;
    let mut ascii = true;
    for p in 0..b.len() {
        let c = b[p];
        if c == b' ' && p > seg && b[p - 1] < 0x80 && !is_space(b[p - 1]) {
            split_segment(re, &text[seg..p], ascii, &mut piece);
            seg = p;
            ascii = true;
        } else if c >= 0x80 {
            ascii = false;
        }
    }
    if seg < b.len() {
        split_segment(re, &text[seg..], ascii, &mut piece);
    }
}

fn split_segment(re: &SysRegex, seg: &str, ascii: bool, piece: &mut impl FnMut(&str)) {
    if ascii {
        let mut i = 0;
        while i < seg.len() {
            let n = ascii_piece_len(&seg.as_bytes()[i..]);
            piece(&seg[i..i + n]);
            i += n;
        }
        return;
    }
    let mut prev = 0;
    for (start, end) in re.find_iter(seg) {
        if start > prev {
            piece(&seg[prev..start]);
        }
        piece(&seg[start..end]);
        prev = end;
    }
    if prev < seg.len() {
        piece(&seg[prev..]);
    }
}

/// Encodes text as a plain byte-level BPE `tokenizer.json` would, with a piece cache.
pub struct FastBpe {
    re: SysRegex,
    cache: PieceCache,
}

/// Ids of pre-tokenization pieces, computed once by the tokenizer's BPE model.
struct PieceCache {
    model: BPE,
    chars: [char; 256],
    /// Pieces of up to 15 bytes (packed with their length) -> (start, len) in `ids`.
    short: FxMap<(u64, u64), (u32, u32)>,
    /// Longer pieces -> (start, len) in `ids`.
    long: FxMap<Box<[u8]>, (u32, u32)>,
    ids: Vec<u32>,
    mapped: String,
}

impl FastBpe {
    /// The fast path for `tok`, or `None` when `tok` is not a plain byte-level BPE (then use
    /// `Tokenizer::encode`): no normalizer, a `ByteLevel` pre-tokenizer with its regex and no
    /// prefix space, a BPE model without dropout, subword affixes or byte fallback, and only
    /// special added tokens (which `prepare` encodes as text).
    pub fn new(tok: &Tokenizer) -> Option<FastBpe> {
        if tok.get_normalizer().is_some() {
            return None;
        }
        match tok.get_pre_tokenizer() {
            Some(PreTokenizerWrapper::ByteLevel(bl)) if bl.use_regex && !bl.add_prefix_space => {}
            _ => return None,
        }
        let ModelWrapper::BPE(bpe) = tok.get_model() else {
            return None;
        };
        let plain = bpe.dropout.is_none()
            && bpe.continuing_subword_prefix.is_none()
            && bpe.end_of_word_suffix.is_none()
            && !bpe.byte_fallback;
        if !plain || tok.get_added_tokens_decoder().values().any(|t| !t.special) {
            return None;
        }
        Some(FastBpe {
            re: SysRegex::new(GPT2_PATTERN).ok()?,
            cache: PieceCache {
                model: bpe.clone(),
                chars: crate::tokenizer::byte_chars(),
                short: FxMap::default(),
                long: FxMap::default(),
                ids: Vec::new(),
                mapped: String::new(),
            },
        })
    }

    /// Appends the ids of `text` to `out`.
    pub fn encode(&mut self, text: &str, out: &mut Vec<u32>) -> Result<()> {
        let mut err = None;
        split(&self.re, text, |piece| {
            if let Err(e) = self.cache.piece(piece, out) {
                err.get_or_insert(e);
            }
        });
        err.map_or(Ok(()), Err)
    }
}

impl PieceCache {
    /// Appends the ids of one pre-tokenization piece: from the cache, or through the model.
    fn piece(&mut self, piece: &str, out: &mut Vec<u32>) -> Result<()> {
        let bytes = piece.as_bytes();
        let short = short_key(bytes);
        let hit = match short {
            Some(k) => self.short.get(&k),
            None => self.long.get(bytes),
        };
        if let Some(&(s, n)) = hit {
            if n == 1 {
                out.push(self.ids[s as usize]);
            } else {
                out.extend_from_slice(&self.ids[s as usize..(s + n) as usize]);
            }
            return Ok(());
        }
        self.mapped.clear();
        let chars = &self.chars;
        self.mapped.extend(bytes.iter().map(|&b| chars[b as usize]));
        let tokens = self
            .model
            .tokenize(&self.mapped)
            .map_err(|e| anyhow!("BPE model on {piece:?}: {e}"))?;
        if self.short.len() + self.long.len() >= CACHE_PIECES || self.ids.len() >= 1 << 30 {
            self.short.clear();
            self.long.clear();
            self.ids.clear();
        }
        let start = self.ids.len();
        self.ids.extend(tokens.iter().map(|t| t.id));
        out.extend_from_slice(&self.ids[start..]);
        let entry = (start as u32, tokens.len() as u32);
        match short {
            Some(k) => self.short.insert(k, entry),
            None => self.long.insert(bytes.into(), entry),
        };
        Ok(())
    }
}

/// A piece of at most 15 bytes packed with its length into two words.
fn short_key(b: &[u8]) -> Option<(u64, u64)> {
    if b.len() > 15 {
        return None;
    }
    let mut k = [0u8; 16];
    k[..b.len()].copy_from_slice(b);
    k[15] = b.len() as u8;
    let (lo, hi) = k.split_at(8);
    Some((
        u64::from_le_bytes(lo.try_into().ok()?),
        u64::from_le_bytes(hi.try_into().ok()?),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pieces as `tokenizers` splits them: the regex over the whole text.
    fn reference_split(re: &SysRegex, text: &str) -> Vec<String> {
        let mut out = Vec::new();
        split_segment(re, text, false, &mut |p| out.push(p.to_string()));
        out
    }

    #[test]
    fn the_ascii_splitter_matches_the_regex_on_generated_text() {
        let re = SysRegex::new(GPT2_PATTERN).unwrap();
        let alphabet: Vec<&str> = vec![
            " ", " ", "  ", "\n", "\t", "\r\n", "\x0b", "\x0c", "\x1f", "\x00", "a", "Dog", "s",
            "t", "re", "ll", "ve", "m", "d", "'", "'", "12", "3.5", ".", ",", "-", "(", "%", "é",
            "°C", "\u{a0}", "\u{2009}", "µg", "🐶", "ñ", "\u{301}", "٣", "Ⅻ", "\u{85}", "\u{3000}",
        ];
        let mut state = 0x1234_5678_9abc_def0u64;
        for case in 0..20_000 {
            let mut text = String::new();
            let len = 1 + case % 17;
            for _ in 0..len {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                text.push_str(alphabet[(state % alphabet.len() as u64) as usize]);
            }
            let mut got = Vec::new();
            split(&re, &text, |p| got.push(p.to_string()));
            assert_eq!(got, reference_split(&re, &text), "text {text:?}");
        }
    }
}
