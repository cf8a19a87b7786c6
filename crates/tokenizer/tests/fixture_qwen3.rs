//! Checks against the tiny Qwen3 fixture model made by the repository's fixture script
//! (`tests/fixtures/models/qwen3-bf16`). Only properties are checked, nothing copied from elsewhere.
//! When the fixture has not been generated, the test says so and passes.

use std::path::PathBuf;

use mlx_serving_tokenizer::{ChatMessage, Tokenizer};

fn fixture_dir() -> Option<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models/qwen3-bf16");
    if dir.join("tokenizer.json").is_file() {
        Some(dir)
    } else {
        eprintln!("skipping: {} has no tokenizer.json (fixture not generated)", dir.display());
        None
    }
}

#[test]
fn qwen3_fixture_round_trips_streams_and_renders() {
    let Some(dir) = fixture_dir() else { return };
    let tok = Tokenizer::from_dir(&dir).unwrap();
    assert!(!tok.eos_token_ids().is_empty());

    let text = "café naïve — 東京 🙂";
    let ids = tok.encode(text, false).unwrap();
    assert_eq!(tok.decode(&ids, false).unwrap(), text);

    let mut dec = tok.stream_decoder(false);
    let mut streamed = String::new();
    for &id in &ids {
        if let Some(delta) = dec.push(id).unwrap() {
            assert!(!delta.contains('\u{FFFD}'), "{delta:?}");
            streamed.push_str(&delta);
        }
    }
    streamed.push_str(&dec.finish().unwrap());
    assert_eq!(streamed, text);

    let messages = [ChatMessage::new("user", text)];
    let prompt = tok.apply_chat_template(&messages, true).unwrap();
    assert!(prompt.contains(text), "{prompt}");
    assert!(prompt.contains("<|im_start|>assistant"), "{prompt}");
    let prompt_ids = tok.encode_chat(&messages, true).unwrap();
    assert_eq!(tok.decode(&prompt_ids, false).unwrap(), prompt);
}
