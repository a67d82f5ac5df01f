// Parameter structs of the embedding kernels, one per kernel, passed by value.
// GENERATED from gpu/src/ops/embedding.rs (kernel_params!): do not edit; after changing a
// struct there, run `VET_WRITE_CUH=1 cargo test -p gpu --lib cuh` to rewrite this file.

typedef struct {
    const unsigned int* tokens;
    const float* emb;
    float* out;
    long d;
} EmbeddingFwdF32;
#define EMBEDDING_FWD_F32_ARGS(p) (p).tokens, (p).emb, (p).out, (p).d

typedef struct {
    const unsigned int* uniq;
    const int* offsets;
    const int* positions;
    const float* d_resid;
    float* grad;
    long d;
} EmbeddingBwdF32;
#define EMBEDDING_BWD_F32_ARGS(p) (p).uniq, (p).offsets, (p).positions, (p).d_resid, (p).grad, (p).d
