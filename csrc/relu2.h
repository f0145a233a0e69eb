#pragma once
#include <cstdint>

namespace fm_engine {
// x, y, dy, dx: device pointers to n contiguous elements of the dtype code (see common.h).
void relu2_forward(std::uintptr_t x, std::uintptr_t y, int64_t n, int dtype, std::uintptr_t stream);
void relu2_backward(std::uintptr_t x, std::uintptr_t dy, std::uintptr_t dx, int64_t n, int dtype,
                    std::uintptr_t stream);
}  // namespace fm_engine
