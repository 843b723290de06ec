// Definitions shared by the CPU and CUDA kernels, so that both backends implement the op contract
// from one source: fp16/bf16 decoding, the reflect-padded Gaussian blur and the component filter.
#pragma once

#include <cstdint>
#include <cstring>

#include "sdrpn_kernels.h"

#if defined(__CUDACC__)
#define SDRPN_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define SDRPN_HOST_DEVICE inline
#endif

namespace sdrpn {
namespace kernels {

// --- 16-bit floats stored as uint16_t -----------------------------------------------------------

SDRPN_HOST_DEVICE float float_from_bits(uint32_t bits) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(bits);
#else
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
#endif
}

// bfloat16 is the upper half of an fp32 bit pattern.
SDRPN_HOST_DEVICE float bf16_to_float(uint16_t value) {
  return float_from_bits(static_cast<uint32_t>(value) << 16);
}

SDRPN_HOST_DEVICE uint32_t bits_from_float(float value) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(value);
#else
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  return bits;
#endif
}

// IEEE binary16 -> binary32, exact for every input (zeros, subnormals, infinities, NaNs) and
// independent of denormal flushing. The three cases are blended with bit masks instead of
// branches so that loops over this function vectorise.
SDRPN_HOST_DEVICE float fp16_to_float(uint16_t value) {
  const uint32_t sign = (static_cast<uint32_t>(value) & 0x8000u) << 16;
  const uint32_t exponent = (value >> 10) & 0x1fu;
  const uint32_t mantissa = value & 0x3ffu;
  // normal: rebias the exponent from 15 to 127
  const uint32_t normal = ((exponent + 112u) << 23) | (mantissa << 13);
  // all-ones exponent: infinity or NaN, payload kept
  const uint32_t special = 0x7f800000u | (mantissa << 13);
  // zero or subnormal: mantissa * 2^-24, a normal fp32 number (or zero)
  const uint32_t subnormal =
      bits_from_float(static_cast<float>(static_cast<int32_t>(mantissa)) * 5.9604644775390625e-8f);
  const uint32_t is_special = 0u - static_cast<uint32_t>(exponent == 0x1fu);  // all ones or 0
  const uint32_t is_subnormal = 0u - static_cast<uint32_t>(exponent == 0u);
  const uint32_t wide = (normal & ~is_special) | (special & is_special);
  return float_from_bits(sign | (wide & ~is_subnormal) | (subnormal & is_subnormal));
}

// --- roi_mask -----------------------------------------------------------------------------------

// 1-D Gaussian, sigma 1, normalised: [e^-0.5, 1, e^-0.5] / (1 + 2 e^-0.5).
constexpr double kGaussTail = 0.60653065971263342360;  // e^-0.5
constexpr float kBlurCentre = static_cast<float>(1.0 / (1.0 + 2.0 * kGaussTail));
constexpr float kBlurSide = static_cast<float>(kGaussTail / (1.0 + 2.0 * kGaussTail));

// Reflect padding without repeating the edge (-1 -> 1, n -> n - 2); a size-1 dimension reflects
// onto its only element. Only called with i in [-1, n].
SDRPN_HOST_DEVICE int64_t reflect_index(int64_t i, int64_t n) {
  if (n == 1) return 0;
  if (i < 0) return -i;
  if (i >= n) return 2 * n - 2 - i;
  return i;
}

SDRPN_HOST_DEVICE float blur_taps(float before, float centre, float after) {
  return kBlurSide * before + kBlurCentre * centre + kBlurSide * after;
}

// --- component_boxes ----------------------------------------------------------------------------

// One axis of the authors' growth of a small component (YuHengsss/SD-RPN 00876ac,
// LLaVA/llava/ana_utils.py, get_bbox_from_noisy_map, ~795-803). The tight extent [lo, hi) becomes
// a window of width max(min_width, hi - lo + 1) centred on (lo + hi) / 2, with both ends truncated
// toward zero, the start clamped at 0 and the end at extent - 1. The end clamp (extent - 1, not
// extent) is theirs: at the far border the window is narrower and can miss the component's last
// cell. Twice each end is an integer, so integer '/' (which truncates like Python's int())
// reproduces their float arithmetic exactly.
SDRPN_HOST_DEVICE void grow_interval(int64_t lo, int64_t hi, int64_t min_width, int64_t extent,
                                     int32_t* grown_lo, int32_t* grown_hi) {
  int64_t width = hi - lo + 1;
  if (width < min_width) width = min_width;
  // Any width >= 2 * extent gives [0, extent - 1); the cap keeps the sums below from overflowing.
  if (width > 2 * extent) width = 2 * extent;
  const int64_t start = (lo + hi - width) / 2;
  const int64_t end = (lo + hi + width) / 2;
  *grown_lo = static_cast<int32_t>(start < 0 ? 0 : start);
  *grown_hi = static_cast<int32_t>(end > extent - 1 ? extent - 1 : end);
}

// Applies the filters to one component with pixel area `area` and tight box [x0, x1) x [y0, y1).
// Returns whether it is kept; if so `box` receives its (possibly grown) [x0, y0, x1, y1).
SDRPN_HOST_DEVICE bool filter_component(int64_t area, int32_t x0, int32_t y0, int32_t x1,
                                        int32_t y1, int64_t H, int64_t W, const BoxFilter& filter,
                                        int32_t box[4]) {
  if (area <= filter.drop_area || area > filter.max_area) return false;
  if (area < filter.min_area) {
    grow_interval(x0, x1, filter.grow_to, W, &box[0], &box[2]);
    grow_interval(y0, y1, filter.grow_to, H, &box[1], &box[3]);
  } else {
    box[0] = x0;
    box[1] = y0;
    box[2] = x1;
    box[3] = y1;
  }
  return true;
}

}  // namespace kernels
}  // namespace sdrpn
