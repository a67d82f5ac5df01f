//! The decode row kernels on their own, with the weights in cache: a `[rows, k]` matrix small
//! enough for L2 is multiplied by `n` activation rows over and over, on one thread, so the
//! figure is the kernel's arithmetic rate (GMAC/s: weight × activation products per second)
//! and not the memory's. A decode step streams its weights from DRAM; where a batch's
//! arithmetic no longer hides under that stream (a batch of 8 on a core shared with another
//! thread), this rate sets the step's time.
//!
//! ```sh
//! cargo bench -p simd --bench tiles -- --dtypes int8,int4 --batches 1,4,8,16
//! ```

use std::time::Instant;

use simd::kernels::{dot_rows_batch, Isa};
use simd::weights::Mat;

mod common;
use common::{machine, Fill};

#[derive(clap::Parser)]
struct Args {
    /// Weight rows.
    #[arg(long, default_value_t = 256)]
    rows: usize,
    /// Columns (the product's length).
    #[arg(long, default_value_t = 2048)]
    k: usize,
    /// Comma-separated weight formats (f32, bf16, int8, int4).
    #[arg(long, default_value = "f32,bf16,int8,int4", value_delimiter = ',')]
    dtypes: Vec<simd::WeightDtype>,
    /// Comma-separated activation rows.
    #[arg(long, default_value = "1,4,8,16", value_delimiter = ',')]
    batches: Vec<usize>,
    /// Seconds per measurement (the best of five slices of it is reported).
    #[arg(long, default_value_t = 1.0)]
    seconds: f64,
    /// Added by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

fn main() {
    let a = <Args as clap::Parser>::parse();
    let isa = Isa::detect();
    println!(
        "one thread of {}; weights [{}, {}] in cache",
        machine(),
        a.rows,
        a.k
    );
    let w = Fill(7).vec(a.rows * a.k, 1.0);
    println!("| weights | batch | GMAC/s |");
    println!("|---|---|---|");
    for &dt in &a.dtypes {
        let mat = Mat::from_f32(a.rows, a.k, w.clone(), dt);
        for &n in &a.batches {
            let x = Fill(11 + n as u64).vec(n * a.k, 1.0);
            let mut y = vec![0f32; n * a.rows];
            let mut put = |b: usize, i: usize, v: f32| y[b * a.rows + i] = v;
            let mut best = f64::INFINITY;
            for _ in 0..5 {
                let t = Instant::now();
                let mut reps = 0u64;
                while t.elapsed().as_secs_f64() < a.seconds / 5.0 {
                    dot_rows_batch(isa, mat.view(), 0, a.rows, &x, a.k, &mut put);
                    reps += 1;
                }
                best = best.min(t.elapsed().as_secs_f64() / reps as f64);
            }
            let macs = (n * a.rows * a.k) as f64;
            println!("| {dt:?} | {n} | {:.1} |", macs / best / 1e9);
        }
    }
}
