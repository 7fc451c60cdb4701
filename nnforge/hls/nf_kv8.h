// nnforge HLS templates: the kv8 KV-cache encoding (docs/kv_cache.md) kept in off-chip memory as
// stored, and attention that reads it there.
//
// A kv8 cache is two regions of the kv_mem port (int32 words), each the little-endian bytes of a
// state tensor of the graph, so the runner loads and returns them as they are:
//   codes  int8 [batch][kv_heads][max_len][head_dim], 4 per word (byte i of the tensor in bits
//          8*(i%4).. of word i/4); head_dim is a multiple of 4, so a token's row fills whole words
//   scale  float16 bit patterns [batch][kv_heads][max_len][head_dim/group], 2 per word (half i%2)
// The scale stays a float16 bit pattern rather than a fixed-point mantissa: it is the state the
// graph declares, and a keys' group of small values keeps its relative precision (float16 spans
// 2^-24..65504 where a fixed-point scale would round small groups' scales to a few bits).
//
//   kv8_write (each new row x of the activation format, F fractional bits, per group of `group`
//   channels, n = max |raw(x)| over the group):
//     scale   = the float16 nearest n * 2^-F / 127 (ties to even, subnormals kept, saturated at
//               65504): the reference's f16(max|x| / 127) of these values, computed in integers
//               (a leading-one count, one division by the constant 127 per group)
//     codes   = sign(x) * min(127, round_shift(|raw| * rcp, 40 + e + F)), where scale = m 2^e with
//               m normalised to 1024..2047 and rcp = round(2^40 / m), one per group (no divider per
//               element): |raw| / (scale 2^F) rounded half away from zero, the reciprocal's error
//               below 2^-23 of a code; the reference rounds x / scale half to even in float32
//   kv8_attention: nf::attention over the cache, each key and value read as
//     raw(k) = round_shift(code * m, -(e + F)), saturated: code * scale rounded to the activation
//               format (half up), the value a float cache would hold for the reference's read
//   and from there exactly nf::attention's scores, softmax and weighted sum. Only the rows lo..pos
//   are read; no dequantised copy of the cache is ever made.
#ifndef NF_KV8_H_
#define NF_KV8_H_

#include "nf_attention.h"
#include "nf_types.h"

