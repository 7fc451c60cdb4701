// nnforge HLS templates: reductions over one run of axes, and square root.
//
// reduce: x viewed as [outer, n, inner]; y[o, i] = OP over k of x[o, k, i].
//   sum (act_t or int_t): the exact sum of raw values in 64 bits (codegen proves W + log2(n) < 63),
//   then one saturation into y's format (same format as x: no rounding).
//   any (bool_t): y = 1 if some x[o, k, i] != 0.
//   mean (act_t): the exact sum s, then round(s / n) half away from zero (as layer_norm's mean).
// sqrt: raw(y) = floor(sqrt(raw(x) * 2^F) + 1/2), computed as (isqrt(raw(x) * 2^(F+2)) + 1) >> 1
//   (x and y in one format, F fractional bits); x <= 0 gives 0 (torch gives NaN below 0).
// rsqrt: raw(y) ~ 2^F / sqrt(raw(x) 2^-F) = 2^(F + (F+p)/2) / sqrt(u), u = raw(x) << p, p = F & 1:
//   sh = even shift putting u's top bit at bit 60 or 61;  s = isqrt(u << sh);  r = floor(2^62 / s)
//   raw(y) = sat(round_shift(r, 62 - sh/2 - F - (F+p)/2));  x <= 0 gives the format's maximum
//   (torch gives inf at 0 and NaN below).
#ifndef NF_REDUCE_H_
#define NF_REDUCE_H_

#include "nf_types.h"
#include "nf_logic.h"

namespace nf {

enum reduce_op { RED_SUM = 0, RED_ANY = 1, RED_MEAN = 2 };

struct reduce_config {
    static const unsigned outer = 1, n = 8, inner = 1;
};

template <class x_T, class y_T, typename CONFIG_T, int OP> void reduce(const x_T *x, y_T *y) {
Outer:
    for (unsigned o = 0; o < CONFIG_T::outer; o++)
    Inner:
        for (unsigned i = 0; i < CONFIG_T::inner; i++) {
            wide_t acc = 0;
        Red:
            for (unsigned k = 0; k < CONFIG_T::n; k++) {
                #pragma HLS PIPELINE II=1
                const wide_t v = to_wide(x[(o * CONFIG_T::n + k) * CONFIG_T::inner + i]);
                if (OP == RED_ANY) acc = acc | wide_t(v != 0);
                else acc += v;
            }
            if (OP == RED_MEAN) {
                const wide_t n = CONFIG_T::n;
                acc = acc >= 0 ? wide_t((acc + n / 2) / n) : wide_t(-((-acc + n / 2) / n));
            }
            store(y[o * CONFIG_T::inner + i], acc);
        }
}

template <class T, unsigned N> void sqrt_fixed(const T x[N], T y[N]) {
    const int F = frac_bits<T>::value;
Sqrt:
    for (unsigned e = 0; e < N; e++) {
        const wide_t v = raw(x[e]);
        if (v <= 0) {
            y[e] = 0;
        } else {
            const uwide_t r = isqrt64(uwide_t(v) << (F + 2));
            y[e] = saturate<T, wide_t>(wide_t((r + 1) >> 1));
        }
    }
}

template <class T, unsigned N> void rsqrt_fixed(const T x[N], T y[N]) {
    const int F = frac_bits<T>::value, p = F & 1;
Rsqrt:
    for (unsigned e = 0; e < N; e++) {
        const wide_t v = raw(x[e]);
        if (v <= 0) {
            y[e] = saturate<T, wide_t>(wide_t(1) << 62);
        } else {
            const uwide_t u = uwide_t(v) << p;
            int bl = 0;
        BitLen:
            for (int b = 0; b < 64; b++)
                if (u[b]) bl = b + 1;
            int sh = 62 - bl;
            sh = sh < 0 ? 0 : (sh & ~1);
            const uwide_t r = (uwide_t(1) << 62) / isqrt64(u << sh);
            y[e] = round_to<T, wide_t>(wide_t(r), 62 - sh / 2 - F - (F + p) / 2);
        }
    }
}

}  // namespace nf

#endif
