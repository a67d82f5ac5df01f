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
#define GEMV_LP_ARGS(p) (p).w, (p).ldw, (p).x_lp, (p).x_f32, (p).ldx, (p).y, (p).ldy, (p).n_out, (p).k, (p).rows, (p).split, (p).vec, (p).lp_mode

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

typedef struct {
    const float* params;
    const u16* shadow;
    long layer_stride;
    long norm_w;
    long in_w;
    long conv_w;
    long conv_b;
    long x_w;
    long dt_w;
    long dt_b;
    long a_log;
    long d;
    long out_w;
    long n_layer;
    long d_model;
    long d_inner;
    long d_state;
    long dt_rank;
    float eps;
    int lp_mode;
    int chunk_in;
    int chunk_x;
    int chunk_out;
    int split_in;
    int split_x;
    int split_out;
    float* resid;
    float* out;
    float* xz;
    float* xs;
    u16* xs_lp;
    float* xdbl;
    float* gated;
    u16* gated_lp;
    float* conv_state;
    float* ssm_state;
    const int* starts;
    unsigned int* sync;
    u64* trace;
    int slot_bytes;
} DecodeLayersLp;
#define DECODE_LAYERS_LP_ARGS(p) (p).params, (p).shadow, (p).layer_stride, (p).norm_w, (p).in_w, (p).conv_w, (p).conv_b, (p).x_w, (p).dt_w, (p).dt_b, (p).a_log, (p).d, (p).out_w, (p).n_layer, (p).d_model, (p).d_inner, (p).d_state, (p).dt_rank, (p).eps, (p).lp_mode, (p).chunk_in, (p).chunk_x, (p).chunk_out, (p).split_in, (p).split_x, (p).split_out, (p).resid, (p).out, (p).xz, (p).xs, (p).xs_lp, (p).xdbl, (p).gated, (p).gated_lp, (p).conv_state, (p).ssm_state, (p).starts, (p).sync, (p).trace, (p).slot_bytes
