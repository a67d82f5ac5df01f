//! `RankEnv` from maps that stand for each launcher's environment.

use std::collections::HashMap;

use super::{Launcher, RankEnv, DEFAULT_PORT};

fn vars(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn env(pairs: &[(&str, &str)]) -> RankEnv {
    RankEnv::from_map(&vars(pairs)).unwrap_or_else(|e| panic!("{pairs:?}: {e}"))
}

/// The error's text, which must name `var`.
fn error(pairs: &[(&str, &str)], var: &str) -> String {
    let e = RankEnv::from_map(&vars(pairs)).expect_err(&format!("{pairs:?} should be refused"));
    assert_eq!(e.var, var, "{pairs:?}: {e}");
    let text = e.to_string();
    assert!(text.starts_with(var), "{text}");
    text
}

#[test]
fn no_launcher_is_one_process() {
    let e = env(&[("PATH", "/bin"), ("HOME", "/root")]);
    assert_eq!(e, RankEnv::single());
    assert!(!e.is_distributed());
}

#[test]
fn torchrun_variables() {
    let e = env(&[
        ("RANK", "5"),
        ("WORLD_SIZE", "8"),
        ("LOCAL_RANK", "1"),
        ("LOCAL_WORLD_SIZE", "4"),
        ("MASTER_ADDR", "node-a"),
        ("MASTER_PORT", "29612"),
    ]);
    assert_eq!((e.rank, e.world, e.local_rank), (5, 8, 1));
    assert_eq!(e.master(), "node-a:29612");
    assert_eq!(e.launcher, Launcher::Torchrun);
    assert!(e.is_distributed());
}

#[test]
fn slurm_variables_take_the_first_host_of_the_node_list() {
    let e = env(&[
        ("SLURM_PROCID", "6"),
        ("SLURM_NTASKS", "16"),
        ("SLURM_LOCALID", "2"),
        ("SLURM_JOB_NODELIST", "gpu[03-04,07],cpu5"),
        ("SLURM_JOB_ID", "123456"),
    ]);
    assert_eq!((e.rank, e.world, e.local_rank), (6, 16, 2));
    assert_eq!(e.master_addr, "gpu03");
    assert_eq!(e.master_port, 20000 + (123456 % 20000) as u16);
    assert_eq!(e.launcher, Launcher::Slurm);
    // MASTER_ADDR / MASTER_PORT override what SLURM implies.
    let e = env(&[
        ("SLURM_PROCID", "0"),
        ("SLURM_NTASKS", "2"),
        ("SLURM_LOCALID", "0"),
        ("SLURM_JOB_NODELIST", "gpu[03-04]"),
        ("MASTER_ADDR", "10.0.0.9"),
        ("MASTER_PORT", "4000"),
    ]);
    assert_eq!(e.master(), "10.0.0.9:4000");
}

#[test]
fn open_mpi_variables_need_a_master_address() {
    let e = env(&[
        ("OMPI_COMM_WORLD_RANK", "3"),
        ("OMPI_COMM_WORLD_SIZE", "4"),
        ("OMPI_COMM_WORLD_LOCAL_RANK", "3"),
        ("MASTER_ADDR", "fe80::1"),
    ]);
    assert_eq!((e.rank, e.world, e.local_rank), (3, 4, 3));
    assert_eq!(e.master(), format!("[fe80::1]:{DEFAULT_PORT}"));
    assert_eq!(e.launcher, Launcher::OpenMpi);
    let t = error(
        &[
            ("OMPI_COMM_WORLD_RANK", "1"),
            ("OMPI_COMM_WORLD_SIZE", "4"),
            ("OMPI_COMM_WORLD_LOCAL_RANK", "1"),
        ],
        "MASTER_ADDR",
    );
    assert!(t.contains("mpirun -x MASTER_ADDR"), "{t}");
}

#[test]
fn torchrun_wins_over_slurm_under_srun_torchrun() {
    // `srun torchrun`: one SLURM task per node, torchrun's values per process.
    let e = env(&[
        ("SLURM_PROCID", "1"),
        ("SLURM_NTASKS", "2"),
        ("SLURM_LOCALID", "0"),
        ("SLURM_JOB_NODELIST", "gpu[1-2]"),
        ("RANK", "9"),
        ("WORLD_SIZE", "16"),
        ("LOCAL_RANK", "1"),
        ("MASTER_ADDR", "gpu1"),
        ("MASTER_PORT", "29500"),
    ]);
    assert_eq!((e.rank, e.world, e.launcher), (9, 16, Launcher::Torchrun));
}

#[test]
fn a_world_of_one_needs_no_master() {
    let e = env(&[("RANK", "0"), ("WORLD_SIZE", "1")]);
    assert_eq!((e.rank, e.world, e.local_rank), (0, 1, 0));
    let e = env(&[("SLURM_PROCID", "0"), ("SLURM_NTASKS", "1")]);
    assert_eq!((e.world, e.launcher), (1, Launcher::Slurm));
}

const TR: [(&str, &str); 5] = [
    ("RANK", "1"),
    ("WORLD_SIZE", "4"),
    ("LOCAL_RANK", "1"),
    ("MASTER_ADDR", "127.0.0.1"),
    ("MASTER_PORT", "29500"),
];

/// The torchrun set with `var` replaced (or removed when `value` is None).
fn torchrun_with(var: &str, value: Option<&str>) -> Vec<(&'static str, String)> {
    let mut v: Vec<(&str, String)> = TR
        .iter()
        .filter(|(k, _)| *k != var)
        .map(|(k, v)| (*k, v.to_string()))
        .collect();
    if let Some(value) = value {
        let k = TR
            .iter()
            .map(|p| p.0)
            .find(|k| *k == var)
            .unwrap_or("LOCAL_WORLD_SIZE");
        v.push((k, value.to_string()));
    }
    v
}

#[test]
fn malformed_and_contradictory_values_name_the_variable() {
    let cases: [(&str, Option<&str>, &str); 12] = [
        ("RANK", Some("4"), "not below WORLD_SIZE=4"),
        ("RANK", Some("-1"), "non-negative integer"),
        ("RANK", None, "not set"),
        ("WORLD_SIZE", Some("0"), "at least 1"),
        ("WORLD_SIZE", Some("four"), "non-negative integer"),
        ("LOCAL_RANK", Some("2"), "above the global rank RANK=1"),
        ("LOCAL_RANK", None, "not set"),
        ("MASTER_ADDR", None, "not set"),
        ("MASTER_ADDR", Some(" "), "host name or address"),
        ("MASTER_PORT", Some("70000"), "1..=65535"),
        ("MASTER_PORT", None, "not set"),
        ("LOCAL_WORLD_SIZE", Some("1"), "contradicts LOCAL_RANK=1"),
    ];
    for (var, value, want) in cases {
        let owned = torchrun_with(var, value);
        let pairs: Vec<(&str, &str)> = owned.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let t = error(&pairs, var);
        assert!(t.contains(want), "{var}={value:?}: {t}");
    }
}

#[test]
fn malformed_slurm_values_name_the_variable() {
    let base = [
        ("SLURM_PROCID", "0"),
        ("SLURM_NTASKS", "4"),
        ("SLURM_LOCALID", "0"),
    ];
    let with = |extra: &[(&'static str, &'static str)]| {
        let mut v = base.to_vec();
        v.extend_from_slice(extra);
        v
    };
    let t = error(
        &with(&[("SLURM_JOB_NODELIST", "gpu[01-04")]),
        "SLURM_JOB_NODELIST",
    );
    assert!(t.contains("never closed"), "{t}");
    let t = error(&with(&[]), "SLURM_NODELIST");
    assert!(t.contains("not set"), "{t}");
    let t = error(
        &with(&[("SLURM_JOB_NODELIST", "a1"), ("SLURM_JOB_ID", "x")]),
        "SLURM_JOB_ID",
    );
    assert!(t.contains("job number"), "{t}");
    let t = error(
        &[
            ("SLURM_PROCID", "4"),
            ("SLURM_NTASKS", "4"),
            ("SLURM_LOCALID", "0"),
        ],
        "SLURM_PROCID",
    );
    assert!(t.contains("not below SLURM_NTASKS=4"), "{t}");
}
