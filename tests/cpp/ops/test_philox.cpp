// The dropout generator of cuda/shared/philox.h: Philox-4x32-10 known-answer vectors (Random123's
// kat_vectors), the keep threshold, the documented counter/key layout, and keep-rate statistics.
#include <cmath>
#include <cstdint>
#include <vector>

#include "catch.h"
#include "csrc/ops/cpu/dropout_cpu.h"
#include "cuda/shared/philox.h"

namespace ph = lorafuse::philox;

namespace {

void require_words(const ph::Uint4& got, uint32_t x, uint32_t y, uint32_t z, uint32_t w) {
  INFO("got {" << std::hex << got.x << ", " << got.y << ", " << got.z << ", " << got.w << "}");
  CHECK(got.x == x);
  CHECK(got.y == y);
  CHECK(got.z == z);
  CHECK(got.w == w);
}

// Fraction of kept elements among e in [0, n) for (seed, offset, p).
double keep_rate(uint64_t seed, uint64_t offset, double p, uint64_t n) {
  const uint32_t t = ph::keep_threshold(p);
  uint64_t kept = 0;
  for (uint64_t e = 0; e < n; ++e) kept += ph::keep(seed, offset, e, t) ? 1 : 0;
  return static_cast<double>(kept) / static_cast<double>(n);
}

}  // namespace

TEST_CASE("philox4x32_10 matches Random123's known-answer vectors", "[philox]") {
  SECTION("zero counter, zero key") {
    require_words(ph::philox4x32_10({0, 0, 0, 0}, 0, 0), 0x6627e8d5u, 0xe169c58du, 0xbc57ac4cu, 0x9b00dbd8u);
  }
  SECTION("all-ones counter and key") {
    require_words(ph::philox4x32_10({0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu}, 0xffffffffu, 0xffffffffu),
                  0x408f276du, 0x41c83b0eu, 0xa20bc7c6u, 0x6d5451fdu);
  }
  SECTION("digits of pi") {
    require_words(ph::philox4x32_10({0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u}, 0xa4093822u, 0x299f31d0u),
                  0xd16cfe09u, 0x94fdccebu, 0x5001e420u, 0x24126ea1u);
  }
}

TEST_CASE("keep_threshold maps p to floor(p * 2^32), saturating below 1", "[philox]") {
  CHECK(ph::keep_threshold(0.0) == 0u);
  CHECK(ph::keep_threshold(0.5) == 0x80000000u);
  CHECK(ph::keep_threshold(0.25) == 0x40000000u);
  CHECK(ph::keep_threshold(0.1) == static_cast<uint32_t>(0.1 * 4294967296.0));
  CHECK(ph::keep_threshold(std::nextafter(1.0, 0.0)) == 0xffffffffu);
  // p = 2^-32: exactly one word value (0) is dropped
  CHECK(ph::keep_threshold(1.0 / 4294967296.0) == 1u);

  SECTION("monotone and within one part in 2^32 of p") {
    uint32_t prev = 0;
    for (int i = 0; i <= 1000; ++i) {
      const double p = i / 1000.0 * std::nextafter(1.0, 0.0);
      const uint32_t t = ph::keep_threshold(p);
      INFO("p = " << p << ", threshold = " << t);
      CHECK(t >= prev);
      CHECK(std::abs(t / 4294967296.0 - p) <= 1.0 / 4294967296.0);
      prev = t;
    }
  }
  SECTION("threshold 0 keeps everything, whatever the word") {
    for (uint64_t e = 0; e < 4096; ++e) REQUIRE(ph::keep(0x1234, 0, e, 0u));
  }
}

TEST_CASE("element e uses word e % 4 of philox(counter = (offset / 4, e / 4), key = seed)", "[philox]") {
  const uint64_t seed = 0x0123456789abcdefull, offset = 0xfedcba9876543210ull;
  for (uint64_t group :
       {uint64_t{0}, uint64_t{1}, uint64_t{0xffffffffull}, uint64_t{0x100000000ull}, uint64_t{0x0eadbeefcafef00dull}}) {
    const ph::Uint4 expected =
        ph::philox4x32_10({static_cast<uint32_t>(offset >> 2), static_cast<uint32_t>(offset >> 34),
                           static_cast<uint32_t>(group), static_cast<uint32_t>(group >> 32)},
                          0x89abcdefu, 0x01234567u);
    const ph::Uint4 got = ph::words_for_group(seed, offset, group);
    INFO("group " << group);
    require_words(got, expected.x, expected.y, expected.z, expected.w);
    const uint32_t words[4] = {expected.x, expected.y, expected.z, expected.w};
    for (unsigned i = 0; i < 4; ++i) {
      CHECK(ph::pick(got, i) == words[i]);
      // keep() of element 4*group + i (groups below 2^62, so e does not wrap) compares exactly that word
      const uint64_t e = 4 * group + i;
      CHECK(ph::keep(seed, offset, e, words[i]));
      if (words[i] != 0xffffffffu) CHECK_FALSE(ph::keep(seed, offset, e, words[i] + 1u));
    }
  }
  SECTION("high halves of the group index, offset and seed all matter") {
    const ph::Uint4 base = ph::words_for_group(seed, offset, 5);
    const ph::Uint4 g = ph::words_for_group(seed, offset, 5 + (uint64_t{1} << 32));
    const ph::Uint4 o = ph::words_for_group(seed, offset ^ (uint64_t{1} << 40), 5);
    const ph::Uint4 s = ph::words_for_group(seed ^ (uint64_t{1} << 50), offset, 5);
    for (const auto& other : {g, o, s}) {
      CHECK((other.x != base.x || other.y != base.y || other.z != base.z || other.w != base.w));
    }
  }
}

