// Gives this package's binaries and tests the run path to libmlx (see crates/mlx/build.rs).
fn main() {
    if let Ok(dir) = std::env::var("DEP_MLX_LIBDIR") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
    }
}
