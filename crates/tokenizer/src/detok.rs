//! Incremental detokenisation: turning a stream of token ids into a stream of text deltas.
//!
//! Byte-level BPE splits one character (an emoji, a CJK ideograph) over several tokens, and some
//! decoders change a token's text depending on its neighbours (SentencePiece's leading-space
//! rule). Decoding each token alone would therefore emit broken characters and wrong spaces.
//!
//! [`StreamDecoder`] keeps a small window of ids, as Hugging Face's `DecodeStream` and mlx-lm's
//! detokenizers do: `ids[..read]` is context whose text (`prefix`) was already emitted,
//! `ids[read..]` is pending. After each token it decodes the window; if the text does not end in
//! U+FFFD (the decoders' mark for an incomplete UTF-8 sequence) it emits the text beyond `prefix`
//! and slides the window so that the newly emitted tokens become the context.
//!
//! SentencePiece byte fallback (`<0xE6>` tokens) decodes a run of byte tokens as a whole: if the
//! run is not valid UTF-8, every byte of it becomes U+FFFD, so a later byte can change the text of
//! earlier ones. With such a decoder, text is held while the last token is a byte token, until
//! the run is closed by a token that is not one. The window holds the
//! tokens of the last one or two emissions (never more than `2 * MAX_PENDING_TOKENS + 1` ids), so
//! each step costs O(window), not O(sequence).

use std::sync::Arc;

use crate::error::TokenizerError;

/// How many tokens may wait for a character to complete before their text is emitted anyway.
/// A UTF-8 character is at most four bytes, so only a long run of tokens that are not valid UTF-8
/// (or of byte-fallback tokens, or of special tokens skipped in the output) reaches this; it
/// bounds the window.
pub const MAX_PENDING_TOKENS: usize = 32;

const REPLACEMENT: char = '\u{FFFD}';

/// Streams text deltas for token ids; made by [`Tokenizer::stream_decoder`](crate::Tokenizer::stream_decoder).
///
/// The concatenation of every delta from [`push`](Self::push) and the text from
/// [`finish`](Self::finish) equals [`Tokenizer::decode`](crate::Tokenizer::decode) of all ids,
/// for decoders whose output for a sequence is the output of its parts joined at character
/// boundaries (byte-level BPE, byte-fallback SentencePiece), unless more than
/// [`MAX_PENDING_TOKENS`] tokens in a row leave an incomplete character.
#[derive(Clone)]
pub struct StreamDecoder {
    tokenizer: Arc<tokenizers::Tokenizer>,
    skip_special_tokens: bool,
    /// The window: context ids, then pending ids.
    ids: Vec<u32>,
    /// Index in `ids` of the first pending id.
    read: usize,
    /// Decoded text of `ids[..read]`.
    prefix: String,
    /// Whether the decoder joins runs of byte-fallback tokens.
    byte_fallback: bool,
    /// Whether the last token that shows in the output is a byte-fallback token.
    open_byte_run: bool,
}

impl std::fmt::Debug for StreamDecoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamDecoder")
            .field("skip_special_tokens", &self.skip_special_tokens)
            .field("ids", &self.ids)
            .field("read", &self.read)
            .field("prefix", &self.prefix)
            .field("byte_fallback", &self.byte_fallback)
            .field("open_byte_run", &self.open_byte_run)
            .finish()
    }
}

impl StreamDecoder {
    pub(crate) fn new(tokenizer: Arc<tokenizers::Tokenizer>, skip_special_tokens: bool) -> Self {
        let byte_fallback = tokenizer.get_decoder().is_some_and(uses_byte_fallback);
        StreamDecoder {
            tokenizer,
            skip_special_tokens,
            ids: Vec::new(),
            read: 0,
            prefix: String::new(),
            byte_fallback,
            open_byte_run: false,
        }
    }

    /// Adds one token; returns the text that is now final, or `None` while a character is still
    /// incomplete (or the token adds no text).
    /// An id outside the vocabulary is an error, as in [`Tokenizer::decode`](crate::Tokenizer::decode).
    pub fn push(&mut self, id: u32) -> Result<Option<String>, TokenizerError> {
        let Some(token) = self.tokenizer.id_to_token(id) else {
            let size = self.tokenizer.get_vocab_size(true);
            return Err(TokenizerError::Decode(format!("token id {id} is outside the vocabulary (size {size})")));
        };
        let skipped = self.skip_special_tokens && self.tokenizer.get_added_vocabulary().is_special_token(&token);
        if !skipped {
            self.open_byte_run = self.byte_fallback && is_byte_token(&token);
        }
        self.ids.push(id);
        let forced = self.ids.len() - self.read > MAX_PENDING_TOKENS;
        if self.open_byte_run && !forced {
            return Ok(None);
        }
        let text = self.decode(&self.ids)?;
        if !forced && (text.ends_with(REPLACEMENT) || text.len() <= self.prefix.len()) {
            return Ok(None);
        }
        let delta = suffix_beyond(&text, &self.prefix).to_owned();
        // The emitted tokens become the context for the next step.
        self.ids.drain(..self.read);
        self.read = self.ids.len();
        self.prefix = self.decode(&self.ids)?;
        Ok((!delta.is_empty()).then_some(delta))
    }

