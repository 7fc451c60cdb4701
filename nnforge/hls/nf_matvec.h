// nnforge HLS templates: the sparse DSP-chain matrix unit (y = x W^T + b), and activation x activation matmul.
//
// Weights live in one byte array (the weight memory, an m_axi port on the device) in the layout
// nnforge's IR packs them (nnforge/ir/packing.py): per output row, the kept values' codes as a
// little-endian stream of w_bits-bit offset-binary fields (code + 2^(w_bits-1)); for N:M sparsity
// the in-group index of every kept value as idx_bits-bit fields; group scales as int32 mantissas
// (scale = m * 2^-scale_shift), [1 or n_out][n_groups]; the bias as int32 raw activations.
// Minifloat codes (E2M1, E3M2, E2M3, E4M3 ...) are decoded through a LUT of 2^w_bits int32 entries
// (lut_off): the exact value of every code times 2^lut_frac, an integer; codegen folds 2^-lut_frac
// into the group scales, so the MACs stay integer.
//
// Arithmetic (every step exact except the one final rounding):
//   part_g   = sum_{kept j in group g} code_j * raw(x[col_j])            (ap_int<acc_bits>)
//   total    = sum_g part_g * m_g  (+ raw(bias) << scale_shift)
//   raw(y)   = round_shift(total, scale_shift + F_x - F_y), saturated   (AP_RND, AP_SAT)
// Dense weights are the pattern 1:1 (sp_n = sp_m = 1, no index stream).
#ifndef NF_MATVEC_H_
#define NF_MATVEC_H_

#include "nf_types.h"

