// Parameter structs of the decode kernels, one per kernel, passed by value.
// GENERATED from gpu/src/ops/decode.rs (kernel_params!): do not edit; after changing a
// struct there, run `VET_WRITE_CUH=1 cargo test -p gpu --lib cuh` to rewrite this file.

typedef struct {
    ConvInF32 conv;
    float* window;
    float* xs;
    u16* xs_lp;
    int lp_mode;
    long batch;
    long d_inner;
} ConvUpdateF32;
#define CONV_UPDATE_F32_ARGS(p) CONV_IN_F32_ARGS((p).conv), (p).window, (p).xs, (p).xs_lp, (p).lp_mode, (p).batch, (p).d_inner

typedef struct {
    ScanInF32 scan;
    float* h_state;
    float* out;
    u16* out_lp;
    int lp_mode;
    long batch;
    long d_inner;
    long d_state;
} SsmUpdateF32;
#define SSM_UPDATE_F32_ARGS(p) SCAN_IN_F32_ARGS((p).scan), (p).h_state, (p).out, (p).out_lp, (p).lp_mode, (p).batch, (p).d_inner, (p).d_state

typedef struct {
    const float* logits;
    long vocab;
    const unsigned int* tokens;
    const unsigned char* how;
    unsigned char* seen;
    unsigned int* ids;
} SampleRowsF32;
#define SAMPLE_ROWS_F32_ARGS(p) (p).logits, (p).vocab, (p).tokens, (p).how, (p).seen, (p).ids

typedef struct {
    const u16* w;
    long ldw;
    const signed char* wq;
    const float* ws;
    const u16* x_lp;
    const float* x_f32;
    long ldx;
    float* y;
    long ldy;
    long n_out;
    long k;
    long rows;
    int split;
    int vec;
    int lp_mode;
} GemvLp;
#define GEMV_LP_ARGS(p) (p).w, (p).ldw, (p).wq, (p).ws, (p).x_lp, (p).x_f32, (p).ldx, (p).y, (p).ldy, (p).n_out, (p).k, (p).rows, (p).split, (p).vec, (p).lp_mode

typedef struct {
    GemvLp g;
    ConvUpdateF32 c;
} GemvConvLp;
#define GEMV_CONV_LP_ARGS(p) GEMV_LP_ARGS((p).g), CONV_UPDATE_F32_ARGS((p).c)

typedef struct {
    SsmUpdateF32 s;
    const u16* dt_w;
    long dt_rank;
} SsmUpdateDtF32;
#define SSM_UPDATE_DT_F32_ARGS(p) SSM_UPDATE_F32_ARGS((p).s), (p).dt_w, (p).dt_rank
