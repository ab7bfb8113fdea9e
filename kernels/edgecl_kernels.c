/* edgecl kernels: see edgecl_kernels.h for the contract of every function.
 *
 * Portable C99 with no intrinsics. Loops are written for the auto-vectorizer: each
 * packed byte covers 8 consecutive elements, so the inner loop over its 8 bits is a
 * fixed-width, branch-free select (one AVX2 register of floats, two NEON ones).
 * On x86-64 with GCC every hot function is cloned for AVX2 and a baseline (SSE2)
 * version and chosen at load time (ifunc); aarch64 always has NEON. Build with
 * -O3 -ffp-contract=off (no fast-math) so the float kernels round exactly like the
 * numpy reference (no FMA contraction): results then match byte for byte.
 */
#include "edgecl_kernels.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#define EK_ABI_VERSION 5

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__) \
    && !defined(EK_NO_CLONES)
#define EK_HOT __attribute__((target_clones("avx2", "default")))
#define EK_DISPATCH "x86-64: target_clones(avx2, default)"
#elif defined(__aarch64__)
#define EK_HOT
#define EK_DISPATCH "aarch64: NEON (baseline)"
#else
#define EK_HOT
#define EK_DISPATCH "generic"
#endif

#ifndef __VERSION__
#define __VERSION__ "unknown compiler"
#endif

int ek_abi_version(void) { return EK_ABI_VERSION; }

const char *ek_build_info(void) { return EK_DISPATCH "; cc " __VERSION__; }

/* Mask of the valid bits of the last byte of an n-bit mask (0xFF when n % 8 == 0). */
static uint8_t tail_mask(int64_t n) {
    int r = (int)(n & 7);
    return r ? (uint8_t)((1u << r) - 1u) : (uint8_t)0xFF;
}

static int64_t nbytes_of(int64_t n) { return (n + 7) >> 3; }

/* ---------------------------------------------------------------- materialize */

/* On 32-bit words: a select by AND with an all-ones / all-zeros lane mask keeps the
 * exact bytes of a kept weight and gives all-zero bytes (+0.0f) for a dropped one. */
EK_HOT void ek_materialize_bits(const uint32_t *restrict w, const uint8_t *restrict bits,
                                uint32_t *restrict out, int64_t n) {
    const int64_t full = n >> 3;
    for (int64_t k = 0; k < full; k++) {
        const uint32_t b = bits[k];
        for (int j = 0; j < 8; j++) out[8 * k + j] = w[8 * k + j] & (0u - ((b >> j) & 1u));
    }
    for (int64_t i = full * 8; i < n; i++) out[i] = w[i] & (0u - (uint32_t)((bits[i >> 3] >> (i & 7)) & 1u));
}

void ek_materialize_units(const uint32_t *restrict w, const uint8_t *restrict gates,
                          uint32_t *restrict out, int64_t rows, int64_t row_len) {
    const size_t len = (size_t)row_len * sizeof(uint32_t);
    for (int64_t r = 0; r < rows; r++) {
        if (gates[r]) memcpy(out + r * row_len, w + r * row_len, len);
        else memset(out + r * row_len, 0, len); /* all-zero bytes are +0.0f */
    }
}

/* ---------------------------------------------------------------- pack / unpack */

static inline uint64_t load64(const uint8_t *p) {
    uint64_t x;
    memcpy(&x, p, 8);
    return x;
}

#if defined(__BYTE_ORDER__) && defined(__ORDER_LITTLE_ENDIAN__) \
    && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
#define EK_LITTLE_ENDIAN 1
#else
#define EK_LITTLE_ENDIAN 0
#endif

/* 8 bytes (each 0 or 1; byte j = element j) -> one mask byte (bit j = element j).
 * SWAR: multiplying by 0x0102040810204080 moves byte j's bit to bit 56 + j; every other
 * partial product lands above bit 63 or below bit 56 on a distinct position (no carry). */
static inline uint8_t gather8(const uint8_t *p) {
#if EK_LITTLE_ENDIAN
    return (uint8_t)((load64(p) * 0x0102040810204080ull) >> 56);
#else
    unsigned b = 0;
    for (int j = 0; j < 8; j++) b |= (unsigned)p[j] << j;
    return (uint8_t)b;
#endif
}

/* One mask byte -> 8 bytes of 0/1 (element j = bit j). */
static inline void scatter8(unsigned b, uint8_t *p) {
#if EK_LITTLE_ENDIAN
    uint64_t x = ((uint64_t)b * 0x0101010101010101ull) & 0x8040201008040201ull;
    x = ((x + 0x7F7F7F7F7F7F7F7Full) >> 7) & 0x0101010101010101ull; /* nonzero byte -> 1 */
    memcpy(p, &x, 8);
#else
    for (int j = 0; j < 8; j++) p[j] = (uint8_t)((b >> j) & 1u);
#endif
}

/* The tail of a pack: the last n % 8 elements (0/1 bytes) into one byte, pad bits 0. */
static inline uint8_t gather_tail(const uint8_t *p, int r) {
    unsigned b = 0;
    for (int j = 0; j < r; j++) b |= (unsigned)p[j] << j;
    return (uint8_t)b;
}

/* Packing works on blocks: a flat (vectorizable) loop makes one 0/1 byte per element
 * into `tmp`, then gather8 packs them 8 at a time. */
#define EK_PBLOCK 4096 /* a multiple of 8 */

#define EK_PACK_BODY(COND)                                                          \
    uint8_t tmp[EK_PBLOCK];                                                         \
    for (int64_t base = 0; base < n; base += EK_PBLOCK) {                           \
        const int64_t len = (n - base < EK_PBLOCK) ? n - base : EK_PBLOCK;          \
        for (int64_t i = 0; i < len; i++) tmp[i] = (uint8_t)(COND);                 \
        const int64_t full = len >> 3;                                              \
        uint8_t *restrict ob = bits + (base >> 3);                                  \
        for (int64_t k = 0; k < full; k++) ob[k] = gather8(tmp + 8 * k);            \
        if (len & 7) ob[full] = gather_tail(tmp + 8 * full, (int)(len & 7));        \
    }

EK_HOT void ek_pack(const uint8_t *restrict in, uint8_t *restrict bits, int64_t n) {
    EK_PACK_BODY(in[base + i] != 0)
}

EK_HOT void ek_unpack(const uint8_t *restrict bits, uint8_t *restrict out, int64_t n) {
    const int64_t full = n >> 3;
    for (int64_t k = 0; k < full; k++) scatter8(bits[k], out + 8 * k);
    for (int64_t i = full * 8; i < n; i++) out[i] = (uint8_t)((bits[i >> 3] >> (i & 7)) & 1u);
}

/* ---------------------------------------------------------------- nested masks */

EK_HOT void ek_owner_mask(const int16_t *restrict owner, int16_t t, uint8_t *restrict bits,
                          int64_t n) {
    EK_PACK_BODY((owner[base + i] > 0) & (owner[base + i] <= t))
}

EK_HOT void ek_free_mask(const int16_t *restrict owner, uint8_t *restrict bits, int64_t n) {
    EK_PACK_BODY(owner[base + i] == 0)
}

