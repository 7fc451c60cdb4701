// nnforge HLS templates: the routing ops of mixture-of-experts layers (top-k, running sums, gathers
// and scatters by indices computed at run time) and floor.
//
// Operands are raw integers as in nf_logic.h (act_t: value * 2^F; int_t: the integer). Indices are
// int_t and exact; an index outside its axis reads or writes the nearest end of it (torch raises),
// and a negative one counts from the end where torch's op does (index, index_put).
//   topk:         indices of the k largest (or smallest) of each [outer, n, inner] row, best first;
//                 equal raw values keep index order (lower index first), as a stable sort does. The
//                 rank of element a is the count of elements that beat it; rank < k writes a.
//   cumsum:       running sum along the middle axis, exact in 64 bits, each output saturated to y.
//   floor:        raw(y) = raw(x) with its F fractional bits cleared (an arithmetic shift floors).
//   take_rows:    y[i, :] = x[idx[i], :]                            (x[idx] with one index tensor)
//   gather_axis:  y[i] = x[i with its axis coordinate replaced by idx[i]]        (torch.gather)
//   scatter_rows: y = x; y[idx[i], :] = v[i, :] (or += when accumulate), in index order, so of two
//                 writes to one row the later stays (torch leaves that order open).
#ifndef NF_ROUTE_H_
#define NF_ROUTE_H_

#include "nf_types.h"
#include "nf_index.h"
#include "nf_logic.h"

namespace nf {

struct topk_config {
    static const unsigned outer = 1, n = 8, inner = 1;
    static const unsigned k = 2;
    static const bool largest = true;
};

template <class x_T, typename CONFIG_T> void topk(const x_T *x, int_t *y) {
Outer:
    for (unsigned o = 0; o < CONFIG_T::outer; o++)
    Inner:
        for (unsigned i = 0; i < CONFIG_T::inner; i++)
        Elements:
            for (unsigned a = 0; a < CONFIG_T::n; a++) {
                const wide_t va = to_wide(x[(o * CONFIG_T::n + a) * CONFIG_T::inner + i]);
                unsigned rank = 0;
            Others:
                for (unsigned b = 0; b < CONFIG_T::n; b++) {
                    #pragma HLS PIPELINE II=1
                    const wide_t vb = to_wide(x[(o * CONFIG_T::n + b) * CONFIG_T::inner + i]);
                    const bool beats = CONFIG_T::largest ? vb > va : vb < va;
                    rank += (beats || (vb == va && b < a)) ? 1u : 0u;
                }
                if (rank < CONFIG_T::k) y[(o * CONFIG_T::k + rank) * CONFIG_T::inner + i] = int_t(a);
            }
}

struct cumsum_config {
    static const unsigned outer = 1, n = 8, inner = 1;
};

template <class x_T, class y_T, typename CONFIG_T> void cumsum(const x_T *x, y_T *y) {
Outer:
    for (unsigned o = 0; o < CONFIG_T::outer; o++)
    Inner:
        for (unsigned i = 0; i < CONFIG_T::inner; i++) {
            wide_t s = 0;
        Axis:
            for (unsigned a = 0; a < CONFIG_T::n; a++) {
                #pragma HLS PIPELINE II=1
                const unsigned e = (o * CONFIG_T::n + a) * CONFIG_T::inner + i;
                s += to_wide(x[e]);
                store(y[e], s);
            }
        }
}

template <class T, unsigned N> void floor_fixed(const T *x, T *y) {
    const int F = frac_bits<T>::value;
Elements:
    for (unsigned e = 0; e < N; e++) {
        #pragma HLS PIPELINE II=1
        y[e] = saturate<T, wide_t>((wide_t(raw(x[e])) >> F) << F);
    }
}

// idx read as a position on an axis of n: negative counts from the end when wrap, then clamped.
template <bool WRAP> unsigned long position(const int_t &idx, unsigned n) {
    #pragma HLS INLINE
    wide_t r = idx;
    if (WRAP && r < 0) r += n;
    return r < 0 ? 0ul : (r >= (long)n ? n - 1ul : (unsigned long)r.to_int64());
}

struct take_rows_config {
    static const unsigned n_idx = 8;      // rows taken
    static const unsigned n_rows = 16;    // rows of x
    static const unsigned row = 4;        // elements per row
};

template <class T, typename CONFIG_T> void take_rows(const T *x, const int_t *idx, T *y) {
Rows:
    for (unsigned i = 0; i < CONFIG_T::n_idx; i++) {
        const unsigned long r = position<true>(idx[i], CONFIG_T::n_rows);
    Cols:
        for (unsigned c = 0; c < CONFIG_T::row; c++) {
            #pragma HLS PIPELINE II=1
            y[i * CONFIG_T::row + c] = x[r * CONFIG_T::row + c];
        }
    }
}

struct gather_axis_config {
    static const unsigned d0 = 1, d1 = 1, d2 = 1, d3 = 8;   // the indices' (and y's) shape
    static const unsigned s0 = 0, s1 = 0, s2 = 0, s3 = 1;   // x's element strides
    static const unsigned axis = 3;                         // gathered dim (0..3)
    static const unsigned n_axis = 8;                       // x's size on it
};

template <class T, typename CONFIG_T> void gather_axis(const T *x, const int_t *idx, T *y) {
    unsigned o = 0;
D0: for (unsigned i0 = 0; i0 < CONFIG_T::d0; i0++)
D1:     for (unsigned i1 = 0; i1 < CONFIG_T::d1; i1++)
D2:         for (unsigned i2 = 0; i2 < CONFIG_T::d2; i2++)
D3:             for (unsigned i3 = 0; i3 < CONFIG_T::d3; i3++) {
                    #pragma HLS PIPELINE II=1
                    const unsigned long j = position<false>(idx[o], CONFIG_T::n_axis);
                    const unsigned long off = (CONFIG_T::axis == 0 ? j : i0) * CONFIG_T::s0
                                            + (CONFIG_T::axis == 1 ? j : i1) * CONFIG_T::s1
                                            + (CONFIG_T::axis == 2 ? j : i2) * CONFIG_T::s2
                                            + (CONFIG_T::axis == 3 ? j : i3) * CONFIG_T::s3;
                    y[o++] = x[off];
                }
}

struct scatter_rows_config {
    static const unsigned n_idx = 8;      // rows written
    static const unsigned n_rows = 16;    // rows of x (and y)
    static const unsigned row = 4;        // elements per row
    static const unsigned v_si = 4;       // values' stride per index (0: broadcast)
    static const unsigned v_sc = 1;       // values' stride per column (0: broadcast)
    static const bool accumulate = false;
};

template <class T, typename CONFIG_T> void scatter_rows(const T *x, const T *v, const int_t *idx, T *y) {
Copy:
    for (unsigned e = 0; e < CONFIG_T::n_rows * CONFIG_T::row; e++) {
        #pragma HLS PIPELINE II=1
        y[e] = x[e];
    }
Rows:
    for (unsigned i = 0; i < CONFIG_T::n_idx; i++) {
        const unsigned long r = position<true>(idx[i], CONFIG_T::n_rows);
    Cols:
        for (unsigned c = 0; c < CONFIG_T::row; c++) {
            #pragma HLS PIPELINE II=1
            const T val = v[i * CONFIG_T::v_si + c * CONFIG_T::v_sc];
            if (CONFIG_T::accumulate) store(y[r * CONFIG_T::row + c], to_wide(y[r * CONFIG_T::row + c]) + to_wide(val));
            else y[r * CONFIG_T::row + c] = val;
        }
    }
}

}  // namespace nf

#endif
