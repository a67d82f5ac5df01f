//! The on-disk kernel cache: a build is compiled once and read back after, a damaged entry
//! is compiled again and rewritten, and a folder that cannot be written costs a warning, not
//! an error. Needs NVRTC (on the device: `bash scripts/gpu-tests.sh run`); without it the test
//! prints a `skipping` line and passes.

use gpu::kernels::{cache_header, compile_cached, KernelShape};

#[test]
fn gpu_kernel_cache_compiles_once_and_survives_damage() {
    if let Err(e) = gpu::cuda::probe_libraries() {
        println!("skipping gpu_kernel_cache_compiles_once_and_survives_damage: {e}");
        return;
    }
    let dir = std::env::temp_dir().join(format!("vet-kernel-cache-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let cc = (9, 0);
    let shape = KernelShape {
        d_state_pad: 16,
        d_conv: 4,
        chunk: 32,
    };
    let (ptx, from_disk) = compile_cached(Some(&dir), cc, shape).unwrap();
    assert!(!from_disk, "an empty cache cannot supply the kernels");
    assert!(
        ptx.contains(".entry ssm_update_f32"),
        "the PTX lacks a kernel"
    );
    let (name, header) = cache_header(cc, shape);
    let path = dir.join(&name);
    let stored = std::fs::read_to_string(&path).unwrap();
    assert_eq!(stored, format!("{header}{ptx}"));

    let (again, from_disk) = compile_cached(Some(&dir), cc, shape).unwrap();
    assert!(from_disk, "the second build must come from the cache");
    assert_eq!(again, ptx);

    // Another shape is another entry.
    let other = KernelShape { d_conv: 3, ..shape };
    assert_ne!(cache_header(cc, other).0, name);

    // A truncated entry (the header survives, the PTX does not) is compiled again.
    std::fs::write(&path, &header).unwrap();
    let (fixed, from_disk) = compile_cached(Some(&dir), cc, shape).unwrap();
    assert!(!from_disk, "a damaged entry was used");
    assert_eq!(fixed, ptx);
    assert_eq!(std::fs::read_to_string(&path).unwrap(), stored);
    // No temporary files are left behind.
    let left: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left.len(), 1, "{left:?}");

    // A cache folder that cannot exist (below a regular file): compiled, not an error.
    let blocker = dir.join("a-file");
    std::fs::write(&blocker, b"x").unwrap();
    let (p, from_disk) = compile_cached(Some(&blocker.join("cache")), cc, shape).unwrap();
    assert!(!from_disk);
    assert_eq!(p, ptx);
    let _ = std::fs::remove_dir_all(&dir);
}