    /// Returns the text still held back (an incomplete character at the very end decodes to
    /// U+FFFD, as in [`Tokenizer::decode`](crate::Tokenizer::decode)) and resets the decoder.
    pub fn finish(&mut self) -> Result<String, TokenizerError> {
        let text = self.decode(&self.ids)?;
        let rest = suffix_beyond(&text, &self.prefix).to_owned();
        self.ids.clear();
        self.read = 0;
        self.prefix.clear();
        self.open_byte_run = false;
        Ok(rest)
    }

    fn decode(&self, ids: &[u32]) -> Result<String, TokenizerError> {
        self.tokenizer.decode(ids, self.skip_special_tokens).map_err(|e| TokenizerError::Decode(e.to_string()))
    }
}

/// Whether a decoder (or one in a sequence of decoders) is SentencePiece byte fallback.
fn uses_byte_fallback(decoder: &tokenizers::DecoderWrapper) -> bool {
    match decoder {
        tokenizers::DecoderWrapper::ByteFallback(_) => true,
        tokenizers::DecoderWrapper::Sequence(seq) => seq.get_decoders().iter().any(uses_byte_fallback),
        _ => false,
    }
}

/// A byte-fallback token: `<0xNN>`, as the byte-fallback decoder recognises it.
fn is_byte_token(token: &str) -> bool {
    token.len() == 6
        && token.starts_with("<0x")
        && token.ends_with('>')
        && token.as_bytes()[3..5].iter().all(u8::is_ascii_hexdigit)
}

