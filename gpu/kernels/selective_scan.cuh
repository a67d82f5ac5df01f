// Parameter structs of the selective_scan kernels, one per kernel, passed by value.
// GENERATED from gpu/src/ops/selective_scan.rs (kernel_params!): do not edit; after changing a
// struct there, run `VET_WRITE_CUH=1 cargo test -p gpu --lib cuh` to rewrite this file.

typedef struct {
    const float* u;
    const float* delta;
    const float* a_log;
    const float* xbc;
    long ldbc;
    long col_b;
    const float* dvec;
    const float* z;
    long ldz;
    const float* dt_bias;
    const int* starts;
} ScanInF32;
#define SCAN_IN_F32_ARGS(p) (p).u, (p).delta, (p).a_log, (p).xbc, (p).ldbc, (p).col_b, (p).dvec, (p).z, (p).ldz, (p).dt_bias, (p).starts

typedef struct {
    ScanInF32 scan;
    const float* h0;
    float* out;
    float* chunk_states;
    float* last;
    long batch;
    long seq_len;
    long d_inner;
    long d_state;
    u16* out_lp;
    int lp_mode;
    long seg_len;
    float* seg_p;
    float* seg_q;
    int seg_pass;
} SelectiveScanFwdF32;
#define SELECTIVE_SCAN_FWD_F32_ARGS(p) SCAN_IN_F32_ARGS((p).scan), (p).h0, (p).out, (p).chunk_states, (p).last, (p).batch, (p).seq_len, (p).d_inner, (p).d_state, (p).out_lp, (p).lp_mode, (p).seg_len, (p).seg_p, (p).seg_q, (p).seg_pass

typedef struct {
    ScanInF32 scan;
    const float* chunk_states;
    const float* dout;
    float* du_out;
    float* ddelta_out;
    float* dz_out;
    long ldz_out;
    float* part_bc;
    float* part_a;
    float* part_d;
    float* part_db;
    const float* dh_last;
    float* dh0;
    long batch;
    long seq_len;
    long d_inner;
    long d_state;
    u16* gated_lp;
    u16* ddelta_lp;
    u16* dz_lp;
    int lp_mode;
    long seg_len;
    float* seg_p;
    float* seg_q;
} SelectiveScanBwdF32;
#define SELECTIVE_SCAN_BWD_F32_ARGS(p) SCAN_IN_F32_ARGS((p).scan), (p).chunk_states, (p).dout, (p).du_out, (p).ddelta_out, (p).dz_out, (p).ldz_out, (p).part_bc, (p).part_a, (p).part_d, (p).part_db, (p).dh_last, (p).dh0, (p).batch, (p).seq_len, (p).d_inner, (p).d_state, (p).gated_lp, (p).ddelta_lp, (p).dz_lp, (p).lp_mode, (p).seg_len, (p).seg_p, (p).seg_q

typedef struct {
    const float* part_bc;
    long n_blocks;
    long rows;
    long d_state;
    float* out;
    long ldo;
} ScanReduceBcF32;
#define SCAN_REDUCE_BC_F32_ARGS(p) (p).part_bc, (p).n_blocks, (p).rows, (p).d_state, (p).out, (p).ldo

typedef struct {
    const float* part;
    long batch;
    long m;
    float* dst;
    const float* a_log;
} ScanReduceBatchF32;
#define SCAN_REDUCE_BATCH_F32_ARGS(p) (p).part, (p).batch, (p).m, (p).dst, (p).a_log
