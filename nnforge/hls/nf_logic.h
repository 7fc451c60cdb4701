// nnforge HLS templates: element-wise logic on int / bool / activation operands (masks), casts,
// reductions over one axis, square root, and gathers by a constant offset table.
//
// Every operand is read as its raw integer (act_t: value * 2^F; int_t: the integer; bool_t: 0/1),
// from a buffer, or (const) from weight memory as int32 words holding raw values at the operand's
// format (codegen saturates them there: a fill value such as finfo(float32).min becomes the
// activation minimum -2^(I-1)). Shapes are padded to 4 dims; s*_ are element strides (0 = broadcast).
//   compare:  y = (a OP b)                           both at one format (bool_t out)
//   and / or: y = (a != 0) OP (b != 0)               (bool_t out)
//   not:      y = (a == 0)
//   where:    y = a != 0 ? b : c                      b, c raw at y's format
//   cast:     to bool_t: a != 0; int / bool -> act_t: sat(a * 2^F_y)
//   trunc:    act_t -> int_t: a * 2^-F_a rounded toward zero (C's and torch's float -> int cast)
//   min, max: of a and b at one format
// Stores into act_t saturate (AP_SAT); stores into int_t saturate to 32 bits.
#ifndef NF_LOGIC_H_
#define NF_LOGIC_H_

#include "nf_types.h"
#include "nf_index.h"

namespace nf {

template <int W, int I, ap_q_mode Q, ap_o_mode O, int N> wide_t to_wide(const ap_fixed<W, I, Q, O, N> &x) { return raw(x); }
template <int W> wide_t to_wide(const ap_int<W> &x) { return wide_t(x); }
template <int W> wide_t to_wide(const ap_uint<W> &x) { return wide_t(x); }

template <int W, int I, ap_q_mode Q, ap_o_mode O, int N> void store(ap_fixed<W, I, Q, O, N> &y, const wide_t &v) {
    y = saturate<ap_fixed<W, I, Q, O, N>, wide_t>(v);
}
template <int W> void store(ap_int<W> &y, const wide_t &v) {
    const wide_t hi = (wide_t(1) << (W - 1)) - 1, lo = -hi - 1;
    y = ap_int<W>(v > hi ? hi : (v < lo ? lo : v));
}
inline void store(ap_uint<1> &y, const wide_t &v) { y = v != 0; }

enum ewise_op { OP_EQ = 0, OP_NE, OP_LT, OP_LE, OP_GT, OP_GE, OP_AND, OP_OR, OP_NOT, OP_WHERE, OP_CAST, OP_TRUNC, OP_MIN, OP_MAX };

struct ewise_config {
    static const unsigned d0 = 1, d1 = 1, d2 = 1, d3 = 16;    // output shape
    static const unsigned a_s0 = 0, a_s1 = 0, a_s2 = 0, a_s3 = 1;
    static const unsigned b_s0 = 0, b_s1 = 0, b_s2 = 0, b_s3 = 1;
    static const unsigned c_s0 = 0, c_s1 = 0, c_s2 = 0, c_s3 = 1;
    static const bool a_const = false, b_const = false, c_const = false;
    static const unsigned long a_off = 0, b_off = 0, c_off = 0;
    static const int shift = 0;                               // cast: left shift into y's format; trunc: right
};

template <class T> wide_t load(const T *p, bool is_const, unsigned long off, unsigned i, const unsigned char *wmem) {
    #pragma HLS INLINE
    return is_const ? wide_t(read_i32(wmem + off + 4ul * i)) : to_wide(p[i]);
}

template <class a_T, class b_T, class c_T, class y_T, typename CONFIG_T, int OP>
void ewise(const a_T *a, const b_T *b, const c_T *c, y_T *y, const unsigned char *wmem) {
    unsigned o = 0;
D0: for (unsigned i0 = 0; i0 < CONFIG_T::d0; i0++)
D1:     for (unsigned i1 = 0; i1 < CONFIG_T::d1; i1++)
D2:         for (unsigned i2 = 0; i2 < CONFIG_T::d2; i2++)
D3:             for (unsigned i3 = 0; i3 < CONFIG_T::d3; i3++) {
                    #pragma HLS PIPELINE II=1
                    const unsigned ia = i0 * CONFIG_T::a_s0 + i1 * CONFIG_T::a_s1 + i2 * CONFIG_T::a_s2 + i3 * CONFIG_T::a_s3;
                    const unsigned ib = i0 * CONFIG_T::b_s0 + i1 * CONFIG_T::b_s1 + i2 * CONFIG_T::b_s2 + i3 * CONFIG_T::b_s3;
                    const unsigned ic = i0 * CONFIG_T::c_s0 + i1 * CONFIG_T::c_s1 + i2 * CONFIG_T::c_s2 + i3 * CONFIG_T::c_s3;
                    const wide_t va = load(a, CONFIG_T::a_const, CONFIG_T::a_off, ia, wmem);
                    wide_t out = 0;
                    if (OP == OP_NOT) out = va == 0;
                    else if (OP == OP_CAST) out = va << CONFIG_T::shift;
                    else if (OP == OP_TRUNC) out = va >= 0 ? wide_t(va >> CONFIG_T::shift) : wide_t(-((-va) >> CONFIG_T::shift));
                    else if (OP == OP_WHERE) out = va != 0 ? load(b, CONFIG_T::b_const, CONFIG_T::b_off, ib, wmem)
                                                           : load(c, CONFIG_T::c_const, CONFIG_T::c_off, ic, wmem);
                    else {
                        const wide_t vb = load(b, CONFIG_T::b_const, CONFIG_T::b_off, ib, wmem);
                        switch (OP) {
                            case OP_EQ: out = va == vb; break;
                            case OP_NE: out = va != vb; break;
                            case OP_LT: out = va < vb; break;
                            case OP_LE: out = va <= vb; break;
                            case OP_GT: out = va > vb; break;
                            case OP_GE: out = va >= vb; break;
                            case OP_AND: out = (va != 0) && (vb != 0); break;
                            case OP_OR: out = (va != 0) || (vb != 0); break;
                            case OP_MIN: out = va < vb ? va : vb; break;
                            case OP_MAX: out = va > vb ? va : vb; break;
                            default: break;
                        }
                    }
                    store(y[o++], out);
                }
}

}  // namespace nf

#endif
