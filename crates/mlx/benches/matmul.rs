//! bfloat16 matrix products on the CPU: MLX's own `matmul` against the packed product
//! (`fast::packed_matmul`, shim/gemm.cpp), which gives the same values bit for bit.
//!
//! `cargo bench -p mlx-serving-mlx --bench matmul`
//!
//! Each case is `x [m, k] @ w[n, k]^T` evaluated to completion, so the time includes one trip
//! through MLX's evaluation (graph, CPU stream thread), as a single product in a model would not.
//! Shapes: a decode step of one and of 32 sequences and a 512-token prefill chunk, on the test
//! model's projections (k 128, n 256) and on a larger model's MLP (k 1024, n 3072).
use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use mlx::{Array, Dtype, fast};

fn filled(shape: &[i32], step: f32) -> Array {
    let n: i32 = shape.iter().product();
    let data: Vec<f32> = (0..n).map(|i| ((i % 17) as f32 - 8.0) * step).collect();
    let a = Array::from_slice(&data, shape).and_then(|a| a.astype(Dtype::Bfloat16)).expect("an array");
    a.eval().expect("evaluated");
    a
}

fn matmul(c: &mut Criterion) {
    if !fast::packed_matmul_supported() {
        eprintln!("the packed product is not offered on this platform");
        return;
    }
    let mut g = c.benchmark_group("bf16_matmul");
    for (m, k, n) in [(1, 128, 256), (32, 128, 256), (512, 128, 256), (1, 1024, 3072), (32, 1024, 3072)] {
        let x = filled(&[m, k], 0.01);
        let w = filled(&[n, k], 0.02);
        let packed = fast::pack_weight(&w).expect("packed");
        packed.eval().expect("evaluated");
        let wt = w.t().expect("a transposed view");
        g.throughput(Throughput::Elements((2 * m * k * n) as u64));
        let shape = format!("{m}x{k}x{n}");
        g.bench_with_input(BenchmarkId::new("mlx", &shape), &(), |b, ()| {
            b.iter(|| black_box(&x).matmul(&wt).and_then(|y| y.eval()).expect("a product"))
        });
        g.bench_with_input(BenchmarkId::new("packed", &shape), &(), |b, ()| {
            b.iter(|| fast::packed_matmul(black_box(&x), &packed, n, None).and_then(|y| y.eval()).expect("a product"))
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20);
    targets = matmul
}
criterion_main!(benches);
