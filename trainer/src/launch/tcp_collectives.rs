//! The five collectives of [`Comm`] on [`TcpComm`]'s star.

use reference::comm::{world_multiple_mismatch, Comm, CommResult};

use super::{
    add_into, decode_into, encode, TcpComm, OP_ALL_GATHER, OP_ALL_REDUCE, OP_ALL_REDUCE_F64,
    OP_BARRIER, OP_BROADCAST, OP_REDUCE_SCATTER,
};

impl Comm for TcpComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&mut self, data: &mut [f32]) -> CommResult<()> {
        self.all_reduce(OP_ALL_REDUCE, data)
    }

    fn all_reduce_sum_f64(&mut self, data: &mut [f64]) -> CommResult<()> {
        self.all_reduce(OP_ALL_REDUCE_F64, data)
    }

    fn reduce_scatter_sum(&mut self, input: &[f32], output: &mut [f32]) -> CommResult<()> {
        let op = OP_REDUCE_SCATTER;
        self.begin()?;
        let n = output.len();
        if let Some(msg) =
            world_multiple_mismatch(("input", input.len()), self.world, ("output", n))
        {
            return Err(self.local_error(op, msg));
        }
        if self.world == 1 {
            // The sum over one rank: the input, not encoded and copied twice.
            output.copy_from_slice(input);
            return Ok(());
        }
        if self.rank != 0 {
            let got = self.exchange(op, n, 0, &encode(input), n * 4)?;
            decode_into(&got, output);
            return Ok(());
        }
        let parts = self.gather_parts(op, n, 0)?;
        let mut sum = input.to_vec();
        for p in &parts {
            add_into(&mut sum, p);
        }
        let bytes = encode(&sum);
        self.scatter_results(op, n, 0, |peer| &bytes[peer * n * 4..(peer + 1) * n * 4])?;
        output.copy_from_slice(&sum[..n]);
        Ok(())
    }

    fn all_gather(&mut self, input: &[f32], output: &mut [f32]) -> CommResult<()> {
        let op = OP_ALL_GATHER;
        self.begin()?;
        let n = input.len();
        if let Some(msg) =
            world_multiple_mismatch(("output", output.len()), self.world, ("input", n))
        {
            return Err(self.local_error(op, msg));
        }
        if self.world == 1 {
            output.copy_from_slice(input);
            return Ok(());
        }
        if self.rank != 0 {
            let got = self.exchange(op, n, 0, &encode(input), output.len() * 4)?;
            decode_into(&got, output);
            return Ok(());
        }
        let parts = self.gather_parts(op, n, 0)?;
        output[..n].copy_from_slice(input);
        for (i, p) in parts.iter().enumerate() {
            decode_into(p, &mut output[(i + 1) * n..(i + 2) * n]);
        }
        let bytes = encode(output);
        self.scatter_results(op, n, 0, |_| &bytes)
    }

    fn broadcast(&mut self, data: &mut [u8], root: usize) -> CommResult<()> {
        let op = OP_BROADCAST;
        self.begin()?;
        if root >= self.world {
            let msg = format!("root {root} is not a rank of world {}", self.world);
            return Err(self.local_error(op, msg));
        }
        let n = data.len();
        if self.rank != 0 {
            // The root sends its bytes; the others only say they are here, with their length.
            let part: &[u8] = if self.rank == root { data } else { &[] };
            let want = if self.rank == root { 0 } else { n };
            let got = self.exchange(op, n, root, part, want)?;
            if self.rank != root {
                data.copy_from_slice(&got);
            }
            return Ok(());
        }
        let parts = self.gather_parts(op, n, root)?;
        if root != 0 {
            let from = &parts[root - 1];
            if from.len() != n {
                let msg = format!("root {root} sent {} bytes for {n}", from.len());
                return Err(self.local_error(op, msg));
            }
            data.copy_from_slice(from);
        }
        let bytes: &[u8] = data;
        self.scatter_results(op, n, root, |peer| if peer == root { &[] } else { bytes })
    }

    fn barrier(&mut self) -> CommResult<()> {
        let op = OP_BARRIER;
        self.begin()?;
        if self.world == 1 {
            return Ok(());
        }
        if self.rank != 0 {
            self.exchange(op, 0, 0, &[], 0)?;
            return Ok(());
        }
        self.gather_parts(op, 0, 0)?;
        self.scatter_results(op, 0, 0, |_| &[])
    }
}
