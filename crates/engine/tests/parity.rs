//! Our engine against mlx-lm's recorded outputs on the same weights (tests/fixtures/golden).
mod common;

use mlx::Dtype;
use mlx_serving_engine::{Batch, GenerateParams, LoadOptions, Model, Sampler, SamplingParams, Sequence};

fn tolerance(model: &str) -> f64 {
    // Quantized kernels may accumulate in another order than the reference; dense ones do not.
    if model.contains("-q") { 1e-2 } else { 1e-3 }
}

fn relative_error(ours: &[f32], theirs: &[f32]) -> f64 {
    let (mut num, mut den) = (0f64, 0f64);
    for (a, b) in ours.iter().zip(theirs) {
        num += f64::from(a - b).powi(2);
        den += f64::from(*b).powi(2);
    }
    (num / den).sqrt()
}

#[test]
fn every_fixture_matches_mlx_lm() {
    for golden in common::goldens() {
        let model = Model::load(&common::model_dir(&golden.model)).unwrap_or_else(|e| panic!("{}: {e}", golden.model));
        for case in &golden.cases {
            let what = format!("{} / {}", golden.model, case.name);
            // Tokenisation, through the chat template where the case has messages.
            let ids = match &case.messages {
                Some(m) => model.encode_chat(m).unwrap(),
                None => model.tokenizer.encode(&case.prompt, false).unwrap(),
            };
            assert_eq!(ids, case.prompt_ids, "{what}: prompt token ids");

            // First-step log-probabilities.
            let mut seq = Sequence::new(&model, ids.clone(), Sampler::new(SamplingParams::default()).unwrap()).unwrap();
            while seq.needs_prefill() {
                model.prefill_chunk(&mut seq, 2048).unwrap();
            }
            let first = model.decode_step(&mut [&mut seq]).unwrap().pop().unwrap();
            let ours = first.logprobs.astype(Dtype::Float32).unwrap().to_vec::<f32>().unwrap();
            assert_eq!(ours.len(), case.first_step_logprobs.len(), "{what}: vocabulary size");
            let err = relative_error(&ours, &case.first_step_logprobs);
            assert!(err <= tolerance(&golden.model), "{what}: first-step relative error {err:e}");

            // 64 greedy tokens.
            let params =
                GenerateParams { max_tokens: case.greedy_tokens.len(), ignore_eos: true, ..Default::default() };
            let done = model.generate(&ids, &params, |_| true).unwrap();
            assert_eq!(done.tokens, case.greedy_tokens, "{what}: greedy tokens");
        }
    }
}

#[test]
fn chunked_prefill_matches_mlx_lm() {
    // Small prefill chunks change how the prompt is split, never which tokens come out.
    let golden = common::goldens().into_iter().find(|g| g.model == "qwen3-bf16").expect("qwen3-bf16 golden");
    let model = Model::load(&common::model_dir(&golden.model)).unwrap();
    let case = golden.cases.iter().max_by_key(|c| c.prompt_ids.len()).unwrap();
    let params = GenerateParams { max_tokens: 16, ignore_eos: true, prefill_step: 7, ..Default::default() };
    let done = model.generate(&case.prompt_ids, &params, |_| true).unwrap();
    assert_eq!(done.tokens, case.greedy_tokens[..16]);
}

