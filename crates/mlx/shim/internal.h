// What the shim's C++ files share: the array handle behind `mlxs_array` and the error slot.
#pragma once

#include "mlx/mlx.h"
#include "shim.h"

struct mlxs_array {
  mlx::core::array a;
};

#include <exception>
#include <utility>

// Sets the message mlxs_last_error() returns on this thread (NULL: an unknown error).
void mlxs_set_error(const char* what);

// Runs `f`, which returns an mx::array, and wraps the result; on exception returns NULL.
template <typename F>
mlxs_array* guard(F&& f) {
  try {
    return new mlxs_array{f()};
  } catch (const std::exception& e) {
    mlxs_set_error(e.what());
  } catch (...) {
    mlxs_set_error(nullptr);
  }
  return nullptr;
}
