//! [`Comm`](reference::comm::Comm) over TCP for CPU ranks in separate processes: a star around rank 0, on the
//! connections the [`rendezvous`](super::rendezvous::rendezvous()) left open. Every other rank sends its part to rank 0,
//! which checks that all called the same collective with the same lengths, sums in rank order
//! `((r0 + r1) + r2) + …` (the in-process comm's order, so the bits agree), and sends each
//! rank its result.
//!
//! Faults: a rank that dies is seen at once on its connection (end of stream or reset); one
//! that hangs, by the silence of its heartbeats ([`TcpOptions::hang`]). Rank 0 then tells every
//! survivor which rank failed, and a dead rank 0 is seen by all. A collective whose lengths
//! disagree fails on every rank. After an error the comm returns that error for every call.
//!
//! A star suits the CPU ranks this serves (tests, small jobs); GPU runs use NCCL.

use std::time::Duration;

use reference::comm::{length_error, CommError, CommResult};

use super::rendezvous::Rendezvous;
use super::wire::{Frame, Header, Heartbeat, Kind, Link};

/// Timing of liveness checks.
#[derive(Clone, Copy, Debug)]
pub struct TcpOptions {
    /// A peer silent for this long (no data, no heartbeat) is taken as failed.
    pub hang: Duration,
    /// How often each rank sends heartbeats.
    pub heartbeat: Duration,
}

impl Default for TcpOptions {
    fn default() -> Self {
        TcpOptions {
            hang: Duration::from_secs(60),
            heartbeat: Duration::from_secs(1),
        }
    }
}

pub(crate) const OP_ALL_REDUCE: u8 = 1;
pub(crate) const OP_ALL_REDUCE_F64: u8 = 2;
pub(crate) const OP_REDUCE_SCATTER: u8 = 3;
pub(crate) const OP_ALL_GATHER: u8 = 4;
pub(crate) const OP_BROADCAST: u8 = 5;
pub(crate) const OP_BARRIER: u8 = 6;

fn op_name(op: u8) -> &'static str {
    match op {
        OP_ALL_REDUCE => "all_reduce_sum",
        OP_ALL_REDUCE_F64 => "all_reduce_sum_f64",
        OP_REDUCE_SCATTER => "reduce_scatter_sum",
        OP_ALL_GATHER => "all_gather",
        OP_BROADCAST => "broadcast",
        OP_BARRIER => "barrier",
        _ => "an unknown collective",
    }
}

/// One rank's end of the star.
pub struct TcpComm {
    rank: usize,
    world: usize,
    /// Rank 0: links to ranks 1.. in order. Others: the link to rank 0.
    links: Vec<Link>,
    seq: u64,
    opts: TcpOptions,
    failed: Option<CommError>,
    _heartbeat: Option<Heartbeat>,
}

/// An element that travels little-endian and sums.
pub(crate) trait Elem: Copy + std::ops::AddAssign {
    const BYTES: usize;
    fn put(self, out: &mut Vec<u8>);
    fn get(b: &[u8]) -> Self;
}

impl Elem for f32 {
    const BYTES: usize = 4;
    fn put(self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_le_bytes());
    }
    fn get(b: &[u8]) -> Self {
        f32::from_le_bytes(b.try_into().expect("4 bytes"))
    }
}

impl Elem for f64 {
    const BYTES: usize = 8;
    fn put(self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_le_bytes());
    }
    fn get(b: &[u8]) -> Self {
        f64::from_le_bytes(b.try_into().expect("8 bytes"))
    }
}

pub(crate) fn encode<T: Elem>(xs: &[T]) -> Vec<u8> {
    let mut out = Vec::with_capacity(xs.len() * T::BYTES);
    xs.iter().for_each(|x| x.put(&mut out));
    out
}

pub(crate) fn decode_into<T: Elem>(b: &[u8], out: &mut [T]) {
    debug_assert_eq!(b.len(), out.len() * T::BYTES);
    for (o, c) in out.iter_mut().zip(b.chunks_exact(T::BYTES)) {
        *o = T::get(c);
    }
}