EK_HOT void ek_threshold_mask(const float *restrict scores, float threshold,
                              uint8_t *restrict bits, int64_t n) {
    EK_PACK_BODY(scores[base + i] > threshold)
}

/* ---------------------------------------------------------------- mask algebra */

/* Portable popcount of a 64-bit word (SWAR); the compiler turns it into POPCNT/CNT
 * where the target has one. */
static inline unsigned popc64(uint64_t x) {
#if defined(__GNUC__)
    return (unsigned)__builtin_popcountll(x);
#else
    x = x - ((x >> 1) & 0x5555555555555555ull);
    x = (x & 0x3333333333333333ull) + ((x >> 2) & 0x3333333333333333ull);
    x = (x + (x >> 4)) & 0x0F0F0F0F0F0F0F0Full;
    return (unsigned)((x * 0x0101010101010101ull) >> 56);
#endif
}

/* op: 0 = a, 1 = a & b, 2 = a ^ b. Counts the first n bits only. */
static inline int64_t count_bits(const uint8_t *restrict a, const uint8_t *restrict b,
                                 int64_t n, int op) {
    const int64_t nb = n >> 3; /* whole bytes */
    const int64_t words = nb >> 3;
    int64_t total = 0;
    for (int64_t k = 0; k < words; k++) {
        uint64_t x = load64(a + 8 * k);
        if (op == 1) x &= load64(b + 8 * k);
        else if (op == 2) x ^= load64(b + 8 * k);
        total += popc64(x);
    }
    for (int64_t k = words * 8; k < nb; k++) {
        unsigned x = a[k];
        if (op == 1) x &= b[k];
        else if (op == 2) x ^= b[k];
        total += popc64(x);
    }
    if (n & 7) {
        unsigned x = a[nb];
        if (op == 1) x &= b[nb];
        else if (op == 2) x ^= b[nb];
        total += popc64(x & tail_mask(n));
    }
    return total;
}

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__) \
    && !defined(EK_NO_CLONES)
#define EK_POPC __attribute__((target_clones("popcnt", "default")))
#else
#define EK_POPC
#endif

EK_POPC int64_t ek_popcount(const uint8_t *a, int64_t n) { return count_bits(a, a, n, 0); }
EK_POPC int64_t ek_overlap(const uint8_t *a, const uint8_t *b, int64_t n) {
    return count_bits(a, b, n, 1);
}
EK_POPC int64_t ek_hamming(const uint8_t *a, const uint8_t *b, int64_t n) {
    return count_bits(a, b, n, 2);
}

EK_HOT void ek_and(const uint8_t *restrict a, const uint8_t *restrict b, uint8_t *restrict out,
                   int64_t n) {
    const int64_t nb = nbytes_of(n);
    for (int64_t k = 0; k < nb; k++) out[k] = a[k] & b[k];
    if (nb) out[nb - 1] &= tail_mask(n);
}

EK_HOT void ek_or(const uint8_t *restrict a, const uint8_t *restrict b, uint8_t *restrict out,
                  int64_t n) {
    const int64_t nb = nbytes_of(n);
    for (int64_t k = 0; k < nb; k++) out[k] = a[k] | b[k];
    if (nb) out[nb - 1] &= tail_mask(n);
}

EK_HOT void ek_andnot(const uint8_t *restrict a, const uint8_t *restrict b, uint8_t *restrict out,
                      int64_t n) {
    const int64_t nb = nbytes_of(n);
    for (int64_t k = 0; k < nb; k++) out[k] = a[k] & (uint8_t)~b[k];
    if (nb) out[nb - 1] &= tail_mask(n);
}

/* ---------------------------------------------------------------- masked optimizer steps */

/* The updates work on blocks of EK_BLOCK elements: the block's bits are expanded into
 * lane masks (all ones / all zeros), new values are computed for every lane, and each
 * lane stores either its new value or the bits it loaded -- a bitwise select, never
 * arithmetic, so a frozen position's bytes (NaN payloads included) come back exactly
 * as they were. Blocks with no free bit are skipped without touching their memory.
 * Every loop is then flat and branch-free, which both GCC and Clang vectorize. */

#define EK_BLOCK 512 /* a multiple of 8: blocks start on a byte of the mask */

static inline float select_bits(uint32_t m, float a, float b) {
    uint32_t ua, ub, r;
    float f;
    memcpy(&ua, &a, 4);
    memcpy(&ub, &b, 4);
    r = (ua & m) | (ub & ~m);
    memcpy(&f, &r, 4);
    return f;
}

/* Lane masks of `len` bits starting at bit 0 of `bits`; 0 when none is set. */
static inline int expand_bits(const uint8_t *restrict bits, uint32_t *restrict mask, int64_t len) {
    const int64_t full = len >> 3;
    unsigned any = 0;
    for (int64_t k = 0; k < full; k++) any |= bits[k];
    if (len & 7) any |= bits[full] & ((1u << (len & 7)) - 1u);
    if (!any) return 0;
    for (int64_t k = 0; k < full; k++) {
        const uint32_t b = bits[k];
        for (int j = 0; j < 8; j++) mask[8 * k + j] = 0u - ((b >> j) & 1u);
    }
    for (int64_t i = full * 8; i < len; i++) mask[i] = 0u - (uint32_t)((bits[i >> 3] >> (i & 7)) & 1u);
    return 1;
}

EK_HOT void ek_masked_sgd(float *restrict w, const float *restrict grad, float *restrict buf,
                          const uint8_t *restrict free_bits, int64_t n, float lr, float momentum,
                          float weight_decay) {
    uint32_t mask[EK_BLOCK];
    for (int64_t base = 0; base < n; base += EK_BLOCK) {
        const int64_t len = (n - base < EK_BLOCK) ? n - base : EK_BLOCK;
        if (!expand_bits(free_bits + (base >> 3), mask, len)) continue;
        float *restrict wk = w + base;
        const float *restrict gk = grad + base;
        float *restrict bk = buf + base;
        for (int64_t i = 0; i < len; i++) {
            const float g = gk[i] + weight_decay * wk[i];
            const float nb = momentum * bk[i] + g;
            const float nw = wk[i] - lr * nb;
            bk[i] = select_bits(mask[i], nb, bk[i]);
            wk[i] = select_bits(mask[i], nw, wk[i]);
        }
    }
}

EK_HOT void ek_masked_adam(float *restrict w, const float *restrict grad, float *restrict m,
                           float *restrict v, const uint8_t *restrict free_bits, int64_t n,
                           float step_size, float beta1, float beta2, float one_minus_beta1,
                           float one_minus_beta2, float sqrt_bc2, float eps, float weight_decay) {
    uint32_t mask[EK_BLOCK];
    for (int64_t base = 0; base < n; base += EK_BLOCK) {
        const int64_t len = (n - base < EK_BLOCK) ? n - base : EK_BLOCK;
        if (!expand_bits(free_bits + (base >> 3), mask, len)) continue;
        float *restrict wk = w + base;
        const float *restrict gk = grad + base;
        float *restrict mk = m + base;
        float *restrict vk = v + base;
        for (int64_t i = 0; i < len; i++) {
            const float g = gk[i] + weight_decay * wk[i];
            const float nm = beta1 * mk[i] + one_minus_beta1 * g;
            const float nv = beta2 * vk[i] + one_minus_beta2 * (g * g);
            const float denom = sqrtf(nv) / sqrt_bc2 + eps;
            const float nw = wk[i] - step_size * (nm / denom);
            mk[i] = select_bits(mask[i], nm, mk[i]);
            vk[i] = select_bits(mask[i], nv, vk[i]);
            wk[i] = select_bits(mask[i], nw, wk[i]);
        }
    }
}

