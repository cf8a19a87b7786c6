//! `mlx-serving`: the command-line entry.
mod admin;
mod config;
mod generate;
mod serve;

use clap::{Parser, Subcommand};
use std::io::Write as _;

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

/// Writes to standard output. A reader that went away (`admin status | head -1`) ends the output
/// quietly instead of failing: what it wanted, it has read.
pub(crate) fn emit(text: &str) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}
