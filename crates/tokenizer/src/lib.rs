//! Tokenisation for mlx-serving, with no MLX dependency so that both the supervisor (to count
//! prompt tokens and render chat templates) and the workers (to stream text) can use it.
//!
//! - [`Tokenizer`]: loads `tokenizer.json` and the config files of a model directory; encodes,
//!   decodes, knows the end-of-sequence ids, and renders the chat template.
//! - [`StreamDecoder`]: token ids in, text deltas out, never splitting a character.
//! - [`StopMatcher`]: finds stop strings in streamed text, holding back what could start one.

mod chat;
mod config;
mod detok;
mod error;
mod stop;
mod strftime;
#[cfg(test)]
mod test_support;
mod tokenizer;

pub use chat::ChatMessage;
pub use detok::{MAX_PENDING_TOKENS, StreamDecoder};
pub use error::{StopStringError, TokenizerError};
pub use stop::{MAX_STOP_STRING_BYTES, MAX_STOP_STRINGS, StopMatcher, StopOutcome};
pub use tokenizer::Tokenizer;

/// Result with this crate's [`TokenizerError`].
pub type Result<T, E = TokenizerError> = std::result::Result<T, E>;
