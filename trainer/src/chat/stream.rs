//! Turning an answer's tokens into text as they arrive: whole UTF-8 characters only, and never
//! text that a stop string may still claim.

use anyhow::Result;
use tokenizers::Tokenizer;

use crate::tokenizer::decode;

/// The growing text of one answer. Each [`TextStream::push`] decodes the whole answer so far
/// and hands out the new suffix that is safe to show: a character whose bytes are split across
/// tokens (decoded as trailing U+FFFD) waits for its last byte, and a tail that could be the
/// beginning of a stop string waits until it is clearly not one. The pieces handed out, joined,
/// are the decoded answer cut before the first stop string.
#[derive(Clone, Debug, Default)]
pub struct TextStream {
    ids: Vec<u32>,
    text: String,
    /// Bytes of `text` handed out so far.
    shown: usize,
    stops: Vec<String>,
    /// Byte offset of the first stop string in `text`, once one appeared.
    stop_at: Option<usize>,
}

impl TextStream {
    /// A stream that cuts the answer before any of `stops` (empty strings are ignored).
    pub fn new(stops: &[String]) -> TextStream {
        TextStream {
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
            ..TextStream::default()
        }
    }

    /// Starts a new answer with the same stop strings.
    pub fn clear(&mut self) {
        self.ids.clear();
        self.text.clear();
        self.shown = 0;
        self.stop_at = None;
    }

    /// Whether a stop string has appeared.
    pub fn stopped(&self) -> bool {
        self.stop_at.is_some()
    }

    /// The answer so far (cut before the stop string when one appeared).
    pub fn text(&self) -> &str {
        &self.text[..self.stop_at.unwrap_or(self.text.len())]
    }

    /// Adds token `id` and returns the text that became safe to show.
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> Result<&str> {
        if self.stop_at.is_some() {
            return Ok("");
        }
        self.ids.push(id);
        let full = decode(tok, &self.ids)?;
        if full.get(..self.shown) != Some(&self.text[..self.shown]) {
            // The decoder rewrote text already shown (not byte-level BPE): show nothing new
            // until it agrees again; `finish` hands out what is left.
            self.text = full;
            return Ok("");
        }
        self.text = full;
        let safe = self.safe_end();
        let start = self.shown;
        if safe > start {
            self.shown = safe;
            Ok(&self.text[start..safe])
        } else {
            Ok("")
        }
    }

    /// Hands out the rest of the answer (up to the stop string, trailing replacement
    /// characters included: the answer really ends in broken bytes).
    pub fn finish(&mut self) -> &str {
        let end = self.stop_at.unwrap_or(self.text.len());
        if self.shown >= end || !self.text.is_char_boundary(self.shown) {
            return "";
        }
        let start = self.shown;
        self.shown = end;
        &self.text[start..end]
    }

    /// End of the text that is safe to show; records a stop string when one appeared.
    fn safe_end(&mut self) -> usize {
        // A stop string can only be new where it overlaps the unshown text.
        let longest = self.stops.iter().map(|s| s.len()).max().unwrap_or(0);
        let mut from = self.shown.saturating_sub(longest);
        while !self.text.is_char_boundary(from) {
            from -= 1;
        }
        let hit = self
            .stops
            .iter()
            .filter_map(|s| self.text[from..].find(s.as_str()).map(|i| from + i))
            .min();
        if let Some(at) = hit {
            self.stop_at = Some(at);
            return at;
        }
        let whole = self.text.trim_end_matches('\u{FFFD}');
        let mut end = whole.len();
        // Hold back the longest tail that is a proper prefix of a stop string.
        for s in &self.stops {
            for (cut, _) in s.char_indices().skip(1) {
                if whole.ends_with(&s[..cut]) {
                    end = end.min(whole.len() - cut);
                }
            }
        }
        end.max(self.shown)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenizer::{byte_level, encode};

    fn pieces(stops: &[&str], text: &str) -> (Vec<String>, String, bool) {
        let tok = byte_level().unwrap();
        let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
        let mut st = TextStream::new(&stops);
        let mut out = Vec::new();
        for id in encode(&tok, text).unwrap() {
            out.push(st.push(&tok, id).unwrap().to_string());
        }
        out.push(st.finish().to_string());
        (out, st.text().to_string(), st.stopped())
    }

    #[test]
    fn split_utf8_characters_wait_for_their_last_byte() {
        let text = "Größe: 🐕 und Katze — café";
        let (out, all, stopped) = pieces(&[], text);
        assert!(!stopped);
        assert_eq!(out.concat(), text);
        assert_eq!(all, text);
        for p in &out {
            assert!(
                !p.contains('\u{FFFD}'),
                "piece {p:?} shows a broken character"
            );
        }
        // The dog is 4 bytes = 4 tokens: three of them show nothing.
        assert!(out.iter().any(|p| p == "🐕"));
    }

    #[test]
    fn stop_strings_cut_the_answer_and_are_never_shown() {
        let (out, all, stopped) = pieces(&["\nQ:", "###"], "Rest the dog.\nQ: next one");
        assert!(stopped);
        assert_eq!(all, "Rest the dog.");
        assert_eq!(out.concat(), "Rest the dog.");
        // A partial match that turns out not to be a stop string is shown in the end.
        let (out, all, stopped) = pieces(&["\nQ:"], "A\nB\nQx");
        assert!(!stopped);
        assert_eq!((out.concat(), all), ("A\nB\nQx".into(), "A\nB\nQx".into()));
        // A stop string made of multi-byte characters.
        let (out, _, stopped) = pieces(&["🐕🐕"], "one 🐕 two 🐕🐕 three");
        assert!(stopped);
        assert_eq!(out.concat(), "one 🐕 two ");
    }
}
