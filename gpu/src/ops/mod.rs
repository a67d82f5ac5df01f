//! One module per kernel file: `ops/<op>.rs` holds the typed parameter structs and the one
//! launcher of every kernel in `gpu/kernels/<op>.cu` (the structs' C twins are generated into
//! `gpu/kernels/<op>.cuh`). The engine and the conformance suite launch through these alone.
//! [`check::OpDev`] runs single ops on host data for the conformance suite.

pub mod adamw;
pub mod check;
pub mod conv1d;
pub mod decode;
pub mod decode_layers;
pub mod elementwise;
pub mod embedding;
pub mod loss;
pub mod norm;
pub mod selective_scan;

pub use check::{OpDev, PAD, SENTINEL};

/// Every kernel, for [`crate::cuda::Dev::open`] to look up and check.
pub fn all_kernels() -> Vec<crate::params::KernelInfo> {
    [
        elementwise::kernels(),
        embedding::kernels(),
        norm::kernels(),
        conv1d::kernels(),
        selective_scan::kernels(),
        decode::kernels(),
        decode_layers::kernels(),
        loss::kernels(),
        adamw::kernels(),
    ]
    .concat()
}

/// Each generated `.cuh`: (file name under `gpu/kernels/`, its text).
pub fn generated_cuh() -> Vec<(&'static str, String)> {
    vec![
        ("elementwise.cuh", elementwise::params_cuh()),
        ("embedding.cuh", embedding::params_cuh()),
        ("norm.cuh", norm::params_cuh()),
        ("conv1d.cuh", conv1d::params_cuh()),
        ("selective_scan.cuh", selective_scan::params_cuh()),
        ("decode.cuh", decode::params_cuh()),
        ("decode_layers.cuh", decode_layers::params_cuh()),
        ("loss.cuh", loss::params_cuh()),
        ("adamw.cuh", adamw::params_cuh()),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each `.cuh` as committed (and compiled into the kernels), embedded at build time so the
    /// check also runs where the sources are not (the GPU machine).
    const COMMITTED: [(&str, &str); 9] = [
        (
            "elementwise.cuh",
            include_str!("../../kernels/elementwise.cuh"),
        ),
        ("embedding.cuh", include_str!("../../kernels/embedding.cuh")),
        ("norm.cuh", include_str!("../../kernels/norm.cuh")),
        ("conv1d.cuh", include_str!("../../kernels/conv1d.cuh")),
        (
            "selective_scan.cuh",
            include_str!("../../kernels/selective_scan.cuh"),
        ),
        ("decode.cuh", include_str!("../../kernels/decode.cuh")),
        (
            "decode_layers.cuh",
            include_str!("../../kernels/decode_layers.cuh"),
        ),
        ("loss.cuh", include_str!("../../kernels/loss.cuh")),
        ("adamw.cuh", include_str!("../../kernels/adamw.cuh")),
    ];

    /// The committed `.cuh` files are the ones the Rust structs generate (the kernels are
    /// compiled against the committed files). `VET_WRITE_CUH=1` rewrites them.
    #[test]
    fn cuh_files_match_the_rust_param_structs() {
        let generated = generated_cuh();
        if std::env::var_os("VET_WRITE_CUH").is_some_and(|v| v == "1") {
            let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels");
            for (name, text) in &generated {
                std::fs::write(dir.join(name), text).unwrap();
            }
            return;
        }
        assert_eq!(generated.len(), COMMITTED.len());
        let stale: Vec<&str> = generated
            .iter()
            .zip(COMMITTED)
            .filter(|((name, text), (committed_name, committed))| {
                name != committed_name || text != committed
            })
            .map(|((name, _), _)| *name)
            .collect();
        assert!(
            stale.is_empty(),
            "gpu/kernels/{stale:?} differ from the structs in gpu/src/ops; rewrite them with \
             `VET_WRITE_CUH=1 cargo test -p gpu --lib cuh`"
        );
    }

    #[test]
    fn every_kernel_is_listed_once() {
        let k = all_kernels();
        let mut names: Vec<&str> = k.iter().map(|i| i.name).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), k.len());
        assert_eq!(k.len(), 43);
    }

    #[test]
    fn macro_names_split_words() {
        assert_eq!(crate::params::macro_name("Conv1dFwdF32"), "CONV1D_FWD_F32");
        assert_eq!(crate::params::macro_name("ScanInF32"), "SCAN_IN_F32");
    }

    #[test]
    fn nested_structs_unpack_in_order() {
        let c = <decode::ConvUpdateF32 as crate::params::KernelParams>::c_struct();
        assert!(c.contains("    ConvInF32 conv;\n"), "{c}");
        assert!(
            c.contains("#define CONV_UPDATE_F32_ARGS(p) CONV_IN_F32_ARGS((p).conv), (p).window,"),
            "{c}"
        );
        assert_eq!(
            std::mem::size_of::<decode::ConvUpdateF32>(),
            5 * 8 + 3 * 8 + 8 + 2 * 8
        );
    }
}
