"""Header-only HLS C++ templates (ap_int/ap_fixed/hls::stream), the FPGA side of the hls backend.

Each kernel is a function template parameterised by a config struct (hls4ml's nnet_dense.h style);
nnforge.backends.hls emits only the config structs and the calls, and nnforge.backends.hls.emulate
repeats each kernel's fixed-point arithmetic bit for bit:

    nf_types.h        raw-integer helpers: round_shift (AP_RND), saturate (AP_SAT), bit-field reads, isqrt
    nf_matvec.h       sparse DSP-chain matrix unit (dense / N:M, int2..16 or LUT-decoded minifloat codes,
                      group scales, two MACs per DSP where the format allows) and activation matmul
    nf_activation.h   GELU / SiLU by interpolated table, ReLU, clamp
    nf_softmax.h      softmax (exp table, one divider per row)
    nf_norm.h         layer norm / RMS norm (integer square root)
    nf_elementwise.h  broadcasting add / sub / mul, strided copies (permute, slice, expand)
    nf_attention.h    batch-1 decode attention with the KV cache in off-chip memory
    nf_kv8.h          the kv8 KV-cache encoding kept in off-chip memory as stored: the quantising
                      write and attention on the codes and float16 scales
    nf_conv.h         1-D / 2-D convolution through a line buffer on the matrix unit's weight rows
                      (stride, padding, dilation, groups, depthwise), max pooling
"""
from pathlib import Path

HEADER_DIR = Path(__file__).parent
HEADERS = tuple(sorted(p.name for p in HEADER_DIR.glob("nf_*.h")))
