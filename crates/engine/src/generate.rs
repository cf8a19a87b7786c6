//! Generating text for one request: prefill in chunks, then a decode loop that builds step n+1
//! while step n computes (as mlx-lm's `generate_step`), with stop conditions and streamed text.
use std::time::Instant;

use mlx::Array;
use mlx_serving_tokenizer::{StopMatcher, StreamDecoder, Tokenizer};

use crate::Model;
use crate::error::{EngineError, Result};
use crate::sample::{Sampled, Sampler, SamplingParams};
use crate::sequence::Sequence;

/// Prompt tokens per prefill chunk by default (mlx-lm's `prefill_step_size`).
pub const DEFAULT_PREFILL_STEP: usize = 2048;

/// Settings of one generation request.
#[derive(Clone, Debug)]
pub struct GenerateParams {
    /// At least 1; prompt plus max_tokens must fit the model's context.
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Generation ends before any of these strings; the string itself is not returned.
    pub stop: Vec<String>,
    /// Generation ends at any of these token ids (besides the model's end-of-sequence ids).
    pub stop_token_ids: Vec<u32>,
    /// Keep going past end-of-sequence tokens.
    pub ignore_eos: bool,
    /// Prompt tokens per prefill chunk.
    pub prefill_step: usize,
}

impl Default for GenerateParams {
    fn default() -> Self {
        GenerateParams {
            max_tokens: 256,
            sampling: SamplingParams::default(),
            stop: Vec::new(),
            stop_token_ids: Vec::new(),
            ignore_eos: false,
            prefill_step: DEFAULT_PREFILL_STEP,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-sequence token, a stop token or a stop string.
    Stop,
    /// `max_tokens` reached.
    Length,
    /// The caller asked to stop.
    Cancelled,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Cancelled => "cancelled",
        }
    }
}

/// What the caller sees as tokens arrive.
#[derive(Debug)]
pub struct TokenEvent<'a> {
    pub id: u32,
    /// Text that became final with this token (may be empty while a multi-byte character or a
    /// possible stop string is incomplete).
    pub text: &'a str,
    /// Log-probability of the token under the model (before temperature and filters).
    pub logprob: f32,
}

#[derive(Debug)]
pub struct Completion {
    /// All the text, `tail` included.
    pub text: String,
    /// Text that became final only at the end and was not passed to the token callback.
    pub tail: String,
    pub tokens: Vec<u32>,
    pub finish_reason: FinishReason,
    pub prompt_tokens: usize,
    /// Seconds from start to the first token (prefill included).
    pub time_to_first_token: f64,
    /// Seconds spent after the first token.
    pub decode_seconds: f64,
}

impl Completion {
    /// Decode speed after the first token.
    pub fn decode_tokens_per_second(&self) -> f64 {
        if self.tokens.len() > 1 && self.decode_seconds > 0.0 {
            (self.tokens.len() - 1) as f64 / self.decode_seconds
        } else {
            0.0
        }
    }
}

/// Turns accepted token ids into final text: incremental UTF-8-safe detokenisation, then stop
/// strings. Reused by every caller that streams text.
pub struct TextStream {
    decoder: StreamDecoder,
    stops: StopMatcher,
    vocab_size: usize,
}

/// What one token did to the text.
pub struct TextStep {
    pub text: String,
    pub stopped: bool,
}

impl TextStream {
    pub fn new(tokenizer: &Tokenizer, stop: &[String]) -> Result<TextStream> {
        Ok(TextStream {
            decoder: tokenizer.stream_decoder(true),
            stops: StopMatcher::new(stop.to_vec())?,
            vocab_size: tokenizer.vocab_size(),
        })
    }

    pub fn push(&mut self, id: u32) -> Result<TextStep> {
        // A model's embedding table may be padded past the tokenizer's vocabulary; such ids have
        // no text (as in transformers' decode).
        if id as usize >= self.vocab_size {
            return Ok(TextStep { text: String::new(), stopped: false });
        }
        match self.decoder.push(id)? {
            Some(delta) => {
                let out = self.stops.push(&delta);
                Ok(TextStep { stopped: out.stopped(), text: out.text })
            }
            None => Ok(TextStep { text: String::new(), stopped: false }),
        }
    }

