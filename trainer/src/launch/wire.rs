//! The framing under [`super::tcp::TcpComm`]: fixed 32-byte headers with a payload, one reader
//! thread per connection that drains the socket into a channel (so a peer's sends never block
//! on us while we compute) and notes when the peer was last heard from, and heartbeats so a
//! peer that hangs, rather than dies, is noticed too.
//!
//! A dead peer shows as end-of-file or a reset on its connection, at once; a hung one (stopped
//! process, lost host) as silence longer than the hang timeout. A peer that drops its comm
//! says `Bye` first, so the message tells "left" from "died".

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub(crate) const HEADER_BYTES: usize = 32;
/// A payload larger than this is a corrupt header, not a tensor.
const MAX_PAYLOAD: u64 = 1 << 40;

/// What a frame is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    Heartbeat = 0,
    Data = 1,
    /// The job failed; `peer` names the rank at fault (`u32::MAX` = none) and the payload
    /// says why.
    Abort = 2,
    Bye = 3,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Header {
    pub kind: Kind,
    /// The collective ([`super::tcp`]'s op codes).
    pub op: u8,
    /// Abort: the rank at fault. Broadcast: the root.
    pub peer: u32,
    /// The collective's sequence number on the sender.
    pub seq: u64,
    /// Element count the sender called the collective with.
    pub count: u64,
    pub payload: u64,
}

impl Header {
    /// A frame with no payload and no collective.
    pub fn control(kind: Kind) -> Header {
        Header {
            kind,
            op: 0,
            peer: 0,
            seq: 0,
            count: 0,
            payload: 0,
        }
    }

    pub fn encode(&self) -> [u8; HEADER_BYTES] {
        let mut b = [0u8; HEADER_BYTES];
        b[0] = self.kind as u8;
        b[1] = self.op;
        b[4..8].copy_from_slice(&self.peer.to_le_bytes());
        b[8..16].copy_from_slice(&self.seq.to_le_bytes());
        b[16..24].copy_from_slice(&self.count.to_le_bytes());
        b[24..32].copy_from_slice(&self.payload.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8; HEADER_BYTES]) -> io::Result<Header> {
        let kind = match b[0] {
            0 => Kind::Heartbeat,
            1 => Kind::Data,
            2 => Kind::Abort,
            3 => Kind::Bye,
            k => return Err(invalid(format!("unknown frame kind {k}"))),
        };
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        let h = Header {
            kind,
            op: b[1],
            peer: u32::from_le_bytes(b[4..8].try_into().expect("4 bytes")),
            seq: u64_at(8),
            count: u64_at(16),
            payload: u64_at(24),
        };
        if h.payload > MAX_PAYLOAD {
            return Err(invalid(format!("a frame of {} bytes", h.payload)));
        }
        Ok(h)
    }
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

/// A frame as received.
#[derive(Debug)]
pub(crate) struct Frame {
    pub header: Header,
    pub payload: Vec<u8>,
}

/// What the reader thread reports.
pub(crate) enum Event {
    Frame(Frame),
    /// The connection ended: why, in words.
    Closed(String),
}

/// Milliseconds since `epoch`, for the atomic "last heard" stamp.
fn millis(epoch: Instant) -> u64 {
    epoch.elapsed().as_millis() as u64
}

/// One connection to a peer rank.
pub(crate) struct Link {
    pub peer: usize,
    writer: Arc<Mutex<TcpStream>>,
    rx: Receiver<Event>,
    last_heard: Arc<AtomicU64>,
    epoch: Instant,
}

impl Link {
    /// Starts the reader thread on `stream` (blocking mode, no timeouts).
    pub fn new(peer: usize, stream: TcpStream, write_timeout: Duration) -> io::Result<Link> {
        stream.set_read_timeout(None)?;
        stream.set_write_timeout(Some(write_timeout))?;
        stream.set_nodelay(true)?;
        let mut reader = stream.try_clone()?;
        let (tx, rx) = mpsc::channel();
        let epoch = Instant::now();
        let last_heard = Arc::new(AtomicU64::new(0));
        let heard = Arc::clone(&last_heard);
        std::thread::Builder::new()
            .name(format!("comm-read-{peer}"))
            .spawn(move || loop {
                let ev = match read_frame(&mut reader, || {
                    heard.store(millis(epoch), Ordering::Relaxed)
                }) {
                    Ok(f) if f.header.kind == Kind::Heartbeat => continue,
                    Ok(f) if f.header.kind == Kind::Bye => Event::Closed(
                        "left the job (closed its connections) while others still expected it"
                            .into(),
                    ),
                    Ok(f) => Event::Frame(f),
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Event::Closed(
                        "its connection closed (the process exited or was killed)".into(),
                    ),
                    Err(e) => Event::Closed(format!("its connection failed: {e}")),
                };
                let closed = matches!(ev, Event::Closed(_));
                if tx.send(ev).is_err() || closed {
                    return;
                }
            })?;
        Ok(Link {
            peer,
            writer: Arc::new(Mutex::new(stream)),
            rx,
            last_heard,
            epoch,
        })
    }

