// nnforge HLS templates: softmax over the last axis.
//
//   d_i = raw(x_i) - max_j raw(x_j)                     (<= 0)
//   e_i = exp LUT (interpolated, as activation_lut) at e_frac fractional bits; 0 left of the table
//   s   = sum e_i;  r = floor(2^62 / s)                  (one divider per row)
//   raw(y_i) = round_shift(e_i * r, 62 - F_y)            (AP_RND, AP_SAT)
// e(0) = 2^e_frac exactly, so s >= 2^e_frac and every product stays below 2^62.
#ifndef NF_SOFTMAX_H_
#define NF_SOFTMAX_H_

#include "nf_types.h"

namespace nf {

struct softmax_config {
    static const unsigned n_rows = 1, n = 16;
    static const long lut_lo = -(16l << 16);  // raw x - max of exp table entry 0 (x's format)
    static const unsigned step_shift = 10;
    static const unsigned lut_n = 1024;       // table steps: entries cover [lut_lo, 0]
    static const unsigned e_frac = 20;
};

template <class x_T, class y_T, typename CONFIG_T>
void softmax(const x_T x[CONFIG_T::n_rows * CONFIG_T::n], y_T y[CONFIG_T::n_rows * CONFIG_T::n],
             const int table[CONFIG_T::lut_n + 1]) {
    const wide_t mask = (wide_t(1) << CONFIG_T::step_shift) - 1;
    wide_t e[CONFIG_T::n];
Rows:
    for (unsigned r = 0; r < CONFIG_T::n_rows; r++) {
        const x_T *xr = x + r * CONFIG_T::n;
        wide_t mx = raw(xr[0]);
    Max:
        for (unsigned i = 1; i < CONFIG_T::n; i++) {
            #pragma HLS PIPELINE II=1
            wide_t v = raw(xr[i]);
            mx = v > mx ? v : mx;
        }
        uwide_t sum = 0;
    Exp:
        for (unsigned i = 0; i < CONFIG_T::n; i++) {
            #pragma HLS PIPELINE II=1
            wide_t d = wide_t(raw(xr[i])) - mx - wide_t(CONFIG_T::lut_lo);
            if (d < 0) {
                e[i] = 0;
            } else {
                unsigned k = (unsigned)(d >> CONFIG_T::step_shift).to_uint64();
                wide_t f = d & mask, t0 = table[k], t1 = k < CONFIG_T::lut_n ? wide_t(table[k + 1]) : t0;
                e[i] = t0 + round_shift<wide_t>((t1 - t0) * f, CONFIG_T::step_shift);
            }
            sum += uwide_t(e[i]);
        }
        const uwide_t recip = (uwide_t(1) << 62) / sum;
    Normalise:
        for (unsigned i = 0; i < CONFIG_T::n; i++) {
            #pragma HLS PIPELINE II=1
            wide_t p = e[i] * wide_t(recip);
            y[r * CONFIG_T::n + i] = round_to<y_T, wide_t>(p, 62 - frac_bits<y_T>::value);
        }
    }
}

}  // namespace nf

#endif
