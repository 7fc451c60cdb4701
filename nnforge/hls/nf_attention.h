// nnforge HLS templates: attention for batch-1 decoding with the KV cache in off-chip memory.
//
// One call = one decode step at position `pos` for n_heads heads of head_dim:
//   1. k_new, v_new are written to the cache (off-chip, an m_axi port): raw activations as int32,
//      laid out [2 (k, v)][n_heads][max_len][head_dim].
//   2. s_t = round_shift(round_shift(sum_d q_d k_td, F) * scale_m, scale_shift)   for t = 0..pos
//      (scale_m * 2^-scale_shift = 1/sqrt(head_dim); scores at F fractional bits, on chip)
//   3. p_t = softmax(s)_t exactly as nf::softmax (exp LUT, one divider), rounded to F bits
//   4. raw(out_d) = round_shift(sum_t p_t v_td, F), saturated
// Only the rows 0..pos of the cache are read (the KV cache streams from HBM once per step).
#ifndef NF_ATTENTION_H_
#define NF_ATTENTION_H_

#include "nf_types.h"

namespace nf {

struct attention_decode_config {
    static const unsigned n_heads = 2, head_dim = 16, max_len = 64;
    static const long scale_m = 16384;          // 1/sqrt(head_dim) * 2^scale_shift
    static const unsigned scale_shift = 16;
    static const long lut_lo = -(16l << 16);    // exp table, as softmax_config
    static const unsigned step_shift = 10, lut_n = 1024, e_frac = 20;
};

template <class x_T, class y_T, typename CONFIG_T>
void attention_decode(const x_T q[CONFIG_T::n_heads * CONFIG_T::head_dim],
                      const x_T k_new[CONFIG_T::n_heads * CONFIG_T::head_dim],
                      const x_T v_new[CONFIG_T::n_heads * CONFIG_T::head_dim], int *kv_mem, unsigned pos,
                      y_T out[CONFIG_T::n_heads * CONFIG_T::head_dim], const int table[CONFIG_T::lut_n + 1]) {
    const int F = frac_bits<x_T>::value;
    const unsigned D = CONFIG_T::head_dim, L = CONFIG_T::max_len;
    const unsigned long v_base = (unsigned long)CONFIG_T::n_heads * L * D;
    const wide_t mask = (wide_t(1) << CONFIG_T::step_shift) - 1;
    wide_t s[CONFIG_T::max_len];
    wide_t p[CONFIG_T::max_len];
    wide_t qh[CONFIG_T::head_dim];
    #pragma HLS ARRAY_PARTITION variable=qh complete
Heads:
    for (unsigned h = 0; h < CONFIG_T::n_heads; h++) {
        const unsigned long kh = (unsigned long)h * L * D, vh = v_base + kh;
    Append:
        for (unsigned d = 0; d < D; d++) {
            #pragma HLS PIPELINE II=1
            kv_mem[kh + (unsigned long)pos * D + d] = (int)raw(k_new[h * D + d]).to_int64();
            kv_mem[vh + (unsigned long)pos * D + d] = (int)raw(v_new[h * D + d]).to_int64();
            qh[d] = raw(q[h * D + d]);
        }
        wide_t mx = 0;
    Scores:
        for (unsigned t = 0; t <= pos; t++) {
            #pragma HLS PIPELINE II=1
            wide_t acc = 0;
            for (unsigned d = 0; d < D; d++) acc += qh[d] * wide_t(kv_mem[kh + (unsigned long)t * D + d]);
            s[t] = round_shift<wide_t>(round_shift<wide_t>(acc, F) * wide_t(CONFIG_T::scale_m), CONFIG_T::scale_shift);
            mx = (t == 0 || s[t] > mx) ? s[t] : mx;
        }
        uwide_t sum = 0;
    Exp:
        for (unsigned t = 0; t <= pos; t++) {
            #pragma HLS PIPELINE II=1
            wide_t dd = s[t] - mx - wide_t(CONFIG_T::lut_lo);
            if (dd < 0) {
                p[t] = 0;
            } else {
                unsigned k = (unsigned)(dd >> CONFIG_T::step_shift).to_uint64();
                wide_t f = dd & mask, t0 = table[k], t1 = k < CONFIG_T::lut_n ? wide_t(table[k + 1]) : t0;
                p[t] = t0 + round_shift<wide_t>((t1 - t0) * f, CONFIG_T::step_shift);
            }
            sum += uwide_t(p[t]);
        }
        const wide_t recip = wide_t((uwide_t(1) << 62) / sum);
    Probs:
        for (unsigned t = 0; t <= pos; t++) {
            #pragma HLS PIPELINE II=1
            p[t] = round_shift<wide_t>(p[t] * recip, 62 - F);
        }
    Context:
        for (unsigned d = 0; d < D; d++) {
            wide_t acc = 0;
            for (unsigned t = 0; t <= pos; t++) {
                #pragma HLS PIPELINE II=1
                acc += p[t] * wide_t(kv_mem[vh + (unsigned long)t * D + d]);
            }
            out[h * D + d] = round_to<y_T, wide_t>(acc, F + F - frac_bits<y_T>::value);
        }
    }
}

}  // namespace nf

#endif
