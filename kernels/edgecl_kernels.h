/* edgecl kernels: mask work of the device runtime (portable C99, no intrinsics).
 *
 * Bit order (the bundle's, fixed): a tensor is flattened in C order; bit i is bit
 * (i % 8), least significant first, of byte i / 8 -- numpy.packbits(..., bitorder=
 * "little"). Pad bits of the last byte are written as 0 and ignored when read.
 *
 * Every length is a count of elements (or of bits); the Python wrappers check that
 * each buffer holds at least that many before calling in. Buffers passed to one call
 * must not overlap (they are declared restrict).
 */
#ifndef EDGECL_KERNELS_H
#define EDGECL_KERNELS_H

#include <stddef.h>
#include <stdint.h>

/* Version of this C API; the Python side refuses a module with another one. */
int ek_abi_version(void);
/* A short description of how the module was compiled (compiler, ISA dispatch). */
const char *ek_build_info(void);

/* On 32-bit elements (float32 -- or any 4-byte type -- as raw words):
 * out[i] = bit(bits, i) ? w[i] : 0 (all-zero bytes, i.e. +0.0f), for i < n. */
void ek_materialize_bits(const uint32_t *w, const uint8_t *bits, uint32_t *out, int64_t n);
/* rows of `row_len` elements: out[r, :] = gates[r] ? w[r, :] : 0. */
void ek_materialize_units(const uint32_t *w, const uint8_t *gates, uint32_t *out,
                          int64_t rows, int64_t row_len);

/* Pack n bytes (nonzero = 1) into (n + 7) / 8 bytes; unpack n bits into 0/1 bytes. */
void ek_pack(const uint8_t *in, uint8_t *bits, int64_t n);
void ek_unpack(const uint8_t *bits, uint8_t *out, int64_t n);

/* Nested masks from a per-weight owner (0 = free, t = 1-based owning task). */
void ek_owner_mask(const int16_t *owner, int16_t t, uint8_t *bits, int64_t n);
void ek_free_mask(const int16_t *owner, uint8_t *bits, int64_t n);
/* Bits of scores[i] > threshold (supermask / Piggyback thresholding). */
void ek_threshold_mask(const float *scores, float threshold, uint8_t *bits, int64_t n);

/* Mask algebra over n bits. */
int64_t ek_popcount(const uint8_t *a, int64_t n);
int64_t ek_overlap(const uint8_t *a, const uint8_t *b, int64_t n);
int64_t ek_hamming(const uint8_t *a, const uint8_t *b, int64_t n);
void ek_and(const uint8_t *a, const uint8_t *b, uint8_t *out, int64_t n);
void ek_or(const uint8_t *a, const uint8_t *b, uint8_t *out, int64_t n);
void ek_andnot(const uint8_t *a, const uint8_t *b, uint8_t *out, int64_t n);

/* Masked optimizer steps: only positions whose bit is set in `free_bits` change, in
 * w and in every state buffer; all other bytes are left as they were.
 *   SGD:  g = grad + wd*w;  buf = momentum*buf + g;  w = w - lr*buf
 *   Adam: g = grad + wd*w;  m = b1*m + (1-b1)*g;  v = b2*v + (1-b2)*g*g;
 *         w = w - step_size * (m / (sqrt(v) / sqrt_bc2 + eps))
 *         with step_size = lr / (1 - b1^t) and sqrt_bc2 = sqrt(1 - b2^t). */
void ek_masked_sgd(float *w, const float *grad, float *buf, const uint8_t *free_bits,
                   int64_t n, float lr, float momentum, float weight_decay);
void ek_masked_adam(float *w, const float *grad, float *m, float *v,
                    const uint8_t *free_bits, int64_t n, float step_size, float beta1,
                    float beta2, float one_minus_beta1, float one_minus_beta2,
                    float sqrt_bc2, float eps, float weight_decay);
/* Supermask score step (every score learns; the backbone is frozen):
 *   g = grad + wd*s;  buf = momentum*buf + g (if buf);  s = s - lr*(buf or g) */
void ek_score_sgd(float *scores, const float *grad, float *buf, int64_t n, float lr,
                  float momentum, float weight_decay);

/* Task routing with the Gaussian prototype router (edgecl.runtime.routers.prototype),
 * one call per batch. The router's tables (set once, read only): fused = [P | P mu^T] is
 * [d, d + K] (row-major), cnst is [K]; starts[T] (strictly ascending, starts[0] >= 0,
 * starts[T-1] < K) is the first prototype column of each task, a task's columns running
 * to the next start (the last to K). Without pool (NULL), x is [B, d], each row the
 * router's view (n_in = d). With pool, x is [B, n_in] and a row's view is pooled first:
 * pool is [m, d] indices into the row (each in [0, n_in), or -1 for none),
 * v[c] = -0.0 + x[pool[0][c]] + x[pool[1][c]] + ... added in ascending j. */