#[test]
fn batched_decode_matches_each_sequence_alone() {
    let golden = common::goldens().into_iter().find(|g| g.model == "llama-bf16").expect("llama-bf16 golden");
    let model = Model::load(&common::model_dir(&golden.model)).unwrap();
    // Prompts of different lengths, decoded together in one forward pass per step.
    let prompts: Vec<Vec<u32>> = golden.cases.iter().map(|c| c.prompt_ids.clone()).chain([vec![5, 6, 7]]).collect();
    let steps = 24;
    let alone: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| {
            let params = GenerateParams { max_tokens: steps, ignore_eos: true, ..Default::default() };
            model.generate(p, &params, |_| true).unwrap().tokens
        })
        .collect();
    let mut seqs: Vec<Sequence> = prompts
        .iter()
        .map(|p| Sequence::new(&model, p.clone(), Sampler::new(SamplingParams::default()).unwrap()).unwrap())
        .collect();
    for s in &mut seqs {
        while s.needs_prefill() {
            model.prefill_chunk(s, 2048).unwrap();
        }
    }
    for _ in 0..steps {
        let mut refs: Vec<&mut Sequence> = seqs.iter_mut().collect();
        let out = model.decode_step(&mut refs).unwrap();
        for (s, o) in seqs.iter_mut().zip(out) {
            let id = o.token.item::<u32>().unwrap();
            s.accept(o.index, id);
        }
    }
    for (i, s) in seqs.iter().enumerate() {
        assert_eq!(s.generated(), alone[i].as_slice(), "sequence {i}");
    }
}

#[test]
fn seeded_sampling_is_reproducible_on_a_model() {
    let model = Model::load(&common::model_dir("qwen3-bf16")).unwrap();
    let prompt = model.tokenizer.encode("The quick brown fox", false).unwrap();
    let params = GenerateParams {
        max_tokens: 32,
        ignore_eos: true,
        sampling: SamplingParams { temperature: 0.9, top_p: 0.9, seed: Some(42), ..Default::default() },
        ..Default::default()
    };
    let a = model.generate(&prompt, &params, |_| true).unwrap().tokens;
    let b = model.generate(&prompt, &params, |_| true).unwrap().tokens;
    assert_eq!(a, b);
    let other = GenerateParams { sampling: SamplingParams { seed: Some(43), ..params.sampling.clone() }, ..params };
    assert_ne!(a, model.generate(&prompt, &other, |_| true).unwrap().tokens);
}

#[test]
fn streamed_text_equals_the_decoded_tokens() {
    let model = Model::load(&common::model_dir("qwen2-bf16")).unwrap();
    let prompt = model.tokenizer.encode("café naïve — 東京 🙂", false).unwrap();
    let params = GenerateParams {
        max_tokens: 48,
        ignore_eos: true,
        sampling: SamplingParams { temperature: 1.0, seed: Some(3), ..Default::default() },
        ..Default::default()
    };
    let mut streamed = String::new();
    let done = model
        .generate(&prompt, &params, |t| {
            streamed.push_str(t.text);
            true
        })
        .unwrap();
    streamed.push_str(&done.tail);
    assert_eq!(streamed, done.text);
    // Ids past the tokenizer's vocabulary (the embedding table is padded) carry no text.
    let known: Vec<u32> =
        done.tokens.iter().copied().filter(|&t| (t as usize) < model.tokenizer.vocab_size()).collect();
    assert_eq!(done.text, model.tokenizer.decode(&known, true).unwrap());
}

#[test]
fn a_repetition_penalty_gives_the_same_tokens_whether_steps_overlap_or_not() {
    // The penalty's window ends with the previous sample. When the next step is built before
    // that sample is read (as the worker and `generate` do), its lazy value stands in for it.
    let model = Model::load(&common::model_dir("llama-f32")).unwrap();
    let golden = common::goldens().into_iter().find(|g| g.model == "llama-f32").expect("llama-f32 golden");
    let prompts: Vec<Vec<u32>> = golden.cases.iter().map(|c| c.prompt_ids.clone()).chain([vec![5, 6, 7]]).collect();
    let sampling = SamplingParams { repetition_penalty: 1.8, repetition_context_size: 3, ..Default::default() };
    let steps = 16;
    let batched = |overlap: bool| -> Vec<Vec<u32>> {
        let (mut seqs, mut batch) = joined_batch(&model, &prompts, &sampling);
        let mut previous = None;
        for _ in 0..steps {
            let mut refs: Vec<&mut Sequence> = seqs.iter_mut().collect();
            let out = model.decode_batch(&mut batch, &mut refs).unwrap();
            if overlap {
                // Read a step only once the one after it is built.
                if let Some(p) = previous.replace(out) {
                    p.accept(&mut seqs).unwrap();
                }
            } else {
                out.accept(&mut seqs).unwrap();
            }
        }
        if let Some(p) = previous {
            p.accept(&mut seqs).unwrap();
        }
        seqs.iter().map(|s| s.generated().to_vec()).collect()
    };
    let read_each_step = batched(false);
    assert_eq!(batched(true), read_each_step);
    let params =
        GenerateParams { max_tokens: steps, ignore_eos: true, sampling: sampling.clone(), ..Default::default() };
    for (p, want) in prompts.iter().zip(&read_each_step) {
        assert_eq!(&model.generate(p, &params, |_| true).unwrap().tokens, want, "generate, prompt {p:?}");
    }
    // The penalty is in effect: greedy decoding without it gives other tokens.
    let (plain, _) = batched_greedy(&model, &prompts, steps);
    assert_ne!(plain, read_each_step);
}

