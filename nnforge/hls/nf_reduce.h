// nnforge HLS templates: reductions over one run of axes, and square root.
//
// reduce: x viewed as [outer, n, inner]; y[o, i] = OP over k of x[o, k, i].
//   sum (act_t or int_t): the exact sum of raw values in 64 bits (codegen proves W + log2(n) < 63),
//   then one saturation into y's format (same format as x: no rounding).
//   any (bool_t): y = 1 if some x[o, k, i] != 0.
// sqrt: raw(y) = floor(sqrt(raw(x) * 2^F) + 1/2), computed as (isqrt(raw(x) * 2^(F+2)) + 1) >> 1
//   (x and y in one format, F fractional bits); x <= 0 gives 0 (torch gives NaN below 0).
#ifndef NF_REDUCE_H_
#define NF_REDUCE_H_

#include "nf_types.h"
#include "nf_logic.h"

namespace nf {

enum reduce_op { RED_SUM = 0, RED_ANY = 1 };

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
                if (OP == RED_SUM) acc += v;
                else acc = acc | wide_t(v != 0);
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

}  // namespace nf

#endif
