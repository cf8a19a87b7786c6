"""Operations in one decode step of mlx-lm's generate_step, by primitive, on the default device:
the counterpart of `cargo run --release -p mlx-serving-engine --example step_ops -- MODEL_DIR`.

    .venv-bench/bin/python benches/step_ops.py MODEL_DIR

The step is the one generate_step runs for one stream: the model on the last token with the
prompt cache, log-softmax, argmax. Counted from mx.export_to_dot of its token, as the Rust tool
counts our graph.
"""
import io
import re
import sys
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


if __name__ == "__main__":
    main()