    /// Text held back at the end (an incomplete character or a partial stop string).
    pub fn finish(&mut self) -> Result<TextStep> {
        let rest = self.decoder.finish()?;
        let mut out = self.stops.push(&rest);
        if !out.stopped() {
            out.text.push_str(&self.stops.flush());
        }
        Ok(TextStep { stopped: out.stopped(), text: out.text })
    }
}

impl Model {
    /// Checks a request against the model before any work: prompt length, max_tokens, sampling.
    pub fn check_request(&self, prompt_tokens: usize, params: &GenerateParams) -> Result<()> {
        let ctx = self.context_length();
        if prompt_tokens == 0 {
            return Err(EngineError::invalid("the prompt is empty"));
        }
        if params.max_tokens == 0 {
            return Err(EngineError::invalid("`max_tokens` must be at least 1"));
        }
        if prompt_tokens >= ctx {
            return Err(EngineError::invalid(format!(
                "the prompt has {prompt_tokens} tokens, which does not fit the model's context of {ctx} tokens"
            )));
        }
        if prompt_tokens + params.max_tokens > ctx {
            return Err(EngineError::invalid(format!(
                "prompt ({prompt_tokens} tokens) plus `max_tokens` ({}) exceeds the model's context of {ctx} tokens",
                params.max_tokens
            )));
        }
        if params.prefill_step == 0 {
            return Err(EngineError::invalid("`prefill_step` must be at least 1"));
        }
        params.sampling.validate()
    }

    /// Generates from `prompt` token ids, calling `on_token` for each token; it returns false to
    /// stop early (finish reason `Cancelled`).
    pub fn generate(
        &self,
        prompt: &[u32],
        params: &GenerateParams,
        mut on_token: impl FnMut(&TokenEvent<'_>) -> bool,
    ) -> Result<Completion> {
        self.check_request(prompt.len(), params)?;
        let start = Instant::now();
        let mut seq = Sequence::new(self, prompt.to_vec(), Sampler::new(params.sampling.clone())?)?;
        while seq.needs_prefill() {
            self.prefill_chunk(&mut seq, params.prefill_step)?;
        }
        let mut text = TextStream::new(&self.tokenizer, &params.stop)?;
        let mut out = String::new();
        let mut tokens = Vec::new();
        let mut first_token_at = None;

        let mut current = self.start_step(&mut seq)?;
        let finish = loop {
            // Build and start the next step before reading this one, so they overlap.
            let next = if tokens.len() + 1 < params.max_tokens { Some(self.start_step(&mut seq)?) } else { None };
            let id = current.sampled.token.item::<u32>()?;
            first_token_at.get_or_insert_with(Instant::now);
            seq.accept(current.sampled.index, id);
            if !params.ignore_eos && self.tokenizer.eos_token_ids().contains(&id) || params.stop_token_ids.contains(&id)
            {
                break FinishReason::Stop;
            }
            tokens.push(id);
            let step = text.push(id)?;
            out.push_str(&step.text);
            let logprob = current.logprob.item::<f32>()?;
            if !on_token(&TokenEvent { id, text: &step.text, logprob }) {
                break FinishReason::Cancelled;
            }
            if step.stopped {
                break FinishReason::Stop;
            }
            match next {
                Some(n) => current = n,
                None => break FinishReason::Length,
            }
        };
        let mut tail = String::new();
        if finish != FinishReason::Cancelled {
            tail = text.finish()?.text;
            out.push_str(&tail);
        }
        let first = first_token_at.unwrap_or_else(Instant::now);
        Ok(Completion {
            text: out,
            tail,
            tokens,
            finish_reason: finish,
            prompt_tokens: prompt.len(),
            time_to_first_token: first.duration_since(start).as_secs_f64(),
            decode_seconds: first.elapsed().as_secs_f64(),
        })
    }

    fn start_step(&self, seq: &mut Sequence) -> Result<Step> {
        let sampled = self.decode_step(&mut [seq])?.pop().ok_or_else(|| EngineError::invalid("no sample"))?;
        let logprob = sampled.logprobs.take(&sampled.token, 0)?.astype(mlx::Dtype::Float32)?;
        mlx::async_eval(&[&sampled.token, &logprob])?;
        Ok(Step { sampled, logprob })
    }
}

struct Step {
    sampled: Sampled,
    logprob: Array,
}
