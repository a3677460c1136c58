/* quantrain's CPU kernels: fake quantization with its straight-through mask in one pass, per-channel ranges, the
 * masked gradient, and a whole quantizer step (observe, update scale and zero point, fake-quantize) in one call.
 *
 * Each function computes, element by element, exactly what the PyTorch operations of quantrain/ops compute (the
 * same float32 operations in the same order, IEEE division, round half to even, NaN propagated as torch.clamp,
 * torch.amin and torch.amax do), so the two paths give identical bits. Build flags keep it so: no -ffast-math, and
 * -ffp-contract=off (no fused multiply-add). Tensors are contiguous float32, viewed as (outer, channels, inner):
 * one scale and zero point per channel (channels = 1 for one per tensor).
 *
 * The gradient mask is kept packed, one bit per element (element i is bit i % 8 of byte i / 8), 8 times smaller
 * than PyTorch's bool tensor. Threads share the work in runs of whole bytes, so no two write the same byte.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#define PARALLEL_GRAIN 32768 /* elements below which one thread does the work */
#define MASK_BLOCK 1024      /* mask bytes gathered before they are packed (a multiple of 8) */

enum { TRACK_MOVING_AVERAGE = 0, TRACK_CURRENT = 1, TRACK_RUNNING_EXTREMES = 2 };

/* A quantizer's constant settings (quantrain.ops.native.Plan). */
typedef struct {
    int32_t tracking;         /* TRACK_* */
    int32_t symmetric;        /* scale from max(-min, max); the zero point is a constant, left as it is */
    int32_t skip_nonfinite;   /* a channel whose batch range is not finite keeps its tracked range (and is counted) */
    int32_t has_gate, has_hi; /* a fused clamp(x, lo, hi) applied first (ReLU: no hi) */
    float decay, keep;        /* moving average: tracked * decay + current * keep, keep = (float)(1 - decay) */
    float qmin, qmax;
    float levels; /* (qmax - qmin) / 2 for symmetric, qmax - qmin for affine */
    float lo, hi;
} quantrain_plan;

static inline float clampf(float v, float lo, float hi) {
    /* torch.clamp: max then min, a NaN stays NaN (both comparisons are false) */
    v = v < lo ? lo : v;
    return v > hi ? hi : v;
}

static inline float maximum_nan(float a, float b) { return (a != a || b != b) ? NAN : (a > b ? a : b); }
static inline float minimum_nan(float a, float b) { return (a != a || b != b) ? NAN : (a < b ? a : b); }

/* ---- packed masks ---------------------------------------------------------------------------------------------- */

/* Mask bytes (0 or 1) of consecutive elements, packed into bits MASK_BLOCK at a time. `pos` (the element of buf[0])
 * is a multiple of 8 whenever the writer is flushed, so every flush writes whole bytes of its own. */
typedef struct {
    uint8_t *bits;
    int64_t pos;
    int64_t fill;
    uint8_t buf[MASK_BLOCK];
} mask_writer;

static void mask_flush(mask_writer *w) {
    uint8_t *dst = w->bits + w->pos / 8;
    const int64_t whole = w->fill / 8;
    for (int64_t k = 0; k < whole; k++) {
        uint64_t eight;
        memcpy(&eight, w->buf + 8 * k, 8);
        dst[k] = (uint8_t)((eight * 0x0102040810204080ULL) >> 56); /* byte j (0 or 1) to bit j, no carries */
    }
    if (w->fill > 8 * whole) { /* the tensor's last, partial byte */
        uint8_t last = 0;
        for (int64_t j = 0; j < w->fill - 8 * whole; j++) last |= (uint8_t)(w->buf[8 * whole + j] << j);
        dst[whole] = last;
    }
    w->pos += w->fill;
    w->fill = 0;
}

/* ---- fake quantization ----------------------------------------------------------------------------------------- */

/* n elements with one scale s and zero point z (has_zero_point):
 * out = (round(clamp(a / s + z, qmin, qmax)) - z) * s and mask = (clamp(t) == t), with a = x, or with
 * has_gate: a = clamp(x, lo, hi) (hi only when has_hi) and mask &= (lo < x && x < hi), the clamp's own gradient.
 * Without a zero point (symmetric signed) the additions are skipped, as in the PyTorch path. */
