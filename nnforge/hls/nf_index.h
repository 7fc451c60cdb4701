// nnforge HLS templates: integer and boolean values, and table lookups by integer ids.
//
// Integer values (token ids, masks) travel as int_t = ap_int<32>; booleans as bool_t = ap_uint<1>.
// embedding: y[i, :] = table[clamp(id_i, 0, n_rows - 1), :], the table held in weight memory as
// int32 raw activations at y's format (already saturated to it); ids out of range read the nearest
// row (torch raises instead).
#ifndef NF_INDEX_H_
#define NF_INDEX_H_

#include "nf_types.h"

namespace nf {

typedef ap_int<32> int_t;
typedef ap_uint<1> bool_t;

// Host side: an integer input from a float, floor(x + 1/2) saturated to 32 bits (exact for |x| < 2^24).
inline int_t int_from_float(float f) {
    double s = std::floor((double)f + 0.5);
    if (!(s == s)) s = 0.0;
    s = s > 2147483647.0 ? 2147483647.0 : (s < -2147483648.0 ? -2147483648.0 : s);
    return int_t((long long)s);
}

struct embedding_config {
    static const unsigned n_ids = 8;            // ids looked up
    static const unsigned n_rows = 16;          // table rows
    static const unsigned dim = 4;              // table columns
    static const unsigned long table_off = 0;   // int32 raw [n_rows, dim] in weight memory
};

template <class id_T, class y_T, typename CONFIG_T>
void embedding(const id_T *ids, y_T *y, const unsigned char *wmem) {
Ids:
    for (unsigned i = 0; i < CONFIG_T::n_ids; i++) {
        ap_int<64> id = ids[i];
        unsigned long r = id < 0 ? 0ul : (id >= (long)CONFIG_T::n_rows ? CONFIG_T::n_rows - 1ul : (unsigned long)id.to_int64());
    Cols:
        for (unsigned d = 0; d < CONFIG_T::dim; d++) {
            #pragma HLS PIPELINE II=1
            y[i * CONFIG_T::dim + d] = saturate<y_T, wide_t>(wide_t(read_i32(wmem + CONFIG_T::table_off + 4ul * (r * CONFIG_T::dim + d))));
        }
    }
}

// gather by a constant table: y[o] = x[offsets[o]], offsets int32 in weight memory (advanced
// indexing x[i0, i1, ...] with constant index tensors, resolved to flat element offsets by codegen).
struct gather_config {
    static const unsigned n_out = 8;
    static const unsigned long offsets_off = 0;
};

template <class T, typename CONFIG_T> void gather(const T *x, T *y, const unsigned char *wmem) {
Gather:
    for (unsigned o = 0; o < CONFIG_T::n_out; o++) {
        #pragma HLS PIPELINE II=1
        y[o] = x[(unsigned)read_i32(wmem + CONFIG_T::offsets_off + 4ul * o).to_int()];
    }
}

}  // namespace nf

#endif
