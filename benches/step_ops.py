"""Operations in one decode step of mlx-lm's generate_step, by primitive, on the default device:
the counterpart of `cargo run --release -p mlx-serving-engine --example step_ops -- MODEL_DIR`.

    .venv-bench/bin/python benches/step_ops.py MODEL_DIR [time]

The step is the one generate_step runs for one stream: the model on the last token with the
prompt cache, log-softmax, argmax. Counted from mx.export_to_dot of its token, as the Rust tool
counts our graph. With `time`, then 256 steps timed as generate_step runs them (step n+1
submitted with async_eval before step n's token is read) and 64 steps each evaluated before the
next, as the Rust tool times ours.
"""
import io
import re
import sys
import time
from collections import Counter

import mlx.core as mx
from mlx_lm import load
from mlx_lm.models.cache import make_prompt_cache

VIEWS = {"Slice", "Reshape", "Transpose", "Squeeze", "ExpandDims", "Broadcast", "AsStrided", "Flatten", "Unflatten"}


def step(model, cache, y):
    logits = model(y[None], cache=cache)[:, -1, :]
    logprobs = logits - mx.logsumexp(logits, keepdims=True)
    return mx.argmax(logprobs, axis=-1)


def main():
    model, _ = load(sys.argv[1])
    prompt = mx.array([10 + (i * 7) % 200 for i in range(32)])
    cache = make_prompt_cache(model)
    y = step(model, cache, prompt)
    mx.eval(y)
    for _ in range(2):  # two steps evaluated, as in the Rust tool
        y = step(model, cache, y)
        mx.eval(y)
    y = step(model, cache, y)
    f = io.StringIO()
    mx.export_to_dot(f, y)
    ops = Counter(re.findall(r'label ="([^"]+)", shape=rectangle', f.getvalue()))
    # As the Rust tool: operations that only describe a view of their input (no kernel when
    # the input allows it).
    views = sum(n for name, n in ops.items() if name in VIEWS)
    print(f"mlx-lm: {sum(ops.values())} operations per decode step, {sum(ops.values()) - views} besides views")
    for name, n in sorted(ops.items()):
        print(f"  {name:24} {n}")
    if "time" in sys.argv[2:]:
        mx.eval(y)
        steps = 256
        start = time.perf_counter()
        y = step(model, cache, y)
        mx.async_eval(y)
        for _ in range(steps):
            nxt = step(model, cache, y)
            mx.async_eval(nxt)
            y.item()
            y = nxt
        y.item()
        pipelined = (time.perf_counter() - start) / (steps + 1)
        steps = 64
        start = time.perf_counter()
        for _ in range(steps):
            y = step(model, cache, y)
            y.item()
        serial = (time.perf_counter() - start) / steps
        print(f"timed: {pipelined * 1e3:.3f} ms per step pipelined ({1 / pipelined:.1f} steps/s), "
              f"{serial * 1e3:.3f} ms evaluated one by one")


if __name__ == "__main__":
    main()
