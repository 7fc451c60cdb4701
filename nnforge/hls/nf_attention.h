// nnforge HLS templates: the decoder's attention kernels, with the KV cache in off-chip memory.
//
// The KV cache is one m_axi port of int32 words (kv_mem, in HBM/DDR): each cache a region
// [batch][kv_heads][max_len][head_dim] of raw activations at the activation format, at its own
// word offset. It stays in off-chip memory between calls: a prefill call writes the prompt's rows,
// each decode call writes one row per layer and reads the rows 0..pos (FlightLLM's decode mode).
//
//   rope:       y_d = round_shift(x_d cos[p][d] + x_partner(d) sin'[p][d], F), saturated; the tables
//               (sin' with the rotation's sign folded in) are precomputed for every slot p of the
//               cache and held in weight memory, so the design synthesises no cos/sin.
//   kv_write:   the new rows x [batch][kv_heads][rows][head_dim] into the cache at slot positions[b][j]
//               (a slot past the cache is not written).
//   attention:  for query row j of head h (kv head h / (n_heads / kv_heads)) at pos = positions[b][j],
//               over the slots lo..pos (lo = pos - window + 1 with a sliding window, else 0):
//     s_t = round_shift(round_shift(sum_d q_d k_td, F) * scale_m, scale_shift)   (scores at F bits)
//     p_t = softmax(s)_t exactly as nf::softmax (exp table, one divider), rounded to F bits
//     raw(out_d) = round_shift(sum_t p_t v_td, F), saturated
//   Only those rows of the cache are read: the cache streams from off-chip memory once per step.
#ifndef NF_ATTENTION_H_
#define NF_ATTENTION_H_

#include "nf_types.h"
#include "nf_index.h"