namespace nf {

struct matmat_config {
    static const unsigned n_rows = 1;          // activation rows sharing the weights (1: matrix-vector)
    static const unsigned n_in = 16;           // reduction length (dense columns)
    static const unsigned n_out = 16;          // output features (weight rows)
    static const unsigned sp_n = 1, sp_m = 1;  // N:M pattern (2:4, 1:4; 1:1 = dense)
    static const unsigned idx_bits = 1;        // bits of one in-group index (sparse only)
    static const unsigned n_kept = 16;         // kept values per row = n_in * sp_n / sp_m
    static const unsigned w_bits = 8;          // weight code bits (3, 4, 8, ... 16)
    static const unsigned val_bits = 9;        // bits of a decoded weight (w_bits + 1, or the LUT's width)
    static const bool lut_decode = false;      // codes index a LUT (minifloats) instead of offset binary
    static const unsigned long lut_off = 0;
    static const unsigned group = 16;          // scale group size along the kept values
    static const unsigned n_groups = 1;
    static const bool row_scales = true;       // scales per output row (else one row for all)
    static const int scale_shift = 16;
    static const bool has_bias = false;
    static const unsigned acc_bits = 64;       // exact accumulator width (codegen proves it suffices)
    static const unsigned chain = 4;           // MACs per DSP chain (unroll of the reduction)
    static const bool pack2 = false;           // two rows' MACs per multiplier (dense rows only)
    static const unsigned long w_off = 0, idx_off = 0, scale_off = 0, bias_off = 0;
    static const unsigned w_row_bytes = 16, idx_row_bytes = 0;
};

// Two MACs per multiplier (AMD WP486): rows r and r+1 share every activation x, so one product
// x * (w0 * 2^S + w1), S = x bits + weight bits, holds both x*w0 (high part) and x*w1 (the low S
// bits, sign-extended). Exact, so the result equals two separate MACs bit for bit. Codegen turns it
// on (pack2) for dense rows when the packed operand fits the DSP's 27-bit port and x its 18-bit port.
template <class x_T, int VB> inline void mac2(const ap_int<VB> &w0, const ap_int<VB> &w1, const ap_int<x_T::width> &xv,
                                              wide_t &p0, wide_t &p1) {
    #pragma HLS INLINE
    const int S = x_T::width + VB;
    ap_int<VB + S> packed = (ap_int<VB + S>(w0) << S) + ap_int<VB + S>(w1);
    ap_int<x_T::width + VB + S> prod = packed * xv;           // one DSP multiply
    ap_int<S> lo;
    lo.range(S - 1, 0) = prod.range(S - 1, 0);
    p1 = lo;
    p0 = wide_t((prod - ap_int<x_T::width + VB + S>(lo)) >> S);
}

template <class x_T, class y_T, typename CONFIG_T>
void matmat(const x_T x[CONFIG_T::n_rows * CONFIG_T::n_in], y_T y[CONFIG_T::n_rows * CONFIG_T::n_out],
            const unsigned char *wmem) {
    typedef ap_int<CONFIG_T::val_bits> code_t;
    typedef ap_int<CONFIG_T::acc_bits> acc_t;
    const unsigned lanes = CONFIG_T::pack2 ? 2 : 1;
    const int shift = CONFIG_T::scale_shift + frac_bits<x_T>::value - frac_bits<y_T>::value;
    code_t wrow[2][CONFIG_T::n_kept];
    ap_uint<16> col[CONFIG_T::n_kept];
    ap_int<32> scale[2][CONFIG_T::n_groups];
    acc_t bias[2];
    ap_int<32> lut[1 << CONFIG_T::w_bits];
#ifdef NF_HOST_MAC
    // host copies: lane 0's decoded row and columns, and every input raw (static: they can be long)
    static long long wrow64[CONFIG_T::n_kept];
    static unsigned col64[CONFIG_T::n_kept];
    static long long x64[CONFIG_T::n_rows * CONFIG_T::n_in];
    for (unsigned i = 0; i < CONFIG_T::n_rows * CONFIG_T::n_in; i++) x64[i] = raw64(x[i]);
#endif
    if (CONFIG_T::lut_decode) {
    LoadLut:
        for (unsigned c = 0; c < (1u << CONFIG_T::w_bits); c++) lut[c] = read_i32(wmem + CONFIG_T::lut_off + 4ul * c);
    }
    #pragma HLS ARRAY_PARTITION variable=wrow cyclic factor=CONFIG_T::chain dim=2
    #pragma HLS ARRAY_PARTITION variable=col cyclic factor=CONFIG_T::chain
Rows:
    for (unsigned r0 = 0; r0 < CONFIG_T::n_out; r0 += lanes) {
        // Decode the weight row(s) once (streamed from memory); they are reused by all n_rows inputs.
    Lanes:
        for (unsigned l = 0; l < lanes; l++) {
            const unsigned r = r0 + l;
            const unsigned char *wr = wmem + CONFIG_T::w_off + (unsigned long)r * CONFIG_T::w_row_bytes;
            const unsigned char *ir = wmem + CONFIG_T::idx_off + (unsigned long)r * CONFIG_T::idx_row_bytes;
        Decode:
            for (unsigned j = 0; j < CONFIG_T::n_kept; j++) {
                #pragma HLS PIPELINE II=1
                if (r >= CONFIG_T::n_out) {
                    wrow[l][j] = 0;
                    continue;
                }
                const ap_uint<16> field = read_field(wr, j, CONFIG_T::w_bits);
                wrow[l][j] = CONFIG_T::lut_decode ? code_t(lut[field])
                                                  : code_t(code_t(field) - code_t(1 << (CONFIG_T::w_bits - 1)));
#ifdef NF_HOST_MAC
                if (l == 0) {
                    wrow64[j] = wrow[0][j].to_int64();
                    col64[j] = CONFIG_T::sp_m > 1 ? (j / CONFIG_T::sp_n) * CONFIG_T::sp_m + unsigned(read_field(ir, j, CONFIG_T::idx_bits)) : j;
                }
#endif
                if (l == 0) {
                    if (CONFIG_T::sp_m > 1)
                        col[j] = (j / CONFIG_T::sp_n) * CONFIG_T::sp_m + read_field(ir, j, CONFIG_T::idx_bits);
                    else
                        col[j] = j;
                }
            }
            const unsigned srow = CONFIG_T::row_scales && r < CONFIG_T::n_out ? r : 0;
        Scales:
            for (unsigned g = 0; g < CONFIG_T::n_groups; g++)
                scale[l][g] = read_i32(wmem + CONFIG_T::scale_off + 4ul * (srow * CONFIG_T::n_groups + g));
            bias[l] = CONFIG_T::has_bias && r < CONFIG_T::n_out ? acc_t(read_i32(wmem + CONFIG_T::bias_off + 4ul * r))
                                                                : acc_t(0);
        }
    Inputs:
        for (unsigned i = 0; i < CONFIG_T::n_rows; i++) {
            acc_t total[2] = {bias[0] << CONFIG_T::scale_shift, bias[1] << CONFIG_T::scale_shift};
        Groups:
            for (unsigned g = 0; g < CONFIG_T::n_groups; g++) {
                acc_t part[2] = {0, 0};
#ifdef NF_HOST_MAC
                if (!CONFIG_T::pack2 && CONFIG_T::acc_bits <= 64) {   // same sums on int64 (nf_types.h)
                    long long p = 0;
                    const unsigned end = (g + 1) * CONFIG_T::group < CONFIG_T::n_kept ? (g + 1) * CONFIG_T::group
                                                                                    : CONFIG_T::n_kept;
                    const long long *xi = x64 + i * CONFIG_T::n_in;
                    for (unsigned j = g * CONFIG_T::group; j < end; j++) p += wrow64[j] * xi[col64[j]];
                    part[0] = p;
                    for (unsigned l = 0; l < lanes; l++) total[l] += part[l] * scale[l][g];
                    continue;
                }
#endif
            Chain:
                for (unsigned k = 0; k < CONFIG_T::group; k++) {
                    #pragma HLS PIPELINE II=1
                    #pragma HLS UNROLL factor=CONFIG_T::chain
                    const unsigned j = g * CONFIG_T::group + k;
                    if (j >= CONFIG_T::n_kept) continue;
                    const ap_int<x_T::width> xv = raw(x[i * CONFIG_T::n_in + col[j]]);
                    if (CONFIG_T::pack2) {
                        wide_t p0, p1;
                        mac2<x_T, CONFIG_T::val_bits>(wrow[0][j], wrow[1][j], xv, p0, p1);
                        part[0] += p0;
                        part[1] += p1;
                    } else {
                        part[0] += wrow[0][j] * xv;
                    }
                }
                for (unsigned l = 0; l < lanes; l++) total[l] += part[l] * scale[l][g];
            }
            for (unsigned l = 0; l < lanes; l++)
                if (r0 + l < CONFIG_T::n_out) y[i * CONFIG_T::n_out + r0 + l] = round_to<y_T, acc_t>(total[l], shift);
        }
    }
}

// Activation x activation product: y[b] = a[b] (m x k) @ c[b] (k x n); one rounding per output.
struct matmul_config {
    static const unsigned batch = 1, m = 4, k = 4, n = 4;
    static const bool a_bcast = false, b_bcast = false;  // operand shared by every batch
    static const unsigned chain = 4;
};

template <class a_T, class b_T, class y_T, typename CONFIG_T>
void matmul(const a_T *a, const b_T *b, y_T *y) {
    const int shift = frac_bits<a_T>::value + frac_bits<b_T>::value - frac_bits<y_T>::value;
Batch:
    for (unsigned t = 0; t < CONFIG_T::batch; t++) {
        const a_T *at = a + (CONFIG_T::a_bcast ? 0 : t * CONFIG_T::m * CONFIG_T::k);
        const b_T *bt = b + (CONFIG_T::b_bcast ? 0 : t * CONFIG_T::k * CONFIG_T::n);
    Rows:
        for (unsigned i = 0; i < CONFIG_T::m; i++) {
        Cols:
            for (unsigned j = 0; j < CONFIG_T::n; j++) {
                wide_t acc = 0;
#ifdef NF_HOST_MAC
                long long a64 = 0;        // codegen proves 2 * act_width + log2(k) <= 62 (nf_types.h)
                for (unsigned q = 0; q < CONFIG_T::k; q++)
                    a64 += raw64(at[i * CONFIG_T::k + q]) * raw64(bt[q * CONFIG_T::n + j]);
                acc = a64;
#else
            Chain:
                for (unsigned q = 0; q < CONFIG_T::k; q++) {
                    #pragma HLS PIPELINE II=1
                    #pragma HLS UNROLL factor=CONFIG_T::chain
                    acc += wide_t(raw(at[i * CONFIG_T::k + q])) * wide_t(raw(bt[q * CONFIG_T::n + j]));
                }
#endif
                y[(t * CONFIG_T::m + i) * CONFIG_T::n + j] = round_to<y_T, wide_t>(acc, shift);
            }
        }
    }
}

}  // namespace nf

#endif
