use clap::Parser;

fn main() {
    let args = mlx_serving_bench::cli::Args::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = runtime.block_on(mlx_serving_bench::cli::main(args)) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