static void fake_quant_run(const float *x, float *out, uint8_t *mask, int64_t n, float s, int has_zero_point, float z,
                           const quantrain_plan *p) {
    const float qmin = p->qmin, qmax = p->qmax, lo = p->lo, hi = p->hi;
    if (p->has_gate) {
        const int has_hi = p->has_hi;
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

/* fake_quant_run on n elements, its mask bytes going through the writer. */
static void fake_quant_masked(mask_writer *w, const float *x, float *out, int64_t n, float s, int has_zero_point,
                              float z, const quantrain_plan *p) {
    while (n > 0) {
        int64_t take = MASK_BLOCK - w->fill;
        take = take < n ? take : n;
        fake_quant_run(x, out, w->buf + w->fill, take, s, has_zero_point, z, p);
        w->fill += take;
        x += take;
        out += take;
        n -= take;
        if (w->fill == MASK_BLOCK) mask_flush(w);
    }
}

/* Elements [start, stop) of x viewed as (rows, inner), row r with the scale of channel r % channels. */
static void fake_quant_span(const float *x, float *out, uint8_t *bits, int64_t start, int64_t stop, int64_t channels,
                            int64_t inner, const float *scale, const float *zero_point, const quantrain_plan *p) {
    mask_writer w;
    w.bits = bits;
    w.pos = start;
    w.fill = 0;
    for (int64_t i = start; i < stop;) {
        const int64_t row = i / inner, end = (row + 1) * inner < stop ? (row + 1) * inner : stop;
        const int64_t c = row % channels;
        fake_quant_masked(&w, x + i, out + i, end - i, scale[c], zero_point != NULL, zero_point ? zero_point[c] : 0.0f,
                          p);
        i = end;
    }
    mask_flush(&w);
}

/* Fake quantization of x viewed as (outer, channels, inner), one scale (and zero point, unless NULL) per channel,
 * the mask packed into bits; the threads take equal runs of whole bytes. */
void quantrain_fake_quant(const float *x, float *out, uint8_t *bits, const float *scale, const float *zero_point,
                          int64_t outer, int64_t channels, int64_t inner, const quantrain_plan *plan, int threads) {
    const int64_t n = outer * channels * inner;
    const int64_t pieces = n > PARALLEL_GRAIN ? threads : 1, step = ((n + pieces - 1) / pieces + 7) / 8 * 8;
#pragma omp parallel for num_threads(threads) schedule(static) if (pieces > 1)
    for (int64_t k = 0; k < pieces; k++) {
        const int64_t start = k * step < n ? k * step : n, stop = start + step < n ? start + step : n;
        fake_quant_span(x, out, bits, start, stop, channels, inner, scale, zero_point, plan);
    }
}

/* The straight-through gradient: out = grad * mask (as float: a zero keeps the gradient's sign, NaN stays NaN). */
void quantrain_masked_grad(const float *grad, const uint8_t *bits, float *out, int64_t n, int threads) {
    const int64_t bytes = n / 8;
#pragma omp parallel for num_threads(threads) schedule(static) if (n > PARALLEL_GRAIN)
    for (int64_t k = 0; k < bytes; k++) {
        const uint8_t b = bits[k];
        for (int j = 0; j < 8; j++) out[8 * k + j] = grad[8 * k + j] * (float)((b >> j) & 1);
    }
    for (int64_t i = 8 * bytes; i < n; i++) out[i] = grad[i] * (float)((bits[i / 8] >> (i % 8)) & 1);
}

/* ---- ranges ---------------------------------------------------------------------------------------------------- */

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

/* The whole tensor's minimum and maximum, a run per thread (NaN wins). */
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

/* ---- one quantizer step ---------------------------------------------------------------------------------------- */

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
        const float a = *tmin * p->decay, b = *tmax * p->decay;
        const float ca = cmin * p->keep, cb = cmax * p->keep;
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

/* Observe x (viewed as (outer, channels, inner), one range per channel), update the quantizer's buffers in place
 * (tracked_min, tracked_max, scale, and zero_point for affine), count a batch with a left-out range in *nonfinite,
 * then write out and the packed mask as quantrain_fake_quant does. quant_zero_point: the zero point the fake
 * quantization adds, NULL where it is 0 (symmetric signed). scratch: 2 * channels floats. */
void quantrain_observe_fake_quant(const float *x, float *out, uint8_t *bits, int64_t outer, int64_t channels,
                                  int64_t inner, const quantrain_plan *plan, float *tracked_min, float *tracked_max,
                                  float *scale, float *zero_point, const float *quant_zero_point, int64_t *nonfinite,
                                  float *scratch, int threads) {
    float *cmin = scratch, *cmax = scratch + channels;
    int left_out = 0;
    if (outer == 1 && channels > 1) {
        /* each channel is contiguous: observe and quantize it while it is in cache, 8 channels per task (their
         * elements are a multiple of 8, so each task writes whole mask bytes) */
        const int64_t groups = (channels + 7) / 8;
#pragma omp parallel for num_threads(threads) schedule(static) if (channels * inner > PARALLEL_GRAIN)
        for (int64_t g = 0; g < groups; g++) {
            mask_writer w;
            w.bits = bits;
            w.pos = 8 * g * inner;
            w.fill = 0;
            for (int64_t c = 8 * g; c < channels && c < 8 * g + 8; c++) {
                const float *xc = x + c * inner;
                rows_min_max(xc, 1, 0, inner, cmin + c, cmax + c);
                /* cmin[c] is done with: it keeps whether the channel's range was left out */
                cmin[c] = (float)update_channel(plan, cmin[c], cmax[c], tracked_min + c, tracked_max + c, scale + c,
                                                zero_point ? zero_point + c : NULL);
                fake_quant_masked(&w, xc, out + c * inner, inner, scale[c], quant_zero_point != NULL,
                                  quant_zero_point ? quant_zero_point[c] : 0.0f, plan);
            }
            mask_flush(&w);
        }
        for (int64_t c = 0; c < channels; c++) left_out |= cmin[c] != 0.0f;
    } else {
        if (channels == 1)
            tensor_min_max(x, outer * inner, cmin, cmax, threads);
        else
            quantrain_channel_min_max(x, cmin, cmax, outer, channels, inner, threads);
        for (int64_t c = 0; c < channels; c++)
            left_out |= update_channel(plan, cmin[c], cmax[c], tracked_min + c, tracked_max + c, scale + c,
                                       zero_point ? zero_point + c : NULL);
        quantrain_fake_quant(x, out, bits, scale, quant_zero_point, outer, channels, inner, plan, threads);
    }
    if (nonfinite && left_out) *nonfinite += 1;
}

/* ---- the folded batch norm's division ------------------------------------------------------------------------ */

/* Backward of out = y / s with one s per channel of y viewed as (outer, channels, inner): grad_y = grad / s (what
 * PyTorch's division gives) and grad_s = -sum(grad * out) / s per channel, the products summed in double precision
 * in a fixed order (so the result does not depend on the number of threads; PyTorch's float32 reduction rounds
 * differently, within a few units in the last place). grad_y NULL: not wanted. */
void quantrain_channel_divide_backward(const float *grad, const float *out, const float *s, float *grad_y,
                                       float *grad_s, int64_t outer, int64_t channels, int64_t inner, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static) if (outer * channels * inner > PARALLEL_GRAIN)
    for (int64_t c = 0; c < channels; c++) {
        const float sc = s[c];
        double total = 0.0;
        for (int64_t o = 0; o < outer; o++) {
            const int64_t start = (o * channels + c) * inner;
            const float *g = grad + start, *q = out + start;
            float partial[LANES] = {0};
            int64_t i = 0;
            for (; i + LANES <= inner; i += LANES)
                for (int j = 0; j < LANES; j++) partial[j] += g[i + j] * q[i + j];
            for (int j = 0; j < LANES; j++) total += partial[j];
            for (; i < inner; i++) total += g[i] * q[i];
            if (grad_y)
                for (int64_t k = 0; k < inner; k++) grad_y[start + k] = g[k] / sc;
        }
        if (grad_s) grad_s[c] = -(float)total / sc;
    }
}
