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

#define EK_ABI_VERSION 4

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
 * such planes (DS-CNN's 25x5). Here a plane is one memcpy into a scratch with pt zero rows
 * above, pb below and G zeros either side, and every tap is one flat pass over the plane
 * (row pitch W) whose lanes outside their row are masked to 0: the same products as the
 * padded plane's (w * 0 for the padding), so the forward still matches the twin byte for
 * byte. DS-CNN's [32, 64, 25, 5]: forward 0.59 -> 0.28 ms, weight gradient 0.68 -> 0.24. */
typedef struct {
    float *S, *B;        /* the scratch, and the plane's first element in it */
    unsigned char *mask; /* [kw][H * W]: tap column j reads inside the row at flat k */
    int64_t r[3], d1, d2; /* tap (i, j) reads B[k + r[i] + j * dw]; d1, d2 = dw, 2 * dw */
} dw_same_t;

EK_INLINE int dw_same_fits(int64_t H, int64_t W, int64_t M, int64_t kh, int64_t kw, int64_t sh,
                           int64_t sw, int64_t Ho, int64_t Wo) {
    (void)M;
    return sh == 1 && sw == 1 && Ho == H && Wo == W && kh == 3 && kw == 3 && W < 16;
}

EK_INLINE int dw_same_init(dw_same_t *s, int64_t H, int64_t W, int64_t kw, int64_t dh, int64_t dw,
                           int64_t pt, int64_t pl) {
    const int64_t pb = 2 * dh - pt, pr = (kw - 1) * dw - pl;
    const int64_t G = (pl > pr ? pl : pr) + 8; /* + 8: whole-vector reads past the plane */
    s->S = (float *)calloc((size_t)(2 * G + (pt + H + pb) * W), sizeof(float));
    s->mask = (unsigned char *)malloc((size_t)(kw * H * W));
    if (!s->S || !s->mask) {
        free(s->S);
        free(s->mask);
        return -1;
    }
    s->B = s->S + G + pt * W;
    for (int64_t i = 0; i < 3; i++) s->r[i] = (i * dh - pt) * W - pl;
    s->d1 = dw;
    s->d2 = 2 * dw;
    for (int64_t j = 0; j < kw; j++)
        for (int64_t k = 0; k < H * W; k++) {
            const int64_t v = k % W + j * dw - pl;
            s->mask[j * H * W + k] = v >= 0 && v < W;
        }
    return 0;
}

EK_INLINE int dw_same_forward(const float *restrict x, const float *restrict w, float *restrict y,
                              int64_t N, int64_t C, int64_t H, int64_t W, int64_t M, int64_t dh,
                              int64_t dw, int64_t pt, int64_t pl) {
    dw_same_t s;
    if (dw_same_init(&s, H, W, 3, dh, dw, pt, pl)) return -1;
    const int64_t HW = H * W, O = C * M;
    const float *restrict B = s.B;
    const unsigned char *restrict m0 = s.mask, *restrict m1 = s.mask + HW, *restrict m2 = s.mask + 2 * HW;
    const int64_t r0 = s.r[0], r1 = s.r[1], r2 = s.r[2], d1 = s.d1, d2 = s.d2;
    for (int64_t n = 0; n < N; n++)
        for (int64_t c = 0; c < C; c++) {
            memcpy(s.B, x + (n * C + c) * HW, (size_t)HW * sizeof(float));
            for (int64_t m = 0; m < M; m++) {
                const int64_t o = c * M + m;
                const float *restrict wp = w + o * 9;
                const float w00 = wp[0], w01 = wp[1], w02 = wp[2], w10 = wp[3], w11 = wp[4], w12 = wp[5],
                            w20 = wp[6], w21 = wp[7], w22 = wp[8];
                float *restrict yp = y + (n * O + o) * HW;
                for (int64_t k = 0; k < HW; k++) {
                    float acc = 0.0f;
                    acc = acc + w00 * (m0[k] ? B[k + r0] : 0.0f);
                    acc = acc + w01 * (m1[k] ? B[k + r0 + d1] : 0.0f);
                    acc = acc + w02 * (m2[k] ? B[k + r0 + d2] : 0.0f);
                    acc = acc + w10 * (m0[k] ? B[k + r1] : 0.0f);
                    acc = acc + w11 * (m1[k] ? B[k + r1 + d1] : 0.0f);
                    acc = acc + w12 * (m2[k] ? B[k + r1 + d2] : 0.0f);
                    acc = acc + w20 * (m0[k] ? B[k + r2] : 0.0f);
                    acc = acc + w21 * (m1[k] ? B[k + r2 + d1] : 0.0f);
                    acc = acc + w22 * (m2[k] ? B[k + r2 + d2] : 0.0f);
                    yp[k] = acc;
                }
            }
        }
    free(s.S);
    free(s.mask);
    return 0;
}

EK_INLINE int dw_same_grad_weight(const float *restrict x, const float *restrict gy, float *restrict gw,
                                  int64_t N, int64_t C, int64_t H, int64_t W, int64_t M, int64_t dh,
                                  int64_t dw, int64_t pt, int64_t pl) {
    /* gm[j]: the output gradient with the lanes where tap column j reads outside the row
     * zeroed, to whole vectors; the nine taps in one pass, in 8 partial sums each */
    dw_same_t s;
    if (dw_same_init(&s, H, W, 3, dh, dw, pt, pl)) return -1;
    const int64_t HW = H * W, O = C * M, L = (HW + 7) & ~(int64_t)7;
    float *gm = (float *)calloc((size_t)(3 * L), sizeof(float));
    if (!gm) {
        free(s.S);
        free(s.mask);
        return -1;
    }
    const float *restrict B = s.B;
    const int64_t r0 = s.r[0], r1 = s.r[1], r2 = s.r[2], d1 = s.d1, d2 = s.d2;
    const float *restrict g0 = gm, *restrict g1 = gm + L, *restrict g2 = gm + 2 * L;
    for (int64_t o = 0; o < O; o++) {
        float a[9][8];
        for (int t = 0; t < 9; t++)
            for (int l = 0; l < 8; l++) a[t][l] = 0.0f;
        for (int64_t n = 0; n < N; n++) {
            memcpy(s.B, x + (n * C + o / M) * HW, (size_t)HW * sizeof(float));
            const float *restrict g = gy + (n * O + o) * HW;
            for (int64_t j = 0; j < 3; j++)
                for (int64_t k = 0; k < HW; k++) gm[j * L + k] = s.mask[j * HW + k] ? g[k] : 0.0f;
            for (int64_t k = 0; k < L; k += 8)
                for (int l = 0; l < 8; l++) {
                    const int64_t q = k + l;
                    a[0][l] = a[0][l] + g0[q] * B[q + r0];
                    a[1][l] = a[1][l] + g1[q] * B[q + r0 + d1];
                    a[2][l] = a[2][l] + g2[q] * B[q + r0 + d2];
                    a[3][l] = a[3][l] + g0[q] * B[q + r1];
                    a[4][l] = a[4][l] + g1[q] * B[q + r1 + d1];
                    a[5][l] = a[5][l] + g2[q] * B[q + r1 + d2];
                    a[6][l] = a[6][l] + g0[q] * B[q + r2];
                    a[7][l] = a[7][l] + g1[q] * B[q + r2 + d1];
                    a[8][l] = a[8][l] + g2[q] * B[q + r2 + d2];
                }
        }
        for (int t = 0; t < 9; t++) {
            float sum = 0.0f;
            for (int l = 0; l < 8; l++) sum = sum + a[t][l];
            gw[o * 9 + t] = sum;
        }
    }
    free(gm);
    free(s.S);
    free(s.mask);
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
