//! Streaming readers: a unit's bytes (decompressed), its `.jsonl` lines, the text field of a
//! line, and `.txt` documents in chunks cut at line boundaries.

use std::borrow::Cow;
use std::fmt;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom};

use indicatif::ProgressBar;
use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};

use super::sources::Source;

/// Longest `.jsonl` line read; longer lines are skipped as bad input (memory stays bounded).
pub const MAX_LINE_BYTES: usize = 256 << 20;
/// Size of the pieces long documents are tokenized in, cut at line boundaries.
pub const CHUNK_BYTES: usize = 1 << 20;
/// A piece with no line break is cut (at a character boundary) once it reaches this size.
pub const HARD_CHUNK_BYTES: usize = 4 * CHUNK_BYTES;

const READ_BUF: usize = 1 << 20;
const REPORT_EVERY: u64 = 1 << 20;

/// Counts the bytes read from the file into the progress bar, at most `budget` of them.
struct Counting<R> {
    inner: R,
    pb: Option<ProgressBar>,
    budget: u64,
    pending: u64,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        let counted = (n as u64).min(self.budget);
        self.budget -= counted;
        self.pending += counted;
        if self.pending >= REPORT_EVERY {
            self.flush_progress();
        }
        Ok(n)
    }
}

impl<R> Counting<R> {
    fn flush_progress(&mut self) {
        if let Some(pb) = &self.pb {
            pb.inc(self.pending);
        }
        self.pending = 0;
    }
}

impl<R> Drop for Counting<R> {
    fn drop(&mut self) {
        self.flush_progress();
    }
}

/// Opens `source` decompressed, positioned at byte `start` (uncompressed files only), counting
/// up to `budget` raw bytes into `pb`.
pub fn open(
    source: &Source,
    start: u64,
    budget: u64,
    pb: Option<ProgressBar>,
) -> io::Result<Box<dyn BufRead + Send>> {
    let mut file = File::open(&source.path)?;
    if start > 0 {
        file.seek(SeekFrom::Start(start))?;
    }
    let raw = Counting {
        inner: file,
        pb,
        budget,
        pending: 0,
    };
    crate::data::inputs::decode(raw, source.compression)
}

/// What [`Lines::next_line`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum LineRead {
    /// The line is in the buffer (without its `\n`).
    Line,
    /// The line was longer than [`MAX_LINE_BYTES`] and was skipped.
    TooLong,
}

/// The lines of a stream that start before `end` (relative to where the stream starts).
pub struct Lines<R> {
    reader: R,
    pos: u64,
    end: u64,
    /// Lines returned so far (the 1-based number of the last one).
    pub line: u64,
}

impl<R: BufRead> Lines<R> {
    /// Lines that start in the first `end` bytes of a stream (`u64::MAX`: all of them).
    pub fn new(reader: R, end: u64) -> Self {
        Lines {
            reader,
            pos: 0,
            end,
            line: 0,
        }
    }

    /// Lines that start in `0..len` of a stream opened one byte before a range start: the
    /// partial line up to the first `\n` belongs to the previous range and is skipped.
    pub fn after_boundary(mut reader: R, len: u64) -> io::Result<Self> {
        let skipped = skip_line(&mut reader)?;
        Ok(Lines {
            reader,
            pos: skipped,
            end: len + 1,
            line: 0,
        })
    }

    /// Reads the next line into `buf`; `None` at the end of the range or stream.
    pub fn next_line(&mut self, buf: &mut Vec<u8>) -> io::Result<Option<LineRead>> {
        buf.clear();
        if self.pos >= self.end {
            return Ok(None);
        }
        let limit = MAX_LINE_BYTES as u64 + 1;
        let n = (&mut self.reader).take(limit).read_until(b'\n', buf)?;
        if n == 0 {
            return Ok(None);
        }
        self.pos += n as u64;
        self.line += 1;
        if buf.last() == Some(&b'\n') {
            buf.pop();
            return Ok(Some(LineRead::Line));
        }
        if n as u64 == limit {
            self.pos += skip_line(&mut self.reader)?;
            buf.clear();
            return Ok(Some(LineRead::TooLong));
        }
        Ok(Some(LineRead::Line))
    }
}

