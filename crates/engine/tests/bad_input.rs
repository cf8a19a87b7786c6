//! Bad models and bad requests get errors that name the problem; nothing panics or aborts.
mod common;

use common::Scratch;
use mlx_serving_engine::{EngineError, GenerateParams, Model, SamplingParams};

fn load_err(dir: &std::path::Path) -> String {
    match Model::load(dir) {
        Ok(_) => panic!("{} loaded but should not", dir.display()),
        Err(e) => e.to_string(),
    }
}

fn edit_config(dir: &std::path::Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("config.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(path, serde_json::to_string(&v).unwrap()).unwrap();
}

#[test]
fn missing_directory() {
    let err = load_err(std::path::Path::new("/nonexistent/model"));
    assert!(err.contains("/nonexistent/model") && err.contains("does not exist"), "{err}");
}

#[test]
fn unknown_model_type() {
    let s = Scratch::copy_of("qwen3-bf16", "arch");
    edit_config(s.path(), |v| v["model_type"] = "mamba9".into());
    let err = load_err(s.path());
    assert!(err.contains("mamba9") && err.contains("qwen3"), "{err}");
}

#[test]
fn config_that_does_not_parse() {
    let s = Scratch::copy_of("qwen3-bf16", "cfg");
    std::fs::write(s.path().join("config.json"), "{\"model_type\": ").unwrap();
    let err = load_err(s.path());
    assert!(err.contains("config.json"), "{err}");
}

#[test]
fn truncated_safetensors() {
    let s = Scratch::copy_of("qwen3-bf16", "trunc");
    let path = s.path().join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let err = load_err(s.path());
    assert!(err.contains("model.safetensors"), "{err}");
}

#[test]
fn shape_mismatch_names_the_tensor() {
    let s = Scratch::copy_of("llama-bf16", "shape");
    edit_config(s.path(), |v| {
        let n = v["intermediate_size"].as_i64().unwrap();
        v["intermediate_size"] = (n * 2).into();
    });
    let err = load_err(s.path());
    assert!(err.contains("mlp") && err.contains("shape"), "{err}");
}

#[test]
fn tokenizer_that_does_not_parse() {
    let s = Scratch::copy_of("qwen3-bf16", "tok");
    std::fs::write(s.path().join("tokenizer.json"), "{ not json").unwrap();
    let err = load_err(s.path());
    assert!(err.contains("tokenizer.json"), "{err}");
}

#[test]
fn bad_requests() {
    let model = Model::load(&common::model_dir("qwen3-bf16")).unwrap();
    let ctx = model.context_length();
    let run = |prompt: &[u32], params: GenerateParams| -> String {
        match model.generate(prompt, &params, |_| true) {
            Ok(_) => panic!("request should be refused"),
            Err(e @ EngineError::InvalidRequest(_)) => e.to_string(),
            Err(e) => panic!("wrong error kind: {e}"),
        }
    };
    let long = vec![1u32; ctx + 5];
    let err = run(&long, GenerateParams::default());
    assert!(err.contains("context") && err.contains(&ctx.to_string()), "{err}");

    let err = run(&[1, 2, 3], GenerateParams { max_tokens: ctx, ..Default::default() });
    assert!(err.contains("max_tokens") && err.contains("context"), "{err}");

    let err = run(&[1, 2, 3], GenerateParams { max_tokens: 0, ..Default::default() });
    assert!(err.contains("max_tokens"), "{err}");

    let nan = SamplingParams { temperature: f32::NAN, ..Default::default() };
    let err = run(&[1, 2, 3], GenerateParams { sampling: nan, ..Default::default() });
    assert!(err.contains("temperature"), "{err}");

    let err = run(&[], GenerateParams::default());
    assert!(err.contains("empty"), "{err}");

    let vocab = model.transformer.config.vocab_size as u32;
    let err = run(&[vocab + 10], GenerateParams::default());
    assert!(err.contains("vocabulary"), "{err}");

    // The model still works after all of that.
    let ok =
        model.generate(&[1, 2, 3], &GenerateParams { max_tokens: 3, ignore_eos: true, ..Default::default() }, |_| true);
    assert_eq!(ok.unwrap().tokens.len(), 3);
}
