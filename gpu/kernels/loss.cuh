// Parameter structs of the loss kernels, one per kernel, passed by value.
// GENERATED from gpu/src/ops/loss.rs (kernel_params!): do not edit; after changing a
// struct there, run `VET_WRITE_CUH=1 cargo test -p gpu --lib cuh` to rewrite this file.

typedef struct {
    float* logits;
    const unsigned int* targets;
    const unsigned char* mask;
    long vocab;
    float k;
    float* row_loss;
    u16* grad_lp;
    int lp_mode;
} CrossEntropyFwdBwdF32;
#define CROSS_ENTROPY_FWD_BWD_F32_ARGS(p) (p).logits, (p).targets, (p).mask, (p).vocab, (p).k, (p).row_loss, (p).grad_lp, (p).lp_mode
