// Unit tests of the CPU kernels against hand-computed values and brute-force references.
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

#include "../kernels/sdrpn_kernels.h"
#include "reference.h"
#include "test_util.h"

using namespace sdrpn::kernels;
using namespace sdrpn_test;

namespace {

double sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }

// Per-head definition of rpn_scores, in double.
std::vector<double> per_head_scores(const std::vector<double>& q, const std::vector<double>& k,
                                    int64_t B, int64_t Q, int64_t N, int64_t D, int64_t heads,
                                    double scale) {
  const int64_t d = D / heads;
  std::vector<double> out(B * N, 0.0);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t n = 0; n < N; ++n) {
      double total = 0.0;
      for (int64_t h = 0; h < heads; ++h)
        for (int64_t i = 0; i < Q; ++i) {
          double dot = 0.0;
          for (int64_t j = h * d; j < (h + 1) * d; ++j)
            dot += q[(b * Q + i) * D + j] * k[(b * N + n) * D + j];
          total += dot * scale;
        }
      out[b * N + n] = total / static_cast<double>(heads * Q);
    }
  return out;
}

std::vector<int32_t> label(const BoolArray& mask, int64_t B, int64_t H, int64_t W, int conn) {
  std::vector<int32_t> labels(B * H * W, -7);
  connected_components_cpu(mask.data(), labels.data(), B, H, W, conn);
  return labels;
}

void check_boxes(const std::vector<int32_t>& labels, int64_t B, int64_t H, int64_t W,
                 const BoxFilter& filter) {
  const int64_t M = filter.max_components;
  std::vector<int32_t> boxes(B * M * 4, -7), areas(B * M, -7), counts(B, -7), overflow(B, -7);
  BoolArray valid(B * M);
  std::fill(valid.data(), valid.data() + valid.size(), true);
  component_boxes_cpu(labels.data(), B, H, W, filter, boxes.data(), areas.data(), valid.data(),
                      counts.data(), overflow.data());
  const ExpectedBoxes expected = expected_boxes(labels, B, H, W, filter);
  CHECK_ELEMENTS(boxes, expected.boxes, boxes.size());
  CHECK_ELEMENTS(areas, expected.areas, areas.size());
  CHECK_ELEMENTS(valid, expected.valid, valid.size());
  CHECK_ELEMENTS(counts, expected.counts, counts.size());
  CHECK_ELEMENTS(overflow, expected.overflow, overflow.size());
}

}  // namespace

// --- rpn_scores -------------------------------------------------------------------------------

TEST_CASE(rpn_scores_f32_matches_per_head_mean) {
  std::mt19937 rng(1);
  std::normal_distribution<float> normal;
  // The second shape is large enough to run in parallel.
  for (auto [B, Q, N, D, heads] : {std::array<int64_t, 5>{3, 4, 7, 24, 1},
                                   {3, 4, 7, 24, 2},
                                   {3, 4, 7, 24, 3},
                                   {3, 4, 7, 24, 24},
                                   {2, 1, 300, 128, 8}}) {
    std::vector<float> q(B * Q * D), k(B * N * D);
    for (auto& v : q) v = normal(rng);
    for (auto& v : k) v = normal(rng);
    std::vector<float> out(B * N, NAN);
    rpn_scores_cpu(q.data(), k.data(), DType::F32, out.data(), B, Q, N, D, heads, 0.37f);
    const auto expected =
        per_head_scores({q.begin(), q.end()}, {k.begin(), k.end()}, B, Q, N, D, heads, 0.37);
    for (int64_t i = 0; i < B * N; ++i)
      CHECK_NEAR(out[i], expected[i], 1e-5 + 1e-5 * std::fabs(expected[i]));
  }
}

TEST_CASE(rpn_scores_16bit_matches_per_head_mean) {
  std::mt19937 rng(2);
  std::uniform_int_distribution<int> bits(0, 0xffff);
  const int64_t B = 2, Q = 3, N = 5, D = 16, heads = 4;
  for (DType dtype : {DType::F16, DType::BF16}) {
    auto value = dtype == DType::F16 ? fp16_value : bf16_value;
    std::vector<uint16_t> q(B * Q * D), k(B * N * D);
    // Finite values of moderate magnitude: sign + exponent chosen near 1.
    auto draw = [&](uint16_t& v) {
      do v = static_cast<uint16_t>(bits(rng));
      while (!std::isfinite(value(v)) || std::fabs(value(v)) > 8 || std::fabs(value(v)) < 1e-3);
    };
    for (auto& v : q) draw(v);
    for (auto& v : k) draw(v);
    std::vector<double> qd, kd;
    for (auto v : q) qd.push_back(value(v));
    for (auto v : k) kd.push_back(value(v));
    std::vector<float> out(B * N, NAN);
    rpn_scores_cpu(q.data(), k.data(), dtype, out.data(), B, Q, N, D, heads, 0.5f);
    const auto expected = per_head_scores(qd, kd, B, Q, N, D, heads, 0.5);
    for (int64_t i = 0; i < B * N; ++i)
      CHECK_NEAR(out[i], expected[i], 1e-4 + 1e-5 * std::fabs(expected[i]));
  }
}

