// nnforge HLS templates: broadcasting binary element-wise ops and axis permutations (rank <= 4).
//
// Shapes are padded to 4 dims; a_s* / b_s* are element strides of each operand for every output
// dim (0 where it broadcasts). A constant operand (a weight) is read from weight memory as int32
// raw activations at b's format.
//   add: raw(y) = sat(round_shift(raw(a) * 2^(F - F_a) + raw(b) * 2^(F - F_b), F - F_y)), F = max(F_a, F_b)
//   mul: raw(y) = sat(round_shift(raw(a) * raw(b), F_a + F_b - F_y))
//   div (two activations): raw(y) = sat(floor(raw(a) * 2^(F_b + F_y - F_a) / raw(b) + 1/2)), exact
//        integer division; b == 0 saturates to the sign of a (0 / 0 = 0)
// concat2: a [outer, n_a, inner] and b [outer, n_b, inner] -> y [outer, n_a + n_b, inner] (a copy;
//        codegen chains calls for more than two inputs)
#ifndef NF_ELEMENTWISE_H_
#define NF_ELEMENTWISE_H_

#include "nf_types.h"

namespace nf {

struct binary_config {
    static const unsigned d0 = 1, d1 = 1, d2 = 1, d3 = 16;    // output shape
    static const unsigned a_s0 = 0, a_s1 = 0, a_s2 = 0, a_s3 = 1;
    static const unsigned b_s0 = 0, b_s1 = 0, b_s2 = 0, b_s3 = 1;
    static const bool b_const = false;                        // b is a weight (int32 raw in memory)
    static const unsigned long b_off = 0;
    static const int b_frac = 16;                             // fractional bits of b
};

enum binary_op { OP_ADD = 0, OP_SUB = 1, OP_MUL = 2, OP_DIV = 3 };

// floor(n / d + 1/2) on exact integers (d == 0: +-2^62 by the sign of n, saturated by the caller).
inline wide_t div_round(wide_t n, wide_t d) {
    #pragma HLS INLINE
    const wide_t big = wide_t(1) << 62, nbig = -big;
    if (d == 0) return n > 0 ? big : (n < 0 ? nbig : wide_t(0));
    if (d < 0) { n = -n; d = -d; }
    const wide_t t = 2 * n + d, d2 = 2 * d;
    wide_t q = t / d2;
    if (t % d2 != 0 && t < 0) q -= 1;
    return q;
}

template <class a_T, class b_T, class y_T, typename CONFIG_T, int OP>
void binary(const a_T *a, const b_T *b, y_T *y, const unsigned char *wmem) {
    const int fa = frac_bits<a_T>::value, fb = CONFIG_T::b_const ? CONFIG_T::b_frac : frac_bits<b_T>::value;
    const int fy = frac_bits<y_T>::value, f = fa > fb ? fa : fb;
    unsigned o = 0;
D0: for (unsigned i0 = 0; i0 < CONFIG_T::d0; i0++)
D1:     for (unsigned i1 = 0; i1 < CONFIG_T::d1; i1++)
D2:         for (unsigned i2 = 0; i2 < CONFIG_T::d2; i2++)
D3:             for (unsigned i3 = 0; i3 < CONFIG_T::d3; i3++) {
                    #pragma HLS PIPELINE II=1
                    const unsigned ia = i0 * CONFIG_T::a_s0 + i1 * CONFIG_T::a_s1 + i2 * CONFIG_T::a_s2 + i3 * CONFIG_T::a_s3;
                    const unsigned ib = i0 * CONFIG_T::b_s0 + i1 * CONFIG_T::b_s1 + i2 * CONFIG_T::b_s2 + i3 * CONFIG_T::b_s3;
                    wide_t va = raw(a[ia]);
                    wide_t vb = CONFIG_T::b_const ? wide_t(read_i32(wmem + CONFIG_T::b_off + 4ul * ib)) : wide_t(raw(b[ib]));
                    wide_t out;
                    if (OP == OP_MUL) {
                        out = round_shift<wide_t>(va * vb, fa + fb - fy);
                    } else if (OP == OP_DIV) {
                        out = div_round(va << (fb + fy - fa), vb);
                    } else {
                        va = va << (f - fa);
                        vb = vb << (f - fb);
                        out = round_shift<wide_t>(OP == OP_ADD ? va + vb : va - vb, f - fy);
                    }
                    y[o++] = saturate<y_T, wide_t>(out);
                }
}

// Strided copy: permute (transpose), slice (offset + stepped strides) and any other view.
struct permute_config {
    static const unsigned d0 = 1, d1 = 1, d2 = 4, d3 = 4;    // output shape
    static const unsigned s0 = 0, s1 = 0, s2 = 1, s3 = 4;    // input strides of each output dim
    static const unsigned long off = 0;                      // input element of output 0
};

template <class T, typename CONFIG_T> void permute(const T *x, T *y) {
    unsigned o = 0;
D0: for (unsigned i0 = 0; i0 < CONFIG_T::d0; i0++)
D1:     for (unsigned i1 = 0; i1 < CONFIG_T::d1; i1++)
D2:         for (unsigned i2 = 0; i2 < CONFIG_T::d2; i2++)
D3:             for (unsigned i3 = 0; i3 < CONFIG_T::d3; i3++) {
                    #pragma HLS PIPELINE II=1
                    y[o++] = x[CONFIG_T::off + i0 * CONFIG_T::s0 + i1 * CONFIG_T::s1 + i2 * CONFIG_T::s2 + i3 * CONFIG_T::s3];
                }
}

// Constant padding (IR pad) of a tensor of rank <= 4: x where the output index minus the padding
// before falls inside x, the fill value elsewhere (an unsigned difference below 0 wraps past n).
struct pad_config {
    static const unsigned d0 = 1, d1 = 1, d2 = 4, d3 = 4;     // output shape
    static const unsigned n0 = 1, n1 = 1, n2 = 2, n3 = 2;     // input shape
    static const unsigned b0 = 0, b1 = 0, b2 = 1, b3 = 1;     // padding before each dim
};

template <class T, typename CONFIG_T> void pad(const T *x, const T &fill, T *y) {
    unsigned o = 0;
D0: for (unsigned i0 = 0; i0 < CONFIG_T::d0; i0++)
D1:     for (unsigned i1 = 0; i1 < CONFIG_T::d1; i1++)
D2:         for (unsigned i2 = 0; i2 < CONFIG_T::d2; i2++)
D3:             for (unsigned i3 = 0; i3 < CONFIG_T::d3; i3++) {
                    #pragma HLS PIPELINE II=1
                    const unsigned j0 = i0 - CONFIG_T::b0, j1 = i1 - CONFIG_T::b1, j2 = i2 - CONFIG_T::b2,
                                   j3 = i3 - CONFIG_T::b3;
                    const bool inside = j0 < CONFIG_T::n0 && j1 < CONFIG_T::n1 && j2 < CONFIG_T::n2 && j3 < CONFIG_T::n3;
                    y[o++] = inside ? x[((j0 * CONFIG_T::n1 + j1) * CONFIG_T::n2 + j2) * CONFIG_T::n3 + j3] : fill;
                }
}

struct concat_config {
    static const unsigned outer = 1, n_a = 8, n_b = 8, inner = 1;
};

template <class T, typename CONFIG_T> void concat2(const T *a, const T *b, T *y) {
    const unsigned ra = CONFIG_T::n_a * CONFIG_T::inner, rb = CONFIG_T::n_b * CONFIG_T::inner;
    unsigned o = 0;
Outer:
    for (unsigned i = 0; i < CONFIG_T::outer; i++) {
    A:
        for (unsigned k = 0; k < ra; k++) {
            #pragma HLS PIPELINE II=1
            y[o++] = a[i * ra + k];
        }
    B:
        for (unsigned k = 0; k < rb; k++) {
            #pragma HLS PIPELINE II=1
            y[o++] = b[i * rb + k];
        }
    }
}

}  // namespace nf

#endif
