//! [`Tokenizer`]: a model's tokenizer, end-of-sequence ids and chat template, loaded from its
//! directory.

use std::path::Path;
use std::sync::Arc;

use crate::chat::{ChatMessage, ChatTemplate, TemplateTokens};
use crate::config::{self, TokenizerConfig};
use crate::detok::StreamDecoder;
use crate::error::TokenizerError;

type Result<T> = std::result::Result<T, TokenizerError>;

/// A model's tokenizer. Cheap to clone (the vocabulary is shared), `Send` and `Sync`.
#[derive(Clone)]
pub struct Tokenizer {
    inner: Arc<tokenizers::Tokenizer>,
    eos_token_ids: Vec<u32>,
    bos_token_id: Option<u32>,
    add_bos_token: Option<bool>,
    chat_template: Option<ChatTemplate>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("eos_token_ids", &self.eos_token_ids)
            .field("bos_token_id", &self.bos_token_id)
            .field("add_bos_token", &self.add_bos_token)
            .field("has_chat_template", &self.chat_template.is_some())
            .finish()
    }
}

impl Tokenizer {
    /// Loads a tokenizer from a model directory in the Hugging Face layout:
    /// - `tokenizer.json` (required);
    /// - `tokenizer_config.json` (optional): `chat_template`, `bos_token`, `eos_token`,
    ///   `pad_token`, `unk_token`, `add_bos_token`;
    /// - `chat_template.jinja` (optional; replaces the config's `chat_template`);
    /// - `config.json` and `generation_config.json` (optional): `eos_token_id`.
    ///
    /// The end-of-sequence ids are the union of `eos_token_id` in both model configs and the id
    /// of `eos_token`. Every error names the file and, where it applies, the field.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(TokenizerError::NotADirectory { path: dir.to_owned() });
        }
        let inner = load_tokenizer_json(&dir.join("tokenizer.json"))?;
        let config = TokenizerConfig::read(dir)?;
        let config_path = dir.join("tokenizer_config.json");

        let token_id = |field: &'static str, token: &Option<String>| -> Result<Option<u32>> {
            let Some(token) = token else { return Ok(None) };
            match inner.token_to_id(token) {
                Some(id) => Ok(Some(id)),
                None => Err(TokenizerError::InvalidField {
                    path: config_path.clone(),
                    field,
                    problem: format!("names {token:?}, which is not in tokenizer.json's vocabulary"),
                }),
            }
        };
        let bos_token_id = token_id("bos_token", &config.bos_token)?;
        let eos_from_config = token_id("eos_token", &config.eos_token)?;

        let mut eos_token_ids = Vec::new();
        for id in config::eos_token_ids_from_model_configs(dir)?.into_iter().chain(eos_from_config) {
            if !eos_token_ids.contains(&id) {
                eos_token_ids.push(id);
            }
        }

        let tokens = TemplateTokens {
            bos_token: config.bos_token,
            eos_token: config.eos_token,
            pad_token: config.pad_token,
            unk_token: config.unk_token,
        };
        let chat_template = match config.chat_template {
            Some((source, origin)) => Some(ChatTemplate::compile(source, &origin, tokens)?),
            None => None,
        };

        Ok(Tokenizer {
            inner: Arc::new(inner),
            eos_token_ids,
            bos_token_id,
            add_bos_token: config.add_bos_token,
            chat_template,
        })
    }

    /// Encodes text to token ids. With `add_special_tokens`, the tokenizer's post-processor adds
    /// its special tokens (typically BOS), adjusted by `add_bos_token` from
    /// `tokenizer_config.json` when that is set.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let encoding =
            self.inner.encode(text, add_special_tokens).map_err(|e| TokenizerError::Encode(e.to_string()))?;
        let mut ids = encoding.get_ids().to_vec();
        if add_special_tokens && let Some(bos) = self.bos_token_id {
            let added_by_post_processor =
                ids.first() == Some(&bos) && encoding.get_special_tokens_mask().first() == Some(&1);
            match self.add_bos_token {
                Some(true) if ids.first() != Some(&bos) => ids.insert(0, bos),
                Some(false) if added_by_post_processor => {
                    ids.remove(0);
                }
                _ => {}
            }
        }
        Ok(ids)
    }

    /// Decodes token ids to text. Ids outside the vocabulary are an error.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        if let Some(&bad) = ids.iter().find(|&&id| self.inner.id_to_token(id).is_none()) {
            return Err(TokenizerError::Decode(format!(
                "token id {bad} is outside the vocabulary (size {})",
                self.vocab_size()
            )));
        }
        self.inner.decode(ids, skip_special_tokens).map_err(|e| TokenizerError::Decode(e.to_string()))
    }

    /// A decoder that turns ids, one at a time, into text deltas that never split a character.
    pub fn stream_decoder(&self, skip_special_tokens: bool) -> StreamDecoder {
        StreamDecoder::new(Arc::clone(&self.inner), skip_special_tokens)
    }

    /// Number of tokens, added tokens included. The model's embedding table may be larger.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// End-of-sequence token ids (possibly empty when no file names one).
    pub fn eos_token_ids(&self) -> &[u32] {
        &self.eos_token_ids
    }

    /// The id of the BOS token named in `tokenizer_config.json`, if any.
    pub fn bos_token_id(&self) -> Option<u32> {
        self.bos_token_id
    }

    /// The id of a token (model vocabulary or added token).
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The text of a token as stored in the vocabulary (byte-level tokens in their byte alphabet).
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Whether the model has a chat template.
    pub fn has_chat_template(&self) -> bool {
        self.chat_template.is_some()
    }

    /// Renders a conversation with the model's chat template, as Hugging Face's
    /// `apply_chat_template(..., tokenize=False)` does.
    pub fn apply_chat_template(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        let template = self.chat_template.as_ref().ok_or(TokenizerError::NoChatTemplate)?;
        template.render(messages, add_generation_prompt)
    }

    /// Renders a conversation and encodes it without adding special tokens (the template writes
    /// them), as Hugging Face's `apply_chat_template(..., tokenize=True)` does.
    pub fn encode_chat(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<Vec<u32>> {
        let prompt = self.apply_chat_template(messages, add_generation_prompt)?;
        self.encode(&prompt, false)
    }
}

