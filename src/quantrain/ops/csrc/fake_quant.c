/* quantrain's CPU kernels: fake quantization with its straight-through mask in one pass, and per-channel ranges.
 *
 * Each function computes, element by element, exactly what the PyTorch operations of quantrain/ops compute (the
 * same float32 operations in the same order, IEEE division, round half to even, NaN propagated as torch.clamp,
 * torch.amin and torch.amax do), so the two paths give identical bits. Build flags keep it so: no -ffast-math, and
 * -ffp-contract=off (no fused multiply-add). Tensors are contiguous float32, viewed as (outer, channels, inner):
 * one scale and zero point per channel (channels = 1 for one per tensor).
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#define PARALLEL_GRAIN 32768 /* elements below which one thread does the work */

static inline float clampf(float v, float lo, float hi) {
    /* torch.clamp: max then min, a NaN stays NaN (both comparisons are false) */
    v = v < lo ? lo : v;
    return v > hi ? hi : v;
}

/* One row of n elements with one scale s and zero point z (has_zero_point):
 * out = (round(clamp(a / s + z, qmin, qmax)) - z) * s and mask = (clamp(t) == t), with a = x, or with
 * has_gate: a = clamp(x, lo, hi) (hi only when has_hi) and mask &= (lo < x && x < hi), the clamp's own gradient.
 * Without a zero point (symmetric signed) the additions are skipped, as in the PyTorch path. */
static void fake_quant_row(const float *x, float *out, uint8_t *mask, int64_t n, float s, int has_zero_point, float z,
                           float qmin, float qmax, int has_gate, float lo, int has_hi, float hi) {
    if (has_gate) {
        for (int64_t i = 0; i < n; i++) {
            const float v = x[i];
            const uint8_t gate = has_hi ? (lo < v) & (v < hi) : (lo < v);
            const float a = has_hi ? clampf(v, lo, hi) : (v < lo ? lo : v);
            float t = a / s;
            if (has_zero_point) t = t + z;
            const float q = clampf(t, qmin, qmax);
            mask[i] = (uint8_t)(q == t) & gate;
            out[i] = has_zero_point ? (rintf(q) - z) * s : rintf(q) * s;
        }
    } else if (has_zero_point) {
        for (int64_t i = 0; i < n; i++) {
            const float t = x[i] / s + z;
            const float q = clampf(t, qmin, qmax);
            mask[i] = q == t;
            out[i] = (rintf(q) - z) * s;
        }
    } else {
        for (int64_t i = 0; i < n; i++) {
            const float t = x[i] / s;
            const float q = clampf(t, qmin, qmax);
            mask[i] = q == t;
            out[i] = rintf(q) * s;
        }
    }
}

/* Fake quantization of x viewed as (outer, channels, inner), one scale (and zero point, unless NULL) per channel:
 * rows of one channel each, or blocks of rows when a row is short, shared among the threads. */
void quantrain_fake_quant(const float *x, float *out, uint8_t *mask, const float *scale, const float *zero_point,
                          int64_t outer, int64_t channels, int64_t inner, float qmin, float qmax, int has_gate,
                          float lo, int has_hi, float hi, int threads) {
    const int64_t rows = outer * channels;
    if (channels == 1) { /* one scale: split the whole tensor into equal pieces instead */
        const int64_t n = rows * inner, pieces = n > PARALLEL_GRAIN ? threads : 1, step = (n + pieces - 1) / pieces;
        const float z = zero_point ? zero_point[0] : 0.0f;
#pragma omp parallel for num_threads(threads) schedule(static) if (pieces > 1)
        for (int64_t k = 0; k < pieces; k++) {
            const int64_t start = k * step < n ? k * step : n, stop = start + step < n ? start + step : n;
            fake_quant_row(x + start, out + start, mask + start, stop - start, scale[0], zero_point != NULL, z, qmin,
                           qmax, has_gate, lo, has_hi, hi);
        }
        return;
    }
#pragma omp parallel for num_threads(threads) schedule(static) if (rows * inner > PARALLEL_GRAIN)
    for (int64_t r = 0; r < rows; r++) {
        const int64_t c = r % channels, start = r * inner;
        fake_quant_row(x + start, out + start, mask + start, inner, scale[c], zero_point != NULL,
                       zero_point ? zero_point[c] : 0.0f, qmin, qmax, has_gate, lo, has_hi, hi);
    }
}

/* 16 running minima and maxima side by side (GCC/Clang vector extensions, so that the scan is vectorized without
 * -ffast-math: a < b ? a : b as a comparison and a blend, the comparison false for NaN, which is tracked apart). */