/// Rows joining a running batch: a prompt longer than the batch's columns shifts the rows
/// already there to the right, a shorter one is padded; every row still decodes its prompt's
/// tokens as it would alone.
#[test]
fn rows_joining_a_running_batch_decode_as_each_alone() {
    let model = Model::load(&common::model_dir("llama-bf16")).unwrap();
    let first: Vec<Vec<u32>> = vec![(1..9).collect(), (3..15).collect()];
    let later: Vec<Vec<u32>> = vec![(2..42).map(|i| i * 3).collect(), vec![7, 8, 9]];
    let (mut seqs, mut batch) = joined_batch(&model, &first, &SamplingParams::default());
    let step = |seqs: &mut Vec<Sequence>, batch: &mut Batch| {
        let mut refs: Vec<&mut Sequence> = seqs.iter_mut().collect();
        let out = model.decode_batch(batch, &mut refs).unwrap();
        out.accept(seqs).unwrap();
    };
    for _ in 0..4 {
        step(&mut seqs, &mut batch);
    }
    let mut more = prefilled(&model, &later, &SamplingParams::default());
    assert!(later[0].len() as i32 - 1 > first[1].len() as i32 + 4, "the long prompt must shift the batch");
    model.join(&mut batch, more.iter_mut().enumerate().map(|(i, s)| ((first.len() + i) as u64, s)).collect()).unwrap();
    seqs.extend(more);
    for _ in 0..12 {
        step(&mut seqs, &mut batch);
    }
    for (i, p) in first.iter().chain(&later).enumerate() {
        let n = seqs[i].generated().len();
        let params = GenerateParams { max_tokens: n, ignore_eos: true, ..Default::default() };
        assert_eq!(seqs[i].generated(), model.generate(p, &params, |_| true).unwrap().tokens, "row {i}");
    }
}

