//! `vet-train launch`'s flags and defaults, and the GPU count.

use anyhow::bail;

use super::{plan, LaunchArgs, Plan};
use crate::launch::count_from;

fn args(command: &[&str]) -> LaunchArgs {
    LaunchArgs {
        nproc_per_node: None,
        nnodes: 1,
        node_rank: 0,
        master_addr: None,
        master_port: None,
        stop_grace_s: 30.0,
        command: command.iter().map(|s| s.to_string()).collect(),
    }
}

#[test]
fn one_rank_on_the_cpu_and_every_gpu_with_cuda() {
    let no_gpu = || bail!("no GPU should be counted for a CPU run");
    let p = plan(&args(&["--config", "a.toml"]), no_gpu).unwrap();
    assert_eq!((p.nproc, p.world, p.first_rank), (1, 1, 0));
    assert_eq!(p.master_addr, "127.0.0.1");
    for cuda in [&["--device", "cuda"][..], &["--device=cuda:0"][..]] {
        let p = plan(&args(cuda), || Ok(8)).unwrap();
        assert_eq!((p.nproc, p.world), (8, 8), "{cuda:?}");
    }
    let e = plan(&args(&["--device", "cuda"]), || Ok(0)).unwrap_err();
    assert!(e.to_string().contains("--nproc-per-node"), "{e}");
}

#[test]
fn several_nodes_need_the_master_address() {
    let mut a = args(&["--device", "cuda"]);
    a.nnodes = 2;
    a.node_rank = 1;
    a.nproc_per_node = Some(4);
    let e = plan(&a, || Ok(4)).unwrap_err();
    assert!(e.to_string().contains("--master-addr"), "{e}");
    a.master_addr = Some("node0".into());
    let p = plan(&a, || Ok(4)).unwrap();
    assert_eq!(
        p,
        Plan {
            nproc: 4,
            world: 8,
            first_rank: 4,
            master_addr: "node0".into(),
            master_port: 29500,
        }
    );
    a.node_rank = 2;
    assert!(plan(&a, || Ok(4))
        .unwrap_err()
        .to_string()
        .contains("--node-rank 2"));
    a.node_rank = 0;
    a.nproc_per_node = Some(0);
    assert!(plan(&a, || Ok(4))
        .unwrap_err()
        .to_string()
        .contains("--nproc-per-node 0"));
}

#[test]
fn the_gpu_count_follows_cuda_visible_devices_then_the_driver() {
    let none = std::path::Path::new("/nonexistent/nvidia/gpus");
    assert_eq!(count_from(Some("0,1,3"), none).unwrap(), 3);
    assert_eq!(count_from(Some("GPU-8a1b,GPU-77c2"), none).unwrap(), 2);
    assert_eq!(count_from(Some("2,-1,3"), none).unwrap(), 1);
    assert_eq!(count_from(Some(""), none).unwrap(), 0);
    let e = count_from(None, none).unwrap_err().to_string();
    assert!(
        e.contains("--nproc-per-node") && e.contains("/nonexistent"),
        "{e}"
    );
    let dir = std::env::temp_dir().join(format!("vet-gpus-{}", std::process::id()));
    for bus in ["0000:01:00.0", "0000:41:00.0", "0000:81:00.0"] {
        std::fs::create_dir_all(dir.join(bus)).unwrap();
    }
    assert_eq!(count_from(None, &dir).unwrap(), 3);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_collective_error_blames_the_rank_it_names() {
    use super::run::blamed;
    let survivor = "error: rank 2 round 1: rank 2: all_reduce_sum (rank 1): the job failed: …";
    assert_eq!(blamed(survivor), Some(1));
    assert_eq!(
        blamed("error: rank 0: barrier (rank 13): rank 13 failed"),
        Some(13)
    );
    assert_eq!(blamed("error: out of memory"), None);
    assert_eq!(blamed("(rank x)"), None);
}
