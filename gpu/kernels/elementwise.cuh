// Parameter structs of the elementwise kernels, one per kernel, passed by value.
// GENERATED from gpu/src/ops/elementwise.rs (kernel_params!): do not edit; after changing a
// struct there, run `VET_WRITE_CUH=1 cargo test -p gpu --lib cuh` to rewrite this file.

typedef struct {
    const float* src;
    long ld;
    long rows;
    long cols;
    u16* dst;
    int mode;
} CastLowpF32;
#define CAST_LOWP_F32_ARGS(p) (p).src, (p).ld, (p).rows, (p).cols, (p).dst, (p).mode

typedef struct {
    float* y;
    long ld;
    long rows;
    long cols;
    const float* b;
} BiasAddF32;
#define BIAS_ADD_F32_ARGS(p) (p).y, (p).ld, (p).rows, (p).cols, (p).b

typedef struct {
    const float* u;
    float* xs;
    long n;
} SiluFwdF32;
#define SILU_FWD_F32_ARGS(p) (p).u, (p).xs, (p).n

typedef struct {
    const float* u;
    float* g;
    long n;
} SiluBwdF32;
#define SILU_BWD_F32_ARGS(p) (p).u, (p).g, (p).n

typedef struct {
    const float* src;
    long ld;
    long rows;
    long cols;
    long rows_per;
    float* partial;
} ColsumPartialF32;
#define COLSUM_PARTIAL_F32_ARGS(p) (p).src, (p).ld, (p).rows, (p).cols, (p).rows_per, (p).partial

typedef struct {
    const float* partial;
    long n_rb;
    long cols;
    float* dst;
} ColsumFinalF32;
#define COLSUM_FINAL_F32_ARGS(p) (p).partial, (p).n_rb, (p).cols, (p).dst

typedef struct {
    float* x;
    long ld;
    long rows;
    long cols;
    const float* b;
    u16* dst;
    int mode;
} RoundLowpF32;
#define ROUND_LOWP_F32_ARGS(p) (p).x, (p).ld, (p).rows, (p).cols, (p).b, (p).dst, (p).mode

typedef struct {
    const u16* src;
    long rows;
    long cols;
    float* dst;
    long ld;
    int mode;
} WidenLowpF32;
#define WIDEN_LOWP_F32_ARGS(p) (p).src, (p).rows, (p).cols, (p).dst, (p).ld, (p).mode