EK_HOT void ek_score_sgd(float *restrict scores, const float *restrict grad, float *restrict buf,
                         int64_t n, float lr, float momentum, float weight_decay) {
    if (buf) {
        for (int64_t i = 0; i < n; i++) {
            const float g = grad[i] + weight_decay * scores[i];
            buf[i] = momentum * buf[i] + g;
            scores[i] = scores[i] - lr * buf[i];
        }
    } else {
        for (int64_t i = 0; i < n; i++) {
            const float g = grad[i] + weight_decay * scores[i];
            scores[i] = scores[i] - lr * g;
        }
    }
}

/* ---------------------------------------------------------------- routing */

#define EK_ROUTE_STACK 4096 /* floats of scratch row kept on the stack */

#define EK_ROUTE_JB 64 /* columns per register block: 8 AVX2 / 16 SSE / NEON registers */

/* One row: r = x @ fused (r has n = d + K floats). Full blocks of EK_ROUTE_JB columns
 * accumulate in registers over the rows of fused (independent lanes, no store per
 * step); the last partial block accumulates in r. Each r[j] is the float32 sum over i
 * in ascending order of x[i] * fused[i, j] (no FMA: -ffp-contract=off). */
static inline void route_row_matvec(const float *restrict x, const float *restrict fused,
                                    float *restrict r, int64_t d, int64_t n) {
    int64_t j0 = 0;
    for (; j0 + EK_ROUTE_JB <= n; j0 += EK_ROUTE_JB) {
        float acc[EK_ROUTE_JB];
        for (int j = 0; j < EK_ROUTE_JB; j++) acc[j] = 0.0f;
        for (int64_t i = 0; i < d; i++) {
            const float xi = x[i];
            const float *restrict f = fused + i * n + j0;
            for (int j = 0; j < EK_ROUTE_JB; j++) acc[j] = acc[j] + xi * f[j];
        }
        for (int j = 0; j < EK_ROUTE_JB; j++) r[j0 + j] = acc[j];
    }
    if (j0 < n) {
        const int64_t len = n - j0;
        float *restrict rt = r + j0;
        for (int64_t j = 0; j < len; j++) rt[j] = 0.0f;
        for (int64_t i = 0; i < d; i++) {
            const float xi = x[i];
            const float *restrict f = fused + i * n + j0;
            for (int64_t j = 0; j < len; j++) rt[j] = rt[j] + xi * f[j];
        }
    }
}

/* One row's pooled view: v[c] = -0.0 + x[pool[0][c]] + x[pool[1][c]] + ... in ascending j
 * (entries of -1 skipped; -0.0 is the exact identity of a float sum, so a cell's first
 * term comes out unchanged, -0.0 included), as the numpy twin adds. */
static inline void route_row_pool(const float *restrict x, const int32_t *restrict pool,
                                  int64_t m, int64_t d, float *restrict v) {
    for (int64_t c = 0; c < d; c++) v[c] = -0.0f;
    for (int64_t j = 0; j < m; j++) {
        const int32_t *restrict p = pool + j * d;
        for (int64_t c = 0; c < d; c++) { /* branch-free: -1 reads x[0] and adds -0.0 */
            const int32_t i = p[c];
            const float xi = x[i < 0 ? 0 : i];
            v[c] = v[c] + (i < 0 ? -0.0f : xi);
        }
    }
}

EK_HOT int ek_route_prototype(const ek_route_tables *tab, const void *x_, int64_t B,
                              float temperature, float novelty_floor, float threshold,
                              int64_t unknown_task, int64_t *restrict out_task,
                              int64_t *restrict out_best, float *restrict out_conf,
                              uint8_t *restrict out_unknown, float *restrict out_scores) {
    const float *restrict x = (const float *)x_;
    const float *restrict fused = tab->fused;
    const float *restrict cnst = tab->cnst;
    const int64_t *restrict starts = tab->starts;
    const int32_t *restrict pool = tab->pool;
    const int64_t n_in = tab->n_in, m = tab->m, d = tab->d, K = tab->K, T = tab->T;
    const int64_t n = d + K;
    const int64_t need = n + (pool ? d : 0); /* r, then the pooled row */
    float stack[EK_ROUTE_STACK];
    float *r = stack;
    if (need > EK_ROUTE_STACK) {
        r = (float *)malloc((size_t)need * sizeof(float));
        if (!r) return -1;
    }
    float *restrict v = r + n;
    for (int64_t b = 0; b < B; b++) {
        const float *xb = x + b * n_in;
        if (pool) {
            route_row_pool(xb, pool, m, d, v);
            xb = v;
        }
        float *restrict s = out_scores + b * T;
        route_row_matvec(xb, fused, r, d, n);
        /* quad in 8 partial sums (a fixed-width, vectorizable reduction) */
        float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        int64_t i = 0;
        for (; i + 8 <= d; i += 8)
            for (int j = 0; j < 8; j++) acc[j] = acc[j] + r[i + j] * xb[i + j];
        float quad = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
        for (; i < d; i++) quad = quad + r[i] * xb[i];
        const float half = 0.5f * quad;
        const float *restrict lin = r + d;
        for (int64_t t = 0; t < T; t++) {
            const int64_t lo = starts[t], hi = (t + 1 < T) ? starts[t + 1] : K;
            float mx = lin[lo] + (cnst[lo] - half);
            for (int64_t k = lo + 1; k < hi; k++) {
                const float val = lin[k] + (cnst[k] - half);
                if (val > mx || val != val) mx = val; /* np.maximum: NaN propagates */
            }
            s[t] = mx;
        }
        int64_t best = 0;
        float top = s[0];
        for (int64_t t = 1; t < T; t++)
            if (top == top && (s[t] > top || s[t] != s[t])) { best = t; top = s[t]; }
        float sum = 0.0f;
        for (int64_t t = 0; t < T; t++) sum = sum + expf((s[t] - top) / temperature);
        const float conf = 1.0f / sum;
        const uint8_t unknown = (uint8_t)((conf < threshold) || (top < novelty_floor));
        out_best[b] = best;
        out_conf[b] = conf;
        if (out_unknown) out_unknown[b] = unknown;
        if (out_task) out_task[b] = unknown ? unknown_task : best;
    }
    if (r != stack) free(r);
    return 0;
}

/* ---------------------------------------------------------------- activations */

/* max(x, 0) as numpy's np.maximum(x, 0) gives it: a positive x or a NaN (its bytes) kept,
 * anything else +0.0 (-0.0 included), by an AND of x's bits with an all-ones / all-zeros
 * lane mask. out may be x itself (in place), so no restrict: gcc versions the loop. */