/// Prompts prefilled together as rows of one batch decode as each alone: new prompts, prompts
/// going on from an earlier chunk, and prompts starting from another sequence's keys and
/// values (as from the prefix cache), in rows of different lengths.
#[test]
fn prompts_prefilled_as_rows_decode_as_each_alone() {
    for name in ["llama-bf16", "qwen3-q4g64"] {
        let opts = LoadOptions { prefill_row_padding: Some(1.0), ..Default::default() };
        let model = Model::load_with(&common::model_dir(name), opts).unwrap();
        let source: Vec<u32> = (1..21).collect();
        let seeded: Vec<u32> = (1..11).chain(100..110).collect();
        let prompts: Vec<Vec<u32>> =
            vec![source.clone(), (30..54).collect(), (3..31).map(|i| i * 2).collect(), seeded, vec![9, 8, 7, 6, 5]];
        let mut seqs: Vec<Sequence> = prompts
            .iter()
            .map(|p| Sequence::new(&model, p.clone(), Sampler::new(SamplingParams::default()).unwrap()).unwrap())
            .collect();
        let mut first = prefilled(&model, &[source], &SamplingParams::default());
        seqs[3].seed_cache(first[0].take_cache().prefix(10).unwrap()).unwrap();
        // Chunks of 30 tokens: the first two prompts as new rows; then the second going on beside
        // the third; then the third going on beside the seeded one and the last.
        let mut chunks = Vec::new();
        {
            let mut refs: Vec<&mut Sequence> = seqs.iter_mut().collect();
            while refs.iter().any(|s| s.needs_prefill()) {
                let earlier: Vec<i32> = refs.iter().map(|s| s.cached_tokens()).collect();
                let counts = model.prefill_chunks(&mut refs, 30).unwrap();
                chunks.push(model.transformer.prefill_rows(&counts, &earlier));
            }
        }
        assert_eq!(chunks, [vec![0, 1], vec![1, 2], vec![2, 3, 4]], "{name}: rows of each chunk");
        let mut batch = Batch::new();
        model.join(&mut batch, seqs.iter_mut().enumerate().map(|(i, s)| (i as u64, s)).collect()).unwrap();
        for _ in 0..12 {
            let mut refs: Vec<&mut Sequence> = seqs.iter_mut().collect();
            let out = model.decode_batch(&mut batch, &mut refs).unwrap();
            out.accept(&mut seqs).unwrap();
        }
        for (i, p) in prompts.iter().enumerate() {
            let params = GenerateParams { max_tokens: 12, ignore_eos: true, ..Default::default() };
            assert_eq!(seqs[i].generated(), model.generate(p, &params, |_| true).unwrap().tokens, "{name}: row {i}");
        }
    }
}

/// Which prompts are prefilled as rows: padding and attention over the longest row's columns
/// within the loaded share of what packing them computes.
#[test]
fn prompts_are_rows_while_padding_stays_within_its_share() {
    let dir = common::model_dir("qwen3-bf16");
    let with = |share: f32| {
        Model::load_with(&dir, LoadOptions { prefill_row_padding: Some(share), ..Default::default() }).unwrap()
    };
    let (some, none) = (with(1.0), with(0.0));
    let burst = [127, 127, 127, 127, 4];
    assert_eq!(some.transformer.prefill_rows(&burst, &[0; 5]), [0, 1, 2, 3, 4]);
    assert_eq!(none.transformer.prefill_rows(&burst, &[0; 5]), [0, 1, 2, 3], "equal lengths only");
    assert_eq!(none.transformer.prefill_rows(&[20, 20], &[0, 300]), Vec::<usize>::new(), "unequal columns");
    // A prompt going on after 4000 positions would make every row attend over them.
    let counts = [18, 22, 16, 8];
    assert_eq!(some.transformer.prefill_rows(&counts, &[4000, 0, 0, 0]), [1, 2, 3]);
    assert_eq!(some.transformer.prefill_rows(&counts, &[40, 30, 20, 10]), [0, 1, 2, 3]);
    assert_eq!(some.transformer.prefill_rows(&[0, 30, 0], &[0; 3]), Vec::<usize>::new(), "one prompt");
    let off = Model::load_with(&dir, LoadOptions { prefill_rows: false, ..Default::default() }).unwrap();
    assert_eq!(off.transformer.prefill_rows(&burst, &[0; 5]), Vec::<usize>::new());
}

/// Prompts prefilled as rows of one batch build about as many operations as one prompt: each
/// layer runs one attention for all of them, where packing them runs one each.
#[test]
fn prompts_prefilled_as_rows_build_about_one_prompts_operations() {
    let dir = common::model_dir("qwen3-bf16");
    let ops = |opts: LoadOptions, prompts: usize| {
        let model = Model::load_with(&dir, opts).unwrap();
        let mut seqs: Vec<Sequence> = (0..prompts)
            .map(|r| {
                let p = (0..16).map(|i| 10 + i + r as u32).collect();
                Sequence::new(&model, p, Sampler::new(SamplingParams::default()).unwrap()).unwrap()
            })
            .collect();
        let mut refs: Vec<&mut Sequence> = seqs.iter_mut().collect();
        let mut n = 0;
        model
            .prefill_chunks_with(&mut refs, 512, |arrays| {
                n = mlx::graph_op_count(arrays)?;
                Ok(())
            })
            .unwrap();
        assert!(seqs.iter().all(|s| !s.needs_prefill()));
        n
    };
    let rows = LoadOptions::default();
    let packed = LoadOptions { prefill_rows: false, ..Default::default() };
    let one = ops(rows, 1);
    assert_eq!(one, ops(packed, 1), "one prompt is packed either way");
    let (as_rows, each) = (ops(rows, 8), ops(packed, 8));
    assert!(as_rows < 2 * one, "8 prompts as rows: {as_rows} operations, one prompt: {one}");
    assert!(each > 4 * one, "8 prompts packed: {each} operations, one prompt: {one}");
}

