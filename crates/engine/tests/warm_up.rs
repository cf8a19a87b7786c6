//! `Model::warm_up` runs each distinct quantized product of a model once per number of rows of
//! `warm_up_rows` up to its bound (the output projection's own), and nothing for a model without
//! quantized weights; then a pass through the engine's own paths, for every model.
mod common;

use common::model_dir;
use mlx_serving_engine::{LoadOptions, Model, warm_up_rows};

/// The distinct quantized products of a fixture whose every projection, and output projection
/// (or tied embeddings), is quantized alike: their `(out_features, in_features)`, from config.json.
fn distinct_products(model: &str, stacked: bool) -> usize {
    let text = std::fs::read_to_string(model_dir(model).join("config.json")).unwrap();
    let c: serde_json::Value = serde_json::from_str(&text).unwrap();
    let n = |key: &str| c[key].as_i64().unwrap_or_else(|| panic!("{model}: {key}"));
    let (dim, heads, kv_heads, ff, vocab) =
        (n("hidden_size"), n("num_attention_heads"), n("num_key_value_heads"), n("intermediate_size"), n("vocab_size"));
    let head_dim = c["head_dim"].as_i64().unwrap_or(dim / heads);
    let (q, kv) = (heads * head_dim, kv_heads * head_dim);
    let mut shapes = if stacked {
        vec![(q + 2 * kv, dim), (dim, q), (2 * ff, dim), (dim, ff)]
    } else {
        vec![(q, dim), (kv, dim), (dim, q), (ff, dim), (dim, ff)]
    };
    shapes.push((vocab, dim));
    shapes.sort_unstable();
    shapes.dedup();
    shapes.len()
}

#[test]
fn warm_up_runs_each_distinct_quantized_product_at_every_row_count() {
    let rows = warm_up_rows(8);
    assert_eq!(rows, [2, 3, 4, 5, 8, 9]);
    // qwen3-q4g64: the stacked query-key-value and gate-up products are both [512, 128], the
    // output and down projections both [128, 256], and the tied embeddings [1024, 128].
    // llama-q4g32 has no two alike, and an untied (quantized) lm_head.
    for (model, stacked, expected) in [
        ("qwen3-q4g64", true, 3),
        ("qwen3-q4g64", false, 4),
        ("llama-q4g32", true, 5),
        ("llama-q4g32", false, 5),
        ("qwen2-q8g64", true, 5),
    ] {
        assert_eq!(distinct_products(model, stacked), expected, "{model}, stacked {stacked}");
        let opts = LoadOptions { stack_projections: stacked, ..Default::default() };
        let m = Model::load_with(&model_dir(model), opts).unwrap();
        let w = m.warm_up(8, 8).unwrap();
        assert_eq!(w.products, expected, "{model}, stacked {stacked}: {w:?}");
        assert_eq!(w.calls, expected * rows.len(), "{model}, stacked {stacked}: {w:?}");
        // The output projection runs up to its own bound: 2 rows are [2, 3].
        let w = m.warm_up(8, 2).unwrap();
        assert_eq!(w.calls, (expected - 1) * rows.len() + 2, "{model}, stacked {stacked}: {w:?}");
        let (slowest_rows, slowest_seconds) = w.slowest.expect("a slowest call");
        assert!(rows.contains(&slowest_rows), "{w:?}");
        assert!(slowest_seconds >= 0.0 && slowest_seconds <= w.seconds, "{w:?}");
        assert!(w.engine_seconds > 0.0 && w.engine_seconds <= w.seconds, "{w:?}");
        // One row (MLX's precompiled product) runs nothing.
        let one = m.warm_up(1, 1).unwrap();
        assert_eq!((one.products, one.calls, one.slowest), (expected, 0, None), "{model}: {one:?}");
    }
}

#[test]
fn a_model_quantized_per_module_warms_up_each_bits_and_group_size() {
    // qwen3-mixed (tests/fixtures/README.md): q_proj [256, 128] at 8 bits; k_proj and v_proj
    // [128, 128] at 4, so the three are not stacked; o_proj and down_proj [128, 256] at 4; gate
    // and up stacked [512, 128] at 4 but in layer 1, where gate_proj [256, 128] is 8-bit g32 and
    // up_proj [256, 128] 4-bit g64; the tied embeddings [1024, 128] at 6 bits. Without stacking,
    // gate and up are [256, 128] at 4 bits in layers 0 and 2.
    let rows = warm_up_rows(8);
    for (stacked, expected) in [(true, 7), (false, 6)] {
        let opts = LoadOptions { stack_projections: stacked, ..Default::default() };
        let m = Model::load_with(&model_dir("qwen3-mixed"), opts).unwrap();
        let w = m.warm_up(8, 8).unwrap();
        assert_eq!((w.products, w.calls), (expected, expected * rows.len()), "stacked {stacked}: {w:?}");
    }
}

#[test]
fn a_model_without_quantized_weights_warms_up_nothing() {
    for model in ["llama-f32", "qwen3-bf16"] {
        let w = Model::load(&model_dir(model)).unwrap().warm_up(8, 8).unwrap();
        assert_eq!((w.products, w.calls, w.slowest), (0, 0, None), "{model}: {w:?}");
        // The pass through the engine's own paths runs for every model.
        assert!(w.engine_seconds > 0.0 && w.engine_seconds <= w.seconds, "{model}: {w:?}");
    }
}

#[test]
fn prefill_rows_are_bounded_by_the_tokens_and_their_padding() {
    let dir = model_dir("llama-f32");
    let load = |opts: LoadOptions| Model::load_with(&dir, opts).unwrap().transformer;
    let padded = load(LoadOptions { prefill_row_padding: Some(1.0), ..Default::default() });
    assert_eq!(padded.max_prefill_rows(2048), 4096);
    let half = load(LoadOptions { prefill_row_padding: Some(0.5), ..Default::default() });
    assert_eq!(half.max_prefill_rows(513), 769);
    let packed = load(LoadOptions { prefill_rows: false, prefill_row_padding: Some(1.0), ..Default::default() });
    assert_eq!(packed.max_prefill_rows(2048), 2048);
}