/// Consumes through the next `\n` (or to the end); returns the bytes consumed.
fn skip_line<R: BufRead>(r: &mut R) -> io::Result<u64> {
    let mut total = 0u64;
    loop {
        let buf = match r.fill_buf() {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if buf.is_empty() {
            return Ok(total);
        }
        match buf.iter().position(|&b| b == b'\n') {
            Some(i) => {
                r.consume(i + 1);
                return Ok(total + i as u64 + 1);
            }
            None => {
                let n = buf.len();
                r.consume(n);
                total += n as u64;
            }
        }
    }
}

/// The document field of a JSON line.
#[derive(Debug)]
pub enum Field<'a> {
    Text(Cow<'a, str>),
    /// The object has no such key.
    Missing,
    /// The key holds something else (named).
    NotString(&'static str),
}

/// Parses one JSON object and extracts `field` without building the rest of the object.
pub fn extract_field<'a>(line: &'a str, field: &str) -> Result<Field<'a>, String> {
    let mut de = serde_json::Deserializer::from_str(line);
    let value = FieldSeed { field }
        .deserialize(&mut de)
        .and_then(|v| de.end().map(|()| v))
        .map_err(|e| format!("malformed JSON: {e}"))?;
    value.ok_or_else(|| "not a JSON object".to_string())
}

struct FieldSeed<'f> {
    field: &'f str,
}

impl<'de> DeserializeSeed<'de> for FieldSeed<'_> {
    type Value = Option<Field<'de>>;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for FieldSeed<'_> {
    type Value = Option<Field<'de>>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut found = Field::Missing;
        while let Some(is_field) = map.next_key_seed(KeySeed { field: self.field })? {
            if is_field && matches!(found, Field::Missing) {
                found = map.next_value_seed(StrSeed)?;
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(Some(found))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(None)
    }
    fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(None)
    }
}

/// Deserializes a key to "is it `field`?" without allocating.
struct KeySeed<'f> {
    field: &'f str,
}

impl<'de> DeserializeSeed<'de> for KeySeed<'_> {
    type Value = bool;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
        d.deserialize_str(self)
    }
}

impl Visitor<'_> for KeySeed<'_> {
    type Value = bool;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a key")
    }
    fn visit_str<E>(self, k: &str) -> Result<bool, E> {
        Ok(k == self.field)
    }
}

struct StrSeed;

impl<'de> DeserializeSeed<'de> for StrSeed {
    type Value = Field<'de>;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for StrSeed {
    type Value = Field<'de>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_borrowed_str<E>(self, s: &'de str) -> Result<Self::Value, E> {
        Ok(Field::Text(Cow::Borrowed(s)))
    }
    fn visit_str<E>(self, s: &str) -> Result<Self::Value, E> {
        Ok(Field::Text(Cow::Owned(s.to_owned())))
    }
    fn visit_string<E>(self, s: String) -> Result<Self::Value, E> {
        Ok(Field::Text(Cow::Owned(s)))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Field::NotString("an object"))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Field::NotString("an array"))
    }
    fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
        Ok(Field::NotString("a number"))
    }
    fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
        Ok(Field::NotString("a number"))
    }
    fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
        Ok(Field::NotString("a number"))
    }
    fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
        Ok(Field::NotString("a boolean"))
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(Field::NotString("null"))
    }
}

/// Splits `text` into pieces of about [`CHUNK_BYTES`], each ending just after a `\n`, or at a
/// character boundary when a line runs past [`HARD_CHUNK_BYTES`].
pub fn pieces(text: &str) -> impl Iterator<Item = &str> {
    let mut rest = text;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let cut = piece_len(rest.as_bytes(), false);
        let (piece, tail) = rest.split_at(cut);
        rest = tail;
        Some(piece)
    })
}

/// Length of the next piece of `b`: the whole of it when short (or when `more` is false and it
/// has no later break), else through the first `\n` at or after [`CHUNK_BYTES`], else a
/// character boundary at [`HARD_CHUNK_BYTES`].
fn piece_len(b: &[u8], more: bool) -> usize {
    if b.len() <= CHUNK_BYTES && !more {
        return b.len();
    }
    let from = CHUNK_BYTES.min(b.len());
    let upto = HARD_CHUNK_BYTES.min(b.len());
    if let Some(i) = b[from..upto].iter().position(|&c| c == b'\n') {
        return from + i + 1;
    }
    if b.len() <= HARD_CHUNK_BYTES && !more {
        return b.len();
    }
    if b.len() <= HARD_CHUNK_BYTES {
        return 0;
    }
    let mut cut = HARD_CHUNK_BYTES;
    while cut > 0 && (b[cut] & 0xC0) == 0x80 {
        cut -= 1;
    }
    if cut == 0 {
        HARD_CHUNK_BYTES
    } else {
        cut
    }
}

