// nnforge HLS templates: 1-D and 2-D convolution (stride, zero padding, dilation, groups, depthwise)
// through a line buffer, and max pooling.
//
// Layout: channels first, as the IR (x[n][c][h][w]); a 1-D convolution is the 2-D one with
// in_h = out_h = filt_h = 1. Weights are the matrix unit's rows (nf_matvec.h): output channel o
// is row o of the [n_out, n_chan * filt_h * filt_w] matrix the IR's [O, C/groups, kh, kw] weight
// flattens to, with the same codes, N:M indices, group scales and bias in the weight memory.
//
// Dataflow, as hls4ml's line-buffer convolution (nnet_conv2d_stream.h) but weight stationary,
// because the weights stream from off-chip memory instead of sitting in registers: for each output
// channel its weight row is decoded once; then the group's input is scanned in raster order over
// the padded image, one pixel (n_chan values, 0 in the padding) a cycle, into a line buffer of the
// last (filt_h - 1) * dil_h + 1 image rows; every pixel that completes a window on the stride grid
// gives one output, the window read out of the line buffer into win[] (its element j = (c * filt_h
// + kh) * filt_w + kw, the weight's column order).
//
// Arithmetic: nf::matmat's on the window (exact sums per scale group, one rounding):
//   raw(y) = round_shift(sum_g m_g * sum_{kept j in g} code_j * win[col_j] + (bias << scale_shift),
//                        scale_shift + F_x - F_y), saturated.
#ifndef NF_CONV_H_
#define NF_CONV_H_

#include "nf_types.h"