EK_HOT void ek_relu(const float *x, float *out, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        const float v = x[i];
        uint32_t b;
        memcpy(&b, &v, sizeof b);
        b &= 0u - (uint32_t)((v > 0.0f) | (v != v));
        memcpy(&out[i], &b, sizeof b);
    }
}

/* ---------------------------------------------------------------- activation gradients */

/* gy times the 0/1 indicator of lo < x < hi (hi NaN: no upper bound), as numpy's
 * gy * (x > lo) or gy * ((x > lo) & (x < hi)) computes it: a product with 1.0f or 0.0f, so
 * the dropped lanes are gy * 0 (-0.0 for a negative gy, NaN for an infinite or NaN one),
 * never a plain 0. One pass instead of numpy's compare, cast and multiply. */
EK_HOT void ek_clamp_grad(const float *restrict gy, const float *restrict x, float *restrict out,
                          int64_t n, float lo, float hi) {
    /* the indicator through an int (and &, not &&): a ?: or && here is control flow,
     * which keeps gcc from vectorizing the loop (a branch per element, 14x slower) */
    if (hi != hi) {
        for (int64_t i = 0; i < n; i++) {
            const float m = (float)(x[i] > lo);
            out[i] = gy[i] * m;
        }
        return;
    }
    for (int64_t i = 0; i < n; i++) {
        const float m = (float)((x[i] > lo) & (x[i] < hi));
        out[i] = gy[i] * m;
    }
}

/* ---------------------------------------------------------------- depthwise convolution */

/* Every loop below adds one float32 product at a time (no FMA: -ffp-contract=off), in
 * the order the header states, so forward and grad_input equal the numpy twin byte for
 * byte. Each input plane is first copied into a zero-padded scratch plane, as the twin
 * pads, so the loops need no bounds checks; they run along rows (contiguous for stride
 * 1) and vectorize. 3x3 kernels fuse their nine taps into one pass. Narrow stride-1
 * planes run as one flat loop over rows of the padded pitch (the extra columns are
 * scratch), so the loops stay long even for 3x3 or 25x5 planes. */

#if defined(__GNUC__)
#define EK_INLINE static inline __attribute__((always_inline))
#else
#define EK_INLINE static inline
#endif

/* yr[q] += wv * xr[q*sw + off] for q in [lo, hi). */
EK_INLINE void dw_madd(float *restrict yr, const float *restrict xr, float wv, int64_t lo,
                       int64_t hi, int64_t sw, int64_t off) {
    if (lo >= hi) return;
    float *restrict ys = yr + lo;
    const float *restrict xs = xr + lo * sw + off;
    const int64_t len = hi - lo;
    if (sw == 1) {
        for (int64_t q = 0; q < len; q++) ys[q] = ys[q] + wv * xs[q];
    } else if (sw == 2) {
        for (int64_t q = 0; q < len; q++) ys[q] = ys[q] + wv * xs[2 * q];
    } else {
        for (int64_t q = 0; q < len; q++) ys[q] = ys[q] + wv * xs[q * sw];
    }
}

/* The part of one input plane the taps read, [Hp, Wp], zero-padded, into P; then `tail`
 * more zeros (the flat loops below read that far past the last row). */
EK_INLINE void dw_pad_plane(float *restrict P, const float *restrict xp, int64_t H, int64_t W,
                            int64_t Hp, int64_t Wp, int64_t pt, int64_t pl, int64_t tail) {
    const int64_t s0 = pl < Wp ? pl : Wp;             /* [0, s0): left padding */
    const int64_t s1 = pl + W < Wp ? pl + W : Wp;     /* [s0, s1): x; [s1, Wp): right padding */
    for (int64_t r = 0; r < Hp; r++) {
        float *restrict pr = P + r * Wp;
        const int64_t h = r - pt;
        if (h < 0 || h >= H) {
            for (int64_t v = 0; v < Wp; v++) pr[v] = 0.0f;
            continue;
        }
        const float *restrict xr = xp + h * W;
        for (int64_t v = 0; v < s0; v++) pr[v] = 0.0f;
        for (int64_t v = s0; v < s1; v++) pr[v] = xr[v - pl];
        for (int64_t v = s1; v < Wp; v++) pr[v] = 0.0f;
    }
    for (int64_t t = 0; t < tail; t++) P[Hp * Wp + t] = 0.0f;
}

/* One output plane from a padded plane P (row pitch Wp), row by row: yr[q] = 0 + the
 * taps (i, j) in order of w[i, j] * P[(oh*sh + i*dh) * Wp + q*sw + j*dw]. */
EK_INLINE void dw_forward_rows(float *restrict yp, const float *restrict P, const float *restrict wp,
                               int64_t Ho, int64_t Wo, int64_t Wp, int64_t kh, int64_t kw,
                               const int64_t sh, const int64_t sw, int64_t dh, int64_t dw) {
    for (int64_t oh = 0; oh < Ho; oh++) {
        float *restrict yr = yp + oh * Wo;
        const float *restrict r0 = P + oh * sh * Wp;
        if (kh == 3 && kw == 3) {
            const float w00 = wp[0], w01 = wp[1], w02 = wp[2], w10 = wp[3], w11 = wp[4], w12 = wp[5],
                        w20 = wp[6], w21 = wp[7], w22 = wp[8];
            const float *restrict r1 = r0 + dh * Wp, *restrict r2 = r0 + 2 * dh * Wp;
            const int64_t d1 = dw, d2 = 2 * dw;
            for (int64_t q = 0; q < Wo; q++) {
                const int64_t k = q * sw;
                float acc = 0.0f;
                acc = acc + w00 * r0[k];
                acc = acc + w01 * r0[k + d1];
                acc = acc + w02 * r0[k + d2];
                acc = acc + w10 * r1[k];
                acc = acc + w11 * r1[k + d1];
                acc = acc + w12 * r1[k + d2];
                acc = acc + w20 * r2[k];
                acc = acc + w21 * r2[k + d1];
                acc = acc + w22 * r2[k + d2];
                yr[q] = acc;
            }
            continue;
        }
        for (int64_t q = 0; q < Wo; q++) yr[q] = 0.0f;
        for (int64_t i = 0; i < kh; i++)
            for (int64_t j = 0; j < kw; j++) dw_madd(yr, r0 + i * dh * Wp, wp[i * kw + j], 0, Wo, sw, j * dw);
    }
}

/* Stride 1 on a narrow plane: the output as one flat run over rows of pitch Wp (its
 * columns Wo .. Wp-1 are scratch, dropped after), so the loops are long. */
