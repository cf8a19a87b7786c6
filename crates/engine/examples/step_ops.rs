//! How many operations one batched decode step launches, by kind: the graph the worker hands to
//! MLX each step, built by the engine's own path (prefill, join, `decode_batch`).
//!
//! ```sh
//! cargo run --release -p mlx-serving-engine --example step_ops -- MODEL_DIR [ROWS] [separate]
//! ```
//! `separate`: the projections each on their own (the worker's `--stack-projections false`).
//! `ragged`: prompts of different lengths (rows padded, attention masked) instead of equal ones.
//! `len=N`: prompts of N tokens (and more when ragged) instead of 32.
//! `memory`: with `time`, also the memory each pipelined step allocates beyond what was active
//! before it (MLX's peak), median and largest, against one layer's keys: a step whose cache
//! writes cannot reuse their buffer (because the step before still reads it) copies the cache.
//! `time`: then 256 steps more, timed, as the worker runs them (step n+1 submitted before step
//! n's tokens are read), and 64 steps each evaluated before the next is built. With
//! `CUPTI_TRACE_SWITCH` set (benches/gpu/cupti_trace.cpp), that file exists while the 256 steps
//! run, so that a device timeline records them alone (benches/gpu/steptrace.sh).
//! `prefill`: instead, times the prefill of ROWS prompts of 128 tokens in chunks of 512 (as the
//! worker admits a burst of requests), their joining a batch a chunk at a time, and the prefill
//! of one prompt as long as all of them; with the prompts of a chunk as rows of one batch, and
//! each attended on its own (`--prefill-rows false`), with the operations of each.
//! `chunk=N`: prefill chunks of N tokens instead of 512 (an idle worker's `--prefill-chunk-idle`).
//! `padding=SHARE`: how much padding rows prefilled together may add, as a share of their tokens
//! (the worker's `--prefill-row-padding`).
//! `nokernel`: padded rows attend through MLX's masked attention even where the padded-attention
//! kernel runs (MLX CUDA).
//! `agree`: instead, the first 32 greedy tokens of ROWS prompts of different lengths decoded in
//! one batch (with the padded-attention kernel where it runs, and without), against each
//! prompt decoded alone (no padding): how many tokens agree, and where rows first differ.
//! `benches/step_ops.py` prints the same count for mlx-lm's `generate_step` beside it.
use std::path::PathBuf;

