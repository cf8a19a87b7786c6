//! `mlx-serving generate`: one prompt through the engine in this process.
use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use mlx_serving_engine::{ChatMessage, GenerateParams, Model, SamplingParams};

#[derive(Clone, Copy, ValueEnum)]
enum DeviceArg {
    /// The GPU where MLX has one (Metal, CUDA), else the CPU.
    Auto,
    Gpu,
    Cpu,
}

#[derive(Args)]
pub struct GenerateArgs {
    /// Model directory in the mlx-community layout.
    #[arg(long, env = "MLX_SERVING_MODEL")]
    model: PathBuf,
    /// The prompt text.
    #[arg(long)]
    prompt: String,
    /// Send the prompt as a user message through the model's chat template.
    #[arg(long)]
    chat: bool,
    /// Optional system message (with --chat).
    #[arg(long, requires = "chat")]
    system: Option<String>,
    #[arg(long, default_value_t = 100)]
    max_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temp: f32,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    #[arg(long, default_value_t = 0)]
    top_k: i32,
    #[arg(long, default_value_t = 0.0)]
    min_p: f32,
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f32,
    #[arg(long)]
    seed: Option<u64>,
    /// Stop before this string (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// Keep generating past end-of-sequence tokens.
    #[arg(long)]
    ignore_eos: bool,
    #[arg(long, value_enum, default_value_t = DeviceArg::Auto)]
    device: DeviceArg,
    /// Print the token ids instead of the text.
    #[arg(long)]
    print_ids: bool,
}

fn select_device(d: DeviceArg) -> Result<mlx::Device> {
    let device = match d {
        DeviceArg::Auto if mlx::gpu_available() => mlx::Device::Gpu,
        DeviceArg::Auto | DeviceArg::Cpu => mlx::Device::Cpu,
        DeviceArg::Gpu => mlx::Device::Gpu,
    };
    mlx::set_default_device(device)?;
    Ok(device)
}

pub fn run(a: GenerateArgs) -> Result<()> {
    let device = select_device(a.device)?;
    let model = Model::load(&a.model).with_context(|| format!("loading {}", a.model.display()))?;
    let prompt = if a.chat {
        let mut messages = Vec::new();
        if let Some(s) = a.system {
            messages.push(ChatMessage { role: "system".into(), content: s });
        }
        messages.push(ChatMessage { role: "user".into(), content: a.prompt });
        model.encode_chat(&messages)?
    } else {
        model.tokenizer.encode(&a.prompt, false)?
    };
    let params = GenerateParams {
        max_tokens: a.max_tokens,
        sampling: SamplingParams {
            temperature: a.temp,
            top_p: a.top_p,
            top_k: a.top_k,
            min_p: a.min_p,
            repetition_penalty: a.repetition_penalty,
            seed: a.seed,
            ..SamplingParams::default()
        },
        stop: a.stop,
        ignore_eos: a.ignore_eos,
        ..GenerateParams::default()
    };
    let mut stdout = std::io::stdout().lock();
    let print_ids = a.print_ids;
    let done = model.generate(&prompt, &params, |t| {
        let r = if print_ids { write!(stdout, "{} ", t.id) } else { write!(stdout, "{}", t.text) };
        r.and_then(|()| stdout.flush()).is_ok()
    })?;
    if !print_ids {
        write!(stdout, "{}", done.tail)?;
    }
    writeln!(stdout)?;
    eprintln!("==========");
    eprintln!(
        "device: {device}, mlx {}; prompt: {} tokens, time to first token {:.3} s; generation: {} tokens, {:.1} tokens/s; finish: {}",
        mlx::version(),
        done.prompt_tokens,
        done.time_to_first_token,
        done.tokens.len(),
        done.decode_tokens_per_second(),
        done.finish_reason.as_str(),
    );
    Ok(())
}
