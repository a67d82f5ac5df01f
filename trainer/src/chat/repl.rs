//! The interactive loop: one question per line, answers streamed, commands start with `/`.

use std::io::{BufRead, Write};

use anyhow::{Context, Result};

use super::Session;

/// The text `/help` prints.
pub const HELP: &str = "\
Type a question and press Enter; the answer streams as it is written.
The conversation continues from the model's state: earlier turns are not re-read.
Commands:
  /reset   forget the conversation and start over
  /help    show this help
  /quit    leave (Ctrl-D works too)
Ctrl-C stops the answer being written (the conversation keeps what was written).";

/// Reads lines from `input` until `/quit` or end of input. Answers go to `out`; the timing
/// line after each answer and notices go to `err`. `prompt` is shown before each question
/// (pass `None` when the input is not a terminal).
pub fn run(
    session: &mut Session,
    input: &mut dyn BufRead,
    out: &mut dyn Write,
    err: &mut dyn Write,
    prompt: Option<&str>,
) -> Result<()> {
    let mut raw = Vec::new();
    let mut number = 0usize;
    loop {
        if let Some(p) = prompt {
            write!(out, "{p}")?;
            out.flush()?;
        }
        raw.clear();
        if input.read_until(b'\n', &mut raw).context("reading stdin")? == 0 {
            if prompt.is_some() {
                writeln!(out)?;
            }
            return Ok(());
        }
        number += 1;
        let line = match std::str::from_utf8(&raw) {
            Ok(line) => line,
            Err(e) => {
                // One bad line (a pasted binary, another encoding) must not end the chat.
                writeln!(
                    err,
                    "line {number} is not valid UTF-8 (bad byte at offset {}): skipped; {}",
                    e.valid_up_to(),
                    String::from_utf8_lossy(&raw).trim_end()
                )?;
                continue;
            }
        };
        let q = line.trim();
        match q {
            "" => continue,
            "/quit" | "/exit" => return Ok(()),
            "/reset" => {
                session.reset()?;
                writeln!(err, "(conversation reset)")?;
            }
            "/help" => writeln!(out, "{HELP}")?,
            cmd if cmd.starts_with('/') => {
                writeln!(err, "unknown command {cmd}; /help lists the commands")?;
            }
            question => {
                let a = session.ask(question, out)?;
                writeln!(out)?;
                out.flush()?;
                writeln!(err, "{}", a.timing_line())?;
            }
        }
    }
}
