// What the shim's C++ files share: the array handle behind `mlxs_array` and the error slot.
#pragma once

#include "mlx/mlx.h"
#include "shim.h"

struct mlxs_array {
  mlx::core::array a;
};

// Sets the message mlxs_last_error() returns on this thread (NULL: an unknown error).
void mlxs_set_error(const char* what);