EK_INLINE void dw_forward_flat(float *restrict yp, float *restrict Y, const float *restrict P,
                               const float *restrict wp, int64_t Ho, int64_t Wo, int64_t Wp, int64_t kh,
                               int64_t kw, int64_t dh, int64_t dw) {
    const int64_t L = (Ho * Wp + 7) & ~(int64_t)7; /* whole vectors: the scratch extends that far */
    if (kh == 3 && kw == 3) {
        const float w00 = wp[0], w01 = wp[1], w02 = wp[2], w10 = wp[3], w11 = wp[4], w12 = wp[5],
                    w20 = wp[6], w21 = wp[7], w22 = wp[8];
        const float *restrict p0 = P, *restrict p1 = P + dh * Wp, *restrict p2 = P + 2 * dh * Wp;
        const int64_t d1 = dw, d2 = 2 * dw;
        for (int64_t k = 0; k < L; k++) {
            float acc = 0.0f;
            acc = acc + w00 * p0[k];
            acc = acc + w01 * p0[k + d1];
            acc = acc + w02 * p0[k + d2];
            acc = acc + w10 * p1[k];
            acc = acc + w11 * p1[k + d1];
            acc = acc + w12 * p1[k + d2];
            acc = acc + w20 * p2[k];
            acc = acc + w21 * p2[k + d1];
            acc = acc + w22 * p2[k + d2];
            Y[k] = acc;
        }
    } else {
        for (int64_t k = 0; k < L; k++) Y[k] = 0.0f;
        for (int64_t i = 0; i < kh; i++)
            for (int64_t j = 0; j < kw; j++) {
                const float wv = wp[i * kw + j];
                const float *restrict ps = P + i * dh * Wp + j * dw;
                for (int64_t k = 0; k < L; k++) Y[k] = Y[k] + wv * ps[k];
            }
    }
    for (int64_t oh = 0; oh < Ho; oh++) memcpy(yp + oh * Wo, Y + oh * Wp, (size_t)Wo * sizeof(float));
}

/* Narrow planes (W < 16), 3x3, stride 1, the output the input's size ("same" padding):
 * the per-row padding and copying of the general paths cost more than the arithmetic on
 * such planes (DS-CNN's 25x5). Here a plane is copied into a scratch with zero rows
 * above and below (and a few zeros either side), and every tap (i, j) reads that plane
 * flat, with row pitch W, at k + R[i] + s[j] for the output index k: the reads that fall
 * off their row are zeroed by an AND with the tap column's 0 / ~0 lane mask, so the
 * products are the twin's (w * 0 for the padding: NaN for an infinite w) and the forward
 * matches it byte for byte. The loops run in whole blocks of DW_VL lanes (the output's
 * extra lanes are written into the next output plane, written after, or for the last
 * one into a scratch plane); the next input plane is copied into the other of two
 * scratch planes before this one is read (reads that straddle recent stores would wait
 * for them). The weight gradient keeps its 8 partial sums per tap (lane l takes the flat
 * indices k = l mod 8, plane after plane in n: the same sums in the same order as before)
 * for all output channels in a table, so that the planes are read in memory order; a tap
 * off the row adds gy * 0, as the twin's padding does (not 0 * the next row's x, which
 * was NaN for an infinite x). The common geometry (dilation 1, pads 1: constant offsets,
 * no mask on the middle column) and the others each run in a function of its own.
 * DS-CNN's [32, 64, 25, 5], one thread, best of 20 through the Python API: forward
 * 0.29 -> 0.12 ms (grad-input, the same forward, 0.31 -> 0.135), weight gradient
 * 0.21 -> 0.135; [32, 96, 12, 12]: 0.40 -> 0.215 and 0.31 -> 0.215. (Before: one pass per
 * tap with byte masks, 0.59 -> 0.28 and 0.68 -> 0.24 over the padded planes. Tried and
 * slower: three pre-masked copies of each plane, one per tap column, read without masks;
 * an x86-64-v4 (AVX-512) clone, 30% slower on Zen 4; the last partial block of the weight
 * gradient as a vector block, blended or with zero-padded gy.) */
#define DW_VL 16

#if defined(__GNUC__)
#define EK_NOINLINE __attribute__((noinline))
#else
#define EK_NOINLINE
#endif

typedef union {
    float f;
    uint32_t u;
} ek_bits; /* a float's bits, moved and masked as such (no arithmetic on the float) */

typedef struct {
    float *mem;      /* the one allocation (zeroed): the planes, the masks, the spare output */
    float *P[2];     /* [HW] each; pt * W + 2 * dw zeros before, L - HW + pb * W + 2 * dw after */
    uint32_t *mask;  /* [3][L]: ~0 where tap column j reads inside the row, else 0 */
    float *Y;        /* [L]: the last output plane, before its HW values are copied out */
    int64_t HW, L, R[3], s[3];
    int unit;        /* dw = pl = 1, pt = dh: s = (-1, 0, 1), R[1] = 0 (DS-CNN's, MobileNet's) */
} dw_same_t;

EK_INLINE int dw_same_fits(int64_t H, int64_t W, int64_t M, int64_t kh, int64_t kw, int64_t sh,
                           int64_t sw, int64_t Ho, int64_t Wo) {
    (void)M;
    return sh == 1 && sw == 1 && Ho == H && Wo == W && kh == 3 && kw == 3 && W < 16;
}

EK_INLINE int dw_same_init(dw_same_t *s, int64_t H, int64_t W, int64_t dh, int64_t dw, int64_t pt,
                           int64_t pl) {
    const int64_t HW = H * W, L = (HW + DW_VL - 1) / DW_VL * DW_VL, pb = 2 * dh - pt;
    const int64_t before = pt * W + 2 * dw, stride = before + L + pb * W + 2 * dw;
    s->mem = (float *)calloc((size_t)(2 * stride + 4 * L), sizeof(float));
    if (!s->mem) return -1;
    s->P[0] = s->mem + before;
    s->P[1] = s->mem + stride + before;
    s->mask = (uint32_t *)(s->mem + 2 * stride); /* calloc's zero bytes: 0u as well as 0.0f */
    s->Y = s->mem + 2 * stride + 3 * L;
    s->HW = HW;
    s->L = L;
    for (int64_t j = 0; j < 3; j++) {
        s->R[j] = (j * dh - pt) * W;
        s->s[j] = j * dw - pl;
        for (int64_t r = 0; r < H; r++)
            for (int64_t v = 0; v < W; v++)
                s->mask[j * L + r * W + v] = v + s->s[j] >= 0 && v + s->s[j] < W ? ~0u : 0u;
    }
    s->unit = s->s[0] == -1 && s->s[1] == 0 && s->s[2] == 1 && s->R[1] == 0;
    return 0;
}

/* Tap (i, j) of output k: the plane's element it reads, or +0.0f (all bits 0). The macros
 * use the caller's t (an ek_bits), R0..R2, s0..s2, m0..m2 and unit. */
#define DW_TAP(P, k, i, j) (t.f = (P)[(k) + R##i + s##j], t.u &= m##j[k], t.f)
/* The middle column of the unit geometry (dw = pl = 1) reads inside the row everywhere. */
#define DW_TAP1(P, k, i) (unit ? (P)[(k) + R##i] : DW_TAP(P, k, i, 1))