// With q = 1 and D = 1 the score is the key itself: checks the decoding of all 65536 patterns.
TEST_CASE(rpn_scores_decodes_every_16bit_pattern) {
  const int64_t N = 65536;
  std::vector<uint16_t> k(N);
  for (int64_t i = 0; i < N; ++i) k[i] = static_cast<uint16_t>(i);
  for (DType dtype : {DType::F16, DType::BF16}) {
    const uint16_t one = dtype == DType::F16 ? 0x3c00 : 0x3f80;
    auto value = dtype == DType::F16 ? fp16_value : bf16_value;
    std::vector<float> out(N, 0.0f);
    rpn_scores_cpu(&one, k.data(), dtype, out.data(), 1, 1, N, 1, 1, 1.0f);
    int64_t wrong = 0;
    for (int64_t i = 0; i < N; ++i) {
      const double expected = value(static_cast<uint16_t>(i));
      // (-0 comes out as +0: the fp32 accumulator starts at +0)
      const bool same = std::isnan(expected) ? std::isnan(out[i]) : out[i] == expected;
      wrong += same ? 0 : 1;
    }
    CHECK_EQ(wrong, 0);
  }
}

TEST_CASE(rpn_scores_empty_keys_write_nothing) {
  const float q[2] = {1.0f, 2.0f};
  float sentinel = 42.0f;
  rpn_scores_cpu(q, nullptr, DType::F32, &sentinel, 1, 1, 0, 2, 1, 1.0f);
  CHECK_EQ(sentinel, 42.0f);
}

// --- roi_mask ---------------------------------------------------------------------------------

TEST_CASE(roi_mask_without_blur_is_strict_sigmoid_threshold) {
  const float logits[4] = {0.0f, 1.0f, -1.0f, 20.0f};
  float prob[4];
  BoolArray mask(4);
  roi_mask_cpu(logits, prob, mask.data(), 1, 2, 2, 0.5f, false);
  for (int i = 0; i < 4; ++i) CHECK_NEAR(prob[i], sigmoid(logits[i]), 1e-7);
  CHECK(!mask[0]);  // 0.5 is not > 0.5
  CHECK(mask[1]);
  CHECK(!mask[2]);
  CHECK(mask[3]);
}

TEST_CASE(roi_mask_blur_of_single_pixel_and_single_row) {
  // 1x1: every tap reflects onto the pixel itself and the weights sum to one.
  const float one_logit = 0.8f;
  float prob = 0.0f;
  BoolArray mask(1);
  roi_mask_cpu(&one_logit, &prob, mask.data(), 1, 1, 1, 0.0f, true);
  CHECK_NEAR(prob, sigmoid(0.8), 1e-6);
  CHECK(mask[0]);

  // 1x3: reflect maps -1 -> 1 and 3 -> 1; the vertical taps all read the single row.
  const float logits[3] = {-1.0f, 0.5f, 2.0f};
  float out[3];
  BoolArray row_mask(3);
  roi_mask_cpu(logits, out, row_mask.data(), 1, 1, 3, 0.9f, true);
  const double e = std::exp(-0.5), side = e / (1 + 2 * e), centre = 1 / (1 + 2 * e);
  const double s0 = sigmoid(-1.0), s1 = sigmoid(0.5), s2 = sigmoid(2.0);
  CHECK_NEAR(out[0], side * s1 + centre * s0 + side * s1, 1e-6);
  CHECK_NEAR(out[1], side * s0 + centre * s1 + side * s2, 1e-6);
  CHECK_NEAR(out[2], side * s1 + centre * s2 + side * s1, 1e-6);
  for (int i = 0; i < 3; ++i) CHECK(!row_mask[i]);
}

