// Turn a runtime value into a template constant: RANK_TILE_SWITCH(rc, R, ...) runs the body with
// constexpr int R = 16, 32 or 64, the smallest tile that holds rc (1 <= rc <= 64).
#pragma once

#define LORAFUSE_RANK_TILE_SWITCH(RC, NAME, ...) \
  [&] {                                          \
    if ((RC) <= 16) {                            \
      constexpr int NAME = 16;                   \
      return __VA_ARGS__();                      \
    } else if ((RC) <= 32) {                     \
      constexpr int NAME = 32;                   \
      return __VA_ARGS__();                      \
    } else {                                     \
      constexpr int NAME = 64;                   \
      return __VA_ARGS__();                      \
    }                                            \
  }()
