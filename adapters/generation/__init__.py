"""Text generation: a frozen causal LM serving many tenants' LoRA adapters with continuous batching.

Modules: ``base`` (the frozen model, its tokenizer, spec and cache), ``engine`` (the public
``GenerationEngine``: resolve/acquire adapters, encode chats, ``submit`` requests, stream tokens),
``sampling`` (``SamplingParams`` and per-sequence seeded sampling), ``detok`` (incremental UTF-8
detokenisation and stop sequences), ``kv`` (the KV-cache rows and their byte budget),
``decoder`` (one mixed-tenant forward over the KV cache), ``scheduler`` (the continuous-batching
loop), ``stream`` (what a caller iterates), ``synthetic`` (random adapters for tests and
benchmarks). ``datasets`` (training data) belongs to the training side.
Importing this package is cheap: nothing here imports torch until a submodule is imported.
"""