EK_INLINE void dw_same_forward_plane(float *restrict Y, const float *restrict P,
                                     const float *restrict wp, const uint32_t *restrict m0,
                                     const uint32_t *restrict m1, const uint32_t *restrict m2,
                                     int64_t L, int64_t R0, int64_t R1, int64_t R2, const int64_t s0,
                                     const int64_t s1, const int64_t s2, const int unit) {
    const float w00 = wp[0], w01 = wp[1], w02 = wp[2], w10 = wp[3], w11 = wp[4], w12 = wp[5],
                w20 = wp[6], w21 = wp[7], w22 = wp[8];
    for (int64_t k = 0; k < L; k++) {
        ek_bits t;
        float acc = 0.0f;
        acc = acc + w00 * DW_TAP(P, k, 0, 0);
        acc = acc + w01 * DW_TAP1(P, k, 0);
        acc = acc + w02 * DW_TAP(P, k, 0, 2);
        acc = acc + w10 * DW_TAP(P, k, 1, 0);
        acc = acc + w11 * DW_TAP1(P, k, 1);
        acc = acc + w12 * DW_TAP(P, k, 1, 2);
        acc = acc + w20 * DW_TAP(P, k, 2, 0);
        acc = acc + w21 * DW_TAP1(P, k, 2);
        acc = acc + w22 * DW_TAP(P, k, 2, 2);
        Y[k] = acc;
    }
}

/* The plane loop of the forward, for one geometry: `unit` (a constant) for dw = pl = 1
 * and pt = dh, where the column offsets are constants and the middle column needs no
 * mask. */
EK_INLINE void dw_same_forward_loop(const dw_same_t *s, const float *restrict x,
                                    const float *restrict w, float *restrict y, int64_t N, int64_t C,
                                    int64_t M, const int unit) {
    const int64_t HW = s->HW, L = s->L, O = C * M, NC = N * C;
    const uint32_t *restrict m0 = s->mask, *restrict m1 = m0 + L, *restrict m2 = m1 + L;
    const int64_t R0 = s->R[0], R1 = unit ? 0 : s->R[1], R2 = s->R[2];
    const int64_t s0 = unit ? -1 : s->s[0], s1 = unit ? 0 : s->s[1], s2 = unit ? 1 : s->s[2];
    const float *yend = y + N * O * HW;
    if (NC) memcpy(s->P[0], x, (size_t)HW * sizeof(float));
    for (int64_t nc = 0; nc < NC; nc++) {
        const int64_t n = nc / C, c = nc % C;
        const float *restrict P = s->P[nc & 1];
        if (nc + 1 < NC) memcpy(s->P[(nc + 1) & 1], x + (nc + 1) * HW, (size_t)HW * sizeof(float));
        for (int64_t m = 0; m < M; m++) {
            const int64_t o = c * M + m;
            float *yp = y + (n * O + o) * HW;
            /* the L - HW extra lanes land in the next planes (written later) */
            float *Y = yend - yp >= L ? yp : s->Y;
            dw_same_forward_plane(Y, P, w + o * 9, m0, m1, m2, L, R0, R1, R2, s0, s1, s2, unit);
            if (Y != yp) memcpy(yp, Y, (size_t)HW * sizeof(float));
        }
    }
}

/* Each geometry's loop a function by itself (cloned like the entry points): inlined
 * together, in one function, the compiler kept fewer of the loops' pointers and sums in
 * registers. */
EK_HOT EK_NOINLINE static void dw_same_forward_unit(const dw_same_t *s, const float *x, const float *w,
                                                    float *y, int64_t N, int64_t C, int64_t M) {
    dw_same_forward_loop(s, x, w, y, N, C, M, 1);
}

EK_HOT EK_NOINLINE static void dw_same_forward_any(const dw_same_t *s, const float *x, const float *w,
                                                   float *y, int64_t N, int64_t C, int64_t M) {
    dw_same_forward_loop(s, x, w, y, N, C, M, 0);
}

EK_INLINE int dw_same_forward(const float *restrict x, const float *restrict w, float *restrict y,
                              int64_t N, int64_t C, int64_t H, int64_t W, int64_t M, int64_t dh,
                              int64_t dw, int64_t pt, int64_t pl) {
    dw_same_t s;
    if (dw_same_init(&s, H, W, dh, dw, pt, pl)) return -1;
    if (s.unit)
        dw_same_forward_unit(&s, x, w, y, N, C, M);
    else
        dw_same_forward_any(&s, x, w, y, N, C, M);
    free(s.mem);
    return 0;
}

/* One block of 8 lanes at k0: a[t][l] += g[k0 + l] * tap t of output k0 + l. */
EK_INLINE void dw_same_gw_block(float a[9][8], const float *restrict g, const float *restrict P,
                                const uint32_t *restrict m0, const uint32_t *restrict m1,
                                const uint32_t *restrict m2, int64_t k0, int64_t R0, int64_t R1,
                                int64_t R2, const int64_t s0, const int64_t s1, const int64_t s2,
                                const int unit) {
    for (int l = 0; l < 8; l++) {
        const int64_t k = k0 + l;
        const float gq = g[k];
        ek_bits t;
        a[0][l] = a[0][l] + gq * DW_TAP(P, k, 0, 0);
        a[1][l] = a[1][l] + gq * DW_TAP1(P, k, 0);
        a[2][l] = a[2][l] + gq * DW_TAP(P, k, 0, 2);
        a[3][l] = a[3][l] + gq * DW_TAP(P, k, 1, 0);
        a[4][l] = a[4][l] + gq * DW_TAP1(P, k, 1);
        a[5][l] = a[5][l] + gq * DW_TAP(P, k, 1, 2);
        a[6][l] = a[6][l] + gq * DW_TAP(P, k, 2, 0);
        a[7][l] = a[7][l] + gq * DW_TAP1(P, k, 2);
        a[8][l] = a[8][l] + gq * DW_TAP(P, k, 2, 2);
    }
}

EK_INLINE void dw_same_gw_plane(float *restrict ap, const float *restrict g, const float *restrict P,
                                const uint32_t *restrict m0, const uint32_t *restrict m1,
                                const uint32_t *restrict m2, int64_t HW, int64_t R0, int64_t R1,
                                int64_t R2, const int64_t s0, const int64_t s1, const int64_t s2,
                                const int unit) {
    float a[9][8];
    for (int t = 0; t < 9; t++)
        for (int l = 0; l < 8; l++) a[t][l] = ap[t * 8 + l];
    const int64_t K8 = HW & ~(int64_t)7;
    for (int64_t k = 0; k < K8; k += 8)
        dw_same_gw_block(a, g, P, m0, m1, m2, k, R0, R1, R2, s0, s1, s2, unit);
    for (int t = 0; t < 9; t++)
        for (int l = 0; l < 8; l++) ap[t * 8 + l] = a[t][l];
    /* the last lanes, where the plane ends inside a block of 8: each by itself (as a
     * vector block, the compiler spilled the sums of the whole loop) */
    for (int64_t k = K8; k < HW; k++) {
        const float gq = g[k];
        float *restrict al = ap + (k - K8);
        ek_bits t;
        al[0] = al[0] + gq * DW_TAP(P, k, 0, 0);
        al[8] = al[8] + gq * DW_TAP1(P, k, 0);
        al[16] = al[16] + gq * DW_TAP(P, k, 0, 2);
        al[24] = al[24] + gq * DW_TAP(P, k, 1, 0);
        al[32] = al[32] + gq * DW_TAP1(P, k, 1);
        al[40] = al[40] + gq * DW_TAP(P, k, 1, 2);
        al[48] = al[48] + gq * DW_TAP(P, k, 2, 0);
        al[56] = al[56] + gq * DW_TAP1(P, k, 2);
        al[64] = al[64] + gq * DW_TAP(P, k, 2, 2);
    }
}

