//! `mlx-serving`: the command-line entry.
mod admin;
mod config;
mod generate;
mod serve;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "mlx-serving", version, about = "Serve LLMs from a pool of MLX workers")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate text from a prompt and stream it to the terminal.
    Generate(generate::GenerateArgs),
    /// Run the supervisor: a pool of workers and the admin API.
    Serve(serve::ServeArgs),
    /// Call the admin API of a running supervisor.
    Admin(admin::AdminArgs),
    /// Check a configuration file, or print its JSON Schema.
    Config(config::ConfigArgs),
}

fn main() {
    let result = match Cli::parse().command {
        Command::Generate(args) => generate::run(args),
        Command::Serve(args) => serve::run(args),
        Command::Admin(args) => admin::run(args),
        Command::Config(args) => config::run(args),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
