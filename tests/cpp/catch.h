// Catch2 v2 (Debian bookworm) and v3 have different headers; the tests include this one.
#pragma once
#if defined(LORAFUSE_CATCH2_V3)
#include <catch2/catch_approx.hpp>
#include <catch2/catch_test_macros.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>
using Catch::Approx;
#else
#include <catch2/catch.hpp>
#endif