/// `acc += b` element-wise.
pub(crate) fn add_into<T: Elem>(acc: &mut [T], b: &[u8]) {
    for (a, c) in acc.iter_mut().zip(b.chunks_exact(T::BYTES)) {
        *a += T::get(c);
    }
}

impl TcpComm {
    /// Builds the comm on the connections a rendezvous left open.
    pub fn new(rdzv: Rendezvous, opts: TcpOptions) -> CommResult<TcpComm> {
        let (rank, world) = (rdzv.rank, rdzv.world);
        let mut links = Vec::with_capacity(rdzv.links.len());
        for (peer, stream) in rdzv.links {
            let link = Link::new(peer, stream, opts.hang).map_err(|e| CommError {
                rank,
                peer: Some(peer),
                op: "connect",
                msg: format!("setting up the connection: {e}"),
            })?;
            links.push(link);
        }
        let writers = links.iter().map(|l| l.writer()).collect();
        let hb = Heartbeat::start(writers, opts.heartbeat).map_err(|e| CommError {
            rank,
            peer: None,
            op: "connect",
            msg: format!("starting the heartbeat thread: {e}"),
        })?;
        Ok(TcpComm {
            rank,
            world,
            links,
            seq: 0,
            opts,
            failed: None,
            _heartbeat: Some(hb),
        })
    }

    /// Cuts every connection without a goodbye, as if this process had been killed (tests).
    #[doc(hidden)]
    pub fn sever(&mut self) {
        self._heartbeat = None;
        self.links.iter().for_each(|l| l.close(false));
    }

    fn error(&self, op: u8, peer: Option<usize>, msg: String) -> CommError {
        CommError {
            rank: self.rank,
            peer,
            op: op_name(op),
            msg,
        }
    }

    /// Records the first failure; every later call returns it.
    fn fail(&mut self, e: CommError) -> CommError {
        self.failed.get_or_insert(e).clone()
    }

    /// Rank 0: tells every other rank the job failed because of `peer`, then records it.
    fn abort_all(&mut self, e: CommError) -> CommError {
        let h = Header {
            kind: Kind::Abort,
            op: 0,
            peer: e.peer.map_or(u32::MAX, |p| p as u32),
            seq: self.seq,
            count: 0,
            payload: 0,
        };
        let text = e.to_string();
        for l in &self.links {
            let _ = l.send(
                Header {
                    payload: text.len() as u64,
                    ..h
                },
                text.as_bytes(),
            );
        }
        self.fail(e)
    }

    /// A local mistake (lengths): rank 0 tells everyone, another rank tells rank 0.
    pub(crate) fn local_error(&mut self, op: u8, msg: String) -> CommError {
        let e = length_error(self.rank, op_name(op), msg);
        if self.rank == 0 {
            self.abort_all(e)
        } else {
            let mut e = e;
            e.peer = Some(self.rank);
            let text = e.to_string();
            let h = Header {
                kind: Kind::Abort,
                op,
                peer: self.rank as u32,
                seq: self.seq,
                count: 0,
                payload: text.len() as u64,
            };
            let _ = self.links[0].send(h, text.as_bytes());
            self.fail(e)
        }
    }

    fn header(&self, op: u8, count: usize, peer: usize, payload: usize) -> Header {
        Header {
            kind: Kind::Data,
            op,
            peer: peer as u32,
            seq: self.seq,
            count: count as u64,
            payload: payload as u64,
        }
    }

    /// Rank 0: one frame from every other rank, in rank order, checked against our own call.
    pub(crate) fn gather_parts(
        &mut self,
        op: u8,
        count: usize,
        root: usize,
    ) -> CommResult<Vec<Vec<u8>>> {
        let mut parts = Vec::with_capacity(self.links.len());
        for i in 0..self.links.len() {
            let peer = self.links[i].peer;
            let frame = match self.links[i].recv(self.opts.hang) {
                Ok(f) => f,
                Err(why) => {
                    let e = self.error(op, Some(peer), format!("rank {peer} failed: {why}"));
                    return Err(self.abort_all(e));
                }
            };
            if let Err(e) = self.check(op, count, root, peer, &frame) {
                return Err(self.abort_all(e));
            }
            parts.push(frame.payload);
        }
        Ok(parts)
    }