#define LANES 16
typedef float lanes_f __attribute__((vector_size(LANES * sizeof(float))));
typedef int32_t lanes_i __attribute__((vector_size(LANES * sizeof(float))));

static inline lanes_f pick(lanes_i take_a, lanes_f a, lanes_f b) {
    return (lanes_f)(((lanes_i)a & take_a) | ((lanes_i)b & ~take_a));
}

/* The minimum and maximum of `rows` rows of n elements, `stride` apart; a NaN wins, as in torch.amin/amax. */
static void rows_min_max(const float *x, int64_t rows, int64_t stride, int64_t n, float *mn, float *mx) {
    lanes_f lo, hi;
    lanes_i nan = {0};
    float l = INFINITY, h = -INFINITY;
    int32_t any_nan = 0;
    for (int j = 0; j < LANES; j++) lo[j] = INFINITY, hi[j] = -INFINITY;
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * stride;
        int64_t i = 0;
        for (; i + LANES <= n; i += LANES) {
            lanes_f v;
            memcpy(&v, xr + i, sizeof v);
            nan |= v != v;
            lo = pick(v < lo, v, lo);
            hi = pick(v > hi, v, hi);
        }
        for (; i < n; i++) {
            const float v = xr[i];
            any_nan |= v != v;
            l = v < l ? v : l;
            h = v > h ? v : h;
        }
    }
    for (int j = 0; j < LANES; j++) {
        any_nan |= nan[j];
        l = lo[j] < l ? lo[j] : l;
        h = hi[j] > h ? hi[j] : h;
    }
    *mn = any_nan ? NAN : l;
    *mx = any_nan ? NAN : h;
}

/* Per-channel minimum and maximum of x viewed as (outer, channels, inner): mins[c], maxs[c]. */
void quantrain_channel_min_max(const float *x, float *mins, float *maxs, int64_t outer, int64_t channels,
                               int64_t inner, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static) if (outer * channels * inner > PARALLEL_GRAIN)
    for (int64_t c = 0; c < channels; c++) rows_min_max(x + c * inner, outer, channels * inner, inner, mins + c, maxs + c);
}

/* The straight-through gradient: out = grad * mask (as float: a zero keeps the gradient's sign, NaN stays NaN). */
void quantrain_masked_grad(const float *grad, const uint8_t *mask, float *out, int64_t n, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static) if (n > PARALLEL_GRAIN)
    for (int64_t i = 0; i < n; i++) out[i] = grad[i] * (float)mask[i];
}

/* ---- one quantizer step: observe the range, update scale and zero point, fake-quantize ------------------------ */

enum { TRACK_MOVING_AVERAGE = 0, TRACK_CURRENT = 1, TRACK_RUNNING_EXTREMES = 2 };

typedef struct {
    int32_t tracking;       /* TRACK_* */
    int32_t symmetric;      /* scale from max(-min, max); the zero point is a constant, left as it is */
    int32_t skip_nonfinite; /* a channel whose batch range is not finite keeps its tracked range (and is counted) */
    int32_t has_gate, has_hi; /* a fused clamp(x, lo, hi) applied first (ReLU: no hi) */
    float decay, keep;      /* moving average: tracked * decay + current * keep, keep = (float)(1 - decay) */
    float qmin, qmax;
    float levels;           /* (qmax - qmin) / 2 for symmetric, qmax - qmin for affine */
    float lo, hi;
} quantrain_plan;

static inline float maximum_nan(float a, float b) { return (a != a || b != b) ? NAN : (a > b ? a : b); }
static inline float minimum_nan(float a, float b) { return (a != a || b != b) ? NAN : (a < b ? a : b); }

/* Track one channel's batch range [cmin, cmax] and write its scale (and affine zero point), as
 * RangeObserver.forward then FakeQuantizer._update_qparams do. Returns whether the batch range was left out. */
