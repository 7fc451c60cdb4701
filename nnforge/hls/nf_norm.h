// nnforge HLS templates: layer norm and RMS norm over the last axis (gamma, beta from weight memory).
//
//   mu   = round(sum raw(x) / n) (half away from zero; 0 for RMS norm);  d_i = raw(x_i) - mu
//   v    = floor(sum d_i^2 / n) + eps_raw               (2F fractional bits; eps_raw >= 1)
//   sh   = even shift putting v's top bit at bit 60 or 61;  s = isqrt(v << sh)  (~2^30..2^31)
//   r    = floor(2^62 / s);   z_i = round_shift(d_i * r, 62 - sh/2 - F_x)     (z at F_x bits)
//   raw(y_i) = round_shift(z_i * gamma_i + (beta_i << F_x), F_x + F_x - F_y)  (gamma, beta raw at F_x)
#ifndef NF_NORM_H_
#define NF_NORM_H_

#include "nf_types.h"

namespace nf {

struct norm_config {
    static const unsigned n_rows = 1, n = 16;
    static const bool rms = false;          // RMS norm: no mean subtraction
    static const long eps_raw = 1;          // eps * 2^(2 F_x), at least 1
    static const bool has_gamma = true, has_beta = true;
    static const unsigned long gamma_off = 0, beta_off = 0;
};

template <class x_T, class y_T, typename CONFIG_T>
void layer_norm(const x_T x[CONFIG_T::n_rows * CONFIG_T::n], y_T y[CONFIG_T::n_rows * CONFIG_T::n],
                const unsigned char *wmem) {
    const int F = frac_bits<x_T>::value;
    const wide_t n = CONFIG_T::n;
Rows:
    for (unsigned r = 0; r < CONFIG_T::n_rows; r++) {
        const x_T *xr = x + r * CONFIG_T::n;
        wide_t s = 0;
    Sum:
        for (unsigned i = 0; i < CONFIG_T::n; i++) {
            #pragma HLS PIPELINE II=1
            s += raw(xr[i]);
        }
        wide_t mu = 0;
        if (!CONFIG_T::rms) mu = s >= 0 ? wide_t((s + n / 2) / n) : wide_t(-((-s + n / 2) / n));
        uwide_t ss = 0;
    Var:
        for (unsigned i = 0; i < CONFIG_T::n; i++) {
            #pragma HLS PIPELINE II=1
            wide_t d = wide_t(raw(xr[i])) - mu;
            ss += uwide_t(d * d);
        }
        uwide_t v = ss / uwide_t(n) + uwide_t(CONFIG_T::eps_raw);
        int bl = 0;
    BitLen:
        for (int b = 0; b < 64; b++)
            if (v[b]) bl = b + 1;
        int sh = 62 - bl;
        sh = sh < 0 ? 0 : (sh & ~1);
        const uwide_t sq = isqrt64(v << sh);
        const wide_t rcp = wide_t((uwide_t(1) << 62) / sq);
    Scale:
        for (unsigned i = 0; i < CONFIG_T::n; i++) {
            #pragma HLS PIPELINE II=1
            wide_t d = wide_t(raw(xr[i])) - mu;
            wide_t z = round_shift<wide_t>(d * rcp, 62 - sh / 2 - F);
            wide_t g = CONFIG_T::has_gamma ? wide_t(read_i32(wmem + CONFIG_T::gamma_off + 4ul * i)) : (wide_t(1) << F);
            wide_t b = CONFIG_T::has_beta ? wide_t(read_i32(wmem + CONFIG_T::beta_off + 4ul * i)) : wide_t(0);
            y[r * CONFIG_T::n + i] = round_to<y_T, wide_t>(z * g + (b << F), F + F - frac_bits<y_T>::value);
        }
    }
}

}  // namespace nf

#endif