TEST_CASE("keep rate is 1 - p within a few standard deviations", "[philox]") {
  const uint64_t n = 1000000;
  for (double p : {0.01, 0.1, 0.25, 0.5, 0.9}) {
    for (uint64_t seed : {uint64_t{0}, uint64_t{42}, uint64_t{0x9e3779b97f4a7c15ull}}) {
      const double rate = keep_rate(seed, /*offset=*/seed & 7, p, n);
      const double sd = std::sqrt(p * (1 - p) / n);
      INFO("p = " << p << ", seed = " << seed << ", keep rate " << rate);
      CHECK(std::abs(rate - (1 - p)) < 5 * sd);
    }
  }
}

TEST_CASE("words are uniform and neighbouring elements independent", "[philox]") {
  const uint64_t seed = 7, groups = 250000;  // 10^6 words
  std::vector<uint64_t> bins(16, 0);
  uint64_t both_kept = 0, first_kept = 0;
  const uint32_t half = ph::keep_threshold(0.5);
  for (uint64_t g = 0; g < groups; ++g) {
    const ph::Uint4 w = ph::words_for_group(seed, 0, g);
    for (unsigned i = 0; i < 4; ++i) ++bins[ph::pick(w, i) >> 28];
    // pairs within a block (x, y) and across blocks (w of this block, x of the next)
    const bool a = w.x >= half, b = w.y >= half;
    first_kept += a;
    both_kept += a && b;
  }
  // chi-square with 15 degrees of freedom: 99.99th percentile is about 44
  const double expected = 4.0 * groups / 16;
  double chi2 = 0;
  for (uint64_t c : bins) chi2 += (c - expected) * (c - expected) / expected;
  INFO("chi2 = " << chi2);
  CHECK(chi2 < 44.0);
  // P(both kept) = P(kept)^2 = 1/4 for independent words
  const double pb = static_cast<double>(both_kept) / groups;
  INFO("P(x and y kept) = " << pb << ", P(x kept) = " << static_cast<double>(first_kept) / groups);
  CHECK(std::abs(pb - 0.25) < 5 * std::sqrt(0.25 * 0.75 / groups));
}

TEST_CASE("different seeds or offsets draw different masks", "[philox]") {
  const uint64_t n = 100000;
  const uint32_t t = ph::keep_threshold(0.5);
  uint64_t diff_seed = 0, diff_offset = 0, same = 0;
  for (uint64_t e = 0; e < n; ++e) {
    const bool k = ph::keep(1, 0, e, t);
    diff_seed += k != ph::keep(2, 0, e, t);
    diff_offset += k != ph::keep(1, 4, e, t);  // offsets advance in steps of 4, as torch reserves them
    same += k == ph::keep(1, 0, e, t);
  }
  // independent masks at p = 0.5 disagree on half of the elements
  CHECK(std::abs(static_cast<double>(diff_seed) / n - 0.5) < 0.01);
  CHECK(std::abs(static_cast<double>(diff_offset) / n - 0.5) < 0.01);
  CHECK(same == n);
}

TEST_CASE("philox: the CPU kernels' words for a range equal philox::keep's, element by element",
          "[cpu][ops][dropout]") {
  std::vector<uint32_t> buffer;
  const uint64_t near_carry = ((uint64_t{1} << 32) - 5) * 4 + 1;  // groups that cross a 2^32 boundary in a batch
  for (const uint64_t seed : {uint64_t{0}, uint64_t{42}, uint64_t{0x123456789ABCDEFull}}) {
    for (const uint64_t offset : {uint64_t{0}, uint64_t{8}, uint64_t{1} << 40}) {
      for (const auto& [e0, n] : std::vector<std::pair<uint64_t, int64_t>>{
               {0, 0}, {0, 1}, {3, 5}, {0, 64}, {5, 133}, {4096 * 7 + 2, 1000}, {near_carry, 200}}) {
        const uint32_t* w = lorafuse::cpu::mask_words(seed, offset, e0, n, buffer);
        for (int64_t k = 0; k < n; ++k) {
          const uint64_t e = e0 + static_cast<uint64_t>(k);
          const uint32_t want = ph::pick(ph::words_for_group(seed, offset, e >> 2), static_cast<unsigned>(e & 3));
          INFO("seed " << seed << ", offset " << offset << ", element " << e);
          REQUIRE(w[k] == want);
        }
      }
    }
  }
}
