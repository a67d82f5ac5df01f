//! `gpu::comm::Nccl` at world size 1 on GPU 0: every collective of `reference::comm::Comm`
//! on random data, and the ZeRO driver's lengths errors. Needs a CUDA device and libnccl (on
//! the device: `bash scripts/gpu-tests.sh run`); without them the test prints a `skipping`
//! line and passes.

use gpu::comm::{unique_id, Nccl};
use reference::comm::Comm;
use reference::rng::Rng;

fn vals(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = Rng::new(seed);
    (0..n).map(|_| rng.uniform(-2.0, 2.0) as f32).collect()
}

#[test]
fn gpu_nccl_world_one_collectives() {
    if let Err(e) = gpu::available() {
        println!("skipping gpu_nccl_world_one_collectives: {e}");
        return;
    }
    let id = match unique_id() {
        Ok(id) => id,
        Err(e) => {
            println!("skipping gpu_nccl_world_one_collectives: {e}");
            return;
        }
    };
    let mut c = Nccl::new(0, 1, &id, 0).unwrap();
    assert_eq!((c.rank(), c.world()), (0, 1));

    let want = vals(10_007, 1);
    let mut d = want.clone();
    c.all_reduce_sum(&mut d).unwrap();
    assert_eq!(d, want, "a sum over one rank is the input");

    let mut f = vec![1.25f64, -3.5, 1e300];
    c.all_reduce_sum_f64(&mut f).unwrap();
    assert_eq!(f, vec![1.25, -3.5, 1e300]);

    let input = vals(777, 2);
    let mut out = vec![0.0f32; 777];
    c.reduce_scatter_sum(&input, &mut out).unwrap();
    assert_eq!(out, input);

    let mut gathered = vec![0.0f32; 777];
    c.all_gather(&input, &mut gathered).unwrap();
    assert_eq!(gathered, input);

    let mut bytes: Vec<u8> = (0..=255).collect();
    c.broadcast(&mut bytes, 0).unwrap();
    assert_eq!(bytes, (0..=255).collect::<Vec<u8>>());
    c.barrier().unwrap();

    // Lengths that do not fit are an error, not a crash.
    let mut small = vec![0.0f32; 3];
    assert!(c.reduce_scatter_sum(&input, &mut small).is_err());
    assert!(c.all_gather(&input, &mut small).is_err());
    assert!(c.broadcast(&mut bytes, 1).is_err());
}
