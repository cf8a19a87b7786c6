"""Talk to mlx-serving's OpenAI-compatible API with the official `openai` package.

    pip install openai
    python chat.py                      # http://127.0.0.1:8080/v1, model "demo"
    MLX_SERVING_URL=http://host:8080/v1 MLX_SERVING_MODEL=demo python chat.py

The supervisor may run Rust workers or the Python worker of this package; the API is the same.
"""

import os

from openai import OpenAI

client = OpenAI(
    base_url=os.environ.get("MLX_SERVING_URL", "http://127.0.0.1:8080/v1"),
    api_key=os.environ.get("MLX_SERVING_API_KEY", "not-needed"),
)
model = os.environ.get("MLX_SERVING_MODEL", "demo")

# One answer at once.
reply = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": "Say hello in three words."}],
    max_tokens=32,
    temperature=0,
)
print(reply.choices[0].message.content)
print(f"[{reply.choices[0].finish_reason}, {reply.usage.completion_tokens} tokens]")

# The same, streamed as it is generated.
stream = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": "Count to five."}],
    max_tokens=32,
    stream=True,
)
for chunk in stream:
    if chunk.choices and chunk.choices[0].delta.content:
        print(chunk.choices[0].delta.content, end="", flush=True)
print()
