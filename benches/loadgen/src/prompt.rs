//! Prompt text: a tag that makes each prompt distinct (at its start, so no two prompts share a
//! cacheable prefix beyond the chat template), then random common words. Lengths are counted in
//! words, or in tokens of a model's tokenizer when one is given.
use std::path::Path;

use anyhow::{Context, Result};
use mlx_serving_tokenizer::Tokenizer;
use rand::Rng;

const WORDS: &[&str] = &[
    "the",
    "of",
    "and",
    "to",
    "in",
    "that",
    "is",
    "for",
    "it",
    "as",
    "with",
    "be",
    "on",
    "not",
    "this",
    "by",
    "are",
    "or",
    "from",
    "at",
    "an",
    "but",
    "all",
    "they",
    "which",
    "one",
    "you",
    "were",
    "have",
    "their",
    "there",
    "been",
    "has",
    "more",
    "when",
    "will",
    "would",
    "who",
    "so",
    "no",
    "what",
    "some",
    "them",
    "into",
    "time",
    "only",
    "new",
    "other",
    "any",
    "then",
    "these",
    "may",
    "work",
    "program",
    "license",
    "free",
    "software",
    "copy",
    "source",
    "code",
    "version",
    "terms",
    "conditions",
    "rights",
    "distribute",
    "modify",
    "public",
    "general",
    "permission",
    "notice",
    "warranty",
    "author",
    "holder",
    "file",
    "library",
    "form",
    "object",
    "patent",
    "law",
    "party",
    "section",
    "part",
    "whole",
    "each",
    "under",
    "must",
    "also",
    "such",
    "without",
    "provided",
    "following",
    "means",
    "use",
    "make",
    "give",
    "receive",
    "recipients",
    "same",
    "freedom",
    "change",
    "protect",
    "users",
    "developers",
    "products",
    "interface",
    "system",
    "network",
    "server",
    "request",
    "answer",
    "model",
    "river",
    "mountain",
    "garden",
    "window",
    "morning",
    "evening",
    "winter",
    "summer",
    "light",
    "water",
    "stone",
    "bread",
    "music",
    "letter",
    "number",
    "table",
    "paper",
    "market",
    "village",
    "harbor",
    "forest",
    "island",
    "machine",
    "engine",
    "question",
    "reason",
    "history",
    "language",
    "teacher",
    "student",
    "doctor",
    "friend",
    "family",
    "country",
    "city",
    "street",
    "house",
    "school",
    "office",
    "company",
    "problem",
    "result",
    "method",
    "course",
    "nature",
    "power",
    "energy",
    "memory",
    "signal",
    "pattern",
    "measure",
    "simple",
    "small",
    "large",
    "early",
    "quiet",
    "bright",
    "careful",
    "common",
    "different",
    "important",
    "possible",
    "strong",
    "written",
    "ancient",
    "write",
    "read",
    "explain",
    "describe",
    "compare",
    "remember",
    "consider",
    "build",
    "carry",
    "follow",
    "begin",
    "finish",
    "open",
    "close",
    "travel",
    "listen",
    "speak",
    "think",
    "believe",
    "understand",
    "allow",
];

/// How prompt lengths are counted.
pub enum Unit {
    Words,
    /// Tokens of this tokenizer (without special tokens).
    Tokens(Box<Tokenizer>),
}

/// Makes prompts of a given length.
pub struct PromptMaker {
    unit: Unit,
}

impl PromptMaker {
    pub fn words() -> PromptMaker {
        PromptMaker { unit: Unit::Words }
    }

    /// Lengths in tokens of the tokenizer in `dir` (a model directory with tokenizer.json).
    pub fn tokens(dir: &Path) -> Result<PromptMaker> {
        let tok = Tokenizer::from_dir(dir).with_context(|| format!("--tokenizer {}", dir.display()))?;
        Ok(PromptMaker { unit: Unit::Tokens(Box::new(tok)) })
    }

    /// What a length counts: "words" or "tokens".
    pub fn unit_name(&self) -> &'static str {
        match self.unit {
            Unit::Words => "words",
            Unit::Tokens(_) => "tokens",
        }
    }

    /// A prompt of about `len` units that starts with `tag`; the tag is never cut, so a length
    /// shorter than the tag gives the tag alone.
    pub fn make(&self, tag: &str, len: u32, rng: &mut impl Rng) -> Result<String> {
        let len = len as usize;
        let mut text = tag.to_string();
        let push_words = |text: &mut String, n: usize, rng: &mut _| {
            for _ in 0..n {
                text.push(' ');
                text.push_str(WORDS[random_index(rng, WORDS.len())]);
            }
        };
        match &self.unit {
            Unit::Words => {
                let tag_words = tag.split_whitespace().count();
                push_words(&mut text, len.saturating_sub(tag_words), rng);
                Ok(text)
            }
            Unit::Tokens(tok) => {
                let encode = |t: &str| tok.encode(t, false).context("encoding a prompt");
                let tag_tokens = encode(tag)?.len();
                if len <= tag_tokens {
                    return Ok(text);
                }
                // Each word is at least one token after the first: `len` words are enough, and
                // the loop only runs again for a tokenizer that merges across spaces.
                push_words(&mut text, len - tag_tokens, rng);
                let mut ids = encode(&text)?;
                while ids.len() < len {
                    push_words(&mut text, len - ids.len(), rng);
                    ids = encode(&text)?;
                }
                tok.decode(&ids[..len], false).context("decoding a prompt")
            }
        }
    }
}

fn random_index(rng: &mut impl Rng, n: usize) -> usize {
    rng.random_range(0..n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::SmallRng;

    fn model() -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models/qwen3-bf16")
    }

    #[test]
    fn word_prompts_start_with_their_tag_and_have_the_asked_length() {
        let m = PromptMaker::words();
        let mut rng = SmallRng::seed_from_u64(1);
        let p = m.make("Request 3 of run 9:", 40, &mut rng).unwrap();
        assert!(p.starts_with("Request 3 of run 9: "), "{p}");
        assert_eq!(p.split_whitespace().count(), 40);
        assert_eq!(m.make("a long tag here", 2, &mut rng).unwrap(), "a long tag here");
        let mut again = SmallRng::seed_from_u64(1);
        assert_eq!(m.make("Request 3 of run 9:", 40, &mut again).unwrap(), p);
    }

    #[test]
    fn token_prompts_have_the_asked_token_count() {
        let m = PromptMaker::tokens(&model()).unwrap();
        let tok = Tokenizer::from_dir(&model()).unwrap();
        let mut rng = SmallRng::seed_from_u64(2);
        for len in [20, 64, 300] {
            let p = m.make("Request 12 of run 4:", len, &mut rng).unwrap();
            assert!(p.starts_with("Request 12 of run 4:"), "{p}");
            let n = tok.encode(&p, false).unwrap().len() as i64;
            // Cutting at a token boundary and encoding again may merge a token or two.
            assert!((n - len as i64).abs() <= 2, "asked {len} tokens, got {n}: {p}");
        }
    }

    #[test]
    fn a_missing_tokenizer_is_named() {
        let e = PromptMaker::tokens(Path::new("/nonexistent/model")).err().unwrap();
        assert!(format!("{e:#}").contains("/nonexistent/model"), "{e:#}");
    }
}
