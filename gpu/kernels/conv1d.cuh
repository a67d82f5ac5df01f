// Parameter structs of the conv1d kernels, one per kernel, passed by value.
// GENERATED from gpu/src/ops/conv1d.rs (kernel_params!): do not edit; after changing a
// struct there, run `VET_WRITE_CUH=1 cargo test -p gpu --lib cuh` to rewrite this file.

typedef struct {
    const float* x;
    long ldx;
    const float* w;
    const float* bias;
    const int* starts;
} ConvInF32;
#define CONV_IN_F32_ARGS(p) (p).x, (p).ldx, (p).w, (p).bias, (p).starts

typedef struct {
    ConvInF32 conv;
    const float* init;
    float* u;
    float* xs;
    long batch;
    long seq_len;
    long d_inner;
    u16* xs_lp;
    int lp_mode;
} Conv1dFwdF32;
#define CONV1D_FWD_F32_ARGS(p) CONV_IN_F32_ARGS((p).conv), (p).init, (p).u, (p).xs, (p).batch, (p).seq_len, (p).d_inner, (p).xs_lp, (p).lp_mode

typedef struct {
    const float* x;
    long ldx;
    const int* starts;
    const float* init;
    float* last;
    long batch;
    long seq_len;
    long d_inner;
} Conv1dLastF32;
#define CONV1D_LAST_F32_ARGS(p) (p).x, (p).ldx, (p).starts, (p).init, (p).last, (p).batch, (p).seq_len, (p).d_inner

typedef struct {
    const float* du;
    const float* w;
    const int* starts;
    float* dx;
    long ldx;
    long batch;
    long seq_len;
    long d_inner;
    const float* u;
    float* g_out;
    u16* dx_lp;
    int lp_mode;
    const float* d_last;
} Conv1dBwdDxF32;
#define CONV1D_BWD_DX_F32_ARGS(p) (p).du, (p).w, (p).starts, (p).dx, (p).ldx, (p).batch, (p).seq_len, (p).d_inner, (p).u, (p).g_out, (p).dx_lp, (p).lp_mode, (p).d_last

typedef struct {
    const float* du;
    const float* w;
    const int* starts;
    float* dinit;
    long batch;
    long seq_len;
    long d_inner;
} Conv1dBwdInitF32;
#define CONV1D_BWD_INIT_F32_ARGS(p) (p).du, (p).w, (p).starts, (p).dinit, (p).batch, (p).seq_len, (p).d_inner

typedef struct {
    const float* x;
    long ldx;
    const float* du;
    const int* starts;
    const float* init;
    long batch;
    long seq_len;
    long d_inner;
    long rows_per;
    float* part_w;
    float* part_b;
} Conv1dBwdDwPartialF32;
#define CONV1D_BWD_DW_PARTIAL_F32_ARGS(p) (p).x, (p).ldx, (p).du, (p).starts, (p).init, (p).batch, (p).seq_len, (p).d_inner, (p).rows_per, (p).part_w, (p).part_b

typedef struct {
    const float* d_last;
    const int* starts;
    float* dx;
    long ldx;
    float* dinit;
    long batch;
    long seq_len;
    long d_inner;
} Conv1dLastBwdF32;
#define CONV1D_LAST_BWD_F32_ARGS(p) (p).d_last, (p).starts, (p).dx, (p).ldx, (p).dinit, (p).batch, (p).seq_len, (p).d_inner
