//! How many operations one batched decode step launches, by kind: the graph the worker hands to
//! MLX each step, built by the engine's own path (prefill, join, `decode_batch`).
//!
//! ```sh
//! cargo run --release -p mlx-serving-engine --example step_ops -- MODEL_DIR [ROWS] [separate]
//! ```
//! `separate`: the projections each on their own (the worker's `--stack-projections false`).
//! `benches/step_ops.py` prints the same count for mlx-lm's `generate_step` beside it.
use std::path::PathBuf;

use mlx_serving_engine::{Batch, LoadOptions, Model, Result, Sampler, SamplingParams, Sequence};

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let dir = PathBuf::from(args.next().expect("usage: step_ops MODEL_DIR [ROWS]"));
    let rows: usize = args.next().map_or(1, |r| r.parse().expect("ROWS: a number"));
    let stack_projections = args.next().as_deref() != Some("separate");
    let model = Model::load_with(&dir, LoadOptions { stack_projections })?;
    let mut seqs = Vec::with_capacity(rows);
    for r in 0..rows {
        // Prompts of the same length, so that no row is padded (as for one stream).
        let prompt: Vec<u32> = (0..32).map(|i| 10 + ((i * 7 + r * 13) % 200) as u32).collect();
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
    // Two steps evaluated, so that the third starts from computed tokens and caches.
    let mut ops = Vec::new();
    for step in 0..3 {
        let mut refs: Vec<&mut Sequence> = seqs.iter_mut().collect();
        let out = model.decode_batch(&mut batch, &mut refs)?;
        if step == 2 {
            ops = mlx::graph_ops(&[&out.tokens])?;
        }
        let tokens = out.tokens.to_vec::<u32>()?;
        for (s, (&t, &(_, index))) in seqs.iter_mut().zip(tokens.iter().zip(&out.rows)) {
            s.accept(index, t);
        }
    }
    let total: usize = ops.iter().map(|(_, n)| n).sum();
    // Operations that only describe a view of their input's buffer (no kernel when the input
    // allows it; a reshape of a strided input copies).
    const VIEWS: [&str; 9] = ["Slice", "Reshape", "Transpose", "Squeeze", "ExpandDims", "Broadcast", "AsStrided", "Flatten", "Unflatten"];
    let views: usize = ops.iter().filter(|(name, _)| VIEWS.contains(&name.as_str())).map(|(_, n)| n).sum();
    println!(
        "rows {rows}, stacked projections {stack_projections}: {total} operations per decode step, {} besides views",
        total - views
    );
    for (name, n) in ops {
        println!("  {name:24} {n}");
    }
    Ok(())
}
