//! Builds the C++ shim against the official MLX distribution and links libmlx.
//!
//! MLX is looked for in this order:
//! 1. `MLX_DIR`: a directory with `include/mlx/mlx.h` and `lib/libmlx.{so,dylib}`.
//! 2. The `mlx` Python package that `$MLX_PYTHON` (default `python3`) imports: the `mlx-cpu` wheel on
//!    Linux, `mlx-metal` on macOS, `mlx-cuda-13` on NVIDIA machines.
//!
//! The library directory is written into the binaries' run path, and passed to dependent crates as
//! `DEP_MLX_LIBDIR` so that their binaries and tests get the same run path.
use std::path::{Path, PathBuf};
use std::process::Command;

const INSTALL_HINT: &str = "MLX was not found. Either set MLX_DIR to a directory that holds \
include/mlx/mlx.h and lib/libmlx.so (lib/libmlx.dylib on macOS), or install the MLX wheel for the \
python3 on PATH (or for $MLX_PYTHON): `pip install mlx-cpu==0.32.4` on Linux, \
`pip install mlx==0.32.4` on macOS, `pip install mlx-cuda-13==0.32.4` on NVIDIA machines.";

fn main() {
    println!("cargo:rerun-if-env-changed=MLX_DIR");
    println!("cargo:rerun-if-env-changed=MLX_PYTHON");
    println!("cargo:rerun-if-changed=shim/shim.cpp");
    println!("cargo:rerun-if-changed=shim/shim.h");
    println!("cargo:rerun-if-changed=shim/internal.h");
    println!("cargo:rerun-if-changed=shim/gemm.cpp");
    println!("cargo:rerun-if-changed=shim/padded_attention.inc");

    let root = find_mlx().unwrap_or_else(|why| panic!("{why}\n\n{INSTALL_HINT}"));
    let include = root.join("include");
    let lib = root.join("lib");

    cc::Build::new()
        .cpp(true)
        .std("c++20")
        .file("shim/shim.cpp")
        .file("shim/gemm.cpp")
        .include(&include)
        .include("shim")
        .flag_if_supported("-Wno-unused-parameter")
        .flag_if_supported("-Wno-deprecated-declarations")
        // gemm.cpp repeats MLX's float32 operations one for one: no fused multiply-add.
        .flag_if_supported("-ffp-contract=off")
        .flag_if_supported("-Wno-psabi")
        .compile("mlxshim");

    println!("cargo:rustc-link-search=native={}", lib.display());
    println!("cargo:rustc-link-lib=dylib=mlx");
    // The run path for this crate's own tests; dependents add theirs from DEP_MLX_LIBDIR.
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    println!("cargo:libdir={}", lib.display());
    println!("cargo:include={}", include.display());
}

fn find_mlx() -> Result<PathBuf, String> {
    if let Ok(dir) = std::env::var("MLX_DIR") {
        let path = PathBuf::from(&dir);
        return check(&path).map(|()| path).map_err(|e| format!("MLX_DIR={dir}: {e}"));
    }
    let python = std::env::var("MLX_PYTHON").unwrap_or_else(|_| "python3".to_string());
    let out = Command::new(&python)
        .args(["-c", "import os, mlx; print(os.path.dirname(mlx.__file__) if mlx.__file__ else list(mlx.__path__)[0])"])
        .output()
        .map_err(|e| format!("could not run `{python}` to look for the mlx package: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "`{python}` could not import the mlx package: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    check(&dir).map_err(|e| format!("the mlx package at {}: {e}", dir.display()))?;
    Ok(dir)
}

fn check(dir: &Path) -> Result<(), String> {
    if !dir.join("include/mlx/mlx.h").is_file() {
        return Err("include/mlx/mlx.h is missing".into());
    }
    let has_lib = ["libmlx.so", "libmlx.dylib"].iter().any(|l| dir.join("lib").join(l).is_file());
    if !has_lib {
        return Err("lib/libmlx.so (or lib/libmlx.dylib) is missing".into());
    }
    Ok(())
}