    /// Sends one frame; an error says why in words.
    pub fn send(&self, header: Header, payload: &[u8]) -> Result<(), String> {
        let mut w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        w.write_all(&header.encode())
            .and_then(|_| w.write_all(payload))
            .map_err(|e| match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                    "it stopped reading (hung or unreachable)".to_string()
                }
                _ => format!("sending to it failed: {e}"),
            })
    }

    /// The next non-heartbeat frame, or why none will come: the connection closed, or the
    /// peer was silent (not even a heartbeat) for `hang`.
    pub fn recv(&self, hang: Duration) -> Result<Frame, String> {
        loop {
            match self.rx.recv_timeout(Duration::from_millis(200)) {
                Ok(Event::Frame(f)) => return Ok(f),
                Ok(Event::Closed(why)) => return Err(why),
                Err(RecvTimeoutError::Disconnected) => {
                    return Err("its connection's reader stopped".into())
                }
                Err(RecvTimeoutError::Timeout) => {
                    let silent =
                        millis(self.epoch).saturating_sub(self.last_heard.load(Ordering::Relaxed));
                    if silent > hang.as_millis() as u64 {
                        return Err(format!(
                            "nothing heard from it for {:.0} s, not even a heartbeat \
                             (hung, stopped or unreachable)",
                            silent as f64 / 1e3
                        ));
                    }
                }
            }
        }
    }

    /// The writing half, for [`Heartbeat`].
    pub fn writer(&self) -> Arc<Mutex<TcpStream>> {
        Arc::clone(&self.writer)
    }

    /// Closes the connection: politely (`Bye`, then end of stream) or abruptly.
    pub fn close(&self, polite: bool) {
        let w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        if polite {
            let _ = (&*w).write_all(&Header::control(Kind::Bye).encode());
            let _ = w.shutdown(Shutdown::Write);
        } else {
            let _ = w.shutdown(Shutdown::Both);
        }
    }
}

/// Reads one frame, calling `heard` whenever bytes arrive.
fn read_frame(r: &mut TcpStream, mut heard: impl FnMut()) -> io::Result<Frame> {
    let mut hb = [0u8; HEADER_BYTES];
    r.read_exact(&mut hb)?;
    heard();
    let header = Header::decode(&hb)?;
    let mut payload = vec![0u8; header.payload as usize];
    for chunk in payload.chunks_mut(1 << 20) {
        r.read_exact(chunk)?;
        heard();
    }
    Ok(Frame { header, payload })
}

/// A heartbeat, unless a frame is being written (which itself shows we are alive).
fn heartbeat(writer: &Mutex<TcpStream>) {
    if let Ok(mut w) = writer.try_lock() {
        let _ = w.write_all(&Header::control(Kind::Heartbeat).encode());
    }
}

/// Sends heartbeats on every link each `every` until dropped.
pub(crate) struct Heartbeat {
    stop: Arc<AtomicBool>,
    wake: mpsc::Sender<()>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Heartbeat {
    pub fn start(writers: Vec<Arc<Mutex<TcpStream>>>, every: Duration) -> io::Result<Heartbeat> {
        let stop = Arc::new(AtomicBool::new(false));
        let (wake, sleep) = mpsc::channel::<()>();
        let s = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("comm-heartbeat".into())
            .spawn(move || {
                while !s.load(Ordering::Relaxed) {
                    writers.iter().for_each(|w| heartbeat(w));
                    if !matches!(sleep.recv_timeout(every), Err(RecvTimeoutError::Timeout)) {
                        return;
                    }
                }
            })?;
        Ok(Heartbeat {
            stop,
            wake,
            thread: Some(thread),
        })
    }
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.wake.send(());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