use mlx_serving_engine::{Batch, LoadOptions, Model, Result, Sampler, SamplingParams, Sequence};

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let dir = PathBuf::from(args.next().expect("usage: step_ops MODEL_DIR [ROWS]"));
    let rows: usize = args.next().map_or(1, |r| r.parse().expect("ROWS: a number"));
    let words: Vec<String> = args.collect();
    let stack_projections = !words.iter().any(|w| w == "separate");
    let ragged = words.iter().any(|w| w == "ragged");
    let padded_attention_kernel = !words.iter().any(|w| w == "nokernel");
    let prefill_row_padding =
        words.iter().find_map(|w| w.strip_prefix("padding=")).map(|p| p.parse().expect("padding=SHARE"));
    let opts = LoadOptions { stack_projections, padded_attention_kernel, prefill_row_padding, ..Default::default() };
    let model = Model::load_with(&dir, opts)?;
    if words.iter().any(|w| w == "prefill") {
        let chunk = words.iter().find_map(|w| w.strip_prefix("chunk=")).map_or(512, |c| c.parse().expect("chunk=N"));
        time_prefill(&model, rows, chunk, "prompts of a chunk as rows of one batch")?;
        let other = Model::load_with(&dir, LoadOptions { prefill_rows: false, ..opts })?;
        return time_prefill(&other, rows, chunk, "each prompt attended on its own");
    }
    if words.iter().any(|w| w == "agree") {
        let other = Model::load_with(&dir, LoadOptions { padded_attention_kernel: false, ..opts })?;
        return agree(&model, &other, rows);
    }
    // Prompts of the same length, so that no row is padded (as for one stream); `ragged`: of
    // different lengths, so that rows are padded and attention is masked.
    let len: usize = words.iter().find_map(|w| w.strip_prefix("len=")).map_or(32, |n| n.parse().expect("len=N"));
    let prompts: Vec<Vec<u32>> = (0..rows).map(|r| prompt(r, if ragged { len + 5 * r } else { len })).collect();
    let (mut seqs, mut batch) = joined_batch(&model, &prompts)?;
    // Two steps evaluated, so that the third starts from computed tokens and caches.
    let mut ops = Vec::new();
    for step in 0..3 {
        let mut refs: Vec<&mut Sequence> = seqs.iter_mut().collect();
        let out = model.decode_batch(&mut batch, &mut refs)?;
        if step == 2 {
            ops = mlx::graph_ops(&[&out.tokens])?;
        }
        out.accept(&mut seqs)?;
    }
    let total: usize = ops.iter().map(|(_, n)| n).sum();
    // Operations that only describe a view of their input's buffer (no kernel when the input
    // allows it; a reshape of a strided input copies).
    const VIEWS: [&str; 9] =
        ["Slice", "Reshape", "Transpose", "Squeeze", "ExpandDims", "Broadcast", "AsStrided", "Flatten", "Unflatten"];
    let views: usize = ops.iter().filter(|(name, _)| VIEWS.contains(&name.as_str())).map(|(_, n)| n).sum();
    println!(
        "rows {rows}, stacked projections {stack_projections}: {total} operations per decode step, {} besides views",
        total - views
    );
    for (name, n) in ops {
        println!("  {name:24} {n}");
    }
    if words.iter().any(|w| w == "time") {
        let steps = 256;
        let switch = std::env::var_os("CUPTI_TRACE_SWITCH").map(PathBuf::from);
        if let Some(path) = &switch {
            std::fs::write(path, b"").expect("CUPTI_TRACE_SWITCH: a writable path");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let start = std::time::Instant::now();
        let mut pending = None;
        let (mut build, mut submit, mut wait) =
            (std::time::Duration::ZERO, std::time::Duration::ZERO, std::time::Duration::ZERO);
        let probe = words.iter().any(|w| w == "memory");
        let mut extra = Vec::with_capacity(steps);
        for _ in 0..steps {
            let mut refs: Vec<&mut Sequence> = seqs.iter_mut().collect();
            let active = if probe {
                mlx::memory::reset_peak();
                mlx::memory::active()
            } else {
                0
            };
            let t0 = std::time::Instant::now();
            let out = model.decode_batch(&mut batch, &mut refs)?;
            let t1 = std::time::Instant::now();
            mlx::async_eval(&[&out.tokens])?;
            build += t1 - t0;
            submit += t1.elapsed();
            if probe {
                extra.push(mlx::memory::peak().saturating_sub(active));
            }
            if let Some(p) = pending.replace(out) {
                let t2 = std::time::Instant::now();
                p.accept(&mut seqs)?;
                wait += t2.elapsed();
            }
        }
        if let Some(p) = pending.take() {
            p.accept(&mut seqs)?;
        }
        let pipelined = start.elapsed().as_secs_f64() / steps as f64;
        if probe {
            extra.sort_unstable();
            let layers = model.transformer.num_layers().max(1);
            println!(
                "memory: a pipelined step allocates {:.3} MB beyond what was active before it (median; largest {:.3} MB, \
                 with the cache's growth), against {:.3} MB of keys per layer",
                extra[extra.len() / 2] as f64 / 1e6,
                extra[extra.len() - 1] as f64 / 1e6,
                batch.nbytes() as f64 / 2.0 / layers as f64 / 1e6
            );
        }
        if let Some(path) = &switch {
            std::thread::sleep(std::time::Duration::from_millis(20));
            std::fs::remove_file(path).expect("CUPTI_TRACE_SWITCH: removable");
            std::thread::sleep(std::time::Duration::from_millis(500));
        }
        let steps = 64;
        let start = std::time::Instant::now();
        for _ in 0..steps {
            let mut refs: Vec<&mut Sequence> = seqs.iter_mut().collect();
            let out = model.decode_batch(&mut batch, &mut refs)?;
            out.accept(&mut seqs)?;
        }
        let serial = start.elapsed().as_secs_f64() / steps as f64;
        println!(
            "timed: {:.3} ms per step pipelined ({:.1} steps/s; graph built in {:.3} ms, async_eval {:.3} ms, \
             tokens waited for {:.3} ms), {:.3} ms evaluated one by one",
            pipelined * 1e3,
            1.0 / pipelined,
            build.as_secs_f64() * 1e3 / 256.0,
            submit.as_secs_f64() * 1e3 / 256.0,
            wait.as_secs_f64() * 1e3 / 256.0,
            serial * 1e3
        );
    }
    Ok(())
}

