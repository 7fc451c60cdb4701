// nnforge HLS templates: number types and the integer helpers every kernel shares.
//
// Activations are ap_fixed<W, I, AP_RND, AP_SAT> (round half up, saturate); kernels work on their
// raw two's-complement integers (raw(x) = x * 2^F, F = W - I) so that every rounding step is an
// explicit round_shift that nnforge.backends.hls.emulate reproduces bit for bit.
#ifndef NF_TYPES_H_
#define NF_TYPES_H_

#include <cmath>
#include "ap_fixed.h"
#include "ap_int.h"
#include "hls_stream.h"

namespace nf {

typedef ap_int<64> wide_t;
typedef ap_uint<64> uwide_t;

template <class T> struct frac_bits { static const int value = T::width - T::iwidth; };

// The raw integer of a fixed-point value, and back (the value's own bits: ap_fixed_base::V).
template <class T> ap_int<T::width> raw(const T &x) {
    #pragma HLS INLINE
    return ap_int<T::width>(x.V);
}
template <class T> T from_raw(const ap_int<T::width> &r) {
    #pragma HLS INLINE
    T x;
    x.V = r;
    return x;
}

// C-simulation speed. hls4ml's ap_types spend tens of nanoseconds on every ap_int multiply-add on a
// host (a product wider than 64 bits even allocates), which made one MiniLM forward pass take
// minutes. Inner products whose accumulator codegen proves to fit 64 bits are therefore summed on
// int64 when compiled for the host (NF_HOST_MAC): the same integers, since no step overflows.
// Synthesis (__SYNTHESIS__) always sees the ap_int form with the exact widths; -DNF_AP_MAC forces
// that form in C-simulation too (the tests build both and compare).
#if !defined(__SYNTHESIS__) && !defined(NF_AP_MAC)
#define NF_HOST_MAC 1
#endif
template <class T> inline long long raw64(const T &x) { return x.V.to_int64(); }

// Clamp a wide integer to T's raw range (AP_SAT) and return it as T.
template <class T, class W> T saturate(const W &v) {
    const W hi = (W(1) << (T::width - 1)) - 1;
    const W lo = -hi - 1;
    W c = v > hi ? hi : (v < lo ? lo : v);
    return from_raw<T>(ap_int<T::width>(c));
}

// v * 2^-s rounded half up (floor(v / 2^s + 1/2)); s <= 0 shifts left.
template <class W> W round_shift(const W &v, int s) {
    if (s <= 0) return v << (-s);
    return (v + (W(1) << (s - 1))) >> s;
}

template <class T, class W> T round_to(const W &v, int s) { return saturate<T, W>(round_shift<W>(v, s)); }

// Host side (C-simulation): float <-> fixed, exactly floor(x * 2^F + 1/2) saturated.
template <class T> T from_float(float f) {
    const int F = frac_bits<T>::value;
    double s = std::floor((double)f * std::ldexp(1.0, F) + 0.5);
    const double hi = std::ldexp(1.0, T::width - 1) - 1.0, lo = -std::ldexp(1.0, T::width - 1);
    if (!(s == s)) s = 0.0;  // NaN -> 0
    s = s > hi ? hi : (s < lo ? lo : s);
    return from_raw<T>(ap_int<T::width>((long long)s));
}
template <class T> float to_float(const T &x) {
    return (float)std::ldexp((double)raw(x).to_int64(), -frac_bits<T>::value);
}

// Little-endian reads from the weight memory (one byte array, the layout codegen writes).
inline ap_int<32> read_i32(const unsigned char *p) {
    ap_uint<32> v = ap_uint<32>(p[0]) | (ap_uint<32>(p[1]) << 8) | (ap_uint<32>(p[2]) << 16) | (ap_uint<32>(p[3]) << 24);
    return ap_int<32>(v);
}
// Field j of a little-endian bit stream of `bits`-bit fields (bits <= 16; the memory is padded by 4 bytes).
inline ap_uint<16> read_field(const unsigned char *row, unsigned j, unsigned bits) {
    #pragma HLS INLINE
    unsigned bit = j * bits, b = bit >> 3, o = bit & 7;
    ap_uint<32> win = ap_uint<32>(row[b]) | (ap_uint<32>(row[b + 1]) << 8) | (ap_uint<32>(row[b + 2]) << 16);
    return ap_uint<16>((win >> o) & ((ap_uint<32>(1) << bits) - 1));
}

// Floor square root of a 64-bit unsigned integer, 32 fixed iterations (one compare-subtract each).
inline uwide_t isqrt64(uwide_t v) {
    uwide_t res = 0, one = uwide_t(1) << 62;
    ISqrt:
    for (int i = 0; i < 32; i++) {
        #pragma HLS PIPELINE II=1
        if (v >= res + one) {
            v -= res + one;
            res = (res >> 1) + one;
        } else {
            res >>= 1;
        }
        one >>= 2;
    }
    return res;
}

// Copy (reshape is a copy of the same elements in the same order).
template <class T, unsigned N> void copy(const T x[N], T y[N]) {
    Copy:
    for (unsigned i = 0; i < N; i++) {
        #pragma HLS PIPELINE II=1
        y[i] = x[i];
    }
}

// A buffer holding one value everywhere (a constant the graph builds from its sizes, e.g. a mask).
template <class T, unsigned N> void fill(const T &v, T y[N]) {
Fill:
    for (unsigned i = 0; i < N; i++) {
        #pragma HLS PIPELINE II=1
        y[i] = v;
    }
}

// A constant operand read from the weight memory: N int32 words, each the value's raw integer
// (activations: raw at T's format; ints and booleans: the value).
template <class T, unsigned N> void load_const(const unsigned char *p, T y[N]) {
LoadConst:
    for (unsigned i = 0; i < N; i++) {
        #pragma HLS PIPELINE II=1
        y[i] = from_raw<T>(ap_int<T::width>(read_i32(p + 4ul * i)));
    }
}
template <class T, unsigned N> void load_const_int(const unsigned char *p, T y[N]) {
LoadConstInt:
    for (unsigned i = 0; i < N; i++) {
        #pragma HLS PIPELINE II=1
        y[i] = T(read_i32(p + 4ul * i));
    }
}

// Fan-out for task-level dataflow: one producer, two consumers each with its own channel.
template <class T, unsigned N> void fanout2(const T x[N], T y0[N], T y1[N]) {
Fanout:
    for (unsigned i = 0; i < N; i++) {
        #pragma HLS PIPELINE II=1
        y0[i] = x[i];
        y1[i] = x[i];
    }
}

}  // namespace nf

#endif
