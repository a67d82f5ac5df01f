// Parameter structs of the adamw kernels, one per kernel, passed by value.
// GENERATED from gpu/src/ops/adamw.rs (kernel_params!): do not edit; after changing a
// struct there, run `VET_WRITE_CUH=1 cargo test -p gpu --lib cuh` to rewrite this file.

typedef struct {
    const float* g;
    long n;
    double* part;
} SumsqPartialF64;
#define SUMSQ_PARTIAL_F64_ARGS(p) (p).g, (p).n, (p).part

typedef struct {
    const double* part;
    long n;
    double* out;
} SumsqFinalF64;
#define SUMSQ_FINAL_F64_ARGS(p) (p).part, (p).n, (p).out

typedef struct {
    float* p;
    float* g;
    float* m;
    float* v;
    long n;
    int clip;
    float clip_c;
    float b1;
    float b2;
    float omb1;
    float omb2;
    float eps;
    int decays;
    float decay;
    float step_size;
    float sqrt_bc2;
} AdamwF32;
#define ADAMW_F32_ARGS(p) (p).p, (p).g, (p).m, (p).v, (p).n, (p).clip, (p).clip_c, (p).b1, (p).b2, (p).omb1, (p).omb2, (p).eps, (p).decays, (p).decay, (p).step_size, (p).sqrt_bc2