namespace nf {

struct rope_config {
    static const unsigned n_batch = 1, n_heads = 2, n_rows = 1, head_dim = 16, rotated = 16;
    static const bool interleaved = false;      // pairs (2i, 2i+1) (GPT-J); else (i, i + rotated/2) (Llama)
    static const unsigned n_slots = 64;         // table rows: positions 0..n_slots-1
    static const unsigned long cos_off = 0, sin_off = 0;   // int32 raw [n_slots][rotated] in weight memory
};

template <class x_T, class y_T, typename CONFIG_T>
void rope(const x_T x[CONFIG_T::n_batch * CONFIG_T::n_heads * CONFIG_T::n_rows * CONFIG_T::head_dim],
          const int_t positions[CONFIG_T::n_batch * CONFIG_T::n_rows],
          y_T y[CONFIG_T::n_batch * CONFIG_T::n_heads * CONFIG_T::n_rows * CONFIG_T::head_dim],
          const unsigned char *wmem) {
    const int F = frac_bits<x_T>::value;
    const unsigned D = CONFIG_T::head_dim, R = CONFIG_T::rotated, S = CONFIG_T::n_rows;
Rows:
    for (unsigned b = 0; b < CONFIG_T::n_batch; b++)
        for (unsigned h = 0; h < CONFIG_T::n_heads; h++)
            for (unsigned j = 0; j < S; j++) {
                long long p = positions[b * S + j].to_int64();
                // a position past the table reads its last row (the runner refuses such positions)
                const unsigned long slot = p < 0 ? 0 : (p >= (long long)CONFIG_T::n_slots ? CONFIG_T::n_slots - 1 : p);
                const unsigned long base = ((unsigned long)(b * CONFIG_T::n_heads + h) * S + j) * D;
            Dims:
                for (unsigned d = 0; d < D; d++) {
                    #pragma HLS PIPELINE II=1
                    if (d >= R) {
                        y[base + d] = round_to<y_T, wide_t>(wide_t(raw(x[base + d])), F - frac_bits<y_T>::value);
                        continue;
                    }
                    const unsigned partner = CONFIG_T::interleaved ? (d ^ 1u) : (d < R / 2 ? d + R / 2 : d - R / 2);
                    const wide_t c = read_i32(wmem + CONFIG_T::cos_off + 4 * (slot * R + d));
                    const wide_t s = read_i32(wmem + CONFIG_T::sin_off + 4 * (slot * R + d));
                    const wide_t acc = wide_t(raw(x[base + d])) * c + wide_t(raw(x[base + partner])) * s;
                    y[base + d] = round_to<y_T, wide_t>(acc, F + F - frac_bits<y_T>::value);
                }
            }
}

struct kv_write_config {
    static const unsigned n_batch = 1, kv_heads = 2, n_rows = 1, head_dim = 16, max_len = 64;
    static const unsigned long off = 0;         // the cache's first word in kv_mem
};

template <class x_T, typename CONFIG_T>
void kv_write(const x_T x[CONFIG_T::n_batch * CONFIG_T::kv_heads * CONFIG_T::n_rows * CONFIG_T::head_dim],
              const int_t positions[CONFIG_T::n_batch * CONFIG_T::n_rows], int *kv_mem) {
    const unsigned D = CONFIG_T::head_dim, L = CONFIG_T::max_len, S = CONFIG_T::n_rows;
Rows:
    for (unsigned b = 0; b < CONFIG_T::n_batch; b++)
        for (unsigned h = 0; h < CONFIG_T::kv_heads; h++)
            for (unsigned j = 0; j < S; j++) {
                const long long p = positions[b * S + j].to_int64();
                if (p < 0 || p >= (long long)L) continue;
                const unsigned long dst = CONFIG_T::off + ((unsigned long)(b * CONFIG_T::kv_heads + h) * L + p) * D;
                const unsigned long src = ((unsigned long)(b * CONFIG_T::kv_heads + h) * S + j) * D;
            Append:
                for (unsigned d = 0; d < D; d++) {
                    #pragma HLS PIPELINE II=1
                    kv_mem[dst + d] = (int)raw(x[src + d]).to_int64();
                }
            }
}

// The softmax of scores s[lo..hi] (maximum mx) into p[lo..hi] at F fractional bits, exactly as
// nf::softmax: the exp table with linear interpolation, one divider for the reciprocal of the sum.
// Both attention kernels (the float cache's here, kv8's in nf_kv8.h) share it.
template <typename CONFIG_T>
void attention_probs(const wide_t s[CONFIG_T::max_len], wide_t p[CONFIG_T::max_len], unsigned lo, unsigned hi,
                     wide_t mx, const int table[CONFIG_T::lut_n + 1], int F) {
    #pragma HLS INLINE
    const wide_t mask = (wide_t(1) << CONFIG_T::step_shift) - 1;
    uwide_t sum = 0;
Exp:
    for (unsigned t = lo; t <= hi; t++) {
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
    for (unsigned t = lo; t <= hi; t++) {
        #pragma HLS PIPELINE II=1
        p[t] = round_shift<wide_t>(p[t] * recip, 62 - F);
    }
}

struct attention_config {
    static const unsigned n_batch = 1, n_heads = 2, kv_heads = 2, n_rows = 1, head_dim = 16, max_len = 64;
    static const unsigned window = 0;           // sliding window (0: none)
    static const unsigned long k_off = 0, v_off = 2048;   // the k and v caches' first words in kv_mem
    static const long scale_m = 16384;          // scale * 2^scale_shift
    static const unsigned scale_shift = 16;
    static const long lut_lo = -(16l << 16);    // exp table, as softmax_config
    static const unsigned step_shift = 10, lut_n = 1024, e_frac = 20;
};

template <class x_T, class y_T, typename CONFIG_T>
void attention(const x_T q[CONFIG_T::n_batch * CONFIG_T::n_heads * CONFIG_T::n_rows * CONFIG_T::head_dim],
               const int *kv_mem, const int_t positions[CONFIG_T::n_batch * CONFIG_T::n_rows],
               y_T out[CONFIG_T::n_batch * CONFIG_T::n_heads * CONFIG_T::n_rows * CONFIG_T::head_dim],
               const int table[CONFIG_T::lut_n + 1]) {
    const int F = frac_bits<x_T>::value;
    const unsigned D = CONFIG_T::head_dim, L = CONFIG_T::max_len, S = CONFIG_T::n_rows;
    const unsigned group = CONFIG_T::n_heads / CONFIG_T::kv_heads;
    wide_t s[CONFIG_T::max_len];
    wide_t p[CONFIG_T::max_len];
    wide_t qh[CONFIG_T::head_dim];
    #pragma HLS ARRAY_PARTITION variable=qh complete
Queries:
    for (unsigned b = 0; b < CONFIG_T::n_batch; b++)
        for (unsigned h = 0; h < CONFIG_T::n_heads; h++)
            for (unsigned j = 0; j < S; j++) {
                const unsigned long cache = (unsigned long)(b * CONFIG_T::kv_heads + h / group) * L * D;
                const unsigned long kh = CONFIG_T::k_off + cache, vh = CONFIG_T::v_off + cache;
                const unsigned long row = ((unsigned long)(b * CONFIG_T::n_heads + h) * S + j) * D;
                long long pos = positions[b * S + j].to_int64();
                pos = pos < 0 ? 0 : (pos >= (long long)L ? (long long)L - 1 : pos);
                const unsigned hi = (unsigned)pos;
                const unsigned lo = CONFIG_T::window && hi + 1 > CONFIG_T::window ? hi + 1 - CONFIG_T::window : 0;
            Query:
                for (unsigned d = 0; d < D; d++) qh[d] = raw(q[row + d]);
                wide_t mx = 0;
            Scores:
                for (unsigned t = lo; t <= hi; t++) {
                    #pragma HLS PIPELINE II=1
                    wide_t acc = 0;
                    for (unsigned d = 0; d < D; d++) acc += qh[d] * wide_t(kv_mem[kh + (unsigned long)t * D + d]);
                    s[t] = round_shift<wide_t>(round_shift<wide_t>(acc, F) * wide_t(CONFIG_T::scale_m), CONFIG_T::scale_shift);
                    mx = (t == lo || s[t] > mx) ? s[t] : mx;
                }
                attention_probs<CONFIG_T>(s, p, lo, hi, mx, table, F);
            Context:
                for (unsigned d = 0; d < D; d++) {
                    wide_t acc = 0;
                    for (unsigned t = lo; t <= hi; t++) {
                        #pragma HLS PIPELINE II=1
                        acc += p[t] * wide_t(kv_mem[vh + (unsigned long)t * D + d]);
                    }
                    out[row + d] = round_to<y_T, wide_t>(acc, F + F - frac_bits<y_T>::value);
                }
            }
}

}  // namespace nf

#endif