/* The plane loop of the weight gradient (see dw_same_forward_loop) */
EK_INLINE void dw_same_gw_loop(const dw_same_t *s, const float *restrict x,
                               const float *restrict gy, float *restrict acc, int64_t N, int64_t C,
                               int64_t M, const int unit) {
    const int64_t HW = s->HW, L = s->L, O = C * M, NC = N * C;
    const uint32_t *restrict m0 = s->mask, *restrict m1 = m0 + L, *restrict m2 = m1 + L;
    const int64_t R0 = s->R[0], R1 = unit ? 0 : s->R[1], R2 = s->R[2];
    const int64_t s0 = unit ? -1 : s->s[0], s1 = unit ? 0 : s->s[1], s2 = unit ? 1 : s->s[2];
    if (NC) memcpy(s->P[0], x, (size_t)HW * sizeof(float));
    for (int64_t nc = 0; nc < NC; nc++) {
        const int64_t n = nc / C, c = nc % C;
        const float *restrict P = s->P[nc & 1];
        if (nc + 1 < NC) memcpy(s->P[(nc + 1) & 1], x + (nc + 1) * HW, (size_t)HW * sizeof(float));
        for (int64_t m = 0; m < M; m++) {
            const int64_t o = c * M + m;
            dw_same_gw_plane(acc + o * 72, gy + (n * O + o) * HW, P, m0, m1, m2, HW, R0, R1, R2,
                             s0, s1, s2, unit);
        }
    }
}

EK_HOT EK_NOINLINE static void dw_same_gw_unit(const dw_same_t *s, const float *x, const float *gy,
                                               float *acc, int64_t N, int64_t C, int64_t M) {
    dw_same_gw_loop(s, x, gy, acc, N, C, M, 1);
}

EK_HOT EK_NOINLINE static void dw_same_gw_any(const dw_same_t *s, const float *x, const float *gy,
                                              float *acc, int64_t N, int64_t C, int64_t M) {
    dw_same_gw_loop(s, x, gy, acc, N, C, M, 0);
}

EK_INLINE int dw_same_grad_weight(const float *restrict x, const float *restrict gy, float *restrict gw,
                                  int64_t N, int64_t C, int64_t H, int64_t W, int64_t M, int64_t dh,
                                  int64_t dw, int64_t pt, int64_t pl) {
    /* acc[o][t][l]: the partial sums, the nine taps in one pass over the plane */
    dw_same_t s;
    if (dw_same_init(&s, H, W, dh, dw, pt, pl)) return -1;
    const int64_t O = C * M;
    float *acc = (float *)calloc((size_t)(O * 72), sizeof(float));
    if (!acc) {
        free(s.mem);
        return -1;
    }
    if (s.unit)
        dw_same_gw_unit(&s, x, gy, acc, N, C, M);
    else
        dw_same_gw_any(&s, x, gy, acc, N, C, M);
    for (int64_t o = 0; o < O; o++)
        for (int t = 0; t < 9; t++) {
            float sum = 0.0f;
            for (int l = 0; l < 8; l++) sum = sum + acc[o * 72 + t * 8 + l];
            gw[o * 9 + t] = sum;
        }
    free(acc);
    free(s.mem);
    return 0;
}

/* The forward reads each input plane once into a zero-padded scratch plane (as the numpy
 * twin pads), then runs without bounds checks: the padding's taps add w * 0 exactly as
 * the twin's do. Returns 0, or -1 when the scratch could not be allocated. */
EK_HOT int ek_dwconv_forward(const float *restrict x, const float *restrict w, float *restrict y,
                             int64_t N, int64_t C, int64_t H, int64_t W, int64_t M, int64_t kh,
                             int64_t kw, int64_t sh, int64_t sw, int64_t dh, int64_t dw, int64_t pt,
                             int64_t pl, int64_t Ho, int64_t Wo) {
    if (dw_same_fits(H, W, M, kh, kw, sh, sw, Ho, Wo))
        return dw_same_forward(x, w, y, N, C, H, W, M, dh, dw, pt, pl);
    const int64_t O = C * M;
    const int64_t Hp = (Ho - 1) * sh + (kh - 1) * dh + 1, Wp = (Wo - 1) * sw + (kw - 1) * dw + 1;
    const int flat = sh == 1 && sw == 1 && Wo < 16;
    const int64_t L8 = (Ho * Wp + 7) & ~(int64_t)7;
    const int64_t tail = flat ? (L8 - Ho * Wp) + (kw - 1) * dw : 0;
    float *P = (float *)malloc((size_t)(Hp * Wp + tail + (flat ? L8 : 0)) * sizeof(float));
    if (!P) return -1;
    float *Y = P + Hp * Wp + tail;
    for (int64_t n = 0; n < N; n++)
        for (int64_t c = 0; c < C; c++) {
            dw_pad_plane(P, x + (n * C + c) * H * W, H, W, Hp, Wp, pt, pl, tail);
            for (int64_t m = 0; m < M; m++) {
                const int64_t o = c * M + m;
                const float *wp = w + o * kh * kw;
                float *yp = y + (n * O + o) * Ho * Wo;
                /* constant strides give the compiler loops it can specialize */
                if (flat)
                    dw_forward_flat(yp, Y, P, wp, Ho, Wo, Wp, kh, kw, dh, dw);
                else if (sh == 1 && sw == 1)
                    dw_forward_rows(yp, P, wp, Ho, Wo, Wp, kh, kw, 1, 1, dh, dw);
                else if (sh == 2 && sw == 2)
                    dw_forward_rows(yp, P, wp, Ho, Wo, Wp, kh, kw, 2, 2, dh, dw);
                else
                    dw_forward_rows(yp, P, wp, Ho, Wo, Wp, kh, kw, sh, sw, dh, dw);
            }
        }
    free(P);
    return 0;
}