    /// Whether `frame` from `peer` is the same collective as ours.
    fn check(&self, op: u8, count: usize, root: usize, peer: usize, f: &Frame) -> CommResult<()> {
        let h = f.header;
        if h.kind == Kind::Abort {
            let msg = String::from_utf8_lossy(&f.payload).into_owned();
            return Err(self.error(op, Some(peer), format!("rank {peer} gave up: {msg}")));
        }
        let root_of = |h: &Header| {
            if h.op == OP_BROADCAST {
                format!(" from root {}", h.peer)
            } else {
                String::new()
            }
        };
        let ours = self.header(op, count, root, 0);
        if h.op != op
            || h.seq != self.seq
            || h.count != count as u64
            || (op == OP_BROADCAST && h.peer as usize != root)
        {
            return Err(self.error(
                op,
                Some(peer),
                format!(
                    "rank {peer} called {}{} with {} elements as its collective #{}, rank 0 called {}{} with {count} as #{}",
                    op_name(h.op), root_of(&h), h.count, h.seq, op_name(op), root_of(&ours), self.seq
                ),
            ));
        }
        Ok(())
    }

    /// Rank 0: sends `payload(peer)` to each other rank.
    pub(crate) fn scatter_results<'a>(
        &mut self,
        op: u8,
        count: usize,
        root: usize,
        payload: impl Fn(usize) -> &'a [u8],
    ) -> CommResult<()> {
        for i in 0..self.links.len() {
            let peer = self.links[i].peer;
            let bytes = payload(peer);
            let h = self.header(op, count, root, bytes.len());
            if let Err(why) = self.links[i].send(h, bytes) {
                let e = self.error(op, Some(peer), format!("rank {peer} failed: {why}"));
                return Err(self.abort_all(e));
            }
        }
        Ok(())
    }

    /// Another rank: sends our part to rank 0 and returns its answer (`want` bytes long).
    pub(crate) fn exchange(
        &mut self,
        op: u8,
        count: usize,
        root: usize,
        part: &[u8],
        want: usize,
    ) -> CommResult<Vec<u8>> {
        let h = self.header(op, count, root, part.len());
        let sent = self.links[0].send(h, part);
        let got = sent.and_then(|_| self.links[0].recv(self.opts.hang));
        let f = match got {
            Ok(f) => f,
            Err(why) => {
                let e = self.error(op, Some(0), format!("rank 0 failed: {why}"));
                return Err(self.fail(e));
            }
        };
        if f.header.kind == Kind::Abort {
            let peer = (f.header.peer != u32::MAX).then_some(f.header.peer as usize);
            let msg = format!("the job failed: {}", String::from_utf8_lossy(&f.payload));
            let e = self.error(op, peer, msg);
            return Err(self.fail(e));
        }
        if f.payload.len() != want || f.header.seq != self.seq || f.header.op != op {
            let msg = format!(
                "rank 0 answered {} #{} with {} bytes, expected {want}",
                op_name(f.header.op),
                f.header.seq,
                f.payload.len()
            );
            let e = self.error(op, Some(0), msg);
            return Err(self.fail(e));
        }
        Ok(f.payload)
    }

    /// Starts a collective: the stored failure, if any, and the next sequence number.
    pub(crate) fn begin(&mut self) -> CommResult<()> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        self.seq += 1;
        Ok(())
    }

    pub(crate) fn all_reduce<T: Elem>(&mut self, op: u8, data: &mut [T]) -> CommResult<()> {
        self.begin()?;
        if self.world == 1 {
            return Ok(());
        }
        let n = data.len();
        if self.rank != 0 {
            let got = self.exchange(op, n, 0, &encode(data), n * T::BYTES)?;
            decode_into(&got, data);
            return Ok(());
        }
        let parts = self.gather_parts(op, n, 0)?;
        for p in &parts {
            add_into(data, p);
        }
        let bytes = encode(data);
        self.scatter_results(op, n, 0, |_| &bytes)
    }
}

#[path = "tcp_collectives.rs"]
mod collectives;

impl Drop for TcpComm {
    fn drop(&mut self) {
        self._heartbeat = None;
        self.links.iter().for_each(|l| l.close(true));
    }
}
