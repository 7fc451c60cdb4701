// nnforge HLS templates: element-wise activations.
//
// GELU / SiLU / tanh-GELU are one kernel, a look-up table with linear interpolation (the table is
// a ROM that codegen fills from the exact float function, rounded to y's raw format):
//   d = raw(x) - lut_lo;  x below the table -> below (0);  at or past its end -> x (identity)
//   i = d >> step_shift;  f = d & (2^step_shift - 1)
//   raw(y) = T[i] + round_shift((T[i+1] - T[i]) * f, step_shift)
// With x at 16 fractional bits and a step of 2^-6 over [-8, 8) (1024 + 1 entries) the
// interpolation error of GELU is below 2.5e-5. Sigmoid and tanh use the same kernel with saturating
// tails: below the table y = T[0], at or past its end y = T[lut_n].
//
// neg:     raw(y) = sat(-raw(x))
// pow_int: x^k for an integer k >= 2 as k - 1 products, each rounded back to x's format and saturated:
//          p_1 = raw(x);  p_j = sat(round_shift(p_(j-1) * raw(x), F_x));  raw(y) = round_to(p_k, F_x - F_y)
#ifndef NF_ACTIVATION_H_
#define NF_ACTIVATION_H_

#include "nf_types.h"

namespace nf {

struct lut_config {
    static const unsigned n_in = 16;
    static const long lut_lo = -(8l << 16);   // raw x of table entry 0 (in x's format)
    static const unsigned step_shift = 10;    // raw units per table step = 2^step_shift
    static const unsigned lut_n = 1024;       // table steps (the table holds lut_n + 1 entries)
    static const int below = 0;               // raw y left of the table
    static const bool identity_above = true;  // right of the table y = x (else y = T[lut_n])
};

template <class x_T, class y_T, typename CONFIG_T>
void activation_lut(const x_T x[CONFIG_T::n_in], y_T y[CONFIG_T::n_in], const int table[CONFIG_T::lut_n + 1]) {
    const wide_t span = wide_t(CONFIG_T::lut_n) << CONFIG_T::step_shift;
    const wide_t mask = (wide_t(1) << CONFIG_T::step_shift) - 1;
Elements:
    for (unsigned e = 0; e < CONFIG_T::n_in; e++) {
        #pragma HLS PIPELINE II=1
        wide_t v = raw(x[e]);
        wide_t d = v - wide_t(CONFIG_T::lut_lo);
        wide_t out;
        if (d < 0) {
            out = CONFIG_T::below;
        } else if (d >= span) {
            out = CONFIG_T::identity_above ? round_shift<wide_t>(v, frac_bits<x_T>::value - frac_bits<y_T>::value)
                                           : wide_t(table[CONFIG_T::lut_n]);
        } else {
            unsigned i = (unsigned)(d >> CONFIG_T::step_shift).to_uint64();
            wide_t f = d & mask, t0 = table[i], t1 = table[i + 1];
            out = t0 + round_shift<wide_t>((t1 - t0) * f, CONFIG_T::step_shift);
        }
        y[e] = saturate<y_T, wide_t>(out);
    }
}

struct relu_config {
    static const unsigned n_in = 16;
};

template <class x_T, class y_T, typename CONFIG_T> void relu(const x_T x[CONFIG_T::n_in], y_T y[CONFIG_T::n_in]) {
Elements:
    for (unsigned e = 0; e < CONFIG_T::n_in; e++) {
        #pragma HLS PIPELINE II=1
        wide_t v = raw(x[e]);
        y[e] = round_to<y_T, wide_t>(v < 0 ? wide_t(0) : v, frac_bits<x_T>::value - frac_bits<y_T>::value);
    }
}

// clamp(x, lo, hi) on raw values (bounds rounded to x's format by codegen; absent bound = type limit).
struct clamp_config {
    static const unsigned n_in = 16;
    static const long lo = -(1l << 23), hi = (1l << 23) - 1;
};

template <class x_T, class y_T, typename CONFIG_T> void clamp(const x_T x[CONFIG_T::n_in], y_T y[CONFIG_T::n_in]) {
Elements:
    for (unsigned e = 0; e < CONFIG_T::n_in; e++) {
        #pragma HLS PIPELINE II=1
        wide_t v = raw(x[e]);
        v = v < wide_t(CONFIG_T::lo) ? wide_t(CONFIG_T::lo) : (v > wide_t(CONFIG_T::hi) ? wide_t(CONFIG_T::hi) : v);
        y[e] = round_to<y_T, wide_t>(v, frac_bits<x_T>::value - frac_bits<y_T>::value);
    }
}

struct neg_config {
    static const unsigned n_in = 16;
};

template <class x_T, class y_T, typename CONFIG_T> void neg(const x_T x[CONFIG_T::n_in], y_T y[CONFIG_T::n_in]) {
Elements:
    for (unsigned e = 0; e < CONFIG_T::n_in; e++) {
        #pragma HLS PIPELINE II=1
        wide_t v = raw(x[e]);
        y[e] = round_to<y_T, wide_t>(-v, frac_bits<x_T>::value - frac_bits<y_T>::value);
    }
}

struct pow_config {
    static const unsigned n_in = 16;
    static const unsigned exponent = 2;       // >= 2 (codegen lowers 0 and 1 to a fill and a copy)
};

template <class x_T, class y_T, typename CONFIG_T> void pow_int(const x_T x[CONFIG_T::n_in], y_T y[CONFIG_T::n_in]) {
    const int F = frac_bits<x_T>::value;
    const wide_t hi = (wide_t(1) << (x_T::width - 1)) - 1, lo = -hi - 1;
Elements:
    for (unsigned e = 0; e < CONFIG_T::n_in; e++) {
        #pragma HLS PIPELINE II=1
        const wide_t v = raw(x[e]);
        wide_t p = v;
    Power:
        for (unsigned j = 1; j < CONFIG_T::exponent; j++) {
            p = round_shift<wide_t>(p * v, F);
            p = p > hi ? hi : (p < lo ? lo : p);
        }
        y[e] = round_to<y_T, wide_t>(p, F - frac_bits<y_T>::value);
    }
}

}  // namespace nf

#endif