EK_HOT int ek_dwconv_grad_input(const float *restrict gy, const float *restrict w,
                                float *restrict gx, int64_t N, int64_t C, int64_t H, int64_t W,
                                int64_t M, int64_t kh, int64_t kw, int64_t sh, int64_t sw,
                                int64_t dh, int64_t dw, int64_t pt, int64_t pl, int64_t Ho,
                                int64_t Wo) {
    /* Into a zero-padded scratch plane [Hp, Wp] per input plane, tap by tap (i, j), then
     * multiplier by multiplier, each output gradient row added where the tap read; then
     * the part that is the input is copied out (what fell on the padding is dropped). */
    const int64_t O = C * M;
    const int64_t Hp = (Ho - 1) * sh + (kh - 1) * dh + 1, Wp = (Wo - 1) * sw + (kw - 1) * dw + 1;
    float *P = (float *)malloc((size_t)(Hp * Wp) * sizeof(float));
    if (!P) return -1;
    /* the input rows and columns inside the padded plane */
    const int64_t h1 = pt + H < Hp ? pt + H : Hp, v1 = pl + W < Wp ? pl + W : Wp;
    for (int64_t n = 0; n < N; n++)
        for (int64_t c = 0; c < C; c++) {
            for (int64_t k = 0; k < Hp * Wp; k++) P[k] = 0.0f;
            for (int64_t i = 0; i < kh; i++)
                for (int64_t j = 0; j < kw; j++)
                    for (int64_t m = 0; m < M; m++) {
                        const int64_t o = c * M + m;
                        const float wv = w[(o * kh + i) * kw + j];
                        const float *restrict gyp = gy + (n * O + o) * Ho * Wo;
                        for (int64_t p = 0; p < Ho; p++) {
                            float *restrict r = P + (p * sh + i * dh) * Wp + j * dw;
                            const float *restrict g = gyp + p * Wo;
                            if (sw == 1) {
                                for (int64_t q = 0; q < Wo; q++) r[q] = r[q] + wv * g[q];
                            } else if (sw == 2) {
                                for (int64_t q = 0; q < Wo; q++) r[2 * q] = r[2 * q] + wv * g[q];
                            } else {
                                for (int64_t q = 0; q < Wo; q++) r[q * sw] = r[q * sw] + wv * g[q];
                            }
                        }
                    }
            /* copy out; input rows / columns the taps never reached get 0 */
            float *restrict gxp = gx + (n * C + c) * H * W;
            for (int64_t h = 0; h < H; h++) {
                float *restrict gr = gxp + h * W;
                const int64_t r = h + pt;
                if (r >= h1) {
                    for (int64_t v = 0; v < W; v++) gr[v] = 0.0f;
                    continue;
                }
                const float *restrict pr = P + r * Wp + pl;
                const int64_t len = v1 - pl > 0 ? v1 - pl : 0;
                for (int64_t v = 0; v < len; v++) gr[v] = pr[v];
                for (int64_t v = len; v < W; v++) gr[v] = 0.0f;
            }
        }
    free(P);
    return 0;
}

EK_HOT int ek_dwconv_grad_weight(const float *restrict x, const float *restrict gy,
                                 float *restrict gw, int64_t N, int64_t C, int64_t H, int64_t W,
                                 int64_t M, int64_t kh, int64_t kw, int64_t sh, int64_t sw,
                                 int64_t dh, int64_t dw, int64_t pt, int64_t pl, int64_t Ho,
                                 int64_t Wo) {
    /* Each input plane is read into a zero-padded scratch plane P (as the forward). Stride
     * 1: the output gradient is laid out with P's row pitch (zeros in the extra columns)
     * and each tap is one flat dot product, in 8 partial sums; other strides accumulate
     * per output column. The partial sums are added up at the end. */
    if (dw_same_fits(H, W, M, kh, kw, sh, sw, Ho, Wo))
        return dw_same_grad_weight(x, gy, gw, N, C, H, W, M, dh, dw, pt, pl);
    const int64_t O = C * M, T = kh * kw;
    const int64_t Hp = (Ho - 1) * sh + (kh - 1) * dh + 1, Wp = (Wo - 1) * sw + (kw - 1) * dw + 1;
    const int flat = sh == 1 && sw == 1;
    const int64_t L = (Ho * Wp + 7) & ~(int64_t)7; /* whole vectors: G's extra entries are 0 */
    const int64_t tail = flat ? (L - Ho * Wp) + (kw - 1) * dw : 0, lanes = flat ? 8 : Wo;
    float *P = (float *)malloc((size_t)(Hp * Wp + tail + (flat ? L : 0) + T * lanes) * sizeof(float));
    if (!P) return -1;
    float *G = P + Hp * Wp + tail;
    float *acc = G + (flat ? L : 0);
    for (int64_t o = 0; o < O; o++) {
        for (int64_t k = 0; k < T * lanes; k++) acc[k] = 0.0f;
        for (int64_t n = 0; n < N; n++) {
            dw_pad_plane(P, x + (n * C + o / M) * H * W, H, W, Hp, Wp, pt, pl, tail);
            const float *restrict gyp = gy + (n * O + o) * Ho * Wo;
            if (flat) {
                for (int64_t p = 0; p < Ho; p++) {
                    float *restrict gr = G + p * Wp;
                    for (int64_t q = 0; q < Wo; q++) gr[q] = gyp[p * Wo + q];
                    for (int64_t q = Wo; q < Wp; q++) gr[q] = 0.0f;
                }
                for (int64_t k = Ho * Wp; k < L; k++) G[k] = 0.0f;
                if (kh == 3 && kw == 3) { /* the nine taps in one pass over G */
                    const int64_t o1 = dw, o2 = 2 * dw, r1 = dh * Wp, r2 = 2 * dh * Wp;
                    const float *restrict p0 = P, *restrict p1 = P + r1, *restrict p2 = P + r2;
                    float s[9][8];
                    for (int t = 0; t < 9; t++)
                        for (int l = 0; l < 8; l++) s[t][l] = acc[t * 8 + l];
                    for (int64_t k = 0; k < L; k += 8)
                        for (int l = 0; l < 8; l++) {
                            const float g = G[k + l];
                            s[0][l] = s[0][l] + g * p0[k + l];
                            s[1][l] = s[1][l] + g * p0[k + l + o1];
                            s[2][l] = s[2][l] + g * p0[k + l + o2];
                            s[3][l] = s[3][l] + g * p1[k + l];
                            s[4][l] = s[4][l] + g * p1[k + l + o1];
                            s[5][l] = s[5][l] + g * p1[k + l + o2];
                            s[6][l] = s[6][l] + g * p2[k + l];
                            s[7][l] = s[7][l] + g * p2[k + l + o1];
                            s[8][l] = s[8][l] + g * p2[k + l + o2];
                        }
                    for (int t = 0; t < 9; t++)
                        for (int l = 0; l < 8; l++) acc[t * 8 + l] = s[t][l];
                    continue;
                }
                for (int64_t i = 0; i < kh; i++)
                    for (int64_t j = 0; j < kw; j++) {
                        const float *restrict ps = P + i * dh * Wp + j * dw;
                        const float *restrict gs = G;
                        float *restrict a = acc + (i * kw + j) * 8;
                        float s[8];
                        for (int l = 0; l < 8; l++) s[l] = a[l];
                        for (int64_t k = 0; k < L; k += 8)
                            for (int l = 0; l < 8; l++) s[l] = s[l] + gs[k + l] * ps[k + l];
                        for (int l = 0; l < 8; l++) a[l] = s[l];
                    }
            } else {
                for (int64_t p = 0; p < Ho; p++) {
                    const float *restrict gr = gyp + p * Wo;
                    for (int64_t i = 0; i < kh; i++) {
                        const float *restrict r = P + (p * sh + i * dh) * Wp;
                        for (int64_t j = 0; j < kw; j++) {
                            float *restrict a = acc + (i * kw + j) * Wo;
                            const float *restrict rs = r + j * dw;
                            if (sw == 2) {
                                for (int64_t q = 0; q < Wo; q++) a[q] = a[q] + gr[q] * rs[2 * q];
                            } else {
                                for (int64_t q = 0; q < Wo; q++) a[q] = a[q] + gr[q] * rs[q * sw];
                            }
                        }
                    }
                }
            }
        }
        for (int64_t t = 0; t < T; t++) {
            float s = 0.0f;
            for (int64_t l = 0; l < lanes; l++) s = s + acc[t * lanes + l];
            gw[o * T + t] = s;
        }
    }
    free(P);
    return 0;
}