namespace nf {

struct conv_config {
    static const unsigned n_batch = 1, groups = 1;
    static const unsigned n_chan = 4, n_filt = 4;              // per group: input and output channels
    static const unsigned in_h = 8, in_w = 8, out_h = 8, out_w = 8;
    static const unsigned filt_h = 3, filt_w = 3, stride_h = 1, stride_w = 1, dil_h = 1, dil_w = 1;
    static const unsigned pad_top = 1, pad_left = 1;           // the bottom / right padding follows from out_h / out_w
    // the weight rows, as nf::matmat_config (n_in = n_chan * filt_h * filt_w)
    static const unsigned n_in = 36, sp_n = 1, sp_m = 1, idx_bits = 1, n_kept = 36;
    static const unsigned w_bits = 8, val_bits = 9;
    static const bool lut_decode = false;
    static const unsigned long lut_off = 0;
    static const unsigned group = 36, n_groups = 1;
    static const bool row_scales = true;
    static const int scale_shift = 16;
    static const bool has_bias = false;
    static const unsigned acc_bits = 64;
    static const unsigned chain = 4;
    static const unsigned long w_off = 0, idx_off = 0, scale_off = 0, bias_off = 0;
    static const unsigned w_row_bytes = 36, idx_row_bytes = 0;
};

template <class x_T, class y_T, typename CONFIG_T>
void conv(const x_T x[CONFIG_T::n_batch * CONFIG_T::groups * CONFIG_T::n_chan * CONFIG_T::in_h * CONFIG_T::in_w],
          y_T y[CONFIG_T::n_batch * CONFIG_T::groups * CONFIG_T::n_filt * CONFIG_T::out_h * CONFIG_T::out_w],
          const unsigned char *wmem) {
    typedef ap_int<CONFIG_T::val_bits> code_t;
    typedef ap_int<CONFIG_T::acc_bits> acc_t;
    typedef ap_int<x_T::width> xr_t;
    const int shift = CONFIG_T::scale_shift + frac_bits<x_T>::value - frac_bits<y_T>::value;
    const unsigned span_h = (CONFIG_T::filt_h - 1) * CONFIG_T::dil_h + 1;
    const unsigned span_w = (CONFIG_T::filt_w - 1) * CONFIG_T::dil_w + 1;
    const unsigned scan_h = (CONFIG_T::out_h - 1) * CONFIG_T::stride_h + span_h;   // padded rows a window reaches
    const unsigned scan_w = (CONFIG_T::out_w - 1) * CONFIG_T::stride_w + span_w;
    const unsigned plane = CONFIG_T::in_h * CONFIG_T::in_w;
    code_t wrow[CONFIG_T::n_kept];
    ap_uint<16> col[CONFIG_T::n_kept];
    ap_int<32> scale[CONFIG_T::n_groups];
    ap_int<32> lut[1 << CONFIG_T::w_bits];
    xr_t lines[span_h][scan_w * CONFIG_T::n_chan];
    xr_t win[CONFIG_T::n_in];
    #pragma HLS ARRAY_PARTITION variable=wrow cyclic factor=CONFIG_T::chain
    #pragma HLS ARRAY_PARTITION variable=col cyclic factor=CONFIG_T::chain
    #pragma HLS ARRAY_PARTITION variable=lines complete dim=1
    if (CONFIG_T::lut_decode) {
    LoadLut:
        for (unsigned c = 0; c < (1u << CONFIG_T::w_bits); c++) lut[c] = read_i32(wmem + CONFIG_T::lut_off + 4ul * c);
    }
Images:
    for (unsigned b = 0; b < CONFIG_T::n_batch; b++) {
    Groups:
        for (unsigned g = 0; g < CONFIG_T::groups; g++) {
            const x_T *xg = x + (unsigned long)(b * CONFIG_T::groups + g) * CONFIG_T::n_chan * plane;
        Filters:
            for (unsigned f = 0; f < CONFIG_T::n_filt; f++) {
                const unsigned o = g * CONFIG_T::n_filt + f;
                const unsigned char *wr = wmem + CONFIG_T::w_off + (unsigned long)o * CONFIG_T::w_row_bytes;
                const unsigned char *ir = wmem + CONFIG_T::idx_off + (unsigned long)o * CONFIG_T::idx_row_bytes;
            Decode:
                for (unsigned j = 0; j < CONFIG_T::n_kept; j++) {
                    #pragma HLS PIPELINE II=1
                    const ap_uint<16> field = read_field(wr, j, CONFIG_T::w_bits);
                    wrow[j] = CONFIG_T::lut_decode ? code_t(lut[field])
                                                   : code_t(code_t(field) - code_t(1 << (CONFIG_T::w_bits - 1)));
                    col[j] = CONFIG_T::sp_m > 1 ? ap_uint<16>((j / CONFIG_T::sp_n) * CONFIG_T::sp_m +
                                                              unsigned(read_field(ir, j, CONFIG_T::idx_bits)))
                                                : ap_uint<16>(j);
                }
                const unsigned srow = CONFIG_T::row_scales ? o : 0;
            Scales:
                for (unsigned q = 0; q < CONFIG_T::n_groups; q++)
                    scale[q] = read_i32(wmem + CONFIG_T::scale_off + 4ul * (srow * CONFIG_T::n_groups + q));
                const acc_t bias = CONFIG_T::has_bias ? acc_t(read_i32(wmem + CONFIG_T::bias_off + 4ul * o)) : acc_t(0);
                y_T *yo = y + (unsigned long)(b * CONFIG_T::groups * CONFIG_T::n_filt + o) * CONFIG_T::out_h * CONFIG_T::out_w;
            ScanRows:
                for (unsigned ph = 0; ph < scan_h; ph++) {
                ScanCols:
                    for (unsigned pw = 0; pw < scan_w; pw++) {
                        #pragma HLS PIPELINE
                        // the pixel entering the line buffer (0 in the padding)
                        const int ih = int(ph) - int(CONFIG_T::pad_top), iw = int(pw) - int(CONFIG_T::pad_left);
                        const bool inside = ih >= 0 && ih < int(CONFIG_T::in_h) && iw >= 0 && iw < int(CONFIG_T::in_w);
                    Shift:
                        for (unsigned c = 0; c < CONFIG_T::n_chan; c++)
                            lines[ph % span_h][pw * CONFIG_T::n_chan + c] =
                                inside ? raw(xg[c * plane + unsigned(ih) * CONFIG_T::in_w + unsigned(iw)]) : xr_t(0);
                        // does a window on the stride grid end at this pixel?
                        if (ph + 1 < span_h || pw + 1 < span_w) continue;
                        const unsigned top = ph + 1 - span_h, left = pw + 1 - span_w;
                        if (top % CONFIG_T::stride_h || left % CONFIG_T::stride_w) continue;
                    Window:
                        for (unsigned c = 0; c < CONFIG_T::n_chan; c++)
                            for (unsigned kh = 0; kh < CONFIG_T::filt_h; kh++)
                                for (unsigned kw = 0; kw < CONFIG_T::filt_w; kw++)
                                    win[(c * CONFIG_T::filt_h + kh) * CONFIG_T::filt_w + kw] =
                                        lines[(top + kh * CONFIG_T::dil_h) % span_h]
                                             [(left + kw * CONFIG_T::dil_w) * CONFIG_T::n_chan + c];
                        acc_t total = bias << CONFIG_T::scale_shift;
                    ScaleGroups:
                        for (unsigned q = 0; q < CONFIG_T::n_groups; q++) {
                            const unsigned end = (q + 1) * CONFIG_T::group < CONFIG_T::n_kept ? (q + 1) * CONFIG_T::group
                                                                                            : CONFIG_T::n_kept;
#ifdef NF_HOST_MAC
                            if (CONFIG_T::acc_bits <= 64) {   // same sums on int64 (nf_types.h)
                                long long p = 0;
                                for (unsigned j = q * CONFIG_T::group; j < end; j++)
                                    p += wrow[j].to_int64() * win[unsigned(col[j])].to_int64();
                                total += acc_t(p) * scale[q];
                                continue;
                            }
#endif
                            acc_t part = 0;
                        Chain:
                            for (unsigned j = q * CONFIG_T::group; j < end; j++) {
                                #pragma HLS UNROLL factor=CONFIG_T::chain
                                part += wrow[j] * win[unsigned(col[j])];
                            }
                            total += part * scale[q];
                        }
                        yo[(top / CONFIG_T::stride_h) * CONFIG_T::out_w + left / CONFIG_T::stride_w] =
                            round_to<y_T, acc_t>(total, shift);
                    }
                }
            }
        }
    }
}

// Max pooling over [planes][in_h][in_w] (planes = batch x channels); padding never wins (it is the
// format's minimum), as the IR's -inf padding.
struct max_pool_config {
    static const unsigned planes = 1, in_h = 8, in_w = 8, out_h = 4, out_w = 4;
    static const unsigned filt_h = 2, filt_w = 2, stride_h = 2, stride_w = 2, dil_h = 1, dil_w = 1;
    static const unsigned pad_top = 0, pad_left = 0;
};

template <class x_T, class y_T, typename CONFIG_T>
void max_pool(const x_T x[CONFIG_T::planes * CONFIG_T::in_h * CONFIG_T::in_w],
              y_T y[CONFIG_T::planes * CONFIG_T::out_h * CONFIG_T::out_w]) {
    typedef ap_int<x_T::width> xr_t;
    const xr_t lowest = xr_t(-(wide_t(1) << (x_T::width - 1)));
Planes:
    for (unsigned p = 0; p < CONFIG_T::planes; p++) {
        const x_T *xp = x + (unsigned long)p * CONFIG_T::in_h * CONFIG_T::in_w;
    Rows:
        for (unsigned oh = 0; oh < CONFIG_T::out_h; oh++) {
        Cols:
            for (unsigned ow = 0; ow < CONFIG_T::out_w; ow++) {
                #pragma HLS PIPELINE
                xr_t m = lowest;
            Window:
                for (unsigned kh = 0; kh < CONFIG_T::filt_h; kh++)
                    for (unsigned kw = 0; kw < CONFIG_T::filt_w; kw++) {
                        const int ih = int(oh * CONFIG_T::stride_h + kh * CONFIG_T::dil_h) - int(CONFIG_T::pad_top);
                        const int iw = int(ow * CONFIG_T::stride_w + kw * CONFIG_T::dil_w) - int(CONFIG_T::pad_left);
                        if (ih < 0 || ih >= int(CONFIG_T::in_h) || iw < 0 || iw >= int(CONFIG_T::in_w)) continue;
                        const xr_t v = raw(xp[unsigned(ih) * CONFIG_T::in_w + unsigned(iw)]);
                        if (v > m) m = v;
                    }
                y[(unsigned long)(p * CONFIG_T::out_h + oh) * CONFIG_T::out_w + ow] =
                    round_to<y_T, wide_t>(wide_t(m), frac_bits<x_T>::value - frac_bits<y_T>::value);
            }
        }
    }
}

}  // namespace nf

#endif