namespace nf {

static const int KV8_RCP_SHIFT = 40;    // the codes' reciprocal: round(2^40 / m), m in 1024..2047

// floor(log2 v), v > 0 (a leading-one detector)
inline int kv8_log2(uwide_t v) {
    int l = 0;
Log2:
    for (int i = 63; i >= 0; i--) {
        if (l == 0 && ((v >> i) & 1) != 0) l = i;
    }
    return l;
}

// The float16 bit pattern of n * 2^-F / 127, round to nearest even, saturated at 65504; n >= 0.
inline ap_uint<16> kv8_scale_bits(uwide_t n, int F) {
    if (n == 0) return 0;
    const int L = kv8_log2(n);
    const int e = (n << 6) >= (uwide_t(127) << L) ? L - 6 : L - 7;   // floor(log2(n / 127))
    const int ev = e - F;                                             // the value's exponent
    if (ev > 15) return 0x7BFF;
    int lsb = (ev < -14 ? -14 : ev) - 10;                             // the exponent of the mantissa's last bit
    const int s = -lsb - F;                                           // m = RNE(n 2^s / 127)
    uwide_t q;
    if (s >= 0) {
        const uwide_t a = n << s;
        q = a / 127;
        const uwide_t r = a - q * 127;
        if (2 * r > 127) q++;                                         // 127 is odd: never a tie
    } else {
        const uwide_t b = uwide_t(127) << (-s);
        q = n / b;
        const uwide_t r = n - q * b;
        if (2 * r > b || (2 * r == b && (q & 1) != 0)) q++;
    }
    if (q >= 2048) {                                                  // rounded up to the next binade
        q >>= 1;
        lsb++;
    }
    if (q < 1024) return ap_uint<16>(q);                              // subnormal (lsb = -24)
    if (lsb + 25 > 30) return 0x7BFF;
    return ap_uint<16>((uwide_t(lsb + 25) << 10) | (q - 1024));
}

// scale = m * 2^e of float16 bits (finite, non-negative: what kv8_scale_bits writes)
inline void kv8_scale_parts(ap_uint<16> bits, int &m, int &e) {
    #pragma HLS INLINE
    const int ef = (bits >> 10).to_int() & 31, mant = (bits & 1023).to_int();
    m = ef == 0 ? mant : (mant | 1024);
    e = ef == 0 ? -24 : ef - 25;
}

// a code times its scale at the activation format's F fractional bits, round half up, saturated
template <class x_T> wide_t kv8_value(int code, int m, int e) {
    #pragma HLS INLINE
    const int F = frac_bits<x_T>::value;
    return raw(saturate<x_T, wide_t>(round_shift<wide_t>(wide_t(code) * wide_t(m), -(e + F))));
}

inline int kv8_code(const int *kv_mem, unsigned long off, unsigned long i) {
    #pragma HLS INLINE
    const unsigned w = (unsigned)kv_mem[off + (i >> 2)];
    return (int)(signed char)((w >> (8 * (i & 3))) & 0xFFu);
}

inline ap_uint<16> kv8_scale(const int *kv_mem, unsigned long off, unsigned long i) {
    #pragma HLS INLINE
    const unsigned w = (unsigned)kv_mem[off + (i >> 1)];
    return ap_uint<16>((w >> (16 * (i & 1))) & 0xFFFFu);
}

struct kv8_write_config {
    static const unsigned n_batch = 1, kv_heads = 2, n_rows = 1, head_dim = 16, max_len = 64, group = 16;
    static const unsigned long codes_off = 0, scale_off = 0;   // the regions' first words in kv_mem
};

template <class x_T, typename CONFIG_T>
void kv8_write(const x_T x[CONFIG_T::n_batch * CONFIG_T::kv_heads * CONFIG_T::n_rows * CONFIG_T::head_dim],
               const int_t positions[CONFIG_T::n_batch * CONFIG_T::n_rows], int *kv_mem) {
    const int F = frac_bits<x_T>::value;
    const unsigned D = CONFIG_T::head_dim, L = CONFIG_T::max_len, S = CONFIG_T::n_rows, G = CONFIG_T::group;
    const unsigned NG = D / G;
    signed char codes[CONFIG_T::head_dim];
Rows:
    for (unsigned b = 0; b < CONFIG_T::n_batch; b++)
        for (unsigned h = 0; h < CONFIG_T::kv_heads; h++)
            for (unsigned j = 0; j < S; j++) {
                const long long p = positions[b * S + j].to_int64();
                if (p < 0 || p >= (long long)L) continue;
                const unsigned long row = (unsigned long)(b * CONFIG_T::kv_heads + h) * L + p;
                const unsigned long src = ((unsigned long)(b * CONFIG_T::kv_heads + h) * S + j) * D;
            Groups:
                for (unsigned g = 0; g < NG; g++) {
                    uwide_t n = 0;
                Max:
                    for (unsigned d = 0; d < G; d++) {
                        #pragma HLS PIPELINE II=1
                        const wide_t v = raw(x[src + g * G + d]);
                        const uwide_t a = uwide_t(v < 0 ? wide_t(-v) : v);
                        n = a > n ? a : n;
                    }
                    const ap_uint<16> bits = kv8_scale_bits(n, F);
                    int m, e;
                    kv8_scale_parts(bits, m, e);
                    while (m != 0 && m < 1024) {                      // a subnormal scale, normalised
                        m <<= 1;
                        e--;
                    }
                    const uwide_t rcp = m ? uwide_t(((uwide_t(1) << KV8_RCP_SHIFT) + uwide_t(m / 2)) / uwide_t(m)) : uwide_t(0);
                    const int sh = KV8_RCP_SHIFT + e + F;
                Codes:
                    for (unsigned d = 0; d < G; d++) {
                        #pragma HLS PIPELINE II=1
                        const wide_t v = raw(x[src + g * G + d]);
                        const uwide_t a = uwide_t(v < 0 ? wide_t(-v) : v);
                        uwide_t c = m ? round_shift<uwide_t>(a * rcp, sh) : uwide_t(0);
                        c = c > 127 ? uwide_t(127) : c;
                        codes[g * G + d] = (signed char)(v < 0 ? -(int)c.to_uint() : (int)c.to_uint());
                    }
                    const unsigned long si = row * NG + g;              // the scale's half of a word
                    const unsigned long sw = CONFIG_T::scale_off + (si >> 1);
                    const unsigned sh16 = 16 * (unsigned)(si & 1);
                    const unsigned old = (unsigned)kv_mem[sw];
                    kv_mem[sw] = (int)((old & ~(0xFFFFu << sh16)) | (unsigned(bits.to_uint()) << sh16));
                }
            Pack:
                for (unsigned w = 0; w < D / 4; w++) {
                    #pragma HLS PIPELINE II=1
                    unsigned word = 0;
                    for (unsigned k = 0; k < 4; k++) word |= (unsigned)(unsigned char)codes[4 * w + k] << (8 * k);
                    kv_mem[CONFIG_T::codes_off + row * (D / 4) + w] = (int)word;
                }
            }
}

struct kv8_attention_config {
    static const unsigned n_batch = 1, n_heads = 2, kv_heads = 2, n_rows = 1, head_dim = 16, max_len = 64;
    static const unsigned group = 16;           // channels per scale
    static const unsigned window = 0;           // sliding window (0: none)
    static const unsigned long k_codes = 0, k_scale = 0, v_codes = 0, v_scale = 0;   // regions in kv_mem
    static const long scale_m = 16384;          // as attention_config
    static const unsigned scale_shift = 16;
    static const long lut_lo = -(16l << 16);
    static const unsigned step_shift = 10, lut_n = 1024, e_frac = 20;
};

template <class x_T, class y_T, typename CONFIG_T>
void kv8_attention(const x_T q[CONFIG_T::n_batch * CONFIG_T::n_heads * CONFIG_T::n_rows * CONFIG_T::head_dim],
                   const int *kv_mem, const int_t positions[CONFIG_T::n_batch * CONFIG_T::n_rows],
                   y_T out[CONFIG_T::n_batch * CONFIG_T::n_heads * CONFIG_T::n_rows * CONFIG_T::head_dim],
                   const int table[CONFIG_T::lut_n + 1]) {
    const int F = frac_bits<x_T>::value;
    const unsigned D = CONFIG_T::head_dim, L = CONFIG_T::max_len, S = CONFIG_T::n_rows, G = CONFIG_T::group;
    const unsigned NG = D / G;
    const unsigned group = CONFIG_T::n_heads / CONFIG_T::kv_heads;
    wide_t s[CONFIG_T::max_len];
    wide_t p[CONFIG_T::max_len];
    wide_t qh[CONFIG_T::head_dim];
    #pragma HLS ARRAY_PARTITION variable=qh complete
Queries:
    for (unsigned b = 0; b < CONFIG_T::n_batch; b++)
        for (unsigned h = 0; h < CONFIG_T::n_heads; h++)
            for (unsigned j = 0; j < S; j++) {
                const unsigned long cache = (unsigned long)(b * CONFIG_T::kv_heads + h / group) * L;   // first row
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
                    const unsigned long r = cache + t;
                    wide_t acc = 0;
                    for (unsigned d = 0; d < D; d++) {
                        int m, e;
                        kv8_scale_parts(kv8_scale(kv_mem, CONFIG_T::k_scale, r * NG + d / G), m, e);
                        acc += qh[d] * kv8_value<x_T>(kv8_code(kv_mem, CONFIG_T::k_codes, r * D + d), m, e);
                    }
                    s[t] = round_shift<wide_t>(round_shift<wide_t>(acc, F) * wide_t(CONFIG_T::scale_m), CONFIG_T::scale_shift);
                    mx = (t == lo || s[t] > mx) ? s[t] : mx;
                }
                attention_probs<CONFIG_T>(s, p, lo, hi, mx, table, F);
            Context:
                for (unsigned d = 0; d < D; d++) {
                    wide_t acc = 0;
                    for (unsigned t = lo; t <= hi; t++) {
                        #pragma HLS PIPELINE II=1
                        const unsigned long r = cache + t;
                        int m, e;
                        kv8_scale_parts(kv8_scale(kv_mem, CONFIG_T::v_scale, r * NG + d / G), m, e);
                        acc += p[t] * kv8_value<x_T>(kv8_code(kv_mem, CONFIG_T::v_codes, r * D + d), m, e);
                    }
                    out[row + d] = round_to<y_T, wide_t>(acc, F + F - frac_bits<y_T>::value);
                }
            }
}

}  // namespace nf

#endif
