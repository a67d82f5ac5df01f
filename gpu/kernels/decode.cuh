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