TEST_CASE(roi_mask_blur_matches_2d_reflect_convolution) {
  std::mt19937 rng(3);
  std::normal_distribution<float> normal(0.0f, 3.0f);
  const double e = std::exp(-0.5);
  const double w[3] = {e / (1 + 2 * e), 1 / (1 + 2 * e), e / (1 + 2 * e)};
  auto mirror = [](int64_t i, int64_t n) -> int64_t {
    if (n == 1) return 0;
    return i < 0 ? 1 : (i >= n ? n - 2 : i);
  };
  for (auto [B, H, W] : {std::array<int64_t, 3>{2, 5, 7},
                         {1, 2, 2},
                         {3, 1, 4},
                         {1, 6, 1},
                         {2, 24, 24},
                         {1, 200, 100}}) {
    std::vector<float> logits(B * H * W), prob(B * H * W);
    BoolArray mask(B * H * W);
    for (auto& v : logits) v = normal(rng);
    roi_mask_cpu(logits.data(), prob.data(), mask.data(), B, H, W, 0.3f, true);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t y = 0; y < H; ++y)
        for (int64_t x = 0; x < W; ++x) {
          double expected = 0.0;
          for (int dy = -1; dy <= 1; ++dy)
            for (int dx = -1; dx <= 1; ++dx)
              expected += w[dy + 1] * w[dx + 1] *
                          sigmoid(logits[(b * H + mirror(y + dy, H)) * W + mirror(x + dx, W)]);
          const int64_t i = (b * H + y) * W + x;
          CHECK_NEAR(prob[i], expected, 2e-6);
          CHECK_EQ(mask[i], prob[i] > 0.3f);
        }
  }
}

// --- connected_components ---------------------------------------------------------------------

TEST_CASE(connected_components_hand_labelled) {
  // Diagonal contact joins under 8-connectivity only; numbering follows the first pixel.
  const Grid grid = grid_from_rows("diagonal", {".#..#", "#...#", "..#..", "...#."});
  const std::vector<int32_t> eight = {0, 1, 0, 0, 2,  //
                                      1, 0, 0, 0, 2,  //
                                      0, 0, 0, 0, 0,  //
                                      0, 0, 0, 0, 0};
  std::vector<int32_t> expected8 = eight;
  expected8[12] = 3;
  expected8[18] = 3;
  CHECK_ELEMENTS(label(grid.mask, 1, 4, 5, 8), expected8, 20);
  const std::vector<int32_t> expected4 = {0, 1, 0, 0, 2,  //
                                          3, 0, 0, 0, 2,  //
                                          0, 0, 4, 0, 0,  //
                                          0, 0, 0, 5, 0};
  CHECK_ELEMENTS(label(grid.mask, 1, 4, 5, 4), expected4, 20);

  // A U whose arms only meet on the last row is one component numbered 1; the dot is 2.
  const Grid u = grid_from_rows("u", {
                                         "#.#.#",
                                         "#.#..",
                                         "###..",
                                     });
  const std::vector<int32_t> expected_u = {1, 0, 1, 0, 2,  //
                                           1, 0, 1, 0, 0,  //
                                           1, 1, 1, 0, 0};
  CHECK_ELEMENTS(label(u.mask, 1, 3, 5, 4), expected_u, 15);
  CHECK_ELEMENTS(label(u.mask, 1, 3, 5, 8), expected_u, 15);
}

TEST_CASE(connected_components_adversarial_shapes) {
  for (const Grid& grid : adversarial_grids()) {
    for (int conn : {4, 8}) {
      const auto labels = label(grid.mask, 1, grid.H, grid.W, conn);
      const auto expected = flood_fill_labels(grid.mask.data(), grid.H, grid.W, conn);
      if (labels != expected) {
        report_failure(__FILE__, __LINE__, grid.name + " connectivity " + std::to_string(conn));
      }
    }
  }
}

TEST_CASE(connected_components_random_batches) {
  std::mt19937 rng(4);
  // 160x160 batches are large enough to label the images in parallel.
  for (auto [H, W] : {std::pair<int64_t, int64_t>{1, 1},
                      {1, 9},
                      {9, 1},
                      {7, 13},
                      {24, 24},
                      {40, 33},
                      {160, 160}}) {
    for (double density : {0.0, 0.2, 0.45, 0.6, 0.9, 1.0}) {
      const int64_t B = 3;
      const BoolArray mask = random_mask(rng, B * H * W, density);
      for (int conn : {4, 8}) {
        const auto labels = label(mask, B, H, W, conn);
        for (int64_t b = 0; b < B; ++b) {
          const auto expected = flood_fill_labels(mask.data() + b * H * W, H, W, conn);
          CHECK_ELEMENTS(labels.data() + b * H * W, expected, expected.size());
        }
      }
    }
  }
}

// --- component_boxes --------------------------------------------------------------------------