typedef struct {
    const float *fused;
    const float *cnst;
    const int64_t *starts;
    const int32_t *pool;
    int64_t n_in, m, d, K, T;
} ek_route_tables;

/* Per row (its view v), in float32, one operation at a time:
 *   r = v @ fused;  quad = sum_i r[i] * v[i];  ll[k] = r[d + k] + (cnst[k] - 0.5 * quad)
 *   scores[t] = max of ll over the task's columns (NaN propagates)
 *   best = first argmax (a NaN counts as the maximum);  top = scores[best]
 *   conf = 1 / sum_t exp((scores[t] - top) / temperature)
 *   unknown = conf < threshold || top < novelty_floor
 *   task = unknown ? unknown_task : best
 * x is void * so that any buffer passes without a cast. out_unknown and out_task may be
 * NULL (not written). Returns 0, or -1 when the scratch (d + K floats, d more with pool;
 * on the stack up to 4096) could not be allocated. */
int ek_route_prototype(const ek_route_tables *tab, const void *x, int64_t B, float temperature,
                       float novelty_floor, float threshold, int64_t unknown_task,
                       int64_t *out_task, int64_t *out_best, float *out_conf,
                       uint8_t *out_unknown, float *out_scores);

/* ReLU: out[i] = x[i] > 0 or NaN ? x[i] : +0.0f, for i < n; out may be x (in place). */
void ek_relu(const float *x, float *out, int64_t n);
/* Gradient through a clamp: out[i] = gy[i] * (lo < x[i] < hi ? 1.0f : 0.0f), for i < n
 * (hi NaN: no upper bound, lo < x[i] only: ReLU). */
void ek_clamp_grad(const float *gy, const float *x, float *out, int64_t n, float lo, float hi);

/* Depthwise 2-D convolution, NCHW, no bias: one input channel per group and M output
 * channels per input channel (output channel o reads input channel o / M; O = C * M).
 * x [N, C, H, W], w [O, kh, kw] (OIHW with I = 1), y and gy [N, O, Ho, Wo], gx like x,
 * gw like w. Strides sh, sw; dilations dh, dw; pt, pl the top and left padding (zeros;
 * the bottom and right padding are implied by Ho and Wo).
 *   forward:      y[n,o,p,q] = 0 + sum over the taps (i, j), i-major, of
 *                 w[o,i,j] * xpad[n, o/M, p*sh + i*dh, q*sw + j*dw]   (padding included)
 *   grad_input:   gx[n,c,h,v] = 0 + sum over (i, j, m) in that order of w[o,i,j] * gy[n,o,p,q]
 *                 over the (p, q) whose tap (i, j) read (h, v); o = c*M + m
 *   grad_weight:  gw[o,i,j] = sum over n, p, q of gy[n,o,p,q] * xpad[...]
 * Forward and grad_input add one float32 product at a time in exactly those orders, as
 * the numpy twin does (so they match it byte for byte). grad_weight adds in 8 partial
 * sums (stride 1) or per output column (other strides), summed at the end. Each returns
 * 0, or -1 when its scratch (a padded plane and a few rows) could not be allocated. */
int ek_dwconv_forward(const float *x, const float *w, float *y, int64_t N, int64_t C, int64_t H,
                      int64_t W, int64_t M, int64_t kh, int64_t kw, int64_t sh, int64_t sw,
                      int64_t dh, int64_t dw, int64_t pt, int64_t pl, int64_t Ho, int64_t Wo);
int ek_dwconv_grad_input(const float *gy, const float *w, float *gx, int64_t N, int64_t C,
                         int64_t H, int64_t W, int64_t M, int64_t kh, int64_t kw, int64_t sh,
                         int64_t sw, int64_t dh, int64_t dw, int64_t pt, int64_t pl, int64_t Ho,
                         int64_t Wo);
int ek_dwconv_grad_weight(const float *x, const float *gy, float *gw, int64_t N, int64_t C,
                          int64_t H, int64_t W, int64_t M, int64_t kh, int64_t kw, int64_t sh,
                          int64_t sw, int64_t dh, int64_t dw, int64_t pt, int64_t pl, int64_t Ho,
                          int64_t Wo);

#endif