static int update_channel(const quantrain_plan *p, float cmin, float cmax, float *tmin, float *tmax, float *scale,
                          float *zero_point) {
    int left_out = 0;
    if (p->has_gate) { /* the range of clamp(x, lo, hi): torch.clamp of the range */
        cmin = cmin < p->lo ? p->lo : cmin;
        cmax = cmax < p->lo ? p->lo : cmax;
        if (p->has_hi) cmin = cmin > p->hi ? p->hi : cmin, cmax = cmax > p->hi ? p->hi : cmax;
    }
    if (p->skip_nonfinite && !isfinite(cmin + cmax)) { /* keep the tracked range */
        left_out = 1;
        cmin = *tmin;
        cmax = *tmax;
    }
    if (p->tracking == TRACK_MOVING_AVERAGE) {
        float a = *tmin * p->decay, b = *tmax * p->decay;
        float ca = cmin * p->keep, cb = cmax * p->keep;
        *tmin = a + ca;
        *tmax = b + cb;
    } else if (p->tracking == TRACK_RUNNING_EXTREMES) {
        *tmin = minimum_nan(*tmin, cmin);
        *tmax = maximum_nan(*tmax, cmax);
    } else {
        *tmin = cmin;
        *tmax = cmax;
    }
    float s;
    if (p->symmetric) {
        s = maximum_nan(-*tmin, *tmax) / p->levels;
        *scale = s < FLT_EPSILON ? FLT_EPSILON : s;
    } else {
        const float l = *tmin > 0.0f ? 0.0f : *tmin, h = *tmax < 0.0f ? 0.0f : *tmax;
        s = (h - l) / p->levels;
        s = s < FLT_EPSILON ? FLT_EPSILON : s;
        *scale = s;
        *zero_point = clampf(p->qmin - rintf(l / s), p->qmin, p->qmax);
    }
    return left_out;
}

/* The whole tensor's minimum and maximum, in parallel chunks (NaN wins). */
static void tensor_min_max(const float *x, int64_t n, float *mn, float *mx, int threads) {
    enum { MAX_PIECES = 64 };
    float lo[MAX_PIECES], hi[MAX_PIECES];
    const int64_t pieces = n > PARALLEL_GRAIN ? (threads < MAX_PIECES ? threads : MAX_PIECES) : 1;
    const int64_t step = (n + pieces - 1) / pieces;
#pragma omp parallel for num_threads(threads) schedule(static) if (pieces > 1)
    for (int64_t k = 0; k < pieces; k++) {
        const int64_t start = k * step < n ? k * step : n, stop = start + step < n ? start + step : n;
        rows_min_max(x + start, 1, 0, stop - start, lo + k, hi + k);
    }
    float l = INFINITY, h = -INFINITY;
    for (int64_t k = 0; k < pieces; k++) {
        l = minimum_nan(l, lo[k]);
        h = maximum_nan(h, hi[k]);
    }
    *mn = l;
    *mx = h;
}

/* Observe x (viewed as (outer, channels, inner), one range per channel), update the quantizer's buffers in place
 * (tracked_min, tracked_max, scale, and zero_point for affine), count a batch with a left-out range in *nonfinite,
 * then write out and mask as quantrain_fake_quant does. quant_zero_point: the zero point the fake quantization
 * adds, NULL where it is 0 (symmetric signed). */
void quantrain_observe_fake_quant(const float *x, float *out, uint8_t *mask, int64_t outer, int64_t channels,
                                  int64_t inner, const quantrain_plan *plan, float *tracked_min, float *tracked_max,
                                  float *scale, float *zero_point, const float *quant_zero_point, int64_t *nonfinite,
                                  float *scratch, int threads) {
    float *cmin = scratch, *cmax = scratch + channels;
    int left_out = 0;
    if (channels == 1) {
        tensor_min_max(x, outer * inner, cmin, cmax, threads);
    } else if (outer > 1) {
        quantrain_channel_min_max(x, cmin, cmax, outer, channels, inner, threads);
    }
    if (outer == 1 && channels > 1) { /* each channel is contiguous: observe and quantize it while it is in cache */
#pragma omp parallel for num_threads(threads) schedule(static) if (channels * inner > PARALLEL_GRAIN)
        for (int64_t c = 0; c < channels; c++) {
            rows_min_max(x + c * inner, 1, 0, inner, cmin + c, cmax + c);
            /* cmin[c] is done with: it keeps whether the channel's range was left out */
            cmin[c] = (float)update_channel(plan, cmin[c], cmax[c], tracked_min + c, tracked_max + c, scale + c,
                                            zero_point ? zero_point + c : NULL);
            fake_quant_row(x + c * inner, out + c * inner, mask + c * inner, inner, scale[c], quant_zero_point != NULL,
                           quant_zero_point ? quant_zero_point[c] : 0.0f, plan->qmin, plan->qmax, plan->has_gate,
                           plan->lo, plan->has_hi, plan->hi);
        }
        for (int64_t c = 0; c < channels; c++) left_out |= cmin[c] != 0.0f;
    } else {
        for (int64_t c = 0; c < channels; c++)
            left_out |= update_channel(plan, cmin[c], cmax[c], tracked_min + c, tracked_max + c, scale + c,
                                       zero_point ? zero_point + c : NULL);
        quantrain_fake_quant(x, out, mask, scale, quant_zero_point, outer, channels, inner, plan->qmin, plan->qmax,
                             plan->has_gate, plan->lo, plan->has_hi, plan->hi, threads);
    }
    if (nonfinite && left_out) *nonfinite += 1;
}
