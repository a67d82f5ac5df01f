/* Greedy decoding in llama.cpp from token ids, printing token ids: the llama.cpp side of
 * scripts/check-llamacpp.sh, to compare with `vet-chat --tokens IDS --greedy`.
 *
 *   llamacpp_greedy MODEL.gguf N_NEW ID,ID,...
 *   llamacpp_greedy MODEL.gguf N_NEW ID,ID,... LOGITS.f32 FORCED,FORCED,...
 *
 * Feeds the prompt ids as one batch, then takes the argmax of the last logits N_NEW times
 * (ties to the lowest id, as vet-chat's greedy does), feeding each back. It does not stop at
 * end-of-text: the comparison covers exactly N_NEW tokens. Weights are not repacked for AMX
 * (see below). Prints the new ids, comma-separated.
 * With LOGITS.f32 and N_NEW forced ids (teacher forcing): step i feeds FORCED[i] instead of
 * its argmax, and every step's logits go to LOGITS.f32 (N_NEW x n_vocab little-endian f32),
 * so they can be set against another implementation's on the same token sequence.
 * Built against libllama by check-llamacpp.sh (cc ... -lllama). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "llama.h"

static void quiet(enum ggml_log_level level, const char *text, void *user) {
    (void)user;
    if (level >= GGML_LOG_LEVEL_ERROR) fputs(text, stderr);
}

static int argmax(const float *logits, int n) {
    int best = 0;
    for (int i = 1; i < n; i++)
        if (logits[i] > logits[best]) best = i;
    return best;
}

int main(int argc, char **argv) {
    if (argc != 4 && argc != 6) {
        fprintf(stderr, "usage: %s MODEL.gguf N_NEW ID,ID,... [LOGITS.f32 FORCED,...]\n", argv[0]);
        return 2;
    }
    int n_new = atoi(argv[2]);
    llama_token prompt[4096];
    int n_prompt = 0;
    for (char *s = strtok(argv[3], ","); s && n_prompt < 4096; s = strtok(NULL, ","))
        prompt[n_prompt++] = (llama_token)atoi(s);
    if (n_prompt == 0 || n_new <= 0) {
        fprintf(stderr, "need at least one prompt id and N_NEW > 0\n");
        return 2;
    }
    llama_token forced[4096];
    int n_forced = 0;
    FILE *dump = NULL;
    if (argc == 6) {
        for (char *s = strtok(argv[5], ","); s && n_forced < 4096; s = strtok(NULL, ","))
            forced[n_forced++] = (llama_token)atoi(s);
        if (n_forced != n_new) {
            fprintf(stderr, "%d forced ids for N_NEW %d\n", n_forced, n_new);
            return 2;
        }
        dump = fopen(argv[4], "wb");
        if (!dump) {
            fprintf(stderr, "cannot write %s\n", argv[4]);
            return 1;
        }
    }
    llama_log_set(quiet, NULL);
    llama_backend_init();
    struct llama_model_params mp = llama_model_default_params();
    /* ggml's AMX repacking of Q8_0 weights crashes (SIGSEGV in ggml_backend_amx_mul_mat) on
     * these small models on AMX CPUs; the plain CPU kernels are what this check is about.
     * LLAMACPP_EXTRA_BUFTS=1 turns the repacking back on. */
    const char *extra = getenv("LLAMACPP_EXTRA_BUFTS");
    mp.use_extra_bufts = extra && strcmp(extra, "1") == 0;
    struct llama_model *model = llama_model_load_from_file(argv[1], mp);
    if (!model) {
        fprintf(stderr, "llama.cpp could not load %s\n", argv[1]);
        return 1;
    }
    struct llama_context_params cp = llama_context_default_params();
    cp.n_ctx = (uint32_t)(n_prompt + n_new + 8);
    cp.n_batch = cp.n_ctx;
    cp.n_threads = cp.n_threads_batch = 2;
    struct llama_context *ctx = llama_init_from_model(model, cp);
    if (!ctx) {
        fprintf(stderr, "llama.cpp could not create a context\n");
        return 1;
    }
    int n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));
    struct llama_batch batch = llama_batch_get_one(prompt, n_prompt);
    llama_token next;
    for (int i = 0; i < n_new; i++) {
        if (llama_decode(ctx, batch) != 0) {
            fprintf(stderr, "llama_decode failed at step %d\n", i);
            return 1;
        }
        const float *logits = llama_get_logits_ith(ctx, -1);
        next = argmax(logits, n_vocab);
        printf(i ? ",%d" : "%d", next);
        if (dump) {
            if (fwrite(logits, sizeof(float), (size_t)n_vocab, dump) != (size_t)n_vocab) {
                fprintf(stderr, "writing %s failed\n", argv[4]);
                return 1;
            }
            next = forced[i];
        }
        batch = llama_batch_get_one(&next, 1);
    }
    printf("\n");
    if (dump && fclose(dump) != 0) {
        fprintf(stderr, "writing %s failed\n", argv[4]);
        return 1;
    }
    llama_free(ctx);
    llama_model_free(model);
    return 0;
}