fn load_tokenizer_json(path: &Path) -> Result<tokenizers::Tokenizer> {
    let bytes = std::fs::read(path).map_err(|source| TokenizerError::Read { path: path.to_owned(), source })?;
    tokenizers::Tokenizer::from_bytes(&bytes)
        .map_err(|e| TokenizerError::TokenizerFile { path: path.to_owned(), message: e.to_string() })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{CHATML, ModelDir, SPECIALS};

    const SAMPLE: &str = "café naïve — 東京 🙂 and 🚀🚀";

    fn load(dir: &ModelDir) -> Tokenizer {
        Tokenizer::from_dir(dir.path()).unwrap()
    }

    fn err(dir: &ModelDir) -> String {
        Tokenizer::from_dir(dir.path()).unwrap_err().to_string()
    }

    #[test]
    fn is_send_sync_and_clone() {
        fn check<T: Send + Sync + Clone + 'static>() {}
        check::<Tokenizer>();
        check::<StreamDecoder>();
    }

    #[test]
    fn round_trips_text() {
        let dir = ModelDir::chatml();
        let tok = load(&dir);
        for text in [SAMPLE, "", "plain ascii", "\n\t\r ", "🙂", "東"] {
            let ids = tok.encode(text, true).unwrap();
            assert_eq!(tok.decode(&ids, false).unwrap(), text);
            assert_eq!(tok.decode(&ids, true).unwrap(), text);
        }
        assert!(tok.vocab_size() > 256 + SPECIALS.len());
    }

    #[test]
    fn special_tokens_are_single_ids_and_can_be_skipped() {
        let dir = ModelDir::chatml();
        let tok = load(&dir);
        let im_end = tok.token_to_id("<|im_end|>").unwrap();
        assert_eq!(tok.id_to_token(im_end).as_deref(), Some("<|im_end|>"));
        let ids = tok.encode("hi<|im_end|>", false).unwrap();
        assert_eq!(ids.last(), Some(&im_end));
        assert_eq!(tok.decode(&ids, false).unwrap(), "hi<|im_end|>");
        assert_eq!(tok.decode(&ids, true).unwrap(), "hi");
    }

    #[test]
    fn eos_ids_are_the_union_of_all_files() {
        let dir = ModelDir::chatml();
        let endoftext = load(&dir).token_to_id("<|endoftext|>").unwrap();
        let im_end = load(&dir).token_to_id("<|im_end|>").unwrap();
        assert_eq!(load(&dir).eos_token_ids(), &[endoftext, im_end]);
        dir.write("generation_config.json", &format!(r#"{{"eos_token_id": [{im_end}, 77]}}"#));
        assert_eq!(load(&dir).eos_token_ids(), &[endoftext, im_end, 77]);
    }

    #[test]
    fn add_bos_token_prepends_bos() {
        let dir = ModelDir::chatml();
        let config = serde_json::json!({"bos_token": "<|endoftext|>", "add_bos_token": true});
        dir.write("tokenizer_config.json", &config.to_string());
        let tok = load(&dir);
        let bos = tok.bos_token_id().unwrap();
        let with = tok.encode("hello", true).unwrap();
        let without = tok.encode("hello", false).unwrap();
        assert_eq!(with[0], bos);
        assert_eq!(&with[1..], &without[..]);
        assert_eq!(tok.encode("<|endoftext|>x", true).unwrap().iter().filter(|&&i| i == bos).count(), 1);
    }

    #[test]
    fn add_bos_token_false_removes_the_post_processor_bos() {
        let dir = ModelDir::empty();
        dir.write("tokenizer.json", &crate::test_support::sentencepiece_tokenizer_json());
        let with_bos = |add: Option<bool>| {
            let config = serde_json::json!({"bos_token": "<s>", "add_bos_token": add});
            dir.write("tokenizer_config.json", &config.to_string());
            load(&dir).encode("ab", true).unwrap()
        };
        let plain = load(&dir).encode("ab", false).unwrap();
        assert_eq!(with_bos(None)[1..], plain[..]);
        assert_eq!(with_bos(None)[0], 1);
        assert_eq!(with_bos(Some(true)), with_bos(None));
        assert_eq!(with_bos(Some(false)), plain);
    }

    #[test]
    fn renders_chat_template_and_encodes_it() {
        let dir = ModelDir::chatml();
        let tok = load(&dir);
        let messages = [ChatMessage::new("system", "Be brief."), ChatMessage::new("user", SAMPLE)];
        let prompt = tok.apply_chat_template(&messages, true).unwrap();
        assert_eq!(
            prompt,
            format!(
                "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n{SAMPLE}<|im_end|>\n<|im_start|>assistant\n"
            )
        );
        let ids = tok.encode_chat(&messages, true).unwrap();
        assert_eq!(ids, tok.encode(&prompt, false).unwrap());
        let im_start = tok.token_to_id("<|im_start|>").unwrap();
        assert_eq!(ids.iter().filter(|&&i| i == im_start).count(), 3);
        assert!(!tok.apply_chat_template(&messages, false).unwrap().ends_with("assistant\n"));
    }

    #[test]
    fn chat_template_jinja_file_takes_precedence() {
        let dir = ModelDir::chatml();
        dir.write("chat_template.jinja", "{{ messages | length }} messages\n");
        let tok = load(&dir);
        assert_eq!(tok.apply_chat_template(&[ChatMessage::new("user", "x")], true).unwrap(), "1 messages");
    }

    #[test]
    fn chat_template_list_form_and_object_tokens() {
        let dir = ModelDir::chatml();
        let config = serde_json::json!({
            "chat_template": [
                {"name": "tool_use", "template": "tools"},
                {"name": "default", "template": "{{ eos_token }}|" },
            ],
            "eos_token": {"content": "<|im_end|>"},
        });
        dir.write("tokenizer_config.json", &config.to_string());
        assert_eq!(load(&dir).apply_chat_template(&[], false).unwrap(), "<|im_end|>|");
    }

    #[test]
    fn only_tokenizer_json_is_required() {
        let dir = ModelDir::empty();
        dir.write("tokenizer.json", crate::test_support::tokenizer_json());
        let tok = load(&dir);
        assert!(tok.eos_token_ids().is_empty());
        assert!(!tok.has_chat_template());
        let e = tok.apply_chat_template(&[], true).unwrap_err();
        assert!(matches!(e, TokenizerError::NoChatTemplate), "{e}");
        assert!(e.to_string().contains("no chat template"));
    }

    #[test]
    fn missing_dir_and_missing_tokenizer_json() {
        let dir = ModelDir::empty();
        let missing = dir.path().join("nope");
        let e = Tokenizer::from_dir(&missing).unwrap_err().to_string();
        assert!(e.contains("does not exist") && e.contains("nope"), "{e}");
        let e = err(&dir);
        assert!(e.contains("tokenizer.json") && e.contains("cannot read"), "{e}");
    }

    #[test]
    fn tokenizer_json_that_does_not_parse() {
        let dir = ModelDir::empty();
        dir.write("tokenizer.json", "{ not json");
        let e = err(&dir);
        assert!(e.contains("tokenizer.json") && e.contains("line 1"), "{e}");
        dir.write("tokenizer.json", r#"{"model": {"type": "Nonsense"}}"#);
        let e = err(&dir);
        assert!(e.contains("cannot load tokenizer from") && e.contains("tokenizer.json"), "{e}");
    }

    #[test]
    fn bad_config_files_name_file_and_field() {
        let dir = ModelDir::chatml();
        dir.write("tokenizer_config.json", "[1, 2");
        let e = err(&dir);
        assert!(e.contains("tokenizer_config.json is not valid JSON"), "{e}");

        dir.write("tokenizer_config.json", r#"{"eos_token": "<|nope|>"}"#);
        let e = err(&dir);
        assert!(e.contains("tokenizer_config.json") && e.contains("`eos_token`") && e.contains("<|nope|>"), "{e}");

        dir.write("tokenizer_config.json", r#"{"add_bos_token": "yes"}"#);
        assert!(err(&dir).contains("`add_bos_token`"));

        dir.write("tokenizer_config.json", "{}");
        dir.write("config.json", r#"{"eos_token_id": "two"}"#);
        let e = err(&dir);
        assert!(e.contains("config.json") && e.contains("`eos_token_id`"), "{e}");
        dir.write("config.json", "7");
        assert!(err(&dir).contains("must be a JSON object"));
    }

    #[test]
    fn broken_template_fails_at_load() {
        let dir = ModelDir::chatml();
        let config = serde_json::json!({"chat_template": "{% for m in messages %}{{ m.content }"});
        dir.write("tokenizer_config.json", &config.to_string());
        let e = err(&dir);
        assert!(e.contains("chat template") && e.contains("tokenizer_config.json"), "{e}");
    }

    #[test]
    fn raise_exception_becomes_an_error() {
        let dir = ModelDir::chatml();
        let template = format!(
            "{{% if messages[0]['role'] == 'system' %}}{{{{ raise_exception('System role not supported') }}}}{{% endif %}}{CHATML}"
        );
        dir.write("tokenizer_config.json", &serde_json::json!({"chat_template": template}).to_string());
        let tok = load(&dir);
        let e = tok.apply_chat_template(&[ChatMessage::new("system", "x")], true).unwrap_err();
        assert!(matches!(e, TokenizerError::ChatTemplateRender { .. }));
        assert!(e.to_string().contains("System role not supported"), "{e}");
        assert!(tok.apply_chat_template(&[ChatMessage::new("user", "x")], true).is_ok());
    }

    #[test]
    fn decode_rejects_ids_outside_the_vocabulary() {
        let dir = ModelDir::chatml();
        let tok = load(&dir);
        let e = tok.decode(&[1, 1_000_000], false).unwrap_err().to_string();
        assert!(e.contains("1000000") && e.contains("outside the vocabulary"), "{e}");
        assert!(tok.stream_decoder(false).push(1_000_000).is_err());
    }
}
