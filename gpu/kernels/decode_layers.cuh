// Parameter structs of the decode_layers kernels, one per kernel, passed by value.
// GENERATED from gpu/src/ops/decode_layers.rs (kernel_params!): do not edit; after changing a
// struct there, run `VET_WRITE_CUH=1 cargo test -p gpu --lib cuh` to rewrite this file.

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
    const signed char* q8;
    const float* q8s;
} DecodeLayersLp;
#define DECODE_LAYERS_LP_ARGS(p) (p).params, (p).shadow, (p).layer_stride, (p).norm_w, (p).in_w, (p).conv_w, (p).conv_b, (p).x_w, (p).dt_w, (p).dt_b, (p).a_log, (p).d, (p).out_w, (p).n_layer, (p).d_model, (p).d_inner, (p).d_state, (p).dt_rank, (p).eps, (p).lp_mode, (p).chunk_in, (p).chunk_x, (p).chunk_out, (p).split_in, (p).split_x, (p).split_out, (p).resid, (p).out, (p).xz, (p).xs, (p).xs_lp, (p).xdbl, (p).gated, (p).gated_lp, (p).conv_state, (p).ssm_state, (p).starts, (p).sync, (p).trace, (p).slot_bytes, (p).q8, (p).q8s
