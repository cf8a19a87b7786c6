//! Error types of this crate: one for loading and using a tokenizer, one for stop-string validation.

use std::path::PathBuf;

/// Errors from loading a model's tokenizer files, encoding, decoding and chat-template rendering.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// The model directory does not exist or is not a directory.
    #[error("model directory {path} does not exist or is not a directory")]
    NotADirectory {
        /// The path that was given.
        path: PathBuf,
    },

    /// A file could not be read (missing, unreadable).
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },

    /// A JSON file does not parse.
    #[error("{path} is not valid JSON: {source}")]
    Json {
        /// The file.
        path: PathBuf,
        /// The parser's error.
        source: serde_json::Error,
    },

    /// `tokenizer.json` parses as JSON but the `tokenizers` library rejects it.
    #[error("cannot load tokenizer from {path}: {message}")]
    TokenizerFile {
        /// The file.
        path: PathBuf,
        /// The `tokenizers` library's error text.
        message: String,
    },

    /// A field of a JSON file has an unexpected type or value.
    #[error("{path}: field `{field}` {problem}")]
    InvalidField {
        /// The file.
        path: PathBuf,
        /// The field name.
        field: &'static str,
        /// What is wrong with it.
        problem: String,
    },

    /// Encoding text failed.
    #[error("encoding failed: {0}")]
    Encode(String),

    /// Decoding token ids failed (for example an id outside the vocabulary).
    #[error("decoding failed: {0}")]
    Decode(String),

    /// The model has no chat template.
    #[error(
        "this model has no chat template (looked for chat_template.jinja and `chat_template` in \
         tokenizer_config.json)"
    )]
    NoChatTemplate,

    /// The chat template does not compile.
    #[error("chat template from {path} does not compile: {source}")]
    ChatTemplateSyntax {
        /// Where the template came from.
        path: PathBuf,
        /// The template engine's error, with the line.
        source: minijinja::Error,
    },

    /// Rendering the chat template failed, including a template calling `raise_exception`.
    #[error("chat template rendering failed: {source}")]
    ChatTemplateRender {
        /// The template engine's error, with the message and line.
        source: minijinja::Error,
    },
}

/// Errors from validating stop strings (a client error: the request is invalid).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StopStringError {
    /// A stop string is empty.
    #[error("stop string {index} is empty")]
    Empty {
        /// Position in the list.
        index: usize,
    },

    /// Too many stop strings.
    #[error("{count} stop strings given, at most {max} are allowed")]
    TooMany {
        /// How many were given.
        count: usize,
        /// The limit.
        max: usize,
    },

    /// A stop string is too long.
    #[error("stop string {index} is {len} bytes long, at most {max} are allowed")]
    TooLong {
        /// Position in the list.
        index: usize,
        /// Its length in bytes.
        len: usize,
        /// The limit in bytes.
        max: usize,
    },
}
