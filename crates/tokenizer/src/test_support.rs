//! Test helpers: a small byte-level BPE tokenizer trained in-process, and model directories
//! written to a temporary folder.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
use tokenizers::normalizers::NormalizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, TokenizerBuilder};

/// Special tokens of the test tokenizer, in id order after the byte alphabet.
pub(crate) const SPECIALS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

/// A ChatML template like Qwen's, without the tool and reasoning branches.
pub(crate) const CHATML: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

const CORPUS: &[&str] = &[
    "The quick brown fox jumps over the lazy dog. A café serves naïve crème brûlée.",
    "東京は日本の首都です。東京タワーと富士山。京都も有名です。",
    "Emoji: 🙂🙂 😀 🚀🚀🚀 👍🏽 — and dashes – too… «quotes» ‘single’",
    "Ελληνικά κείμενα, русский текст, العربية, हिन्दी, 한국어 텍스트",
    "fn main() { println!(\"hello, world\"); } // code\n\tindented\r\n",
    "numbers 0123456789 and symbols !@#$%^&*()_+-=[]{}|;':,./<>?",
];

/// The test tokenizer's `tokenizer.json`, trained once per test process.
pub(crate) fn tokenizer_json() -> &'static str {
    static JSON: OnceLock<String> = OnceLock::new();
    JSON.get_or_init(|| {
        let mut trainer = BpeTrainerBuilder::new()
            .vocab_size(700)
            .min_frequency(1)
            .show_progress(false)
            .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
            .special_tokens(SPECIALS.iter().map(|s| AddedToken::from(*s, true)).collect())
            .build();
        let mut tok = TokenizerBuilder::<BPE, NormalizerWrapper, ByteLevel, ByteLevel, ByteLevel>::new()
            .with_model(BPE::default())
            .with_normalizer(None)
            .with_pre_tokenizer(Some(ByteLevel::default().add_prefix_space(false)))
            .with_post_processor(Some(ByteLevel::default()))
            .with_decoder(Some(ByteLevel::default()))
            .build()
            .expect("build tokenizer");
        let corpus = CORPUS.iter().cycle().take(CORPUS.len() * 20);
        tok.train(&mut trainer, corpus).expect("train tokenizer");
        tok.to_string(false).expect("serialise tokenizer")
    })
}

/// A SentencePiece-style `tokenizer.json` like Llama 2's: `▁` for spaces, byte fallback for
/// characters outside the vocabulary, a decoder that strips the leading space, and a
/// post-processor that adds `<s>`.
pub(crate) fn sentencepiece_tokenizer_json() -> String {
    let mut vocab = serde_json::Map::new();
    for (i, t) in ["<unk>", "<s>", "</s>"].iter().enumerate() {
        vocab.insert(t.to_string(), i.into());
    }
    for b in 0..=255u32 {
        vocab.insert(format!("<0x{b:02X}>"), (3 + b).into());
    }
    let pieces = ["\u{2581}", "a", "b", "c", "é", "東", "\u{2581}a", "ab", "\u{2581}ab", "\u{2581}\u{2581}"];
    for (i, t) in pieces.iter().enumerate() {
        vocab.insert(t.to_string(), (259 + i).into());
    }
    let special = |id: u32, content: &str| {
        serde_json::json!({"id": id, "content": content, "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": true})
    };
    serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [special(0, "<unk>"), special(1, "<s>"), special(2, "</s>")],
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "\u{2581}"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"},
        ]},
        "pre_tokenizer": null,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}},
        },
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0},
        ]},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": "<unk>", "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
            "vocab": vocab,
            "merges": ["\u{2581} a", "a b", "\u{2581}a b", "\u{2581} \u{2581}"],
        },
    })
    .to_string()
}

/// A model directory in a fresh temporary folder, removed on drop.
pub(crate) struct ModelDir {
    pub path: PathBuf,
}

impl ModelDir {
    /// An empty directory.
    pub(crate) fn empty() -> Self {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("mlx-serving-tok-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("create temp dir");
        ModelDir { path }
    }

    /// The test tokenizer with a ChatML template, `<|im_end|>` as EOS in tokenizer_config.json
    /// and `<|endoftext|>` (id 0) as `eos_token_id` in config.json.
    pub(crate) fn chatml() -> Self {
        let dir = Self::empty();
        dir.write("tokenizer.json", tokenizer_json());
        let config = serde_json::json!({
            "chat_template": CHATML,
            "eos_token": {"content": "<|im_end|>", "special": true},
            "bos_token": null,
            "add_bos_token": false,
        });
        dir.write("tokenizer_config.json", &config.to_string());
        dir.write("config.json", r#"{"model_type": "qwen3", "eos_token_id": 0}"#);
        dir
    }

    pub(crate) fn write(&self, name: &str, contents: &str) {
        std::fs::write(self.path.join(name), contents).expect("write test file");
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ModelDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// A tiny deterministic pseudo-random generator (64-bit LCG, high bits out).
pub(crate) struct Lcg(pub u64);

impl Lcg {
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 33) % n
    }
}