/// Greedy tokens of `prompts` decoded together as the worker decodes them (one batch, rows of
/// different lengths), and the first step's log-probabilities of each row.
fn batched_greedy(model: &Model, prompts: &[Vec<u32>], steps: usize) -> (Vec<Vec<u32>>, Vec<f32>) {
    let (mut seqs, mut batch) = joined_batch(model, prompts, &SamplingParams::default());
    let mut first = Vec::new();
    for step in 0..steps {
        let mut refs: Vec<&mut Sequence> = seqs.iter_mut().collect();
        let out = model.decode_batch(&mut batch, &mut refs).unwrap();
        if step == 0 {
            first = out.logprobs.astype(Dtype::Float32).unwrap().to_vec::<f32>().unwrap();
        }
        out.accept(&mut seqs).unwrap();
    }
    (seqs.iter().map(|s| s.generated().to_vec()).collect(), first)
}

/// Sequences of `prompts`, not prefilled yet.
fn sequences(model: &Model, prompts: &[Vec<u32>], sampling: &SamplingParams) -> Vec<Sequence> {
    prompts.iter().map(|p| Sequence::new(model, p.clone(), Sampler::new(sampling.clone()).unwrap()).unwrap()).collect()
}

/// Sequences of `prompts`, prefilled together in chunks, as the worker does.
fn prefilled(model: &Model, prompts: &[Vec<u32>], sampling: &SamplingParams) -> Vec<Sequence> {
    let mut seqs = sequences(model, prompts, sampling);
    let mut refs: Vec<&mut Sequence> = seqs.iter_mut().collect();
    while refs.iter().any(|s| s.needs_prefill()) {
        model.prefill_chunks(&mut refs, 512).unwrap();
    }
    seqs
}

/// Sequences of `prompts`, prefilled together and joined into one batch, as the worker does.
fn joined_batch(model: &Model, prompts: &[Vec<u32>], sampling: &SamplingParams) -> (Vec<Sequence>, Batch) {
    let mut seqs = sequences(model, prompts, sampling);
    let batch = model.prefilled_batch(&mut seqs, 512).unwrap();
    (seqs, batch)
}

#[test]
fn stacked_projections_change_no_value() {
    // Dense with biases, quantized at two group sizes, q/k norms: every part of a stacked product;
    // quantized per module, where only the projections quantized alike are stacked.
    for name in ["qwen2-bf16", "qwen3-bf16", "qwen3-q4g64", "llama-q4g32", "qwen3-mixed"] {
        let dir = common::model_dir(name);
        let stacked = Model::load_with(&dir, LoadOptions { stack_projections: true, ..Default::default() }).unwrap();
        let separate = Model::load_with(&dir, LoadOptions { stack_projections: false, ..Default::default() }).unwrap();
        assert!(stacked.weight_bytes() == separate.weight_bytes(), "{name}: the same weights");
        let prompts: Vec<Vec<u32>> = vec![(10..40).collect(), vec![5, 6, 7], (100..117).collect()];
        let (a_tokens, a_first) = batched_greedy(&stacked, &prompts, 12);
        let (b_tokens, b_first) = batched_greedy(&separate, &prompts, 12);
        assert_eq!(a_tokens, b_tokens, "{name}: greedy tokens");
        assert!(a_first == b_first, "{name}: first-step log-probabilities differ");
    }
}
