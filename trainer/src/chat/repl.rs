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
    let mut line = String::new();
    loop {
        if let Some(p) = prompt {
            write!(out, "{p}")?;
            out.flush()?;
        }
        line.clear();
        if input.read_line(&mut line).context("reading stdin")? == 0 {
            if prompt.is_some() {
                writeln!(out)?;
            }
            return Ok(());
        }
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
