//! The routing choice: [`route::pick`] over 4, 16 and 64 candidates.
//!
//! `cargo bench -p mlx-serving-supervisor --bench route`
//!
//! - `spread`: loads drawn at random, a quarter of the candidates hold some of the prompt's
//!   prefix (1 to 3 blocks).
//! - `tied`: every candidate equally loaded, no prefix: the tie-break draws for each of them.
use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use mlx_serving_supervisor::route::{Candidate, pick};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

fn spread(n: usize, rng: &mut SmallRng) -> Vec<Candidate> {
    (0..n as u64)
        .map(|id| Candidate {
            id,
            load: rng.random_range(0..8),
            prefix: if rng.random_range(0..4) == 0 { rng.random_range(1..4) } else { 0 },
        })
        .collect()
}

fn tied(n: usize) -> Vec<Candidate> {
    (0..n as u64).map(|id| Candidate { id, load: 2, prefix: 0 }).collect()
}

fn route(c: &mut Criterion) {
    let mut g = c.benchmark_group("pick");
    g.throughput(Throughput::Elements(1));
    for n in [4, 16, 64] {
        let mut rng = SmallRng::seed_from_u64(7);
        let cases = spread(n, &mut rng);
        g.bench_with_input(BenchmarkId::new("spread", n), &cases, |b, cases| {
            b.iter(|| pick(black_box(cases), 2, &mut rng))
        });
        let cases = tied(n);
        g.bench_with_input(BenchmarkId::new("tied", n), &cases, |b, cases| {
            b.iter(|| pick(black_box(cases), 2, &mut rng))
        });
    }
    g.finish();
}

criterion_group!(benches, route);
criterion_main!(benches);