/// Prefill of `rows` prompts of 128 tokens, `chunk` tokens at a time as the worker runs it, each chunk's
/// prompts then joining one batch; and one prompt of all their tokens. Times in milliseconds.
fn time_prefill(model: &Model, rows: usize, chunk: usize, how: &str) -> Result<()> {
    const LEN: usize = 128;
    let run = |rows: usize, len: usize| -> Result<(f64, f64, usize, usize, usize)> {
        let mut seqs = (0..rows)
            .map(|r| Sequence::new(model, prompt(r, len), Sampler::new(SamplingParams::default())?))
            .collect::<Result<Vec<_>>>()?;
        let (mut prefill, mut join, mut chunks, mut join_ops, mut prefill_ops) = (0.0, 0.0, 0, 0, 0);
        let mut batch = Batch::new();
        let mut joined = 0;
        while joined < rows {
            let t = std::time::Instant::now();
            let mut refs: Vec<&mut Sequence> = seqs[joined..].iter_mut().collect();
            model.prefill_chunks_with(&mut refs, chunk, |arrays| {
                prefill_ops += mlx::graph_op_count(arrays)?;
                Ok(())
            })?;
            prefill += t.elapsed().as_secs_f64() * 1e3;
            chunks += 1;
            let ready = seqs[joined..].iter().take_while(|s| !s.needs_prefill()).count();
            let t = std::time::Instant::now();
            let group = seqs[joined..joined + ready].iter_mut().enumerate().map(|(i, s)| ((joined + i) as u64, s));
            model.join(&mut batch, group.collect())?;
            join_ops += mlx::graph_op_count(&batch.arrays())?;
            mlx::eval(&batch.arrays())?;
            join += t.elapsed().as_secs_f64() * 1e3;
            joined += ready;
        }
        Ok((prefill, join, chunks, join_ops, prefill_ops))
    };
    run(rows, LEN)?; // warm-up
    run(1, rows * LEN)?;
    let (prefill, join, chunks, join_ops, prefill_ops) = run(rows, LEN)?;
    let (one, _, one_chunks, _, one_ops) = run(1, rows * LEN)?;
    let tokens = (rows * (LEN - 1)) as f64;
    println!(
        "prefill, {how}: {rows} prompts x {LEN} tokens in {chunks} chunks of {chunk}: {prefill:.1} ms ({:.0} tok/s, \
         {prefill_ops} operations), joining a batch chunk by chunk {join:.1} ms ({join_ops} operations); \
         one prompt of {} tokens in {one_chunks} chunks: {one:.1} ms ({:.0} tok/s, {one_ops} operations)",
        tokens / prefill * 1e3,
        rows * LEN,
        (rows * LEN - 1) as f64 / one * 1e3
    );
    Ok(())
}

/// Prompt `r` of `len` tokens: ids that differ between prompts.
fn prompt(r: usize, len: usize) -> Vec<u32> {
    (0..len).map(|i| 10 + ((i * 7 + r * 13) % 200) as u32).collect()
}

/// Sequences of `prompts` (greedy), prefilled in chunks of 512 and joined into one batch, as the
/// worker does.
fn joined_batch(model: &Model, prompts: &[Vec<u32>]) -> Result<(Vec<Sequence>, Batch)> {
    let mut seqs = prompts
        .iter()
        .map(|p| Sequence::new(model, p.clone(), Sampler::new(SamplingParams::default())?))
        .collect::<Result<Vec<_>>>()?;
    let batch = model.prefilled_batch(&mut seqs, 512)?;
    Ok((seqs, batch))
}

/// Greedy tokens of `prompts` decoded together in one batch, `steps` each.
fn batched_greedy(model: &Model, prompts: &[Vec<u32>], steps: usize) -> Result<Vec<Vec<u32>>> {
    let (mut seqs, mut batch) = joined_batch(model, prompts)?;
    let mut out = vec![Vec::with_capacity(steps); prompts.len()];
    for _ in 0..steps {
        let mut refs: Vec<&mut Sequence> = seqs.iter_mut().collect();
        let step = model.decode_batch(&mut batch, &mut refs)?;
        for (row, t) in out.iter_mut().zip(step.accept(&mut seqs)?) {
            row.push(t);
        }
    }
    Ok(out)
}

/// Ragged rows in one batch, with `model` and `other`, against each row alone.
fn agree(model: &Model, other: &Model, rows: usize) -> Result<()> {
    const STEPS: usize = 32;
    let prompts: Vec<Vec<u32>> = (0..rows).map(|r| prompt(r, 20 + 9 * r)).collect();
    let alone: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| Ok(batched_greedy(model, std::slice::from_ref(p), STEPS)?.remove(0)))
        .collect::<Result<_>>()?;
    for (name, m) in [("this build", model), ("masked attention", other)] {
        let together = batched_greedy(m, &prompts, STEPS)?;
        let same: usize =
            together.iter().zip(&alone).map(|(a, b)| a.iter().zip(b).filter(|(x, y)| x == y).count()).sum();
        let first: Vec<String> = together
            .iter()
            .zip(&alone)
            .map(|(a, b)| a.iter().zip(b).position(|(x, y)| x != y).map_or("-".into(), |i| i.to_string()))
            .collect();
        println!(
            "agree ({name}): {same} of {} tokens equal to each row decoded alone; first difference per row: {}",
            rows * STEPS,
            first.join(" ")
        );
    }
    Ok(())
}
