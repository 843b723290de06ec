// Raw kernels of the sdrpn ops on plain pointers: no torch, no CUDA headers.
//
// Every pointer refers to contiguous row-major memory. The CPU functions run with OpenMP; the CUDA
// functions (suffix _cuda) take device pointers plus a trailing `stream` (a cudaStream_t), only
// enqueue work on that stream, never synchronise with the host, and return the cudaError_t of their
// launches as an int (0 = cudaSuccess). Functions that need device scratch memory take a
// caller-provided `workspace` of at least the size the matching *_workspace_bytes function returns.
// The exact semantics of every op are fixed by the op contract; the comments below only restate
// what a caller of the raw functions has to know.
#pragma once

#include <cstddef>
#include <cstdint>

namespace sdrpn {
namespace kernels {

enum class DType { F32, F16, BF16 };

// Filters of component_boxes, applied in this order to a component of pixel area `a` and tight
// box [x0, x1) x [y0, y1): a <= drop_area -> dropped; a > max_area -> dropped; a < min_area -> box
// grown by the authors' rule (YuHengsss/SD-RPN 00876ac, LLaVA/llava/ana_utils.py ~795-803), per
// axis with w = max(grow_to, x1 - x0 + 1): [max(0, trunc((x0 + x1 - w) / 2)),
// min(W - 1, trunc((x0 + x1 + w) / 2))), rows alike with H. The end is clamped at W - 1, so at the
// right or bottom border a grown box can be narrow and miss the component's last column or row.
// Kept components fill the max_components output slots in label order.
struct BoxFilter {
  int64_t max_components;
  int64_t drop_area;
  int64_t min_area;
  int64_t grow_to;
  int64_t max_area;
};

// ---------------------------------------------------------------------------------------------
// CPU
// ---------------------------------------------------------------------------------------------

// out (B, N) = mean over heads and query rows of the per-head dot products of q (B, Q, D) and
// k (B, N, D), times `scale`. q and k hold `dtype` elements; accumulation is in fp32.
void rpn_scores_cpu(const void* q, const void* k, DType dtype, float* out, int64_t B, int64_t Q,
                    int64_t N, int64_t D, int64_t num_heads, float scale);

// prob (B, H, W) = sigmoid(logits), optionally blurred with the 3x3 sigma-1 Gaussian (reflect
// padding); mask = prob > threshold.
void roi_mask_cpu(const float* logits, float* prob, bool* mask, int64_t B, int64_t H, int64_t W,
                  float threshold, bool blur);

// labels (B, H, W): 0 for background, components numbered 1..n per image in raster order of their
// first pixel (identical to skimage.measure.label). connectivity is 4 or 8. Requires H * W < 2^31.
void connected_components_cpu(const bool* mask, int32_t* labels, int64_t B, int64_t H, int64_t W,
                              int connectivity);

// Per-component area and box of labels (B, H, W), filtered and compacted into
// boxes (B, M, 4) [x0, y0, x1, y1), areas (B, M), valid (B, M), counts (B,), overflow (B,), with
// M = filter.max_components. Every output element is written. Label values outside [1, H * W]
// are ignored (treated as background).
void component_boxes_cpu(const int32_t* labels, int64_t B, int64_t H, int64_t W,
                         const BoxFilter& filter, int32_t* boxes, int32_t* areas, bool* valid,
                         int32_t* counts, int32_t* overflow);

// offsets (B + 1): offsets[0] = 0, offsets[b + 1] - offsets[b] = number of true values in keep[b].
void keep_offsets_cpu(const bool* keep, int64_t B, int64_t N, int64_t* offsets);

// packed (offsets[B], D): the kept rows of features (B, N, D), batch-major then token order.
// `offsets` must come from keep_offsets_cpu on the same keep. Elements are opaque `elem_bytes`.
void pack_tokens_cpu(const void* features, size_t elem_bytes, const bool* keep,
                     const int64_t* offsets, int64_t B, int64_t N, int64_t D, void* packed);

// packed (B, capacity, D): the first `capacity` kept rows of each sample, zeros after them;
// lengths (B) = number of kept rows (may exceed capacity). Every element of packed is written.
void pack_tokens_padded_cpu(const void* features, size_t elem_bytes, const bool* keep, int64_t B,
                            int64_t N, int64_t D, int64_t capacity, void* packed, int64_t* lengths);

// out (B, N, D): packed (packed_rows, D) scattered back to the kept positions, zeros elsewhere.
// Kept rows whose source row offsets[b] + j falls outside [offsets[b], offsets[b + 1]) or outside
// [0, packed_rows) are written as zeros, so inconsistent offsets never read out of bounds.
// Every element of out is written.
void unpack_tokens_cpu(const void* packed, size_t elem_bytes, const int64_t* offsets,
                       const bool* keep, int64_t B, int64_t N, int64_t D, int64_t packed_rows,
                       void* out);

// ---------------------------------------------------------------------------------------------
// CUDA (same semantics; device pointers; return the cudaError_t of the launches)
// ---------------------------------------------------------------------------------------------

// Scratch of rpn_scores_cuda: the per-sample sum of the query rows, B * D floats.
size_t rpn_scores_workspace_bytes(int64_t B, int64_t D);
int rpn_scores_cuda(const void* q, const void* k, DType dtype, float* out, int64_t B, int64_t Q,
                    int64_t N, int64_t D, int64_t num_heads, float scale, void* workspace,
                    void* stream);

int roi_mask_cuda(const float* logits, float* prob, bool* mask, int64_t B, int64_t H, int64_t W,
                  float threshold, bool blur, void* stream);

int connected_components_cuda(const bool* mask, int32_t* labels, int64_t B, int64_t H, int64_t W,
                              int connectivity, void* stream);

// Scratch of component_boxes_cuda: per-label statistics for grids too large for shared memory;
// 0 when every image fits in one block's shared memory.
size_t component_boxes_workspace_bytes(int64_t B, int64_t H, int64_t W);
int component_boxes_cuda(const int32_t* labels, int64_t B, int64_t H, int64_t W,
                         const BoxFilter& filter, int32_t* boxes, int32_t* areas, bool* valid,
                         int32_t* counts, int32_t* overflow, void* workspace, void* stream);

int keep_offsets_cuda(const bool* keep, int64_t B, int64_t N, int64_t* offsets, void* stream);

// Scratch of pack_tokens_cuda, pack_tokens_padded_cuda and unpack_tokens_cuda: the rank of every
// kept token within its sample, B * N int32.
size_t token_ranks_workspace_bytes(int64_t B, int64_t N);
int pack_tokens_cuda(const void* features, size_t elem_bytes, const bool* keep,
                     const int64_t* offsets, int64_t B, int64_t N, int64_t D, void* packed,
                     void* workspace, void* stream);
int pack_tokens_padded_cuda(const void* features, size_t elem_bytes, const bool* keep, int64_t B,
                            int64_t N, int64_t D, int64_t capacity, void* packed, int64_t* lengths,
                            void* workspace, void* stream);
int unpack_tokens_cuda(const void* packed, size_t elem_bytes, const int64_t* offsets,
                       const bool* keep, int64_t B, int64_t N, int64_t D, int64_t packed_rows,
                       void* out, void* workspace, void* stream);

}  // namespace kernels
}  // namespace sdrpn
