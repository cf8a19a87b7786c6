//! How many operations one batched decode step launches, by kind: the graph the worker hands to
//! MLX each step, built by the engine's own path (prefill, join, `decode_batch`).
//!
//! ```sh
//! cargo run --release -p mlx-serving-engine --example step_ops -- MODEL_DIR [ROWS] [separate]
//! ```
//! `separate`: the projections each on their own (the worker's `--stack-projections false`).
//! `ragged`: prompts of different lengths (rows padded, attention masked) instead of equal ones.
//! `time`: then 256 steps more, timed, as the worker runs them (step n+1 submitted before step
//! n's tokens are read), and 64 steps each evaluated before the next is built.
//! `benches/step_ops.py` prints the same count for mlx-lm's `generate_step` beside it.
use std::path::PathBuf;

use mlx_serving_engine::{Batch, BatchStep, LoadOptions, Model, Result, Sampler, SamplingParams, Sequence};

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let dir = PathBuf::from(args.next().expect("usage: step_ops MODEL_DIR [ROWS]"));
    let rows: usize = args.next().map_or(1, |r| r.parse().expect("ROWS: a number"));
    let words: Vec<String> = args.collect();
    let stack_projections = !words.iter().any(|w| w == "separate");
    let ragged = words.iter().any(|w| w == "ragged");
    let model = Model::load_with(&dir, LoadOptions { stack_projections })?;
    let mut seqs = Vec::with_capacity(rows);
    for r in 0..rows {
        // Prompts of the same length, so that no row is padded (as for one stream); `ragged`:
        // of different lengths, so that rows are padded and attention is masked.
        let len = if ragged { 32 + 5 * r } else { 32 };
        let prompt: Vec<u32> = (0..len).map(|i| 10 + ((i * 7 + r * 13) % 200) as u32).collect();
        seqs.push(Sequence::new(&model, prompt, Sampler::new(SamplingParams::default())?)?);
    }
    {
        let mut refs: Vec<&mut Sequence> = seqs.iter_mut().collect();
        while refs.iter().any(|s| s.needs_prefill()) {
            model.prefill_chunks(&mut refs, 512)?;
        }
    }
    let mut batch = Batch::new();
    model.join(&mut batch, seqs.iter_mut().enumerate().map(|(i, s)| (i as u64, s)).collect())?;
    // Reads a step's tokens into the sequences.
    let accept = |seqs: &mut Vec<Sequence>, out: &BatchStep| -> Result<()> {
        let tokens = out.tokens.to_vec::<u32>()?;
        for (s, (&t, &(_, index))) in seqs.iter_mut().zip(tokens.iter().zip(&out.rows)) {
            s.accept(index, t);
        }
        Ok(())
    };
    // Two steps evaluated, so that the third starts from computed tokens and caches.
    let mut ops = Vec::new();
    for step in 0..3 {
        let mut refs: Vec<&mut Sequence> = seqs.iter_mut().collect();
        let out = model.decode_batch(&mut batch, &mut refs)?;
        if step == 2 {
            ops = mlx::graph_ops(&[&out.tokens])?;
        }
        accept(&mut seqs, &out)?;
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
        let start = std::time::Instant::now();
        let mut pending = None;
        let (mut build, mut submit) = (std::time::Duration::ZERO, std::time::Duration::ZERO);
        for _ in 0..steps {
            let mut refs: Vec<&mut Sequence> = seqs.iter_mut().collect();
            let t0 = std::time::Instant::now();
            let out = model.decode_batch(&mut batch, &mut refs)?;
            let t1 = std::time::Instant::now();
            mlx::async_eval(&[&out.tokens])?;
            build += t1 - t0;
            submit += t1.elapsed();
            if let Some(p) = pending.replace(out) {
                accept(&mut seqs, &p)?;
            }
        }
        if let Some(p) = pending.take() {
            accept(&mut seqs, &p)?;
        }
        let pipelined = start.elapsed().as_secs_f64() / steps as f64;
        let steps = 64;
        let start = std::time::Instant::now();
        for _ in 0..steps {
            let mut refs: Vec<&mut Sequence> = seqs.iter_mut().collect();
            let out = model.decode_batch(&mut batch, &mut refs)?;
            accept(&mut seqs, &out)?;
        }
        let serial = start.elapsed().as_secs_f64() / steps as f64;
        println!(
            "timed: {:.3} ms per step pipelined ({:.1} steps/s; graph built in {:.3} ms, async_eval {:.3} ms), \
             {:.3} ms evaluated one by one",
            pipelined * 1e3,
            1.0 / pipelined,
            build.as_secs_f64() * 1e3 / 256.0,
            submit.as_secs_f64() * 1e3 / 256.0,
            serial * 1e3
        );
    }
    Ok(())
}