/// The part of `text` after `prefix`. If a decoder rewrote the context (so `text` does not start
/// with `prefix`), the part after their longest common prefix, cut at a character boundary.
fn suffix_beyond<'a>(text: &'a str, prefix: &str) -> &'a str {
    if let Some(rest) = text.strip_prefix(prefix) {
        return rest;
    }
    let common = text
        .char_indices()
        .zip(prefix.chars())
        .find(|((_, a), b)| a != b)
        .map_or_else(|| text.len().min(prefix.len()), |((i, _), _)| i);
    &text[common..]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Tokenizer;
    use crate::test_support::{Lcg, ModelDir};

    fn tokenizer() -> (ModelDir, Tokenizer) {
        let dir = ModelDir::chatml();
        let tok = Tokenizer::from_dir(dir.path()).unwrap();
        (dir, tok)
    }

    /// Streams `ids`; returns the deltas and the text from `finish`.
    fn stream(tok: &Tokenizer, ids: &[u32], skip: bool) -> (Vec<String>, String) {
        let mut dec = tok.stream_decoder(skip);
        let mut deltas = Vec::new();
        for &id in ids {
            if let Some(d) = dec.push(id).unwrap() {
                assert!(!d.is_empty());
                deltas.push(d);
            }
            assert!(dec.ids.len() <= 2 * MAX_PENDING_TOKENS + 1, "window grew to {}", dec.ids.len());
        }
        let rest = dec.finish().unwrap();
        (deltas, rest)
    }

    #[test]
    fn splits_only_at_whole_characters() {
        let (_dir, tok) = tokenizer();
        let text = "café naïve — 東京 🙂🙂 👍🏽 🚀🚀🚀 «東京タワー» Ελληνικά";
        let ids = tok.encode(text, false).unwrap();
        // The tokenizer really does split characters over tokens.
        let lone = ids.iter().filter(|&&id| tok.decode(&[id], false).unwrap().contains(REPLACEMENT));
        assert!(lone.count() > 0);
        let (deltas, rest) = stream(&tok, &ids, false);
        for d in &deltas {
            assert!(!d.contains(REPLACEMENT), "delta {d:?}");
        }
        assert_eq!(rest, "");
        assert_eq!(deltas.concat(), text);
    }

    #[test]
    fn concatenation_equals_decode_for_random_ids() {
        let (_dir, tok) = tokenizer();
        let vocab = tok.vocab_size() as u64;
        let mut rng = Lcg(0x5eed);
        for case in 0..400 {
            let len = 1 + rng.below(60) as usize;
            let ids: Vec<u32> = (0..len).map(|_| rng.below(vocab) as u32).collect();
            for skip in [false, true] {
                let (deltas, rest) = stream(&tok, &ids, skip);
                let streamed = deltas.concat() + &rest;
                assert_eq!(streamed, tok.decode(&ids, skip).unwrap(), "case {case} skip {skip} ids {ids:?}");
            }
        }
    }

    #[test]
    fn concatenation_equals_decode_for_random_text_ids() {
        // Ids of real text, cut at random points: streams that end mid-character.
        let (_dir, tok) = tokenizer();
        let text = "東京 🙂🙂 café — naïve 🚀 ñ 한국어 👍🏽 «x»";
        let all = tok.encode(text, false).unwrap();
        let mut rng = Lcg(7);
        for _ in 0..200 {
            let a = rng.below(all.len() as u64) as usize;
            let b = a + rng.below((all.len() - a) as u64 + 1) as usize;
            let ids = &all[a..b];
            let (deltas, rest) = stream(&tok, ids, false);
            assert_eq!(deltas.concat() + &rest, tok.decode(ids, false).unwrap());
        }
    }

    #[test]
    fn long_streams_keep_a_small_window() {
        let (_dir, tok) = tokenizer();
        let text = "東京 🙂 café. ".repeat(200);
        let ids = tok.encode(&text, false).unwrap();
        let mut dec = tok.stream_decoder(false);
        let mut out = String::new();
        let mut widest = 0;
        for &id in &ids {
            out.push_str(&dec.push(id).unwrap().unwrap_or_default());
            widest = widest.max(dec.ids.len());
        }
        out.push_str(&dec.finish().unwrap());
        assert_eq!(out, text);
        assert!(widest <= 8, "window reached {widest} ids");
    }

    #[test]
    fn skipped_special_tokens_emit_nothing() {
        let (_dir, tok) = tokenizer();
        let im_end = tok.token_to_id("<|im_end|>").unwrap();
        let mut ids = tok.encode("ab", false).unwrap();
        ids.push(im_end);
        ids.extend(tok.encode(" cd", false).unwrap());
        let (deltas, rest) = stream(&tok, &ids, true);
        assert_eq!(deltas.concat() + &rest, "ab cd");
        let (deltas, rest) = stream(&tok, &ids, false);
        assert!(deltas.contains(&"<|im_end|>".to_string()), "{deltas:?}");
        assert_eq!(deltas.concat() + &rest, "ab<|im_end|> cd");
    }

    #[test]
    fn finish_flushes_an_incomplete_character_and_resets() {
        let (_dir, tok) = tokenizer();
        let ids = tok.encode("x🙂", false).unwrap();
        let mut dec = tok.stream_decoder(false);
        let mut out = String::new();
        for &id in &ids[..ids.len() - 1] {
            out.push_str(&dec.push(id).unwrap().unwrap_or_default());
        }
        out.push_str(&dec.finish().unwrap());
        assert_eq!(out, tok.decode(&ids[..ids.len() - 1], false).unwrap());
        // After finish the decoder starts afresh.
        let again: String = ids.iter().filter_map(|&id| dec.push(id).unwrap()).collect();
        assert_eq!(again + &dec.finish().unwrap(), "x🙂");
    }

    #[test]
    fn a_long_run_of_invalid_bytes_is_emitted_at_the_pending_limit() {
        let (_dir, tok) = tokenizer();
        // "Ģ" is the byte-level alphabet's character for byte 0x80, a lone continuation byte.
        let cont = tok.token_to_id("\u{0122}").unwrap();
        let mut ids = vec![cont; MAX_PENDING_TOKENS + 10];
        ids.extend(tok.encode("ok 東京", false).unwrap());
        let mut dec = tok.stream_decoder(false);
        let mut deltas = Vec::new();
        for &id in &ids {
            deltas.extend(dec.push(id).unwrap());
            assert!(dec.ids.len() <= 2 * MAX_PENDING_TOKENS + 1);
        }
        let first = &deltas[0];
        assert_eq!(first.chars().count(), MAX_PENDING_TOKENS + 1);
        assert!(first.chars().all(|c| c == REPLACEMENT));
        assert_eq!(deltas.concat() + &dec.finish().unwrap(), tok.decode(&ids, false).unwrap());
    }

    #[test]
    fn sentencepiece_spaces_and_byte_fallback() {
        let dir = ModelDir::empty();
        dir.write("tokenizer.json", &crate::test_support::sentencepiece_tokenizer_json());
        let tok = Tokenizer::from_dir(dir.path()).unwrap();
        let text = "ab a  東京 é🙂 c";
        let ids = tok.encode(text, false).unwrap();
        assert_eq!(tok.decode(&ids, false).unwrap(), text);
        let (deltas, rest) = stream(&tok, &ids, false);
        assert!(deltas.iter().all(|d| !d.contains(REPLACEMENT)), "{deltas:?}");
        assert_eq!(deltas.concat() + &rest, text);

        let vocab = tok.vocab_size() as u64;
        let mut rng = Lcg(42);
        for case in 0..400 {
            let len = 1 + rng.below(40) as usize;
            // Mostly multi-byte lead/continuation bytes and pieces, some specials.
            let ids: Vec<u32> = (0..len)
                .map(|_| match rng.below(3) {
                    0 => 3 + 0x80 + rng.below(0x80) as u32,
                    _ => rng.below(vocab) as u32,
                })
                .collect();
            for skip in [false, true] {
                let (deltas, rest) = stream(&tok, &ids, skip);
                let expected = tok.decode(&ids, skip).unwrap();
                assert_eq!(deltas.concat() + &rest, expected, "case {case} skip {skip} ids {ids:?}");
            }
        }
    }

    #[test]
    fn suffix_beyond_handles_rewritten_prefix() {
        assert_eq!(suffix_beyond("hello world", "hello"), " world");
        assert_eq!(suffix_beyond("héllo", "hé"), "llo");
        assert_eq!(suffix_beyond("hällo", "hé"), "ällo");
        assert_eq!(suffix_beyond("ab", "abc"), "");
    }
}