TEST_CASE(component_boxes_hand_computed_filters) {
  // 6x8 grid: component 1 = single pixel (dropped as noise), 2 = two pixels at the right border
  // (grown, and clamped by the border), 3 = a 2x3 block (kept tight), 4 = a 9-pixel bar (dropped
  // as too large with max_area 8).
  const std::vector<int32_t> labels = {1, 0, 0, 0, 0, 0, 0, 2,  //
                                       0, 0, 0, 0, 0, 0, 0, 2,  //
                                       0, 3, 3, 3, 0, 0, 0, 0,  //
                                       0, 3, 3, 3, 0, 0, 0, 0,  //
                                       0, 0, 0, 0, 0, 0, 0, 0,  //
                                       4, 4, 4, 4, 4, 4, 4, 4};
  std::vector<int32_t> with_bar = labels;
  with_bar[4 * 8] = 4;  // the bar gets a ninth pixel above its left end
  const BoxFilter filter{4, 1, 4, 3, 8};
  std::vector<int32_t> boxes(16, -1), areas(4, -1), count(1, -1), overflow(1, -1);
  BoolArray valid(4);
  component_boxes_cpu(with_bar.data(), 1, 6, 8, filter, boxes.data(), areas.data(), valid.data(),
                      count.data(), overflow.data());
  // Component 2: box x [7, 8), y [0, 2). Width 3 around x centre 7.5 gives [6, 9), the end
  // clamped at W - 1 = 7: x [6, 7), missing the component's own column. Height 3 around y centre 1
  // gives [trunc(-0.5), trunc(2.5)) = [0, 2).
  const std::vector<int32_t> expected_boxes = {6, 0, 7, 2, 1, 2, 4, 4, 0, 0, 0, 0, 0, 0, 0, 0};
  CHECK_ELEMENTS(boxes, expected_boxes, 16);
  CHECK_ELEMENTS(areas, (std::vector<int32_t>{2, 6, 0, 0}), 4);
  CHECK(valid[0] && valid[1] && !valid[2] && !valid[3]);
  CHECK_EQ(count[0], 2);
  CHECK_EQ(overflow[0], 0);

  // One slot: the second kept component overflows.
  const BoxFilter one_slot{1, 1, 4, 3, 8};
  component_boxes_cpu(with_bar.data(), 1, 6, 8, one_slot, boxes.data(), areas.data(), valid.data(),
                      count.data(), overflow.data());
  CHECK_ELEMENTS(boxes, expected_boxes, 4);
  CHECK_EQ(count[0], 1);
  CHECK_EQ(overflow[0], 1);

  // grow_to larger than twice the grid: the box spans the grid but its last row and column, as the
  // ends clamp at W - 1 and H - 1.
  const BoxFilter huge_growth{4, 1, 4, 20, 100};
  component_boxes_cpu(labels.data(), 1, 6, 8, huge_growth, boxes.data(), areas.data(), valid.data(),
                      count.data(), overflow.data());
  CHECK_ELEMENTS(boxes, (std::vector<int32_t>{0, 0, 7, 5}), 4);
  CHECK_EQ(count[0], 3);

  // Any larger grow_to, up to the int64 limit, gives the same box.
  const BoxFilter largest_growth{4, 1, 4, INT64_MAX, 100};
  component_boxes_cpu(labels.data(), 1, 6, 8, largest_growth, boxes.data(), areas.data(),
                      valid.data(), count.data(), overflow.data());
  CHECK_ELEMENTS(boxes, (std::vector<int32_t>{0, 0, 7, 5}), 4);
}

TEST_CASE(component_boxes_match_brute_force) {
  std::mt19937 rng(5);
  std::uniform_int_distribution<int> pick(0, 6);
  for (auto [H, W] :
       {std::pair<int64_t, int64_t>{1, 1}, {2, 5}, {13, 9}, {24, 24}, {31, 40}, {160, 160}}) {
    for (double density : {0.1, 0.4, 0.7, 1.0}) {
      if (H * W > 10000 && density < 0.7) continue;  // the brute force is quadratic in labels
      const int64_t B = 3;
      const BoolArray mask = random_mask(rng, B * H * W, density);
      const auto labels = label(mask, B, H, W, 8);
      for (int repeat = 0; repeat < 4; ++repeat) {
        const BoxFilter filter{1 + pick(rng) * 3, pick(rng) % 3, pick(rng), 1 + pick(rng),
                               1 + pick(rng) * 20};
        check_boxes(labels, B, H, W, filter);
      }
    }
  }
}