/// Reads a stream in pieces cut like [`pieces`] (at line boundaries), never holding more than
/// [`HARD_CHUNK_BYTES`] plus one read buffer.
pub struct Chunks<R> {
    reader: R,
    carry: Vec<u8>,
    eof: bool,
    /// `\n`s in the pieces returned so far.
    pub lines: u64,
}

impl<R: Read> Chunks<R> {
    pub fn new(reader: R) -> Self {
        Chunks {
            reader,
            carry: Vec::new(),
            eof: false,
            lines: 0,
        }
    }

    /// The next piece (raw bytes, not yet checked as UTF-8) into `out`; false at the end.
    pub fn next_piece(&mut self, out: &mut Vec<u8>) -> io::Result<bool> {
        out.clear();
        loop {
            let cut = piece_len(&self.carry, !self.eof);
            if cut > 0 {
                out.extend_from_slice(&self.carry[..cut]);
                self.carry.drain(..cut);
                self.lines += out.iter().filter(|&&c| c == b'\n').count() as u64;
                return Ok(true);
            }
            if self.eof {
                return Ok(false);
            }
            let have = self.carry.len();
            self.carry.resize(have + READ_BUF, 0);
            let n = loop {
                match self.reader.read(&mut self.carry[have..]) {
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    r => break r,
                }
            };
            let n = n.inspect_err(|_| self.carry.truncate(have))?;
            self.carry.truncate(have + n);
            self.eof = n == 0;
        }
    }
}

/// Number of `\n`s in the first `offset` bytes of an uncompressed file (to turn a line
/// number inside a range into one inside the file).
pub fn count_lines_before(path: &std::path::Path, offset: u64) -> io::Result<u64> {
    let mut r = BufReader::with_capacity(READ_BUF, File::open(path)?.take(offset));
    let mut n = 0u64;
    loop {
        let buf = r.fill_buf()?;
        if buf.is_empty() {
            return Ok(n);
        }
        n += buf.iter().filter(|&&c| c == b'\n').count() as u64;
        let len = buf.len();
        r.consume(len);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn field_extraction_names_what_is_wrong() {
        let text = |l: &str| match extract_field(l, "text") {
            Ok(Field::Text(t)) => t.into_owned(),
            other => format!("{other:?}"),
        };
        assert_eq!(text(r#"{"a": [1, {"text": 2}], "text": "x\ny"}"#), "x\ny");
        assert_eq!(text(r#"{"a": 1}"#), "Ok(Missing)");
        assert_eq!(text(r#"{"text": 5}"#), "Ok(NotString(\"a number\"))");
        assert!(text("[1]").contains("not a JSON object"));
        assert!(text(r#"{"text": "x"} junk"#).contains("malformed JSON"));
        assert!(text(r#"{"text": "#).contains("malformed JSON"));
    }

    #[test]
    fn ranges_own_the_lines_that_start_in_them() {
        let data = b"aa\nbbbb\ncc\n\ndd";
        let mut all = Vec::new();
        for (start, end) in [(0u64, 4u64), (4, 8), (8, data.len() as u64)] {
            let mut lines = if start == 0 {
                Lines::new(&data[..], end)
            } else {
                Lines::after_boundary(&data[start as usize - 1..], end - start).unwrap()
            };
            let mut buf = Vec::new();
            while let Some(LineRead::Line) = lines.next_line(&mut buf).unwrap() {
                all.push(String::from_utf8(buf.clone()).unwrap());
            }
        }
        assert_eq!(all, ["aa", "bbbb", "cc", "", "dd"]);
    }

    #[test]
    fn chunks_cut_at_lines_and_reassemble() {
        let mut text = String::new();
        for i in 0..200_000 {
            text.push_str(&format!("line {i} é\n"));
        }
        text.push_str(&"ü".repeat(3 * CHUNK_BYTES));
        let mut chunks = Chunks::new(text.as_bytes());
        let (mut out, mut buf) = (Vec::new(), Vec::new());
        while chunks.next_piece(&mut buf).unwrap() {
            assert!(buf.len() <= HARD_CHUNK_BYTES + 1);
            assert!(std::str::from_utf8(&buf).is_ok());
            out.extend_from_slice(&buf);
        }
        assert_eq!(out, text.as_bytes());
        let joined: String = pieces(&text).collect();
        assert_eq!(joined, text);
        assert!(pieces(&text).count() > 2);
    }
}
