//! `mlx-serving config`: check a configuration and print the effective one, or print the
//! JSON Schema of the file for editors.
use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Subcommand};
use mlx_serving_supervisor::Config;

use crate::serve::Overrides;

#[derive(Args)]
pub struct ConfigArgs {
    #[command(subcommand)]
    command: ConfigCommand,
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Validate a configuration and print the effective one (the file, then `MLX_SERVING_*`
    /// variables, then flags), with secrets hidden. Exits 1 naming the problem.
    Check {
        /// The file; `--config` or `MLX_SERVING_CONFIG` otherwise, the defaults without any.
        file: Option<PathBuf>,
        #[command(flatten)]
        overrides: Overrides,
    },
    /// Print the JSON Schema of the configuration file.
    Schema,
}

pub fn run(args: ConfigArgs) -> Result<()> {
    match args.command {
        ConfigCommand::Check { file, mut overrides } => {
            if file.is_some() {
                overrides.config = file;
            }
            let mut config = overrides.load()?;
            redact(&mut config);
            crate::emit(&toml::to_string(&config)?)?;
            match &overrides.config {
                Some(path) => eprintln!("{}: valid", path.display()),
                None => eprintln!("no file: the defaults are valid"),
            }
        }
        ConfigCommand::Schema => {
            crate::emit(&format!("{}\n", serde_json::to_string_pretty(&schemars::schema_for!(Config))?))?;
        }
    }
    Ok(())
}

/// Hides the admin token and the API keys.
fn redact(config: &mut Config) {
    if config.admin.token.is_some() {
        config.admin.token = Some("<hidden>".into());
    }
    for key in &mut config.http.api_keys {
        *key = "<hidden>".into();
    }
}