TEST_CASE(component_boxes_ignore_out_of_range_labels) {
  // Gaps in the numbering are fine; negative labels and labels above H * W are background.
  const std::vector<int32_t> labels = {-3, 5, 5, 0, 100, 2, 2, 2, 9};
  check_boxes(labels, 1, 3, 3, BoxFilter{3, 0, 1, 1, 9});
  std::vector<int32_t> boxes(12), areas(3), count(1), overflow(1);
  BoolArray valid(3);
  component_boxes_cpu(labels.data(), 1, 3, 3, BoxFilter{3, 0, 1, 1, 9}, boxes.data(), areas.data(),
                      valid.data(), count.data(), overflow.data());
  CHECK_EQ(count[0], 3);  // labels 2, 5, 9
  CHECK_ELEMENTS(areas, (std::vector<int32_t>{3, 2, 1}), 3);
}

// --- token packing ----------------------------------------------------------------------------

TEST_CASE(pack_and_unpack_round_trip) {
  std::mt19937 rng(6);
  // The second shape is large enough to copy in parallel.
  for (auto [B, N, D] : {std::array<int64_t, 3>{3, 11, 5}, {3, 600, 64}}) {
    std::vector<double> features(B * N * D);
    for (size_t i = 0; i < features.size(); ++i) features[i] = 1.0 + static_cast<double>(i);
    BoolArray keep = random_mask(rng, B * N, 0.5);
    for (int64_t n = 0; n < N; ++n) keep[N + n] = false;  // one sample keeps nothing

    std::vector<int64_t> offsets(B + 1, -1);
    keep_offsets_cpu(keep.data(), B, N, offsets.data());
    CHECK_EQ(offsets[0], 0);
    std::vector<double> expected_packed;
    for (int64_t b = 0; b < B; ++b) {
      int64_t count = 0;
      for (int64_t n = 0; n < N; ++n) {
        if (!keep[b * N + n]) continue;
        ++count;
        for (int64_t d = 0; d < D; ++d) expected_packed.push_back(features[(b * N + n) * D + d]);
      }
      CHECK_EQ(offsets[b + 1] - offsets[b], count);
    }
    const int64_t total = offsets[B];
    std::vector<double> packed(total * D, -1.0);
    pack_tokens_cpu(features.data(), sizeof(double), keep.data(), offsets.data(), B, N, D,
                    packed.data());
    CHECK_ELEMENTS(packed, expected_packed, expected_packed.size());

    std::vector<double> restored(B * N * D, -1.0);
    unpack_tokens_cpu(packed.data(), sizeof(double), offsets.data(), keep.data(), B, N, D, total,
                      restored.data());
    for (int64_t i = 0; i < B * N * D; ++i) CHECK_EQ(restored[i], keep[i / D] ? features[i] : 0.0);
  }
}

TEST_CASE(pack_padded_truncates_and_reports_true_lengths) {
  const int64_t B = 2, N = 4, D = 2;
  const std::vector<uint16_t> features = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16};
  BoolArray keep(B * N);
  const bool pattern[8] = {true, false, true, true, false, true, false, false};
  std::copy(pattern, pattern + 8, keep.data());
  for (int64_t capacity : {0, 2, 5}) {
    std::vector<uint16_t> packed(B * capacity * D, 99);
    std::vector<int64_t> lengths(B, -1);
    pack_tokens_padded_cpu(features.data(), sizeof(uint16_t), keep.data(), B, N, D, capacity,
                           packed.data(), lengths.data());
    CHECK_EQ(lengths[0], 3);
    CHECK_EQ(lengths[1], 1);
    const std::vector<uint16_t> rows0 = {1, 2, 5, 6, 7, 8}, rows1 = {11, 12};
    for (int64_t j = 0; j < capacity; ++j)
      for (int64_t d = 0; d < D; ++d) {
        CHECK_EQ(packed[(0 * capacity + j) * D + d], j < 3 ? rows0[j * D + d] : 0);
        CHECK_EQ(packed[(1 * capacity + j) * D + d], j < 1 ? rows1[j * D + d] : 0);
      }
  }
}

TEST_CASE(unpack_with_inconsistent_offsets_stays_in_bounds) {
  const int64_t B = 2, N = 3, D = 1;
  const std::vector<float> packed = {1.0f, 2.0f};
  BoolArray keep(B * N);
  std::fill(keep.data(), keep.data() + keep.size(), true);
  const std::vector<int64_t> offsets = {0, 1, 9};  // claims more rows than packed holds
  std::vector<float> out(B * N * D, -1.0f);
  unpack_tokens_cpu(packed.data(), sizeof(float), offsets.data(), keep.data(), B, N, D, 2,
                    out.data());
  CHECK_ELEMENTS(out, (std::vector<float>{1.0f, 0.0f, 0.0f, 2.0f, 0.0f, 0.0f}), 6);
}

int main(int argc, char** argv) { return run_tests(argc, argv); }
