// Parameter structs of the norm kernels, one per kernel, passed by value.
// GENERATED from gpu/src/ops/norm.rs (kernel_params!): do not edit; after changing a
// struct there, run `VET_WRITE_CUH=1 cargo test -p gpu --lib cuh` to rewrite this file.

typedef struct {
    const float* x_in;
    const float* add;
    float* x_out;
    float* y;
    float* mean_out;
    float* rstd_out;
    const float* w;
    const float* b;
    long d;
    float eps;
    int is_layer;
    u16* y_lp;
    int lp_mode;
    u16* x_out_lp;
} NormFwdF32;
#define NORM_FWD_F32_ARGS(p) (p).x_in, (p).add, (p).x_out, (p).y, (p).mean_out, (p).rstd_out, (p).w, (p).b, (p).d, (p).eps, (p).is_layer, (p).y_lp, (p).lp_mode, (p).x_out_lp

typedef struct {
    const float* x;
    const float* w;
    const float* mean_in;
    const float* rstd_in;
    const float* dy;
    float* dx_out;
    long d;
    int is_layer;
    int accum;
} NormBwdDxF32;
#define NORM_BWD_DX_F32_ARGS(p) (p).x, (p).w, (p).mean_in, (p).rstd_in, (p).dy, (p).dx_out, (p).d, (p).is_layer, (p).accum

typedef struct {
    const float* x;
    const float* mean_in;
    const float* rstd_in;
    const float* dy;
    long rows;
    long d;
    long rows_per;
    float* part_w;
    float* part_b;
} NormBwdDwPartialF32;
#define NORM_BWD_DW_PARTIAL_F32_ARGS(p) (p).x, (p).mean_in, (p).rstd_in, (p).dy, (p).rows, (p).d, (p).rows_per, (p).part_w, (p).part_b
