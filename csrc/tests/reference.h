// Independent brute-force references and input generators shared by the CPU and CUDA tests.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <queue>
#include <random>
#include <string>
#include <vector>

#include "../kernels/sdrpn_kernels.h"
#include "test_util.h"

namespace sdrpn_test {

struct Grid {
  std::string name;
  int64_t H, W;
  BoolArray mask;
};

// Flood fill started from pixels in raster order: the definition of skimage.measure.label's
// numbering.
inline std::vector<int32_t> flood_fill_labels(const bool* mask, int64_t H, int64_t W,
                                              int connectivity) {
  std::vector<int32_t> labels(static_cast<size_t>(H * W), 0);
  int32_t next = 0;
  for (int64_t start = 0; start < H * W; ++start) {
    if (!mask[start] || labels[start] != 0) continue;
    labels[start] = ++next;
    std::queue<int64_t> todo;
    todo.push(start);
    while (!todo.empty()) {
      const int64_t p = todo.front();
      todo.pop();
      const int64_t y = p / W, x = p % W;
      for (int64_t dy = -1; dy <= 1; ++dy) {
        for (int64_t dx = -1; dx <= 1; ++dx) {
          if ((dy == 0 && dx == 0) || (connectivity == 4 && dy != 0 && dx != 0)) continue;
          const int64_t ny = y + dy, nx = x + dx;
          if (ny < 0 || ny >= H || nx < 0 || nx >= W) continue;
          const int64_t q = ny * W + nx;
          if (mask[q] && labels[q] == 0) {
            labels[q] = next;
            todo.push(q);
          }
        }
      }
    }
  }
  return labels;
}

struct ExpectedBoxes {
  std::vector<int32_t> boxes, areas, counts, overflow;
  BoolArray valid;
};

// Straight from the op contract: per label, count pixels and take the extreme coordinates, then
// drop / grow / keep and fill the slots.
inline ExpectedBoxes expected_boxes(const std::vector<int32_t>& labels, int64_t B, int64_t H,
                                    int64_t W, const sdrpn::kernels::BoxFilter& filter) {
  const int64_t M = filter.max_components;
  ExpectedBoxes out{std::vector<int32_t>(B * M * 4, 0), std::vector<int32_t>(B * M, 0),
                    std::vector<int32_t>(B, 0), std::vector<int32_t>(B, 0),
                    BoolArray(static_cast<size_t>(B * M))};
  // The authors' growth of one axis, in their float arithmetic (exact: every value is a multiple
  // of 0.5) with std::trunc for Python's int().
  auto grow = [](int32_t lo, int32_t hi, int64_t min_width, int64_t extent, int32_t& grown_lo,
                 int32_t& grown_hi) {
    const double centre = (lo + hi) / 2.0;
    const double width = static_cast<double>(std::max<int64_t>(min_width, hi - lo + 1));
    grown_lo = static_cast<int32_t>(std::max(0.0, std::trunc(centre - width / 2)));
    grown_hi = static_cast<int32_t>(
        std::min(static_cast<double>(extent - 1), std::trunc(centre + width / 2)));
  };
  for (int64_t b = 0; b < B; ++b) {
    const int32_t* image = labels.data() + b * H * W;
    const int32_t largest = *std::max_element(image, image + H * W);
    int64_t kept = 0;
    for (int32_t c = 1; c <= std::min<int64_t>(largest, H * W); ++c) {
      int64_t area = 0;
      int32_t x0 = INT32_MAX, y0 = INT32_MAX, x1 = -1, y1 = -1;
      for (int32_t y = 0; y < H; ++y) {
        for (int32_t x = 0; x < W; ++x) {
          if (image[y * W + x] != c) continue;
          ++area;
          x0 = std::min(x0, x);
          y0 = std::min(y0, y);
          x1 = std::max(x1, x + 1);
          y1 = std::max(y1, y + 1);
        }
      }
      if (area == 0 || area <= filter.drop_area || area > filter.max_area) continue;
      int32_t box[4] = {x0, y0, x1, y1};
      if (area < filter.min_area) {
        grow(x0, x1, filter.grow_to, W, box[0], box[2]);
        grow(y0, y1, filter.grow_to, H, box[1], box[3]);
      }
      if (kept < M) {
        const int64_t slot = b * M + kept;
        std::copy(box, box + 4, out.boxes.begin() + slot * 4);
        out.areas[slot] = static_cast<int32_t>(area);
        out.valid[slot] = true;
      }
      ++kept;
    }
    out.counts[b] = static_cast<int32_t>(std::min(kept, M));
    out.overflow[b] = static_cast<int32_t>(std::max<int64_t>(kept - M, 0));
  }
  return out;
}

inline Grid grid_from_rows(const std::string& name, const std::vector<std::string>& rows) {
  const int64_t H = static_cast<int64_t>(rows.size());
  const int64_t W = static_cast<int64_t>(rows[0].size());
  Grid grid{name, H, W, BoolArray(static_cast<size_t>(H * W))};
  for (int64_t y = 0; y < H; ++y)
    for (int64_t x = 0; x < W; ++x) grid.mask[y * W + x] = rows[y][x] == '#';
  return grid;
}

// Shapes that break naive labelling: numbering order, late merges, diagonal-only contacts, borders.
inline std::vector<Grid> adversarial_grids() {
  std::vector<Grid> grids;
  auto add = [&](const std::string& name, int64_t H, int64_t W, auto&& on) {
    Grid grid{name, H, W, BoolArray(static_cast<size_t>(H * W))};
    for (int64_t y = 0; y < H; ++y)
      for (int64_t x = 0; x < W; ++x) grid.mask[y * W + x] = on(y, x);
    grids.push_back(std::move(grid));
  };
  for (int64_t size : {1, 2, 3, 24, 63, 64, 65, 130}) {
    add("empty" + std::to_string(size), size, size, [](int64_t, int64_t) { return false; });
    add("full" + std::to_string(size), size, size, [](int64_t, int64_t) { return true; });
    add("checkerboard" + std::to_string(size), size, size,
        [](int64_t y, int64_t x) { return (y + x) % 2 == 0; });
    add("diagonals" + std::to_string(size), size, size,
        [size](int64_t y, int64_t x) { return (x - y + 1000 * size) % 4 == 0; });
    add("anti_diagonals" + std::to_string(size), size, size,
        [](int64_t y, int64_t x) { return (x + y) % 3 == 0; });
    add("corners" + std::to_string(size), size, size, [size](int64_t y, int64_t x) {
      return (y == 0 || y == size - 1) && (x == 0 || x == size - 1);
    });
    add("border_dots" + std::to_string(size), size, size, [size](int64_t y, int64_t x) {
      return (y == 0 || y == size - 1 || x == 0 || x == size - 1) && (y + x) % 2 == 1;
    });
    add("stripes" + std::to_string(size), size, size,
        [](int64_t, int64_t x) { return x % 2 == 0; });
    // Nested U shapes whose arms only meet on the bottom row: the right arm is met first in raster
    // order on every row above.
    add("nested_u" + std::to_string(size), size, size, [size](int64_t y, int64_t x) {
      if (y == size - 1) return true;
      return x % 2 == 0;
    });
    // A serpentine: full rows on even rows, joined alternately at the right and left ends.
    add("serpentine" + std::to_string(size), size, size, [size](int64_t y, int64_t x) {
      if (y % 2 == 0) return true;
      return (y % 4 == 1) ? x == size - 1 : x == 0;
    });
  }
  // Square spiral of width 1 with a gap of 1 between turns: one long component whose first pixel
  // and last pixel are far apart in raster order.
  for (int64_t size : {5, 9, 24, 64, 101}) {
    Grid grid{"spiral" + std::to_string(size), size, size,
              BoolArray(static_cast<size_t>(size * size))};
    int64_t top = 0, left = 0, bottom = size - 1, right = size - 1;
    while (top <= bottom && left <= right) {
      for (int64_t x = left; x <= right; ++x) grid.mask[top * size + x] = true;
      for (int64_t y = top; y <= bottom; ++y) grid.mask[y * size + right] = true;
      if (top + 2 <= bottom)
        for (int64_t x = left; x <= right; ++x) grid.mask[bottom * size + x] = true;
      if (left + 2 <= right)
        for (int64_t y = top + 2; y <= bottom; ++y) grid.mask[y * size + left] = true;
      top += 2;
      left += 2;
      bottom -= 2;
      right -= 2;
      if (top <= bottom) grid.mask[top * size + left - 1] = true;  // link to the next turn
    }
    grids.push_back(std::move(grid));
  }
  // Non-square and degenerate shapes.
  add("row1x40", 1, 40, [](int64_t, int64_t x) { return x % 3 != 2; });
  add("column40x1", 40, 1, [](int64_t y, int64_t) { return y % 3 != 2; });
  add("wide3x200", 3, 200, [](int64_t y, int64_t x) { return (x + y) % 5 < 2; });
  return grids;
}

inline BoolArray random_mask(std::mt19937& rng, int64_t pixels, double density) {
  std::bernoulli_distribution on(density);
  BoolArray mask(static_cast<size_t>(pixels));
  for (size_t i = 0; i < mask.size(); ++i) mask[i] = on(rng);
  return mask;
}

// Exact fp16 / bf16 values from their fields, for checking the hand-written decoders.
inline double fp16_value(uint16_t bits) {
  const int sign = bits >> 15, exponent = (bits >> 10) & 0x1f, mantissa = bits & 0x3ff;
  double magnitude;
  if (exponent == 0x1f)
    magnitude = mantissa ? NAN : INFINITY;
  else if (exponent == 0)
    magnitude = std::ldexp(mantissa, -24);
  else
    magnitude = std::ldexp(1024 + mantissa, exponent - 25);
  return sign ? -magnitude : magnitude;
}

inline double bf16_value(uint16_t bits) {
  const int sign = bits >> 15, exponent = (bits >> 7) & 0xff, mantissa = bits & 0x7f;
  double magnitude;
  if (exponent == 0xff)
    magnitude = mantissa ? NAN : INFINITY;
  else if (exponent == 0)
    magnitude = std::ldexp(mantissa, -133);
  else
    magnitude = std::ldexp(128 + mantissa, exponent - 134);
  return sign ? -magnitude : magnitude;
}

}  // namespace sdrpn_test
